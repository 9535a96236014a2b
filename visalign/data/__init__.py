"""Preference and caption data: records, loaders, preprocessing, torch datasets, latent cache.

Typical use::

    from visalign.data import ImageTransform, RecordDataset, SkipCounter, load_pickapic, make_dataloader

    pairs = load_pickapic("pickapic_v2/data", ties="drop")
    dataset = RecordDataset(pairs, ImageTransform(resolution=512), seed=0)
    loader = make_dataloader(dataset, batch_size=4, num_workers=4)
    skips = SkipCounter()
    for epoch in range(num_epochs):
        dataset.set_epoch(epoch)
        for batch in loader:
            skips.update(batch.pop("skipped"))
            ...  # batch["winner"], batch["loser"]: [B, 3, H, W] in [0, 1]

See docs/data.md for the accepted formats.
"""

from visalign.data.cache import CacheKey, CacheNotDeterministicError, LatentCache, cache_key
from visalign.data.dataset import RecordDataset, TensorPairs, collate, make_dataloader
from visalign.data.loaders import (
    from_hf_dataset,
    load_captions,
    load_hpdv2,
    load_jsonl,
    load_parquet,
    load_pickapic,
    load_records,
)
from visalign.data.records import (
    BadRecordError,
    CaptionRecord,
    FeedbackRecord,
    ImageSource,
    PairRecord,
    RankingRecord,
    Record,
    SkippedRecord,
    load_clip,
    load_image,
)
from visalign.data.skips import NoUsableRecordsError, SkipCounter
from visalign.data.table import RecordTable
from visalign.data.transforms import GroupGeometry, ImageTransform

__all__ = [
    "BadRecordError",
    "CacheKey",
    "CacheNotDeterministicError",
    "CaptionRecord",
    "FeedbackRecord",
    "GroupGeometry",
    "ImageSource",
    "ImageTransform",
    "LatentCache",
    "NoUsableRecordsError",
    "PairRecord",
    "RankingRecord",
    "Record",
    "RecordDataset",
    "RecordTable",
    "SkipCounter",
    "SkippedRecord",
    "TensorPairs",
    "cache_key",
    "collate",
    "from_hf_dataset",
    "load_captions",
    "load_hpdv2",
    "load_clip",
    "load_image",
    "load_jsonl",
    "load_parquet",
    "load_pickapic",
    "load_records",
    "make_dataloader",
]
