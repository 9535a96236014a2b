"""Efficacy of the winners-only methods on the testbed (issue 10): do SePPO and Diffusion-DRO,
trained only on "winning" images, raise the held-out oracle accuracy of a testbed base model,
and by more than plain SFT on the same winners (the fair baseline)?

1. Winners, one of:
   - ``--winners`` rendered ground-truth images of the *train* prompts
     (``visalign.testbed.build.render_dataset`` with no caption noise: every image satisfies
     its prompt, as the oracle checks);
   - ``--data DIR``: the winners of a preference-data folder (``pairs.jsonl``: the base model's
     own samples, the best of ``--images-per-prompt`` by ``--reward``; built when missing, as
     ``efficacy_preference.py`` builds it, so DPO with the real losers can be run on the same
     folder). The objectives read only the winners.
   No losers, no reward reach the objectives.
2. Each objective (``sft``, ``seppo``, ``seppo-sft``: SePPO plus ``--sft-weight`` times the
   winners' denoising loss, ``dro``) trains a LoRA on them with the shared trainer, for
   ``--train-seeds`` training seeds.
3. Base and tuned models are evaluated on the *held-out* prompts with ``--eval-seeds`` noise
   seeds (the same seeds for every model, as ``efficacy_preference.py``, whose evaluation this
   script reuses). Gains are paired per evaluation seed.

    nice -n 5 python benchmarks/efficacy_winners.py --objectives sft,seppo,dro
    python benchmarks/efficacy_winners.py --data runs/pref-clip/data --lr 1e-3 --beta 1000 \
        --sft-weight 250 --steps 200 --batch-size 16 --eval-images 2 --objectives sft,seppo,seppo-sft,dro

Each model's result is written to ``<out>/results/<name>.json`` (a rerun skips what exists),
the summary to ``<out>/efficacy.json``, and a markdown table is printed.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from efficacy_preference import evaluate_seeds, summarise, watched_rewards  # noqa: E402  (one evaluation protocol)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "testbed" / "sd"))
    parser.add_argument("--objectives", default="sft,seppo,dro")
    parser.add_argument("--winners", type=int, default=724, help="rendered winners of the train prompts")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="train on the winners of this preference-data folder instead (built when missing)")
    parser.add_argument("--reward", default="testbed-clip", help="labeller when --data must be built")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="samples per prompt when --data is built")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--beta", type=float, default=5000.0, help="SePPO beta (Salesforce meaning)")
    parser.add_argument("--strategy", default="random", help="SePPO reference strategy")
    parser.add_argument("--sft-weight", type=float, default=250.0, help="seppo-sft: weight of the winners' SFT term")
    parser.add_argument("--save-every", type=int, default=30, help="SePPO pool snapshot interval")
    parser.add_argument("--reference-steps", type=int, default=10, help="SePPO reference sampler steps")
    parser.add_argument("--margin", type=float, default=1e-3, help="DRO margin")
    parser.add_argument("--refresh-every", type=int, default=16, help="DRO lagged-policy refresh")
    parser.add_argument("--dro-steps", type=int, default=10, help="DRO lagged sampler steps")
    parser.add_argument("--train-seeds", type=int, default=1)
    parser.add_argument("--eval-seeds", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=1, help="held-out images per prompt per seed")
    parser.add_argument("--eval-prompts", type=int, default=None)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--out", default="runs/efficacy-winners")
    parser.add_argument("--no-base", action="store_true",
                        help="only train and evaluate the objectives (parallel runs; one run evaluates the base)")
    return parser.parse_args(argv)


def objective_options(objective: str, args) -> dict:
    if objective == "sft":
        return {}
    if objective in ("seppo", "seppo-sft"):
        return {"beta": args.beta, "reference_strategy": args.strategy, "save_every": args.save_every,
                "num_inference_steps": args.reference_steps, "guidance_scale": args.guidance_scale,
                "sft_weight": args.sft_weight if objective == "seppo-sft" else 0.0}
    if objective == "dro":
        return {"margin": args.margin, "refresh_every": args.refresh_every, "num_inference_steps": args.dro_steps,
                "prompt_dropout": 0.0}
    raise SystemExit(f"unknown objective {objective!r}")


def train_objective(objective: str, winners: Path, args, out: Path, seed: int) -> tuple[Path, dict]:
    from visalign.config import load_config
    from visalign.training import TrainConfig, train

    run = out / f"{objective}-seed{seed}"
    config = load_config(TrainConfig, data={
        "model": {"path": args.model, "finetune": "lora", "lora": {"rank": args.rank, "alpha": args.rank}},
        "objective": objective.removesuffix("-sft"), "options": objective_options(objective, args),
        "data": {"format": "jsonl", "path": str(winners), "random_flip": False},
        "optim": {"lr": args.lr, "lr_scheduler": "constant_with_warmup", "warmup_steps": 10, "weight_decay": 0.0},
        "batch_size": args.batch_size, "max_steps": args.steps, "seed": seed, "output_dir": str(run),
        "checkpoint_every": 0, "log_every": 10,
    })
    result = train(config)
    logged = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return result.final_weights, {"first": logged[0], "last": logged[-1]}


def watch(args) -> dict:
    """Rewards whose held-out means are reported: the labeller and the shipped testbed rewards (--data runs)."""
    return watched_rewards(args.reward) if args.data else {}


def _train_and_evaluate(objective: str, seed: int, winners: Path, args, out: Path, prompts) -> dict:
    run = out / f"{objective}-seed{seed}"
    if (run / "lora" / "pytorch_lora_weights.safetensors").is_file():  # trained by an earlier, interrupted call
        logged = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
        lora, logged, train_s, train_cpu_s = run / "lora", {"first": logged[0], "last": logged[-1]}, None, None
    else:
        start, start_cpu = time.perf_counter(), time.process_time()
        lora, logged = train_objective(objective, winners, args, out, seed)
        train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    return {"reports": evaluate_seeds(args.model, str(lora), args, prompts, watch(args)), "train_s": train_s,
            "train_cpu_s": train_cpu_s, "logged": logged}


def main(argv=None):
    args = parse_args(argv)
    import torch

    from visalign.testbed.build import render_dataset
    from visalign.testbed.prompts import load_prompts

    torch.set_num_threads(1)
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    if args.data:
        winners = Path(args.data) / "pairs.jsonl"
        if not winners.exists():
            from visalign.preference_data import PreferenceDataConfig, build_preference_data

            build_preference_data(PreferenceDataConfig(
                model=args.model, reward=args.reward, images_per_prompt=args.images_per_prompt,
                steps=args.sample_steps, guidance_scale=args.guidance_scale, out=args.data))
    else:
        winners = render_dataset(out / "winners", args.winners, caption_noise=0.0, seed=0)
    prompts = [r.prompt for r in load_prompts("heldout")][: args.eval_prompts]

    def cached(name: str, compute) -> dict:
        path = out / "results" / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        start = time.perf_counter()
        value = compute()
        value["wall_s"] = time.perf_counter() - start
        path.write_text(json.dumps(value, indent=2))
        return value

    objectives = [o for o in args.objectives.split(",") if o]
    if args.no_base:
        for objective in objectives:
            for seed in range(args.train_seeds):
                cached(f"{objective}-seed{seed}", lambda o=objective, s=seed: _train_and_evaluate(o, s, winners, args,
                                                                                                  out, prompts))
        return
    base = cached("base", lambda: {"reports": evaluate_seeds(args.model, None, args, prompts, watch(args))})["reports"]
    for report in base:  # a base result written before evaluate_seeds reported rewards and GenEval
        report.setdefault("rewards", {})
        report.setdefault("geneval", float("nan"))
    rows = [summarise("base", base, base)]
    for objective in objectives:
        for seed in range(args.train_seeds):
            result = cached(f"{objective}-seed{seed}", lambda o=objective, s=seed: _train_and_evaluate(
                o, s, winners, args, out, prompts))
            row = summarise(f"{objective} (train seed {seed})", result["reports"], base)
            row["train_s"] = result["train_s"]
            row["train_cpu_s"] = result.get("train_cpu_s")
            row["logged"] = result["logged"]
            rows.append(row)
    base_spread = statistics.stdev(r["accuracy"] for r in base) if len(base) > 1 else float("nan")
    source = f"winners of {winners}" if args.data else f"{args.winners} rendered winners of the train prompts"
    summary = {"args": vars(args), "winners": source, "base_seed_std": base_spread, "rows": rows}
    (out / "efficacy.json").write_text(json.dumps(summary, indent=2))
    print(f"\nmodel {args.model}; {source}; held-out: {len(prompts)} "
          f"prompts x {args.eval_images} images x {args.eval_seeds} seeds; base seed-to-seed std {base_spread:.4f}\n")
    categories = list(rows[0]["per_category"])
    watched = list(rows[0]["reward_gain"])
    sft = next((r for r in rows if r["model"].startswith("sft ")), None)
    print("| model | held-out accuracy (per seed) | gain over base (± s.e.) | minus SFT, paired (± s.e.) | GenEval | "
          + "".join(f"{w} gain | " for w in watched) + "train CPU s | " + " | ".join(categories) + " |")
    print("|---|---|---|---|---|" + "---|" * (len(watched) + 1 + len(categories)))
    for row in rows:
        gain = "—" if row["model"] == "base" else f"{row['gain_mean']:+.3f} ± {row['gain_stderr']:.3f}"
        versus = "—"
        if sft is not None and row is not sft and row["model"] != "base":
            diffs = [a - b for a, b in zip(row["accuracy_per_seed"], sft["accuracy_per_seed"])]
            spread = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
            versus = f"{statistics.mean(diffs):+.3f} ± {spread:.3f}"
        per_seed = ", ".join(f"{a:.3f}" for a in row["accuracy_per_seed"])
        print(f"| {row['model']} | {row['accuracy_mean']:.3f} ({per_seed}) | {gain} | {versus} | "
              f"{row['geneval_mean']:.3f} | " + "".join(f"{row['reward_gain'][w]:+.4f} | " for w in watched)
              + f"{row.get('train_cpu_s') or 0:.0f} | " + " | ".join(f"{row['per_category'][c]:.2f}" for c in categories)
              + " |")


if __name__ == "__main__":
    main()
