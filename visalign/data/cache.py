"""An on-disk cache of VAE latents and text-encoder outputs, so that epochs after the first
skip the encoders.

Entries are keyed by record index, inside a folder named by a :class:`CacheKey`: a hash of
everything the cached tensors depend on (the model and its revision/config, the encoder
dtype, the image preprocessing, and the record table's fingerprint, which covers the data
files and the loader options such as ``ties``). Change any of them and the cache starts
empty in a new folder; stale folders can be deleted at will.

The cache refuses a random preprocessing (random crop or flip): a cached latent would
freeze one augmentation for the whole run, a silent change of the training distribution.
Turn augmentations off to cache (``ImageTransform(random_flip=False)``). Note also that
the reference trainers *sample* the VAE posterior at each step; a cache freezes whatever
``encode_images`` returned the first time (diffusers' SDXL fine-tuning script precomputes
latents the same way).

Storage: safetensors shards of up to ``shard_size`` records, each written to a temporary
file, fsynced, and renamed into place, so a killed run leaves no partial shard. Several
processes (DDP ranks) may share one cache folder: each writes its own shards and picks up
the others' on a miss.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from visalign.data.dataset import RecordDataset
from visalign.data.table import _hash

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
_SHARD_PREFIX = "shard-"
_SHARD_SUFFIX = ".safetensors"

PromptEncoding = Any  # a Tensor, a Mapping[str, Tensor | None], or a dataclass of tensors
EncodeImages = Callable[[torch.Tensor], torch.Tensor]
EncodePrompts = Callable[[list[str]], PromptEncoding]


class CacheNotDeterministicError(ValueError):
    """The preprocessing is random, so cached latents would be wrong for later epochs."""


@dataclass(frozen=True)
class CacheKey:
    """``digest`` names the cache folder; ``components`` is what it was hashed from (written
    to ``key.json`` in the folder so a person can tell caches apart)."""

    digest: str
    components: dict = field(compare=False, hash=False)

    def __str__(self) -> str:
        return self.digest


def cache_key(
    dataset: RecordDataset,
    *,
    model: str,
    dtype: torch.dtype | str,
    revision: str | None = None,
    config: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> CacheKey:
    """The key of a latent cache for ``dataset`` encoded by ``model``.

    Args:
        dataset: supplies the preprocessing and the record table fingerprint.
        model: model identifier (hub id or local path) of the VAE/text encoders.
        dtype: the encoders' dtype (``torch.float16``, ...).
        revision: model revision (commit hash), if any.
        config: the encoders' configs (a dict, hashed) or a precomputed config hash.
        extra: anything else the encoders' output depends on (e.g. max prompt length).

    Raises:
        CacheNotDeterministicError: when the dataset's transform has random crop or flip.
    """
    transform = dataset.transform
    if not transform.deterministic:
        raise CacheNotDeterministicError(
            f"cannot cache latents with a random image transform (random_crop={transform.random_crop}, "
            f"random_flip={transform.random_flip}): every epoch would reuse one augmentation. "
            "Use ImageTransform(random_crop=False, random_flip=False) with the cache, or train without it."
        )
    components = {
        "format_version": CACHE_FORMAT_VERSION,
        "model": str(model),
        "revision": revision,
        "config": config if isinstance(config, str) or config is None else _hash(config),
        "dtype": str(dtype),
        "transform": transform.to_dict(),
        "records": dataset.records.fingerprint,
        "kind": dataset.kind,
        "extra": dict(extra) if extra else None,
    }
    if getattr(dataset, "clips", False):  # (image datasets keep the keys they had)
        components["clips"] = {"num_frames": dataset.num_frames}
    return CacheKey(_hash(components), components)


class LatentCache:
    """Latents and prompt encodings per record index, on disk.

    Args:
        directory: parent folder; the cache lives in ``directory / str(key)``.
        key: a :class:`CacheKey` from :func:`cache_key` (or any string that identifies the
            model, dtype, preprocessing and data exactly; you own its correctness then).
        shard_size: records per shard file.

    Use::

        cache = LatentCache("cache/", cache_key(dataset, model=model_id, dtype=torch.float16))
        for batch in loader:
            encoded = cache.encode(batch, encode_images=generator.encode,
                                   encode_prompts=generator.encode_prompt)
            cond = Cond(**encoded["cond"])
            ...
        cache.flush()   # also done by close() / leaving a ``with`` block

    ``hits`` and ``misses`` count records served from and added to the cache.
    """

    def __init__(self, directory: str | os.PathLike, key: CacheKey | str, *, shard_size: int = 256):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.key = str(key)
        self.path = Path(directory) / self.key
        self.path.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.hits = 0
        self.misses = 0
        # record index -> (shard file name, tensor names of that record)
        self._index: dict[int, tuple[str, tuple[str, ...]]] = {}
        self._seen_files: set[str] = set()
        self._buffer: dict[int, dict[str, torch.Tensor]] = {}
        self._handles: OrderedDict[str, Any] = OrderedDict()
        if isinstance(key, CacheKey) and not (self.path / "key.json").exists():
            _atomic_write_bytes(self.path / "key.json", json.dumps(key.components, indent=2, default=str).encode())
        self.refresh()

    # ------------------------------------------------------------------ lookup

    def __contains__(self, index: int) -> bool:
        return index in self._buffer or index in self._index

    def __len__(self) -> int:
        return len(self._index.keys() | self._buffer.keys())

    def refresh(self) -> None:
        """Index shards written since the last look (by this or another process)."""
        for name in sorted(os.listdir(self.path)):
            if name in self._seen_files or not (name.startswith(_SHARD_PREFIX) and name.endswith(_SHARD_SUFFIX)):
                continue
            self._seen_files.add(name)
            try:
                with safe_open(self.path / name, framework="pt") as handle:
                    names = list(handle.keys())
            except Exception as error:  # a damaged file: ignore it, its records get re-encoded
                logger.warning("latent cache: ignoring unreadable shard %s (%s)", self.path / name, error)
                continue
            per_record: dict[int, list[str]] = {}
            for tensor_name in names:
                per_record.setdefault(int(tensor_name.split("/", 1)[0]), []).append(tensor_name)
            for index, tensor_names in per_record.items():
                self._index.setdefault(index, (name, tuple(sorted(tensor_names))))

    def _entry(self, index: int) -> dict[str, torch.Tensor]:
        """Tensors of one record, keyed by name without the ``"{index}/"`` prefix."""
        if index in self._buffer:
            return self._buffer[index]
        shard, names = self._index[index]
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(self.path / shard, framework="pt")
            self._handles[shard] = handle
            if len(self._handles) > 32:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return {name.split("/", 1)[1]: handle.get_tensor(name) for name in names}

    # ------------------------------------------------------------------ encode

    def encode(self, batch: Mapping[str, Any], encode_images: EncodeImages, encode_prompts: EncodePrompts) -> dict:
        """Latents and prompt encodings of a :func:`~visalign.data.dataset.collate` batch.

        ``encode_images`` gets ``[N, 3, H, W]`` images in [0, 1] and returns ``[N, ...]``
        latents; ``encode_prompts`` gets a list of N prompts and returns a ``[N, ...]``
        tensor, or a dict or dataclass (such as the Generator's ``Cond``) of them; ``None``
        fields are not stored. Only records missing from the cache are passed to them,
        once per call.

        Returns, on the device of the batch images: for pairs ``{"winner": [B, ...],
        "loser": [B, ...], "cond": ...}``; for rankings ``{"images": [B, K, ...], "cond"}``
        (zeros where ``batch["mask"]`` is false); for feedback and captions
        ``{"images": [B, ...], "cond": ...}``. ``cond`` is a ``[B, ...]`` tensor or a dict
        of them (a dataclass comes back as a dict of its non-``None`` fields: rebuild it with
        ``Cond(**encoded["cond"])``).
        """
        fields = [name for name in ("winner", "loser", "images") if name in batch]
        if not fields:
            raise KeyError(f"batch has no image field (winner/loser/images); keys: {sorted(batch)}")
        indices = [int(i) for i in batch["indices"]]
        missing = [position for position, index in enumerate(indices) if index not in self]
        if missing:
            self.refresh()
            missing = [position for position, index in enumerate(indices) if index not in self]
        fresh = self._encode_missing(batch, fields, indices, missing, encode_images, encode_prompts) if missing else {}
        self.hits += len(indices) - len(missing)
        self.misses += len(missing)
        entries = [fresh[index] if index in fresh else self._entry(index) for index in indices]
        device = batch[fields[0]].device
        output: dict[str, Any] = {}
        ranking = "mask" in batch
        for name in fields:
            if ranking:  # [B, K, 3, H, W] (clips: [B, K, F, 3, H, W]); pad each record's k latents to K
                stored = [entry[name] for entry in entries]
                padded = stored[0].new_zeros((len(entries), batch[name].shape[1], *stored[0].shape[1:]))
                for row, latents in enumerate(stored):
                    padded[row, : latents.shape[0]] = latents
                output[name] = padded.to(device)
            else:
                output[name] = torch.stack([entry[name] for entry in entries]).to(device)
        if "cond" in entries[0]:
            output["cond"] = torch.stack([entry["cond"] for entry in entries]).to(device)
        else:
            keys = sorted(key.split("/", 1)[1] for key in entries[0] if key.startswith("cond/"))
            output["cond"] = {key: torch.stack([entry[f"cond/{key}"] for entry in entries]).to(device) for key in keys}
        return output

    def _encode_missing(
        self,
        batch: Mapping[str, Any],
        fields: list[str],
        indices: list[int],
        missing: list[int],
        encode_images: EncodeImages,
        encode_prompts: EncodePrompts,
    ) -> dict[int, dict[str, torch.Tensor]]:
        fresh: dict[int, dict[str, torch.Tensor]] = {indices[p]: {} for p in missing}
        rows = torch.tensor(missing, device=batch[fields[0]].device)
        with torch.no_grad():
            for name in fields:
                pixels = batch[name].index_select(0, rows)
                if "mask" in batch:  # a ranking: encode only the real images (or clips) of each record
                    counts = batch["mask"].index_select(0, rows.to(batch["mask"].device)).sum(dim=1).tolist()
                    valid = torch.cat([pixels[row, :count] for row, count in enumerate(counts)])
                    latents = encode_images(valid).detach().cpu().split(counts)
                else:
                    latents = encode_images(pixels).detach().cpu()
                for position, value in zip(missing, latents):
                    fresh[indices[position]][name] = _to_storage(value)
            cond = encode_prompts([batch["prompts"][p] for p in missing])
        if dataclasses.is_dataclass(cond) and not isinstance(cond, type):
            # e.g. the Generator's Cond; fields() rather than asdict(), which deep-copies tensors
            cond = {item.name: getattr(cond, item.name) for item in dataclasses.fields(cond)}
        if isinstance(cond, torch.Tensor):
            for position, value in zip(missing, cond.detach().cpu()):
                fresh[indices[position]]["cond"] = _to_storage(value)
        elif isinstance(cond, Mapping):
            for key, values in cond.items():
                if values is None:
                    continue
                if "/" in key:
                    raise ValueError(f"encode_prompts returned a key with '/': {key!r}")
                for position, value in zip(missing, values.detach().cpu()):
                    fresh[indices[position]][f"cond/{key}"] = _to_storage(value)
        else:
            raise TypeError(
                f"encode_prompts must return a tensor, a dict of tensors or a dataclass of tensors, "
                f"got {type(cond).__name__}"
            )
        for index, entry in fresh.items():
            self._buffer[index] = entry
        if len(self._buffer) >= self.shard_size:
            self.flush()
        return fresh

    # ------------------------------------------------------------------ write

    def flush(self) -> None:
        """Write buffered records to a new shard (atomically)."""
        if not self._buffer:
            return
        tensors = {f"{index}/{name}": value for index, entry in self._buffer.items() for name, value in entry.items()}
        name = f"{_SHARD_PREFIX}{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{_SHARD_SUFFIX}"
        temporary = self.path / f".tmp-{name}"
        save_file(tensors, str(temporary), metadata={"format": "pt", "visalign_latent_cache": str(CACHE_FORMAT_VERSION)})
        _fsync(temporary)
        os.replace(temporary, self.path / name)
        self._seen_files.add(name)
        for index, entry in self._buffer.items():
            self._index.setdefault(index, (name, tuple(sorted(f"{index}/{key}" for key in entry))))
        self._buffer.clear()

    def close(self) -> None:
        self.flush()
        self._handles.clear()

    def __enter__(self) -> "LatentCache":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LatentCache({str(self.path)!r}, records={len(self)}, hits={self.hits}, misses={self.misses})"


def _to_storage(value: torch.Tensor) -> torch.Tensor:
    # clone: a slice would keep the whole batch alive, and safetensors rejects shared storage
    return value.detach().to("cpu").contiguous().clone()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    temporary.write_bytes(data)
    _fsync(temporary)
    os.replace(temporary, path)
