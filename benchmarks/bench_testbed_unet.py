"""Benchmark of the testbed UNets' attention-head layout: one training step's forward + backward
(and one sampling step's forward) of the same UNet with the head layout the testbed sizes had
until session 18 and with the one they have now.

diffusers' ``UNet2DConditionModel`` reads ``attention_head_dim`` as the *number of heads*. The
testbed sizes passed 16 (testbed) and 32 (testbed-wide) there, meaning a head width, and so got 16
or 32 heads of 2-4 channels; they now pass ``(2, 4)`` heads, 16- or 32-wide. The parameter count
is the same (the heads only split the same projections), so the difference is the attention
kernels' cost on many tiny heads, plus what 2-channel heads can express.

    python benchmarks/bench_testbed_unet.py               # about a minute on a 2-core CPU
    python benchmarks/bench_testbed_unet.py --batch 64 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the attention_head_dim (a number of heads) each size passed before session 18
OLD_HEADS = {"testbed": 16, "testbed-wide": 32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="the testbed build's batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def measure(size: str, old_heads: int, batch: int, repeats: int) -> dict:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    from visalign.models.tiny import build_tiny_components

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        current = build_tiny_components("sd", size=size, tokenizer_dir=tokenizer_dir)["unet"]
    old = UNet2DConditionModel.from_config({**current.config, "attention_head_dim": old_heads})
    latents = torch.randn(batch, 4, 16, 16)
    timesteps = torch.randint(0, 1000, (batch,))
    text = torch.randn(batch, 77, current.config.cross_attention_dim)
    row = {}
    for name, unet in (("before", old), ("now", current)):
        widths = sorted({m.inner_dim // m.heads for m in unet.modules() if isinstance(m, Attention)})

        def train_step():
            unet.zero_grad(set_to_none=True)
            unet(latents, timesteps, text).sample.pow(2).mean().backward()

        def sample_step():
            with torch.no_grad():
                unet(latents, timesteps, text)

        row[name] = {"head_widths": widths, "params": sum(p.numel() for p in unet.parameters()),
                     "train_s": seconds(train_step, repeats), "sample_s": seconds(sample_step, repeats)}
    return row


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"\nUNet forward + backward (a training step's) and forward (a sampling step's) at batch {args.batch}, "
          f"16x16x4 latents, 77 text tokens; {platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} thread(s), torch {torch.__version__}\n")
    print("| size | layout | head widths | parameters | fwd+bwd (s) | fwd (s) |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for size, old_heads in OLD_HEADS.items():
        row = measure(size, old_heads, args.batch, args.repeats)
        for name, label in (("before", f"{old_heads} heads (before)"), ("now", "(2, 4) heads (now)")):
            r = row[name]
            print(f"| {size} | {label} | {r['head_widths']} | {r['params']:,} | {r['train_s']:.3f} | {r['sample_s']:.3f} |")
        ratios[size] = (row["before"]["train_s"] / row["now"]["train_s"], row["before"]["sample_s"] / row["now"]["sample_s"])
    print()
    for size, (train, sample) in ratios.items():
        print(f"{size}: before / now = {train:.2f}x per training step, {sample:.2f}x per sampling step")


if __name__ == "__main__":
    main()
