"""Benchmark of the SePPO objective (issue 10): where does a step's time go, and what does the
reference-sample cache save?

A SePPO step generates a sample of every batch prompt with the selected reference checkpoint
(its full sampler: ``num_inference_steps`` denoiser calls, CFG-batched), then runs the DPO-style
optimisation (policy forward + backward and reference forward on 2B latents). This script runs
the objective as the trainer does (``select_reference`` = ``before_step``, ``loss``, backward,
AdamW step) for ``--steps`` steps on a LoRA model, and reports per step:

- **reference samples**: time inside ``SePPO.reference_samples`` (generation of cache misses);
- **optimisation**: the rest (latents, the loss's forwards, backward, the optimiser step);

once with the cache off (``cache_size=0``: every step generates B samples) and once with it on.
Batches draw ``--batch`` prompts from ``--prompts`` distinct prompts; the pool gets a snapshot
every ``--save-every`` steps (a new checkpoint's samples are new misses), so the hit rate is
that of a training run over a prompt set of this size. Wall and process CPU time are both
reported (CPU time is the steadier figure on a shared machine).

    python benchmarks/bench_seppo.py                       # tiny SD model and the testbed SD model
    python benchmarks/bench_seppo.py --models tiny --steps 40
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,testbed", help="tiny (random-init tiny SD) and/or testbed (assets/testbed/sd)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts the batches draw from")
    parser.add_argument("--save-every", type=int, default=30, help="pool snapshot interval (paper: 30)")
    parser.add_argument("--reference-steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def build(model: str):
    from visalign.models import load_generator
    from visalign.models.tiny import save_tiny_model

    if model == "tiny":
        path = save_tiny_model("sd", tempfile.mkdtemp(prefix="bench-seppo-"), seed=0)
    else:
        path = str(ROOT / "assets" / "testbed" / "sd")
    generator = load_generator(path)
    generator.add_lora(rank=4)
    return generator


def run(model: str, cache_size: int, args) -> dict:
    from visalign.algorithms.seppo import SePPO, SePPOOptions
    from visalign.testbed.prompts import load_prompts

    generator = build(model)
    parameters = generator.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    objective = SePPO(generator, SePPOOptions(beta=5000.0, save_every=args.save_every, cache_size=cache_size,
                                              num_inference_steps=args.reference_steps,
                                              guidance_scale=args.guidance_scale))
    objective.start()
    prompts = [r.prompt for r in load_prompts("train")][: args.prompts]
    size = generator.default_resolution
    chooser = random.Random(0)
    images = torch.rand(len(prompts), 3, size, size, generator=torch.Generator().manual_seed(0))
    wall = cpu = 0.0
    for step in range(args.steps):
        picks = [chooser.randrange(len(prompts)) for _ in range(args.batch)]
        batch = {"prompts": [prompts[i] for i in picks], "images": images[picks]}
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        objective.select_reference(step)
        loss, _ = objective.loss(batch, torch.Generator().manual_seed(step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        wall += time.perf_counter() - start_wall
        cpu += time.process_time() - start_cpu
    hits, misses = objective.stats["cache_hits"], objective.stats["cache_misses"]
    reference_wall, reference_cpu = objective.stats["reference_sample_s"], objective.stats["reference_sample_cpu_s"]
    return {"model": model, "cache": cache_size > 0, "step_wall_ms": 1000 * wall / args.steps,
            "step_cpu_ms": 1000 * cpu / args.steps, "reference_wall_ms": 1000 * reference_wall / args.steps,
            "reference_cpu_ms": 1000 * reference_cpu / args.steps,
            "optimisation_cpu_ms": 1000 * (cpu - reference_cpu) / args.steps,
            "optimisation_wall_ms": 1000 * (wall - reference_wall) / args.steps,
            "hit_rate": hits / max(hits + misses, 1)}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {platform.platform()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); {args.steps} steps, batch {args.batch} from {args.prompts} prompts, "
          f"reference sampler {args.reference_steps} steps CFG {args.guidance_scale}, snapshot every {args.save_every}",
          file=sys.stderr)
    print("| model | cache | step wall (ms) | step CPU (ms) | reference samples CPU (ms) | optimisation CPU (ms) "
          "| reference share (CPU) | hit rate |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        rows = [run(model, 0, args), run(model, 4096, args)]
        for row in rows:
            print(f"| {model} | {'on' if row['cache'] else 'off'} | {row['step_wall_ms']:.0f} | {row['step_cpu_ms']:.0f} | "
                  f"{row['reference_cpu_ms']:.0f} | {row['optimisation_cpu_ms']:.0f} | "
                  f"{row['reference_cpu_ms'] / row['step_cpu_ms']:.2f} | {row['hit_rate']:.2f} |", flush=True)
        off, on = rows
        print(f"| {model} | speed-up from the cache | {off['step_wall_ms'] / on['step_wall_ms']:.2f}x wall | "
              f"{off['step_cpu_ms'] / on['step_cpu_ms']:.2f}x CPU | | | | |", flush=True)


if __name__ == "__main__":
    main()
