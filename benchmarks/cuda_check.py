"""Check the CUDA paths on a GPU machine and print what they measure (no GPU: exits 0 with a note).

1. **Sampling in fp32, fp16 and bf16** of the shipped testbed models (the SD-family UNet and the
   SD3-style transformer) from the same noise: the largest pixel difference from fp32, the
   held-out oracle accuracy in each dtype, the attention processors in use (SDPA by default) and
   the peak memory.
2. **Training with ``mixed_precision`` fp16 and bf16** through the trainer (the ``sft`` objective
   on rendered testbed scenes, fp32 master weights, a GradScaler for fp16): the loss stays finite
   and the weights move, with the step rate and the peak memory.

    python benchmarks/cuda_check.py                 # about a minute on one GPU
    python benchmarks/cuda_check.py --prompts 95    # all held-out prompts

Results are recorded in ``benchmarks/RESULTS.md`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visalign.eval.evaluate import sample_for_eval  # noqa: E402
from visalign.models import load_generator  # noqa: E402
from visalign.testbed.oracle import oracle  # noqa: E402
from visalign.testbed.prompts import load_prompts  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_sampling(family: str, prompts: list[str], steps: int) -> dict:
    rows, reference = {}, None
    for name, dtype in DTYPES.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        generator = load_generator(ROOT / "assets" / "testbed" / family, torch_dtype=dtype, device="cuda")
        processors = sorted({type(p).__name__ for p in generator.denoiser.attn_processors.values()})
        sample_for_eval(generator, prompts[:2], 1, 2, 4.0, seed=0)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        images = sample_for_eval(generator, prompts, 2, steps, 4.0, seed=0)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        expanded = [p for p in prompts for _ in range(2)]
        verdict = oracle(images, expanded)
        if reference is None:
            reference = images
        rows[name] = {
            "finite": bool(torch.isfinite(images).all()),
            "max_abs_diff_vs_fp32": float((images - reference).abs().max()),
            "mean_abs_diff_vs_fp32": float((images - reference).abs().mean()),
            "oracle_accuracy": round(verdict.accuracy, 4),
            "images_per_second": round(len(images) / elapsed, 1),
            "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "attention_processors": processors,
        }
        del generator
    return rows


def check_training(mixed_precision: str, data: Path, steps: int) -> dict:
    from visalign.config import load_config
    from visalign.training import TrainConfig, train

    import safetensors.torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        config = load_config(TrainConfig, data={
            "model": {"path": str(ROOT / "assets" / "testbed" / "sd"), "finetune": "full"},
            "objective": "sft", "options": {"prompt_dropout": 0.1},
            "data": {"format": "captions", "path": str(data)},
            "optim": {"lr": 1e-4}, "batch_size": 64, "max_steps": steps, "mixed_precision": mixed_precision,
            "output_dir": out, "checkpoint_every": 0, "log_every": steps, "seed": 0,
        })
        start = time.perf_counter()
        result = train(config)
        elapsed = time.perf_counter() - start
        trained = safetensors.torch.load_file(result.final_weights / "unet" / "diffusion_pytorch_model.safetensors")
        shipped = safetensors.torch.load_file(ROOT / "assets" / "testbed" / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
        moved = max((trained[k].float() - shipped[k].float()).abs().max().item() for k in shipped)
        metrics = [json.loads(line) for line in open(Path(out) / "logs" / "metrics.jsonl")]
    return {"loss": round(result.last_metrics["loss"], 4), "finite": bool(torch.isfinite(torch.tensor(result.last_metrics["loss"]))),
            "weights_moved_max_abs": moved, "steps_per_second_in_loop": round(metrics[-1]["steps_per_second"], 2),
            "wall_s_incl_loading": round(elapsed, 1), "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts sampled (2 images each)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--train-steps", type=int, default=60, help="training steps per precision")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--no-sampling", action="store_true", help="skip the sampling checks")
    parser.add_argument("--train-one", nargs=2, metavar=("PRECISION", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_one:  # a child process: accelerate fixes mixed_precision once per process
        print("RESULT " + json.dumps(check_training(args.train_one[0], Path(args.train_one[1]), args.train_steps)))
        return
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA device; nothing to check")
        return
    from visalign.testbed.build import render_dataset

    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    prompts = [record.prompt for record in load_prompts("heldout")][: args.prompts]
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sampling": {}, "training": {}}
    for family in () if args.no_sampling else ("sd", "sd3"):
        results["sampling"][family] = check_sampling(family, prompts, args.steps)
        for name, row in results["sampling"][family].items():
            print(f"sample {family:4s} {name}: {row}")
    with tempfile.TemporaryDirectory() as work:
        data = render_dataset(Path(work) / "data", 2048, 0.3, seed=0)
        for precision in ("no", "bf16", "fp16"):
            child = subprocess.run([sys.executable, __file__, "--train-one", precision, str(data),
                                    "--train-steps", str(args.train_steps)], capture_output=True, text=True)
            lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if child.returncode != 0 or not lines:
                results["training"][precision] = {"error": child.stderr.strip().splitlines()[-1:]}
            else:
                results["training"][precision] = json.loads(lines[-1][len("RESULT "):])
            print(f"train sd mixed_precision={precision}: {results['training'][precision]}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
