"""Benchmark of the video families (issue 13): per-frame cost, and VAE decode chunking memory.

1. **Per-frame sampling cost.** The tiny ``modelscope`` video UNet (``UNet3DConditionModel``)
   has the spatial widths and blocks of the tiny ``sd`` image UNet (32/64 channels, one
   cross-attention block), plus temporal convolutions and temporal attention. Both sample
   through ``Generator.sample`` (DDIM, classifier-free guidance, ``output_type="latent"``) at
   32x32: a batch of ``B`` clips of ``F`` frames against a batch of ``B * F`` images, so the
   two process the same number of frames. The ratio video / image per frame is the price of
   the temporal layers. The tiny ``animatediff`` model *is* the tiny ``sd`` UNet plus an
   AnimateDiff motion adapter (temporal transformers only), the other same-size pair. The
   flow pair (tiny ``wan`` DiT against tiny ``sd3`` MMDiT) is timed too but is not a same-size
   comparison (different widths and depths); its row is informational. Timed in interleaved (ABBA) repetitions, medians of wall clock and process
   CPU time (one torch thread: CPU time is the work of the call).
2. **VAE decode chunking memory.** ``generator.decode`` of ``B`` clips of ``F`` frames with
   ``decode_chunk_size`` in {all, 8, 2} frames per VAE call, each in a fresh subprocess, at a
   larger frame size (``--decode-size``, default 256 px: the tiny VAE's activations are then
   large enough to measure). Peak resident memory above the level just before the decode
   (``ru_maxrss`` minus the current RSS), no-grad and with gradient (decode + backward of the
   mean, as reward fine-tuning does), the latter also with the VAE's gradient checkpointing
   (SD's VAE only: diffusers' ``AutoencoderKLWan`` has none).
   For Wan's causal 3D VAE, whose decoder already runs latent frame by latent frame, the
   chunk is whole clips.

Run from the repository root::

    python benchmarks/bench_video.py                   # ~5 minutes on a shared 2-core CPU
    python benchmarks/bench_video.py --repeats 9 --frames 8 --batch 2
    python benchmarks/bench_video.py --skip-sampling --decode-size 128 --decode-frames 8

Prints markdown tables (results go to benchmarks/RESULTS.md by hand).
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

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def per_frame_cost(folders: dict[str, Path], pairs, frames: int, batch: int, steps: int, repeats: int) -> list[dict]:
    from visalign.models import load_generator

    rows = []
    for video_family, image_family in pairs:
        video_frames = frames if video_family != "wan" else 4 * ((frames - 1) // 4) + 1
        video = load_generator(folders[video_family], num_frames=video_frames, height=32, width=32)
        image = load_generator(folders[image_family])
        prompts = ["a red circle moving left"] * batch
        image_prompts = ["a red circle"] * (batch * video_frames)

        def run_video():
            with torch.no_grad():
                video.sample(prompts, num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
                             generator=torch.Generator().manual_seed(0))

        def run_image():
            with torch.no_grad():
                image.sample(image_prompts, num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
                             generator=torch.Generator().manual_seed(0))

        run_video(), run_image()  # warm-up
        timings = {"video": [], "image": []}
        for index in range(repeats):
            order = ("video", "image") if index % 2 == 0 else ("image", "video")
            for name in order:
                timings[name].append(_timed(run_video if name == "video" else run_image))
        median = {name: tuple(statistics.median(t[k] for t in values) for k in (0, 1)) for name, values in timings.items()}
        n_frames = batch * video_frames
        rows.append({
            "video": video_family, "image": image_family, "frames": video_frames, "batch": batch,
            "video_params": sum(p.numel() for p in video.denoiser.parameters()),
            "image_params": sum(p.numel() for p in image.denoiser.parameters()),
            "video_ms_per_frame": 1000 * median["video"][0] / n_frames,
            "image_ms_per_frame": 1000 * median["image"][0] / n_frames,
            "video_cpu_ms_per_frame": 1000 * median["video"][1] / n_frames,
            "image_cpu_ms_per_frame": 1000 * median["image"][1] / n_frames,
        })
    return rows


_DECODE_CHILD = r"""
import json, resource, sys, torch
from visalign.models import load_generator
folder, family, frames, batch, size, chunk, grad, checkpointing = sys.argv[1:9]
frames, batch, size = int(frames), int(batch), int(size)
chunk = None if chunk == "all" else int(chunk)
gen = load_generator(folder, num_frames=frames, height=size, width=size)
gen.decode_chunk_size = chunk
if checkpointing == "1":
    gen.vae.enable_gradient_checkpointing()
latents = torch.randn(gen.latent_shape(batch), generator=torch.Generator().manual_seed(0))
if grad == "1":
    latents.requires_grad_(True)
def rss_kib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() // 1024
before = rss_kib()
with torch.set_grad_enabled(grad == "1"):
    videos = gen.decode(latents)
    if grad == "1":
        videos.mean().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_peak_mib": (peak - before) / 1024, "shape": list(videos.shape)}))
"""


def decode_memory(folders: dict[str, Path], frames: int, batch: int, size: int) -> list[dict]:
    rows = []
    configs = []
    for family in ("modelscope", "wan"):
        family_frames = frames if family != "wan" else 4 * ((frames - 1) // 4) + 1
        chunks = ["all", "8", "2"] if family == "modelscope" else ["all", str(family_frames)]
        for chunk in chunks:
            configs.append((family, family_frames, chunk, "0", "0"))
        configs.append((family, family_frames, "all", "1", "0"))
        configs.append((family, family_frames, chunks[-1], "1", "0"))
        if family == "modelscope":  # diffusers' AutoencoderKLWan has no gradient checkpointing
            configs.append((family, family_frames, chunks[-1], "1", "1"))
    for family, family_frames, chunk, grad, checkpointing in configs:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", _DECODE_CHILD, str(folders[family]), family, str(family_frames), str(batch), str(size),
             chunk, grad, checkpointing],
            capture_output=True, text=True, env=env, check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"family": family, "frames": family_frames, "chunk": chunk, "grad": grad == "1",
                     "vae_checkpointing": checkpointing == "1", **result})
        print(f"  measured: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def machine() -> str:
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, python {platform.python_version()}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-size", type=int, default=256)
    parser.add_argument("--decode-frames", type=int, default=16)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-sampling", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from visalign.models.tiny import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        families = ("sd", "sd3", "modelscope", "animatediff", "wan")
        folders = {family: save_tiny_model(family, Path(tmp) / family) for family in families}
        print(f"Machine: {machine()}\n")
        rows = [] if args.skip_sampling else per_frame_cost(
            folders, [("modelscope", "sd"), ("animatediff", "sd"), ("wan", "sd3")], args.frames, args.batch, args.steps, args.repeats)
        print(f"### Per-frame sampling cost ({args.steps} DDIM/Euler steps, CFG, 32x32, batch {args.batch} clips vs "
              f"batch x frames images; medians of {args.repeats})\n")
        print("| video (params) | image (params) | frames | video ms/frame (CPU) | image ms/frame (CPU) | ratio wall | ratio CPU |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['video']} ({r['video_params'] / 1e6:.2f} M) | {r['image']} ({r['image_params'] / 1e6:.2f} M) | "
                  f"{r['frames']} | {r['video_ms_per_frame']:.1f} ({r['video_cpu_ms_per_frame']:.1f}) | "
                  f"{r['image_ms_per_frame']:.1f} ({r['image_cpu_ms_per_frame']:.1f}) | "
                  f"{r['video_ms_per_frame'] / r['image_ms_per_frame']:.2f} | "
                  f"{r['video_cpu_ms_per_frame'] / r['image_cpu_ms_per_frame']:.2f} |")
        if not args.skip_decode:
            rows = decode_memory(folders, args.decode_frames, args.batch, args.decode_size)
            print(f"\n### VAE decode peak memory above the pre-decode level ({args.batch} clips, "
                  f"{args.decode_size}x{args.decode_size} frames; fresh process each)\n")
            print("| family | frames/clip | frames per VAE call | gradient | VAE checkpointing | extra peak MiB |")
            print("| --- | --- | --- | --- | --- | --- |")
            for r in rows:
                chunk = "all" if r["chunk"] == "all" else (r["chunk"] if r["family"] == "modelscope" else f"{r['chunk']} (1 clip)")
                print(f"| {r['family']} | {r['frames']} | {chunk} | {'yes' if r['grad'] else 'no'} | "
                      f"{'yes' if r['vae_checkpointing'] else 'no'} | {r['extra_peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
