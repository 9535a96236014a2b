"""Figures for the docs: rendered scenes per prompt category, and what a model samples for
held-out prompts of each category (marked right or wrong by the oracle).

    python -m visalign.testbed.figures docs/img/testbed_scenes.png
    python -m visalign.testbed.figures --samples assets/testbed/sd docs/img/testbed_samples_sd.png
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np

from visalign.testbed.prompts import CATEGORIES, all_prompts
from visalign.testbed.render import render, scene_for_prompt


def _category_grid(images, titles: list[str], per_category: int, path: str | Path, colours=None) -> Path:
    """Draw ``images`` (``[N, 3, H, W]`` in [0, 1], ``per_category`` per category in
    :data:`CATEGORIES` order) in one row per category, each titled; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(CATEGORIES), per_category, figsize=(1.55 * per_category, 1.9 * len(CATEGORIES)),
                                squeeze=False)
    for index, (image, title) in enumerate(zip(images, titles)):
        row, column = divmod(index, per_category)
        axis = axes[row, column]
        axis.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(title, fontsize=6.5, color=colours[index] if colours else "black")
        if column == 0:
            axis.set_ylabel(CATEGORIES[row], fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def scene_grid(path: str | Path, per_category: int = 6, size: int = 32, seed: int = 0) -> Path:
    """Write a PNG with one row per category: ``per_category`` random prompts and a render of each."""
    rng = np.random.default_rng(seed)
    specs = all_prompts()
    images, titles = [], []
    for category in CATEGORIES:
        pool = [spec for spec in specs if spec.category == category]
        for index in rng.choice(len(pool), size=per_category, replace=len(pool) < per_category):
            spec = pool[index]
            images.append(render(scene_for_prompt(spec, rng), size))
            titles.append("\n".join(textwrap.wrap(spec.text, 22)))
    return _category_grid(images, titles, per_category, path)


def sample_grid(model: str | Path, path: str | Path, per_category: int = 6, num_inference_steps: int = 20,
                guidance_scale: float = 4.0, seed: int = 0) -> Path:
    """Write a PNG with one row per category: ``model``'s sample for ``per_category`` held-out
    prompts, each titled with its prompt and the oracle's verdict (``ok`` / ``wrong``).
    Image ``j`` starts from the same noise whatever the model (``visalign.eval`` seeding)."""
    from ..eval.evaluate import sample_for_eval
    from ..models import load_generator
    from .oracle import oracle
    from .prompts import load_prompts

    rng = np.random.default_rng(seed)
    records = load_prompts("heldout")
    chosen = []
    for category in CATEGORIES:
        pool = [record.prompt for record in records if record.category == category]
        chosen += [pool[i] for i in rng.choice(len(pool), size=per_category, replace=len(pool) < per_category)]
    images = sample_for_eval(load_generator(model), chosen, 1, num_inference_steps, guidance_scale, seed)
    correct = oracle(images, chosen).correct.tolist()
    titles = ["\n".join(textwrap.wrap(prompt, 22)) + ("\n[ok]" if ok else "\n[wrong]") for prompt, ok in zip(chosen, correct)]
    return _category_grid(images, titles, per_category, path, ["black" if ok else "firebrick" for ok in correct])


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] == ["--samples"]:
        print(sample_grid(arguments[1], arguments[2] if len(arguments) > 2 else "docs/img/testbed_samples.png"))
    else:
        print(scene_grid(arguments[0] if arguments else "docs/img/testbed_scenes.png"))
