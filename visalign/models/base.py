"""The Generator seam: one interface over every model family.

Every algorithm and pipeline in visalign talks to a :class:`Generator`. It hides whether the
model is a DDPM-family diffusion model (epsilon, v or sample prediction) or a rectified-flow
model (velocity), and which network (UNet or transformer) and text encoders it has. The
families (``sd``, ``sdxl``, ``sd3``) are thin subclasses built from diffusers pipelines.

Conventions (ALGORITHMS.md §0):

- Diffusion: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, ``t`` an integer in [0, T).
- Flow: ``x_s = (1 - s) x0 + s eps``, ``t`` is ``s`` in [0, 1] (1 is pure noise),
  velocity target ``v = eps - x0``.
- Images are float in [0, 1], ``[B, C, H, W]``. Latents are scaled (and shifted) as the
  model's VAE config says.
- Log-probabilities of stochastic steps are Gaussian log-densities averaged (not summed) over
  all latent elements, computed in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .errors import ModelLoadError
from ..token_cache import CachingTokenizer

DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TOKENIZER_COMPONENTS = ("tokenizer", "tokenizer_2", "tokenizer_3")  # diffusers pipelines' tokenizer slots


# --------------------------------------------------------------------------------------------
# Conditioning


@dataclass
class Cond:
    """Prompt conditioning of a batch. Slices, concatenates and repeats along the batch.

    Attributes:
        prompt_embeds: text states ``[B, L, D]``.
        pooled_embeds: pooled text embeddings ``[B, P]`` (SDXL, SD3), else ``None``.
        time_ids: SDXL micro-conditioning ``[B, 6]`` (original size, crop, target size).
        user_embeds: a personalisation embedding ``[B, U]`` (PPD), else ``None``.
    """

    prompt_embeds: Tensor
    pooled_embeds: Tensor | None = None
    time_ids: Tensor | None = None
    user_embeds: Tensor | None = None

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "Cond":
        return Cond(**{f.name: (None if v is None else fn(v)) for f, v in self._items()})

    def _items(self):
        return [(f, getattr(self, f.name)) for f in dataclasses.fields(self)]

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, index) -> "Cond":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda v: v[index])

    def repeat_interleave(self, repeats: int) -> "Cond":
        """Repeat each sample ``repeats`` times in place: ``[a, b] -> [a, a, b, b]``."""
        return self._map(lambda v: v.repeat_interleave(repeats, dim=0))

    def to(self, device=None, dtype=None) -> "Cond":
        def move(v: Tensor) -> Tensor:
            return v.to(device=device, dtype=dtype if v.is_floating_point() else None)

        return self._map(move)

    def detach(self) -> "Cond":
        return self._map(lambda v: v.detach())

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        """Concatenate along the batch. All parts must have the same optional fields set."""
        first = conds[0]
        values = {}
        for f, v in first._items():
            parts = [getattr(c, f.name) for c in conds]
            if v is None:
                if any(p is not None for p in parts):
                    raise ValueError(f"Cond.cat: field {f.name!r} is set in some parts and not in others")
                values[f.name] = None
            else:
                if any(p is None for p in parts):
                    raise ValueError(f"Cond.cat: field {f.name!r} is set in some parts and not in others")
                values[f.name] = torch.cat(parts, dim=0)
        return Cond(**values)


# --------------------------------------------------------------------------------------------
# Step and sample outputs


@dataclass
class StepOutput:
    """One sampler step.

    ``prev_sample`` is the next (less noisy) state. For a stochastic step, ``mean`` and ``std``
    are the Gaussian's parameters (``std`` broadcastable to the latents) and ``log_prob`` is
    its log-density of ``prev_sample`` averaged over latent elements, ``[B]`` in fp32. For a
    deterministic step (``eta == 0``) ``log_prob`` is ``None``.
    """

    prev_sample: Tensor
    x0_pred: Tensor
    mean: Tensor
    std: Tensor | None = None
    log_prob: Tensor | None = None


@dataclass
class StepState:
    """What a sampling hook sees after each step. A hook may return new latents (e.g. FK
    resampling) or ``None`` to keep them."""

    index: int
    num_steps: int
    t: Tensor
    t_next: Tensor
    latents: Tensor
    prev_latents: Tensor
    model_output: Tensor
    x0_pred: Tensor
    log_prob: Tensor | None
    cond: Cond


@dataclass
class Trajectory:
    """A sampled trajectory (stored detached unless the step carried gradient).

    ``latents``: ``[B, N + 1, ...]`` from pure noise to the final sample; ``timesteps`` and
    ``next_timesteps``: ``[N]``; ``log_probs``: ``[B, N]`` (``None`` for deterministic sampling).
    """

    latents: Tensor
    timesteps: Tensor
    next_timesteps: Tensor
    log_probs: Tensor | None


@dataclass
class SampleOutput:
    images: Tensor | list | None
    latents: Tensor
    trajectory: Trajectory | None = None
    cond: Cond | None = field(default=None, repr=False)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Gaussian log-density of ``x``, averaged over all non-batch elements, in fp32 → ``[B]``.

    The mean (not the sum) is deliberate (DDPO, Flow-GRPO, PRDP): summed log-probs over 16k
    latent elements overflow importance ratios, and the 1e-4 clip ranges are tuned for it.
    """
    x, mean, std = x.float(), mean.float(), std.float()
    log_prob = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    return log_prob.flatten(1).mean(dim=1) if log_prob.dim() > 1 else log_prob


def _broadcast(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample ``[B]`` (or scalar) tensor to broadcast against ``like``."""
    t = t.to(like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.dim() - 1)))


@contextlib.contextmanager
def _preserve_requires_grad(module: torch.nn.Module):
    """peft's enable/disable/set_adapter toggle ``requires_grad`` of adapter weights; undo that."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# --------------------------------------------------------------------------------------------
# The Generator


class Generator:
    """Base class of all families. See the module docstring for conventions.

    Build one with :func:`visalign.models.load_generator` (any family, detected from the
    folder) or a family's ``from_pretrained``/``from_single_file``.

    Attributes:
        pipe: the underlying diffusers pipeline (its components are shared, not copied).
        denoiser: the trainable network (``pipe.unet`` or ``pipe.transformer``).
        family: ``"sd"``, ``"sdxl"`` or ``"sd3"``.
        prediction_type: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow"``.
    """

    family: str = ""
    pipeline_class_names: tuple[str, ...] = ()
    denoiser_name: str = "unet"
    is_flow: bool = False
    is_video: bool = False  # video families (models/video.py): images are clips [B, F, C, H, W]

    def __init__(self, pipe, device: torch.device | str | None = None):
        self.pipe = pipe
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        if device is not None:
            pipe.to(device)
        self.denoiser = getattr(pipe, self.denoiser_name)
        _check_tokenizers(pipe)
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        for module in self._frozen_modules():
            module.requires_grad_(False)
            module.eval()
        self.denoiser.requires_grad_(False)
        self._is_reference = False
        self._reference_module: torch.nn.Module | None = None
        self._reference_adapter: str | None = None
        self._negative_cache: dict = {}
        self._forward_module: torch.nn.Module | None = None

    # ---------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        attention: str = "auto",
        **kwargs,
    ) -> "Generator":
        """Load from a diffusers folder or hub repo id (``model_index.json`` layout).

        ``attention``: ``"sdpa"`` (PyTorch scaled-dot-product attention, diffusers' default),
        ``"xformers"`` (needs xformers and CUDA), or ``"auto"`` (xformers when installed and on
        CUDA, else SDPA). Extra ``kwargs`` go to the pipeline's ``from_pretrained``
        (``variant``, ``revision``, ``local_files_only``, a component override, ...).
        """
        from .loading import detect_family, pipeline_class_for

        family = detect_family(path, **{k: kwargs[k] for k in ("revision", "local_files_only") if k in kwargs})
        cls._check_folder_family(path, family, kwargs)
        from .loading import read_model_index

        pipeline_class = pipeline_class_for(cls.family or family)
        # Components saved as null (SD3 without T5, no safety checker) must be passed as None.
        index = read_model_index(path, **{k: kwargs[k] for k in ("revision", "local_files_only") if k in kwargs})
        components = inspect.signature(pipeline_class.__init__).parameters
        absent = {name: None for name, spec in index.items()
                  if isinstance(spec, list) and spec[0] is None and name in components}
        load_kwargs = {**absent, **cls._load_kwargs(), **kwargs}
        from .loading import dtype_kwargs

        load_kwargs = {**dtype_kwargs(torch_dtype), **load_kwargs}
        pipe = pipeline_class.from_pretrained(path, **load_kwargs)
        generator = cls(pipe, device=device)
        generator.set_attention(attention)
        return generator

    @classmethod
    def _check_folder_family(cls, path: str | os.PathLike, family: str, kwargs: dict) -> None:
        """Refuse a folder whose ``model_index.json`` names another family (``family``);
        ``kwargs`` are the loading keywords (AnimateDiff takes an SD folder with a motion adapter)."""
        if cls.family and family != cls.family:
            raise ModelLoadError(
                f"{path} holds a {family!r} model, not {cls.family!r} (asked for family={cls.family!r}); load it "
                f"with visalign.models.load_generator({str(path)!r}) or the {family!r} family class"
            )

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        *,
        config: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        attention: str = "auto",
        **kwargs,
    ) -> "Generator":
        """Load an original-layout single ``.safetensors`` checkpoint (SD 1.x/2.x, SDXL, SD3).

        diffusers maps the checkpoint's keys onto its classes using a diffusers-layout config.
        With no hub access, pass ``config``: a local diffusers folder of the same architecture
        (e.g. a downloaded ``stable-diffusion-v1-5`` folder, or any folder with the same
        ``model_index.json`` and component configs; its scheduler and tokenizers are used, its
        weights are not needed).
        """
        from .loading import (
            dtype_kwargs,
            infer_single_file_family,
            is_hub_error,
            is_repo_id,
            pipeline_class_for,
            read_model_index,
            verify_single_file_pipeline,
        )

        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"single-file checkpoint {path} does not exist")
        if path.suffix not in (".safetensors", ".sft"):
            raise ModelLoadError(f"{path}: only .safetensors single-file checkpoints are loaded (no pickles)")
        family = infer_single_file_family(path)
        if family != cls.family:
            raise ModelLoadError(
                f"{path} holds a {family!r} checkpoint, not {cls.family!r}; load it with "
                f"visalign.models.load_generator({str(path)!r}) or the {family!r} family class"
            )
        pipeline_class = pipeline_class_for(cls.family)
        local_config = config is not None and Path(config).is_dir()
        if config is not None and not local_config and (Path(config).exists() or not is_repo_id(str(config))):
            raise ModelLoadError(
                f"{path}: config {str(config)!r} is not a folder; expected a local diffusers folder (with "
                f"model_index.json) of the same architecture, or a hub repo id"
            )
        if config is not None:
            kwargs["config"] = str(config)
            if local_config:
                # Components the config saves as null (SD3 without T5) must be passed as None.
                index = read_model_index(config)
                kwargs = {**{n: None for n, spec in index.items() if isinstance(spec, list) and spec[0] is None}, **kwargs}
        kwargs = {**dtype_kwargs(torch_dtype), **cls._load_kwargs(), **kwargs}
        try:
            pipe = pipeline_class.from_single_file(str(path), **kwargs)
        except Exception as error:
            if config is not None and not local_config and is_hub_error(error):
                raise ModelLoadError(
                    f"{path}: config {str(config)!r} is not a local folder and could not be fetched from the hub as a "
                    f"repo id ({type(error).__name__}); offline, give a local diffusers folder of the same architecture"
                ) from error
            if config is None and is_hub_error(error):
                raise ModelLoadError(
                    f"{path}: diffusers needs a diffusers-layout config of this architecture and could not fetch one "
                    f"from the hub ({type(error).__name__}); offline, pass config=<a local diffusers folder of the "
                    f"same architecture> (its weights are not needed; on the command line and in training configs: "
                    f"single_file_config=FOLDER)"
                ) from error
            raise
        verify_single_file_pipeline(pipe, path, cls.family)
        generator = cls(pipe, device=device)
        generator.set_attention(attention)
        return generator

    @classmethod
    def _load_kwargs(cls) -> dict:
        return {}

    def save_pretrained(self, path: str | os.PathLike, *, merge_lora: bool = True) -> Path:
        """Save the whole model as a diffusers folder (``from_pretrained`` reads it back).

        With LoRA adapters, ``merge_lora=True`` saves a copy of the denoiser with the active
        adapters merged into the base weights; the live model keeps its adapters.
        """
        path = Path(path)
        if self.has_adapters():
            if not merge_lora:
                raise ValueError("the denoiser has LoRA adapters: use save_lora(), or save_pretrained(merge_lora=True)")
            merged = copy.deepcopy(self.denoiser)
            merged.fuse_lora(adapter_names=list(merged.active_adapters()))
            merged.unload_lora()
            original = getattr(self.pipe, self.denoiser_name)
            setattr(self.pipe, self.denoiser_name, merged)
            try:
                self.pipe.save_pretrained(path, safe_serialization=True)
            finally:
                setattr(self.pipe, self.denoiser_name, original)
        else:
            self.pipe.save_pretrained(path, safe_serialization=True)
        return path

    def save_single_file(self, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                         title: str | None = None) -> Path:
        """Save the whole model as one original-layout ``.safetensors`` checkpoint, the format
        AUTOMATIC1111, ComfyUI and diffusers' ``from_single_file`` read. LoRA adapters are merged
        into the written weights; the live model keeps them. ``dtype``: ``"fp16"``, ``"bf16"``,
        ``"fp32"`` or ``None`` (the weights' own). See :mod:`visalign.models.export`."""
        from .export import export_single_file

        return export_single_file(self, path, dtype=dtype, title=title)

    # ---------------------------------------------------------------- devices, attention, memory

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def to(self, device=None, dtype=None) -> "Generator":
        self.pipe.to(device=device, dtype=dtype)
        if self._reference_module is not None:
            self._reference_module.to(device=device, dtype=dtype)
        self._negative_cache.clear()
        return self

    def set_attention(self, attention: str = "auto") -> None:
        """``"sdpa"`` (default processors), ``"xformers"`` or ``"auto"``."""
        if attention not in ("auto", "sdpa", "xformers"):
            raise ValueError(f"attention must be 'auto', 'sdpa' or 'xformers', got {attention!r}")
        on_cuda = self.device.type == "cuda"
        if attention == "auto":
            from diffusers.utils import is_xformers_available

            attention = "xformers" if (on_cuda and is_xformers_available()) else "sdpa"
        if attention == "xformers":
            if not on_cuda:
                raise RuntimeError("xformers attention needs a CUDA device; use attention='sdpa'")
            self.pipe.enable_xformers_memory_efficient_attention()

    def enable_gradient_checkpointing(self, denoiser: bool = True, vae: bool = True) -> None:
        """Recompute activations in backward: the denoiser's blocks and the VAE decoder's."""
        if denoiser:
            self.denoiser.enable_gradient_checkpointing()
        if vae and hasattr(self.vae, "enable_gradient_checkpointing"):
            self.vae.enable_gradient_checkpointing()

    def _frozen_modules(self) -> list[torch.nn.Module]:
        names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipe, n, None) for n in names) if isinstance(m, torch.nn.Module)]

    # ---------------------------------------------------------------- sizes

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    @property
    def default_resolution(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale_factor

    def latent_shape(self, batch_size: int, height: int | None = None, width: int | None = None) -> tuple:
        height = height or self.default_resolution
        width = width or self.default_resolution
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this VAE, got {height}x{width}")
        return (batch_size, self.latent_channels, height // f, width // f)

    # ---------------------------------------------------------------- prompts

    def encode_prompt(self, prompts: str | Sequence[str]) -> Cond:
        """Encode prompts with the frozen text encoders → :class:`Cond` of batch ``len(prompts)``."""
        raise NotImplementedError

    def negative_cond(self, batch_size: int, negative_prompt: str = "") -> Cond:
        """The unconditional (empty- or negative-prompt) conditioning, cached, repeated to ``batch_size``."""
        if getattr(self, "_text_encoders_trainable", False):  # changes every step: never cache
            return self._encode_negative(negative_prompt).repeat_interleave(batch_size)
        key = (negative_prompt, self.device, self.dtype)
        if key not in self._negative_cache:
            self._negative_cache[key] = self._encode_negative(negative_prompt)
        return self._negative_cache[key].repeat_interleave(batch_size)

    def _encode_negative(self, negative_prompt: str) -> Cond:
        return self.encode_prompt([negative_prompt])

    # ---------------------------------------------------------------- VAE

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → scaled latents ``[B, C, h, w]``.

        ``sample=True`` draws from the VAE posterior as the reference training scripts do;
        ``sample=False`` takes its mode.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        pixels = images.to(device=self.vae.device, dtype=self.vae.dtype) * 2 - 1
        dist = self.vae.encode(pixels).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents → images ``[B, 3, H, W]`` in [0, 1]. Differentiable in the latents."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        images = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (images / 2 + 0.5).clamp(0, 1)

    # ---------------------------------------------------------------- the noise process (family math)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Training timesteps ``[n]``: integers for diffusion, ``s`` in (0, 1) for flow."""
        raise NotImplementedError

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target of this family at ``t``: noise, v, sample, or velocity."""
        raise NotImplementedError

    def predict_x0(self, x_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        raise NotImplementedError

    #: spaces :meth:`error_weight` converts to (diffusers' ``prediction_type`` names; ``flow``: velocity)
    ERROR_SPACES: tuple[str, ...] = ()

    def error_weight(self, t: Tensor, space: str = "native") -> Tensor:
        """Per-sample factor ``[B]`` turning a squared error of the denoiser's own output at ``t``
        into the squared error of the same prediction read in ``space``.

        ``"native"`` is 1. ``"sample"`` measures the error of the implied clean latent ``x0``: for
        an epsilon model it is ``(1 - abar_t) / abar_t``, which weights the high-noise steps where a
        sample's layout and global colour are decided (an epsilon error there barely shows, since
        ``x_t`` is almost the noise itself). Used by the pairwise objectives' ``error_space``.
        """
        raise NotImplementedError

    def predict_noise(self, x_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        raise NotImplementedError

    def sampling_timesteps(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """``(timesteps, next_timesteps)``, each ``[num_steps]``, for a sampling run."""
        raise NotImplementedError

    def noise_level(self, t: Tensor) -> Tensor:
        """Timesteps ``t`` as a fraction of the noise process: ``t / num_train_timesteps`` for
        diffusion families, ``sigma`` itself for flow families."""
        raise NotImplementedError

    def start_index(self, num_steps: int, strength: float) -> int:
        """The index of the ``num_steps`` sampling grid's timestep whose noise level is nearest
        ``strength`` (in (0, 1]): where a partial chain starts (:meth:`sample`'s ``start_step``).

        On SD's 20-step DDIM grid (951, 901, ..., 1) strength 0.6 gives index 7, timestep 601
        (InstructVideo's ``t_tau``); on a flow grid, the sigma nearest 0.6.
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        timesteps, _ = self.sampling_timesteps(num_steps)
        return int((self.noise_level(timesteps) - strength).abs().argmin())

    def step(
        self,
        x_t: Tensor,
        t: Tensor,
        t_next: Tensor,
        model_output: Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        prev_sample: Tensor | None = None,
    ) -> StepOutput:
        """One sampler step from ``t`` to ``t_next``.

        With ``eta > 0`` the step is a Gaussian (DDIM with ``eta`` for diffusion; the flow SDE of
        ALGORITHMS.md §7.2 with noise level ``eta`` for flow) and ``log_prob`` is exact. Pass a
        stored ``prev_sample`` to re-evaluate its log-probability under the current weights.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- the denoiser

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The denoiser's output for ``x_t`` at ``t`` (``[B]`` or scalar). Trainable unless this is
        the reference view, which runs without gradient."""
        if self._is_reference:
            with torch.no_grad(), self._reference_denoiser() as denoiser:
                return self._denoise(denoiser, x_t, t, cond)
        module = self._forward_module if self._forward_module is not None else self.denoiser
        return self._denoise(module, x_t, t, cond)

    def set_forward_module(self, module: torch.nn.Module | None) -> None:
        """Route the policy's forward calls through ``module`` (e.g. the DDP wrapper of the
        denoiser made by ``accelerator.prepare``); ``None`` goes back to the bare denoiser."""
        self._forward_module = module

    def micro_conditioning(self, cond: Cond, original_sizes: Tensor | None, crop_top_lefts: Tensor | None,
                           height: int, width: int) -> Cond:
        """Training-time size/crop conditioning from the data (SDXL time ids); others: unchanged."""
        return cond

    def _denoise(self, denoiser: torch.nn.Module, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    def _timestep_batch(self, t: Tensor | float | int, batch_size: int) -> Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.dim() == 0:
            t = t.expand(batch_size)
        if t.shape[0] != batch_size:
            raise ValueError(f"got {t.shape[0]} timesteps for a batch of {batch_size}")
        return t

    # ---------------------------------------------------------------- reference policy

    def reference(self) -> "Generator":
        """The frozen reference policy as a Generator view that shares every module.

        - LoRA run: the same network with adapters disabled (no second copy in memory).
        - Full fine-tuning: the frozen copy taken by :meth:`enable_full_finetuning`.
        - After :meth:`set_reference`: an earlier checkpoint (LoRA adapter or full weights).

        Its :meth:`predict` runs under ``torch.no_grad()``; everything else (``step``,
        ``sample``, ...) works as on the policy.
        """
        if self._is_reference:
            return self
        if (
            self._reference_module is None
            and self._reference_adapter is None
            and not self.has_adapters()
            and any(p.requires_grad for p in self.denoiser.parameters())
        ):
            raise RuntimeError(
                "the denoiser is being fully fine-tuned but no frozen reference exists: call "
                "enable_full_finetuning() (which snapshots one) or set_reference(path)"
            )
        view = copy.copy(self)
        view._is_reference = True
        return view

    @contextlib.contextmanager
    def _reference_denoiser(self):
        if self._reference_module is not None:
            yield self._reference_module
        elif self._reference_adapter is not None:
            active = list(self.denoiser.active_adapters())
            with _preserve_requires_grad(self.denoiser):
                self.denoiser.set_adapter(self._reference_adapter)
                try:
                    yield self.denoiser
                finally:
                    self.denoiser.set_adapter(active)
        elif self.has_adapters():
            with _preserve_requires_grad(self.denoiser):
                self.denoiser.disable_adapters()
                try:
                    yield self.denoiser
                finally:
                    self.denoiser.enable_adapters()
        else:
            yield self.denoiser

    def set_reference(self, source: str | os.PathLike | dict | None) -> None:
        """Use an earlier checkpoint as the reference (SePPO's pool, PRDP, DRO).

        ``source``: a LoRA file/folder in diffusers format or a LoRA state dict (loaded as an
        inactive adapter named ``"reference"``; needs a LoRA run); a diffusers model folder
        (its denoiser is loaded frozen); or ``None`` to go back to the default reference.

        A state dict is read as a snapshot of this run's adapter (``lora_state_dict()``): it
        loads with the active adapter's rank, alpha and target modules, so the reference is the
        policy as it was, whatever its ``alpha / rank``. A file or folder carries its own
        (``save_lora`` writes them).
        """
        self._drop_reference()
        if source is None:
            return
        if isinstance(source, dict) or _looks_like_lora(source):
            if not self.has_adapters():
                raise ValueError("a LoRA reference needs a LoRA run: call add_lora() first")
            active = list(self.denoiser.active_adapters())
            with _preserve_requires_grad(self.denoiser):
                if isinstance(source, dict):
                    state, metadata = source, self.denoiser.peft_config[active[0]].to_dict()
                else:
                    state, metadata = _read_lora_file(self, source)
                self.denoiser.load_lora_adapter(state, adapter_name="reference", prefix=None, metadata=metadata)
                self.denoiser.set_adapter(active)
            for name, p in self.denoiser.named_parameters():
                if ".reference." in name:
                    p.requires_grad_(False)
            self._reference_adapter = "reference"
            return
        path = Path(source)
        subfolder = path / self.denoiser_name
        if not (subfolder / "config.json").exists():
            raise ModelLoadError(
                f"{path} is neither a LoRA checkpoint nor a diffusers model folder with a "
                f"'{self.denoiser_name}/' subfolder"
            )
        from .loading import dtype_kwargs

        module = type(self.denoiser).from_pretrained(subfolder, **dtype_kwargs(self.dtype)).to(self.device)
        module.requires_grad_(False).eval()
        self._reference_module = module

    def _drop_reference(self) -> None:
        self._reference_module = None
        if self._reference_adapter is not None:
            self.denoiser.delete_adapters(self._reference_adapter)
            self._reference_adapter = None

    # ---------------------------------------------------------------- training set-up

    def has_adapters(self) -> bool:
        return bool(getattr(self.denoiser, "_hf_peft_config_loaded", False)) and bool(
            [a for a in getattr(self.denoiser, "peft_config", {}) if a != "reference"]
        )

    def add_lora(
        self,
        rank: int = 4,
        alpha: float | None = None,
        target_modules: Iterable[str] = DEFAULT_LORA_TARGETS,
        dropout: float = 0.0,
        init_lora_weights: bool | str = "gaussian",
        adapter_name: str = "default",
    ) -> list[torch.nn.Parameter]:
        """Add trainable LoRA adapters to the (frozen) denoiser; return the trainable parameters.

        LoRA is zero-initialised on its up-projection, so the policy starts equal to the base
        model, and the reference is the same network with adapters disabled.
        """
        from peft import LoraConfig

        self.denoiser.requires_grad_(False)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            lora_dropout=dropout,
            init_lora_weights=init_lora_weights,
            target_modules=list(target_modules),
        )
        self.denoiser.add_adapter(config, adapter_name=adapter_name)
        self.denoiser.set_adapter(adapter_name)
        return self.trainable_parameters()

    def enable_full_finetuning(self, snapshot_reference: bool = True) -> list[torch.nn.Parameter]:
        """Make every denoiser weight trainable; snapshot a frozen copy as the reference."""
        if snapshot_reference and self._reference_module is None:
            reference = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
            self._reference_module = reference
        self.denoiser.requires_grad_(True)
        return self.trainable_parameters()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders by component name (``text_encoder``, ``text_encoder_2``, ...)."""
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return {name: getattr(self.pipe, name) for name in names if getattr(self.pipe, name, None) is not None}

    def enable_text_encoder_training(self) -> dict[str, torch.nn.Parameter]:
        """Make every text-encoder weight trainable (as diffusers' ``--train_text_encoder``):
        :meth:`encode_prompt` then builds a graph and the empty-prompt conditioning is no longer
        cached. Returns the parameters by ``component.parameter`` name."""
        parameters = {}
        for component, encoder in self.text_encoders.items():
            encoder.requires_grad_(True).train()
            parameters.update({f"{component}.{n}": p for n, p in encoder.named_parameters()})
        self._text_encoders_trainable = True
        self._negative_cache.clear()
        return parameters

    @contextlib.contextmanager
    def _encoding_prompts(self):
        """The context of every prompt encoding: gradient off unless the text encoders are being
        trained, and the pipeline's tokenizers behind a :class:`CachingTokenizer` each (the same
        ids, each distinct prompt tokenised once per generator; the real tokenizers are back in
        the pipeline afterwards)."""
        caches = self.__dict__.setdefault("_token_caches", {})
        swapped = []
        for name in TOKENIZER_COMPONENTS:
            tokenizer = getattr(self.pipe, name, None)
            if tokenizer is None or isinstance(tokenizer, CachingTokenizer):
                continue
            cache = caches.get(name)
            if cache is None or cache.tokenizer is not tokenizer:  # new, or the pipeline's tokenizer was replaced
                cache = caches[name] = CachingTokenizer(tokenizer)
            # Not setattr: a diffusers pipeline records a component's class in its config on setattr.
            object.__setattr__(self.pipe, name, cache)
            swapped.append((name, tokenizer))
        try:
            with contextlib.nullcontext() if getattr(self, "_text_encoders_trainable", False) else torch.no_grad():
                yield
        finally:
            for name, tokenizer in swapped:
                object.__setattr__(self.pipe, name, tokenizer)

    def load_lora(self, path: str | os.PathLike, adapter_name: str = "default", trainable: bool = False) -> None:
        """Load diffusers-format LoRA weights (as written by :meth:`save_lora` or any trainer
        whose output ``pipe.load_lora_weights`` reads) into the denoiser."""
        state, metadata = _read_lora_file(self, path)
        self.denoiser.load_lora_adapter(state, adapter_name=adapter_name, prefix=None, metadata=metadata)
        self.denoiser.set_adapter(adapter_name)
        for name, p in self.denoiser.named_parameters():
            if "lora_" in name and f".{adapter_name}." in name:
                p.requires_grad_(trainable)

    def lora_state_dict(self, adapter_name: str = "default") -> dict[str, Tensor]:
        """The adapter's weights in diffusers' key layout (what ``save_lora_weights`` writes)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        if not self.has_adapters():
            raise ValueError("the denoiser has no LoRA adapters")
        state = get_peft_model_state_dict(self.denoiser, adapter_name=adapter_name)
        return convert_state_dict_to_diffusers(state)

    def save_lora(self, path: str | os.PathLike, adapter_name: str = "default") -> Path:
        """Write the adapter in the diffusers format read by ``pipe.load_lora_weights(path)``."""
        path = Path(path)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.lora_state_dict(adapter_name).items()}
        config = self.denoiser.peft_config[adapter_name].to_dict()
        self._save_lora_weights(path, state, config)
        return path

    def _save_lora_weights(self, path: Path, state: dict, config: dict) -> None:
        pipeline_class = type(self.pipe)
        pipeline_class.save_lora_weights(
            path,
            **{f"{self.denoiser_name}_lora_layers": state, f"{self.denoiser_name}_lora_adapter_metadata": config},
        )

    # ---------------------------------------------------------------- sampling

    def sample(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        cond: Cond | None = None,
        negative_prompt: str = "",
        negative_cond: Cond | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        eta: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        start_step: int = 0,
        grad_steps: str | Iterable[int] | Callable[[int], bool] | None = None,
        return_trajectory: bool = False,
        output_type: str = "pt",
        on_model_output: Callable[[StepState], Tensor | None] | None = None,
        on_step_end: Callable[[StepState], Tensor | None] | None = None,
        progress: bool = False,
    ) -> SampleOutput:
        """Sample images.

        Args:
            prompts / cond: prompts, or an already encoded :class:`Cond` (batch ``B``).
            guidance_scale: classifier-free guidance; ``<= 1`` runs no unconditional pass.
            eta: stochasticity (DDIM eta for diffusion, SDE noise level for flow). ``eta > 0``
                gives per-step log-probabilities in the trajectory.
            generator: seeds the initial noise and the stochastic steps (same order as diffusers
                pipelines draw them, so a seed gives the same image as the plain pipeline).
            latents: the starting state (default: noise drawn from ``generator``).
            start_step: begin at step index ``start_step`` of the ``num_inference_steps`` grid,
                with ``latents`` (required then) already noised to that step's timestep, e.g.
                ``add_noise(x0, noise, sampling_timesteps(N)[0][start_step])``: the partial chain
                of SDEdit-style editing and InstructVideo (:meth:`start_index` finds the index of
                a noise level). Step indices in ``grad_steps`` and hooks stay indices of the full
                grid; a returned trajectory holds only the steps run.
            grad_steps: which step indices (0 = first, noisiest) run the denoiser with gradient:
                ``None`` (no gradient anywhere), ``"all"``, an iterable of indices, or a
                predicate. Gradient then flows through those steps into the final latents and
                the decoded images (reward-gradient methods: DRaFT, AlignProp).
            on_model_output: hook called with the guided model output in ``state.model_output``
                (``state.latents`` is still ``x_t``); may return a replacement output (guidance).
            on_step_end: hook called after each step with ``state.latents`` the new state; may
                return replacement latents (e.g. Feynman-Kac resampling).
            output_type: ``"pt"`` (images in [0, 1]), ``"pil"``, or ``"latent"`` (no decode).
        """
        if cond is None:
            if prompts is None:
                raise ValueError("sample() needs prompts or cond")
            if isinstance(prompts, str):
                prompts = [prompts]
            with torch.no_grad():
                cond = self._cond_for_size(self.encode_prompt(list(prompts)), height, width)
        cond = cond.repeat_interleave(num_images_per_prompt) if num_images_per_prompt > 1 else cond
        batch_size = len(cond)
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            if negative_cond is None:
                with torch.no_grad():
                    negative_cond = self._cond_for_size(self.negative_cond(1, negative_prompt), height, width)
            if len(negative_cond) == 1:
                negative_cond = negative_cond.repeat_interleave(batch_size)
            if cond.time_ids is not None:  # both halves of guidance share the size conditioning
                negative_cond = dataclasses.replace(negative_cond, time_ids=cond.time_ids)
            model_cond = Cond.cat([negative_cond, cond])
        else:
            model_cond = cond

        from diffusers.utils.torch_utils import randn_tensor

        shape = self.latent_shape(batch_size, height, width)
        if not 0 <= start_step < num_inference_steps:
            raise ValueError(f"start_step must lie in [0, num_inference_steps={num_inference_steps}), got {start_step}")
        if start_step and latents is None:
            raise ValueError("start_step > 0 continues a partly denoised state: pass `latents` noised to that step")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
            latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        timesteps, next_timesteps = self.sampling_timesteps(num_inference_steps)
        with_grad = _grad_step_predicate(grad_steps)

        states = [latents.detach()] if return_trajectory else None
        log_probs = [] if (return_trajectory and eta > 0) else None
        iterator = range(start_step, num_inference_steps)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="sampling", leave=False)
        for index in iterator:
            t, t_next = timesteps[index], next_timesteps[index]
            grad_here = with_grad(index)
            with torch.set_grad_enabled(grad_here):
                out = self._guided(latents, t, model_cond, guidance_scale if do_cfg else None)
                if on_model_output is not None:
                    state = StepState(index, num_inference_steps, t, t_next, latents, latents, out, None, None, cond)
                    replaced = on_model_output(state)
                    out = out if replaced is None else replaced
                result = self.step(latents, t, t_next, out, eta=eta, generator=generator)
            previous, latents = latents, result.prev_sample
            if on_step_end is not None:
                state = StepState(
                    index, num_inference_steps, t, t_next, latents, previous, out, result.x0_pred, result.log_prob, cond
                )
                replaced = on_step_end(state)
                latents = latents if replaced is None else replaced
            if states is not None:
                states.append(latents.detach())
            if log_probs is not None:
                log_probs.append(result.log_prob.detach())

        trajectory = None
        if return_trajectory:
            trajectory = Trajectory(
                latents=torch.stack(states, dim=1),
                timesteps=timesteps[start_step:],
                next_timesteps=next_timesteps[start_step:],
                log_probs=torch.stack(log_probs, dim=1) if log_probs is not None else None,
            )
        if output_type == "latent":
            images = None
        else:
            with torch.set_grad_enabled(latents.requires_grad):
                images = self.decode(latents)
            if output_type == "pil":
                images = to_pil(images)
            elif output_type != "pt":
                raise ValueError(f"output_type must be 'pt', 'pil' or 'latent', got {output_type!r}")
        return SampleOutput(images=images, latents=latents, trajectory=trajectory, cond=cond)

    def _guided(self, x_t: Tensor, t: Tensor, model_cond: Cond, guidance_scale: float | None) -> Tensor:
        """One batched denoiser call; with ``guidance_scale``, ``model_cond`` is ``[negative; cond]``."""
        if guidance_scale is None:
            return self.predict(x_t, self._timestep_batch(t, x_t.shape[0]), model_cond)
        model_input = torch.cat([x_t] * 2)
        t = torch.as_tensor(t, device=self.device)
        if t.dim() == 1 and t.shape[0] == x_t.shape[0]:  # one timestep per sample: both halves share it
            t = torch.cat([t, t])
        out_uncond, out_text = self.predict(model_input, self._timestep_batch(t, model_input.shape[0]), model_cond).chunk(2)
        return out_uncond + guidance_scale * (out_text - out_uncond)

    def guided_prediction(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: Cond,
        guidance_scale: float = 1.0,
        negative_cond: Cond | None = None,
    ) -> Tensor:
        """The (classifier-free guided) model output at ``x_t``, as :meth:`sample` computes it.

        ``t``: one timestep for the batch or one per sample (``[B]``; replayed trajectories mix
        steps). Training objectives that re-evaluate a sampled step (DDPO, PRDP, Flow-GRPO) use this so
        the output they differentiate is the one the sampler used.
        """
        if guidance_scale <= 1.0:
            return self._guided(x_t, t, cond, None)
        if negative_cond is None:
            with torch.no_grad():
                negative_cond = self.negative_cond(1)
        if len(negative_cond) == 1:
            negative_cond = negative_cond.repeat_interleave(len(cond))
        if cond.time_ids is not None:
            negative_cond = dataclasses.replace(negative_cond, time_ids=cond.time_ids)
        return self._guided(x_t, t, Cond.cat([negative_cond, cond]), guidance_scale)

    def step_log_prob(
        self,
        x_t: Tensor,
        t: Tensor,
        t_next: Tensor,
        prev_sample: Tensor,
        cond: Cond,
        eta: float,
        guidance_scale: float = 1.0,
        negative_cond: Cond | None = None,
    ) -> StepOutput:
        """Re-evaluate a stored transition ``x_t -> prev_sample`` under the current weights.

        Returns the step's Gaussian (``mean``, ``std``) and ``log_prob`` ``[B]``, differentiable
        in the denoiser's trainable weights (and no-grad on the reference view).
        """
        out = self.guided_prediction(x_t, t, cond, guidance_scale, negative_cond)
        return self.step(x_t, t, t_next, out, eta=eta, prev_sample=prev_sample)

    def _cond_for_size(self, cond: Cond, height: int | None, width: int | None) -> Cond:
        """Hook for families whose conditioning depends on the output size (SDXL time ids)."""
        return cond


def _check_tokenizers(pipe) -> None:
    """A tokenizer folder without its vocabulary loads without error in transformers and maps every
    word to one id, which silently makes every prompt the same; refuse it by name."""
    for suffix in ("", "_2"):
        tokenizer = getattr(pipe, f"tokenizer{suffix}", None)
        encoder = getattr(pipe, f"text_encoder{suffix}", None)
        if tokenizer is None or encoder is None:
            continue
        expected = getattr(encoder.config, "vocab_size", None)
        if expected and len(tokenizer) < expected // 2:
            raise ModelLoadError(
                f"tokenizer{suffix} has {len(tokenizer)} tokens but text_encoder{suffix} has a vocabulary of "
                f"{expected}: the tokenizer folder is incomplete (no tokenizer.json, or vocab.json + merges.txt)"
            )


def _grad_step_predicate(grad_steps) -> Callable[[int], bool]:
    if grad_steps is None:
        return lambda index: False
    if grad_steps == "all":
        return lambda index: True
    if callable(grad_steps):
        return grad_steps
    chosen = set(int(i) for i in grad_steps)
    return lambda index: index in chosen


def to_pil(images: Tensor) -> list:
    """Images ``[B, 3, H, W]`` in [0, 1] → list of PIL images (rounded as diffusers does)."""
    from PIL import Image

    arrays = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def _looks_like_lora(source) -> bool:
    path = Path(source)
    if path.is_file():
        return path.suffix == ".safetensors"
    return (path / "pytorch_lora_weights.safetensors").exists()


def _read_lora_file(generator: Generator, source) -> tuple[dict[str, Tensor], dict | None]:
    """Read a diffusers-format LoRA file or folder: the denoiser's weights and adapter metadata
    (rank, alpha, targets, as :meth:`Generator.save_lora` writes them), prefixes stripped.

    Without the metadata, peft would assume ``alpha = rank`` and a LoRA saved with another alpha
    would load at the wrong scale."""
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"LoRA checkpoint {path} does not exist")
    pipeline_class = type(generator.pipe)
    try:
        loaded = pipeline_class.lora_state_dict(str(path), return_lora_metadata=True)
        state, metadata = loaded[0], loaded[-1]
    except TypeError:  # diffusers before 0.34 keeps no adapter metadata
        loaded = pipeline_class.lora_state_dict(str(path))
        state, metadata = (loaded[0] if isinstance(loaded, tuple) else loaded), None
    prefix = generator.denoiser_name + "."
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        raise ModelLoadError(f"{path} holds no LoRA weights for the {generator.denoiser_name} (keys start with {sorted(state)[:3]})")
    own_metadata = {k[len(prefix) :]: v for k, v in (metadata or {}).items() if k.startswith(prefix)} or None
    return own, own_metadata
