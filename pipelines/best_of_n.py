"""Best-of-N: sample ``n`` images per prompt in one batch, score them once, keep the best.

The baseline of FK steering at equal compute: ``n`` samples cost the same denoiser
evaluations as ``n`` particles, and best-of-N scores each image once, at the end (FK also
scores intermediate x0-predictions). The same :class:`~pipelines.common.SteeringOutput` and
cost accounting as :class:`~pipelines.steering.FKSteering`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from visalign.models import Generator

from .common import (
    RewardScorer,
    SteeringDiagnostics,
    SteeringOutput,
    as_generator,
    cfg_multiplier,
    check_prompt_context,
    check_steps,
    expand_prompts,
    finish_output,
    resolve_reward,
    reward_name,
    timer,
)


class BestOfN:
    """``BestOfN(generator, reward, n=4)(prompts, ...)``: the highest-reward of ``n`` samples per prompt.

    ``eta`` is the sampler's noise (0, deterministic DDIM / Euler, by default: the ``n``
    samples differ by their initial noise). ``generator`` may be a diffusers pipeline object.
    """

    def __init__(self, generator: Generator | Any, reward, n: int = 4, eta: float = 0.0,
                 reward_context: dict | None = None, batch_size: int | None = None) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.generator = as_generator(generator)
        self.reward = resolve_reward(reward)
        self.n = n
        self.eta = eta
        self.reward_context = dict(reward_context or {})
        self.batch_size = batch_size

    @classmethod
    def from_pipeline(cls, pipe, reward, **options) -> "BestOfN":
        return cls(as_generator(pipe), reward, **options)

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        negative_prompt: str = "",
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pt",
        progress: bool = False,
        prompt_context: dict | None = None,
    ) -> SteeringOutput:
        """Sample ``n`` images per prompt (``latents``: ``[P * n, ...]``, prompt-major) and keep the best.

        ``prompt_context``: reward context with one entry per prompt (``{"user_embedding":
        Tensor[P, U]}``); each of a prompt's ``n`` samples is scored with its prompt's entry.
        """
        check_steps(num_inference_steps)
        elapsed = timer()
        prompts, expanded = expand_prompts(prompts, self.n)
        if latents is not None and latents.shape[0] != len(expanded):
            raise ValueError(f"latents have batch {latents.shape[0]}, expected prompts x n = {len(expanded)}")
        scorer = RewardScorer(self.generator, self.reward, self.reward_context,
                              check_prompt_context(prompt_context, len(prompts)))
        rows = torch.arange(len(prompts)).repeat_interleave(self.n)
        per_call = self.batch_size or len(prompts)  # prompts per sampler call
        all_latents, all_images, all_rewards = [], [], []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            chunk_latents = None if latents is None else latents[start * self.n : (start + len(chunk)) * self.n]
            with torch.no_grad():
                result = self.generator.sample(
                    chunk, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, eta=self.eta, height=height, width=width,
                    num_images_per_prompt=self.n, generator=generator, latents=chunk_latents,
                    output_type="latent", progress=progress,
                )
            span = slice(start * self.n, (start + len(chunk)) * self.n)
            images, rewards = scorer(result.latents, expanded[span], rows[span])
            all_latents.append(result.latents)
            all_images.append(images)
            all_rewards.append(rewards)
        images, rewards = torch.cat(all_images), torch.cat(all_rewards)
        diagnostics = SteeringDiagnostics(
            method="best-of-n",
            reward=reward_name(self.reward),
            num_prompts=len(prompts),
            num_particles=self.n,
            num_inference_steps=num_inference_steps,
            denoiser_evals=num_inference_steps * len(expanded) * cfg_multiplier(guidance_scale),
            reward_evals=scorer.reward_evals,
            decode_evals=scorer.decode_evals,
            invalid_rewards=int((~torch.isfinite(rewards)).sum()),
            wall_time_s=elapsed(),
            reward_time_s=scorer.seconds,
            options={"n": self.n, "eta": self.eta, "guidance_scale": guidance_scale},
        )
        return finish_output(images, rewards, torch.cat(all_latents), len(prompts), diagnostics, output_type)
