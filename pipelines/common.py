"""What FK steering, best-of-N and reward guidance share: rewards, outputs, diffusers pipelines."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from visalign.models import Generator

RewardLike = Any  # a rewards.Reward, a registered name or saved-reward folder, or any callable(images, prompts, **ctx)


def resolve_reward(reward: RewardLike):
    """A reward object from a :class:`rewards.Reward`, a callable, a registered name or a saved folder."""
    if isinstance(reward, str):
        import rewards

        return rewards.load(reward)
    if not callable(reward):
        raise TypeError(
            f"reward must be a rewards.Reward, a callable (images, prompts, **context) -> Tensor[B], or a "
            f"registered reward name; got {type(reward).__name__}"
        )
    return reward


def reward_name(reward) -> str:
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__)


def as_generator(pipeline_or_generator) -> Generator:
    """A :class:`Generator` for a diffusers pipeline object (SD 1.x/2.x, SDXL, SD3), or the
    Generator itself. The pipeline's modules are shared, not copied; they are frozen and its
    progress bar is switched off, as every visalign Generator does."""
    if isinstance(pipeline_or_generator, Generator):
        return pipeline_or_generator
    from visalign.models import FAMILIES

    pipe = pipeline_or_generator
    names = [cls.__name__ for cls in type(pipe).__mro__]
    for family_class in FAMILIES.values():
        if any(name in family_class.pipeline_class_names for name in names):
            return family_class(pipe)
    supported = sorted({n for c in FAMILIES.values() for n in c.pipeline_class_names})
    raise TypeError(
        f"cannot steer a {type(pipe).__name__}: expected a visalign Generator or one of the diffusers "
        f"pipelines {', '.join(supported)}"
    )


def expand_prompts(prompts: str | Sequence[str], repeats: int) -> tuple[list[str], list[str]]:
    """``(prompts, expanded)``: the prompt list and each prompt repeated ``repeats`` times in place."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {index} is a {type(prompt).__name__}, expected str")
    return prompts, [p for p in prompts for _ in range(repeats)]


def check_prompt_context(prompt_context: dict | None, num_prompts: int) -> dict:
    """Validate per-prompt reward context: every value is a tensor with ``num_prompts`` rows
    (e.g. ``{"user_embedding": Tensor[P, U]}``: one user per prompt)."""
    checked = {}
    for key, value in (prompt_context or {}).items():
        value = torch.as_tensor(value)
        if value.ndim == 0 or value.shape[0] != num_prompts:
            raise ValueError(f"prompt_context[{key!r}] has shape {tuple(value.shape)}; it needs one entry per prompt "
                             f"({num_prompts}) along its first dimension")
        checked[key] = value
    return checked


def default_eta(generator: Generator) -> float:
    """The stochastic proposal's noise: DDIM eta 1.0 (the FK paper) for diffusion; the flow
    SDE's noise level 0.7 (Flow-GRPO's) for rectified flow."""
    return 0.7 if generator.is_flow else 1.0


def signal_noise(generator: Generator, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(a_t, s_t)`` with ``x_t = a_t x0 + s_t eps``, shaped like ``x_t``, in fp32, for any family
    (read off :meth:`Generator.add_noise`, which is linear in ``x0`` and the noise)."""
    ones = torch.ones_like(x_t, dtype=torch.float32)
    zeros = torch.zeros_like(ones)
    return generator.add_noise(ones, zeros, t).float(), generator.add_noise(zeros, ones, t).float()


@dataclass
class RewardScorer:
    """Decode latents and score them: one call per evaluation, timed and counted.

    ``context`` goes to every reward call unchanged; ``prompt_context`` holds values with one
    entry per prompt (leading dimension ``P``), and each scored row gets its prompt's entry
    through the ``rows`` index passed to the call (see :func:`check_prompt_context`).
    """

    generator: Generator
    reward: Any
    context: dict = field(default_factory=dict)
    prompt_context: dict = field(default_factory=dict)
    reward_evals: int = 0
    decode_evals: int = 0
    seconds: float = 0.0

    def images(self, latents: Tensor) -> Tensor:
        self.decode_evals += latents.shape[0]
        return self.generator.decode(latents)

    def score_images(self, images: Tensor, prompts: list[str], rows: Tensor | None = None) -> Tensor:
        self.reward_evals += images.shape[0]
        context = self.context
        if self.prompt_context:
            if rows is None or len(rows) != images.shape[0]:
                raise RuntimeError("per-prompt reward context needs the prompt index of every scored image")
            context = {**context, **{key: value[rows.to(value.device)] for key, value in self.prompt_context.items()}}
        scores = self.reward(images, prompts, **context)
        scores = torch.as_tensor(scores)
        if scores.shape != (images.shape[0],):
            raise RuntimeError(
                f"reward {reward_name(self.reward)!r} returned shape {tuple(scores.shape)} for "
                f"{images.shape[0]} images; expected ({images.shape[0]},)"
            )
        return scores.detach().float()

    @torch.no_grad()
    def __call__(self, latents: Tensor, prompts: list[str], rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(images, rewards)`` for latents ``[B, ...]``; rewards ``[B]`` fp32 on the latents' device.
        ``rows`` ``[B]``: the prompt index of each latent (for ``prompt_context``)."""
        start = time.perf_counter()
        images = self.images(latents)
        scores = self.score_images(images, prompts, rows).to(latents.device)
        self.seconds += time.perf_counter() - start
        return images, scores


@dataclass
class SteeringDiagnostics:
    """How a steered sampling run went, JSON-ready through :meth:`to_dict`.

    ``events``: one entry per reward evaluation during sampling (``index`` of the step,
    ``ess`` and ``resampled`` per prompt, ``rewards`` per prompt and particle, ``ancestors``).
    Costs: ``denoiser_evals`` counts samples through the denoiser (CFG branches included),
    ``reward_evals`` images scored, ``decode_evals`` latents decoded.
    """

    method: str
    reward: str
    num_prompts: int
    num_particles: int
    num_inference_steps: int
    denoiser_evals: int = 0
    reward_evals: int = 0
    decode_evals: int = 0
    invalid_rewards: int = 0
    wall_time_s: float = 0.0
    reward_time_s: float = 0.0
    options: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    final_log_weights: list | None = None

    @property
    def ess(self) -> list[list[float]]:
        """ESS per evaluation, per prompt."""
        return [event["ess"] for event in self.events]

    @property
    def num_resampling_events(self) -> int:
        return sum(sum(1 for r in event["resampled"] if r) for event in self.events)

    def to_dict(self) -> dict:
        values = {k: v for k, v in self.__dict__.items()}
        values["num_resampling_events"] = self.num_resampling_events
        return values


@dataclass
class SteeringOutput:
    """The result of a steered (or best-of-N, or guided) sampling run over ``P`` prompts.

    Attributes:
        images: the best particle of each prompt, ``[P, 3, H, W]`` (``[P, F, 3, H, W]`` for
            video) in [0, 1], or a list of PIL images with ``output_type="pil"``.
        rewards: their rewards, ``[P]``.
        particles: every final particle, ``[P, k, ...]`` images (after FK's final resampling:
            an equally weighted sample from the target).
        particle_rewards: ``[P, k]``.
        latents: the particles' final latents, ``[P, k, ...]``.
        diagnostics: :class:`SteeringDiagnostics`.
    """

    images: Tensor | list
    rewards: Tensor
    particles: Tensor
    particle_rewards: Tensor
    latents: Tensor
    diagnostics: SteeringDiagnostics


def best_per_group(images: Tensor, rewards: Tensor, num_prompts: int) -> tuple[Tensor, Tensor]:
    """The highest-reward image of each prompt from flat ``[P * k, ...]`` images and ``[P * k]``
    rewards → ``([P, ...], [P])``. NaN rewards never win."""
    k = images.shape[0] // num_prompts
    grouped = rewards.reshape(num_prompts, k).float().cpu()
    best = torch.nan_to_num(grouped, nan=-torch.inf).argmax(dim=1)
    rows = torch.arange(num_prompts)
    return images.reshape(num_prompts, k, *images.shape[1:])[rows, best.to(images.device)], grouped[rows, best]


def finish_output(images: Tensor, rewards: Tensor, latents: Tensor, num_prompts: int, diagnostics: SteeringDiagnostics,
                  output_type: str = "pt", best: tuple[Tensor, Tensor] | None = None) -> SteeringOutput:
    """Group flat ``[P * k, ...]`` results by prompt; ``best`` (images ``[P, ...]``, rewards
    ``[P]``) defaults to the highest-reward particle of each prompt."""
    if output_type not in ("pt", "pil"):
        raise ValueError(f"output_type must be 'pt' or 'pil', got {output_type!r}")
    k = images.shape[0] // num_prompts
    particles = images.reshape(num_prompts, k, *images.shape[1:])
    particle_rewards = rewards.reshape(num_prompts, k).float().cpu()
    chosen, chosen_rewards = best if best is not None else best_per_group(images, rewards, num_prompts)
    if output_type == "pil":
        from visalign.models import to_pil

        if chosen.dim() != 4:
            raise ValueError("output_type='pil' needs images [P, 3, H, W]; video samples come back as tensors")
        chosen = to_pil(chosen)
    return SteeringOutput(
        images=chosen,
        rewards=chosen_rewards,
        particles=particles,
        particle_rewards=particle_rewards,
        latents=latents.reshape(num_prompts, k, *latents.shape[1:]),
        diagnostics=diagnostics,
    )


def cfg_multiplier(guidance_scale: float) -> int:
    return 2 if guidance_scale > 1.0 else 1


def check_steps(num_inference_steps: int) -> None:
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")


def timer() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
