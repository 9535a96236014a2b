"""Efficacy of RankDPO on the testbed (issue 9): with the same images, does RankDPO on k-image
ranked sets raise the held-out oracle accuracy of the SD testbed model, and how does it compare
with Diffusion-DPO on the pairs drawn from the same images?

1. Syn-Pic data (``visalign dataset synth``): for each *train* prompt, ``images-per-generator``
   images from each generator (default: the SD and the SD3 testbed models, k = 4), scored by
   several rewards (default: the oracle's correctness and its quality score, plus the learned
   testbed reward when shipped), phi = vote fraction.
2. RankDPO trains a LoRA on the rankings (k images per example); DPO trains the same LoRA on
   every pair of those rankings with a phi gap (``as_pairs``). Both see the same images, the
   same number of images per step (``--rank-batch`` rankings x k = ``--pair-batch`` pairs x 2)
   and the same number of steps; rankings whose phi are all equal hold no preference and are
   left out of both (``drop_flat``).
3. Base and tuned models on the *held-out* prompts with ``--eval-seeds`` noise seeds (the same
   for every model); gain = mean paired difference over seeds, with its standard error.

    nice -n 5 python benchmarks/efficacy_rankdpo.py
    python benchmarks/efficacy_rankdpo.py --data runs/efficacy-rankdpo/data   # reuse (or resume) the data

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
sys.path.insert(0, str(ROOT / "benchmarks"))

from efficacy_preference import evaluate_seeds, summarise  # noqa: E402  (one evaluation protocol)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "testbed" / "sd"), help="the model trained")
    parser.add_argument("--generators", default=f"{ROOT / 'assets' / 'testbed' / 'sd'},{ROOT / 'assets' / 'testbed' / 'sd3'}")
    parser.add_argument("--rewards", default=None,
                        help="comma-separated reward specs (default: oracle correctness, oracle quality, "
                             "and testbed-reward when shipped)")
    parser.add_argument("--images-per-generator", type=int, default=2)
    parser.add_argument("--max-prompts", type=int, default=None, help="train prompts used for data")
    parser.add_argument("--objectives", default="rankdpo,dpo")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rank-batch", type=int, default=4, help="rankings per step (x k images)")
    parser.add_argument("--pair-batch", type=int, default=8, help="pairs per step (x 2 images)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--beta", type=float, default=5000.0, help="Salesforce beta, both objectives")
    parser.add_argument("--sft-weight", type=float, default=0.0,
                        help="denoising loss on the best image (RankDPO) / the winner (DPO), both objectives")
    parser.add_argument("--normalize", default="none", help="RankDPO weight normalisation: none or weights")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--eval-seeds", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=2, help="held-out images per prompt per seed")
    parser.add_argument("--eval-prompts", type=int, default=None)
    parser.add_argument("--sample-steps", type=int, default=20, help="sampling steps of the data")
    parser.add_argument("--eval-steps", type=int, default=None, help="sampling steps of the evaluation (default: --sample-steps)")
    parser.add_argument("--jobs", type=int, default=1, help="run base evaluation and each objective in parallel processes")
    parser.add_argument("--skip-synth", action="store_true", help="use the parts already in --data (no generation)")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--out", default="runs/efficacy-rankdpo")
    parser.add_argument("--data", default=None, help="synth folder to reuse or resume (default: <out>/data)")
    return parser.parse_args(argv)


def default_rewards() -> list[str]:
    import rewards

    specs = ["testbed-oracle", "testbed-oracle:mode=quality"]
    try:
        rewards.load("testbed-reward")
        specs.append("testbed-reward")
    except Exception as error:  # not shipped yet
        print(f"testbed-reward unavailable ({type(error).__name__}); using the oracle's two scores", file=sys.stderr)
    return specs


def train_objective(objective: str, data: Path, args, out: Path) -> Path:
    from visalign.config import load_config
    from visalign.training import TrainConfig, train

    options = {"beta": args.beta, "sft_weight": args.sft_weight}
    if objective == "rankdpo":
        options["normalize"] = args.normalize
        loader, batch = {"drop_flat": True}, args.rank_batch
    else:
        loader, batch = {"drop_flat": True, "as_pairs": True}, args.pair_batch
    config = load_config(TrainConfig, data={
        "model": {"path": args.model, "finetune": "lora", "lora": {"rank": args.rank, "alpha": args.rank}},
        "objective": objective, "options": options,
        "data": {"format": "parquet", "path": str(data), "random_flip": False, "options": loader},
        "optim": {"lr": args.lr, "lr_scheduler": "constant_with_warmup", "warmup_steps": 10, "weight_decay": 0.0},
        "batch_size": batch, "max_steps": args.steps, "seed": args.train_seed, "output_dir": str(out / objective),
        "checkpoint_every": 0, "log_every": 10,
    })
    return train(config).final_weights


def run_task(task: str, data: str, args) -> tuple[dict, dict]:
    """``"base"``: evaluate the base model; an objective: train it, then evaluate. Returns
    (reports per seed, timings)."""
    import copy

    from visalign.testbed.prompts import load_prompts

    prompts = [r.prompt for r in load_prompts("heldout")][: args.eval_prompts]
    eval_args = copy.copy(args)
    eval_args.sample_steps = args.eval_steps or args.sample_steps
    timings, lora = {}, None
    if task != "base":
        mark = time.perf_counter()
        lora = str(train_objective(task, Path(data), args, Path(args.out)))
        timings[f"{task}_train_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    reports = evaluate_seeds(args.model, lora, eval_args, prompts, {})  # no extra reward means: cheaper
    timings[f"{task}_eval_s"] = time.perf_counter() - mark
    return reports, timings


def main(argv=None):
    args = parse_args(argv)
    from visalign.data import load_records
    from visalign.synth import SynthConfig, build_synth
    from visalign.testbed.prompts import load_prompts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    timings = {}
    mark = time.perf_counter()
    reward_specs = args.rewards.split(",") if args.rewards else default_rewards()
    if args.skip_synth:
        from visalign.synth import dataset_summary

        summary = dataset_summary(data)
        summary["this_run"] = {"images_per_s": None}
        reward_specs = summary["reward_names"]
    else:
        summary = build_synth(SynthConfig(
            generators=args.generators.split(","), rewards=reward_specs, prompts="testbed:train",
            max_prompts=args.max_prompts, images_per_generator=args.images_per_generator, steps=args.sample_steps,
            guidance_scale=args.guidance_scale, out=str(data)))
    timings["data_s"] = time.perf_counter() - mark
    rankings = load_records("parquet", data, drop_flat=True)
    pairs = load_records("parquet", data, drop_flat=True, as_pairs=True)
    data_figures = {"prompts": summary["prompts"], "images": summary["images"], "rankings_used": len(rankings),
                    "pairs_used": len(pairs), "dropped": pairs.dropped,
                    "reward_agreement": summary.get("reward_agreement"), "wins_by_generator": summary.get("wins_by_generator"),
                    "images_per_s": summary["this_run"]["images_per_s"]}
    print(f"data: {json.dumps(data_figures)}", file=sys.stderr)

    prompts = [r.prompt for r in load_prompts("heldout")][: args.eval_prompts]
    tasks = ["base"] + [o for o in args.objectives.split(",") if o]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = dict(zip(tasks, pool.map(run_task, tasks, [str(data)] * len(tasks), [args] * len(tasks))))
    else:
        results = {task: run_task(task, str(data), args) for task in tasks}
    for _, task_timings in results.values():
        timings.update(task_timings)
    base = results["base"][0]
    rows = [summarise(task, results[task][0], base) for task in tasks]
    base_spread = statistics.stdev(r["accuracy"] for r in base) if len(base) > 1 else float("nan")
    result = {"args": vars(args), "rewards": reward_specs, "data": data_figures, "base_seed_std": base_spread,
              "rows": rows, "timings_s": timings}
    (out / "efficacy.json").write_text(json.dumps(result, indent=2))
    print(f"\nmodel {args.model}; data: {summary['images']} images of {summary['prompts']} train prompts "
          f"(k = {summary['images'] // max(summary['prompts'], 1)}), rewards {reward_specs}; {len(rankings)} rankings with "
          f"a preference, {len(pairs)} pairs from them; held-out: {len(prompts)} prompts x {args.eval_images} images x "
          f"{args.eval_seeds} seeds, {args.eval_steps or args.sample_steps} steps; base seed-to-seed std {base_spread:.4f}\n")
    categories = list(rows[0]["per_category"])
    print("| model | held-out accuracy (per seed) | gain over base (± s.e.) | " + " | ".join(categories) + " |")
    print("|---|---|---|" + "---|" * len(categories))
    for row in rows:
        gain = "—" if row["model"] == "base" else f"{row['gain_mean']:+.3f} ± {row['gain_stderr']:.3f}"
        seeds = ", ".join(f"{a:.3f}" for a in row["accuracy_per_seed"])
        print(f"| {row['model']} | {row['accuracy_mean']:.3f} ({seeds}) | {gain} | "
              + " | ".join(f"{row['per_category'][c]:.2f}" for c in categories) + " |")
    print(f"\ntimings: {json.dumps({k: round(v) for k, v in timings.items()})}", file=sys.stderr)


if __name__ == "__main__":
    main()
