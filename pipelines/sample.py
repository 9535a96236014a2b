"""``visalign sample steer=fk|best-of-n|guidance reward=NAME particles=K``: steered sampling from the CLI.

:func:`run_steered` is called by :func:`visalign.sample.run_sample` when ``steer`` is set. Each
of the ``num_images_per_prompt`` images of a prompt is one independent steering run (one
group of ``particles`` particles or candidates); the run's best image is saved. Next to the
PNGs, ``grid.png`` and ``samples.jsonl`` (now with each image's reward), it writes
``steering.json``: the options, the costs and the per-step diagnostics (ESS, resampling
events, reward traces).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from visalign.config import ConfigError, configclass, field

STEER_METHODS = ("fk", "best-of-n", "guidance")


@configclass
class SteeringConfig:
    lmbda: float = field(10.0, help="fk: potential scale lambda; the target is p(x0) exp(lambda r(x0))")
    potential: str = field("diff", help="fk: max, add, diff or immediate")
    resample_start: int | None = field(None, help="fk: first step index scored (default: the paper's 5/100 of the steps)")
    resample_end: int | None = field(None, help="fk: last scheduled step index (default: 30/100 of the steps); the last step always")
    resample_every: int | None = field(None, help="fk: steps between resamplings (default: 5/100 of the steps, at least 1)")
    adaptive: bool = field(False, help="fk: resample a prompt's particles only when ESS < ess_threshold * particles")
    ess_threshold: float = field(0.5, help="fk: adaptive resampling threshold, a fraction of the particles")
    weighting: str = field("incremental", help="fk: incremental (the paper's) or accumulated (textbook SMC)")
    resampling: str = field("multinomial", help="fk: multinomial or systematic")
    num_x0_samples: int = field(1, help="fk: x0 draws per particle for the intermediate reward")
    eta: float | None = field(None, help="fk: proposal noise (default 1.0 diffusion, 0.7 flow); best-of-n/guidance use eta")
    guidance_weight: float | None = field(None, help="reward-gradient guidance w (steer=guidance: default 1.0; fk: a guided proposal)")
    through_denoiser: bool = field(False, help="guidance: also differentiate the denoiser (slower)")
    max_factor: float | None = field(None, help="guidance: cap on s/a, the factor that explodes near pure noise")
    reward_options: dict[str, Any] = field(default_factory=dict, help="options for rewards.load (reward_options.mode=both)")
    save_particles: bool = field(False, help="also save every final particle/candidate in particles/")


def check_steer_config(config) -> None:
    """Refuse bad steering settings before any model is loaded."""
    if config.steer not in STEER_METHODS:
        raise ConfigError(f"steer must be one of {', '.join(STEER_METHODS)}, got {config.steer!r}")
    if not config.reward:
        raise ConfigError(f"steer={config.steer} needs a reward: reward=NAME (see `visalign reward list`) or a saved reward folder")
    if config.particles < 1:
        raise ConfigError(f"particles must be >= 1, got {config.particles}")


def build_steerer(config, generator, reward):
    from .best_of_n import BestOfN
    from .guidance import GuidanceOptions, RewardGuidance
    from .steering import FKSteering

    options = config.steering
    guidance = None
    weight = options.guidance_weight
    if config.steer == "guidance" or weight is not None:
        guidance = GuidanceOptions(scale=1.0 if weight is None else weight, through_denoiser=options.through_denoiser,
                                   max_factor=options.max_factor)
    if config.steer == "fk":
        return FKSteering(
            generator, reward,
            num_particles=config.particles, lmbda=options.lmbda, potential=options.potential,
            resample_start=options.resample_start, resample_end=options.resample_end,
            resample_every=options.resample_every, adaptive=options.adaptive, ess_threshold=options.ess_threshold,
            weighting=options.weighting, resampling=options.resampling, num_x0_samples=options.num_x0_samples,
            eta=options.eta, guidance=guidance,
        )
    if config.steer == "best-of-n":
        return BestOfN(generator, reward, n=config.particles, eta=config.eta)
    return RewardGuidance(generator, reward, guidance)


def run_steered(config, generator, prompts: list[str], out: Path, device: torch.device) -> dict:
    """Steered sampling for :func:`visalign.sample.run_sample`; returns its summary dict."""
    import rewards
    from tqdm.auto import tqdm

    from visalign.images import save_sample, save_sample_grid, slugify

    try:
        reward = rewards.load(config.reward, **config.steering.reward_options)
    except (KeyError, TypeError, FileNotFoundError) as error:
        raise ConfigError(f"reward {config.reward!r}: {error}") from None
    reward = reward.to(device)
    try:
        steerer = build_steerer(config, generator, reward)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    per_run = 1 if config.steer == "guidance" else config.particles
    runs = [(p_index, prompt, i) for p_index, prompt in enumerate(prompts) for i in range(config.num_images_per_prompt)]
    runs_per_call = max(1, config.batch_size // per_run)
    rng = torch.Generator(device=device).manual_seed(config.seed)
    images, records, diagnostics = [], [], []
    for start in tqdm(range(0, len(runs), runs_per_call), desc=f"steering ({config.steer})", unit="batch"):
        batch = runs[start : start + runs_per_call]
        kwargs = dict(num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                      negative_prompt=config.negative_prompt, height=config.height, width=config.width, generator=rng)
        if config.steer == "guidance":
            kwargs["eta"] = config.eta
        result = steerer([prompt for _, prompt, _ in batch], **kwargs)
        diagnostics.append(result.diagnostics.to_dict())
        for row, ((p_index, prompt, i), image) in enumerate(zip(batch, result.images)):
            path = save_sample(image, out / f"{p_index:03d}-{slugify(prompt)}-{i}", config.video_format, config.fps)
            record = {"file": path.name, "prompt": prompt, "index": i, "reward": float(result.rewards[row])}
            if config.steering.save_particles:
                record["particles"] = []
                for j, particle in enumerate(result.particles[row]):
                    particle_path = save_sample(particle, out / "particles" / f"{p_index:03d}-{i}-{j}", config.video_format,
                                                config.fps)
                    record["particles"].append({"file": f"particles/{particle_path.name}",
                                                "reward": float(result.particle_rewards[row, j])})
            records.append(record)
            images.append(image.cpu())
    grid = save_sample_grid(torch.stack(images), prompts, out / "grid.png", per_row=config.num_images_per_prompt)
    with open(out / "samples.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    summary = {
        "steer": config.steer,
        "reward": config.reward,
        "particles": per_run,
        "mean_reward": sum(r["reward"] for r in records) / len(records),
        "denoiser_evals": sum(d["denoiser_evals"] for d in diagnostics),
        "reward_evals": sum(d["reward_evals"] for d in diagnostics),
        "wall_time_s": sum(d["wall_time_s"] for d in diagnostics),
        "batches": diagnostics,
    }
    (out / "steering.json").write_text(json.dumps(_finite(summary), indent=2, allow_nan=False) + "\n")
    return {"images": len(records), "grid": str(grid), "out": str(out), "family": generator.family,
            "steering": str(out / "steering.json"), "mean_reward": summary["mean_reward"]}


def _finite(value):
    """JSON-safe: tensors to lists, non-finite floats (a zero weight's -inf log-weight) to null."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
