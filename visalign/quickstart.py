"""``visalign quickstart``: the main job on the embedded testbed.

Aligns the shipped testbed model with RAFT (best-of-n reward-ranked fine-tuning, LoRA) for a
few dozen steps against a reward, then evaluates base and tuned models on held-out prompts
with the exact oracle and writes ``report.md`` with grids and a per-category plot.
"""

from __future__ import annotations

from pathlib import Path

from .config import configclass, field, load_config
from .testbed.build import ASSETS


def _default_reward() -> str:
    return "testbed-reward" if (ASSETS / "reward" / "reward.json").exists() else "testbed-oracle"


def _watch_rewards(optimised: str) -> dict:
    """The optimised reward and every other shipped testbed reward, by name (the report shows
    each one's gain, so a gain on the optimised reward alone is visible as reward hacking)."""
    import rewards

    names = [optimised] + [name for name, folder in (("testbed-reward", "reward"), ("testbed-clip", "clip"))
                           if name != optimised and (ASSETS / folder / "reward.json").exists()]
    return {Path(name).name: rewards.load(name) for name in names}


@configclass
class QuickstartConfig:
    model: str = field(str(ASSETS / "sd"), help="the model to align")
    reward: str = field(default_factory=_default_reward, help="reward to optimise (default: the shipped learned reward if any, else the testbed oracle)")
    min_reward: float | str | None = field(
        "auto", help="keep a prompt's best sample only if its reward is at least this; null keeps every "
        "prompt's best; auto: 0.5 with the testbed oracle (its correct images), null with other rewards")
    steps: int = field(60, help="optimisation steps")
    lr: float = field(5e-4, help="LoRA learning rate")
    lora_rank: int = field(8, help="LoRA rank")
    eval_prompts: int = field(32, help="held-out prompts evaluated")
    images_per_prompt: int = field(2, help="images per held-out prompt")
    seed: int = field(0, help="seed")
    out: str = field("runs/quickstart", help="output folder")


def run_quickstart(config: QuickstartConfig) -> Path:
    from .eval import evaluate, write_report
    from .models import load_generator
    from .testbed.prompts import load_prompts
    from .training import TrainConfig, train

    out = Path(config.out)
    min_reward = config.min_reward
    if isinstance(min_reward, str):
        if min_reward != "auto":
            raise ValueError(f"min_reward must be a number, null or 'auto', got {min_reward!r}")
        min_reward = 0.5 if config.reward == "testbed-oracle" else None
    train_config = load_config(TrainConfig, data={
        "model": {"path": config.model, "lora": {"rank": config.lora_rank}},
        "objective": "raft",
        "options": {"reward": config.reward, "prompts": "testbed:train", "prompts_per_refresh": 16,
                    "num_candidates": 4, "refresh_every": 10, "min_reward": min_reward},
        "optim": {"lr": config.lr},
        "batch_size": 16,
        "max_steps": config.steps,
        "seed": config.seed,
        "output_dir": str(out / "train"),
        "checkpoint_every": 0,
        "log_every": 10,
    })
    result = train(train_config)
    prompts = [record.prompt for record in load_prompts("heldout")][: config.eval_prompts]
    kwargs = dict(images_per_prompt=config.images_per_prompt, num_inference_steps=20, guidance_scale=4.0, seed=config.seed)
    reward = _watch_rewards(config.reward)
    base = load_generator(config.model)
    tuned = load_generator(config.model)
    tuned.load_lora(result.final_weights)
    reports = {"base": evaluate(base, prompts, rewards=reward, **kwargs),
               "raft": evaluate(tuned, prompts, rewards=reward, base=base, **kwargs)}
    return write_report(reports, out, config.images_per_prompt)
