"""Benchmark of RankDPO and of ``visalign dataset synth`` (issue 9).

(a) A RankDPO step for rankings of ``k`` images (``RankDPO.loss`` + backward; cached latents
    and text embeddings, LoRA rank 4) against the work it cannot avoid, written with bare
    diffusers calls on the same model, latents, noise and timesteps: policy forward + backward
    on the ``B*k`` latents and the reference forward (adapters disabled, no grad) on the same
    ``B*k`` latents. Also with the reference chunked (``reference_chunk_size = k``), which trades
    a little speed for memory. Target: ours / bare <= 1.10.
(b) Synth throughput: ``build_synth`` (seeded noise per image, sampling, scoring with every
    reward, vote-based phi, PNGs, parquet parts, summary) against plain batched sampling of the
    same prompts plus the same reward calls (nothing written). Target: >= 0.9 of plain images/s.

Runs are warmed up and interleaved; medians of wall clock and process CPU time.

    python benchmarks/bench_rankdpo.py                 # a few minutes on a 2-core CPU
    python benchmarks/bench_rankdpo.py --full-size     # + a full-size SD1.5 UNet (slow on a CPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_dpo import build_generator, machine, measure  # noqa: E402  (shared harness)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4, help="images per ranking")
    parser.add_argument("--rankings", type=int, default=2, help="rankings per step")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--full-size", action="store_true", help="also a full-size SD1.5 UNet at 16x16 latents")
    parser.add_argument("--synth-prompts", type=int, default=16)
    parser.add_argument("--synth-steps", type=int, default=10)
    parser.add_argument("--synth-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def ranking_batch(generator, rankings: int, k: int, latent: int | None, width: int | None):
    from visalign.models import Cond

    g = torch.Generator().manual_seed(0)
    shape = generator.latent_shape(rankings * k) if latent is None else (
        rankings * k, generator.denoiser.config.in_channels, latent, latent)
    cond = generator.encode_prompt(["a red circle"] * rankings)
    if width is not None:
        cond = Cond(prompt_embeds=torch.randn(rankings, 77, width, generator=g).to(generator.device))
    side = shape[-1] * generator.vae_scale_factor
    return {
        "prompts": ["a red circle"] * rankings,
        "images": torch.zeros(rankings, k, 3, side, side),
        "scores": torch.linspace(1, 0, k).expand(rankings, k).clone(),
        "mask": torch.ones(rankings, k, dtype=torch.bool),
        "cached": {"images": torch.randn(shape, generator=g).view(rankings, k, *shape[1:]).to(generator.device),
                   "cond": cond},
    }


def step_variants(generator, batch, k):
    from visalign.algorithms.common import paired_noising
    from visalign.algorithms.rankdpo import RankDPO, RankDPOOptions

    objective = RankDPO(generator, RankDPOOptions(beta=5000.0))
    chunked = RankDPO(generator, RankDPOOptions(beta=5000.0, reference_chunk_size=k))
    parameters = generator.trainable_parameters()
    unet = generator.denoiser
    latents = batch["cached"]["images"].flatten(0, 1)
    x_t, _, t, target = paired_noising(generator, latents, k, torch.Generator().manual_seed(1))
    cond = batch["cached"]["cond"].repeat_interleave(k)

    def zero():
        for p in parameters:
            p.grad = None

    def ours():
        objective.loss(batch, torch.Generator().manual_seed(1))[0].backward()
        zero()

    def ours_chunked():
        chunked.loss(batch, torch.Generator().manual_seed(1))[0].backward()
        zero()

    def bare():
        if generator.is_flow:
            call = lambda x: unet(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.prompt_embeds,
                                  pooled_projections=cond.pooled_embeds, return_dict=False)[0]
        else:
            call = lambda x: unet(x, t, encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]
        F.mse_loss(call(x_t), target).backward()
        unet.disable_adapters()
        with torch.no_grad():
            call(x_t)
        unet.enable_adapters()
        zero()

    return {"ours": ours, "bare": bare, "ours_chunked": ours_chunked}


def synth_variants(args, generator):
    import rewards

    from visalign.preference_data import score_images
    from visalign.synth import SynthConfig, build_synth, noise_seed

    reward_objects = {"oracle": rewards.load("testbed-oracle"), "quality": rewards.load("testbed-oracle", mode="quality")}
    prompts_file = Path(tempfile.mkdtemp(prefix="bench-synth-")) / "prompts.txt"
    from visalign.testbed.prompts import load_prompts

    prompts = [r.prompt for r in load_prompts("train")][: args.synth_prompts]
    prompts_file.write_text("\n".join(prompts) + "\n")
    per = 4
    batch = 16

    def ours():
        out = tempfile.mkdtemp(prefix="bench-synth-out-")
        build_synth(SynthConfig(generators=["g"], rewards=list(reward_objects), prompts=str(prompts_file),
                                images_per_generator=per, steps=args.synth_steps, batch_size=batch,
                                prompts_per_part=batch // per, progress=False, out=out),
                    generators={"g": generator}, rewards=reward_objects)

    def plain():
        expanded = [p for p in prompts for _ in range(per)]
        shape = generator.latent_shape(1)[1:]
        for start in range(0, len(expanded), batch):
            chunk = expanded[start : start + batch]
            latents = torch.randn((len(chunk), *shape), generator=torch.Generator().manual_seed(start))
            with torch.no_grad():
                images = generator.sample(chunk, latents=latents.to(generator.device), num_inference_steps=args.synth_steps,
                                          guidance_scale=4.0).images.float().cpu()
            for reward in reward_objects.values():
                score_images(reward, images, chunk, batch)

    assert noise_seed(1, 0, 0, 0) == noise_seed(1, 0, 0, 0)
    return {"ours": ours, "plain": plain}, len(prompts) * per


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [("tiny sd (eps)", "sd", False, None, None, args.rankings, args.repeats),
             ("tiny sd3 (flow)", "sd3", False, None, None, args.rankings, args.repeats)]
    if args.full_size:
        cases.append(("SD1.5 UNet, random init, 16x16 latents", "sd", True, 16, 768, 1, 5))
    rows = []
    for label, family, full, latent, width, rankings, repeats in cases:
        generator = build_generator(family, args.device, full, latent or 16)
        result = measure(step_variants(generator, ranking_batch(generator, rankings, args.k, latent, width), args.k),
                         repeats)
        rows.append((label, rankings, result))
        print(f"{label}: " + ", ".join(f"{k} {v[0] * 1e3:.1f} ms" for k, v in result.items()), file=sys.stderr)

    print(f"\nMachine: {machine()}\n")
    print(f"(a) RankDPO step, k = {args.k}, LoRA rank 4, cached latents\n")
    print("| model | rankings (images) | ours (ms) | bare (ms) | ours, reference chunked by k (ms) | "
          "ours / bare (wall) | ours / bare (CPU) | chunked / bare (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, rankings, r in rows:
        print(f"| {label} | {rankings} ({rankings * args.k}) | {r['ours'][0] * 1e3:.1f} | {r['bare'][0] * 1e3:.1f} | "
              f"{r['ours_chunked'][0] * 1e3:.1f} | {r['ours'][0] / r['bare'][0]:.3f} | {r['ours'][1] / r['bare'][1]:.3f} | "
              f"{r['ours_chunked'][1] / r['bare'][1]:.3f} |")
    sys.stdout.flush()

    from visalign.models import load_generator

    testbed = Path(__file__).resolve().parent.parent / "assets" / "testbed" / "sd"
    generator = load_generator(testbed, device=args.device)
    runs, images = synth_variants(args, generator)
    synth = measure(runs, args.synth_repeats)
    print(f"\n(b) synth on the SD testbed model: {images} images ({args.synth_prompts} prompts x 4), "
          f"{args.synth_steps} steps, batch 16, rewards: oracle correctness + oracle quality\n")
    print("| variant | wall (s) | CPU (s) | images/s (wall) | images/s (CPU) |")
    print("|---|---|---|---|---|")
    for name, label in (("ours", "visalign dataset synth"), ("plain", "plain batched sampling + scoring")):
        wall, cpu = synth[name]
        print(f"| {label} | {wall:.2f} | {cpu:.2f} | {images / wall:.2f} | {images / cpu:.2f} |")
    print(f"\nsynth / plain throughput: {synth['plain'][0] / synth['ours'][0]:.3f} (wall), "
          f"{synth['plain'][1] / synth['ours'][1]:.3f} (CPU)")


if __name__ == "__main__":
    main()
