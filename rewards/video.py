"""Video rewards: image rewards applied to frames, and temporal consistency.

:class:`VideoFromImage` is InstructVideo's Segmental Video Reward with its Temporally
Attenuated Reward (Yuan et al., CVPR 2024; ali-vilab/VGen):

1. split the ``F`` frames into ``S`` segments (segment ``j`` holds frames
   ``floor(j F / S) .. floor((j + 1) F / S) - 1``; for ``F`` divisible by ``S`` this is the
   reference's ``j * F/S + U{0 .. F/S - 1}``);
2. pick one frame per segment (TSN sampling): uniformly at random (training), or the middle
   frame of the segment (``sampling="middle"``, deterministic evaluation);
3. score each picked frame with the image reward against the caption;
4. weight frame ``g_j`` by ``exp(-attenuation * |g_j - F/2|)`` and return the mean over
   segments of the weighted scores. ``attenuation=0`` is the plain mean; the reference uses
   ``attenuation=1`` (very steep: edge frames of a 16-frame clip get weight ``e^-8``) with
   ``S=4`` in its config (class default 8).

:class:`FrameAverage` scores every frame and averages; :class:`TemporalConsistency` scores
smoothness: the mean cosine similarity of consecutive frame embeddings under a CLIP image
encoder, or ``1 - mean |x_{t+1} - x_t|`` on pixels when no encoder is given.

:class:`LearnedVideoReward` is a trained text-video scorer that sees motion (an image reward on
frames cannot): per-frame features from a small CNN that keeps *where* things are, a temporal
transformer whose first token is the prompt (a frozen image-text backbone's text embedding),
and a linear score; trained with the Bradley-Terry loss on clip pairs
(:mod:`visalign.testbed.video_reward` trains the testbed's on oracle-labelled pairs).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Reward
from .registry import load

__all__ = [
    "VideoFromImage", "FrameAverage", "TemporalConsistency", "segment_indices", "temporal_weights",
    "build_video_from_image", "build_frame_average", "build_temporal_consistency",
    "LearnedVideoReward", "build_learned_video_reward",
]

VIDEO_REWARD_WEIGHTS = "video_reward.safetensors"


def segment_indices(
    num_frames: int, num_segments: int, batch_size: int = 1, sampling: str = "random",
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
) -> Tensor:
    """Frame index picked in each segment, ``LongTensor[batch_size, num_segments]``.

    Segment ``j`` covers ``[floor(j F / S), floor((j + 1) F / S))``; exactly one index falls in
    each. ``sampling="random"`` draws uniformly within the segment (per video, from
    ``generator``); ``"middle"`` takes the segment's middle frame.
    """
    if not 1 <= num_segments <= num_frames:
        raise ValueError(f"need 1 <= segments <= frames, got {num_segments} segments for {num_frames} frames")
    bounds = torch.div(torch.arange(num_segments + 1) * num_frames, num_segments, rounding_mode="floor")
    starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    if sampling == "random":
        uniform = torch.rand(batch_size, num_segments, generator=generator)
        offsets = (uniform * lengths).long().clamp_max(lengths - 1)
    elif sampling == "middle":
        offsets = (lengths // 2).expand(batch_size, num_segments)
    else:
        raise ValueError(f"sampling must be 'random' or 'middle', got {sampling!r}")
    return (starts + offsets).to(device)


def temporal_weights(indices: Tensor, num_frames: int, attenuation: float) -> Tensor:
    """InstructVideo's TAR weights ``exp(-attenuation * |g - F/2|)`` for frame indices ``g``."""
    return torch.exp(-attenuation * (indices.float() - num_frames / 2).abs())


def _check_video(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 5:
        raise ValueError(f"video rewards take [B, F, C, H, W] tensors, got {getattr(images, 'shape', type(images))}")
    return images


def _frame_prompts(prompts: list[str] | None, repeats: int) -> list[str] | None:
    return None if prompts is None else [prompt for prompt in prompts for _ in range(repeats)]


class VideoFromImage(Reward):
    """Turn an image reward into a video reward by segmental frame sampling (+ temporal attenuation).

    Args:
        reward: an image reward.
        segments: ``S``, the number of sampled frames per video.
        attenuation: ``lambda_TAR``; 0 gives the plain mean of the sampled frames' scores.
        sampling: ``"random"`` (one uniform frame per segment; training) or ``"middle"``.
        seed: seeds the reward's own ``torch.Generator``; pass ``generator=`` at call time to
            control the draw from outside.

    The frame indices of the last call are kept in ``last_indices`` (``[B, S]``) for logging.
    """

    name = "video-from-image"
    modality = "video"

    def __init__(self, reward: Reward, segments: int = 4, attenuation: float = 0.0, sampling: str = "random", seed: int | None = None) -> None:
        super().__init__()
        if reward.modality != "image":
            raise ValueError(f"VideoFromImage wraps an image reward; {reward.name!r} is a {reward.modality} reward")
        if sampling not in ("random", "middle"):
            raise ValueError(f"sampling must be 'random' or 'middle', got {sampling!r}")
        self.reward = reward
        self.differentiable = reward.differentiable
        self.segments = int(segments)
        self.attenuation = float(attenuation)
        self.sampling = sampling
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self._finish_init()

    def forward(self, images: Tensor, prompts: list[str] | None, generator: torch.Generator | None = None, **context: Any) -> Tensor:
        videos = _check_video(images)
        batch_size, num_frames = videos.shape[:2]
        indices = segment_indices(
            num_frames, self.segments, batch_size, self.sampling, generator or self.generator, device=videos.device,
        )
        frames = videos[torch.arange(batch_size, device=videos.device)[:, None], indices]  # [B, S, C, H, W]
        scores = self.reward(frames.flatten(0, 1), _frame_prompts(prompts, self.segments), **context)
        scores = scores.view(batch_size, self.segments)
        weighted = temporal_weights(indices, num_frames, self.attenuation).to(scores) * scores
        self.last_indices = indices
        return weighted.mean(1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", segments={self.segments}, attenuation={self.attenuation}, sampling={self.sampling!r}"


class FrameAverage(Reward):
    """Mean of an image reward over every frame; ``chunk_size`` frames are scored at a time."""

    name = "frame-average"
    modality = "video"

    def __init__(self, reward: Reward, chunk_size: int | None = None) -> None:
        super().__init__()
        if reward.modality != "image":
            raise ValueError(f"FrameAverage wraps an image reward; {reward.name!r} is a {reward.modality} reward")
        self.reward = reward
        self.differentiable = reward.differentiable
        self.chunk_size = chunk_size
        self._finish_init()

    def forward(self, images: Tensor, prompts: list[str] | None, **context: Any) -> Tensor:
        videos = _check_video(images)
        batch_size, num_frames = videos.shape[:2]
        frames = videos.flatten(0, 1)
        frame_prompts = _frame_prompts(prompts, num_frames)
        chunk = self.chunk_size or frames.shape[0]
        scores = torch.cat([
            self.reward(frames[start : start + chunk], None if frame_prompts is None else frame_prompts[start : start + chunk], **context)
            for start in range(0, frames.shape[0], chunk)
        ])
        return scores.view(batch_size, num_frames).mean(1)


class TemporalConsistency(Reward):
    """Smoothness of a clip, ``[B]``; prompts are ignored.

    With an ``encoder`` (anything with ``embed_images([N, 3, H, W]) -> [N, D]``, e.g. an
    :class:`~rewards.backbones.OpenClipBackbone`): the mean cosine similarity of consecutive
    frames' embeddings, in [-1, 1]. Without: ``1 - mean |x_{t+1} - x_t|`` over pixels, in [0, 1].
    """

    name = "temporal-consistency"
    modality = "video"

    def __init__(self, encoder: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self._finish_init()

    def forward(self, images: Tensor, prompts: list[str] | None, **context: Any) -> Tensor:
        videos = _check_video(images)
        batch_size, num_frames = videos.shape[:2]
        if num_frames < 2:
            raise ValueError("temporal consistency needs at least 2 frames")
        if self.encoder is None:
            return 1.0 - (videos[:, 1:] - videos[:, :-1]).abs().flatten(1).mean(1)
        embeddings = F.normalize(self.encoder.embed_images(videos.flatten(0, 1)), dim=-1).view(batch_size, num_frames, -1)
        return (embeddings[:, 1:] * embeddings[:, :-1]).sum(-1).mean(1)


# -- registry builders -----------------------------------------------------------------------------

def _inner(reward: str | Reward, reward_options: dict | None) -> Reward:
    if isinstance(reward, Reward):
        if reward_options:
            raise ValueError("reward_options only apply when `reward` is a registered name")
        return reward
    return load(reward, **(reward_options or {}))


def build_video_from_image(
    reward: str | Reward = "hpsv2", reward_options: dict | None = None, segments: int = 4,
    attenuation: float = 0.0, sampling: str = "random", seed: int | None = None,
) -> VideoFromImage:
    """Segmental video reward around ``reward`` (a name built with ``reward_options``, or a Reward)."""
    return VideoFromImage(_inner(reward, reward_options), segments, attenuation, sampling, seed)


def build_frame_average(reward: str | Reward = "hpsv2", reward_options: dict | None = None, chunk_size: int | None = None) -> FrameAverage:
    """Frame-averaged video reward around ``reward``."""
    return FrameAverage(_inner(reward, reward_options), chunk_size)


def build_temporal_consistency(
    model: str | os.PathLike | dict | None = None, pretrained: str | os.PathLike | None = None,
) -> TemporalConsistency:
    """Temporal consistency: CLIP embeddings when ``model`` is given (see
    :meth:`OpenClipBackbone.create`), pixel differences otherwise."""
    if model is None:
        return TemporalConsistency()
    from .backbones import OpenClipBackbone

    return TemporalConsistency(OpenClipBackbone.create(model, pretrained))


class LearnedVideoReward(Reward):
    """A learned text-to-video reward, ``[B, F, 3, H, W]`` + prompts -> ``[B]`` (higher is better).

    Two towers and a scaled cosine, as CLIP scores an image against a caption:

    - **Video tower.** Each frame, resized to ``frame_size`` (antialiased) and mapped to [-1, 1],
      with its difference to the previous frame (zero for the first: the leading and trailing
      edges of a moving object say which way it moves), six channels, goes through three
      stride-2 convolutions and a linear layer on the *flattened* feature map (no global
      pooling, so the feature says where objects are). A pre-norm transformer encoder
      (``layers``, ``heads``) runs over ``[video token; frame_1 .. frame_F]`` with learned
      positions; the video token's output is the clip's embedding.
    - **Text tower.** The pooled text embedding of ``text_backbone`` (frozen, an open_clip
      backbone such as the testbed CLIP's) as the first token, and the prompt's words as tokens
      of their own (the backbone's frozen token embeddings, linearly mapped, with positions,
      padding masked), through a one-layer encoder; the first token's output is the prompt's
      embedding. The pooled embedding alone is dominated by the subject: it barely tells
      "moving left" from "moving up" (cosine 0.98 on the testbed's CLIP).
    - **Score** ``= exp(logit_scale) * cos(video, text)``.

    Differentiable in the pixels (reward-gradient methods can use it); its own weights are frozen
    unless :meth:`unfreeze` is called for training. :meth:`save_pretrained` writes only the
    trained weights and the name of the text backbone, which is loaded again at load time.
    """

    name = "learned-video"
    modality = "video"

    def __init__(self, text_backbone: torch.nn.Module, text_backbone_name: str | None = None, width: int = 64,
                 layers: int = 2, heads: int = 4, max_frames: int = 32, frame_size: int = 32) -> None:
        super().__init__()
        if frame_size % 8:
            raise ValueError(f"frame_size must be a multiple of 8, got {frame_size}")
        self.text_backbone = text_backbone.requires_grad_(False).eval()
        self.text_backbone_name = text_backbone_name
        self.config = {"width": width, "layers": layers, "heads": heads, "max_frames": max_frames, "frame_size": frame_size}
        cells = (frame_size // 8) ** 2
        self.frames = torch.nn.Sequential(
            torch.nn.Conv2d(6, 16, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Flatten(), torch.nn.Linear(32 * cells, width),
        )
        self.video_token = torch.nn.Parameter(0.02 * torch.randn(width))
        self.position = torch.nn.Parameter(0.02 * torch.randn(max_frames + 1, width))
        self.temporal = _encoder(width, heads, layers)
        self.video_norm = torch.nn.LayerNorm(width)
        table = _token_embedding(text_backbone)
        self.max_words = int(text_backbone.tokenize(["a"]).shape[1])
        self.text = torch.nn.Linear(text_backbone.embed_dim, width)
        self.words = torch.nn.Linear(table.embedding_dim, width)
        self.word_position = torch.nn.Parameter(0.02 * torch.randn(self.max_words, width))
        self.text_encoder = _encoder(width, heads, 1)
        self.text_norm = torch.nn.LayerNorm(width)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(10.0))))
        self._finish_init()

    def embed_videos(self, videos: Tensor) -> Tensor:
        """Clips ``[B, F, 3, H, W]`` in [0, 1] -> normalised embeddings ``[B, width]``."""
        batch_size, num_frames = videos.shape[:2]
        if num_frames > self.config["max_frames"]:
            raise ValueError(f"clips of {num_frames} frames; this reward was built for at most {self.config['max_frames']}")
        size = self.config["frame_size"]
        frames = videos.flatten(0, 1)
        if frames.shape[-2:] != (size, size):
            frames = F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        frames = (frames * 2 - 1).view(batch_size, num_frames, *frames.shape[1:])
        motion = torch.cat([torch.zeros_like(frames[:, :1]), frames[:, 1:] - frames[:, :-1]], dim=1)
        features = self.frames(torch.cat([frames, motion], dim=2).flatten(0, 1)).view(batch_size, num_frames, -1)
        tokens = torch.cat([self.video_token.expand(batch_size, 1, -1), features], dim=1) + self.position[: num_frames + 1]
        return F.normalize(self.video_norm(self.temporal(tokens)[:, 0]), dim=-1)

    def embed_prompts(self, prompts: list[str], like: Tensor) -> Tensor:
        """Prompts -> normalised embeddings ``[B, width]`` (dtype and device of ``like``)."""
        with torch.no_grad():
            pooled = F.normalize(self.text_backbone.embed_texts(list(prompts)).float(), dim=-1).to(like)
            ids = self.text_backbone.tokenize(list(prompts)).to(like.device)
            word_states = _token_embedding(self.text_backbone)(ids).to(like)
        tokens = torch.cat([self.text(pooled)[:, None], self.words(word_states) + self.word_position[: ids.shape[1]]], dim=1)
        padding = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        padding[:, 1:] = ids == 0  # open_clip pads with token 0
        return F.normalize(self.text_norm(self.text_encoder(tokens, src_key_padding_mask=padding)[:, 0]), dim=-1)

    def forward(self, images: Tensor, prompts: list[str] | None, **context: Any) -> Tensor:
        videos = _check_video(images)
        if prompts is None:
            raise ValueError(f"reward {self.name!r} scores a clip against its prompt: pass prompts")
        video = self.embed_videos(videos)
        return self.logit_scale.exp() * (video * self.embed_prompts(prompts, video)).sum(-1)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text_backbone.")}

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype = torch.float32):
        """Write ``video_reward.safetensors`` (the trained weights) and ``reward.json``;
        the text backbone is stored by name (``text_backbone_name``), not copied."""
        from pathlib import Path

        from safetensors.torch import save_file

        from .registry import write_reward_config

        if self.text_backbone_name is None:
            raise ValueError("set text_backbone_name (a reward name or folder whose backbone gives the text embedding) "
                             "before saving: the text backbone is not copied into the folder")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in self.trainable_state_dict().items()},
                  str(directory / VIDEO_REWARD_WEIGHTS))
        write_reward_config(directory, self.name, {"text_backbone": self.text_backbone_name, **self.config})
        return directory

    def extra_repr(self) -> str:
        return super().extra_repr() + f", text_backbone={self.text_backbone_name!r}, " + \
            ", ".join(f"{k}={v}" for k, v in self.config.items())


def _encoder(width: int, heads: int, layers: int) -> torch.nn.TransformerEncoder:
    layer = torch.nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=True)
    return torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _token_embedding(backbone: torch.nn.Module) -> torch.nn.Embedding:
    """The text tower's token embedding table (open_clip models: ``model.token_embedding``)."""
    table = getattr(getattr(backbone, "model", None), "token_embedding", None)
    if not isinstance(table, torch.nn.Embedding) or not hasattr(backbone, "tokenize"):
        raise ValueError(f"the learned video reward reads the prompt's words through an open_clip text tower "
                         f"(backbone.tokenize and backbone.model.token_embedding); {type(backbone).__name__} has none")
    return table


def _text_backbone(name: str) -> torch.nn.Module:
    """The ``backbone`` of a reward given by registry name or saved folder."""
    from pathlib import Path

    from .registry import load_pretrained

    reward = load_pretrained(name) if Path(name).is_dir() else load(name)
    backbone = getattr(reward, "backbone", None)
    if backbone is None or not hasattr(backbone, "embed_texts"):
        raise ValueError(f"text_backbone {name!r}: reward {reward.name!r} has no backbone with embed_texts")
    return backbone


def build_learned_video_reward(
    model: str | os.PathLike | None = None, text_backbone: str = "testbed-clip", width: int = 64, layers: int = 2,
    heads: int = 4, max_frames: int = 32, frame_size: int = 32,
) -> LearnedVideoReward:
    """A :class:`LearnedVideoReward` whose prompt side is ``text_backbone`` (a reward name or folder);
    with ``model`` (a folder written by ``save_pretrained``), its trained weights are loaded."""
    from pathlib import Path

    from .checkpoints import CheckpointError, read_state_dict

    reward = LearnedVideoReward(_text_backbone(text_backbone), text_backbone, width, layers, heads, max_frames, frame_size)
    if model is not None:
        path = Path(model)
        weights = path / VIDEO_REWARD_WEIGHTS if path.is_dir() else path
        state = {k: v.float() for k, v in read_state_dict(weights).items()}
        try:
            result = reward.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shape mismatches
            raise CheckpointError(f"{weights} does not fit this reward's architecture: {error}") from None
        missing = [k for k in result.missing_keys if not k.startswith("text_backbone.")]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{weights}: missing keys {missing[:5]}, unexpected keys {result.unexpected_keys[:5]}")
    return reward.freeze()
