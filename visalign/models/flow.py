"""Rectified-flow generators: SD3-style MMDiT with ``FlowMatchEulerDiscreteScheduler``.

``t`` is the noise level ``s`` in [0, 1]; ``x_s = (1 - s) x0 + s eps``; the network predicts
the velocity ``v = eps - x0`` (diffusers' "target = noise - latents"). The math lives in
:class:`FlowGenerator` so FLUX and video DiTs can subclass it with their own prompt encoding
and denoiser call.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Cond, Generator, StepOutput, _broadcast, gaussian_log_prob


class FlowGenerator(Generator):
    """Shared rectified-flow math (ALGORITHMS.md §0, §7.2)."""

    is_flow = True
    prediction_type = "flow"

    def __init__(self, pipe, device=None):
        super().__init__(pipe, device=device)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        # Training-time distribution of s: "logit_normal" (SD3 paper, diffusers' SD3 scripts) or
        # "uniform"; then the scheduler's resolution shift s' = shift s / (1 + (shift - 1) s).
        self.timestep_sampling = "logit_normal"
        self.logit_mean = 0.0
        self.logit_std = 1.0

    def _s(self, t: Tensor, like: Tensor) -> Tensor:
        return _broadcast(torch.as_tensor(t, dtype=torch.float32), like)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else torch.device("cpu")
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=device))
        elif self.timestep_sampling == "uniform":
            u = torch.rand(n, generator=generator, device=device)
        else:
            raise ValueError(f"timestep_sampling must be 'logit_normal' or 'uniform', got {self.timestep_sampling!r}")
        shift = float(self.scheduler.config.get("shift", 1.0))
        s = shift * u / (1 + (shift - 1) * u)
        return s.clamp(1e-4, 1.0).to(self.device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        s = self._s(t, x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    ERROR_SPACES = ("native", "flow", "epsilon", "sample")

    def error_weight(self, t: Tensor, space: str = "native") -> Tensor:
        # x0 = x_t - s v and eps = x_t + (1 - s) v: a velocity error d is s d in x0, (1 - s) d in eps.
        if space not in self.ERROR_SPACES:
            raise ValueError(f"error space must be one of {self.ERROR_SPACES}, got {space!r}")
        s = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1)
        if space in ("native", "flow"):
            return torch.ones_like(s)
        return s**2 if space == "sample" else (1 - s) ** 2

    def predict_x0(self, x_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        s = self._s(t, x_t)
        return (x_t.float() - s * model_output.float()).to(model_output.dtype)

    def predict_noise(self, x_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        s = self._s(t, x_t)
        return (x_t.float() + (1 - s) * model_output.float()).to(model_output.dtype)

    def sampling_timesteps(self, num_steps: int) -> tuple[Tensor, Tensor]:
        self.scheduler.set_timesteps(num_steps, device="cpu")
        sigmas = self.scheduler.sigmas.to(torch.float32)
        return sigmas[:-1].clone(), sigmas[1:].clone()

    def noise_level(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t).float()

    def step(self, x_t, t, t_next, model_output, eta=0.0, generator=None, prev_sample=None) -> StepOutput:
        """Euler step ``x + (s' - s) v``; with ``eta > 0`` the Flow-GRPO SDE step whose noise level
        is ``eta`` (0.7 in Flow-GRPO), exact Gaussian log-prob in fp32.

        The SDE's std is ``eta * sqrt(s / (1 - s))``; at ``s = 1`` Flow-GRPO replaces ``s`` in the
        denominator by the schedule's second value, which is ``t_next`` of the first step.
        """
        dtype = model_output.dtype
        sigma = self._s(t, x_t)
        sigma_next = self._s(t_next, x_t)
        dt = sigma_next - sigma
        x, v = x_t.float(), model_output.float()
        x0 = (x - sigma * v).to(dtype)
        if eta <= 0:
            if prev_sample is not None:
                raise ValueError("a deterministic step (eta=0) has no log-probability to re-evaluate")
            mean = x + dt * v
            return StepOutput(prev_sample=mean.to(dtype), x0_pred=x0, mean=mean.to(dtype))
        sigma_safe = torch.where(sigma >= 1, sigma_next, sigma)
        std_dev = eta * (sigma / (1 - sigma_safe)).sqrt()
        mean = x * (1 + std_dev**2 / (2 * sigma) * dt) + v * (1 + std_dev**2 * (1 - sigma) / (2 * sigma)) * dt
        std = std_dev * (-dt).sqrt()
        if prev_sample is None:
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=dtype)
            prev_sample = (mean + std * noise.float()).to(dtype)
        log_prob = gaussian_log_prob(prev_sample, mean, std)
        return StepOutput(prev_sample=prev_sample, x0_pred=x0, mean=mean, std=std, log_prob=log_prob)


class StableDiffusion3Generator(FlowGenerator):
    """SD3 / SD3.5 (``StableDiffusion3Pipeline``): CLIP-L, CLIP-G and optionally T5; MMDiT.

    Without T5 (``text_encoder_3=None``), diffusers feeds zeros of ``max_sequence_length``
    tokens in its place; this generator does the same (``max_sequence_length`` attribute).
    """

    family = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"

    def __init__(self, pipe, device=None):
        super().__init__(pipe, device=device)
        self.max_sequence_length = 256

    @classmethod
    def _load_kwargs(cls) -> dict:
        return {}

    def encode_prompt(self, prompts: str | Sequence[str]) -> Cond:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._encoding_prompts():
            prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        return Cond(prompt_embeds=prompt_embeds.to(self.dtype), pooled_embeds=pooled.to(self.dtype))

    def _denoise(self, denoiser, x_t, t, cond):
        if cond.pooled_embeds is None:
            raise ValueError("SD3 conditioning needs pooled_embeds (use encode_prompt)")
        s = self._timestep_batch(t, x_t.shape[0]).float()
        # The transformer takes the scheduler's timestep, s * num_train_timesteps.
        timestep = s * self.num_train_timesteps
        return denoiser(
            hidden_states=x_t.to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_embeds,
            return_dict=False,
        )[0]
