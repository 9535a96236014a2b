"""Efficacy of the preference methods on the testbed (issue 6): do Diffusion-DPO / Flow-DPO and
Diffusion-KTO raise the held-out oracle accuracy of a testbed base model?

1. On-policy data: ``images_per_prompt`` samples of each *train* prompt from the base model,
   scored by the reward (default: the shipped learned reward; the oracle only judges), written
   by ``visalign preference-data`` (best vs worst pair per prompt, or every pair with a reward
   gap with ``--pairs all``; feedback = above/below the prompt's median).
2. Each objective trains a LoRA on that data with the shared trainer.
3. Base and tuned models are evaluated on the *held-out* prompts with ``--eval-seeds`` different
   noise seeds (the same seeds for every model). The seed-to-seed spread of the base model is
   the noise a gain must exceed: we report the mean paired gain and its standard error.

    python benchmarks/efficacy_preference.py --model assets/testbed/sd
    python benchmarks/efficacy_preference.py --model assets/testbed/sd3 --beta 500

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

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "testbed" / "sd"))
    parser.add_argument("--reward", default=None, help="default: testbed-reward if shipped, else testbed-oracle")
    parser.add_argument("--objectives", default="dpo,kto", help="comma-separated: dpo, kto, sft (on the winners)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--max-prompts", type=int, default=None, help="train prompts used for data")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--beta", type=float, default=5000.0, help="DPO beta (Salesforce meaning)")
    parser.add_argument("--kto-beta", type=float, default=1000.0)
    parser.add_argument("--sft-weight", type=float, default=0.0)
    parser.add_argument("--eval-seeds", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=2, help="held-out images per prompt per seed")
    parser.add_argument("--eval-prompts", type=int, default=None)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--out", default="runs/efficacy")
    parser.add_argument("--data", default=None, help="reuse a preference-data folder")
    parser.add_argument("--loras", default=None, metavar="DIR",
                        help="evaluate the LoRAs an earlier run wrote (DIR/<objective>/lora) instead of training")
    parser.add_argument("--pairs", default="best-worst", choices=("best-worst", "all"),
                        help="DPO pairs per prompt: best vs worst, or every pair with a reward gap")
    return parser.parse_args(argv)


def default_reward() -> str:
    import rewards

    return "testbed-reward" if "testbed-reward" in rewards.available() else "testbed-oracle"


#: Per-seed evaluation reports, keyed by the weights' bytes and every setting that changes them:
#: a second script (or a rerun) evaluating the same base model or LoRA on the same seeds reads them
#: back instead of sampling again. ``VISALIGN_EVAL_CACHE=`` (empty) turns it off.
EVAL_CACHE = os.environ.get("VISALIGN_EVAL_CACHE", str(ROOT / "runs" / "eval-cache"))


def _weights_digest(*folders: str | None) -> str:
    import hashlib

    digest = hashlib.sha1()
    for folder in folders:
        if not folder:
            continue
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and path.suffix in (".safetensors", ".json", ".txt", ".bin"):
                digest.update(str(path.relative_to(folder)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def evaluate_seeds(model: str, lora: str | None, args, prompts, watch: dict) -> list[dict]:
    """Evaluate ``model`` (+ ``lora``) on ``prompts`` with noise seeds ``100 .. 100 + eval_seeds - 1``."""
    import hashlib

    from visalign.algorithms.seppo import weights_digest
    from visalign.eval import evaluate
    from visalign.models import load_generator

    weights = _weights_digest(model, lora)
    rewards_key = {name: weights_digest(reward.state_dict()) if hasattr(reward, "state_dict") else None
                   for name, reward in sorted(watch.items())}
    generator = None
    reports = []
    for seed in range(100, 100 + args.eval_seeds):
        key = json.dumps([weights, list(prompts), args.eval_images, args.sample_steps, args.guidance_scale, seed,
                          rewards_key])
        path = Path(EVAL_CACHE) / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.json" if EVAL_CACHE else None
        if path is not None and path.is_file():
            reports.append(json.loads(path.read_text()))
            continue
        if generator is None:
            generator = load_generator(model)
            if lora:
                generator.load_lora(lora)
        report = evaluate(generator, prompts, images_per_prompt=args.eval_images, num_inference_steps=args.sample_steps,
                          guidance_scale=args.guidance_scale, seed=seed, rewards=watch, keep_images=False)
        reports.append({"accuracy": report.accuracy, "geneval": report.geneval_score, "per_category": report.per_category,
                        "quality": report.quality, "rewards": report.rewards})
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(reports[-1]))
    return reports


def watched_rewards(optimised: str) -> dict:
    """The optimised reward and the shipped testbed rewards (held-out means are reported for each)."""
    import rewards

    names = [optimised] + [n for n in ("testbed-reward", "testbed-clip") if n != optimised and n in rewards.available()]
    watch = {}
    for name in names:
        try:
            watch[name] = rewards.load(name)
        except FileNotFoundError:  # registered but not shipped
            pass
    return watch


def train_objective(objective: str, data: Path, args, out: Path) -> Path:
    from visalign.config import load_config
    from visalign.training import TrainConfig, train

    # sft: the denoising loss on the pairs' winners alone, the control for DPO's SFT term.
    options = {"dpo": {"beta": args.beta, "sft_weight": args.sft_weight}, "kto": {"beta": args.kto_beta},
               "sft": {}}[objective]
    view = {"dpo": "pairs", "kto": "feedback", "sft": "pairs"}[objective]
    config = load_config(TrainConfig, data={
        "model": {"path": args.model, "finetune": "lora", "lora": {"rank": args.rank, "alpha": args.rank}},
        "objective": objective, "options": options,
        "data": {"format": "jsonl", "path": str(data / f"{view}.jsonl"), "random_flip": False},
        "optim": {"lr": args.lr, "lr_scheduler": "constant_with_warmup", "warmup_steps": 10, "weight_decay": 0.0},
        "batch_size": args.batch_size, "max_steps": args.steps, "seed": 0, "output_dir": str(out / objective),
        "checkpoint_every": 0, "log_every": 10,
    })
    return train(config).final_weights


def summarise(name: str, reports: list[dict], base: list[dict]) -> dict:
    accuracy = [r["accuracy"] for r in reports]
    gains = [r["accuracy"] - b["accuracy"] for r, b in zip(reports, base)]
    stderr = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("nan")
    reward_gain = {k: statistics.mean(r["rewards"][k] - b["rewards"][k] for r, b in zip(reports, base))
                   for k in reports[0]["rewards"]}
    return {"model": name, "accuracy_mean": statistics.mean(accuracy),
            "geneval_mean": statistics.mean(r["geneval"] for r in reports), "reward_gain": reward_gain,
            "accuracy_per_seed": accuracy, "gain_mean": statistics.mean(gains), "gain_stderr": stderr,
            "per_category": {k: statistics.mean(r["per_category"][k] for r in reports) for k in reports[0]["per_category"]}}


def main(argv=None):
    args = parse_args(argv)
    from visalign.preference_data import PreferenceDataConfig, build_preference_data
    from visalign.testbed.prompts import load_prompts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reward = args.reward or default_reward()
    timings = {}
    start = time.perf_counter()
    data = Path(args.data) if args.data else out / "data"
    if not (data / "pairs.jsonl").exists():
        summary = build_preference_data(PreferenceDataConfig(
            model=args.model, reward=reward, images_per_prompt=args.images_per_prompt, max_prompts=args.max_prompts,
            steps=args.sample_steps, guidance_scale=args.guidance_scale, pairs=args.pairs, out=str(data)))
    else:
        summary = json.loads((data / "summary.json").read_text())
    timings["data_s"] = time.perf_counter() - start
    prompts = [r.prompt for r in load_prompts("heldout")][: args.eval_prompts]
    mark = time.perf_counter()
    watch = watched_rewards(reward)
    base = evaluate_seeds(args.model, None, args, prompts, watch)
    timings["eval_base_s"] = time.perf_counter() - mark
    rows = [summarise("base", base, base)]
    for objective in [o for o in args.objectives.split(",") if o]:
        mark = time.perf_counter()
        if args.loras:  # an earlier run's fine-tune, evaluated again (e.g. on more seeds)
            lora = Path(args.loras) / objective / "lora"
            if not lora.is_dir():
                raise FileNotFoundError(f"--loras: no LoRA at {lora}")
        else:
            lora = train_objective(objective, data, args, out)
            timings[f"{objective}_train_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        rows.append(summarise(objective, evaluate_seeds(args.model, str(lora), args, prompts, watch), base))
        timings[f"{objective}_eval_s"] = time.perf_counter() - mark
    base_spread = statistics.stdev(r["accuracy"] for r in base) if len(base) > 1 else float("nan")
    result = {"args": vars(args), "reward": reward, "data": {k: summary[k] for k in ("prompts", "images", "pairs")},
              "base_seed_std": base_spread, "rows": rows, "timings_s": timings}
    (out / "efficacy.json").write_text(json.dumps(result, indent=2))
    print(f"\nmodel {args.model}; reward {reward}; {summary['pairs']} pairs from {summary['prompts']} train prompts; "
          f"held-out: {len(prompts)} prompts x {args.eval_images} images x {args.eval_seeds} seeds; "
          f"base seed-to-seed std {base_spread:.4f}\n")
    categories = list(rows[0]["per_category"])
    watched = list(rows[0]["reward_gain"])
    print("| model | held-out accuracy | gain over base (± s.e.) | GenEval score | "
          + " | ".join(f"{w} gain" for w in watched) + " | " + " | ".join(categories) + " |")
    print("|---|---|---|---|" + "---|" * (len(watched) + len(categories)))
    for row in rows:
        gain = "—" if row["model"] == "base" else f"{row['gain_mean']:+.3f} ± {row['gain_stderr']:.3f}"
        print(f"| {row['model']} | {row['accuracy_mean']:.3f} | {gain} | {row['geneval_mean']:.3f} | "
              + " | ".join(f"{row['reward_gain'][w]:+.4f}" for w in watched) + " | "
              + " | ".join(f"{row['per_category'][c]:.2f}" for c in categories) + " |")
    print(f"\ntimings: {json.dumps({k: round(v) for k, v in timings.items()})}", file=sys.stderr)


if __name__ == "__main__":
    main()
