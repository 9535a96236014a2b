"""Feynman-Kac steering (Singhal et al. 2025, "A General Framework for Inference-time Scaling
and Steering of Diffusion Models"; reference code zacharyhorvitz/Fk-Diffusion-Steering;
ALGORITHMS.md §8).

``k`` particles per prompt follow the base model's stochastic sampler (DDIM with ``eta > 0``,
or the flow SDE step). At scheduled steps the x0-prediction of every particle is decoded and
scored by the reward, potentials ``G`` reweight the particles, and each prompt's group is
resampled; after the last step the finished samples are scored and resampled with the
corrected potential, so the particles target ``p(x0 | y) exp(lambda r(x0, y))``. The particle
bookkeeping (log-space weights, ESS, resampling) is :mod:`pipelines.smc`.

How it is laid out:

- one :meth:`Generator.sample` call runs every prompt's particles together (prompt-major,
  ``[p0k0, p0k1, ..., p1k0, ...]``), so each step is one batched denoiser call over
  prompts x particles x CFG branches; FK lives in the sampler's ``on_step_end`` hook;
- resampling gathers whole particles within a prompt's group (never across prompts); the
  CFG branches are built from the particles at every step, so they move together;
- the intermediate reward is ``r(decode(x0_hat(x_t)))`` (the paper's choice for images), or,
  with ``num_x0_samples = m > 1``, ``(1/lambda) log mean_j exp(lambda r(x0_j))`` over ``m``
  draws ``x0_j ~ N(x0_hat, s^2 / (a^2 + s^2))`` (the Gaussian posterior under a unit prior,
  a cheap stand-in for the paper's samples from ``p(x0 | x_t)``);
- the final evaluation scores the finished samples (not the last x0-prediction, as the
  reference code does), so the weights are those of the images returned;
- with reward-gradient guidance as the proposal (``guidance=``), each step's weight also
  gets ``log p(x_next | x_t) - log q(x_next | x_t)``, the ratio of the unguided to the guided
  Gaussian transition (summed over latent elements), so the target stays the same.

The resampling draws use their own random stream (seeded from the sampler's generator), so
with ``lambda = 0`` the weights are uniform, nothing is resampled, and the particles are
exactly the samples :meth:`Generator.sample` gives with the same generator and ``eta``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from visalign.models import Generator, StepState

from .common import (
    RewardScorer,
    SteeringDiagnostics,
    SteeringOutput,
    as_generator,
    best_per_group,
    cfg_multiplier,
    check_prompt_context,
    check_steps,
    default_eta,
    expand_prompts,
    finish_output,
    resolve_reward,
    reward_name,
    signal_noise,
    timer,
)
from .guidance import GuidanceOptions, RewardGuidance, is_latent_reward
from .smc import POTENTIALS, RESAMPLING, WEIGHTINGS, ParticleWeights

# The reference image code's schedule for 100 steps: resample every 5 steps from step 5 to 30.
_PAPER_STEPS, _PAPER_START, _PAPER_END, _PAPER_EVERY = 100, 5, 30, 5


@dataclass
class FKOptions:
    """Feynman-Kac steering options (reference-code defaults unless noted).

    Attributes:
        num_particles: particles per prompt ``k`` (4 in the paper).
        lmbda: potential scale ``lambda`` (10): the target is ``p(x0) exp(lambda r(x0))``.
        potential: ``"max"``, ``"add"``, ``"diff"`` (the image code's default) or ``"immediate"``.
        resample_start / resample_end / resample_every: the step indices (0 = the first,
            noisiest) at which particles are scored and resampled: ``start, start + every, ...
            <= end``, plus always the last step. ``None`` scales the reference schedule (5 to 30
            every 5, of 100 steps) to the run's number of steps: 1 to 6 every 1 for 20 steps.
        adaptive: resample a prompt's group only when its ESS is below ``ess_threshold * k``
            (the last step always resamples).
        weighting: ``"incremental"`` (the paper's: each decision uses the current potential)
            or ``"accumulated"`` (textbook SMC: potentials of steps that did not resample
            carry over). They differ only with ``adaptive``.
        resampling: ``"multinomial"`` (the reference code's) or ``"systematic"``.
        num_x0_samples: ``m`` x0 draws per particle for the intermediate reward (1: the
            x0-prediction itself).
        eta: noise of the stochastic proposal; ``None`` is 1.0 (DDIM) for diffusion and 0.7
            for the flow SDE. ``eta = 0`` with ``k > 1`` warns: duplicates would evolve
            identically.
        guidance: reward-gradient guidance as the proposal (``None``: the base model's).
        proposal_correction: weight a guided proposal by ``p / q`` (keeps the target exact).
        prompt_batch_size: run this many prompts' particle groups at a time (memory); ``None``
            runs all prompts in one batch.
    """

    num_particles: int = 4
    lmbda: float = 10.0
    potential: str = "diff"
    resample_start: int | None = None
    resample_end: int | None = None
    resample_every: int | None = None
    adaptive: bool = False
    ess_threshold: float = 0.5
    weighting: str = "incremental"
    resampling: str = "multinomial"
    num_x0_samples: int = 1
    eta: float | None = None
    guidance: GuidanceOptions | None = None
    proposal_correction: bool = True
    prompt_batch_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.guidance, dict):
            self.guidance = GuidanceOptions(**self.guidance)
        elif isinstance(self.guidance, (int, float)) and not isinstance(self.guidance, bool):
            self.guidance = GuidanceOptions(scale=float(self.guidance))
        if self.num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {self.num_particles}")
        if self.potential not in POTENTIALS:
            raise ValueError(f"unknown potential {self.potential!r}; expected one of {POTENTIALS}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; expected one of {WEIGHTINGS}")
        if self.resampling not in RESAMPLING:
            raise ValueError(f"unknown resampling {self.resampling!r}; expected one of {RESAMPLING}")
        if not math.isfinite(self.lmbda) or self.lmbda < 0:
            raise ValueError(f"lmbda must be a finite number >= 0, got {self.lmbda}")
        if self.num_x0_samples < 1:
            raise ValueError(f"num_x0_samples must be >= 1, got {self.num_x0_samples}")
        if self.resample_every is not None and self.resample_every < 1:
            raise ValueError(f"resample_every must be >= 1, got {self.resample_every}")
        if self.eta is not None and self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.prompt_batch_size is not None and self.prompt_batch_size < 1:
            raise ValueError(f"prompt_batch_size must be >= 1 or None, got {self.prompt_batch_size}")

    def schedule(self, num_steps: int) -> list[int]:
        """The step indices at which particles are scored (and, unless adaptive, resampled)."""
        scale = num_steps / _PAPER_STEPS
        start = self.resample_start if self.resample_start is not None else round(_PAPER_START * scale)
        end = self.resample_end if self.resample_end is not None else round(_PAPER_END * scale)
        every = self.resample_every if self.resample_every is not None else max(1, round(_PAPER_EVERY * scale))
        indices = {i for i in range(max(start, 0), min(end, num_steps - 1) + 1, every)}
        return sorted(indices | {num_steps - 1})


class FKSteering:
    """Feynman-Kac steering of any Generator with any reward.

    >>> steer = FKSteering(generator, rewards.load("hpsv2"), num_particles=4, potential="max")
    >>> out = steer(["a red circle"], num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    >>> out.images, out.rewards, out.particles, out.diagnostics.ess

    ``generator`` may also be a diffusers SD/SDXL/SD3 pipeline object (see :meth:`from_pipeline`);
    ``reward`` a :class:`rewards.Reward` (any, including combinations, video and personal
    rewards), a registered name, or any callable ``(images, prompts, **context) -> Tensor[B]``.
    ``reward_context`` is passed to every reward call (e.g. ``user_embedding=`` for the
    personal reward).
    """

    def __init__(self, generator: Generator | Any, reward, options: FKOptions | None = None,
                 reward_context: dict | None = None, **overrides) -> None:
        self.generator = as_generator(generator)
        self.reward = resolve_reward(reward)
        options = options or FKOptions()
        values = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        unknown = sorted(set(overrides) - set(values))
        if unknown:
            raise TypeError(f"unknown FK option(s) {', '.join(unknown)}; the options are {', '.join(values)}")
        self.options = FKOptions(**{**values, **overrides})
        self.reward_context = dict(reward_context or {})
        if is_latent_reward(self.reward):
            raise ValueError("FK steering scores decoded samples: give it an image or video reward "
                             "(a LatentReward can guide the proposal through guidance=)")
        self.guidance = None
        if self.options.guidance is not None:
            self.guidance = RewardGuidance(self.generator, self.reward, self.options.guidance, self.reward_context)

    @classmethod
    def from_pipeline(cls, pipe, reward, **options) -> "FKSteering":
        """FK steering for a diffusers pipeline object (``StableDiffusionPipeline``,
        ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``)::

            steer = FKSteering.from_pipeline(pipe, rewards.load("hpsv2"), num_particles=4)
            images = steer("a red circle", generator=torch.Generator().manual_seed(0)).images
        """
        return cls(as_generator(pipe), reward, **options)

    @property
    def eta(self) -> float:
        return self.options.eta if self.options.eta is not None else default_eta(self.generator)

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
        """Steer ``k`` particles for each prompt.

        Args:
            prompts: one prompt or a list (``P`` groups of ``k`` particles).
            num_inference_steps, guidance_scale, negative_prompt, height, width: as
                :meth:`Generator.sample`.
            generator: seeds the initial noise, the sampler's noise and (through its seed) the
                resampling draws.
            latents: initial noise ``[P * k, ...]`` (prompt-major), optional.
            output_type: ``"pt"`` or ``"pil"`` for ``images`` (particles stay tensors).
            prompt_context: reward context with one entry per prompt (e.g. ``{"user_embedding":
                Tensor[P, U]}``, a user per prompt); every particle of a prompt, and every x0 draw
                of it, is scored with its prompt's entry. Not combined with ``guidance``.
        """
        check_steps(num_inference_steps)
        options = self.options
        k = options.num_particles
        if self.eta == 0 and k > 1:
            warnings.warn(
                "FK steering with a deterministic sampler (eta=0): resampled duplicates evolve identically, "
                "so resampling only loses diversity; use eta > 0 (the default)", UserWarning, stacklevel=2,
            )
        prompts, _ = expand_prompts(prompts, k)
        prompt_context = check_prompt_context(prompt_context, len(prompts))
        if prompt_context and self.guidance is not None:
            raise NotImplementedError("prompt_context with guidance: the guidance reward takes reward_context only")
        chunk = options.prompt_batch_size or len(prompts)
        elapsed = timer()
        parts = []
        for start in range(0, len(prompts), chunk):
            chunk_latents = None if latents is None else latents[start * k : (start + chunk) * k]
            chunk_context = {key: value[start : start + chunk] for key, value in prompt_context.items()}
            parts.append(self._run(prompts[start : start + chunk], num_inference_steps, guidance_scale, negative_prompt,
                                   height, width, generator, chunk_latents, progress, prompt_offset=start,
                                   prompt_context=chunk_context))
        return self._merge(parts, prompts, num_inference_steps, guidance_scale, output_type, elapsed())

    # ------------------------------------------------------------------ one batch of prompts

    def _run(self, prompts, num_steps, guidance_scale, negative_prompt, height, width, generator, latents, progress,
             prompt_offset=0, prompt_context=None) -> dict:
        options = self.options
        k, num_prompts = options.num_particles, len(prompts)
        expanded = [p for p in prompts for _ in range(k)]
        eta = self.eta
        if latents is not None and latents.shape[0] != num_prompts * k:
            raise ValueError(f"latents have batch {latents.shape[0]}, expected prompts x particles = {num_prompts * k}")
        device = self.generator.device
        weights = ParticleWeights(num_prompts, k, options.potential, options.lmbda, options.weighting,
                                  options.resampling, options.ess_threshold, device=device)
        schedule = set(options.schedule(num_steps))
        scorer = RewardScorer(self.generator, self.reward, self.reward_context, prompt_context or {})
        rows = torch.arange(num_prompts).repeat_interleave(k)  # the prompt of each particle (prompt-major)
        rng = _resampling_generator(generator)
        noise_rng = {}
        events: list[dict] = []
        final: dict = {}
        invalid = 0
        flat_offset = (torch.arange(num_prompts, device=device) * k)[:, None]

        if self.guidance is not None:
            self.guidance.prepare(expanded, guidance_scale, negative_prompt)

        def x0_samples(step: StepState) -> Tensor:
            """Intermediate rewards ``[P * k]`` from the x0-prediction (or m draws around it)."""
            m = options.num_x0_samples
            if m == 1:
                return scorer(step.x0_pred, expanded, rows)[1]
            a, s = signal_noise(self.generator, step.prev_latents, step.t)
            spread = (s / (a**2 + s**2).sqrt()).to(step.x0_pred.dtype)
            if device not in noise_rng:
                noise_rng[device] = None if rng is None else torch.Generator(device=device).manual_seed(rng.initial_seed() + 1)
            noise = torch.randn((m, *step.x0_pred.shape), generator=noise_rng[device], device=device, dtype=step.x0_pred.dtype)
            draws = (step.x0_pred[None] + spread[None] * noise).flatten(0, 1)
            scores = scorer(draws, expanded * m, rows.repeat(m))[1].reshape(m, -1).double()
            if options.lmbda == 0:
                return scores.mean(dim=0).float()
            return ((torch.logsumexp(options.lmbda * scores, dim=0) - math.log(m)) / options.lmbda).float()

        def on_step_end(step: StepState) -> Tensor | None:
            nonlocal invalid
            if self.guidance is not None and options.proposal_correction and eta > 0:
                weights.add_log_weight(self._proposal_log_ratio(step, eta).reshape(num_prompts, k))
            if step.index not in schedule:
                return None
            is_final = step.index == num_steps - 1
            if is_final:
                images, rewards = scorer(step.latents, expanded, rows)
            else:
                rewards = x0_samples(step)
            update = weights.update(rewards.reshape(num_prompts, k), final=is_final,
                                    adaptive=options.adaptive and not is_final, generator=rng)
            invalid += update.invalid
            events.append({
                "index": step.index,
                "t": float(torch.as_tensor(step.t).float()),
                "final": is_final,
                "prompt_offset": prompt_offset,
                "ess": update.ess.tolist(),
                "resampled": update.resampled.tolist(),
                "rewards": rewards.reshape(num_prompts, k).tolist(),
                "ancestors": update.ancestors.tolist(),
            })
            flat = (flat_offset + update.ancestors.to(device)).flatten()
            if is_final:
                final.update(images_before=images, rewards_before=rewards, log_weights=update.log_weights,
                             images=images[flat], rewards=rewards[flat])
            if bool((update.ancestors == torch.arange(k, device=update.ancestors.device)).all()):
                return None
            return step.latents[flat]

        result = self.generator.sample(
            prompts,
            negative_prompt=negative_prompt,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            height=height,
            width=width,
            num_images_per_prompt=k,
            generator=generator,
            latents=latents,
            output_type="latent",
            on_model_output=self.guidance.on_model_output if self.guidance is not None else None,
            on_step_end=on_step_end,
            progress=progress,
        )
        best_images, best_rewards = best_per_group(final["images_before"], final["rewards_before"], num_prompts)
        return {
            "images": final["images"], "rewards": final["rewards"], "latents": result.latents,
            "best": (best_images, best_rewards), "events": events, "log_weights": final["log_weights"],
            "scorer": scorer, "invalid": invalid, "num_prompts": num_prompts,
            "guidance_evals": self.guidance.extra_denoiser_evals if self.guidance is not None else 0,
            "guidance_events": list(self.guidance.events) if self.guidance is not None else [],
        }

    def _proposal_log_ratio(self, step: StepState, eta: float) -> Tensor:
        """``log p(x_next | x_t) - log q(x_next | x_t)`` per particle, summed over latent elements."""
        unguided, guided = self.guidance.last_unguided, self.guidance.last_guided
        if unguided is None or guided is None or unguided is guided:
            return torch.zeros(step.latents.shape[0], device=step.latents.device)
        base = self.generator.step(step.prev_latents, step.t, step.t_next, unguided, eta=eta, prev_sample=step.latents)
        proposal = self.generator.step(step.prev_latents, step.t, step.t_next, guided, eta=eta, prev_sample=step.latents)
        x = step.latents.float()
        variance = 2 * base.std.float() ** 2
        log_ratio = ((x - proposal.mean.float()) ** 2 - (x - base.mean.float()) ** 2) / variance
        return log_ratio.flatten(1).sum(dim=1)

    def _merge(self, parts: list[dict], prompts, num_steps, guidance_scale, output_type, wall) -> SteeringOutput:
        options = self.options
        k = options.num_particles
        images = torch.cat([p["images"] for p in parts])
        rewards = torch.cat([p["rewards"] for p in parts])
        latents = torch.cat([p["latents"] for p in parts])
        best = (torch.cat([p["best"][0] for p in parts]), torch.cat([p["best"][1] for p in parts]))
        diagnostics = SteeringDiagnostics(
            method="fk",
            reward=reward_name(self.reward),
            num_prompts=len(prompts),
            num_particles=k,
            num_inference_steps=num_steps,
            denoiser_evals=num_steps * len(prompts) * k * cfg_multiplier(guidance_scale)
            + sum(p["guidance_evals"] for p in parts),
            reward_evals=sum(p["scorer"].reward_evals for p in parts),
            decode_evals=sum(p["scorer"].decode_evals for p in parts),
            invalid_rewards=sum(p["invalid"] for p in parts),
            wall_time_s=wall,
            reward_time_s=sum(p["scorer"].seconds for p in parts),
            options={**_jsonable(asdict(options)), "eta": self.eta, "guidance_scale": guidance_scale,
                     "schedule": options.schedule(num_steps)},
            events=[e for p in parts for e in p["events"]],
            final_log_weights=torch.cat([p["log_weights"] for p in parts]).tolist(),
        )
        if self.guidance is not None:
            diagnostics.options["guidance_events"] = [e for p in parts for e in p["guidance_events"]]
        return finish_output(images, rewards, latents, len(prompts), diagnostics, output_type, best=best)


def _resampling_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator for the resampling draws, seeded from (not drawn from) the sampler's, so the
    sampler's own noise stream is the one plain sampling uses."""
    if generator is None:
        return None
    return torch.Generator().manual_seed((generator.initial_seed() * 6364136223846793005 + 1442695040888963407) % 2**63)


def _jsonable(values: dict) -> dict:
    return {k: (_jsonable(v) if isinstance(v, dict) else v) for k, v in values.items()}
