"""Text-to-video generators behind the same Generator seam as images.

Two families:

- ``modelscope`` (:class:`ModelScopeGenerator`): the DDPM-family video UNet of ModelScope T2V
  and zeroscope (diffusers ``TextToVideoSDPipeline``, ``UNet3DConditionModel``). It is SD with
  temporal layers: the same CLIP prompt encoding, the same DDIM math, and SD's 2D VAE applied
  to each frame. InstructVideo (ALGORITHMS.md §11) fine-tunes this model.
- ``wan`` (:class:`WanGenerator`): the rectified-flow video DiT of Wan 2.1 (diffusers
  ``WanPipeline``, ``WanTransformer3DModel``, the causal 3D ``AutoencoderKLWan``, a UMT5 text
  encoder): the flow math of SD3 with Wan's prompt encoding and denoiser call.

Conventions, on top of the image ones (docs/architecture.md):

- Videos are float in [0, 1], ``[B, F, 3, H, W]`` (frames second), what :meth:`decode`
  returns, :meth:`encode` takes and video rewards score.
- Latents keep each family's native layout, ``[B, C, F_latent, h, w]`` (channels before
  frames, as the 3D networks take them), so a seed gives the video the plain diffusers
  pipeline gives. ``F_latent`` is ``F`` for ``modelscope`` and ``(F - 1) / 4 + 1`` for ``wan``,
  whose VAE compresses time 4x and therefore needs ``F = 4k + 1`` frames.
- Every method of the seam (``add_noise``, ``target``, ``predict``, ``step``, ``sample``,
  ``reference``, LoRA, ...) is the image family's, unchanged: they are written over any
  latent shape. The number of frames is ``generator.num_frames`` (settable) or the
  ``num_frames`` argument of :meth:`sample`, so pipelines that know nothing of video (FK
  steering, best-of-N) sample clips as they sample images.
- VAE decoding is chunked (``generator.decode_chunk_size`` frames per decoder call; ``None``:
  all at once): the decode of every frame is the memory peak of reward fine-tuning on video
  (InstructVideo's ``decoder_bs``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Sequence

import torch
from torch import Tensor

from .base import Cond, Generator, SampleOutput, to_pil
from .diffusion import StableDiffusionGenerator
from .flow import FlowGenerator


class VideoGenerator(Generator):
    """What every video family adds to a Generator: frames in the latent shape, video encode and
    decode (chunked), and ``num_frames`` in :meth:`sample`. Put it first among the bases.

    Attributes:
        num_frames: frames per sampled clip when :meth:`sample` is not told.
        default_height, default_width: frame size when not told.
        decode_chunk_size: at most this many frames per VAE call in :meth:`decode` and
            :meth:`encode` (``None``: all at once).
    """

    is_video = True
    # Published defaults of the family's pipeline (frames, height, width), used when the denoiser
    # config does not say; a family overrides them.
    family_defaults: tuple[int, int, int] = (16, 256, 256)

    def __init__(self, pipe, device=None):
        super().__init__(pipe, device=device)
        frames, height, width = self.family_defaults
        sample_size = getattr(self.denoiser.config, "sample_size", None)
        if sample_size:
            height = width = sample_size * self.vae_scale_factor
        self.num_frames = frames
        self.default_height, self.default_width = height, width
        self.decode_chunk_size: int | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, num_frames: int | None = None, height: int | None = None,
                        width: int | None = None, **kwargs) -> "VideoGenerator":
        """As :meth:`Generator.from_pretrained`; ``num_frames``, ``height``, ``width`` set the
        clip size sampled by default (else the family's published defaults)."""
        generator = super().from_pretrained(path, **kwargs)
        generator.set_video_size(num_frames=num_frames, height=height, width=width)
        return generator

    def set_video_size(self, num_frames: int | None = None, height: int | None = None, width: int | None = None) -> None:
        """Set the default clip size (``None`` keeps a value)."""
        if num_frames is not None:
            self.check_num_frames(num_frames)
            self.num_frames = int(num_frames)
        self.default_height = int(height) if height is not None else self.default_height
        self.default_width = int(width) if width is not None else self.default_width

    # ---------------------------------------------------------------- sizes

    @property
    def default_resolution(self) -> int:
        return self.default_height

    @property
    def temporal_scale_factor(self) -> int:
        """Frames per latent frame (after the first, for a causal VAE)."""
        return 1

    def latent_frames(self, num_frames: int) -> int:
        return num_frames

    def check_num_frames(self, num_frames: int) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")

    def latent_shape(self, batch_size: int, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple:
        """``(B, C, F_latent, h, w)``."""
        num_frames = num_frames or self.num_frames
        self.check_num_frames(num_frames)
        height, width = height or self.default_height, width or self.default_width
        f = self.spatial_multiple
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this model, got {height}x{width}")
        scale = self.vae_scale_factor
        return (batch_size, self.latent_channels, self.latent_frames(num_frames), height // scale, width // scale)

    @property
    def spatial_multiple(self) -> int:
        """What frame sizes must be multiples of (the VAE's factor, times a DiT's patch)."""
        return self.vae_scale_factor

    # ---------------------------------------------------------------- sampling

    def sample(self, prompts: str | Sequence[str] | None = None, *, num_frames: int | None = None,
               output_type: str = "pt", **kwargs) -> SampleOutput:
        """Sample clips: :meth:`Generator.sample` with ``num_frames`` (default
        ``self.num_frames``). ``images`` are ``[B, F, 3, H, W]`` in [0, 1]; with
        ``output_type="pil"``, a list of clips, each a list of PIL frames."""
        with self._frames(num_frames):
            out = super().sample(prompts, output_type="pt" if output_type == "pil" else output_type, **kwargs)
        if output_type == "pil":
            out.images = [to_pil(video) for video in out.images]
        return out

    @contextlib.contextmanager
    def _frames(self, num_frames: int | None):
        if num_frames is None:
            yield
            return
        self.check_num_frames(num_frames)
        previous, self.num_frames = self.num_frames, int(num_frames)
        try:
            yield
        finally:
            self.num_frames = previous

    # ---------------------------------------------------------------- VAE

    def _chunks(self, tensor: Tensor, frames_per_item: int = 1) -> list[Tensor]:
        """Split ``tensor`` along dim 0 so that a chunk holds at most ``decode_chunk_size`` frames
        (at least one item)."""
        if not self.decode_chunk_size:
            return [tensor]
        items = max(1, self.decode_chunk_size // frames_per_item)
        return list(tensor.split(items))

    @staticmethod
    def _check_videos(videos: Tensor) -> None:
        if videos.dim() != 5 or videos.shape[2] != 3:
            raise ValueError(f"video encode expects videos [B, F, 3, H, W] in [0, 1], got shape {tuple(videos.shape)}")


@functools.cache
def _with_peft_adapters(cls: type) -> type:
    from diffusers.loaders import PeftAdapterMixin

    return type(cls.__name__, (cls, PeftAdapterMixin), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


class ModelScopeGenerator(VideoGenerator, StableDiffusionGenerator):
    """ModelScope T2V / zeroscope (``TextToVideoSDPipeline``): SD's CLIP encoder and DDIM math,
    a ``UNet3DConditionModel`` over latents ``[B, 4, F, h, w]``, SD's VAE frame by frame.

    ``enable_gradient_checkpointing`` checkpoints the whole UNet call (diffusers'
    ``UNet3DConditionModel`` has no block-level checkpointing): only its inputs are kept, and
    the forward pass runs again in backward. That is what InstructVideo does for its one
    differentiated step.
    """

    family = "modelscope"
    pipeline_class_names = ("TextToVideoSDPipeline",)
    family_defaults = (16, 256, 256)  # the pipeline's num_frames; height from the UNet's sample_size

    def __init__(self, pipe, device=None):
        from diffusers.loaders import PeftAdapterMixin

        super().__init__(pipe, device=device)
        self._checkpoint_denoiser = False
        # diffusers' UNet3DConditionModel (a deprecated pipeline's) lacks the PEFT adapter mixin
        # every other denoiser has; give the loaded UNet that mixin so LoRA, the adapter-disabled
        # reference and diffusers-format LoRA files work as for every family. The class keeps
        # its name, so save_pretrained still writes a plain UNet3DConditionModel.
        if not isinstance(self.denoiser, PeftAdapterMixin):
            self.denoiser.__class__ = _with_peft_adapters(type(self.denoiser))

    @classmethod
    def _load_kwargs(cls) -> dict:
        return {}  # no safety checker in this pipeline

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in [0, 1] → latents ``[B, C, F, h, w]`` (each frame by SD's VAE)."""
        self._check_videos(images)
        batch, frames = images.shape[:2]
        latents = torch.cat([
            StableDiffusionGenerator.encode(self, chunk, generator=generator, sample=sample)
            for chunk in self._chunks(images.flatten(0, 1))
        ])
        return latents.unflatten(0, (batch, frames)).transpose(1, 2)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, F, h, w]`` → videos ``[B, F, 3, H, W]`` in [0, 1], ``decode_chunk_size``
        frames per VAE call. Differentiable in the latents."""
        batch, frames = latents.shape[0], latents.shape[2]
        flat = latents.transpose(1, 2).flatten(0, 1)
        images = torch.cat([StableDiffusionGenerator.decode(self, chunk) for chunk in self._chunks(flat)])
        return images.unflatten(0, (batch, frames))

    def enable_gradient_checkpointing(self, denoiser: bool = True, vae: bool = True) -> None:
        self._checkpoint_denoiser = denoiser
        if vae:
            self.vae.enable_gradient_checkpointing()

    def _denoise(self, denoiser, x_t, t, cond):
        if self._checkpoint_denoiser and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(super()._denoise, denoiser, x_t, t, cond, use_reentrant=False)
        return super()._denoise(denoiser, x_t, t, cond)


class WanGenerator(VideoGenerator, FlowGenerator):
    """Wan 2.1 text-to-video (``WanPipeline``): UMT5 prompt states, a ``WanTransformer3DModel``
    predicting the flow velocity over latents ``[B, C, (F - 1) / 4 + 1, h, w]``, and the causal
    3D VAE ``AutoencoderKLWan`` with per-channel latent mean and std.

    Sampling uses the flow Euler / SDE step on a ``FlowMatchEulerDiscreteScheduler`` grid with
    the checkpoint's shift (Wan ships ``UniPCMultistepScheduler`` with ``flow_shift``), for the
    reason DDIM is used for every diffusion family: one sampler whose stochastic step has an
    exact log-probability, for training and evaluation alike.

    The VAE decodes latent frame by latent frame, carrying a causal cache, so a decoder call
    takes whole clips; ``decode_chunk_size`` bounds the frames, hence the clips, per call.
    """

    family = "wan"
    pipeline_class_names = ("WanPipeline",)
    denoiser_name = "transformer"
    family_defaults = (81, 480, 832)  # WanPipeline's defaults (Wan 2.1, 480p)

    def __init__(self, pipe, device=None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(pipe, device=device)
        if not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            config = self.scheduler.config
            shift = config.get("flow_shift") or config.get("shift") or 1.0
            self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=float(shift))
        # WanPipeline.__call__ pads/truncates prompts to 512 T5 tokens (Wan 2.1's text length).
        self.max_sequence_length = 512

    def enable_gradient_checkpointing(self, denoiser: bool = True, vae: bool = True) -> None:
        """The transformer's blocks; diffusers' ``AutoencoderKLWan`` has no gradient checkpointing,
        so ``vae=True`` leaves it as it is (chunk the decode instead)."""
        super().enable_gradient_checkpointing(denoiser=denoiser, vae=vae and self.vae._supports_gradient_checkpointing)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    @property
    def temporal_scale_factor(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def spatial_multiple(self) -> int:
        return self.vae_scale_factor * int(self.denoiser.config.patch_size[1])

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_scale_factor + 1

    def check_num_frames(self, num_frames: int) -> None:
        scale = self.temporal_scale_factor
        if num_frames < 1 or (num_frames - 1) % scale:
            raise ValueError(
                f"Wan's causal VAE needs num_frames = {scale}k + 1 (1, {scale + 1}, {2 * scale + 1}, ...), got {num_frames}"
            )

    def encode_prompt(self, prompts: str | Sequence[str]) -> Cond:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._prompt_grad():
            prompt_embeds, _ = self.pipe.encode_prompt(
                prompt=prompts,
                do_classifier_free_guidance=False,
                num_videos_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
                device=self.device,
            )
        return Cond(prompt_embeds=prompt_embeds.to(self.dtype))

    def _denoise(self, denoiser, x_t, t, cond):
        s = self._timestep_batch(t, x_t.shape[0]).float()
        # The transformer takes the scheduler's timestep, s * num_train_timesteps.
        return denoiser(
            hidden_states=x_t.to(self.dtype),
            timestep=s * self.num_train_timesteps,
            encoder_hidden_states=cond.prompt_embeds,
            return_dict=False,
        )[0]

    def _latent_statistics(self, like: Tensor) -> tuple[Tensor, Tensor]:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=like.device, dtype=torch.float32).view(shape)
        std = torch.tensor(config.latents_std, device=like.device, dtype=torch.float32).view(shape)
        return mean, std

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in [0, 1] (``F = 4k + 1``) → latents ``[B, C, k + 1, h, w]``,
        normalised by the VAE's per-channel ``latents_mean`` and ``latents_std``."""
        self._check_videos(images)
        self.check_num_frames(images.shape[1])
        pixels = images.to(device=self.vae.device, dtype=self.vae.dtype).transpose(1, 2) * 2 - 1
        latents = []
        for chunk in self._chunks(pixels, pixels.shape[2]):
            dist = self.vae.encode(chunk).latent_dist
            latents.append(dist.sample(generator) if sample else dist.mode())
        latents = torch.cat(latents)
        mean, std = self._latent_statistics(latents)
        return ((latents.float() - mean) / std).to(latents.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, F_latent, h, w]`` → videos ``[B, F, 3, H, W]`` in [0, 1]. Differentiable."""
        mean, std = self._latent_statistics(latents)
        latents = (latents.float() * std + mean).to(self.vae.dtype)
        frames = (latents.shape[2] - 1) * self.temporal_scale_factor + 1
        videos = torch.cat([self.vae.decode(chunk).sample for chunk in self._chunks(latents, frames)])
        return (videos / 2 + 0.5).clamp(0, 1).transpose(1, 2)
