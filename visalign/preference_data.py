"""On-policy preference data: sample a generator, score with a reward, write data sets the loaders read.

For each prompt, ``images_per_prompt`` samples (image ``j`` of every prompt uses seed
``seed * 100003 + j``, whatever the batching) are scored by the reward and written as PNGs with
three jsonl views of the same scores (:func:`visalign.data.load_jsonl` reads each):

- ``pairs.jsonl`` (``pair``: DPO, Flow-DPO, KTO): best vs worst of each prompt
  (``pairs="best-worst"``, the flow_grpo DPO recipe) or every ordered pair (``pairs="all"``);
  pairs whose reward gap is at most ``min_gap`` are dropped and counted (a group whose rewards
  are all equal has no preference: flow_grpo then picks indices 0 and 1, which trains on noise).
- ``rankings.jsonl`` (``ranking``: reward-weighted regression, RankDPO): every image with its
  reward as the score.
- ``feedback.jsonl`` (``feedback``: KTO): an image is good if its reward is at least
  ``good_threshold``, or, without a threshold, if it is above its prompt's median (at the median:
  dropped).

``summary.json`` records the configuration, counts and reward statistics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .config import SINGLE_FILE_CONFIG_HELP, ConfigError, configclass, field

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "testbed"


@configclass
class PreferenceDataConfig:
    model: str = field(str(ASSETS / "sd"), help="generator: diffusers folder, hub id or single file")
    single_file_config: str | None = field(None, help=SINGLE_FILE_CONFIG_HELP)
    lora: str | None = field(None, help="LoRA weights to sample with (on-policy data of a tuned model)")
    reward: str = field("testbed-oracle", help="reward name (rewards.load) or a saved reward folder")
    prompts: str = field("testbed:train", help="'testbed:train', 'testbed:heldout', or a text file of prompts")
    max_prompts: int | None = field(None, help="use the first N prompts only")
    images_per_prompt: int = field(4, help="samples per prompt")
    pairs: str = field("best-worst", help="best-worst (one pair per prompt) or all (every pair with a gap)")
    min_gap: float = field(0.0, help="drop pairs whose reward difference is at most this")
    good_threshold: float | None = field(None, help="feedback: good if reward >= this (default: above the prompt's median)")
    steps: int = field(20, help="sampling steps")
    guidance_scale: float = field(4.0, help="classifier-free guidance")
    seed: int = field(1, help="seed of the initial noise (evaluation uses 0: keep them apart)")
    batch_size: int = field(64, help="images per sampling / scoring batch")
    device: str = field("auto", help="auto, cpu or cuda")
    out: str = field("runs/preference-data", help="output folder (images/, pairs.jsonl, rankings.jsonl, feedback.jsonl)")


def read_prompts(source: str, max_prompts: int | None = None) -> list[str]:
    """Prompts from ``testbed:<split>`` or a text file (one per line)."""
    if source.startswith("testbed:"):
        from .testbed.prompts import load_prompts

        prompts = [record.prompt for record in load_prompts(source.split(":", 1)[1])]
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"prompts file {path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"no prompts in {source}")
    return prompts[:max_prompts] if max_prompts else prompts


def score_images(reward, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Rewards ``[N]`` of ``images`` ``[N, 3, H, W]`` in batches, on the reward's device."""
    device = next((p.device for p in reward.parameters()), torch.device("cpu"))
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].to(device)
            scores.append(reward(chunk, prompts[start : start + batch_size]).float().cpu())
    scores = torch.cat(scores)
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise FloatingPointError(f"the reward returned {bad} non-finite scores")
    return scores


def select_pairs(scores: list[float], mode: str = "best-worst", min_gap: float = 0.0) -> tuple[list[tuple[int, int]], int]:
    """``(winner, loser)`` index pairs of one prompt's scores and the number dropped for a small gap."""
    if mode == "best-worst":
        best = max(range(len(scores)), key=scores.__getitem__)
        worst = min(range(len(scores)), key=scores.__getitem__)
        if scores[best] - scores[worst] > min_gap:
            return [(best, worst)], 0
        return [], 1
    if mode == "all":
        pairs, dropped = [], 0
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                if abs(scores[i] - scores[j]) > min_gap:
                    pairs.append((i, j) if scores[i] > scores[j] else (j, i))
                else:
                    dropped += 1
        return pairs, dropped
    raise ConfigError(f"pairs must be best-worst or all, got {mode!r}")


def feedback_labels(scores: list[float], threshold: float | None = None) -> list[bool | None]:
    """Good / bad per image (``None``: no label, at the prompt's median)."""
    if threshold is not None:
        return [s >= threshold for s in scores]
    ordered = sorted(scores)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
    return [None if s == median else s > median for s in scores]


def _save_sample(array, out: Path, stem: str) -> str:
    """An image as ``<stem>.png``; a clip as the folder ``<stem>/`` of lossless PNG frames (what
    ``data.clips`` reads back, see docs/data.md). Returns the name relative to ``out``."""
    from PIL import Image

    if array.ndim == 3:
        Image.fromarray(array).save(out / f"{stem}.png")
        return f"{stem}.png"
    (out / stem).mkdir(parents=True, exist_ok=True)
    for f, frame in enumerate(array):
        Image.fromarray(frame).save(out / stem / f"frame_{f:03d}.png")
    return stem


def build_preference_data(config: PreferenceDataConfig, generator=None, reward=None, progress: bool = True) -> dict:
    """Sample, score and write; returns the summary (also written to ``out/summary.json``).

    A video model's samples are written as folders of PNG frames, scored by a video reward."""
    from tqdm.auto import tqdm

    import rewards as reward_library

    from .eval.evaluate import sample_for_eval
    from .models import load_generator

    if config.images_per_prompt < 2:
        raise ConfigError("images_per_prompt must be at least 2 to form preferences")
    select_pairs([0.0, 1.0], config.pairs)  # validates the mode before any work
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = read_prompts(config.prompts, config.max_prompts)
    if generator is None:
        generator = load_generator(config.model, device=device, config=config.single_file_config)
        if config.lora:
            generator.load_lora(config.lora)
    if reward is None:
        reward = reward_library.load(config.reward).to(device)
    out = Path(config.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    k = config.images_per_prompt
    pair_rows, ranking_rows, feedback_rows = [], [], []
    all_scores = []
    dropped_pairs = unlabelled = 0
    chunk = max(1, config.batch_size // k)
    bar = tqdm(total=len(prompts), desc="preference data", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), chunk):
        group = prompts[start : start + chunk]
        images = sample_for_eval(generator, group, k, config.steps, config.guidance_scale, config.seed,
                                 batch_size=config.batch_size)
        expanded = [p for p in group for _ in range(k)]
        scores = score_images(reward, images, expanded, config.batch_size)
        # [N, H, W, 3] for images, [N, F, H, W, 3] for a video model's clips.
        pixels = (images.clamp(0, 1).movedim(-3, -1).numpy() * 255).round().astype("uint8")
        for offset, prompt in enumerate(group):
            index = start + offset
            names = []
            for j in range(k):
                names.append(_save_sample(pixels[offset * k + j], out, f"images/{index:06d}_{j}"))
            values = scores[offset * k : (offset + 1) * k].tolist()
            all_scores.extend(values)
            ranking_rows.append({"prompt": prompt, "images": names, "scores": values})
            chosen, dropped = select_pairs(values, config.pairs, config.min_gap)
            dropped_pairs += dropped
            pair_rows += [{"prompt": prompt, "winner": names[w], "loser": names[l],
                           "winner_reward": values[w], "loser_reward": values[l]} for w, l in chosen]
            for name, value, label in zip(names, values, feedback_labels(values, config.good_threshold)):
                if label is None:
                    unlabelled += 1
                else:
                    feedback_rows.append({"prompt": prompt, "image": name, "label": int(label), "reward": value})
        bar.update(len(group))
    bar.close()
    for name, rows in (("pairs", pair_rows), ("rankings", ranking_rows), ("feedback", feedback_rows)):
        with open(out / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    if not pair_rows:
        logger.warning("no pairs: every prompt's rewards were within min_gap=%s", config.min_gap)
    scores = torch.tensor(all_scores)
    summary = {
        "config": {k_: v for k_, v in vars(config).items()},
        "prompts": len(prompts),
        "images": len(all_scores),
        "pairs": len(pair_rows),
        "pairs_dropped_small_gap": dropped_pairs,
        "feedback": {"good": sum(r["label"] for r in feedback_rows),
                     "bad": sum(1 - r["label"] for r in feedback_rows), "unlabelled_at_median": unlabelled},
        "reward": {"mean": scores.mean().item(), "std": scores.std().item() if len(scores) > 1 else 0.0,
                   "min": scores.min().item(), "max": scores.max().item()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
