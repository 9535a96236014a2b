"""Pluggable reward models behind one protocol: ``reward(images, prompts, **context) -> Tensor[B]``.

    import rewards
    hps = rewards.load("hpsv2", checkpoint="HPS_v2_compressed.pt")
    scores = hps(images, prompts)          # images: float [B, 3, H, W] in [0, 1]

``rewards.available()`` lists the registered names; ``rewards.register`` adds your own. The
CLIP-family classes import open_clip / transformers, so they are loaded on first access.
See ``docs/rewards.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import FunctionReward, Reward, broadcast_prompts, to_tensor_images
from .checkpoints import CheckpointError
from .combinators import (
    EnsembleMean,
    Normalized,
    ParetoSelection,
    RunningStats,
    UncertaintyWeighted,
    WeightedSum,
    pareto_front,
    pareto_indices,
)
from .preprocess import ImagePreprocess
from .registry import available, describe, load, load_pretrained, register
from .video import FrameAverage, LearnedVideoReward, TemporalConsistency, VideoFromImage, segment_indices, temporal_weights

_LAZY = {
    "ContrastiveReward": "rewards.clip",
    "ClipReward": "rewards.clip",
    "HPSv2Reward": "rewards.hpsv2",
    "PickScoreReward": "rewards.pickscore",
    "AestheticReward": "rewards.aesthetic",
    "AestheticMLP": "rewards.aesthetic",
    "PersonalReward": "rewards.personal",
    "OpenClipBackbone": "rewards.backbones",
    "TransformersClipBackbone": "rewards.backbones",
    "preference_loss": "rewards.training",
}

__all__ = [
    "Reward", "FunctionReward", "to_tensor_images", "broadcast_prompts", "CheckpointError", "ImagePreprocess",
    "load", "load_pretrained", "available", "describe", "register",
    "WeightedSum", "Normalized", "EnsembleMean", "ParetoSelection", "UncertaintyWeighted", "RunningStats",
    "pareto_front", "pareto_indices",
    "VideoFromImage", "FrameAverage", "TemporalConsistency", "LearnedVideoReward", "segment_indices", "temporal_weights",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")
