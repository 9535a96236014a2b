"""``visalign sample``: generate images (PNGs) or clips (MP4/GIF) from any supported model, and a grid
(for clips, a frame grid: one row per clip)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines.sample import SteeringConfig

from .config import SINGLE_FILE_CONFIG_HELP, ConfigError, configclass, field


@configclass
class SampleConfig:
    model: str = field(help="diffusers folder, hub repo id, or single .safetensors file")
    single_file_config: str | None = field(None, help=SINGLE_FILE_CONFIG_HELP)
    prompts: list[str] = field(default_factory=list, help="prompts (prompts='a red circle' or '[a, b]')")
    prompt_file: str | None = field(None, help="text file with one prompt per line (added to prompts)")
    family: str | None = field(None, help="sd, sdxl, sd3, modelscope, animatediff or wan; detected when omitted")
    motion_adapter: str | None = field(None, help="an AnimateDiff motion adapter (folder or hub id) on top of an SD model")
    lora: str | None = field(None, help="LoRA weights (diffusers format) to load on top of the model")
    num_images_per_prompt: int = field(4, help="images per prompt (one grid row each)")
    steps: int = field(20, help="sampling steps")
    guidance_scale: float = field(5.0, help="classifier-free guidance; <= 1 disables it")
    eta: float = field(0.0, help="stochasticity: DDIM eta (diffusion) or SDE noise level (flow)")
    negative_prompt: str = field("", help="negative prompt for guidance")
    height: int | None = field(None, help="image height (default: the model's resolution)")
    width: int | None = field(None, help="image width (default: the model's resolution)")
    seed: int = field(0, help="random seed; the same seed gives the same images")
    batch_size: int = field(8, help="images per denoiser batch")
    dtype: str = field("auto", help="auto (fp16 on CUDA, fp32 on CPU), float32, float16 or bfloat16")
    device: str = field("auto", help="auto, cpu, cuda, cuda:1, ...")
    out: str = field("samples", help="output folder: PNGs, grid.png, samples.jsonl")
    steer: str | None = field(None, help="steer with a reward: fk, best-of-n or guidance (docs/steering.md)")
    reward: str | None = field(None, help="reward for steer: a registered name (visalign reward list) or a saved reward folder")
    particles: int = field(4, help="steer=fk: particles per image; steer=best-of-n: candidates per image")
    steering: SteeringConfig = field(default_factory=SteeringConfig, help="steering options (steering.lmbda=10, ...)")
    num_frames: int | None = field(None, help="video models: frames per clip (default: the model's)")
    video_format: str = field("mp4", help="video models: mp4, gif or both (mp4 needs visalign[video])")
    fps: int = field(8, help="video models: frames per second of the written clips")
    user: str | None = field(None, help="a user embedding file (visalign.personal.save_user): images for that user's taste")
    route: str = field("steer", help="with user: steer (FK steering with the personal reward) or ppd (needs ppd=)")
    ppd: str | None = field(None, help="with user: a PPD user branch (safetensors) for route=ppd")
    strength: float = field(1.0, help="with user: 0 = the base model, 1 = fully personal")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    from .models import parse_dtype

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def read_prompts(config: SampleConfig) -> list[str]:
    prompts = list(config.prompts)
    if config.prompt_file:
        path = Path(config.prompt_file)
        if not path.is_file():
            raise ConfigError(f"prompt_file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompts: give prompts='a red circle' or prompt_file=PATH")
    return prompts


def run_sample(config: SampleConfig) -> dict:
    """Generate ``num_images_per_prompt`` images for each prompt; returns a summary dict."""
    from tqdm.auto import tqdm

    from .images import save_sample, save_sample_grid, slugify
    from .models import load_generator

    prompts = read_prompts(config)
    if config.steer is not None:
        from pipelines.sample import check_steer_config

        check_steer_config(config)
    device = resolve_device(config.device)
    generator = load_generator(config.model, family=config.family, torch_dtype=resolve_dtype(config.dtype, device), device=device,
                               motion_adapter=config.motion_adapter, config=config.single_file_config)
    if config.lora:
        generator.load_lora(config.lora)
    if generator.is_video:
        generator.set_video_size(num_frames=config.num_frames)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.user is not None:
        from .personal import run_personal_sample

        return run_personal_sample(config, generator, prompts, out, device)
    if config.steer is not None:
        from pipelines.sample import run_steered

        return run_steered(config, generator, prompts, out, device)
    jobs = [(p_index, prompt, i) for p_index, prompt in enumerate(prompts) for i in range(config.num_images_per_prompt)]
    rng = torch.Generator(device=device).manual_seed(config.seed)
    images, records = [], []
    for start in tqdm(range(0, len(jobs), config.batch_size), desc="sampling", unit="batch"):
        batch = jobs[start : start + config.batch_size]
        with torch.no_grad():
            result = generator.sample(
                [prompt for _, prompt, _ in batch],
                num_inference_steps=config.steps,
                guidance_scale=config.guidance_scale,
                eta=config.eta,
                negative_prompt=config.negative_prompt,
                height=config.height,
                width=config.width,
                generator=rng,
            )
        for (p_index, prompt, i), image in zip(batch, result.images):
            path = save_sample(image, out / f"{p_index:03d}-{slugify(prompt)}-{i}", config.video_format, config.fps)
            records.append({"file": path.name, "prompt": prompt, "index": i})
            images.append(image.cpu())
    grid = save_sample_grid(torch.stack(images), prompts, out / "grid.png", per_row=config.num_images_per_prompt)
    with open(out / "samples.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return {"images": len(records), "grid": str(grid), "out": str(out), "family": generator.family}
