"""Efficacy of preference alignment on the video testbed (issue 13): does Diffusion-DPO on clip
pairs raise the held-out video-oracle accuracy of the testbed's base video model?

1. On-policy clips: ``--clips-per-prompt`` samples of each of ``--prompts`` *train* video prompts
   from the base video model (the testbed SD model + ``assets/testbed/animatediff``), scored by
   the video oracle (``testbed-video-oracle``, mode ``both``: half the verdict plus half
   the smoothness score, which orders clips the verdict ties); the best and worst clip of a prompt
   make a pair when their scores differ (:func:`visalign.preference_data.select_pairs`).
2. ``--objective`` (``dpo``, or ``sft`` on the winners as the baseline without a loser) trains
   a LoRA (or, with ``--finetune motion_modules``, the motion modules alone: AnimateDiff's
   recipe) on the pairs with the shared trainer: the clips go in as a
   :class:`visalign.data.TensorPairs` dataset, so the objective's code is the image one.
3. Base and tuned models are evaluated on the *held-out* video prompts with ``--eval-seeds``
   noise seeds (the same for both); we report the mean paired gain and its standard error.

    python benchmarks/efficacy_video.py --out runs/efficacy-video

Writes ``<out>/efficacy.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "testbed" / "sd"), help="the SD model")
    parser.add_argument("--motion-adapter", default=str(ROOT / "assets" / "testbed" / "animatediff"))
    parser.add_argument("--objective", default="dpo", choices=("dpo", "sft"))
    parser.add_argument("--prompts", type=int, default=84, help="train video prompts sampled (spread over the split)")
    parser.add_argument("--clips-per-prompt", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--finetune", default="lora", choices=("lora", "motion_modules"),
                        help="LoRA on the whole UNet, or train the motion modules only (AnimateDiff's recipe)")
    parser.add_argument("--beta", type=float, default=1000.0, help="DPO beta (Salesforce meaning)")
    parser.add_argument("--eval-seeds", type=int, default=2)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--out", default="runs/efficacy-video")
    return parser.parse_args(argv)


def on_policy_pairs(generator, prompts: list[str], k: int, steps: int, guidance_scale: float, seed: int = 7):
    """Sample ``k`` clips per prompt, score them with the video oracle (``both``) and keep the
    best-vs-worst pair of each prompt whose scores differ. Returns the pairs and a summary."""
    import torch

    from visalign.data import TensorPairs
    from visalign.eval.evaluate import sample_for_eval
    from visalign.preference_data import select_pairs
    from visalign.testbed.video import video_oracle

    winners, losers, texts, correct_all, winner_correct = [], [], [], [], []
    for start in range(0, len(prompts), 8):
        group = prompts[start:start + 8]
        clips = sample_for_eval(generator, group, k, steps, guidance_scale, seed, batch_size=8 * k)
        verdict = video_oracle(clips, [p for p in group for _ in range(k)])
        # testbed-video-oracle's "both" mode: the verdict plus half the smoothness orders clips it ties.
        scores = (0.5 * verdict.correct.float() + 0.5 * verdict.smoothness).tolist()
        correct = verdict.correct.tolist()
        correct_all += correct
        for offset, prompt in enumerate(group):
            values = scores[offset * k:(offset + 1) * k]
            for w, l in select_pairs(values, "best-worst")[0]:
                winners.append(clips[offset * k + w])
                losers.append(clips[offset * k + l])
                texts.append(prompt)
                winner_correct.append(correct[offset * k + w])
    if not texts:
        raise RuntimeError(f"no pairs: every prompt's {k} clips scored the same")
    pairs = TensorPairs(torch.stack(winners), torch.stack(losers), texts)
    summary = {"prompts": len(prompts), "clips": len(correct_all), "pairs": len(texts),
               "sample_accuracy": sum(correct_all) / len(correct_all), "pairs_with_a_correct_winner": sum(winner_correct)}
    return pairs, summary


def train_on_pairs(generator, pairs, args, out: Path) -> None:
    from visalign.config import load_config
    from visalign.training import TrainConfig, train

    options = {"beta": args.beta} if args.objective == "dpo" else {}
    config = load_config(TrainConfig, data={
        "model": {"path": args.model, "motion_adapter": args.motion_adapter, "finetune": args.finetune,
                  "lora": {"rank": args.rank, "alpha": args.rank}},
        "objective": args.objective, "options": options,
        "optim": {"lr": args.lr, "lr_scheduler": "constant_with_warmup", "warmup_steps": 10, "weight_decay": 0.0},
        "batch_size": args.batch_size, "max_steps": args.steps, "seed": 0, "output_dir": str(out / args.objective),
        "checkpoint_every": 0, "log_every": 10,
    })
    train(config, generator=generator, dataset=pairs)


def main(argv=None):
    args = parse_args(argv)
    from visalign.testbed.video import video_prompts
    from visalign.testbed.video_model import evaluate_video_model, load_testbed_video_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts = [spec.text for spec in video_prompts("train")]
    if args.prompts < len(train_prompts):  # spread over the split, so every category and subject is in
        train_prompts = [train_prompts[i * len(train_prompts) // args.prompts] for i in range(args.prompts)]
    heldout = [spec.text for spec in video_prompts("heldout")]
    generator = load_testbed_video_model(args.motion_adapter, base=args.model)
    timings, started = {}, time.perf_counter()

    def evaluate() -> list[dict]:
        return [evaluate_video_model(generator, heldout, 1, args.eval_steps, args.guidance_scale, seed=1000 + s,
                                     progress=False) for s in range(args.eval_seeds)]

    base = evaluate()
    timings["eval_base_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    pairs, data = on_policy_pairs(generator, train_prompts, args.clips_per_prompt, args.sample_steps,
                                  args.guidance_scale)
    timings["data_s"] = round(time.perf_counter() - started, 1)
    print(f"data: {json.dumps(data)}", flush=True)
    started = time.perf_counter()
    train_on_pairs(generator, pairs, args, out)
    timings["train_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    tuned = evaluate()
    timings["eval_tuned_s"] = round(time.perf_counter() - started, 1)
    gains = [t["accuracy"] - b["accuracy"] for t, b in zip(tuned, base)]
    report = {
        "args": vars(args), "data": data, "timings_s": timings,
        "base": base, "tuned": tuned,
        "gain_mean": statistics.mean(gains),
        "gain_stderr": statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("nan"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    (out / "efficacy.json").write_text(json.dumps(report, indent=2) + "\n")
    keys = ("accuracy", "subject_in_every_frame", "smoothness", "quality")
    print(f"| model | held-out video accuracy (mean of {args.eval_seeds} seeds) | subject in every frame | smoothness | quality |")
    print("|---|---|---|---|---|")
    for name, rows in (("base", base), (args.objective, tuned)):
        print("| " + name + " | " + " | ".join(f"{statistics.mean(r[k] for r in rows):.3f}" for k in keys) + " |")
    print(f"gain {report['gain_mean']:+.3f} +- {report['gain_stderr']:.3f} (per seed {[round(g, 3) for g in gains]})")
    for category in base[0]["per_category"]:
        print(f"  {category}: base {statistics.mean(r['per_category'][category] for r in base):.3f} -> "
              f"{statistics.mean(r['per_category'][category] for r in tuned):.3f}")


if __name__ == "__main__":
    main()
