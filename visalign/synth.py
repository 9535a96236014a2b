"""``visalign dataset synth``: synthetic ranked preference data, the Syn-Pic recipe of RankDPO
(Karthik et al. 2024, Algorithm 1; ALGORITHMS.md §3.1).

For every prompt, ``images_per_generator`` images from each of one or several generators (any
mix of model folders, hub ids and single-file checkpoints), scored by ``n`` rewards; the
preference of image ``i`` is the fraction of pairwise wins it collects over all reward models
(vote-based, not Bradley-Terry)::

    phi_i = #{(v, j): j != i, R_v(x_i) > R_v(x_j)} / (n * (k - 1))          in [0, 1]

Output (``out/``), read by ``load_records("parquet", out)`` as ``ranking`` records
(``scores`` = phi, images sorted by phi descending, stable) or, with ``as_pairs=true``, as every
pair with a phi gap (DPO on the same images)::

    images/0000012_g1_0.png             prompt 12, generator 1, image 0
    part-0000000-0000031.parquet        one row per prompt: prompt_index, prompt, images (paths
                                        relative to out/), scores (phi), rewards (per image: one
                                        score per reward), generators, seeds
    synth.json                               the settings (a resume must match them)
    summary.json                             counts, images/s, agreement between rewards

Resumable: a part file is written atomically after its images, and a run skips every prompt
already in a part, so a crash loses at most the part in progress and never duplicates a
prompt. Sharded: ``shard=i/n`` (or the ranks of ``accelerate launch``) takes the prompts with
``index % n == i``; the shards write into the same folder. Image ``j`` of generator ``g`` for
prompt ``p`` always starts from the same noise (seeded by ``(seed, p, g, j)``), whatever the
sharding, batching or resumption.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError, configclass, field
from .preference_data import read_prompts, score_images

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "testbed"
# Settings that change the data: a resume with different values would mix two data sets.
_FIXED = ("generators", "rewards", "prompts", "images_per_generator", "steps", "guidance_scale", "seed", "height",
          "width")


@configclass
class SynthConfig:
    generators: list[str] = field(default_factory=lambda: [str(ASSETS / "sd"), str(ASSETS / "sd3")],
                                  help="generators: diffusers folders, hub ids or single files (one or several)")
    rewards: list[str] = field(default_factory=lambda: ["testbed-oracle", "testbed-oracle:mode=quality"],
                               help="reward names or saved reward folders; options as name:key=value,key=value")
    prompts: str = field("testbed:train", help="'testbed:train', 'testbed:heldout', or a text file of prompts")
    max_prompts: int | None = field(None, help="use the first N prompts only")
    images_per_generator: int = field(2, help="images per prompt from each generator (k = generators x this)")
    steps: int = field(20, help="sampling steps")
    guidance_scale: float = field(4.0, help="classifier-free guidance")
    height: int | None = field(None, help="image height (default: each generator's)")
    width: int | None = field(None, help="image width (default: each generator's)")
    seed: int = field(1, help="seed of the initial noise")
    batch_size: int = field(16, help="images per sampling / scoring batch")
    prompts_per_part: int = field(32, help="prompts per parquet part: the unit a crash can lose")
    shard: str | None = field(None, help="'i/n': this process takes the prompts with index % n == i "
                                         "(default: the accelerate rank, else 0/1)")
    device: str = field("auto", help="auto, cpu or cuda")
    dtype: str | None = field(None, help="generator dtype (float16, bfloat16; default float32)")
    progress: bool = field(True, help="show a progress bar")
    out: str = field("runs/synth", help="output folder (images/, part-*.parquet, summary.json)")


# ------------------------------------------------------------------------------------ the math


def vote_preference(scores: Tensor) -> Tensor:
    """Syn-Pic's phi from reward scores ``[..., n_rewards, k]`` → ``[..., k]``: the share of
    (reward, other image) pairs that image ``i`` wins strictly. Ties win for neither."""
    n, k = scores.shape[-2:]
    if k < 2:
        raise ValueError(f"phi needs at least 2 images per prompt, got {k}")
    wins = (scores.unsqueeze(-1) > scores.unsqueeze(-2)).sum(dim=(-3, -1))
    return wins.double() / (n * (k - 1))


def reward_agreement(scores: Tensor) -> Tensor:
    """Agreement of reward models ``[n, n]`` from scores ``[prompts, n, k]``: over the image pairs
    of each prompt that both rewards order strictly, the share they order the same way (NaN
    when there are none)."""
    diff = torch.sign(scores.unsqueeze(-1) - scores.unsqueeze(-2))  # [P, n, k, k]
    upper = torch.triu(torch.ones(scores.shape[-1], scores.shape[-1], dtype=torch.bool), diagonal=1)
    diff = diff[..., upper]  # [P, n, pairs]
    both = (diff.unsqueeze(2) != 0) & (diff.unsqueeze(1) != 0)  # [P, n, n, pairs]
    same = (diff.unsqueeze(2) == diff.unsqueeze(1)) & both
    return same.sum(dim=(0, 3)).double() / both.sum(dim=(0, 3)).double()


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)``; ``None`` → the rank and world size of ``accelerate launch`` /
    ``torchrun`` (environment ``RANK`` / ``WORLD_SIZE``), else ``(0, 1)``."""
    if shard is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise ConfigError(f"shard must look like 'i/n' (e.g. 0/4), got {shard!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"shard {shard!r}: need 0 <= i < n")
    return index, count


def noise_seed(seed: int, prompt_index: int, generator_index: int, image_index: int) -> int:
    return int(np.random.SeedSequence([seed, prompt_index, generator_index, image_index]).generate_state(1)[0])


def parse_reward_spec(spec: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:key=value,key=value"`` (values parsed as YAML)."""
    import yaml

    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigError(f"reward {spec!r}: options must be key=value, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    return name, options


# ------------------------------------------------------------------------------------ output


def _read_parts(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for path in sorted(out.glob("part-*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def _write_part(out: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    first, last = rows[0]["prompt_index"], rows[-1]["prompt_index"]
    path = out / f"part-{first:07d}-{last:07d}.parquet"
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), temporary)
    os.replace(temporary, path)  # atomic: a part is either complete or absent
    return path


def _check_settings(out: Path, config: SynthConfig, reward_names: list[str], generator_names: list[str]) -> None:
    settings = {key: getattr(config, key) for key in _FIXED}
    settings.update(reward_names=reward_names, generator_names=generator_names)
    path = out / "synth.json"
    if path.is_file():
        existing = json.loads(path.read_text())
        changed = sorted(key for key in settings if existing.get(key) != settings[key])
        if changed:
            raise ConfigError(
                f"{out} holds a synth data set made with other settings ({', '.join(changed)}: "
                f"{[existing.get(k) for k in changed]} there, {[settings[k] for k in changed]} now); "
                "use another out folder or the same settings to resume")
        return
    temporary = out / f".synth.json.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(temporary, path)


def dataset_summary(out: str | os.PathLike) -> dict:
    """Counts and reward agreement of the data set in ``out`` (every part written so far)."""
    out = Path(out)
    rows = _read_parts(out)
    settings = json.loads((out / "synth.json").read_text())
    names = settings["reward_names"]
    summary = {"prompts": len(rows), "images": sum(len(r["images"]) for r in rows), "reward_names": names}
    if not rows:
        return summary
    scores = torch.tensor([r["rewards"] for r in rows], dtype=torch.float64).transpose(1, 2)  # [P, n, k]
    agreement = reward_agreement(scores)
    phi = torch.tensor([r["scores"] for r in rows])
    summary.update(
        prompts_without_preference=int((phi.max(dim=1).values == phi.min(dim=1).values).sum()),
        ordered_pairs=int((phi.unsqueeze(2) > phi.unsqueeze(1)).sum()),
        reward_agreement={f"{names[a]} vs {names[b]}": round(float(agreement[a, b]), 4)
                          for a in range(len(names)) for b in range(a + 1, len(names))},
        reward_ties={name: round(float((scores[:, v].unsqueeze(2) == scores[:, v].unsqueeze(1)).float()
                                       .triu(diagonal=1).sum() / (len(rows) * scores.shape[-1] * (scores.shape[-1] - 1) / 2)), 4)
                     for v, name in enumerate(names)},
        reward_mean={name: float(scores[:, v].mean()) for v, name in enumerate(names)},
        wins_by_generator=_wins_by_generator(rows),
    )
    return summary


def _wins_by_generator(rows: list[dict]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for row in rows:
        for name, phi in zip(row["generators"], row["scores"]):
            totals.setdefault(name, []).append(phi)
    return {name: round(float(np.mean(values)), 4) for name, values in totals.items()}


# ------------------------------------------------------------------------------------ the run


def build_synth(config: SynthConfig, generators: dict | None = None, rewards: dict | None = None,
                stop_after_parts: int | None = None) -> dict:
    """Generate, score, rank and write this shard's missing prompts; returns the summary.

    ``generators`` / ``rewards``: already built objects by name (tests, benchmarks); default:
    loaded from ``config``. ``stop_after_parts``: return after writing that many parts (tests
    of resumption).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    if config.images_per_generator < 1:
        raise ConfigError("images_per_generator must be at least 1")
    if config.batch_size < 1 or config.prompts_per_part < 1:
        raise ConfigError("batch_size and prompts_per_part must be at least 1")
    shard_index, shard_count = parse_shard(config.shard)
    device = config.device
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if generators is None:
        from .models import load_generator

        generators = {path: load_generator(path, device=device, torch_dtype=config.dtype) for path in config.generators}
    if rewards is None:
        import rewards as reward_library

        rewards = {}
        for spec in config.rewards:
            name, options = parse_reward_spec(spec)
            rewards[spec] = reward_library.load(name, **options).to(device).eval()
    generator_names, reward_names = list(generators), list(rewards)
    k = len(generators) * config.images_per_generator
    if k < 2:
        raise ConfigError(f"k = generators x images_per_generator = {k}: need at least 2 images per prompt")
    if not reward_names:
        raise ConfigError("rewards: name at least one reward")

    out = Path(config.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    _check_settings(out, config, reward_names, generator_names)
    prompts = read_prompts(config.prompts, config.max_prompts)
    done = {row["prompt_index"] for row in _read_parts(out)}
    mine = [p for p in range(len(prompts)) if p % shard_count == shard_index]
    todo = [p for p in mine if p not in done]

    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"synth {shard_index}/{shard_count}",
               unit="prompt", disable=not config.progress)
    start = time.perf_counter()
    timings = {"sample_s": 0.0, "score_s": 0.0, "write_s": 0.0}
    images_made = parts = 0
    for first in range(0, len(todo), config.prompts_per_part):
        group = todo[first : first + config.prompts_per_part]
        per_image: list[list[dict]] = [[] for _ in group]  # per prompt: one entry per image
        for g, (generator_name, generator) in enumerate(generators.items()):
            mark = time.perf_counter()
            images = _sample(generator, prompts, group, g, config)
            timings["sample_s"] += time.perf_counter() - mark
            mark = time.perf_counter()
            expanded = [prompts[p] for p in group for _ in range(config.images_per_generator)]
            scores = torch.stack([score_images(reward, images, expanded, config.batch_size)
                                  for reward in rewards.values()], dim=1)  # [N, n_rewards]
            timings["score_s"] += time.perf_counter() - mark
            mark = time.perf_counter()
            pixels = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
            for row, p in enumerate(group):
                for j in range(config.images_per_generator):
                    flat = row * config.images_per_generator + j
                    name = f"images/{p:07d}_g{g}_{j}.png"
                    Image.fromarray(pixels[flat]).save(out / name)
                    per_image[row].append({"image": name, "generator": generator_name,
                                           "seed": noise_seed(config.seed, p, g, j), "rewards": scores[flat].tolist()})
            timings["write_s"] += time.perf_counter() - mark
            images_made += len(images)
        mark = time.perf_counter()
        rows = []
        for p, entries in zip(group, per_image):
            phi = vote_preference(torch.tensor([e["rewards"] for e in entries], dtype=torch.float64).T)
            order = torch.sort(-phi, stable=True).indices.tolist()  # best first; ties keep generation order
            rows.append({
                "prompt_index": p, "prompt": prompts[p],
                "images": [entries[i]["image"] for i in order], "scores": [float(phi[i]) for i in order],
                "rewards": [entries[i]["rewards"] for i in order],
                "generators": [entries[i]["generator"] for i in order], "seeds": [entries[i]["seed"] for i in order],
            })
        _write_part(out, rows)
        timings["write_s"] += time.perf_counter() - mark
        parts += 1
        bar.update(len(group))
        if stop_after_parts is not None and parts >= stop_after_parts:
            break
    bar.close()
    elapsed = time.perf_counter() - start
    summary = dataset_summary(out)
    summary["this_run"] = {
        "shard": f"{shard_index}/{shard_count}", "prompts_skipped_as_done": len(mine) - len(todo),
        "images": images_made, "seconds": round(elapsed, 3),
        "images_per_s": round(images_made / elapsed, 4) if images_made else None,
        **{key: round(value, 3) for key, value in timings.items()},
    }
    name = "summary.json" if shard_count == 1 else f"summary-{shard_index}of{shard_count}.json"
    temporary = out / f".{name}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(temporary, out / name)
    return summary


def _sample(generator, prompts: list[str], group: list[int], generator_index: int, config: SynthConfig) -> Tensor:
    """``[len(group) * images_per_generator, 3, H, W]`` in [0, 1], float32 on the CPU."""
    shape = generator.latent_shape(1, config.height, config.width)[1:]
    items = [(p, j) for p in group for j in range(config.images_per_generator)]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        noise_seed(config.seed, p, generator_index, j))) for p, j in items])
    images = []
    with torch.no_grad():
        for begin in range(0, len(items), config.batch_size):
            batch = items[begin : begin + config.batch_size]
            latents = noise[begin : begin + len(batch)].to(device=generator.device, dtype=generator.dtype)
            result = generator.sample([prompts[p] for p, _ in batch], latents=latents, height=config.height,
                                      width=config.width, num_inference_steps=config.steps,
                                      guidance_scale=config.guidance_scale)
            images.append(result.images.float().cpu())
    return torch.cat(images)
