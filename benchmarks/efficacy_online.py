"""Efficacy of online reward fine-tuning on the testbed (issue 11): PRDP next to DDPO (and
optionally Flow-GRPO) on the same budget, with curves of held-out oracle accuracy.

Every method trains a LoRA on the testbed SD model with the shared trainer, online: every
``--refresh-every`` optimisation steps it samples ``--group-size`` images for each of
``--prompts-per-refresh`` random *train* prompts (of all 181) with the current weights, scores
them with the reward (black box; default the testbed oracle, 1 when the image shows the prompt),
and trains on the stored transitions. Same seed, prompts, sampled images per refresh, optimisation
steps, learning rate and LoRA for every method. Every ``--eval-every`` steps the policy is
evaluated on the *held-out* prompts (fixed noise seeds, deterministic 20-step DDIM, CFG 4, the
same images for every model at step 0).

    nice -n 5 python benchmarks/efficacy_online.py --methods prdp,ddpo --out runs/efficacy_online

Writes ``<out>/efficacy_online_<methods>.json`` (curves: held-out accuracy, training reward) and prints a
markdown table.
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

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "testbed" / "sd"))
    parser.add_argument("--reward", default=None, help="default: testbed-reward if shipped, else testbed-oracle; "
                                                      "'brightness' (mean pixel value) is a diagnostic any policy "
                                                      "can move")
    parser.add_argument("--methods", default="prdp,ddpo")
    parser.add_argument("--steps", type=int, default=40, help="optimisation steps per method")
    parser.add_argument("--refresh-every", type=int, default=4)
    parser.add_argument("--prompts-per-refresh", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--timestep-fraction", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32, help="transitions (DDPO) or pair-steps (PRDP) per step")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--beta", type=float, default=10.0, help="PRDP beta")
    parser.add_argument("--clip-range", type=float, default=1e-4)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-stride", type=int, default=1,
                        help="every k-th held-out prompt (the file is sorted by category; 2 keeps 48 of 95)")
    parser.add_argument("--eval-images", type=int, default=2)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only-base", action="store_true", help="evaluate the base model only")
    parser.add_argument("--no-base", dest="base", action="store_false", default=True,
                        help="skip the base model's evaluation (run it in one of several parallel processes)")
    parser.add_argument("--out", default="runs/efficacy_online")
    return parser.parse_args(argv)


def register_brightness() -> None:
    """Register ``brightness``, the mean pixel value in [0, 1], as a diagnostic reward (not in the
    library): the background colour decides most of it, so any working online objective can raise
    it. It tells an objective that cannot optimise at all from a reward that gives it little to
    learn at this budget."""
    import rewards

    def brightness() -> rewards.Reward:
        return rewards.FunctionReward(lambda images, prompts: images.float().mean(dim=(1, 2, 3)), name="brightness",
                                      differentiable=True)

    if "brightness" not in rewards.available():
        rewards.register("brightness", brightness, description="mean pixel value (efficacy_online's diagnostic)")


def default_reward() -> str:
    import rewards

    return "testbed-reward" if "testbed-reward" in rewards.available() and _reward_shipped() else "testbed-oracle"


def _reward_shipped() -> bool:
    return (ROOT / "assets" / "testbed" / "reward").is_dir()


def eval_accuracy(generator, prompts, args) -> dict:
    from visalign.eval import evaluate

    report = evaluate(generator, prompts, images_per_prompt=args.eval_images, num_inference_steps=args.sample_steps,
                      guidance_scale=args.guidance_scale, seed=100, keep_images=False, rewards=_eval_rewards(args))
    return {"accuracy": report.accuracy, "per_category": report.per_category, "quality": report.quality,
            "rewards": report.rewards}


_REWARDS = {}


def _eval_rewards(args) -> dict:
    """The training reward on the held-out images too (when it is a learned one, not the oracle)."""
    import rewards

    name = args.reward or default_reward()
    if name != "testbed-oracle" and name not in _REWARDS:
        _REWARDS[name] = rewards.load(name)
    return {k: v for k, v in _REWARDS.items() if k == name}


def method_options(method: str, args, reward: str) -> dict:
    options = {"rewards": {reward: 1.0}, "prompts": "testbed:train", "prompts_per_refresh": args.prompts_per_refresh,
               "group_size": args.group_size, "refresh_every": args.refresh_every,
               "num_inference_steps": args.sample_steps, "guidance_scale": args.guidance_scale,
               "timestep_fraction": args.timestep_fraction, "clip_range": args.clip_range}
    if method == "prdp":
        options["beta"] = args.beta
    elif method == "grpo":
        options["eta"] = 1.0  # DDIM eta on the diffusion testbed model
    return options


def run_method(method: str, args, reward: str, prompts, out: Path) -> dict:
    from visalign.config import load_config
    from visalign.training import TrainConfig, Trainer

    curve = []

    def evaluate_now(trainer, step):
        mark = time.perf_counter()
        result = eval_accuracy(trainer.generator, prompts, args)
        curve.append({"step": step, **result, "eval_s": time.perf_counter() - mark})
        print(f"[{method}] step {step}: held-out accuracy {result['accuracy']:.3f}", file=sys.stderr, flush=True)
        return {"heldout_accuracy": result["accuracy"]}

    config = load_config(TrainConfig, data={
        "model": {"path": args.model, "finetune": "lora", "lora": {"rank": args.rank, "alpha": args.rank}},
        "objective": method, "options": method_options(method, args, reward),
        "optim": {"lr": args.lr, "weight_decay": 1e-4, "max_grad_norm": 1.0},
        "batch_size": args.batch_size, "max_steps": args.steps, "seed": args.seed, "output_dir": str(out / method),
        "checkpoint_every": 0, "log_every": 1, "eval_every": args.eval_every,
    })
    start = time.perf_counter()
    Trainer(config, callbacks=[evaluate_now]).train()
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / method / "logs" / "metrics.jsonl").read_text().splitlines()]
    # Evaluation rows share a step with the training row; only the training row has reward_mean.
    refreshes = [r for r in rows if (r["step"] - 1) % args.refresh_every == 0 and "reward_mean" in r]
    return {"method": method, "curve": curve, "wall_s": wall,
            "train_reward": [{"step": r["step"], "reward_mean": r.get("reward_mean")} for r in refreshes],
            "last_metrics": rows[-1]}


def main(argv=None):
    args = parse_args(argv)
    from visalign.models import load_generator
    from visalign.testbed.prompts import load_prompts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    register_brightness()
    reward = args.reward or default_reward()
    prompts = [r.prompt for r in load_prompts("heldout")][:: args.eval_stride]
    base = {"accuracy": float("nan")}
    if args.base:
        mark = time.perf_counter()
        base = eval_accuracy(load_generator(args.model), prompts, args)
        base["eval_s"] = time.perf_counter() - mark
        print(f"base held-out accuracy {base['accuracy']:.3f} ({base['eval_s']:.0f} s)", file=sys.stderr, flush=True)
    results = []
    if args.only_base:
        (out / "efficacy_online_base.json").write_text(json.dumps({"args": vars(args), "reward": reward, "base": base},
                                                                  indent=2))
        return
    for method in [m for m in args.methods.split(",") if m]:
        results.append(run_method(method, args, reward, prompts, out))
        (out / f"efficacy_online_{args.methods.replace(',', '_')}.json").write_text(json.dumps(
            {"args": vars(args), "reward": reward, "base": base, "methods": results}, indent=2))
    images = args.prompts_per_refresh * args.group_size * (args.steps // args.refresh_every)
    print(f"\nmodel {args.model}; reward {reward}; {args.steps} steps, a refresh every {args.refresh_every} "
          f"({args.prompts_per_refresh} prompts x {args.group_size} images; {images} sampled images per method); "
          f"held-out: {len(prompts)} prompts x {args.eval_images} images, seed 100\n")
    steps = [c["step"] for c in results[0]["curve"]] if results else []
    print("| method | " + " | ".join(["step 0"] + [f"step {s}" for s in steps]) + " | train reward (first → last refresh) | wall (s) |")
    print("|---|" + "---|" * (len(steps) + 3))
    for result in results:
        accuracy = [c["accuracy"] for c in result["curve"]]
        rewards_ = [r["reward_mean"] for r in result["train_reward"] if r["reward_mean"] is not None]
        trend = f"{rewards_[0]:.3f} → {rewards_[-1]:.3f}" if rewards_ else "—"
        print(f"| {result['method']} | {base['accuracy']:.3f} | " + " | ".join(f"{a:.3f}" for a in accuracy)
              + f" | {trend} | {result['wall_s']:.0f} |")
    if results and len(results[0]["train_reward"]) > 1:
        for result in results:
            values = [r["reward_mean"] for r in result["train_reward"]]
            half = len(values) // 2
            print(f"{result['method']}: train reward mean, first half {statistics.mean(values[:half]):.3f}, "
                  f"second half {statistics.mean(values[half:]):.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
