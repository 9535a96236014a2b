"""A real CLIP BPE tokenizer built with no download.

open_clip ships OpenAI CLIP's BPE merges. Written out as ``vocab.json`` + ``merges.txt`` in
the layout of the published ``openai/clip-vit-*`` tokenizers, they give a
``transformers.CLIPTokenizer`` whose ids match OpenAI CLIP's exactly, and which saves and
reloads with ``save_pretrained``/``from_pretrained`` like any hub tokenizer.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
CLIP_NUM_MERGES = 49152 - 256 - 2


def clip_vocab_size(num_merges: int | None = None) -> int:
    """Entries of a CLIP vocabulary with the first ``num_merges`` merges (``None``: all of them):
    512 byte symbols, one token per merge, and the two special tokens (the last two ids)."""
    return 2 * 256 + (CLIP_NUM_MERGES if num_merges is None else num_merges) + 2


def write_clip_bpe_files(directory: str | os.PathLike, num_merges: int | None = None) -> tuple[Path, Path]:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` into ``directory``; return their paths.

    ``num_merges`` keeps only CLIP's first merges (BPE merges are ordered by frequency): a smaller
    vocabulary whose ids below ``512 + num_merges`` are CLIP's own; rarer words split into more
    pieces, and no text is ever out of vocabulary (byte-level symbols).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    if num_merges is not None and not 0 <= num_merges <= CLIP_NUM_MERGES:
        raise ValueError(f"num_merges must be in [0, {CLIP_NUM_MERGES}], got {num_merges}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    # Same slice as CLIP's SimpleTokenizer: skip the header line, keep 49152 - 256 - 2 merges.
    merges = lines[1 : CLIP_NUM_MERGES + 1][:num_merges]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != clip_vocab_size(num_merges):
        raise RuntimeError(f"built a CLIP vocabulary of {len(vocab)} entries, expected {clip_vocab_size(num_merges)}")
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps({token: index for index, token in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_clip_tokenizer(directory: str | os.PathLike, model_max_length: int = 77, pad_token: str = "<|endoftext|>",
                         num_merges: int | None = None):
    """Build a ``CLIPTokenizer`` from open_clip's BPE, saved in ``directory`` (``save_pretrained`` layout).

    ``pad_token`` follows the published checkpoints: SD 1.x pads with ``<|endoftext|>``; SD 2.x,
    SDXL's second encoder and SD3's CLIP-G pad with ``"!"``. ``num_merges``: keep only CLIP's
    first merges (:func:`write_clip_bpe_files`); the special tokens are then the vocabulary's
    last two ids, :func:`clip_vocab_size` entries in all.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    vocab_path, merges_path = write_clip_bpe_files(directory, num_merges)
    # transformers 5 takes the paths as ``vocab``/``merges``; 4.x called them ``*_file``.
    try:
        tokenizer = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=model_max_length, pad_token=pad_token)
    except TypeError:
        tokenizer = CLIPTokenizer(vocab_file=str(vocab_path), merges_file=str(merges_path), model_max_length=model_max_length, pad_token=pad_token)
    size = clip_vocab_size(num_merges)
    if num_merges is None and tokenizer("a red circle").input_ids != [49406, 320, 736, 7117, 49407]:
        raise RuntimeError("the offline CLIP tokenizer does not reproduce OpenAI CLIP's ids")
    if (tokenizer.bos_token_id, tokenizer.eos_token_id) != (size - 2, size - 1):
        raise RuntimeError(f"the CLIP tokenizer's special tokens are not its last two ids (vocabulary {size})")
    tokenizer.save_pretrained(directory)
    return tokenizer
