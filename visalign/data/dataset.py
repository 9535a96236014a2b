"""The torch ``Dataset`` over a :class:`RecordTable`, its ``collate`` function, and a
DataLoader helper.

``RecordDataset`` is a plain map-style dataset, so ``accelerate``'s ``prepare(dataloader)``
shards it by rank with no special code. ``dataset[i]`` is a pure function of
``(seed, epoch, i)``: the random crop and flip are drawn from a generator seeded with those
three numbers, so a resumed run sees the same pixels whatever the number of workers. Call
``dataset.set_epoch(epoch)`` at the start of every epoch (``accelerate`` does not do it for
a shuffled map-style dataset) to get fresh augmentations each epoch.

Bad records (missing or corrupt images, null prompts) never raise: ``dataset[i]`` falls
through to the next usable record, ``(i + 1) % len``, and reports the bad one in the
sample's ``"skipped"`` list. This keeps every batch full, which matters at the reference
per-device batch size of 1 and under DDP, where a rank with an empty batch would stall
the others. The cost is that the substitute is seen twice in that epoch. Only when no
record at all is usable does it raise :class:`NoUsableRecordsError`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from visalign.data.records import (
    BadRecordError,
    CaptionRecord,
    FeedbackRecord,
    PairRecord,
    RankingRecord,
    SkippedRecord,
    load_clip,
    load_image,
)
from visalign.data.skips import NoUsableRecordsError
from visalign.data.table import RecordTable
from visalign.data.transforms import ImageTransform

logger = logging.getLogger(__name__)

# Per process, so a run with a few bad records logs each one and a run with many does not
# flood the log; the SkipCounter has the full account.
_MAX_LOGGED_SKIPS = 20
_logged_skips = 0


class RecordDataset(Dataset):
    """Decoded, preprocessed samples of a :class:`RecordTable`.

    Args:
        records: the table (from a loader in :mod:`visalign.data.loaders`).
        transform: the image preprocessing, shared by all images of one record.
        seed: base seed of the augmentations.
        clips: every image source is a clip (:func:`~visalign.data.records.load_clip`: a video
            file, a folder of frames, a list of frame sources); a sample then holds
            ``[F, 3, H, W]`` per image, every frame of a record cropped and flipped alike.
        num_frames: clips only: keep the first ``num_frames`` frames; a shorter clip is skipped
            and counted. Without it the clips of one record must have equal lengths, and those
            of a batch too.

    A sample is a dict; :func:`collate` turns a list of them into a batch (see there for
    the keys and shapes).
    """

    def __init__(self, records: RecordTable, transform: ImageTransform, *, seed: int = 0, in_memory: bool = False,
                 clips: bool = False, num_frames: int | None = None):
        if num_frames is not None and (not clips or num_frames < 1):
            raise ValueError(f"num_frames={num_frames} needs clips=True and a value >= 1")
        if len(records) == 0:
            dropped = "; ".join(f"{count} {reason}" for reason, count in records.dropped.items())
            raise NoUsableRecordsError(
                f"{records.description}: no records to train on" + (f" (dropped at load: {dropped})" if dropped else "")
            )
        self.records = records
        self.transform = transform
        self.seed = int(seed)
        self.clips = bool(clips)
        self.num_frames = num_frames
        self.epoch = 0
        self._decoded: list | None = None
        if in_memory:
            self.preload()

    def preload(self) -> None:
        """Decode every record's images once and keep them in memory (``in_memory=True``).

        Later epochs, and DataLoader workers forked from this process, read the decoded images
        instead of opening and decoding files again: for small datasets of small images (the
        testbed's 32x32 renders) decoding is most of the loader's work. Decoded RGB takes
        height x width x 3 bytes per image, so this is for datasets that fit in memory. A bad
        record is remembered as such and skipped (and counted) as without preloading.
        """
        from tqdm.auto import tqdm

        decoded, pixels, bad = [], 0, 0
        for index in tqdm(range(len(self.records)), desc="decoding images", unit="record", leave=False):
            try:
                images = self._decode_record(self.records[index])
            except BadRecordError as error:
                decoded.append(error)
                bad += 1
                continue
            decoded.append(images)
            pixels += sum(image.width * image.height for image in _frames(images))
        self._decoded = decoded
        logger.info("%s: %d records decoded into memory (%.1f MB of RGB)%s", self.records.description, len(decoded),
                    3 * pixels / 2**20, f", {bad} unusable" if bad else "")

    @property
    def kind(self) -> str:
        return self.records.kind

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (like ``DistributedSampler.set_epoch``).

        DataLoader workers copy the dataset when an iterator starts, so call this before
        iterating, and do not combine it with ``persistent_workers=True``.
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        count = len(self.records)
        if not 0 <= index < count:
            raise IndexError(f"index {index} out of range for a dataset of {count} records")
        skipped: list[SkippedRecord] = []
        for offset in range(count):
            current = (index + offset) % count
            try:
                sample = self._sample(current, slot=index)
            except BadRecordError as error:
                skipped.append(SkippedRecord(current, self.records.origin(current), error.category, error.detail))
                _log_skip(skipped[-1])
                continue
            sample["skipped"] = [
                SkippedRecord(s.index, s.origin, s.category, s.detail, replaced_by=current) for s in skipped
            ]
            return sample
        reasons: dict[str, int] = {}
        for item in skipped:
            reasons[item.category] = reasons.get(item.category, 0) + 1
        summary = ", ".join(f"{name}: {number}" for name, number in sorted(reasons.items()))
        raise NoUsableRecordsError(
            f"all {count} records of {self.records.description} are unusable ({summary}); "
            f"first: {skipped[0]}" + (f"; last: {skipped[-1]}" if count > 1 else "")
        )

    def _sample(self, index: int, slot: int) -> dict[str, Any]:
        """Raises BadRecordError for a record that cannot be used."""
        record = self.records[index]
        # The slot, not the record, seeds the draw: a substitute gets the slot's geometry.
        rng = np.random.default_rng([self.seed, self.epoch, slot])
        sample: dict[str, Any] = {"kind": self.kind, "index": index, "prompt": record.prompt}
        if self._decoded is None:
            images = self._decode_record(record)
        else:
            images = self._decoded[index]
            if isinstance(images, BadRecordError):
                raise images
        pixels, geometry = self.transform(_frames(images), rng)
        if self.clips:  # [k * F, 3, H, W] -> [k, F, 3, H, W]
            pixels = pixels.unflatten(0, (len(images), len(images[0])))
        if isinstance(record, PairRecord):
            sample.update(winner=pixels[0], loser=pixels[1], label=record.label, user_id=record.user_id)
        elif isinstance(record, RankingRecord):
            sample.update(images=pixels, scores=record.scores, user_id=record.user_id)
        elif isinstance(record, FeedbackRecord):
            sample.update(image=pixels[0], label=record.label, user_id=record.user_id)
        else:  # CaptionRecord
            sample.update(image=pixels[0])
        sample.update(original_size=geometry.original_size, crop_top_left=geometry.crop_top_left)
        return sample

    def _decode_record(self, record) -> list:
        """The record's images (``PIL.Image`` each), or its clips (a list of frames each)."""
        if not self.clips:
            return _decode(_image_sources(record))
        clips = []
        for name, source in _image_sources(record).items():
            try:
                clips.append(load_clip(source, self.num_frames))
            except BadRecordError as error:
                raise BadRecordError(error.category, f"{name}: {error.detail}") from error
        lengths = {len(clip) for clip in clips}
        if len(lengths) > 1:
            raise BadRecordError("clip length mismatch", f"clips of {sorted(lengths)} frames in one record "
                                                         "(set num_frames to cut them to one length)")
        return clips


def _frames(images: list) -> list:
    """Images as they are; clips flattened into their frames, clip by clip."""
    return [frame for item in images for frame in (item if isinstance(item, list) else [item])]


def _image_sources(record) -> dict[str, Any]:
    """The image sources of a record by name (the names appear in bad-record messages)."""
    if isinstance(record, PairRecord):
        return {"winner": record.winner, "loser": record.loser}
    if isinstance(record, RankingRecord):
        return {f"images[{i}]": image for i, image in enumerate(record.images)}
    if isinstance(record, (FeedbackRecord, CaptionRecord)):
        return {"image": record.image}
    raise TypeError(f"unsupported record type {type(record).__name__}")


def _decode(sources: dict[str, Any]) -> list:
    images = []
    for name, source in sources.items():
        try:
            images.append(load_image(source))
        except BadRecordError as error:
            raise BadRecordError(error.category, f"{name}: {error.detail}") from error
    return images


def _log_skip(item: SkippedRecord) -> None:
    global _logged_skips
    _logged_skips += 1
    if _logged_skips <= _MAX_LOGGED_SKIPS:
        logger.warning("skipping %s", item)
    if _logged_skips == _MAX_LOGGED_SKIPS:
        logger.warning("further skipped records are counted but not logged one by one")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples of one :class:`RecordDataset` into a batch.

    Keys for every kind:
        ``prompts``: ``list[str]`` of length B.
        ``indices``: ``LongTensor[B]``, record indices in the table (after substitution).
        ``original_sizes``: ``LongTensor[B, 2]`` (height, width) of the (first) source image.
        ``crop_top_lefts``: ``LongTensor[B, 2]`` (top, left), for SDXL micro-conditioning.
        ``skipped``: ``list[SkippedRecord]`` that were passed over to fill this batch; feed
        it to a :class:`SkipCounter` in the main process.

    Per kind (images are float32 in [0, 1]; from a ``clips`` dataset every ``3, H, W`` below is
    ``F, 3, H, W``):
        pair: ``winner``, ``loser``: ``[B, 3, H, W]``; ``label``: ``[B]`` probability that
        the winner is preferred (1.0, or 0.5 for a kept tie); ``user_ids``: list.
        ranking: ``images``: ``[B, K, 3, H, W]``; ``scores``: ``[B, K]`` (higher is better);
        ``mask``: ``BoolTensor[B, K]``, false where a record has fewer than K images (those
        slots are zeros and score 0); ``user_ids``: list.
        feedback: ``images``: ``[B, 3, H, W]``; ``labels``: ``[B]`` (1 good, 0 bad); ``user_ids``.
        caption: ``images``: ``[B, 3, H, W]``.
    """
    if not samples:
        raise ValueError("collate got an empty list of samples")
    kinds = {sample["kind"] for sample in samples}
    if len(kinds) != 1:
        raise ValueError(f"collate got samples of several kinds {sorted(kinds)}")
    kind = kinds.pop()
    batch: dict[str, Any] = {
        "prompts": [sample["prompt"] for sample in samples],
        "indices": torch.tensor([sample["index"] for sample in samples], dtype=torch.long),
        "original_sizes": torch.tensor([sample["original_size"] for sample in samples], dtype=torch.long),
        "crop_top_lefts": torch.tensor([sample["crop_top_left"] for sample in samples], dtype=torch.long),
        "skipped": [item for sample in samples for item in sample["skipped"]],
    }
    if kind == "pair":
        batch["winner"] = _stack(samples, "winner")
        batch["loser"] = _stack(samples, "loser")
        batch["label"] = torch.tensor([sample["label"] for sample in samples], dtype=torch.float32)
        batch["user_ids"] = [sample["user_id"] for sample in samples]
    elif kind == "ranking":
        max_k = max(sample["images"].shape[0] for sample in samples)
        shape = _common_shape([sample["images"].shape[1:] for sample in samples], "ranking images")
        images = torch.zeros(len(samples), max_k, *shape)
        scores = torch.zeros(len(samples), max_k)
        mask = torch.zeros(len(samples), max_k, dtype=torch.bool)
        for row, sample in enumerate(samples):
            k = sample["images"].shape[0]
            images[row, :k] = sample["images"]
            scores[row, :k] = torch.tensor(sample["scores"], dtype=torch.float32)
            mask[row, :k] = True
        batch.update(images=images, scores=scores, mask=mask, user_ids=[sample["user_id"] for sample in samples])
    elif kind == "feedback":
        batch["images"] = _stack(samples, "image")
        batch["labels"] = torch.tensor([sample["label"] for sample in samples], dtype=torch.float32)
        batch["user_ids"] = [sample["user_id"] for sample in samples]
    elif kind == "caption":
        batch["images"] = _stack(samples, "image")
    else:
        raise ValueError(f"unknown sample kind {kind!r}")
    return batch


def _common_shape(shapes: list[torch.Size], what: str) -> tuple[int, ...]:
    distinct = {tuple(shape) for shape in shapes}
    if len(distinct) > 1:
        raise ValueError(f"collate: {what} of different shapes {sorted(distinct)} in one batch (clips of "
                         "different lengths? set num_frames / data.num_frames)")
    return distinct.pop()


def _stack(samples: list[dict[str, Any]], key: str) -> torch.Tensor:
    _common_shape([sample[key].shape for sample in samples], f"{key!r} tensors")
    return torch.stack([sample[key] for sample in samples])


class TensorPairs(Dataset):
    """Preference pairs held as tensors, for pairs made in Python rather than read from files:
    images ``[N, 3, H, W]`` or clips ``[N, F, 3, H, W]`` in [0, 1] (e.g. a video model's samples
    labelled by the video oracle). Samples are those of a ``pair`` :class:`RecordDataset`, so
    :func:`collate`, the trainer (``Trainer(config, dataset=TensorPairs(...))``) and every pair
    objective take them unchanged; nothing is augmented and nothing is skipped."""

    kind = "pair"

    def __init__(self, winners: torch.Tensor, losers: torch.Tensor, prompts: list[str],
                 labels: list[float] | None = None, seed: int = 0):
        if winners.shape != losers.shape:
            raise ValueError(f"winners {tuple(winners.shape)} and losers {tuple(losers.shape)} differ in shape")
        if winners.ndim not in (4, 5) or winners.shape[-3] != 3:
            raise ValueError(f"expected images [N, 3, H, W] or clips [N, F, 3, H, W], got {tuple(winners.shape)}")
        if len(prompts) != len(winners) or (labels is not None and len(labels) != len(winners)):
            raise ValueError(f"{len(winners)} pairs but {len(prompts)} prompts"
                             + (f" and {len(labels)} labels" if labels is not None else ""))
        if winners.is_floating_point() and (winners.min() < 0 or winners.max() > 1 or losers.min() < 0 or losers.max() > 1):
            raise ValueError("pair images must lie in [0, 1]")
        self.winners, self.losers, self.prompts = winners, losers, list(prompts)
        self.labels = [1.0] * len(prompts) if labels is None else [float(label) for label in labels]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.prompts)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to redraw (no augmentation); here for the trainer."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        height, width = self.winners.shape[-2:]
        return {"kind": "pair", "prompt": self.prompts[index], "index": index, "original_size": (height, width),
                "crop_top_left": (0, 0), "winner": self.winners[index].float(), "loser": self.losers[index].float(),
                "label": self.labels[index], "user_id": None, "skipped": []}


def make_dataloader(
    dataset: RecordDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` with :func:`collate`, a seeded shuffle, and no persistent workers
    (so ``dataset.set_epoch`` reaches the workers). Pass it to ``accelerator.prepare``."""
    generator = None
    if shuffle:
        generator = torch.Generator().manual_seed(dataset.seed if seed is None else seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
