"""Efficacy of the reward-gradient methods on the testbed (issue 8): do DRaFT, AlignProp and ReFL
raise the differentiable reward they climb, and the held-out oracle accuracy, over the base model?

1. Each objective trains a LoRA on the testbed SD model with the shared trainer, prompts from the
   *train* split, backpropagating a differentiable reward.
2. Base and tuned models are evaluated on the *held-out* prompts with ``--eval-seeds`` noise seeds
   (the same for every model) by the testbed oracle (accuracy, the ground truth) and by the
   trained-on reward (its mean). Reward gain vs oracle gain shows (and bounds) reward hacking.

The reward: ``testbed-reward`` (the shipped learned HPS-style scorer; the other shipped testbed
rewards are evaluated too), or ``--reward colour``: a differentiable proxy built here, **not** a
learned reward. For each colour the prompt names it measures the soft share of pixels near the
renderer's palette colour (``exp(-|x - rgb|^2 / (2 * 0.15^2))``), rewards it up to 4% of the
image per named object, and penalises the share of palette colours the prompt does not name. It
knows nothing of shapes, counts or positions, and it can be hacked (colour blobs).

    python benchmarks/efficacy_reward_grad.py                        # all three methods
    python benchmarks/efficacy_reward_grad.py --methods draft --steps 60 --reward colour
    python benchmarks/efficacy_reward_grad.py --methods draft,draft-k,draft-full   # DRaFT-LV, -K (K=1), full

Methods: ``draft`` (DRaFT-LV, n = 2), ``draft-k`` (DRaFT-K, K = 1), ``draft-full`` (all N steps),
``alignprop`` (gaussian cut per trajectory), ``refl``.

Writes ``<out>/efficacy.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

METHOD_OPTIONS = {  # testbed scale: N = 10 sampler steps; "draft-k" / "draft-full" train the draft objective
    "draft": {"variant": "lv", "lv_copies": 2},
    "draft-k": {"variant": "k", "k": 1},
    "draft-full": {"variant": "full"},
    "alignprop": {"truncation": "gaussian", "truncation_mean": 8.0, "truncation_std": 1.0, "loss_scale": 1.0},
    "refl": {"min_step": 7, "max_step": 9, "loss": "relu", "target": 2.0, "loss_scale": 1.0},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "testbed" / "sd"))
    parser.add_argument("--reward", default=None, help="testbed-reward (default when it loads), colour, or a reward name")
    parser.add_argument("--methods", default="draft,refl,alignprop")
    parser.add_argument("--steps", type=int, default=30, help="optimisation steps per method")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--eval-seeds", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=1, help="held-out images per prompt per seed")
    parser.add_argument("--eval-prompts", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/efficacy-reward-grad")
    parser.add_argument("--loras", default=None, metavar="DIR",
                        help="evaluate the LoRAs an earlier run wrote (DIR/<method>/lora) instead of training: "
                             "more evaluation seeds for the same fine-tunes")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m and m not in METHOD_OPTIONS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {sorted(METHOD_OPTIONS)}")
    return args


def colour_reward():
    """The differentiable colour proxy described in the module docstring."""
    import rewards
    from visalign.testbed.prompts import COLOURS, parse_prompt
    from visalign.testbed.render import PALETTE

    palette = torch.tensor([PALETTE[c] for c in COLOURS])  # [4, 3]
    share_per_object, width = 0.04, 0.15

    def score(images, prompts):
        distance = (images[:, None] - palette.to(images)[None, :, :, None, None]).pow(2).sum(dim=2)  # [B, 4, H, W]
        share = torch.exp(-distance / (2 * width**2)).mean(dim=(2, 3))  # [B, 4]
        wanted = torch.zeros(len(prompts), len(COLOURS))
        for row, prompt in enumerate(prompts):
            for obj in parse_prompt(prompt).objects:
                if obj.colour is not None:
                    wanted[row, COLOURS.index(obj.colour)] += obj.count
        wanted = wanted.to(images)
        named = (share / (share_per_object * wanted.clamp(min=1))).clamp(max=1.0) * (wanted > 0)
        unnamed = share / share_per_object * (wanted == 0)
        return named.sum(1) / (wanted > 0).sum(1).clamp(min=1) - 0.5 * unnamed.mean(1)

    return rewards.FunctionReward(score, name="colour", differentiable=True)


def resolve_reward(name: str | None) -> str:
    import rewards

    if name in (None, "testbed-reward"):
        try:
            rewards.load("testbed-reward")
            return "testbed-reward"
        except FileNotFoundError:
            if name == "testbed-reward":
                raise
            print("testbed-reward is not shipped yet: using the colour proxy", file=sys.stderr)
            name = "colour"
    if name == "colour":
        rewards.register("efficacy-colour", colour_reward, overwrite=True)
        return "efficacy-colour"
    return name


def train_method(method: str, reward: str, args, out: Path) -> tuple[Path, list[dict]]:
    from visalign.config import load_config
    from visalign.training import TrainConfig, train

    options = {"reward": reward, "prompts": "testbed:train", "num_inference_steps": args.sample_steps,
               "guidance_scale": args.guidance_scale, "eta": 0.0, **METHOD_OPTIONS[method]}
    config = load_config(TrainConfig, data={
        "model": {"path": args.model, "finetune": "lora", "lora": {"rank": args.rank, "alpha": args.rank}},
        "objective": method.split("-")[0], "options": options,
        "optim": {"lr": args.lr, "weight_decay": 0.0, "max_grad_norm": 1.0},
        "batch_size": args.batch_size, "max_steps": args.steps, "seed": args.seed, "output_dir": str(out / method),
        "checkpoint_every": 0, "log_every": 5,
    })
    result = train(config)
    logged = [json.loads(line) for line in (out / method / "logs" / "metrics.jsonl").read_text().splitlines()]
    return result.final_weights, logged


def summarise(name: str, reports: list[dict], base: list[dict], optimised: str) -> dict:
    """efficacy_preference's row (accuracy, its paired gain and s.e., per-reward mean gains), plus the
    optimised reward's mean, its gain's s.e., and the oracle's quality score."""
    from efficacy_preference import summarise as preference_summary

    row = preference_summary(name, reports, base)
    gains = [r["rewards"][optimised] - b["rewards"][optimised] for r, b in zip(reports, base)]
    row.update(reward_mean=statistics.mean(r["rewards"][optimised] for r in reports),
               reward_gain_stderr=statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("nan"),
               quality=statistics.mean(r["quality"] for r in reports))
    return row


def main(argv=None):
    args = parse_args(argv)
    from efficacy_preference import evaluate_seeds, watched_rewards
    from visalign.testbed.prompts import load_prompts

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reward_name = resolve_reward(args.reward)
    watch = watched_rewards(reward_name)
    prompts = [r.prompt for r in load_prompts("heldout")][: args.eval_prompts]
    timings, rows, curves = {}, [], {}
    mark = time.perf_counter()
    base = evaluate_seeds(args.model, None, args, prompts, watch)
    timings["eval_base_s"] = time.perf_counter() - mark
    rows.append(summarise("base", base, base, reward_name))
    base_spread = statistics.stdev(r["accuracy"] for r in base) if len(base) > 1 else float("nan")

    def write():  # after every method, so a cut-short run keeps what it measured
        result = {"args": vars(args), "reward": reward_name, "base_seed_std": base_spread, "rows": rows,
                  "training_curves": curves, "timings_s": timings}
        (out / "efficacy.json").write_text(json.dumps(result, indent=2))

    write()
    for method in [m for m in args.methods.split(",") if m]:
        mark = time.perf_counter()
        if args.loras:
            lora = Path(args.loras) / method / "lora"
            if not lora.is_dir():
                raise FileNotFoundError(f"--loras: no LoRA at {lora}")
        else:
            lora, logged = train_method(method, reward_name, args, out)
            timings[f"{method}_train_s"] = time.perf_counter() - mark
            curves[method] = [{k: row.get(k) for k in ("step", "reward", "loss", "grad_norm")} for row in logged]
        mark = time.perf_counter()
        rows.append(summarise(method, evaluate_seeds(args.model, str(lora), args, prompts, watch), base, reward_name))
        timings[f"{method}_eval_s"] = time.perf_counter() - mark
        write()
    print(f"\nmodel {args.model}; reward {reward_name}; {args.steps} steps x batch {args.batch_size}, lr {args.lr}, "
          f"LoRA r{args.rank}; N = {args.sample_steps} steps, CFG {args.guidance_scale}; held-out: {len(prompts)} prompts x "
          f"{args.eval_images} images x {args.eval_seeds} seeds; base seed-to-seed std {base_spread:.4f}\n")
    categories = list(rows[0]["per_category"])
    others = [name for name in rows[0]["reward_gain"] if name != reward_name]
    print(f"| model | held-out accuracy | accuracy gain (± s.e.) | {reward_name} | its gain (± s.e.) | "
          + "".join(f"{name} gain | " for name in others) + "quality | " + " | ".join(categories) + " |")
    print("|---|---|---|---|---|" + "---|" * (len(others) + 1) + "---|" * len(categories))
    for row in rows:
        if row["model"] == "base":
            gain = reward_gain = "—"
            other = "— | " * len(others)
        else:
            gain = f"{row['gain_mean']:+.3f} ± {row['gain_stderr']:.3f}"
            reward_gain = f"{row['reward_gain'][reward_name]:+.3f} ± {row['reward_gain_stderr']:.3f}"
            other = "".join(f"{row['reward_gain'][name]:+.3f} | " for name in others)
        print(f"| {row['model']} | {row['accuracy_mean']:.3f} | {gain} | {row['reward_mean']:.3f} | {reward_gain} | "
              f"{other}{row['quality']:.3f} | " + " | ".join(f"{row['per_category'][c]:.2f}" for c in categories) + " |")
    print(f"\ntimings: {json.dumps({k: round(v) for k, v in timings.items()})}", file=sys.stderr)


if __name__ == "__main__":
    main()
