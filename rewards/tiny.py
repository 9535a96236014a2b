"""Tiny random-init rewards of the real architectures, for tests, examples and benchmarks.

Each builder makes the same classes the published checkpoints load into (open_clip ``CLIP``,
transformers ``CLIPModel`` with a real CLIP BPE tokenizer, the LAION aesthetic MLP), at a few
million parameters, deterministically from ``seed`` and without touching the global RNG or
any hub. Scores are meaningless until trained (see :mod:`rewards.training`).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

from .aesthetic import AestheticMLP, AestheticReward
from .backbones import OpenClipBackbone, TransformersClipBackbone
from .clip import ClipReward
from .hpsv2 import HPSv2Reward
from .personal import PersonalReward
from .pickscore import PickScoreReward

__all__ = [
    "TINY_OPEN_CLIP_CONFIG", "tiny_open_clip_config", "tiny_open_clip_backbone", "tiny_clip_reward",
    "tiny_hpsv2_reward", "tiny_aesthetic_reward", "tiny_personal_reward", "tiny_transformers_clip_backbone",
    "tiny_pickscore_reward", "TESTBED_REWARD_CONFIG", "testbed_hpsv2_reward",
]

#: An open_clip ``CLIP`` config: ViT with 32-px input, 8-px patches, width 32, 2 layers; text
#: tower of width 32, 2 layers, the real 49,408-token vocabulary and 77-token context.
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


#: The visalign testbed's learned reward (``visalign.testbed.reward_build``): an open_clip
#: ``CLIP`` with a ModifiedResNet image tower (layers 1-1-1-1, width 8) that sees the 32-px
#: images upsampled to 64 px, so its last stage keeps a 2x2 grid with a positional embedding
#: (relations need where things are), and a causal text tower of width 32 with a 16-token
#: context (the longest testbed prompt has 13 tokens with start and end). About 2.0M parameters,
#: 1.6M of them the token embedding of CLIP's 49,408-token vocabulary.
TESTBED_REWARD_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_open_clip_config(embed_dim: int = 32, image_size: int = 32, width: int = 32, layers: int = 2) -> dict:
    """A copy of :data:`TINY_OPEN_CLIP_CONFIG` with the given sizes."""
    config = copy.deepcopy(TINY_OPEN_CLIP_CONFIG)
    config["embed_dim"] = embed_dim
    config["vision_cfg"].update(image_size=image_size, width=width, layers=layers, head_width=max(8, width // 2))
    config["text_cfg"].update(width=width, heads=max(1, width // 16), layers=layers)
    return config


def tiny_open_clip_backbone(seed: int = 0, config: dict | None = None) -> OpenClipBackbone:
    """A random-init open_clip backbone built through :meth:`OpenClipBackbone.create` from a config dict."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OpenClipBackbone.create(copy.deepcopy(config or TINY_OPEN_CLIP_CONFIG))


def tiny_clip_reward(seed: int = 0, score_scale: float = 1.0, config: dict | None = None) -> ClipReward:
    return ClipReward(tiny_open_clip_backbone(seed, config), score_scale=score_scale)


def tiny_hpsv2_reward(seed: int = 0, config: dict | None = None) -> HPSv2Reward:
    """The HPSv2 reward on a tiny open_clip model (the architecture family of ViT-H-14)."""
    return HPSv2Reward(tiny_open_clip_backbone(seed, config))


def testbed_hpsv2_reward(seed: int = 0, config: dict | None = None) -> HPSv2Reward:
    """A random-init HPS-style scorer of the testbed reward's architecture (:data:`TESTBED_REWARD_CONFIG`)."""
    return HPSv2Reward(tiny_open_clip_backbone(seed, config or TESTBED_REWARD_CONFIG))


def tiny_aesthetic_reward(seed: int = 0, config: dict | None = None, activation: str = "none") -> AestheticReward:
    """The aesthetic predictor's MLP (published layer layout) on a tiny open_clip image encoder."""
    backbone = tiny_open_clip_backbone(seed, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        mlp = AestheticMLP(backbone.embed_dim, activation)
    return AestheticReward(backbone, mlp)


def tiny_personal_reward(seed: int = 0, user_embedding: torch.Tensor | None = None, config: dict | None = None) -> PersonalReward:
    return PersonalReward(tiny_open_clip_backbone(seed, config), user_embedding)


def tiny_transformers_clip_backbone(directory: str | os.PathLike | None = None, seed: int = 0, image_size: int = 32) -> TransformersClipBackbone:
    """A tiny ``transformers.CLIPModel`` with the real CLIP BPE tokenizer, saved in ``directory``
    (a temporary folder by default) and loaded back through :meth:`TransformersClipBackbone.from_pretrained`,
    so the folder is a complete PickScore-layout model + processor folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from visalign.models.tokenizer import build_clip_tokenizer

    directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="tiny-clip-"))
    build_clip_tokenizer(directory)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                           image_size=image_size, patch_size=8),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return TransformersClipBackbone.from_pretrained(directory)


def tiny_pickscore_reward(directory: str | os.PathLike | None = None, seed: int = 0) -> PickScoreReward:
    """PickScore on a tiny transformers CLIP (see :func:`tiny_transformers_clip_backbone`)."""
    return PickScoreReward(tiny_transformers_clip_backbone(directory, seed))
