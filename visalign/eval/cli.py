"""``visalign eval``: held-out testbed evaluation of a model (with an optional LoRA) and a report."""

from __future__ import annotations

from pathlib import Path

from ..config import SINGLE_FILE_CONFIG_HELP, ConfigError, configclass, field
from ..testbed.build import ASSETS


@configclass
class EvalConfig:
    model: str = field(str(ASSETS / "sd"), help="diffusers folder or single .safetensors file (default: the testbed's SD base model)")
    single_file_config: str | None = field(None, help=SINGLE_FILE_CONFIG_HELP)
    lora: str | None = field(None, help="LoRA weights to evaluate on top of the model (the model alone is the base)")
    compare_base: bool = field(True, help="with lora: also evaluate the base model and report drift")
    rewards: list[str] = field(default_factory=list, help="learned rewards to report: registry names or saved reward folders")
    split: str = field("heldout", help="prompt split: heldout or train")
    max_prompts: int | None = field(None, help="evaluate on the first N prompts only")
    images_per_prompt: int = field(4, help="images per prompt (seeds 0..N-1)")
    steps: int = field(20, help="sampling steps")
    guidance_scale: float = field(4.0, help="classifier-free guidance")
    seed: int = field(0, help="seed of the initial noise")
    device: str = field("auto", help="auto, cpu or cuda")
    out: str = field("runs/eval", help="report folder: report.md, report.json, grids, plot")


def run_eval(config: EvalConfig) -> Path:
    import rewards as reward_library

    from ..models import load_generator
    from ..sample import resolve_device
    from ..testbed.prompts import load_prompts
    from . import evaluate, write_report

    device = resolve_device(config.device)
    prompts = [record.prompt for record in load_prompts(config.split)]
    if config.max_prompts:
        prompts = prompts[: config.max_prompts]
    if not prompts:
        raise ConfigError(f"no prompts in split {config.split!r}")
    loaded_rewards = {}
    for name in config.rewards:
        loaded_rewards[Path(name).name] = reward_library.load(name).to(device)
    generator = load_generator(config.model, device=device, config=config.single_file_config)
    kwargs = dict(images_per_prompt=config.images_per_prompt, num_inference_steps=config.steps,
                  guidance_scale=config.guidance_scale, seed=config.seed, rewards=loaded_rewards)
    reports = {}
    base = None
    if config.lora:
        if config.compare_base:
            reports["base"] = evaluate(generator, prompts, **kwargs)
            base = load_generator(config.model, device=device, config=config.single_file_config)
        generator.load_lora(config.lora)
        reports["tuned"] = evaluate(generator, prompts, base=base, **kwargs)
    else:
        reports[Path(config.model).name or "model"] = evaluate(generator, prompts, **kwargs)
    return write_report(reports, config.out, config.images_per_prompt)
