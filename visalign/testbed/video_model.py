"""The video testbed's base video model: the testbed's SD model plus a trained AnimateDiff motion adapter.

AnimateDiff's recipe on the testbed: the image model (``assets/testbed/sd``) stays frozen and a
:class:`diffusers.MotionAdapter` (temporal transformers after every spatial block) learns motion
from rendered clips of the video testbed with the plain denoising loss
(:func:`visalign.algorithms.common.denoising_loss`, the ``sft`` objective's). The adapter's
temporal output projections start at zero, so before training the video model is the image model
run frame by frame (every frame sampled independently); training teaches it to keep one object
across frames and move it.

**Imperfect captions.** A fraction ``caption_noise`` of the training clips is captioned with a
prompt the clip does not show (:func:`~visalign.testbed.video.mismatched_clip` of the kinds that
are a caption's mistake: the other direction or axis, no motion, the other speed, another subject,
the reverse event; never a teleport or a colour change, which are defects of the clip). The
motion modules have no text input of their own (AnimateDiff's temporal attention is
self-attention over frames); what they know of the prompt reaches them through the frozen
spatial layers. So the base follows the subject (the image model's part) better than the
direction (the video part): the partial prompt following that video alignment is meant to raise.

**Noise schedule.** The adapter is trained, and runs, on AnimateDiff's schedule (SD's betas on a
``linear`` ramp), so ``load_generator(sd, motion_adapter=adapter)`` (which picks that schedule for
every motion adapter, as diffusers' AnimateDiff examples do) samples it as it was trained.

Build (about an hour on one core of a 2-core CPU; ``--quick`` is a smoke run)::

    python -m visalign.testbed.video_model --out assets/testbed/animatediff

The folder is a diffusers ``MotionAdapter`` (fp16 safetensors, under 1 MB) and its build record
``video_model_build.json`` (held-out video-oracle accuracy before and after training). Load it
with :func:`load_testbed_video_model` or ``visalign sample model=assets/testbed/sd
motion_adapter=<the folder> num_frames=8 ...``. No adapter is shipped yet: the first build does
not keep an object across frames (docs/video.md, "The base video model").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "testbed"
SHIPPED_VIDEO_MODEL = ASSETS / "animatediff"
BUILD_RECORD = "video_model_build.json"
# A caption's mistakes (see mismatched_clip); "jump" and "identity" are defects of a clip, not of its caption.
CAPTION_MISTAKES = ("direction", "axis", "static", "speed", "subject", "reverse")


@dataclass
class VideoModelBuildOptions:
    base: str = str(ASSETS / "sd")   # the image model the adapter is trained on (frozen)
    steps: int = 800                 # optimisation steps
    batch_size: int = 8              # clips per step
    lr: float = 1e-3                 # AdamW on the motion modules, warm-up then cosine
    warmup: int = 50
    weight_decay: float = 0.0
    num_frames: int = 8
    caption_noise: float = 0.3       # fraction of clips captioned with a prompt they do not show
    prompt_dropout: float = 0.1      # fraction trained with the empty prompt (classifier-free guidance)
    extra_objects: int = 0           # static distractors per training clip (up to)
    motion_heads: int = 2
    eval_clips_per_prompt: int = 1   # held-out evaluation: clips per held-out video prompt
    eval_prompts: int | None = None  # held-out evaluation: N prompts spread over the 84 (None: all)
    eval_steps: int = 10             # DDIM steps of the evaluation (20 costs twice the CPU time)
    guidance_scale: float = 4.0
    seed: int = 0


def quick_options() -> VideoModelBuildOptions:
    return VideoModelBuildOptions(steps=2, batch_size=2, warmup=1, eval_clips_per_prompt=1, eval_steps=2, eval_prompts=4)


def new_motion_adapter(unet_config: dict, heads: int = 2, max_frames: int = 32, seed: int | None = None):
    """A ``MotionAdapter`` that fits an SD UNet (``unet_config``), with every temporal
    transformer's output projection at zero: joined with the UNet, it leaves each frame's
    prediction that of the image model (AnimateDiff's zero initialisation)."""
    from diffusers import MotionAdapter

    if seed is not None:
        torch.manual_seed(seed)
    adapter = MotionAdapter(
        block_out_channels=tuple(unet_config["block_out_channels"]),
        motion_layers_per_block=unet_config["layers_per_block"],
        motion_num_attention_heads=heads,
        motion_norm_num_groups=unet_config["norm_num_groups"],
        motion_max_seq_length=max_frames,
        use_motion_mid_block=True,
    )
    with torch.no_grad():
        for name, module in adapter.named_modules():
            if name.endswith("proj_out"):
                module.weight.zero_()
                module.bias.zero_()
    return adapter


def training_clips(prompts: Sequence[str], count: int, rng: np.random.Generator, caption_noise: float,
                   num_frames: int = 8, extra_objects: int = 0, size: int = 32) -> tuple[torch.Tensor, list[str], int]:
    """``count`` rendered clips ``[count, F, 3, size, size]`` in [0, 1] with their captions; a
    fraction ``caption_noise`` of them shows something else than its caption (one of the caption
    mistakes its category allows). Returns the clips, the captions and how many are mis-captioned."""
    from .video import clip_for_prompt, mismatch_kinds, mismatched_clip, parse_video_prompt, render_clips

    captions = [prompts[i] for i in rng.integers(len(prompts), size=count)]
    clips, wrong = [], 0
    for caption in captions:
        extra = int(rng.integers(extra_objects + 1))
        if rng.random() < caption_noise:
            kinds = [kind for kind in mismatch_kinds(parse_video_prompt(caption).category) if kind in CAPTION_MISTAKES]
            clips.append(mismatched_clip(caption, rng, kind=str(rng.choice(kinds)), num_frames=num_frames,
                                         extra_objects=extra))
            wrong += 1
        else:
            clips.append(clip_for_prompt(caption, rng, num_frames=num_frames, extra_objects=extra))
    return render_clips(clips, size=size), captions, wrong


def train_motion_adapter(generator, options: VideoModelBuildOptions, progress: bool = True) -> list[dict]:
    """Train the motion modules of an ``animatediff`` generator on rendered clips of the video
    testbed's train prompts (everything else frozen). Returns the per-step log."""
    from ..algorithms.common import denoising_loss
    from .video import video_prompts

    unet = generator.denoiser
    if not hasattr(generator, "enable_motion_module_training"):
        raise ValueError("the generator's denoiser has no motion modules to train (not an animatediff generator?)")
    params = generator.enable_motion_module_training(snapshot_reference=False)  # the loss needs no reference
    for module in (generator.vae, generator.pipe.text_encoder):
        module.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)

    def schedule(step: int) -> float:
        if step < options.warmup:
            return (step + 1) / options.warmup
        progress_ = (step - options.warmup) / max(1, options.steps - options.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress_))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    prompts = [spec.text for spec in video_prompts("train")]
    scenes = np.random.default_rng(options.seed)
    noise = torch.Generator().manual_seed(options.seed)
    size = generator.default_height
    unet.train()
    history = []
    bar = tqdm(range(options.steps), desc="train motion adapter", disable=not progress)
    for step in bar:
        videos, captions, wrong = training_clips(prompts, options.batch_size, scenes, options.caption_noise,
                                                 options.num_frames, options.extra_objects, size)
        captions = ["" if scenes.random() < options.prompt_dropout else caption for caption in captions]
        with torch.no_grad():
            latents = generator.encode(videos.to(generator.device), generator=noise)
            cond = generator.encode_prompt(captions)
        loss = denoising_loss(generator, latents, cond, noise).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the motion adapter's loss is {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step, "loss": loss.item(), "miscaptioned": wrong})
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    unet.requires_grad_(False)
    return history


@torch.no_grad()
def evaluate_video_model(generator, prompts: Sequence[str], clips_per_prompt: int = 1, num_inference_steps: int = 20,
                         guidance_scale: float = 4.0, seed: int = 0, batch_size: int = 16, progress: bool = True) -> dict:
    """Sample ``clips_per_prompt`` clips per prompt (:func:`visalign.eval.evaluate.sample_for_eval`:
    the same initial noise for every model) and score them with the video oracle: accuracy, per category,
    the share of moving-object clips that show one object matching the prompt in every frame
    (``subject_in_every_frame``), smoothness and quality."""
    from ..eval.evaluate import sample_for_eval
    from .video import video_oracle

    expanded = [prompt for prompt in prompts for _ in range(clips_per_prompt)]
    results = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="evaluate", disable=not progress):
        chunk = list(prompts[start:start + batch_size])
        videos = sample_for_eval(generator, chunk, clips_per_prompt, num_inference_steps, guidance_scale, seed,
                                 batch_size=batch_size * clips_per_prompt)
        results.append(video_oracle(videos, [prompt for prompt in chunk for _ in range(clips_per_prompt)]))
    correct = torch.cat([result.correct for result in results])
    # Of the moving-object clips: one object matching the prompt's phrase in every frame (kept across frames).
    tracked = torch.tensor([all(len(frame) == 1 for frame in track) for result in results
                            for track, category in zip(result.tracks, result.categories) if category in ("direction", "speed")])
    categories = [category for result in results for category in result.categories]
    per_category = {}
    for category in dict.fromkeys(categories):
        mask = torch.tensor([c == category for c in categories])
        per_category[category] = round(float(correct[mask].float().mean()), 4)
    return {
        "accuracy": round(float(correct.float().mean()), 4),
        "per_category": per_category,
        "subject_in_every_frame": round(float(tracked.float().mean()), 4) if len(tracked) else float("nan"),
        "smoothness": round(float(torch.cat([r.smoothness for r in results]).mean()), 4),
        "quality": round(float(torch.cat([r.quality for r in results]).mean()), 4),
        "clips": len(expanded),
    }


def build_testbed_video_model(destination: str | os.PathLike = SHIPPED_VIDEO_MODEL,
                              options: VideoModelBuildOptions | None = None, progress: bool = True) -> dict:
    """Train a motion adapter for the testbed's SD model, measure held-out video-oracle accuracy
    before (the image model frame by frame) and after, and save the adapter (fp16) and its build
    record to ``destination``."""
    from diffusers import UNet2DConditionModel

    from ..models.video import AnimateDiffGenerator
    from .video import video_prompts

    options = options or VideoModelBuildOptions()
    destination = Path(destination)
    torch.manual_seed(options.seed)
    unet_config = UNet2DConditionModel.load_config(options.base, subfolder="unet")
    adapter = new_motion_adapter(unet_config, heads=options.motion_heads, seed=options.seed)
    generator = AnimateDiffGenerator.from_pretrained(options.base, motion_adapter=adapter,
                                                     num_frames=options.num_frames)
    heldout = [spec.text for spec in video_prompts("heldout")]
    if options.eval_prompts and options.eval_prompts < len(heldout):  # spread: every category is in
        heldout = [heldout[i * len(heldout) // options.eval_prompts] for i in range(options.eval_prompts)]
    evaluate = dict(clips_per_prompt=options.eval_clips_per_prompt, num_inference_steps=options.eval_steps,
                    guidance_scale=options.guidance_scale, seed=1000, progress=progress)
    timings = {}
    started = time.perf_counter()
    before = evaluate_video_model(generator, heldout, **evaluate)
    timings["eval_untrained_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    history = train_motion_adapter(generator, options, progress)
    timings["train_s"] = round(time.perf_counter() - started, 1)
    destination.mkdir(parents=True, exist_ok=True)
    generator.denoiser.save_motion_modules(str(destination))
    _to_fp16(destination)
    reloaded = load_testbed_video_model(destination, base=options.base, num_frames=options.num_frames)
    started = time.perf_counter()
    after = evaluate_video_model(reloaded, heldout, **evaluate)  # the figures are those of the shipped fp16 weights
    timings["eval_trained_s"] = round(time.perf_counter() - started, 1)
    last = history[-min(50, len(history)):]
    summary = {
        "model": "animatediff",
        "options": asdict(options),
        "heldout": after,
        "heldout_untrained": before,
        "heldout_eval": f"{len(heldout)} held-out video prompts x {options.eval_clips_per_prompt} clips, "
                        f"{options.eval_steps} DDIM steps, CFG {options.guidance_scale}, {options.num_frames} frames",
        "final_train_loss": round(float(np.mean([row["loss"] for row in last])), 5),
        "first_train_loss": round(float(np.mean([row["loss"] for row in history[:min(50, len(history))]])), 5),
        "timings": timings,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
    }
    (destination / BUILD_RECORD).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _to_fp16(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = {name: tensor.half() for name, tensor in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def load_testbed_video_model(adapter: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
                             num_frames: int = 8, **kwargs):
    """The video testbed's base model: the testbed SD model (``base``, default the shipped one)
    with the shipped motion adapter (``assets/testbed/animatediff``) or one built by
    :func:`build_testbed_video_model`; 8 frames of 32x32 by default."""
    from ..models.errors import ModelLoadError
    from ..models.video import AnimateDiffGenerator

    folder = Path(adapter) if adapter is not None else SHIPPED_VIDEO_MODEL
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no testbed motion adapter at {folder}: build it with "
                             f"`python -m visalign.testbed.video_model --out {folder}`")
    return AnimateDiffGenerator.from_pretrained(str(base or ASSETS / "sd"), motion_adapter=str(folder),
                                                num_frames=num_frames, **kwargs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train the video testbed's base model (a motion adapter for the "
                                                 "testbed SD model) on rendered clips with imperfect captions.")
    parser.add_argument("--out", default=str(SHIPPED_VIDEO_MODEL))
    parser.add_argument("--quick", action="store_true", help="a few steps (smoke run)")
    for name, value in asdict(VideoModelBuildOptions()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int if value is None else type(value), default=None)
    args = parser.parse_args(argv)
    options = quick_options() if args.quick else VideoModelBuildOptions()
    overrides = {name: getattr(args, name) for name in asdict(options) if getattr(args, name) is not None}
    summary = build_testbed_video_model(args.out, replace(options, **overrides))
    print(json.dumps({key: summary[key] for key in ("heldout", "heldout_untrained", "final_train_loss", "timings")},
                     indent=2))


if __name__ == "__main__":
    main()
