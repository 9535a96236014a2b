"""Benchmark of the Diffusion-DPO objective (issue 6): what does a DPO step cost beyond the work
it cannot avoid?

For B pairs (2B latents), one DPO step must run the policy forward + backward on 2B latents and
the reference forward (no grad) on 2B latents. This script times, on the same LoRA model, batch,
noise and timesteps:

- **ours**: ``DiffusionDPO.loss(batch)`` + ``backward`` (cached latents and text embeddings, as
  with ``data.cache_dir``; so neither side runs the VAE or the text encoder);
- **bare**: the unavoidable work written with plain diffusers calls: ``unet(x_t[2B])`` + MSE +
  backward, and ``unet(x_t[2B])`` with the adapters disabled under ``no_grad``;
- **naive**: a straightforward implementation that calls policy and reference separately on
  winners and on losers (four denoiser calls per step).

Runs are warmed up and interleaved (ours, bare, naive, naive, bare, ours, ...); medians of wall
clock and of process CPU time are reported. Targets (issue 6): ours / bare <= 1.10.

Models: the tiny SD-family and SD3 models (``visalign.models.tiny``), and a full-size random-init
SD1.5-architecture UNet (~860 M parameters; cross-attention width 768) at a small latent size.

    python benchmarks/bench_dpo.py                   # a few minutes on a 2-core CPU
    python benchmarks/bench_dpo.py --no-full-size --repeats 21
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (2x latents)")
    parser.add_argument("--repeats", type=int, default=11, help="timed repeats per variant")
    parser.add_argument("--full-size", dest="full_size", action="store_true", default=True)
    parser.add_argument("--no-full-size", dest="full_size", action="store_false")
    parser.add_argument("--full-size-latent", type=int, default=16, help="latent side of the full-size UNet")
    parser.add_argument("--full-size-pairs", type=int, default=1)
    parser.add_argument("--full-size-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def build_generator(family: str, device: str, full_size: bool = False, latent: int = 16):
    from visalign.models import load_generator
    from visalign.models.tiny import save_tiny_model

    folder = save_tiny_model(family, tempfile.mkdtemp(prefix=f"bench-dpo-{family}-"), seed=0)
    generator = load_generator(folder, device=device)
    if full_size:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768).to(device)
        unet.requires_grad_(False)
        generator.pipe.unet = unet
        generator.denoiser = unet
    generator.add_lora(rank=4)
    return generator


def make_batch(generator, pairs: int, latent: int | None, width: int | None):
    from visalign.models import Cond

    g = torch.Generator().manual_seed(0)
    if latent is None:
        shape = generator.latent_shape(pairs)
    else:
        shape = (pairs, generator.denoiser.config.in_channels, latent, latent)
    cond = generator.encode_prompt(["a red circle"] * pairs)
    if width is not None:
        cond = Cond(prompt_embeds=torch.randn(pairs, 77, width, generator=g).to(generator.device))
    side = shape[-1] * generator.vae_scale_factor
    return {
        "prompts": ["a red circle"] * pairs,
        "winner": torch.zeros(pairs, 3, side, side),
        "loser": torch.zeros(pairs, 3, side, side),
        "cached": {"winner": torch.randn(shape, generator=g).to(generator.device),
                   "loser": torch.randn(shape, generator=g).to(generator.device), "cond": cond},
    }


def variants(generator, batch):
    from visalign.algorithms.common import paired_noising, per_sample_mse
    from visalign.algorithms.dpo import DiffusionDPO, DPOOptions, dpo_logits, dpo_loss_from_logits

    objective = DiffusionDPO(generator, DPOOptions(beta=5000.0))
    parameters = generator.trainable_parameters()
    unet = generator.denoiser
    latents = torch.stack([batch["cached"]["winner"], batch["cached"]["loser"]], 1).flatten(0, 1)
    x_t, noise, t, target = paired_noising(generator, latents, 2, torch.Generator().manual_seed(1))
    cond = batch["cached"]["cond"].repeat_interleave(2)

    def zero():
        for p in parameters:
            p.grad = None

    def ours():
        loss, _ = objective.loss(batch, torch.Generator().manual_seed(1))
        loss.backward()
        zero()

    def bare():
        # The denoiser calls a DPO step cannot avoid, with plain module calls (no Generator seam).
        if generator.is_flow:
            call = lambda x: unet(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.prompt_embeds,
                                  pooled_projections=cond.pooled_embeds, return_dict=False)[0]
        else:
            call = lambda x: unet(x, t, encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]
        loss = F.mse_loss(call(x_t), target)
        loss.backward()
        unet.disable_adapters()
        with torch.no_grad():
            call(x_t)
        unet.enable_adapters()
        zero()

    def naive():
        w, l = slice(0, None, 2), slice(1, None, 2)
        reference = generator.reference()
        m_w = per_sample_mse(generator.predict(x_t[w], t[w], cond[w]), target[w])
        m_l = per_sample_mse(generator.predict(x_t[l], t[l], cond[l]), target[l])
        r_w = per_sample_mse(reference.predict(x_t[w], t[w], cond[w]), target[w])
        r_l = per_sample_mse(reference.predict(x_t[l], t[l], cond[l]), target[l])
        dpo_loss_from_logits(dpo_logits(m_w, m_l, r_w, r_l, 5000.0)).mean().backward()
        zero()

    return {"ours": ours, "bare": bare, "naive": naive}


def timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def measure(runs: dict, repeats: int) -> dict:
    names = list(runs)
    for name in names:  # warm-up
        runs[name]()
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for i in range(repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            w, c = timed(runs[name])
            wall[name].append(w)
            cpu[name].append(c)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    return f"{platform.platform()}, {device}, torch {torch.__version__}, {torch.get_num_threads()} torch threads"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [("tiny sd (eps)", "sd", False, None, None, args.pairs, args.repeats),
             ("tiny sd3 (flow)", "sd3", False, None, None, args.pairs, args.repeats)]
    if args.full_size:
        cases.append((f"SD1.5 UNet, random init, {args.full_size_latent}x{args.full_size_latent} latents", "sd", True,
                      args.full_size_latent, 768, args.full_size_pairs, args.full_size_repeats))
    rows = []
    for label, family, full, latent, width, pairs, repeats in cases:
        generator = build_generator(family, args.device, full, latent or 16)
        batch = make_batch(generator, pairs, latent, width)
        result = measure(variants(generator, batch), repeats)
        rows.append((label, pairs, result))
        print(f"{label}: " + ", ".join(f"{k} {v[0] * 1e3:.1f} ms" for k, v in result.items()), file=sys.stderr)
    print(f"\nMachine: {machine()}\n")
    print("| model | pairs | ours (ms) | bare (ms) | naive 4-call (ms) | ours / bare (wall) | ours / bare (CPU) | naive / ours |")
    print("|---|---|---|---|---|---|---|---|")
    for label, pairs, r in rows:
        print(f"| {label} | {pairs} | {r['ours'][0] * 1e3:.1f} | {r['bare'][0] * 1e3:.1f} | {r['naive'][0] * 1e3:.1f} | "
              f"{r['ours'][0] / r['bare'][0]:.3f} | {r['ours'][1] / r['bare'][1]:.3f} | {r['naive'][0] / r['ours'][0]:.3f} |")


if __name__ == "__main__":
    main()
