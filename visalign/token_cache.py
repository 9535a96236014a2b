"""Tokenise each distinct prompt once.

diffusers' ``encode_prompt`` tokenises the whole batch on every call, and the SD-family
pipelines do it twice (once padded to ``max_length``, once padded to the longest prompt to
warn about truncation). In a training loop the same captions come back every epoch, and on a
GPU this CPU work sits on the step's critical path: 256 testbed captions cost about 20 ms per
tokenizer pass on one CPU core, and an SD step makes three passes (the third is ``tokenize`` for
the textual-inversion check); ``benchmarks/bench_generator.py``, "Prompt encoding".

:class:`CachingTokenizer` stands in for a ``transformers`` tokenizer while a Generator encodes
prompts. It keeps the token ids of every string it has seen (per truncation setting, least
recently used first out), pads the batch as the tokenizer would, and returns the same
``BatchEncoding``. Calls it does not understand (other arguments, non-string inputs, a result
whose lengths would differ) go to the tokenizer unchanged. It is swapped into the pipeline only
during prompt encoding, so ``pipe.tokenizer`` is the real tokenizer everywhere else (saving a
pipeline records the real class).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

# Keyword arguments this cache reproduces; anything else goes to the tokenizer.
_HANDLED = {"padding", "max_length", "truncation", "add_special_tokens", "return_tensors", "return_attention_mask"}
DEFAULT_MAX_ENTRIES = 65536


class CachingTokenizer:
    """A memoising front for ``tokenizer``; every attribute but ``__call__`` is the tokenizer's.

    Args:
        tokenizer: a ``transformers`` tokenizer (slow or fast).
        max_entries: results kept (one per distinct string and truncation setting, and per
            string for :meth:`tokenize`); the least recently used goes first.

    Attributes:
        hits, misses: strings served from the cache and tokenised, since creation.
    """

    def __init__(self, tokenizer, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, list] = OrderedDict()
        self._added: tuple[int, dict] | None = None
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer" or name.startswith("__"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """The tokenizer's added tokens, rebuilt only when their number changes (``transformers``
        builds the dict on every access, and the textual-inversion check reads it per token)."""
        key = len(self.tokenizer)
        if self._added is None or self._added[0] != key:
            self._added = (key, self.tokenizer.added_tokens_encoder)
        return self._added[1]

    def tokenize(self, text, **kwargs) -> list[str]:
        """``tokenizer.tokenize``, memoised for plain strings (diffusers' textual-inversion check
        calls it on every prompt of every batch)."""
        if kwargs or not isinstance(text, str):
            return self.tokenizer.tokenize(text, **kwargs)
        return list(self._remember(("tokenize", text, len(self.tokenizer)), lambda: self.tokenizer.tokenize(text)))

    def __call__(self, text=None, *args, **kwargs):
        plan = self._plan(text, args, kwargs)
        if plan is None:
            return self.tokenizer(text, *args, **kwargs)
        texts, padding, max_length, truncation, special, mask = plan
        size = len(self.tokenizer)  # in every key: tokens added later (textual inversion) change the ids
        rows = [self._token_ids(t, max_length if truncation else None, special, size) for t in texts]
        width = max_length if padding == "max_length" else max(len(row) for row in rows)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None or any(len(row) > width for row in rows):
            return self.tokenizer(text, *args, **kwargs)  # ragged or unpadded: the tokenizer's own error or result
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        ids, attention = [], []
        for row in rows:
            fill = width - len(row)
            ids.append([pad_id] * fill + row if left else row + [pad_id] * fill)
            attention.append([0] * fill + [1] * len(row) if left else [1] * len(row) + [0] * fill)
        from transformers import BatchEncoding

        data = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        if mask:
            data["attention_mask"] = torch.tensor(attention, dtype=torch.long)
        return BatchEncoding(data, tensor_type=None)

    def _plan(self, text, args, kwargs):
        """The call's parameters if the cache can answer it, else ``None``."""
        if args or set(kwargs) - _HANDLED or kwargs.get("return_tensors") != "pt":
            return None
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            return None
        padding = kwargs.get("padding", False)
        if padding not in ("max_length", "longest", True):
            return None
        truncation = kwargs.get("truncation", False)
        if truncation not in (True, False, "longest_first", "only_first"):
            return None
        max_length = kwargs.get("max_length")
        if max_length is None and (padding == "max_length" or truncation):
            max_length = self.tokenizer.model_max_length
        mask = kwargs.get("return_attention_mask")
        if mask is None:
            mask = "attention_mask" in self.tokenizer.model_input_names
        return list(texts), padding, max_length, bool(truncation), kwargs.get("add_special_tokens", True), mask

    def _token_ids(self, text: str, max_length: int | None, special: bool, size: int) -> list[int]:
        return self._remember(("ids", text, max_length, special, size), lambda: self.tokenizer(
            text, truncation=max_length is not None, max_length=max_length, add_special_tokens=special)["input_ids"])

    def _remember(self, key: tuple, compute) -> list:
        cached = self._entries.get(key)
        if cached is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return cached
        self.misses += 1
        value = self._entries[key] = list(compute())
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value
