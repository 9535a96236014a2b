"""Benchmark of the reward-gradient objectives (issue 8): peak memory and step time of one
``loss + backward`` of DRaFT-K (K = 1) and AlignProp against full backprop through every
sampling step (DRaFT full), each with and without gradient checkpointing.

Each model runs in its own subprocess, its cases one after the other:

1. build the model and a LoRA (rank 4), the objective (``visalign.algorithms.reward_grad``) and a
   tiny differentiable CLIP reward (``rewards.tiny``); ``N`` DDIM steps (eta 0), batch ``B``;
2. ``--warmup`` untimed steps (none for the full-size model);
3. read the resident memory (``VmRSS``), reset the kernel's peak counter (``VmHWM``, via
   ``/proc/self/clear_refs``), run one step, and read the peak: **peak − before** is the extra
   memory the step needed (activations kept for backward, gradients, the sampler's states);
   repeated ``--repeats`` times (medians; time is wall clock of the whole step; once for the
   full-size model, whose cases are: every method with ``none`` and ``steps``, full with ``blocks``).

The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536``: every allocation above 64 KiB gets
its own mapping that ``free`` returns to the kernel, so resident memory follows the live tensors
(glibc's default threshold adapts upward and then keeps freed tensors in its heap, which hides
them from RSS). The figure is still the whole process's: Python objects and allocator slack
count, at page granularity.

Checkpointing modes (``options.gradient_checkpointing``): ``none``; ``steps`` (each denoiser call
one non-reentrant checkpoint, plus the VAE decoder's blocks: backprop through k steps keeps k
sets of call inputs, i.e. latents); ``blocks`` (diffusers' block-level checkpointing of the
denoiser and VAE decoder).

Models: the tiny ``sd``, ``sdxl`` and ``sd3`` families (``visalign.models.tiny``), and
``--full-size``: a random-init SD1.5 UNet (the ``bench_trainer.sd15_unet`` config, 860 M
parameters) and SD1.5-config VAE (83 M) at ``--full-size-latent`` (16: 128 px images), batch 1,
no CFG, with random 77x768 text states in place of the tiny text encoder.

    python benchmarks/bench_reward_grad.py                  # tiny families, a few minutes
    python benchmarks/bench_reward_grad.py --full-size --no-tiny --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import _reset_peak_rss, _status_bytes, sd15_unet  # noqa: E402

METHODS = ("full", "k1", "alignprop")
MODES = ("none", "steps", "blocks")
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow star"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="sd,sdxl,sd3")
    parser.add_argument("--no-tiny", dest="tiny", action="store_false")
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--full-size-latent", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="sampling steps N")
    parser.add_argument("--alignprop-keep", type=int, default=2,
                        help="AlignProp: steps after a fixed cut (8 of 50 by the gaussian default ~ 2 of 10)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # model|folder (subprocess)
    return parser.parse_args(argv)


def build(model: str, folder: str, latent: int):
    from visalign.models import Cond, load_generator

    gen = load_generator(folder)
    if model == "sd15-full":
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        unet = sd15_unet()
        unet.register_to_config(sample_size=latent)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            scaling_factor=0.18215)
        for name, module in (("unet", unet), ("vae", vae)):
            module.requires_grad_(False).eval()
            setattr(gen.pipe, name, module)
        gen.denoiser, gen.vae = unet, vae

        def encode_prompt(prompts):  # SD1.5-width text states (the tiny text encoder is 32 wide)
            seeds = [sum(map(ord, p)) for p in prompts]
            return Cond(torch.stack([torch.randn(77, 768, generator=torch.Generator().manual_seed(s)) for s in seeds]))

        gen.encode_prompt = encode_prompt
    gen.add_lora(rank=4)
    return gen


def reset(gen) -> None:
    """Undo a previous case's checkpointing set-up (all cases of a model share one process)."""
    gen.set_forward_module(None)
    gen.denoiser.disable_gradient_checkpointing()
    gen.vae.disable_gradient_checkpointing()
    for p in gen.trainable_parameters():
        p.grad = None


def run_model(spec: str, args) -> list[dict]:
    """Every (method, mode) case of one model, one after the other in this process."""
    from rewards.tiny import tiny_clip_reward
    from visalign.algorithms.reward_grad import AlignProp, AlignPropOptions, DRaFT, DRaFTOptions

    torch.set_num_threads(1)
    model, folder = spec.split("|")
    full_size = model == "sd15-full"
    gen = build(model, folder, args.full_size_latent)
    reward = tiny_clip_reward()
    n, batch = args.steps, (1 if full_size else args.batch)
    guidance = 1.0 if full_size else args.guidance
    latent = gen.latent_shape(batch)
    rows = []
    for method, mode in cases(args, full_size):
        reset(gen)
        common = dict(num_inference_steps=n, guidance_scale=guidance, eta=0.0, gradient_checkpointing=mode)
        if method == "alignprop":
            options = AlignPropOptions(truncation="fixed", truncation_fixed=n - args.alignprop_keep, **common)
            obj = AlignProp(gen, options, reward=reward)
        else:
            obj = DRaFT(gen, DRaFTOptions(variant="full" if method == "full" else "k", k=1, **common), reward=reward)
        obj.prompts = PROMPTS
        obj.bind(batch)

        def step(seed):
            loss, _ = obj.loss(None, torch.Generator().manual_seed(seed))
            loss.backward()
            for p in gen.trainable_parameters():
                p.grad = None

        for i in range(0 if full_size else args.warmup):
            step(i)
        extra, times = [], []
        for i in range(1 if full_size else args.repeats):
            before = _status_bytes("VmRSS")
            reset_ok = _reset_peak_rss()
            start = time.perf_counter()
            step(100 + i)
            times.append(time.perf_counter() - start)
            extra.append(_status_bytes("VmHWM") - before if reset_ok else float("nan"))
        row = {"model": model, "method": method, "mode": mode, "steps": n, "batch": batch, "guidance": guidance,
               "grad_steps": {"full": n, "k1": 1, "alignprop": args.alignprop_keep}[method],
               "latent_bytes": batch * latent[1] * latent[2] * latent[3] * 4,
               "extra_bytes": statistics.median(extra), "step_s": statistics.median(times)}
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
    return rows


def cases(args, full_size: bool) -> list[tuple[str, str]]:
    methods = args.methods.split(",")
    modes = args.modes.split(",")
    if full_size:  # the slow model: every method without and with per-call checkpointing, full with blocks too
        return [(m, mode) for m in methods for mode in modes if mode != "blocks" or m == "full"]
    return [(m, mode) for m in methods for mode in modes]


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        run_model(args.one, args)
        return
    from visalign.models.tiny import save_tiny_model

    models = []
    if args.tiny:
        models += [(family, family) for family in args.families.split(",") if family]
    if args.full_size:
        models.append(("sd15-full", "sd"))
    folders = {}
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for model, family in models:
        if family not in folders:
            folders[family] = str(save_tiny_model(family, tempfile.mkdtemp(prefix=f"bench-rg-{family}-"), seed=0))
        command = [sys.executable, __file__, "--one", f"{model}|{folders[family]}", "--steps", str(args.steps),
                   "--batch", str(args.batch), "--guidance", str(args.guidance), "--warmup", str(args.warmup),
                   "--repeats", str(args.repeats), "--alignprop-keep", str(args.alignprop_keep),
                   "--full-size-latent", str(args.full_size_latent), "--methods", args.methods, "--modes", args.modes]
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
        found = [json.loads(line[len("RESULT "):]) for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode != 0:
            print(f"{model}: failed\n{completed.stderr[-2000:]}", file=sys.stderr)
        for row in found:
            print(f"{model} {row['method']} {row['mode']}: +{row['extra_bytes'] / 2**20:.1f} MiB, {row['step_s']:.2f} s",
                  file=sys.stderr, flush=True)
        rows += found
    print(f"\nMachine: {platform.platform()}, CPU x{os.cpu_count()}, torch {torch.__version__}, 1 torch thread; "
          f"N = {args.steps} DDIM steps\n")
    print("| model | method (steps with grad) | checkpointing | peak − before (MiB) | vs full, none | step (s) |")
    print("|---|---|---|---:|---:|---:|")
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["method"] == "full" and r["mode"] == "none"), None)
        ratio = f"{row['extra_bytes'] / base['extra_bytes']:.3f}" if base else "—"
        label = {"full": "full backprop", "k1": "DRaFT-K, K=1", "alignprop": "AlignProp, fixed cut"}[row["method"]]
        print(f"| {row['model']} (B={row['batch']}, latent {row['latent_bytes'] / 1024:.0f} KiB) | {label} ({row['grad_steps']}) "
              f"| {row['mode']} | {row['extra_bytes'] / 2**20:.1f} | {ratio} | {row['step_s']:.2f} |")
    out = Path("runs") / "bench_reward_grad.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
