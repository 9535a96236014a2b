"""Reward-gradient guidance: Flow-NRG for rectified flow, classifier-style guidance for diffusion.

Target: ``p(x0 | y) exp(w r(x0, y))`` (VideoAlign, arXiv 2501.13918, Eq. 11; ALGORITHMS.md
§2.3). Adding ``w grad r`` to the score ``-eps / s_t`` of ``x_t = a_t x0 + s_t eps`` gives

    eps~ = eps - w s_t grad_{x_t} r

and, holding ``x_t`` fixed, ``x0~ = x0 - (s_t / a_t)(eps~ - eps)``. For a flow model
(``a = 1 - s``, ``v = eps - x0``) this is the paper's guided velocity

    v~ = v - w (s / (1 - s)) grad_{x_s} r

and for an epsilon model it is classifier guidance (Dhariwal & Nichol 2021) with the reward
as the log-likelihood. The change of the model output is computed once, in the family's own
parametrisation (epsilon, v, sample or velocity), through :meth:`Generator.target`, which is
linear in ``(x0, noise)``; ``w = 0`` therefore adds an exact zero and reproduces unguided
sampling bit for bit.

The reward's gradient with respect to ``x_t``:

- a :class:`LatentReward` ``r(x_t, t, prompts)`` (Flow-NRG's time-dependent latent reward
  model) is differentiated directly;
- an image reward (any differentiable :class:`rewards.Reward`) is evaluated on the decoded
  x0-prediction, ``r(decode(x0_hat(x_t)))``. By default the denoiser's output is held fixed
  (``x0_hat = (x_t - s eps_hat) / a`` with ``eps_hat`` detached): one VAE-decoder and reward
  backward pass per step, no second denoiser call. ``through_denoiser=True`` also
  differentiates the denoiser (DPS-style; one extra denoiser forward and backward per step).

The factor ``s / a`` is singular at pure noise (``a = 0``, the flow's first step ``s = 1``):
steps with ``a_t <= min_signal`` are left unguided, as the paper does; ``max_factor`` caps
``s / a`` elsewhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from visalign.models import Generator, StepState

from .common import (
    RewardScorer,
    SteeringDiagnostics,
    as_generator,
    cfg_multiplier,
    check_steps,
    expand_prompts,
    finish_output,
    resolve_reward,
    reward_name,
    signal_noise,
    timer,
)


class LatentReward(torch.nn.Module):
    """A reward on noisy latents, ``reward(latents, t, prompts, **context) -> Tensor[B]``
    (Flow-NRG's latent reward model ``r_phi(x_s, s, y)``). Subclass and implement ``forward``.

    Guidance differentiates it with respect to the latents directly (no decoding)."""

    name = "latent-reward"
    differentiable = True
    latent = True

    def forward(self, latents: Tensor, t: Tensor, prompts: list[str], **context: Any) -> Tensor:
        raise NotImplementedError


def is_latent_reward(reward) -> bool:
    return bool(getattr(reward, "latent", False))


@dataclass
class GuidanceOptions:
    """Reward-gradient guidance.

    Attributes:
        scale: the guidance strength ``w`` (the paper uses 100 with its latent reward model;
            image rewards in [0, 1] want far less: the testbed uses 1 to 20).
        through_denoiser: also differentiate the denoiser (DPS-style) instead of holding its
            output fixed.
        min_signal: steps where the signal coefficient ``a_t`` is at most this are not guided
            (the flow's singular step ``s = 1``).
        max_factor: cap on ``s_t / a_t``, the factor that explodes near pure noise; ``None``
            for no cap.
    """

    scale: float = 1.0
    through_denoiser: bool = False
    min_signal: float = 1e-3
    max_factor: float | None = None

    def __post_init__(self) -> None:
        if not torch.isfinite(torch.tensor(float(self.scale))):
            raise ValueError(f"guidance scale must be finite, got {self.scale}")
        if self.max_factor is not None and self.max_factor <= 0:
            raise ValueError(f"max_factor must be positive or None, got {self.max_factor}")


class RewardGuidance:
    """Sample with reward-gradient guidance; usable alone or as the proposal of FK steering.

    >>> guided = RewardGuidance(generator, reward, scale=5.0)
    >>> out = guided(["a red circle"], num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    >>> out.images        # [1, 3, H, W]
    """

    def __init__(self, generator: Generator | Any, reward, options: GuidanceOptions | None = None,
                 reward_context: dict | None = None, **overrides) -> None:
        self.generator = as_generator(generator)
        self.reward = resolve_reward(reward)
        values = asdict(options or GuidanceOptions())
        unknown = sorted(set(overrides) - set(values))
        if unknown:
            raise TypeError(f"unknown guidance option(s) {', '.join(unknown)}; the options are {', '.join(values)}")
        self.options = GuidanceOptions(**{**values, **overrides})
        self.reward_context = dict(reward_context or {})
        if not getattr(self.reward, "differentiable", True):
            raise ValueError(
                f"reward {reward_name(self.reward)!r} is not differentiable, so it cannot guide by its gradient; "
                "use FK steering or best-of-N with it instead"
            )
        if self.options.through_denoiser and is_latent_reward(self.reward):
            raise ValueError("through_denoiser applies to image rewards; a LatentReward is differentiated directly")
        self._prompts: list[str] | None = None
        self._guidance_scale: float = 1.0
        self._negative_prompt: str = ""
        self.last_unguided: Tensor | None = None
        self.last_guided: Tensor | None = None
        self.events: list[dict] = []
        self.extra_denoiser_evals = 0

    @classmethod
    def from_pipeline(cls, pipe, reward, **options) -> "RewardGuidance":
        """Guidance for a diffusers pipeline (SD/SDXL/SD3) object."""
        return cls(as_generator(pipe), reward, **options)

    # ------------------------------------------------------------------ the math

    def reward_and_gradient(self, x_t: Tensor, t: Tensor, model_output: Tensor, prompts: list[str],
                            cond=None) -> tuple[Tensor, Tensor]:
        """``(r [B], grad_{x_t} r [like x_t])``. Gradients reach only ``x_t``, never weights."""
        generator = self.generator
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            if is_latent_reward(self.reward):
                rewards = self.reward(x, t, prompts, **self.reward_context)
            else:
                if self.options.through_denoiser:
                    if cond is None:
                        raise ValueError("through_denoiser=True needs the conditioning of the batch")
                    negative = generator.negative_cond(1, self._negative_prompt) if self._guidance_scale > 1 else None
                    output = generator.guided_prediction(x, t, cond, self._guidance_scale, negative)
                    self.extra_denoiser_evals += x.shape[0] * cfg_multiplier(self._guidance_scale)
                else:
                    output = model_output.detach()
                x0 = generator.predict_x0(x, t, output)
                rewards = self.reward(generator.decode(x0), prompts, **self.reward_context)
            rewards = torch.as_tensor(rewards)
            if rewards.shape != (x.shape[0],):
                raise RuntimeError(f"reward returned shape {tuple(rewards.shape)}, expected ({x.shape[0]},)")
            (grad,) = torch.autograd.grad(rewards.float().sum(), x)
        return rewards.detach().float(), grad.detach()

    def guide(self, x_t: Tensor, t: Tensor, model_output: Tensor, prompts: list[str], cond=None) -> Tensor:
        """The guided model output at ``x_t`` (same parametrisation as ``model_output``)."""
        a, s = signal_noise(self.generator, x_t, t)
        active = a > self.options.min_signal
        if not bool(active.any()):
            self.events.append({"t": float(torch.as_tensor(t).float().mean()), "skipped": True})
            return model_output
        rewards, grad = self.reward_and_gradient(x_t, t, model_output, prompts, cond)
        ratio = torch.where(active, s / a.clamp(min=self.options.min_signal), torch.zeros_like(s))
        coefficient = torch.where(active, s, torch.zeros_like(s))
        if self.options.max_factor is not None:  # cap s/a in the guidance term only
            coefficient = torch.minimum(coefficient, self.options.max_factor * a)
        delta_noise = -self.options.scale * coefficient * grad.float()
        delta_x0 = -ratio * delta_noise  # x_t = a x0 + s eps stays fixed
        delta = self.generator.target(delta_x0, delta_noise, t)
        self.events.append({
            "t": float(torch.as_tensor(t).float().mean()),
            "skipped": False,
            "reward_mean": float(rewards.mean()),
            "grad_norm": float(grad.flatten(1).norm(dim=1).mean()),
        })
        return model_output + delta.to(model_output.dtype)

    def on_model_output(self, state: StepState) -> Tensor:
        """The :meth:`Generator.sample` hook (``on_model_output``). Call :meth:`prepare` first."""
        if self._prompts is None:
            raise RuntimeError("RewardGuidance.prepare(prompts, ...) must be called before sampling with its hook")
        self.last_unguided = state.model_output
        guided = self.guide(state.latents, state.t, state.model_output, self._prompts, state.cond)
        self.last_guided = guided
        return guided

    def prepare(self, expanded_prompts: list[str], guidance_scale: float = 1.0, negative_prompt: str = "") -> None:
        """Set the per-sample prompts (and CFG settings, for ``through_denoiser``) of the next run."""
        self._prompts = list(expanded_prompts)
        self._guidance_scale = guidance_scale
        self._negative_prompt = negative_prompt
        self.events = []
        self.extra_denoiser_evals = 0
        self.last_unguided = self.last_guided = None

    # ------------------------------------------------------------------ sampling

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        negative_prompt: str = "",
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pt",
        progress: bool = False,
    ):
        """Guided sampling of ``num_images_per_prompt`` images per prompt → :class:`SteeringOutput`
        (``images`` is the highest-reward image of each prompt for image rewards)."""
        check_steps(num_inference_steps)
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        elapsed = timer()
        prompts, expanded = expand_prompts(prompts, num_images_per_prompt)
        self.prepare(expanded, guidance_scale, negative_prompt)
        result = self.generator.sample(
            prompts,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            height=height,
            width=width,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            output_type="latent",
            on_model_output=self.on_model_output,
            progress=progress,
        )
        scorer = RewardScorer(self.generator, self.reward, self.reward_context)
        if is_latent_reward(self.reward):
            with torch.no_grad():
                images = scorer.images(result.latents)
            rewards = torch.full((images.shape[0],), float("nan"))
        else:
            images, rewards = scorer(result.latents, expanded)
        diagnostics = SteeringDiagnostics(
            method="guidance",
            reward=reward_name(self.reward),
            num_prompts=len(prompts),
            num_particles=num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            denoiser_evals=num_inference_steps * len(expanded) * cfg_multiplier(guidance_scale) + self.extra_denoiser_evals,
            reward_evals=scorer.reward_evals + sum(len(expanded) for e in self.events if not e["skipped"]),
            decode_evals=scorer.decode_evals,
            wall_time_s=elapsed(),
            reward_time_s=scorer.seconds,
            options={**asdict(self.options), "eta": eta, "guidance_scale": guidance_scale},
            events=self.events,
        )
        best = None
        if is_latent_reward(self.reward):  # no image reward to rank by: the first image of each prompt
            best = (images[::num_images_per_prompt], rewards[::num_images_per_prompt])
        return finish_output(images, rewards, result.latents, len(prompts), diagnostics, output_type, best=best)
