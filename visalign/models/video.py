"""Text-to-video generators behind the same Generator seam as images.

Three families:

- ``modelscope`` (:class:`ModelScopeGenerator`): the DDPM-family video UNet of ModelScope T2V
  and zeroscope (diffusers ``TextToVideoSDPipeline``, ``UNet3DConditionModel``). It is SD with
  temporal layers: the same CLIP prompt encoding, the same DDIM math, and SD's 2D VAE applied
  to each frame. InstructVideo (ALGORITHMS.md §11) fine-tunes this model.
- ``animatediff`` (:class:`AnimateDiffGenerator`): SD 1.5 with an AnimateDiff motion adapter
  (diffusers ``AnimateDiffPipeline``, ``UNetMotionModel``), the other DDPM-family video UNet;
  it shares everything but the denoiser call with ``modelscope``
  (:class:`StableDiffusionVideoGenerator`).
- ``wan`` (:class:`WanGenerator`): the rectified-flow video DiT of Wan 2.1 (diffusers
  ``WanPipeline``, ``WanTransformer3DModel``, the causal 3D ``AutoencoderKLWan``, a UMT5 text
  encoder): the flow math of SD3 with Wan's prompt encoding and denoiser call.

Conventions, on top of the image ones (docs/architecture.md):

- Videos are float in [0, 1], ``[B, F, 3, H, W]`` (frames second), what :meth:`decode`
  returns, :meth:`encode` takes and video rewards score.
- Latents keep each family's native layout, ``[B, C, F_latent, h, w]`` (channels before
  frames, as the 3D networks take them), so a seed gives the video the plain diffusers
  pipeline gives. ``F_latent`` is ``F`` for the UNets and ``(F - 1) / 4 + 1`` for ``wan``,
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
import copy
import functools
import inspect
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .base import Cond, Generator, SampleOutput, to_pil
from .diffusion import StableDiffusionGenerator
from .errors import ModelLoadError
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


class StableDiffusionVideoGenerator(VideoGenerator, StableDiffusionGenerator):
    """What the DDPM-family video families share: SD with temporal layers. SD's CLIP prompt
    encoding and DDIM math, latents ``[B, 4, F, h, w]``, and SD's 2D VAE applied to each frame
    (``decode_chunk_size`` frames per VAE call)."""

    @classmethod
    def _load_kwargs(cls) -> dict:
        return {}  # no safety checker in the video pipelines

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


class ModelScopeGenerator(StableDiffusionVideoGenerator):
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

    def enable_gradient_checkpointing(self, denoiser: bool = True, vae: bool = True) -> None:
        self._checkpoint_denoiser = denoiser
        if vae:
            self.vae.enable_gradient_checkpointing()

    def _denoise(self, denoiser, x_t, t, cond):
        if self._checkpoint_denoiser and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(super()._denoise, denoiser, x_t, t, cond, use_reentrant=False)
        return super()._denoise(denoiser, x_t, t, cond)


class AnimateDiffGenerator(StableDiffusionVideoGenerator):
    """SD 1.5 + AnimateDiff (``AnimateDiffPipeline``): an SD UNet joined with a motion adapter's
    temporal transformers into a ``UNetMotionModel`` over latents ``[B, 4, F, h, w]``; SD's CLIP
    encoder, DDIM math and VAE frame by frame.

    Two ways in: a saved ``AnimateDiffPipeline`` folder (``load_generator(folder)``), or an SD
    model plus a motion adapter (``load_generator(sd15, motion_adapter=adapter)``; see
    :meth:`from_pretrained`). The adapter's weights live in the UNet once joined, so the
    generator drops the pipeline's second copy (``pipe.motion_adapter`` is ``None``; a saved
    folder holds the motion modules in ``unet/`` only); ``denoiser.save_motion_modules(path)``
    writes them as an adapter again.

    ``UNetMotionModel`` has diffusers' PEFT adapter mixin and block-level gradient
    checkpointing, so LoRA (spatial and temporal attention alike) and
    ``enable_gradient_checkpointing`` are the base Generator's. Clips have at most
    ``motion_max_seq_length`` frames (32 for the published adapters), the length of the
    temporal attention's position table.
    """

    family = "animatediff"
    pipeline_class_names = ("AnimateDiffPipeline",)
    family_defaults = (16, 512, 512)  # the pipeline's num_frames; height from the UNet's sample_size

    def __init__(self, pipe, device=None):
        pipe.motion_adapter = None  # before the move to device: its weights are in pipe.unet already
        super().__init__(pipe, device=device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, motion_adapter=None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> "AnimateDiffGenerator":
        """Load a saved ``AnimateDiffPipeline`` folder or hub repo, or an SD 1.x model (folder or
        repo id) plus ``motion_adapter``: a ``MotionAdapter``, its folder or its hub repo id
        (``guoyww/animatediff-motion-adapter-v1-5-2``).

        With an SD model, the scheduler becomes AnimateDiff's (see :meth:`_motion_components`);
        pass ``scheduler=`` to keep another. Other keywords are
        :meth:`VideoGenerator.from_pretrained`'s.
        """
        from .loading import detect_family

        hub = {k: kwargs[k] for k in ("revision", "local_files_only") if k in kwargs}
        family = detect_family(path, **hub)
        if motion_adapter is not None and family == "animatediff":
            raise ModelLoadError(
                f"{path} is an AnimateDiff model that already holds its motion modules; motion_adapter= goes "
                f"with an SD model folder or repo id"
            )
        cls._check_folder_family(path, family, {**kwargs, "motion_adapter": motion_adapter})
        if motion_adapter is not None:
            from diffusers import DDIMScheduler, UNet2DConditionModel

            # The SD model's revision is not the adapter's; only the offline switch applies to both.
            offline = {k: v for k, v in hub.items() if k == "local_files_only"}
            motion_adapter = load_motion_adapter(motion_adapter, torch_dtype=torch_dtype, **offline)
            unet_config = UNet2DConditionModel.load_config(path, subfolder="unet", **hub)
            scheduler = kwargs.get("scheduler")
            sd_scheduler_config = (DDIMScheduler.load_config(path, subfolder="scheduler", **hub)
                                   if scheduler is None else None)
            kwargs.update(cls._motion_components(motion_adapter, unet_config, sd_scheduler_config, scheduler, path))
        return super().from_pretrained(path, torch_dtype=torch_dtype, **kwargs)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, motion_adapter=None,
                         config: str | os.PathLike | None = None, torch_dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None, attention: str = "auto",
                         num_frames: int | None = None, height: int | None = None, width: int | None = None,
                         scheduler=None, **kwargs) -> "AnimateDiffGenerator":
        """An original-layout SD 1.x single ``.safetensors`` checkpoint (a CivitAI-style fine-tune)
        plus ``motion_adapter`` (a ``MotionAdapter``, its folder or hub repo id).

        The checkpoint is loaded as the ``sd`` family loads it
        (:meth:`StableDiffusionGenerator.from_single_file`; ``config``: a local diffusers SD
        folder of the same architecture when offline, and other keywords go there), then joined
        with the adapter as :meth:`from_pretrained` joins an SD folder: the same pipeline, the
        same scheduler rule (``scheduler=`` keeps another). ``num_frames``, ``height``, ``width``
        set the clip size sampled by default.
        """
        from .loading import infer_single_file_family, pipeline_class_for

        if motion_adapter is None:
            raise ModelLoadError(
                f"{path} is a single-file SD checkpoint, which has no motion modules: AnimateDiff adds them from "
                f"a motion adapter, motion_adapter=<a MotionAdapter folder or hub id, e.g. "
                f"'guoyww/animatediff-motion-adapter-v1-5-2'>"
            )
        family = infer_single_file_family(path)
        if family != "sd":
            raise ModelLoadError(
                f"{path} holds a {family!r} checkpoint; AnimateDiff joins a motion adapter to an SD 1.x ('sd') "
                f"checkpoint (SDXL motion adapters are not supported)"
            )
        offline = {k: v for k, v in kwargs.items() if k == "local_files_only"}
        motion_adapter = load_motion_adapter(motion_adapter, torch_dtype=torch_dtype, **offline)
        # The SD model stays on the CPU with the default attention until joined: the joined UNet
        # is a new module, moved and given its attention below.
        sd_pipe = StableDiffusionGenerator.from_single_file(
            path, config=config, torch_dtype=torch_dtype, attention="sdpa", **kwargs).pipe
        pipeline_class = pipeline_class_for(cls.family)
        accepted = inspect.signature(pipeline_class.__init__).parameters
        components = {name: part for name, part in sd_pipe.components.items() if name in accepted}
        components.update(cls._motion_components(motion_adapter, sd_pipe.unet.config, sd_pipe.scheduler.config,
                                                 scheduler, path))
        # Built as from_pretrained builds it (the pipeline joins unet and adapter into a
        # UNetMotionModel); not from_pipe, which casts to float32 unless told and keeps the SD
        # pipeline's config (requires_safety_checker) in the AnimateDiff one.
        generator = cls(pipeline_class(**components), device=device)
        generator.set_attention(attention)
        generator.set_video_size(num_frames=num_frames, height=height, width=width)
        return generator

    @staticmethod
    def _motion_components(adapter, unet_config: dict, sd_scheduler_config: dict | None, scheduler,
                           source) -> dict:
        """The parts that make an SD model (``source``, named in errors) AnimateDiff: the loaded
        motion ``adapter``, checked to fit the SD UNet (``unet_config``), and the scheduler.

        The scheduler is ``scheduler`` when given, else DDIM on the SD model's betas
        (``sd_scheduler_config``) with AnimateDiff's ``beta_schedule="linear"`` and no sample
        clipping: the schedule the published adapters were trained and are run with (as in
        diffusers' AnimateDiff examples).
        """
        from diffusers import DDIMScheduler

        check_motion_adapter(adapter, unet_config, f"the UNet of {source}")
        if scheduler is None:
            scheduler = DDIMScheduler.from_config(sd_scheduler_config, beta_schedule="linear", clip_sample=False)
        return {"motion_adapter": adapter, "scheduler": scheduler}

    @classmethod
    def _check_folder_family(cls, path, family: str, kwargs: dict) -> None:
        if family == "sd":
            if kwargs.get("motion_adapter") is None:
                raise ModelLoadError(
                    f"{path} is a Stable Diffusion ('sd') model, which has no motion modules: AnimateDiff adds them "
                    f"from a motion adapter, motion_adapter=<a MotionAdapter folder or hub id, e.g. "
                    f"'guoyww/animatediff-motion-adapter-v1-5-2'>"
                )
            return
        super()._check_folder_family(path, family, kwargs)

    def enable_motion_module_training(self, snapshot_reference: bool = True) -> list[torch.nn.Parameter]:
        """AnimateDiff's training: only the motion modules (the temporal transformers) learn, the
        SD layers stay frozen. ``snapshot_reference`` keeps a frozen reference (DPO-style
        objectives): a copy of the motion modules only, whose frozen SD layers *are* the
        policy's (shared tensors, which never change), so the reference costs the motion modules'
        memory, not a second UNet. Returns the trainable parameters."""
        named = dict(self.denoiser.named_parameters())
        if not any("motion_modules" in name for name in named):
            raise ValueError("this AnimateDiff denoiser has no motion_modules parameters")
        if snapshot_reference and self._reference_module is None:
            # deepcopy's memo maps each frozen parameter (and every constant buffer) to itself: the copy shares them.
            frozen = {name: p for name, p in named.items() if "motion_modules" not in name}
            memo = {id(p): p for p in frozen.values()}
            memo.update({id(b): b for b in self.denoiser.buffers()})
            reference = copy.deepcopy(self.denoiser, memo)
            for name, param in reference.named_parameters():
                if name not in frozen:
                    param.requires_grad_(False)
            self._reference_module = reference.eval()
        for name, param in named.items():
            param.requires_grad_("motion_modules" in name)
        return self.trainable_parameters()

    def save_motion_adapter(self, path: str | os.PathLike) -> Path:
        """Write the (trained) motion modules as a diffusers ``MotionAdapter`` folder: load it
        back on the SD model with ``load_generator(sd, motion_adapter=path)``."""
        path = Path(path)
        self.denoiser.save_motion_modules(str(path))
        return path

    def check_num_frames(self, num_frames: int) -> None:
        super().check_num_frames(num_frames)
        limit = self.denoiser.config.motion_max_seq_length
        if num_frames > limit:
            raise ValueError(
                f"this AnimateDiff motion module attends over at most {limit} frames (motion_max_seq_length), "
                f"got num_frames={num_frames}"
            )

    def _denoise(self, denoiser, x_t, t, cond):
        # UNetMotionModel folds the frames into the batch ([B * F, C, h, w]) and takes one text
        # state per frame, as AnimateDiffPipeline repeats them.
        return super()._denoise(denoiser, x_t, t, cond.repeat_interleave(x_t.shape[2]))


def load_motion_adapter(source, torch_dtype: torch.dtype | None = None, **kwargs):
    """A diffusers ``MotionAdapter`` from a folder or hub repo id (returned as is if it is one);
    a clear error when ``source`` is not a motion adapter."""
    from diffusers import MotionAdapter

    from .loading import dtype_kwargs

    if isinstance(source, MotionAdapter):
        return source
    try:
        config = MotionAdapter.load_config(str(source), **kwargs)
    except Exception as error:  # OSError or a hub error, by version: name the source either way
        if (Path(source) / "model_index.json").exists():
            raise ModelLoadError(f"{source} is a pipeline folder, not a motion adapter; an AnimateDiff pipeline's "
                                 f"adapter is in its motion_adapter/ subfolder") from None
        raise ModelLoadError(
            f"cannot read the motion adapter {str(source)!r} ({error}); expected a MotionAdapter folder (config.json "
            f"and diffusion_pytorch_model.safetensors) or a hub id such as 'guoyww/animatediff-motion-adapter-v1-5-2'"
        ) from None
    if config.get("_class_name") != "MotionAdapter":
        raise ModelLoadError(
            f"{source} holds a {config.get('_class_name')!r}, not a MotionAdapter (an AnimateDiff motion module)"
        )
    return MotionAdapter.from_pretrained(str(source), **dtype_kwargs(torch_dtype), **kwargs)


def check_motion_adapter(adapter, unet_config: dict, unet_name: str) -> None:
    """Refuse a motion adapter that does not fit an SD UNet (``unet_config``), naming the field.

    diffusers' ``UNetMotionModel.from_unet2d`` checks the block and layer counts only; other
    mismatches surface as a size mismatch deep inside ``load_state_dict``.
    """
    config = adapter.config
    blocks = len(unet_config["block_out_channels"])

    def per_block(value):
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * blocks

    fields = {
        "block_out_channels": (tuple(config.block_out_channels), tuple(unet_config["block_out_channels"])),
        "layers per block": (per_block(config.motion_layers_per_block), per_block(unet_config["layers_per_block"])),
    }
    for name, (adapter_value, unet_value) in fields.items():
        if adapter_value != unet_value:
            raise ModelLoadError(
                f"the motion adapter does not fit {unet_name}: its {name} are {adapter_value}, the UNet's "
                f"{unet_value} (an adapter fits the SD version it was trained on, e.g. v1-5 adapters SD 1.x)"
            )
    if config.conv_in_channels:
        raise ModelLoadError("the motion adapter replaces the UNet's input convolution (PIA, image-to-video); "
                             "text-to-video AnimateDiff adapters do not")


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
        with self._encoding_prompts():
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
