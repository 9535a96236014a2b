"""The yardstick every algorithm is judged by.

:func:`evaluate` samples ``images_per_prompt`` images for each prompt with fixed seeds and
reports: the testbed oracle's accuracy (per image, per GenEval category, and GenEval's overall
score, the mean over categories) and quality, the
mean of any learned rewards, **diversity** (mean pairwise pixel RMS distance between the
images of one prompt) and **drift** (mean pixel RMS distance to the images a base model makes
from the same prompts and initial noise). The gap between a learned reward's gain and the
oracle's gain is how reward hacking shows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch


@dataclass
class EvalReport:
    accuracy: float
    per_category: dict[str, float]
    quality: float
    rewards: dict[str, float]
    diversity: float
    drift: float | None
    num_images: int
    geneval_score: float = float("nan")  # mean of per_category (GenEval's overall score)
    recall: dict[str, float] = field(default_factory=dict)  # the oracle's per-attribute recall
    prompts: list[str] = field(repr=False, default_factory=list)
    images: torch.Tensor | None = field(default=None, repr=False)

    def summary(self) -> dict:
        values = asdict(self)
        values.pop("images")
        values.pop("prompts")
        return values


@torch.no_grad()
def sample_for_eval(generator, prompts: Sequence[str], images_per_prompt: int, num_inference_steps: int,
                    guidance_scale: float, seed: int, batch_size: int = 64, eta: float = 0.0,
                    on_step_end=None) -> torch.Tensor:
    """``[len(prompts) * images_per_prompt, 3, H, W]``; image ``j`` of prompt ``i`` uses seed ``seed + j``
    whatever the batching, so two models see the same initial noise.

    ``eta > 0`` samples stochastically (the step noise seeded per batch); ``on_step_end`` is
    passed to :meth:`Generator.sample` for every batch, in order (e.g. to keep x0-predictions)."""
    shape = generator.latent_shape(1)
    noise = torch.stack([
        torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed * 100_003 + j))
        for _ in prompts for j in range(images_per_prompt)
    ])
    expanded = [p for p in prompts for _ in range(images_per_prompt)]
    images = []
    for start in range(0, len(expanded), batch_size):
        latents = noise[start : start + batch_size].to(device=generator.device, dtype=generator.dtype)
        steps_rng = torch.Generator(generator.device).manual_seed(seed * 7919 + start) if eta > 0 else None
        out = generator.sample(expanded[start : start + batch_size], latents=latents,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                               generator=steps_rng, on_step_end=on_step_end)
        images.append(out.images.float().cpu())
    return torch.cat(images)


def _pairwise_rms(images: torch.Tensor, group: int) -> float:
    if group < 2:
        return float("nan")
    grouped = images.reshape(-1, group, *images.shape[1:]).flatten(2)
    distances = torch.cdist(grouped, grouped) / grouped.shape[-1] ** 0.5
    mask = ~torch.eye(group, dtype=torch.bool)
    return float(distances[:, mask].mean())


def evaluate(generator, prompts: Sequence[str], *, images_per_prompt: int = 4, num_inference_steps: int = 20,
             guidance_scale: float = 4.0, seed: int = 0, rewards: dict | None = None, base=None,
             keep_images: bool = True) -> EvalReport:
    """Evaluate ``generator`` on testbed ``prompts``; ``base`` (a Generator) enables the drift figure."""
    from ..testbed.oracle import oracle

    prompts = list(prompts)
    images = sample_for_eval(generator, prompts, images_per_prompt, num_inference_steps, guidance_scale, seed)
    expanded = [p for p in prompts for _ in range(images_per_prompt)]
    verdict = oracle(images, expanded)
    reward_means = {}
    for name, reward in (rewards or {}).items():
        with torch.no_grad():
            reward_means[name] = float(reward(images, expanded).float().mean())
    drift = None
    if base is not None:
        base_images = sample_for_eval(base, prompts, images_per_prompt, num_inference_steps, guidance_scale, seed)
        drift = float(((images - base_images).flatten(1).pow(2).mean(1).sqrt()).mean())
    return EvalReport(
        accuracy=verdict.accuracy,
        per_category=dict(verdict.per_category),
        quality=float(verdict.quality.mean()),
        rewards=reward_means,
        diversity=_pairwise_rms(images, images_per_prompt),
        drift=drift,
        num_images=len(images),
        geneval_score=verdict.geneval_score,
        recall=dict(verdict.recall),
        prompts=prompts,
        images=images if keep_images else None,
    )


def write_report(reports: dict[str, EvalReport], directory: str | Path, images_per_prompt: int,
                 grid_prompts: int = 12) -> Path:
    """Markdown + JSON + one PNG grid per model + a per-category bar plot; returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..images import save_labelled_grid

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["# visalign evaluation", "",
             "Oracle accuracy is per image; the GenEval score is the mean of the per-category accuracies "
             "(GenEval's overall figure).", "",
             "| model | oracle accuracy | GenEval score | quality | diversity | drift | rewards |",
             "|---|---|---|---|---|---|---|"]
    for name, report in reports.items():
        rewards = ", ".join(f"{k} {v:.3f}" for k, v in report.rewards.items()) or "-"
        drift = f"{report.drift:.4f}" if report.drift is not None else "-"
        lines.append(f"| {name} | {report.accuracy:.3f} | {report.geneval_score:.3f} | {report.quality:.3f} | {report.diversity:.4f} | {drift} | {rewards} |")
    categories = sorted({c for r in reports.values() for c in r.per_category})
    lines += ["", "Per category (oracle accuracy):", "", "| model | " + " | ".join(categories) + " |",
              "|---|" + "---|" * len(categories)]
    for name, report in reports.items():
        lines.append(f"| {name} | " + " | ".join(f"{report.per_category.get(c, float('nan')):.2f}" for c in categories) + " |")
    kinds = list(dict.fromkeys(kind for report in reports.values() for kind in report.recall))
    if kinds:
        lines += ["", "Which parts of the prompts the images get (share of named colours / shapes / colour-shape "
                  "pairs found on some object, counts and relations ignored):", "",
                  "| model | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for name, report in reports.items():
            lines.append(f"| {name} | " + " | ".join(f"{report.recall.get(k, float('nan')):.2f}" for k in kinds) + " |")
    for name, report in reports.items():
        if report.images is None:
            continue
        count = min(grid_prompts, len(report.prompts))
        grid = save_labelled_grid(report.images[: count * images_per_prompt], report.prompts[:count],
                                  directory / f"grid-{name}.png", per_row=images_per_prompt)
        lines += ["", f"![{name}]({grid.name})"]
    figure, axis = plt.subplots(figsize=(1.2 * len(categories) + 2, 3))
    width = 0.8 / max(len(reports), 1)
    for offset, (name, report) in enumerate(reports.items()):
        xs = [i + offset * width for i in range(len(categories))]
        axis.bar(xs, [report.per_category.get(c, 0.0) for c in categories], width=width, label=name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories, rotation=20, fontsize=8)
    axis.set_ylabel("oracle accuracy")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(directory / "per_category.png", dpi=100)
    plt.close(figure)
    lines += ["", "![per category](per_category.png)", ""]
    (directory / "report.json").write_text(json.dumps({k: r.summary() for k, r in reports.items()}, indent=2))
    path = directory / "report.md"
    path.write_text("\n".join(lines))
    return path
