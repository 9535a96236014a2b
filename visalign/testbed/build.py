"""``visalign testbed build``: train the testbed's base models from scratch, on the project's
own trainer, and write them to ``assets/testbed/``.

Phases (each a run of :class:`visalign.training.Trainer`):

1. Render a captioned training set from the train prompt split, with deliberately imperfect
   captions: a share ``caption_noise`` of the images is wrong in one attribute for its
   caption (wrong colour, count, shape, position, swapped colours; the renderer's
   ``mismatched_scene``), so the base models follow prompts only partly.
2. Train a VAE (``autoencoder`` objective) on those images; set its ``scaling_factor`` to
   ``1 / std`` of the latents, as SD does.
3. Pretrain each family's denoiser from scratch with ``sft`` (full fine-tuning, prompt
   dropout for classifier-free guidance, EMA), with the trained VAE and a frozen
   random-init CLIP text encoder (real CLIP BPE tokenizer).
4. Save each model as a diffusers folder in fp16 (``from_pretrained`` reads it back in any
   dtype), measure held-out oracle accuracy, and write ``build.json``.
5. Build the learned rewards on the ``reward_family`` model (:mod:`.reward_build`).

``init_from`` continues a previous build instead (more denoiser steps on the same rendered data,
a fresh cosine schedule, the previous VAE kept); ``build.json`` in ``out`` is then updated, not
replaced: the families trained now get new figures, the others and the rewards keep theirs, and
``builds`` lists every run that made the shipped models.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..config import configclass, field, load_config

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "testbed"


@configclass
class BuildConfig:
    out: str = field(str(ASSETS), help="where the models and build.json go")
    work_dir: str = field("runs/testbed-build", help="rendered data, training runs (not shipped)")
    families: list[str] = field(default_factory=lambda: ["sd", "sd3"], help="families to pretrain")
    size: str = field("testbed", help="network size of a from-scratch build: testbed (the shipped models) or "
                                      "testbed-wide (4x wider denoisers, 64-wide text encoders on a compact "
                                      "CLIP vocabulary; visalign.models.tiny); init_from keeps the previous size")
    quick: bool = field(False, help="a few steps of everything (tests, smoke runs)")
    seed: int = field(0, help="seed of data, initialisation and training")
    num_images: int = field(8000, help="rendered training images")
    caption_noise: float = field(0.3, help="share of images that are wrong for their caption")
    vae_steps: int = field(1000, help="VAE training steps")
    vae_batch_size: int = field(32, help="VAE batch size")
    vae_lr: float = field(2e-3, help="VAE peak learning rate (cosine schedule)")
    denoiser_steps: int = field(3000, help="denoiser pretraining steps per family")
    denoiser_minutes: float | None = field(None, help="instead of denoiser_steps: train each family for about this "
                                                      "many minutes on this machine (a short probe run measures the "
                                                      "step rate; the steps chosen are recorded in build.json)")
    num_workers: int = field(0, help="DataLoader worker processes of the training runs (a GPU wants several)")
    train_text_encoder: bool = field(True, help="pretrain the (randomly initialised) text encoders with the "
                                                "denoiser; frozen random ones condition too weakly")
    batch_size: int = field(32, help="denoiser batch size")
    lr: float = field(1e-3, help="denoiser peak learning rate (cosine schedule)")
    sd_prediction: str = field("epsilon", help="SD family's training target: epsilon (the shipped model) or "
                                               "v_prediction (switches a continued model to it; epsilon "
                                               "keeps a continued model's own target)")
    zero_terminal_snr: bool = field(False, help="SD family: rescale the noise schedule to zero terminal SNR and "
                                                "sample with trailing timesteps (Lin et al. 2024), so the first "
                                                "sampling step sees pure noise as in training; needs v_prediction")
    eval_images_per_prompt: int = field(2, help="held-out evaluation: images per prompt")
    eval_prompts: int | None = field(None, help="held-out evaluation: first N prompts (default: all)")
    eval_steps: int = field(20, help="held-out evaluation: sampling steps")
    guidance_scale: float = field(4.0, help="held-out evaluation: CFG scale")
    reward_family: str | None = field("sd", help="family whose samples train the learned reward (null: no reward)")
    rewards: list[str] = field(default_factory=lambda: ["hpsv2", "clip"],
                               help="learned rewards to build (visalign.testbed.reward_build kinds)")
    reward_steps: int | None = field(None, help="learned rewards: training steps (default: RewardBuildOptions)")
    video_model: bool = field(False, help="also train the video testbed's base model: a motion adapter for the built sd "
                                          "model (visalign.testbed.video_model; about an hour on a 2-core CPU)")
    video_steps: int = field(800, help="video model: motion adapter training steps")
    vae_from: str | None = field(None, help="reuse a trained VAE instead of training one (a model folder with vae/, "
                                            "e.g. assets/testbed/sd, or a VAE folder): from-scratch denoisers on the "
                                            "shipped models' latent space; the VAE phase is skipped")
    init_from: str | None = field(None, help="continue pretraining from a previous build (a folder holding <family>/ "
                                             "model folders, e.g. assets/testbed) instead of from scratch; its VAE is "
                                             "reused and the VAE phase skipped")


def quick_overrides(config: BuildConfig) -> BuildConfig:
    config.num_images, config.vae_steps, config.denoiser_steps = 96, 4, 4
    config.vae_batch_size = config.batch_size = 16
    config.eval_images_per_prompt, config.eval_steps, config.eval_prompts = 1, 2, 12
    return config


# ------------------------------------------------------------------------------ data


def render_dataset(directory: Path, num_images: int, caption_noise: float, seed: int) -> Path:
    """Render ``num_images`` scenes of train prompts into ``directory``; returns the captions jsonl.

    A share ``caption_noise`` of the scenes is wrong in one attribute for its caption.
    """
    from PIL import Image

    from .prompts import load_prompts
    from .render import mismatched_scene, render_batch, scene_for_prompt

    directory.mkdir(parents=True, exist_ok=True)
    captions = directory / "captions.jsonl"
    if captions.exists() and sum(1 for _ in open(captions)) == num_images:
        return captions
    rng = np.random.default_rng(seed)
    prompts = [record.prompt for record in load_prompts("train")]
    chosen = [prompts[i] for i in rng.integers(len(prompts), size=num_images)]
    wrong = rng.random(num_images) < caption_noise
    rows = []
    for start in range(0, num_images, 256):
        batch = range(start, min(start + 256, num_images))
        scenes = [(mismatched_scene if wrong[i] else scene_for_prompt)(chosen[i], rng) for i in batch]
        pixels = (render_batch(scenes).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
        for i, array in zip(batch, pixels):
            name = f"{i:06d}.png"
            Image.fromarray(array).save(directory / name)
            rows.append({"image": name, "caption": chosen[i], "caption_matches": not bool(wrong[i])})
    temporary = captions.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
    temporary.replace(captions)
    return captions


# ------------------------------------------------------------------------------ training


def _train(model_path: Path, objective: str, data: Path, out: Path, steps: int, batch_size: int, lr: float,
           seed: int, options: dict, extra: list[str] = (), random_flip: bool = False, num_workers: int = 0) -> Path:
    from ..training import TrainConfig, train

    config = load_config(TrainConfig, data={
        "model": {"path": str(model_path), "finetune": "full"},
        "objective": objective,
        "options": options,
        # The rendered set is small (16,000 32x32 images: 47 MB decoded): decode it once, not every epoch.
        "data": {"format": "captions", "path": str(data), "random_flip": random_flip, "num_workers": num_workers,
                 "in_memory": True},
        "optim": {"lr": lr, "lr_scheduler": "cosine", "warmup_steps": min(100, steps // 10), "weight_decay": 0.0},
        "batch_size": batch_size,
        "max_steps": steps,
        "seed": seed,
        "output_dir": str(out),
        "checkpoint_every": 500,
        "checkpoints_total_limit": 1,
        "resume": "latest",
        "log_every": 50,
    }, overrides=list(extra))
    result = train(config)
    return result.final_weights


def train_vae(config: BuildConfig, data: Path, work: Path) -> Path:
    """Train the shared VAE; returns the folder of a model whose ``vae/`` is the trained one."""
    from ..models import load_generator
    from ..models.tiny import save_tiny_model
    from ..algorithms.autoencoder import latent_scaling_factor

    initial = save_tiny_model("sd", work / "vae-init", seed=config.seed, size="testbed")
    trained = _train(initial, "autoencoder", data, work / "vae-run", config.vae_steps, config.vae_batch_size, config.vae_lr,
                     config.seed, {"kl_weight": 1e-6}, ["ema.enabled=false"], random_flip=True,
                     num_workers=config.num_workers)
    generator = load_generator(trained)
    images = _load_images(data, 512)
    scale = latent_scaling_factor(generator, images)
    generator.vae.register_to_config(scaling_factor=scale)
    generator.vae.save_pretrained(trained / "vae")
    logger.info("VAE trained; latent scaling factor %.4f", scale)
    return trained / "vae"


def reused_vae(path: str) -> Path:
    """The VAE folder ``vae_from`` names: ``path/vae`` of a model folder, or ``path`` itself."""
    folder = Path(path)
    for candidate in (folder / "vae", folder):
        config = candidate / "config.json"
        if config.exists() and json.loads(config.read_text()).get("_class_name") == "AutoencoderKL":
            return candidate
    raise FileNotFoundError(f"vae_from: no AutoencoderKL folder at {folder} or {folder / 'vae'} "
                            f"(expected a config.json with _class_name AutoencoderKL)")


def _load_images(captions: Path, count: int) -> torch.Tensor:
    from PIL import Image

    rows = [json.loads(line) for line in open(captions)][:count]
    arrays = [np.array(Image.open(captions.parent / row["image"]).convert("RGB")) for row in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def pretrain(config: BuildConfig, family: str, vae_dir: Path, data: Path, work: Path) -> tuple[Path, dict]:
    """Pretrain ``family`` from scratch with the trained VAE; returns the trained model folder and
    the run's size (:func:`_sft`)."""
    from diffusers import AutoencoderKL

    from ..models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(family, seed=config.seed, tokenizer_dir=work / f"{family}-tokenizer", size=config.size)
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)  # a shipped VAE is fp16
    if family == "sd3":
        vae.register_to_config(shift_factor=0.0)  # SD3 pipelines read it; SD ones ignore it
    pipe.vae = vae
    pipe.register_modules(vae=vae)
    _set_sd_schedule(pipe, family, config)
    initial = work / f"{family}-init"
    pipe.save_pretrained(initial, safe_serialization=True)
    return _sft(config, initial, data, work / f"{family}-run")


SD_PREDICTIONS = ("epsilon", "v_prediction")


def sd_schedule(config: BuildConfig) -> dict:
    """The scheduler-config changes ``config`` asks of the SD family (empty: keep the schedule)."""
    if config.sd_prediction not in SD_PREDICTIONS:
        raise ValueError(f"sd_prediction must be one of {SD_PREDICTIONS}, got {config.sd_prediction!r}")
    if config.zero_terminal_snr and config.sd_prediction != "v_prediction":
        # At zero terminal SNR the last timestep's x_t holds no signal: an epsilon model cannot recover x0 from it.
        raise ValueError("zero_terminal_snr=true needs sd_prediction=v_prediction (epsilon cannot predict x0 "
                         "from pure noise)")
    changes = {} if config.sd_prediction == "epsilon" else {"prediction_type": config.sd_prediction}
    if config.zero_terminal_snr:
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return changes


def _set_sd_schedule(pipe, family: str, config: BuildConfig) -> None:
    changes = sd_schedule(config)
    if family != "sd" or not changes:
        return
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **changes)
    pipe.scheduler = scheduler
    pipe.register_modules(scheduler=scheduler)


PROBE_STEPS = (10, 40)  # the rate is measured between these two steps of a probe run


def _sft(config: BuildConfig, initial: Path, data: Path, out: Path) -> tuple[Path, dict]:
    """Pretrain ``initial`` with ``sft``; returns the trained folder and ``{"denoiser_steps": N}``
    (with the probe's ``steps_per_second`` when ``config.denoiser_minutes`` sized the run)."""
    steps, sizing = config.denoiser_steps, {}
    if config.denoiser_minutes is not None:
        if config.denoiser_minutes <= 0:
            raise ValueError(f"denoiser_minutes must be positive, got {config.denoiser_minutes}")
        rate = _probe_rate(config, initial, data, out.with_name(out.name + "-probe"))
        steps = max(PROBE_STEPS[1], int(rate * config.denoiser_minutes * 60))
        sizing["steps_per_second"] = round(rate, 3)
        logger.info("probe: %.2f steps/s; training %d steps (~%.1f min)", rate, steps, config.denoiser_minutes)
    sizing["denoiser_steps"] = steps
    return _sft_run(config, initial, data, out, steps), sizing


def _sft_run(config: BuildConfig, initial: Path, data: Path, out: Path, steps: int, log_every: int = 50) -> Path:
    # No flips: a mirrored image turns "left of" into "right of" and would corrupt position captions.
    return _train(initial, "sft", data, out, steps, config.batch_size, config.lr, config.seed,
                  {"prompt_dropout": 0.1},
                  ["ema.enabled=true", "ema.decay=0.999", f"model.train_text_encoder={str(config.train_text_encoder).lower()}",
                   f"log_every={log_every}"],
                  random_flip=False, num_workers=config.num_workers)


def _probe_rate(config: BuildConfig, initial: Path, data: Path, out: Path) -> float:
    """Steps per second of this build's ``sft`` run on this machine: a short run of the same
    configuration, timed between two logged steps (so loading and the first, slower steps do
    not count). The probe's weights are discarded."""
    first, last = PROBE_STEPS
    if out.exists():
        shutil.rmtree(out)
    _sft_run(config, initial, data, out, last, log_every=first)
    records = [json.loads(line) for line in open(out / "logs" / "metrics.jsonl")]
    rates = {record["step"]: record["steps_per_second"] for record in records if "steps_per_second" in record}
    if first not in rates or last not in rates:
        raise RuntimeError(f"probe run {out} logged no step rate at steps {first} and {last}")
    elapsed = last / rates[last] - first / rates[first]
    shutil.rmtree(out)
    return (last - first) / elapsed


def continue_from(config: BuildConfig, family: str, previous: Path, data: Path, work: Path) -> tuple[Path, dict]:
    """Continue pretraining ``previous`` (a shipped, possibly fp16, model folder) for
    ``config.denoiser_steps`` more steps (or ``denoiser_minutes``); returns the trained model
    folder and the run's size."""
    from ..models import load_generator

    initial = work / f"{family}-continue-init"
    pipe = load_generator(previous, torch_dtype=torch.float32).pipe
    _set_sd_schedule(pipe, family, config)
    pipe.save_pretrained(initial, safe_serialization=True)
    return _sft(config, initial, data, work / f"{family}-continue-run")


def ship(trained: Path, destination: Path) -> Path:
    """Copy a trained model to ``destination`` with fp16 weights (loads in any dtype).

    The tokenizer is saved as transformers writes it (``tokenizer.json``; transformers 5 writes
    no ``vocab.json``/``merges.txt``), so it must not be pruned: a CLIPTokenizer folder without
    its vocabulary loads silently and maps every word to the same id.
    """
    from ..models import load_generator

    generator = load_generator(trained, torch_dtype=torch.float16)
    if destination.exists():
        shutil.rmtree(destination)
    generator.pipe.save_pretrained(destination, safe_serialization=True)
    return destination


def build(config: BuildConfig) -> dict:
    """Run every phase; returns the summary written to ``build.json``."""
    if config.quick:
        config = quick_overrides(config)
    start = time.perf_counter()
    out, work = Path(config.out), Path(config.work_dir)
    previous = Path(config.init_from) if config.init_from else None
    from ..models.tiny import SIZES

    if config.size not in SIZES[1:]:
        raise ValueError(f"size must be one of {SIZES[1:]}, got {config.size!r}")
    schedule = sd_schedule(config)  # refuses a bad schedule before any work
    if previous is not None and config.size != "testbed":
        logger.warning("size=%s is ignored: a build continued from init_from keeps its models' size", config.size)
    for family in config.families if previous is not None else ():
        if not (previous / family / "model_index.json").exists():
            raise FileNotFoundError(f"init_from: {previous / family} is not a diffusers model folder (no "
                                    f"model_index.json); init_from takes a folder holding one per family")
    vae_dir = reused_vae(config.vae_from) if config.vae_from and previous is None else None
    if config.vae_from and previous is not None:
        logger.warning("vae_from is ignored: a build continued from init_from keeps its models' VAE")
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    data = render_dataset(work / "data", config.num_images, config.caption_noise, config.seed)
    timings["render_s"] = time.perf_counter() - start
    if previous is None and vae_dir is None:
        mark = time.perf_counter()
        vae_dir = train_vae(config, data, work)
        timings["vae_s"] = time.perf_counter() - mark
    summary: dict = {"config": {k: v for k, v in vars(config).items()}, "models": {}}
    for family in config.families:
        mark = time.perf_counter()
        if previous is None:
            trained, sizing = pretrain(config, family, vae_dir, data, work)
        else:
            trained, sizing = continue_from(config, family, previous / family, data, work)
        timings[f"{family}_s"] = time.perf_counter() - mark
        shipped = ship(trained, out / family)
        mark = time.perf_counter()
        summary["models"][family] = evaluate_base(config, shipped)
        summary["models"][family]["built_with"] = {
            **sizing, "batch_size": config.batch_size, "lr": config.lr,
            "train_text_encoder": config.train_text_encoder, "init_from": config.init_from,
            **({"schedule": schedule} if family == "sd" and schedule else {})}
        timings[f"{family}_eval_s"] = time.perf_counter() - mark
    if config.video_model:
        mark = time.perf_counter()
        summary["video_model"] = build_video_model(config, out)
        timings["video_model_s"] = time.perf_counter() - mark
    if config.reward_family and config.rewards:
        mark = time.perf_counter()
        summary["rewards"] = build_rewards(config, out / config.reward_family, out, work)
        timings["reward_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - start
    summary["timings"] = timings
    summary["machine"] = _machine()
    out.mkdir(parents=True, exist_ok=True)
    record = out / "build.json"
    if previous is not None and record.exists():
        summary = _merge(json.loads(record.read_text()), summary)
    record.write_text(json.dumps(summary, indent=2))
    return summary


def build_video_model(config: BuildConfig, out: Path) -> dict:
    """Train the motion adapter of the video testbed's base model on the built (or shipped) sd
    model; returns its held-out figures (the full record is ``<out>/animatediff/video_model_build.json``)."""
    from dataclasses import replace

    from .video_model import VideoModelBuildOptions, build_testbed_video_model, quick_options

    if not (out / "sd" / "model_index.json").exists():
        raise FileNotFoundError(f"video_model: the video model is trained on the sd model, and {out / 'sd'} has none "
                                f"(add sd to families)")
    options = quick_options() if config.quick else VideoModelBuildOptions(steps=config.video_steps)
    options = replace(options, base=str(out / "sd"), seed=config.seed)
    record = build_testbed_video_model(out / "animatediff", options)
    return {"heldout": record["heldout"], "heldout_untrained": record["heldout_untrained"],
            "steps": options.steps, "record": "animatediff/video_model_build.json"}


def _merge(existing: dict, run: dict) -> dict:
    """``build.json`` after a continuation run: its families' figures replace the old ones, and the
    run is appended to ``builds`` (the runs that, in order, made the shipped models)."""
    merged = dict(existing)
    merged["models"] = {**existing.get("models", {}), **run["models"]}
    for key in ("rewards", "video_model"):
        if key in run:
            merged[key] = run[key]
    builds = list(existing.get("builds", [{key: existing[key] for key in ("config", "timings_s", "machine")
                                           if key in existing}]))
    builds.append({key: run[key] for key in ("config", "timings", "machine")})
    merged["builds"] = builds
    merged.pop("timings_s", None)  # the first run's timings, now in builds[0]
    merged.update(config=run["config"], timings=run["timings"], machine=run["machine"])  # the latest run
    return merged


def evaluate_base(config: BuildConfig, model: Path) -> dict:
    from ..eval import evaluate
    from ..models import load_generator
    from .prompts import load_prompts

    generator = load_generator(model, device="cuda" if torch.cuda.is_available() else None)  # fp32 either way
    prompts = [record.prompt for record in load_prompts("heldout")][: config.eval_prompts]
    report = evaluate(generator, prompts, images_per_prompt=config.eval_images_per_prompt,
                      num_inference_steps=config.eval_steps, guidance_scale=config.guidance_scale, seed=config.seed)
    return {"heldout_accuracy": report.accuracy, "heldout_geneval_score": report.geneval_score,
            "per_category": report.per_category, "recall": report.recall, "quality": report.quality,
            "eval_images_per_prompt": config.eval_images_per_prompt}


def build_rewards(config: BuildConfig, model: Path, out: Path, work: Path) -> dict:
    """The learned rewards (:mod:`visalign.testbed.reward_build`): for each kind in
    ``config.rewards``, a scorer trained on rendered train-prompt scenes (and, for ``hpsv2``,
    oracle-read samples of ``model``), shipped to ``out/reward`` (``hpsv2``) or ``out/clip``."""
    from dataclasses import replace

    from .reward_build import RewardBuildOptions, build_testbed_reward, quick_options

    figures = {}
    for kind in config.rewards:
        options = replace(quick_options() if config.quick else RewardBuildOptions(), kind=kind)
        if config.reward_steps is not None:
            options = replace(options, steps=config.reward_steps)
        destination = out / ("reward" if kind == "hpsv2" else kind)
        summary = build_testbed_reward(model, destination, work / "reward-samples", seed=config.seed, options=options)
        figures[kind] = {key: summary[key] for key in ("heldout_rendered", "train_rendered", "heldout_samples", "timings")
                         if key in summary}
    return figures


def _machine() -> dict:
    import os
    import platform

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
