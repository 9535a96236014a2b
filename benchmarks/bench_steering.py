"""Benchmark of FK steering (issue 7): is the particle bookkeeping free?

For each tiny family (SD, SDXL, SD3; random-init, 32 px) and ``k`` particles per prompt, with
``P`` prompts, ``N`` steps, CFG and the default resampling schedule (``S`` reward evaluations),
it times in one run, interleaved and repeated (medians):

1. **fk**: ``FKSteering(generator, reward, num_particles=k)(prompts)``.
2. **plain + rewards**: what FK cannot avoid: plain batched sampling of the same ``P * k``
   samples (``Generator.sample``, same ``eta``), plus the reward evaluations FK performs
   (``S`` times: decode ``P * k`` x0-predictions and score them), timed separately and added.
   ``fk / (plain + rewards)`` is the cost of FK's bookkeeping (weights, ESS, resampling,
   gathers, diagnostics); the target is <= 1.10.
3. **naive**: a straightforward per-particle implementation: every particle is its own
   denoiser call (with its CFG pair) at every step, scored one image at a time, with the
   weights and resampling in Python. ``naive / fk`` is what batching buys.

The reward is the tiny HPSv2 model of the reward library (an open_clip ViT, 32 px input),
so reward evaluations cost what a small learned reward costs.

Run from the repository root::

    python benchmarks/bench_steering.py                      # sd, sdxl, sd3; k = 4, 8
    python benchmarks/bench_steering.py --families sd --particles 4 --repeats 3

Prints a markdown table (results go to benchmarks/RESULTS.md by hand).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "a purple square"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["sd", "sdxl", "sd3"])
    parser.add_argument("--particles", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive-repeats", type=int, default=1, help="timed runs of the (slow) per-particle loop")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least sensitive to other load)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                        help="cpu: process CPU time (steady on a shared machine); wall: wall clock")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn, clock: str) -> float:
    _synchronize()
    now = time.process_time if clock == "cpu" else time.perf_counter
    start = now()
    fn()
    _synchronize()
    return now() - start


def naive_fk(generator, reward, prompts, k, steps, guidance_scale, eta, schedule, lmbda, seed) -> torch.Tensor:
    """FK steering written the obvious way: one particle per denoiser call, Python weights."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conds = [generator.encode_prompt([p]) for p in prompts]
        negative = generator.negative_cond(1)
        particles = [[torch.randn(generator.latent_shape(1), generator=rng) for _ in range(k)] for _ in prompts]
        previous = [[0.0] * k for _ in prompts]
        timesteps, next_timesteps = generator.sampling_timesteps(steps)
        for index in range(steps):
            t, t_next = timesteps[index], next_timesteps[index]
            for p, prompt in enumerate(prompts):
                x0_preds, rewards_now = [], []
                for j in range(k):
                    x = particles[p][j]
                    out = generator.guided_prediction(x, t, conds[p], guidance_scale, negative)
                    result = generator.step(x, t, t_next, out, eta=eta, generator=rng)
                    particles[p][j] = result.prev_sample
                    x0_preds.append(result.x0_pred)
                if index not in schedule:
                    continue
                final = index == steps - 1
                for j in range(k):
                    source = particles[p][j] if final else x0_preds[j]
                    rewards_now.append(float(reward(generator.decode(source), [prompt])[0]))
                log_w = [lmbda * (r - previous[p][j]) for j, r in enumerate(rewards_now)]
                top = max(log_w)
                weights = [math.exp(w - top) for w in log_w]
                ancestors = torch.multinomial(torch.tensor(weights), k, replacement=True, generator=rng).tolist()
                particles[p] = [particles[p][a].clone() for a in ancestors]
                previous[p] = [rewards_now[a] for a in ancestors]
    return torch.cat([x for group in particles for x in group])


def bench(family: str, k: int, args, tokenizer_dir: Path) -> dict:
    from pipelines import FKSteering, as_generator
    from pipelines.common import RewardScorer
    from rewards.tiny import tiny_hpsv2_reward
    from visalign.models.tiny import build_tiny_pipeline

    generator = as_generator(build_tiny_pipeline(family, seed=0, tokenizer_dir=tokenizer_dir).to(args.device))
    reward = tiny_hpsv2_reward(seed=0).to(args.device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    expanded = [p for p in prompts for _ in range(k)]
    steer = FKSteering(generator, reward, num_particles=k)
    schedule = steer.options.schedule(args.steps)
    shape = generator.latent_shape(len(expanded))

    def fk():
        steer(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
              generator=torch.Generator(device=args.device).manual_seed(0))

    def plain():
        with torch.no_grad():
            generator.sample(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, eta=steer.eta,
                             num_images_per_prompt=k, generator=torch.Generator(device=args.device).manual_seed(0),
                             output_type="latent")

    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(args.device)

    def rewards_only():
        scorer = RewardScorer(generator, reward)
        for _ in schedule:
            scorer(latents, expanded)

    def naive():
        naive_fk(generator, reward, prompts, k, args.steps, args.guidance_scale, steer.eta, set(schedule),
                 steer.options.lmbda, seed=0)

    fk(), plain(), rewards_only()  # warm-up
    times = {"fk": [], "plain": [], "rewards": []}
    for repeat in range(args.repeats):
        order = [("fk", fk), ("plain", plain), ("rewards", rewards_only)]
        for name, fn in (order if repeat % 2 == 0 else order[::-1]):
            times[name].append(_timed(fn, args.clock))
    naive_times = [_timed(naive, args.clock) for _ in range(args.naive_repeats)]
    median = {name: statistics.median(values) for name, values in times.items()}
    naive_median = statistics.median(naive_times)
    return {
        "family": family,
        "k": k,
        "evaluations": len(schedule),
        "fk": median["fk"],
        "plain": median["plain"],
        "rewards": median["rewards"],
        "ratio": median["fk"] / (median["plain"] + median["rewards"]),
        "naive": naive_median,
        "naive_ratio": naive_median / median["fk"],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="bench-steering-tok-"))
    rows = []
    for family in args.families:
        for k in args.particles:
            rows.append(bench(family, k, args, tokenizer_dir))
            row = rows[-1]
            print(f"{family} k={k}: fk {row['fk']:.3f}s, plain {row['plain']:.3f}s + rewards {row['rewards']:.3f}s "
                  f"-> ratio {row['ratio']:.3f}; naive {row['naive']:.2f}s ({row['naive_ratio']:.1f}x fk)", flush=True)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{device}, torch {torch.__version__}, {args.threads} thread(s), python {platform.python_version()}; "
          f"{args.prompts} prompts, {args.steps} steps, CFG {args.guidance_scale}; {args.clock} time, "
          f"median of {args.repeats} (naive: {args.naive_repeats})\n")
    print("| family | k | reward evals | FK (s) | plain (s) | rewards (s) | FK / (plain + rewards) | naive loop (s) | naive / FK |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['k']} | {row['evaluations']} | {row['fk']:.3f} | {row['plain']:.3f} | "
              f"{row['rewards']:.3f} | {row['ratio']:.3f} | {row['naive']:.2f} | {row['naive_ratio']:.1f} |")


if __name__ == "__main__":
    main()
