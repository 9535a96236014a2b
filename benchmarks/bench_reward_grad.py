"""Benchmark of the reward-gradient objectives (issue 8): peak memory and step time of one
``loss + backward`` of DRaFT-K (K = 1) and AlignProp against full backprop through every
sampling step (DRaFT full), each with and without gradient checkpointing.

Each (model, method, checkpointing) case runs in its own subprocess:

1. build the model and a LoRA (rank 4), the objective (``visalign.algorithms.reward_grad``) and a
   tiny differentiable CLIP reward (``rewards.tiny``); ``N`` DDIM steps (eta 0), batch ``B``;
2. the first step is measured, twice over:
   - **saved for backward**: the bytes of the distinct tensor storages autograd keeps for the
     backward pass (``torch.autograd.graph.saved_tensors_hooks``), weights excluded. Exact and
     independent of the allocator: the activations of the steps with gradient, or with
     per-call checkpointing the calls' inputs. It is the part of memory the methods and
     checkpointing change; it leaves out the transient peak of one call's recomputation in
     backward and the gradients themselves (LoRA: small);
   - **peak RSS − before**: read the resident memory (``VmRSS``), reset the kernel's peak
     counter (``VmHWM``, via ``/proc/self/clear_refs``), run the step, read the peak. Everything
     the step needed, transients included, as the kernel sees it;
3. ``--repeats`` more steps are timed;
   the median wall clock of a whole step (sampling, decode, reward, backward) is reported (for the
   full-size model the measured first step; its cases are every method with ``none`` and
   ``steps``, and full backprop with ``blocks``).

The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536``: every allocation above 64 KiB gets
its own mapping that ``free`` returns to the kernel, so resident memory follows the live tensors
(glibc's default threshold adapts upward and then keeps freed tensors in its heap, which hides
them from RSS). Smaller allocations still come from the heap, so for the tiny models (8x8
latents, most tensors under 64 KiB) the RSS figure is coarse; the saved-for-backward figure is
the one to read there.

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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=None, help="explicit method:mode list, e.g. full:none,k1:steps")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # model|method|mode|folder (subprocess)
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


def saved_for_backward(parameters: set[int]):
    """A ``saved_tensors_hooks`` context that sums the bytes of the distinct storages autograd keeps
    for backward, weights excluded: the activations (and, with per-call checkpointing, the
    checkpoints' inputs) that the backward pass needs."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), storages


def run_case(spec: str, args) -> dict:
    """One (model, method, mode) case in this fresh process: the first step is the measured one
    (no warm-up, so memory freed by an earlier step cannot hide in the allocator), then
    ``--repeats`` timed steps."""
    from rewards.tiny import tiny_clip_reward
    from visalign.algorithms.reward_grad import AlignProp, AlignPropOptions, DRaFT, DRaFTOptions

    torch.set_num_threads(1)
    model, method, mode, folder = spec.split("|")
    full_size = model == "sd15-full"
    gen = build(model, folder, args.full_size_latent)
    reward = tiny_clip_reward()
    n, batch = args.steps, (1 if full_size else args.batch)
    guidance = 1.0 if full_size else args.guidance
    common = dict(num_inference_steps=n, guidance_scale=guidance, eta=0.0, gradient_checkpointing=mode)
    if method == "alignprop":
        options = AlignPropOptions(truncation="fixed", truncation_fixed=n - args.alignprop_keep, **common)
        obj = AlignProp(gen, options, reward=reward)
    else:
        obj = DRaFT(gen, DRaFTOptions(variant="full" if method == "full" else "k", k=1, **common), reward=reward)
    obj.prompts = PROMPTS
    obj.bind(batch)
    modules = [gen.denoiser, gen.vae, reward] + [m for m in gen.text_encoders.values()]
    weights = {t.untyped_storage().data_ptr() for m in modules for t in list(m.parameters()) + list(m.buffers())}

    def step(seed, hooks=None):
        start = time.perf_counter()
        if hooks is None:
            loss, _ = obj.loss(None, torch.Generator().manual_seed(seed))
        else:
            with hooks:
                loss, _ = obj.loss(None, torch.Generator().manual_seed(seed))
        loss.backward()
        for p in gen.trainable_parameters():
            p.grad = None
        return time.perf_counter() - start

    hooks, storages = saved_for_backward(weights)
    before = _status_bytes("VmRSS")
    reset_ok = _reset_peak_rss()
    first = step(0, hooks)
    extra = _status_bytes("VmHWM") - before if reset_ok else float("nan")
    times = [step(1 + i) for i in range(args.repeats)] or [first]
    latent = gen.latent_shape(batch)
    return {"model": model, "method": method, "mode": mode, "steps": n, "batch": batch, "guidance": guidance,
            "grad_steps": {"full": n, "k1": 1, "alignprop": args.alignprop_keep}[method],
            "latent_bytes": batch * latent[1] * latent[2] * latent[3] * 4, "saved_bytes": sum(storages.values()),
            "extra_bytes": extra, "step_s": statistics.median(times), "first_step_s": first}


def cases(args, full_size: bool) -> list[tuple[str, str]]:
    if args.cases:
        return [tuple(case.split(":")) for case in args.cases.split(",")]
    methods = args.methods.split(",")
    modes = args.modes.split(",")
    if full_size:  # the slow model: every method without and with per-call checkpointing, full with blocks too
        return [(m, mode) for m in methods for mode in modes if mode != "blocks" or m == "full"]
    return [(m, mode) for m in methods for mode in modes]


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_case(args.one, args)))
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
        for method, mode in cases(args, model == "sd15-full"):
            spec = f"{model}|{method}|{mode}|{folders[family]}"
            command = [sys.executable, __file__, "--one", spec, "--steps", str(args.steps), "--batch", str(args.batch),
                       "--guidance", str(args.guidance), "--repeats", str(args.repeats if model != "sd15-full" else 0),
                       "--alignprop-keep", str(args.alignprop_keep), "--full-size-latent", str(args.full_size_latent)]
            completed = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                print(f"{spec}: failed\n{completed.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(lines[-1][len("RESULT "):])
            rows.append(row)
            print(f"{model} {method} {mode}: saved {row['saved_bytes'] / 2**20:.2f} MiB, RSS +{row['extra_bytes'] / 2**20:.1f} "
                  f"MiB, {row['step_s']:.2f} s", file=sys.stderr, flush=True)
    print(f"\nMachine: {platform.platform()}, CPU x{os.cpu_count()}, torch {torch.__version__}, 1 torch thread; "
          f"N = {args.steps} DDIM steps\n")
    print("| model | method (steps with grad) | checkpointing | saved for backward (MiB) | peak RSS − before (MiB) "
          "| saved vs full, none | step (s) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["method"] == "full" and r["mode"] == "none"), None)
        ratio = f"{row['saved_bytes'] / base['saved_bytes']:.3f}" if base else "—"
        label = {"full": "full backprop", "k1": "DRaFT-K, K=1", "alignprop": "AlignProp, fixed cut"}[row["method"]]
        print(f"| {row['model']} (B={row['batch']}, latent {row['latent_bytes'] / 1024:.0f} KiB) | {label} ({row['grad_steps']}) "
              f"| {row['mode']} | {row['saved_bytes'] / 2**20:.2f} | {row['extra_bytes'] / 2**20:.1f} | {ratio} "
              f"| {row['step_s']:.2f} |")
    out = Path("runs") / "bench_reward_grad.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
