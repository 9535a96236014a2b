"""DDPM-family diffusion generators: Stable Diffusion 1.x/2.x (epsilon or v) and SDXL.

Sampling uses DDIM (the scheduler's ``alphas_cumprod`` and timestep spacing), whatever
scheduler the checkpoint ships, because DDIM with ``eta`` is the step whose Gaussian
log-probability DDPO/PRDP need (ALGORITHMS.md §7.1). With ``eta = 0`` it is the diffusers
``DDIMScheduler.step``, so a seed gives the image a plain diffusers pipeline gives with a
``DDIMScheduler``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import Tensor

from .base import Cond, Generator, StepOutput, _broadcast, gaussian_log_prob


def _user_kwargs(denoiser, cond: Cond) -> dict | None:
    """``Cond.user_embeds`` reach a UNet with a PPD user branch (visalign.algorithms.ppd) as a
    cross-attention keyword; without one they would be silently ignored, so refuse them."""
    if cond.user_embeds is None:
        return None
    if not hasattr(getattr(denoiser, "module", denoiser), "user_projection"):
        raise ValueError("the conditioning has user_embeds but the UNet has no PPD user branch "
                         "(visalign.algorithms.ppd.add_user_branch / load_user_branch)")
    return {"user_embeds": cond.user_embeds}


class DiffusionGenerator(Generator):
    """Shared DDPM math: ``x_t = a_t x0 + s_t eps`` with ``a_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)``."""

    def __init__(self, pipe, device=None):
        from diffusers import DDIMScheduler

        super().__init__(pipe, device=device)
        self.ddim = DDIMScheduler.from_config(self.scheduler.config)
        self.prediction_type = self.ddim.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler config")
        self.alphas_cumprod = self.ddim.alphas_cumprod.to(torch.float32)
        self.final_alpha_cumprod = float(self.ddim.final_alpha_cumprod)
        self.num_train_timesteps = self.ddim.config.num_train_timesteps
        self._abar_tables: dict[torch.device, Tensor] = {}

    # ---------------------------------------------------------------- coefficients

    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        """``abar`` at integer timesteps ``t`` (``t < 0`` means the final step's alpha), shaped like ``like``."""
        table = self._abar_tables.get(like.device)
        if table is None:  # [final_alpha, abar_0, ..., abar_{T-1}], kept on each device used
            final = torch.tensor([self.final_alpha_cumprod], dtype=torch.float32)
            table = self._abar_tables[like.device] = torch.cat([final, self.alphas_cumprod]).to(like.device)
        t = torch.as_tensor(t, device=like.device).long()
        if t.dim() == 0:
            t = t.expand(like.shape[0])
        return _broadcast(table[t.clamp(min=-1) + 1], like)

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        abar = self._abar(t, like)
        return abar.sqrt(), (1 - abar).sqrt()

    # ---------------------------------------------------------------- noise process

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device)
        return t.to(self.device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = self._coefficients(t, x0)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        a, s = self._coefficients(t, x0)
        return (a * noise.float() - s * x0.float()).to(x0.dtype)

    def _x0_and_noise(self, x_t: Tensor, out: Tensor, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        if self.prediction_type == "epsilon":
            return (x_t - s * out) / a, out
        if self.prediction_type == "v_prediction":
            return a * x_t - s * out, a * out + s * x_t
        return out, (x_t - a * out) / s

    ERROR_SPACES = ("native", "epsilon", "v_prediction", "sample")

    def error_weight(self, t: Tensor, space: str = "native") -> Tensor:
        # With x_t fixed, an error d in x0 is an error (a/s) d in eps and d/s in v; each space's
        # squared gain over x0's, divided by the native one's, converts native errors to it.
        if space not in self.ERROR_SPACES:
            raise ValueError(f"error space must be one of {self.ERROR_SPACES}, got {space!r}")
        t = torch.as_tensor(t, device=self.device).reshape(-1)
        abar = self._abar(t, t.float())
        if space == "native":
            return torch.ones_like(abar)
        gain = {"sample": torch.ones_like(abar), "epsilon": abar / (1 - abar), "v_prediction": 1 / (1 - abar)}
        return gain[space] / gain[self.prediction_type]

    def predict_x0(self, x_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        a, s = self._coefficients(t, x_t)
        return self._x0_and_noise(x_t.float(), model_output.float(), a, s)[0].to(model_output.dtype)

    def predict_noise(self, x_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        a, s = self._coefficients(t, x_t)
        return self._x0_and_noise(x_t.float(), model_output.float(), a, s)[1].to(model_output.dtype)

    # ---------------------------------------------------------------- sampling

    def sampling_timesteps(self, num_steps: int) -> tuple[Tensor, Tensor]:
        self.ddim.set_timesteps(num_steps)
        timesteps = self.ddim.timesteps.clone()
        # DDIM's previous timestep is t - T / N, with t < 0 meaning "final alpha" (diffusers, DDPO).
        next_timesteps = timesteps - self.num_train_timesteps // num_steps
        return timesteps, next_timesteps

    def noise_level(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t).float() / self.num_train_timesteps

    def step(self, x_t, t, t_next, model_output, eta=0.0, generator=None, prev_sample=None) -> StepOutput:
        """DDIM step with ``eta`` (ALGORITHMS.md §7.1); exact Gaussian log-prob when ``eta > 0``."""
        dtype = model_output.dtype
        abar_t = self._abar(t, x_t)
        abar_prev = self._abar(t_next, x_t)
        x0, eps = self._x0_and_noise(x_t.float(), model_output.float(), abar_t.sqrt(), (1 - abar_t).sqrt())
        if self.ddim.config.clip_sample:
            limit = self.ddim.config.clip_sample_range
            x0 = x0.clamp(-limit, limit)
            eps = (x_t.float() - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        std = eta * variance.sqrt()
        mean = abar_prev.sqrt() * x0 + (1 - abar_prev - std**2).clamp(min=0).sqrt() * eps
        if eta <= 0:
            if prev_sample is not None:
                raise ValueError("a deterministic step (eta=0) has no log-probability to re-evaluate")
            return StepOutput(prev_sample=mean.to(dtype), x0_pred=x0.to(dtype), mean=mean.to(dtype))
        if prev_sample is None:
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=dtype)
            prev_sample = (mean + std * noise.float()).to(dtype)
        log_prob = gaussian_log_prob(prev_sample, mean, std)
        return StepOutput(prev_sample=prev_sample, x0_pred=x0.to(dtype), mean=mean, std=std, log_prob=log_prob)


class StableDiffusionGenerator(DiffusionGenerator):
    """Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): one CLIP text encoder, a UNet,
    epsilon or v prediction as the scheduler config says."""

    family = "sd"
    pipeline_class_names = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")

    @classmethod
    def _load_kwargs(cls) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}

    def encode_prompt(self, prompts: str | Sequence[str]) -> Cond:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._encoding_prompts():
            prompt_embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return Cond(prompt_embeds=prompt_embeds.to(self.dtype))

    def _denoise(self, denoiser, x_t, t, cond):
        t = self._timestep_batch(t, x_t.shape[0])
        return denoiser(x_t.to(self.dtype), t, encoder_hidden_states=cond.prompt_embeds,
                        cross_attention_kwargs=_user_kwargs(denoiser, cond), return_dict=False)[0]


class StableDiffusionXLGenerator(DiffusionGenerator):
    """SDXL (``StableDiffusionXLPipeline``): two text encoders (penultimate states concatenated),
    pooled embeddings of the second, and size/crop micro-conditioning (time ids)."""

    family = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")

    def encode_prompt(self, prompts: str | Sequence[str], height: int | None = None, width: int | None = None) -> Cond:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._encoding_prompts():
            prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        cond = Cond(prompt_embeds=prompt_embeds.to(self.dtype), pooled_embeds=pooled.to(self.dtype))
        return self._cond_for_size(cond, height, width)

    def _encode_negative(self, negative_prompt: str) -> Cond:
        # With force_zeros_for_empty_prompt (the SDXL base config), the empty negative is zeros.
        with self._encoding_prompts():
            _, negative, _, negative_pooled = self.pipe.encode_prompt(
                [negative_prompt or ""],
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative_prompt or None,
            )
        return self._cond_for_size(Cond(prompt_embeds=negative.to(self.dtype), pooled_embeds=negative_pooled.to(self.dtype)), None, None)

    def time_ids(self, height: int | None, width: int | None, batch_size: int) -> Tensor:
        size = (height or self.default_resolution, width or self.default_resolution)
        projection_dim = (
            self.pipe.text_encoder_2.config.projection_dim if self.pipe.text_encoder_2 is not None else None
        )
        ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=self.dtype, text_encoder_projection_dim=projection_dim)
        return ids.to(self.device).repeat(batch_size, 1)

    def _cond_for_size(self, cond: Cond, height, width) -> Cond:
        return dataclasses.replace(cond, time_ids=self.time_ids(height, width, len(cond)))

    def micro_conditioning(self, cond, original_sizes, crop_top_lefts, height, width):
        # SDXL time ids: (original h, w, crop top, left, target h, w) per sample, as in
        # diffusers' SDXL training scripts.
        if original_sizes is None:
            return self._cond_for_size(cond, height, width)
        crops = crop_top_lefts if crop_top_lefts is not None else torch.zeros_like(original_sizes)
        target = torch.tensor([height, width], device=original_sizes.device).expand_as(original_sizes)
        ids = torch.cat([original_sizes, crops, target], dim=1).to(device=self.device, dtype=self.dtype)
        return dataclasses.replace(cond, time_ids=ids)

    def _denoise(self, denoiser, x_t, t, cond):
        if cond.pooled_embeds is None or cond.time_ids is None:
            raise ValueError("SDXL conditioning needs pooled_embeds and time_ids (use encode_prompt)")
        t = self._timestep_batch(t, x_t.shape[0])
        added = {"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids}
        return denoiser(
            x_t.to(self.dtype), t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added,
            cross_attention_kwargs=_user_kwargs(denoiser, cond), return_dict=False
        )[0]
