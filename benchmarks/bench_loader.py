"""Benchmark of the captions loader the testbed build trains on: images per second of one
DataLoader worker, decoding every epoch (the default) against ``data.in_memory`` (every image
decoded once before training; the testbed build turns it on).

Renders ``--images`` testbed scenes into a temporary folder with ``visalign.testbed.build.
render_dataset`` (PNG files and a captions.jsonl, as the build does), then iterates
``--epochs`` epochs at ``--batch`` with no worker processes (the work one worker does), after
the preload for ``in_memory``. Session 6's GPU run was bound by this loader (about 2,000
images/s with 6-12 workers, benchmarks/RESULTS.md).

    python benchmarks/bench_loader.py                      # about a minute on a 2-core CPU
    python benchmarks/bench_loader.py --images 16000 --epochs 3
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    return parser.parse_args(argv)


def throughput(captions: Path, in_memory: bool, epochs: int, batch: int) -> dict:
    from visalign.data import ImageTransform, RecordDataset, load_records, make_dataloader

    start = time.perf_counter()
    dataset = RecordDataset(load_records("captions", str(captions)), ImageTransform(resolution=32, random_flip=False),
                            in_memory=in_memory)
    setup = time.perf_counter() - start
    loader = make_dataloader(dataset, batch, num_workers=0)
    count, start = 0, time.perf_counter()
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for batch_dict in loader:
            count += len(batch_dict["prompts"])
    elapsed = time.perf_counter() - start
    return {"setup_s": setup, "images_per_s": count / elapsed, "ms_per_image": 1000 * elapsed / count}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    from visalign.testbed.build import render_dataset

    with tempfile.TemporaryDirectory() as tmp:
        captions = render_dataset(Path(tmp), args.images, caption_noise=0.3, seed=0)
        rows = {mode: throughput(captions, mode == "in memory", args.epochs, args.batch)
                for mode in ("decode every epoch", "in memory")}
    print(f"\n{args.images} rendered 32x32 images, {args.epochs} epochs at batch {args.batch}, no worker processes; "
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| loader | set-up (s) | images/s | ms per image |")
    print("|---|---|---|---|")
    for mode, row in rows.items():
        print(f"| {mode} | {row['setup_s']:.1f} | {row['images_per_s']:.0f} | {row['ms_per_image']:.3f} |")
    lazy, memory = rows["decode every epoch"], rows["in memory"]
    print(f"\nin memory / decode every epoch: {memory['images_per_s'] / lazy['images_per_s']:.1f}x the images per second")


if __name__ == "__main__":
    main()
