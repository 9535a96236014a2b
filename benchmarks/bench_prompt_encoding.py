"""Benchmark of prompt encoding in a training step: what does tokenising cost, with and without
the tokenizer cache (``visalign.token_cache.CachingTokenizer``)?

A training step encodes its batch of captions. diffusers' ``encode_prompt`` tokenises the batch
on every call, and for SD-family pipelines three times (ids padded to ``max_length``, ids padded
to the longest prompt for the truncation warning, ``tokenize`` per prompt for the
textual-inversion check). The Generator's ``encode_prompt`` puts a cache in front of the
tokenizers, so each distinct caption is tokenised once per run.

For the shipped testbed SD model (if present) and the tiny ``sd``, ``sdxl`` and ``sd3``
families, with ``--batch`` captions drawn (with replacement) from the testbed's train prompts:

- **bare**: the text encoder(s) on ready-made token ids, the work no implementation avoids;
- **uncached**: the pipeline's own ``encode_prompt`` (what the Generator called before);
- **cached**: ``Generator.encode_prompt`` after one warm-up call (the steady state of a run).

Timings are medians of interleaved repetitions of process CPU time on one torch thread (steady
on a shared machine: it counts this process's work, not the wait for a core); the overhead over
bare is what tokenising (and, for SD3, assembling the embeddings) costs. Run from the repository root::

    python benchmarks/bench_prompt_encoding.py                 # about a minute on a 2-core CPU
    python benchmarks/bench_prompt_encoding.py --batch 1024
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="captions per encode call")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", nargs="+", default=["testbed-sd", "sd", "sdxl", "sd3"])
    return parser.parse_args(argv)


def _captions(batch: int) -> list[str]:
    from visalign.testbed.prompts import load_prompts

    prompts = [record.prompt for record in load_prompts("train")]
    rng = random.Random(0)
    return [rng.choice(prompts) for _ in range(batch)]


def _bare(generator, captions):
    """The text encoders on token ids made once: the unavoidable work of encode_prompt."""
    pipe = generator.pipe
    hidden = generator.family != "sd"  # SDXL and SD3 read the penultimate hidden state
    encoders = [(getattr(pipe, f"tokenizer{s}", None), getattr(pipe, f"text_encoder{s}", None)) for s in ("", "_2", "_3")]
    inputs = [(encoder, tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids)
              for tokenizer, encoder in encoders if tokenizer is not None and encoder is not None]

    def run():
        with torch.no_grad():
            for encoder, ids in inputs:
                encoder(ids, output_hidden_states=hidden)
    return run


def _uncached(generator, captions):
    extra = {"prompt_2": None, "prompt_3": None} if generator.family == "sd3" else {}

    def run():
        with torch.no_grad():
            generator.pipe.encode_prompt(captions, device=generator.device, num_images_per_prompt=1,
                                         do_classifier_free_guidance=False, **extra)
    return run


def bench(name: str, path: Path, captions: list[str], repeats: int) -> dict:
    from visalign.models import load_generator

    generator = load_generator(path)
    generator.pipe.set_progress_bar_config(disable=True)
    calls = {"bare": _bare(generator, captions), "uncached": _uncached(generator, captions),
             "cached": lambda: generator.encode_prompt(captions)}
    times = {key: [] for key in calls}
    for call in calls.values():  # warm-up (the cached call fills the cache here)
        call()
    for _ in range(repeats):
        for key, call in calls.items():
            start = time.process_time()
            call()
            times[key].append(time.process_time() - start)
    median = {key: statistics.median(values) * 1000 for key, values in times.items()}
    return {"model": name, **median, "distinct": len(set(captions))}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from visalign.models.tiny import save_tiny_model

    captions = _captions(args.batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            if family == "testbed-sd":
                path = ROOT / "assets" / "testbed" / "sd"
                if not (path / "model_index.json").exists():
                    continue
            else:
                path = save_tiny_model(family, Path(tmp) / family, seed=0)
            rows.append(bench(family, path, captions, args.repeats))
    print(f"\n{args.batch} captions ({rows[0]['distinct'] if rows else 0} distinct) per call; medians of "
          f"{args.repeats} interleaved repetitions (process CPU time); {args.threads} torch thread(s); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| model | bare text encoders (ms) | uncached encode_prompt (ms) | cached (ms) | overhead, uncached (ms) | "
          "overhead, cached (ms) | uncached / cached overhead |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        over_uncached, over_cached = row["uncached"] - row["bare"], row["cached"] - row["bare"]
        ratio = over_uncached / over_cached if over_cached > 0 else float("inf")
        print(f"| {row['model']} | {row['bare']:.1f} | {row['uncached']:.1f} | {row['cached']:.1f} | {over_uncached:.1f} | "
              f"{over_cached:.1f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
