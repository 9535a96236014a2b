"""InstructVideo (Yuan et al., CVPR 2024; ali-vilab/VGen; ALGORITHMS.md §11).

Reward fine-tuning of a text-to-video model *as editing*: instead of sampling from pure noise,
each step takes real captioned clips, noises them part of the way and lets the policy finish
the DDIM chain; only the last step(s) carry gradient into the denoiser, and the reward is an
image reward read on a few frames of the decoded clip:

1. encode a clip ``x0`` (``[B, F, 3, H, W]`` -> latents ``[B, C, F', h, w]``);
2. noise it to ``t_tau``, the timestep of the ``num_inference_steps`` grid nearest the noise
   level ``strength`` (0.6 on SD's 20-step DDIM grid is ``t_tau = 601``), with *temporal
   offset noise* ``eps + offset_noise * eps_offset``, ``eps_offset ~ N(0, 1)`` of shape
   ``[B, C, F', 1, 1]`` (one offset per channel and frame, constant over space);
3. run the sampler with ``eta = 0`` from ``t_tau`` to the end of the grid (``601, 551, ..., 1``):
   every step runs without gradient except the last ``grad_steps`` (VGen's
   ``trunc_backprop_timestep = 1``: only the last step), each differentiated call one activation
   checkpoint (``gradient_checkpointing="steps"``);
4. decode every frame (with gradient; chunked by ``generator.decode_chunk_size``) and score it
   with the Segmental Video Reward and its Temporally Attenuated weights
   (:class:`rewards.VideoFromImage`: one random frame per segment, weight
   ``exp(-attenuation * |g - F/2|)``, mean over segments);
5. ``loss = -mean(reward) * loss_scale``: VGen's ``1 - reward`` up to a constant.

An image reward named in ``reward`` is wrapped in the segmental reward (``segments``,
``attenuation``); a video reward (``reward.modality == "video"``) is used as it is. The clips
come from ``videos``: ``testbed-video:<split>`` renders fresh ground-truth clips of the video
testbed's prompts at every step; otherwise a JSONL file (or a folder holding
``captions.jsonl``) of ``{"video": path, "caption": text}`` rows, where a path is an
``.mp4``/``.gif``/... file or a folder of frames (:func:`visalign.images.load_video`). A clip
gives a window of ``num_frames`` frames (every ``frame_stride``-th) from a random start, centre
cropped to the generator's aspect and resized; clips too short are skipped and counted.

Deviation: the reference samples one batch of its ~20 curated clips per step with its own data
loader; here the objective draws clips itself (as the reward-gradient objectives draw prompts),
so ``visalign train`` needs no data section for it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError, configclass, field
from ..training.objective import register_objective
from .reward_grad import RewardGradient, RewardGradOptions

logger = logging.getLogger(__name__)

TESTBED_PREFIX = "testbed-video:"


@configclass
class InstructVideoOptions(RewardGradOptions):
    reward: str = field("testbed-reward", help="an image reward (wrapped in the segmental, temporally attenuated "
                                               "video reward) or a video reward; must be differentiable")
    videos: str = field("testbed-video:train", help="training clips: testbed-video:<split> (rendered on the fly), a "
                                                    "JSONL of {video, caption} rows, or a folder holding captions.jsonl")
    num_frames: int | None = field(None, help="frames per clip (default: the generator's num_frames)")
    frame_stride: int = field(1, help="take every n-th frame of a file clip")
    num_inference_steps: int = field(20, help="the DDIM grid (VGen: 20 steps)")
    strength: float = field(0.6, help="noise level the clips start from (VGen's starting_partial: t_tau = 601)")
    offset_noise: float = field(0.1, help="weight of the temporal offset noise [B, C, F, 1, 1]")
    grad_steps: int = field(1, help="last steps of the chain that carry gradient (VGen's trunc_backprop: 1)")
    guidance_scale: float = field(3.0, help="CFG scale (VGen guide_scale 3.0)")
    eta: float = field(0.0, help="DDIM eta (InstructVideo: 0, deterministic)")
    segments: int = field(4, help="SegVR segments S: one frame scored per segment (VGen config: 4)")
    attenuation: float = field(1.0, help="TAR lambda: frame weight exp(-lambda |g - F/2|); 0 = plain mean")
    frame_sampling: str = field("random", help="frame picked per segment: random (TSN, training) or middle")


class ClipSet:
    """Captioned training clips of one size; :meth:`draw` returns ``(videos [B, F, 3, H, W], captions)``."""

    def __init__(self, source: str, num_frames: int, height: int, width: int, frame_stride: int = 1):
        if frame_stride < 1:
            raise ConfigError(f"options.frame_stride must be at least 1, got {frame_stride}")
        self.source, self.num_frames, self.height, self.width = source, num_frames, height, width
        self.frame_stride = frame_stride
        self.skipped: dict[str, int] = {}
        self.clips: list[Tensor] | None = None
        if source.startswith(TESTBED_PREFIX):
            from ..testbed.video import video_prompts

            if height != width:
                raise ConfigError(f"testbed clips are square; the generator samples {height}x{width}")
            self.captions = [spec.text for spec in video_prompts(source[len(TESTBED_PREFIX):])]
        else:
            self.captions, self.clips = self._read(source)

    def __len__(self) -> int:
        return len(self.captions)

    def _read(self, source: str) -> tuple[list[str], list[Tensor]]:
        from ..images import load_video

        path = Path(source)
        if path.is_dir():
            path = path / "captions.jsonl"
        if not path.is_file():
            raise ConfigError(f"options.videos: no clip list at {path} (a JSONL of {{video, caption}} rows, a folder "
                              f"holding captions.jsonl, or {TESTBED_PREFIX}train)")
        captions, clips = [], []
        needed = (self.num_frames - 1) * self.frame_stride + 1
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{where}: not JSON ({error})") from None
            video = row.get("video", row.get("path"))
            caption = row.get("caption", row.get("prompt"))
            if not isinstance(video, str) or not isinstance(caption, str):
                raise ConfigError(f"{where}: a row needs a 'video' path and a 'caption' string, got keys {sorted(row)}")
            try:
                clip = load_video(path.parent / video)
            except ValueError as error:
                self._skip("unreadable", f"{where}: {error}")
                continue
            if len(clip) < needed:
                self._skip("too_short", f"{where}: {len(clip)} frames, need {needed} ({self.num_frames} at stride "
                                        f"{self.frame_stride})")
                continue
            captions.append(caption)
            clips.append(self._resize(clip))
        if self.skipped:
            logger.warning("instructvideo: skipped %s of the clips in %s", self.skipped, path)
        if not clips:
            raise ConfigError(f"options.videos: no usable clip in {path} (skipped: {self.skipped})")
        return captions, clips

    def _skip(self, category: str, message: str) -> None:
        self.skipped[category] = self.skipped.get(category, 0) + 1
        logger.warning("instructvideo: skipping %s", message)

    def _resize(self, clip: Tensor) -> Tensor:
        """Centre crop to the target aspect, then resize (antialiased) to ``height x width``."""
        frames, _, h, w = clip.shape
        target = self.width / self.height
        if w / h > target:
            new_w = max(1, round(h * target))
            left = (w - new_w) // 2
            clip = clip[..., left : left + new_w]
        elif w / h < target:
            new_h = max(1, round(w / target))
            top = (h - new_h) // 2
            clip = clip[..., top : top + new_h, :]
        if clip.shape[-2:] != (self.height, self.width):
            clip = F.interpolate(clip, size=(self.height, self.width), mode="bilinear", antialias=True, align_corners=False)
        return clip.clamp(0, 1)

    def draw(self, count: int, rng: torch.Generator) -> tuple[Tensor, list[str]]:
        picks = torch.randint(len(self), (count,), generator=rng).tolist()
        captions = [self.captions[i] for i in picks]
        if self.clips is None:
            from ..testbed.video import clip_for_prompt, render_clips

            seed = int(torch.randint(2**31 - 1, (1,), generator=rng))
            scenes = np.random.default_rng(seed)
            clips = [clip_for_prompt(caption, scenes, num_frames=self.num_frames) for caption in captions]
            return render_clips(clips, size=self.height), captions
        windows = []
        span = (self.num_frames - 1) * self.frame_stride + 1
        for i in picks:
            clip = self.clips[i]
            start = int(torch.randint(len(clip) - span + 1, (1,), generator=rng))
            windows.append(clip[start : start + span : self.frame_stride])
        return torch.stack(windows), captions


def temporal_offset_noise(shape: tuple[int, ...], offset: float, rng: torch.Generator) -> Tensor:
    """``eps + offset * eps_offset`` with ``eps_offset`` of shape ``[B, C, F, 1, 1]`` (constant over
    space, one value per channel and frame) for video latents ``[B, C, F, h, w]``."""
    noise = torch.randn(shape, generator=rng, device=rng.device)
    if offset:
        noise = noise + offset * torch.randn((*shape[:3], *([1] * (len(shape) - 3))), generator=rng, device=rng.device)
    return noise


@register_objective("instructvideo")
class InstructVideo(RewardGradient):
    """InstructVideo: reward fine-tuning of a video model as editing (see the module docstring)."""

    Options = InstructVideoOptions

    def __init__(self, generator, options=None, reward=None):
        if generator is not None and not getattr(generator, "is_video", False):
            raise ConfigError(f"instructvideo fine-tunes text-to-video generators; {generator.family!r} is an image "
                              "family (for images use draft, alignprop or refl)")
        super().__init__(generator, options, reward)
        o = self.options
        if not 0.0 < o.strength <= 1.0:
            raise ConfigError(f"options.strength must lie in (0, 1], got {o.strength}")
        if o.grad_steps < 1:
            raise ConfigError(f"options.grad_steps must be at least 1, got {o.grad_steps}")
        if o.offset_noise < 0 or o.attenuation < 0:
            raise ConfigError("options.offset_noise and options.attenuation must not be negative")
        if o.prompts != RewardGradOptions().prompts:
            raise ConfigError("instructvideo takes its captions from options.videos; options.prompts is not used")
        if o.frame_sampling not in ("random", "middle"):
            raise ConfigError(f"options.frame_sampling must be random or middle, got {o.frame_sampling!r}")
        self.clips: ClipSet | None = None
        self.start = None
        if generator is not None:  # (None: the options are only being validated)
            self.start = generator.start_index(o.num_inference_steps, o.strength)
            if o.grad_steps > o.num_inference_steps - self.start:
                raise ConfigError(f"options.grad_steps={o.grad_steps} exceeds the {o.num_inference_steps - self.start} "
                                  f"steps run from strength {o.strength}")

    def set_reward(self, reward) -> None:
        from rewards import VideoFromImage

        if getattr(reward, "modality", "image") == "image":
            o = self.options
            reward = VideoFromImage(reward, segments=o.segments, attenuation=o.attenuation, sampling=o.frame_sampling)
        super().set_reward(reward)

    def bind(self, batch_size: int, forward_module: torch.nn.Module | None = None, device=None) -> None:
        o, gen = self.options, self.generator
        if self.clips is None:
            num_frames = o.num_frames or gen.num_frames
            gen.check_num_frames(num_frames)
            height = o.resolution or gen.default_height
            width = o.resolution or gen.default_width
            self.clips = ClipSet(o.videos, num_frames, height, width, o.frame_stride)
            self.prompts = self.clips.captions
        super().bind(batch_size, forward_module, device)

    def loss(self, batch, rng: torch.Generator):
        gen, o = self.generator, self.options
        videos, prompts = self.clips.draw(self.batch_size, rng)
        with torch.no_grad():
            x0 = gen.encode(videos.to(gen.device), generator=rng)
        timesteps, _ = gen.sampling_timesteps(o.num_inference_steps)
        t_tau = timesteps[self.start]
        noise = temporal_offset_noise(tuple(x0.shape), o.offset_noise, rng).to(x0)
        x_t = gen.add_noise(x0, noise, t_tau)
        first = o.num_inference_steps - o.grad_steps
        out = gen.sample(prompts, latents=x_t, start_step=self.start, grad_steps=range(first, o.num_inference_steps),
                         num_inference_steps=o.num_inference_steps, guidance_scale=o.guidance_scale, eta=o.eta,
                         generator=rng, num_frames=videos.shape[1], height=videos.shape[-2], width=videos.shape[-1])
        from rewards import VideoFromImage

        # The segmental reward's frame draw follows the step's generator (reproducible runs).
        context = {"generator": rng} if isinstance(self.reward, VideoFromImage) and rng.device.type == "cpu" else {}
        loss, metrics = self.score_loss(out.images, prompts, **context)
        metrics["t_start"] = float(t_tau)
        return loss, metrics
