"""The testbed's learned reward: an HPS-style CLIP scorer that generalises to held-out prompts.

A scorer trained only on oracle-ranked pairs of base-model samples (a few hundred pairs of
blurry images, 181 prompt strings) learns nothing that carries over to prompts naming unseen
(colour, shape) combinations: it agreed with the oracle on 49% of held-out pairs. This build
gives the same architecture family (``rewards.hpsv2`` on an open_clip ``CLIP``, score
``cos(image, prompt)``) much denser supervision, all of it from train prompts:

1. **Data.**
   - *Rendered hard negatives*: for random train prompts, a scene that satisfies the prompt
     and one that is wrong in exactly one attribute (the renderer's ``mismatched_scene``:
     shape, colour, count, a missing object, swapped colours, the opposite relation), with
     random layouts, sizes and backgrounds.
   - *Base-model samples* of train prompts, read by the oracle (the objects it finds and its
     quality score), so the reward is calibrated on generated images: blobby shapes, tinted
     backgrounds, objects that bleed into each other.

   Every image is labelled against **every** train prompt by ``prompts.satisfies`` on its
   objects (the scene's for renders, the oracle's for samples): one exact bit per (image,
   prompt). Images are augmented with the eight symmetries of the square (flips, quarter
   turns), which map scenes to scenes; the labels are recomputed on the moved objects, so
   "left of" becomes "right of" where it should.
2. **Training** (one loop, AdamW, cosine schedule). With logits
   ``exp(logit_scale) * cos(image, prompt) + bias`` against all train prompts:

   - a multi-positive sigmoid loss (SigLIP-style binary cross-entropy) on the label bits;
   - the reward library's Bradley-Terry ``preference_loss`` on each rendered pair (the
     right scene over its one-attribute-wrong twin) and on pairs of samples ordered as the
     oracle orders them (``correct + quality``, as ``build.oracle_pairs`` does).

   The bias only shifts the sigmoid loss; it is not part of the reward. Held-out prompts are
   never seen, as text or as labels.
3. **Evaluation**: agreement with the oracle on held-out-prompt pairs, (a) rendered (a right
   scene vs a one-attribute-wrong one, per category and per kind of mismatch) and (b) pairs
   of base-model samples of held-out prompts (pairs that differ in oracle correctness, per
   category, and all pairs the oracle orders by ``correct + quality``).
4. **Ship**: ``save_pretrained`` (an open_clip folder with safetensors weights stored in
   fp16, plus ``reward.json`` and ``reward_build.json`` with these figures), which
   ``rewards.load(folder)`` and ``rewards.load("testbed-reward")`` read back.

``kind="clip"`` builds the second learned reward, a **CLIP-score-style** model
(``rewards.clip``, ``rewards.load("testbed-clip")``): the same architecture trained only to
match rendered images with the captions they satisfy (the sigmoid loss and the attribute
probe; no preference pairs, no base-model samples). It knows what the captions say but has
never seen what the base model gets wrong, so the two rewards fail differently: optimising one
and watching the other (and the oracle) shows reward hacking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .prompts import COLOURS, SHAPES, PromptSpec, load_prompts, parse_prompt, satisfies

logger = logging.getLogger(__name__)

__all__ = [
    "RewardBuildOptions", "build_testbed_reward", "load_testbed_reward", "LabelledImages", "render_pairs",
    "sample_and_read", "label_matrix", "symmetry", "rendered_agreement", "sample_agreement", "SHIPPED_REWARD",
    "SHIPPED_CLIP", "load_testbed_clip", "REWARD_KINDS", "sample_x0_and_read", "value_agreement", "concat_labelled",
]

#: Where ``visalign testbed build`` ships the learned reward.
SHIPPED_REWARD = Path(__file__).resolve().parents[2] / "assets" / "testbed" / "reward"
#: Where the CLIP-score-style reward (``kind="clip"``) is shipped.
SHIPPED_CLIP = SHIPPED_REWARD.parent / "clip"
REWARD_KINDS = ("hpsv2", "clip")
SUMMARY_NAME = "reward_build.json"


@dataclass
class RewardBuildOptions:
    """Options of :func:`build_testbed_reward` (defaults: the shipped reward)."""

    kind: str = "hpsv2"  # "hpsv2": preference-trained scorer; "clip": caption matching only (CLIP score)
    rendered_pairs: int = 4000  # (right, wrong) rendered scene pairs of train prompts
    distractor_scenes: int = 2000  # rendered right scenes with an extra object where the prompt allows
    train_samples_per_prompt: int = 2  # base-model samples of each train prompt (calibration)
    sample_steps: int = 20  # sampling steps of the base model
    # Value calibration: decoded x0-predictions after these step indices (of sample_steps) of the
    # calibration trajectories join the samples, each labelled with what its trajectory ends as (the
    # oracle's reading of the final image). The reward then scores a blurry intermediate by its likely
    # outcome, which is what Feynman-Kac steering's intermediate potentials ask of it. () = off.
    x0_steps: tuple[int, ...] = ()
    x0_eta: float = 1.0  # sampler stochasticity of the trajectories x0_steps reads (FK's proposal: DDIM eta 1)
    guidance_scale: float = 4.0
    probe_steps: int = 300  # first stage: the image tower learns the attributes alone
    steps: int = 600  # second stage: every loss
    pairs_per_batch: int = 48  # rendered pairs per step (two images each)
    scenes_per_batch: int = 16  # distractor scenes per step
    samples_per_batch: int = 64  # base-model samples per step
    learning_rate: float = 1e-3
    image_lr_scale: float = 1.0  # second stage: the image tower's learning rate over learning_rate
    weight_decay: float = 0.0
    warmup_steps: int = 50
    sigmoid_weight: float = 1.0  # weight of the sigmoid (label) loss
    preference_weight: float = 1.0  # weight of the Bradley-Terry terms next to the sigmoid loss
    max_grad_norm: float | None = 1.0
    probe_weight: float = 1.0  # weight of the linear attribute probe on the image embeddings (training aid)
    quality_margin: float = 0.05  # least (correct + quality) gap for an ordered pair of samples
    symmetries: bool = True  # flips and quarter turns of images and labels
    eval_pairs_per_prompt: int = 8  # rendered held-out pairs per held-out prompt
    eval_samples_per_prompt: int = 4  # base-model samples per held-out prompt (0: skip figure b)
    save_dtype: str = "float16"  # dtype of the shipped weights ("float32" to keep them as trained)
    prompt_limit: int | None = None  # first N prompts of each split (quick runs)


def quick_options() -> RewardBuildOptions:
    """A few seconds of everything (tests, smoke runs)."""
    return RewardBuildOptions(rendered_pairs=48, distractor_scenes=16, train_samples_per_prompt=1, sample_steps=2, steps=4,
                              pairs_per_batch=8, scenes_per_batch=4, samples_per_batch=8, warmup_steps=1, eval_pairs_per_prompt=2, eval_samples_per_prompt=1,
                              prompt_limit=8)


# ------------------------------------------------------------------------------ data


class Thing(NamedTuple):
    """What ``prompts.satisfies`` reads of an object (a scene's or one the oracle found)."""

    shape: str
    colour: str
    x: float
    y: float


@dataclass
class LabelledImages:
    """Images with what is in them.

    Attributes:
        images: ``[N, 3, H, W]`` in [0, 1].
        objects: per image, the objects in it (:class:`Thing`), which decide every prompt.
        prompts: per image, the prompt it was made for.
        quality: ``[N]`` the oracle's quality score (1 for renders).
    """

    images: torch.Tensor
    objects: list[tuple[Thing, ...]]
    prompts: list[str]
    quality: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


def _things(objects) -> tuple[Thing, ...]:
    return tuple(Thing(obj.shape, obj.colour, float(obj.x), float(obj.y)) for obj in objects)


def render_pairs(prompts: Sequence[str], count: int, seed: int) -> LabelledImages:
    """``count`` rendered pairs: images ``[0, count)`` satisfy their prompt, image ``count + i``
    is the one-attribute-wrong twin of image ``i`` (same prompt). Neither has a distractor, so
    the two differ only in the attribute, never in how many objects they show."""
    from .render import mismatched_scene, render_batch, scene_for_prompt

    rng = np.random.default_rng(seed)
    specs = [parse_prompt(prompt) for prompt in prompts]
    chosen = rng.integers(len(prompts), size=count)
    right = [scene_for_prompt(specs[k], rng) for k in chosen]
    wrong = [mismatched_scene(specs[k], rng) for k in chosen]
    scenes = right + wrong
    return LabelledImages(render_batch(scenes), [_things(scene.objects) for scene in scenes],
                          [prompts[k] for k in chosen] * 2, torch.ones(2 * count))


def render_scenes(prompts: Sequence[str], count: int, seed: int, extra_objects: int = 1) -> LabelledImages:
    """``count`` rendered scenes of random prompts, each with up to ``extra_objects``
    distractors where the prompt still holds with them (labels only, no pairs)."""
    from .render import render_batch, scene_for_prompt

    rng = np.random.default_rng(seed)
    chosen = rng.integers(len(prompts), size=count)
    scenes = [scene_for_prompt(prompts[k], rng, extra_objects=extra_objects) for k in chosen]
    return LabelledImages(render_batch(scenes), [_things(scene.objects) for scene in scenes],
                          [prompts[k] for k in chosen], torch.ones(count))


def sample_and_read(generator, prompts: Sequence[str], per_prompt: int, steps: int, guidance_scale: float, seed: int,
                    cache: Path | None = None) -> LabelledImages:
    """``per_prompt`` base-model samples of each prompt (seeded as ``visalign eval`` seeds them),
    read by the oracle. With ``cache`` (a folder), samples are kept there and reused when the
    model weights and settings are the same."""
    from ..eval.evaluate import sample_for_eval
    from .oracle import oracle

    path = None
    if cache is not None:
        key = json.dumps([_fingerprint(generator), list(prompts), per_prompt, steps, guidance_scale, seed])
        path = Path(cache) / f"samples-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    if path is not None and path.exists():
        images = torch.load(path, weights_only=True)["images"].float()
    else:
        images = sample_for_eval(generator, prompts, per_prompt, steps, guidance_scale, seed).clamp(0, 1)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"images": images.half()}, path)
            images = images.half().float()  # the same numbers whether or not they came from the cache
    expanded = [prompt for prompt in prompts for _ in range(per_prompt)]
    verdict = oracle(images, expanded)
    return LabelledImages(images, [_things(found) for found in verdict.objects], expanded, verdict.quality.float())


def sample_x0_and_read(generator, prompts: Sequence[str], per_prompt: int, steps: int, guidance_scale: float, seed: int,
                       x0_steps: Sequence[int], eta: float = 1.0, batch_size: int = 64,
                       cache: Path | None = None) -> tuple[LabelledImages, dict[int, LabelledImages]]:
    """Like :func:`sample_and_read` (same initial noise per image), with sampler stochasticity ``eta``,
    and the decoded x0-predictions after each step index in ``x0_steps``.

    Returns ``(finals, by_step)``: the final samples read by the oracle, and per step index the
    x0-predictions of the same trajectories, **labelled with their final sample's objects and
    quality** (what the trajectory became, not what the blurry intermediate shows).
    """
    from .oracle import oracle

    x0_steps = sorted({int(index) for index in x0_steps})
    if any(not 0 <= index < steps for index in x0_steps):
        raise ValueError(f"x0_steps must be step indices in [0, {steps}), got {x0_steps}")
    path = None
    if cache is not None:
        key = json.dumps([_fingerprint(generator), list(prompts), per_prompt, steps, guidance_scale, seed, x0_steps, eta])
        path = Path(cache) / f"x0-samples-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    if path is not None and path.exists():
        stored = torch.load(path, weights_only=True)
        images, x0 = stored["images"].float(), {int(k): v.float() for k, v in stored["x0"].items()}
    else:
        from ..eval.evaluate import sample_for_eval

        captured = {index: [] for index in x0_steps}

        def keep(state):  # every batch in order, so the kept x0-predictions line up with the images
            if state.index in captured:
                with torch.no_grad():
                    captured[state.index].append(generator.decode(state.x0_pred).float().cpu())

        images = sample_for_eval(generator, prompts, per_prompt, steps, guidance_scale, seed, batch_size=batch_size,
                                 eta=eta, on_step_end=keep).clamp(0, 1)
        x0 = {index: torch.cat(parts).clamp(0, 1) for index, parts in captured.items()}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"images": images.half(), "x0": {str(k): v.half() for k, v in x0.items()}}, path)
            images, x0 = images.half().float(), {k: v.half().float() for k, v in x0.items()}
    expanded = [prompt for prompt in prompts for _ in range(per_prompt)]
    verdict = oracle(images, expanded)
    objects, quality = [_things(found) for found in verdict.objects], verdict.quality.float()
    finals = LabelledImages(images, objects, expanded, quality)
    return finals, {index: LabelledImages(x0[index], objects, expanded, quality) for index in x0_steps}


def concat_labelled(parts: Sequence[LabelledImages]) -> LabelledImages:
    """One :class:`LabelledImages` of several, in order."""
    return LabelledImages(torch.cat([part.images for part in parts]), [o for part in parts for o in part.objects],
                          [p for part in parts for p in part.prompts], torch.cat([part.quality for part in parts]))


def _fingerprint(generator) -> str:
    """A digest of the generator's denoiser and VAE weights (the cache key of its samples)."""
    digest = hashlib.sha1()
    for module in (generator.pipe.unet if hasattr(generator.pipe, "unet") else generator.pipe.transformer, generator.pipe.vae):
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def label_matrix(objects: Sequence[Sequence[Thing]], specs: Sequence[PromptSpec]) -> torch.Tensor:
    """``[N, P]`` bool: does image ``n`` (its objects) satisfy prompt ``p``."""
    return torch.tensor([[satisfies(spec, things) for spec in specs] for things in objects], dtype=torch.bool).reshape(
        len(objects), len(specs))


def symmetry(images: torch.Tensor, objects: Sequence[Sequence[Thing]], index: int):
    """Apply symmetry ``index`` (0-7) of the square to ``[N, 3, H, W]`` images and their objects.

    Bit 0 transposes (x <-> y), bit 1 mirrors left-right, bit 2 mirrors top-bottom, in that
    order; ``y`` grows downwards in both the image and the objects. Shapes are unchanged
    (every shape is drawn at every rotation, and reflections of them are the same shapes).
    """
    if not 0 <= index < 8:
        raise ValueError(f"a symmetry of the square is numbered 0-7, got {index}")
    moved = [list(things) for things in objects]
    if index & 1:
        images = images.transpose(-1, -2)
        moved = [[thing._replace(x=thing.y, y=thing.x) for thing in things] for things in moved]
    if index & 2:
        images = images.flip(-1)
        moved = [[thing._replace(x=1 - thing.x) for thing in things] for things in moved]
    if index & 4:
        images = images.flip(-2)
        moved = [[thing._replace(y=1 - thing.y) for thing in things] for things in moved]
    return images, [tuple(things) for things in moved]


# ------------------------------------------------------------------------------ training

#: Factorised attributes of an image, never a (colour, shape) combination (so none of the
#: held-out combinations): which shapes and colours are present, how many of each shape, and
#: the shape and colour of the leftmost, rightmost, topmost and bottommost object.
ATTRIBUTES = (
    [f"has {shape}" for shape in SHAPES] + [f"has {colour}" for colour in COLOURS]
    + [f"{count} {shape}" for shape in SHAPES for count in (1, 2, 3)]
    + [f"{side} is {value}" for side in ("leftmost", "rightmost", "topmost", "bottommost") for value in SHAPES + COLOURS]
)


def attribute_bits(objects: Sequence[Sequence[Thing]]) -> torch.Tensor:
    """``[N, len(ATTRIBUTES)]`` float: the :data:`ATTRIBUTES` of each image's objects."""
    rows = []
    for things in objects:
        bits = [any(t.shape == shape for t in things) for shape in SHAPES]
        bits += [any(t.colour == colour for t in things) for colour in COLOURS]
        bits += [sum(t.shape == shape for t in things) == count for shape in SHAPES for count in (1, 2, 3)]
        for key in (lambda t: t.x, lambda t: -t.x, lambda t: t.y, lambda t: -t.y):
            extreme = min(things, key=key) if things else None
            bits += [extreme is not None and value in (extreme.shape, extreme.colour) for value in SHAPES + COLOURS]
        rows.append(bits)
    return torch.tensor(rows, dtype=torch.float32).reshape(len(objects), len(ATTRIBUTES))



def _augment(images: torch.Tensor, objects: Sequence[Sequence[Thing]], generator: torch.Generator):
    """A random symmetry per image."""
    choice = torch.randint(8, (len(images),), generator=generator)
    out, moved = images.clone(), list(objects)
    for index in choice.unique().tolist():
        rows = (choice == index).nonzero().flatten().tolist()
        out[rows], things = symmetry(images[rows], [objects[row] for row in rows], index)
        for row, thing in zip(rows, things):
            moved[row] = thing
    return out, moved


def _draw(data: LabelledImages, rows: torch.Tensor) -> tuple[torch.Tensor, list, list[str], torch.Tensor]:
    indices = rows.tolist()
    return data.images[rows], [data.objects[i] for i in indices], [data.prompts[i] for i in indices], data.quality[rows]


def train_scorer(reward, prompts: Sequence[str], pairs: LabelledImages, scenes: LabelledImages | None,
                 samples: LabelledImages | None, options: RewardBuildOptions, seed: int) -> list[dict]:
    """Train ``reward`` (a contrastive reward) in place on rendered ``pairs`` (see
    :func:`render_pairs`), distractor ``scenes`` and base-model ``samples``; returns the loss history.

    Each step draws ``pairs_per_batch`` pairs, ``scenes_per_batch`` scenes and
    ``samples_per_batch`` samples. Every image enters the sigmoid loss against every prompt;
    the preference loss takes each rendered pair, and the samples two by two, each pair scored
    for the prompt of its first image.
    """
    from rewards.training import preference_loss

    specs = [parse_prompt(prompt) for prompt in prompts]
    column = {prompt: index for index, prompt in enumerate(prompts)}
    n_pairs = len(pairs) // 2
    generator = torch.Generator().manual_seed(seed)
    bias = torch.nn.Parameter(torch.tensor(-math.log(len(prompts))))  # starts near the labels' base rate
    # A linear probe from the image embedding to factorised attributes (see attribute_bits): a
    # dense, direct signal that teaches the image tower shapes and layout much faster than the
    # prompt labels alone, most of which are rarely true. Dropped after training.
    probe = torch.nn.Linear(reward.backbone.embed_dim, len(ATTRIBUTES))
    reward.unfreeze()
    image_tower = [p for name, p in reward.named_parameters() if ".visual." in name]
    others = [p for name, p in reward.named_parameters() if ".visual." not in name] + [bias]
    parameters = image_tower + others + list(probe.parameters())
    optimizer = torch.optim.AdamW([{"params": image_tower + list(probe.parameters())}, {"params": others}],
                                  lr=options.learning_rate, weight_decay=options.weight_decay)

    def schedule(step: int) -> float:  # warmup and cosine decay, once per stage
        stage, length = (step, options.probe_steps) if step < options.probe_steps else (step - options.probe_steps, options.steps)
        warmup = min(1.0, (stage + 1) / max(1, options.warmup_steps))
        return warmup * 0.5 * (1 + math.cos(math.pi * stage / max(1, length)))

    def image_schedule(step: int) -> float:
        return schedule(step) * (1.0 if step < options.probe_steps else options.image_lr_scale)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [image_schedule, schedule])
    history, running = [], []
    reward.train()
    try:
        for step in range(options.probe_steps + options.steps):
            probing = step < options.probe_steps
            chosen = torch.randint(n_pairs, (min(options.pairs_per_batch, n_pairs),), generator=generator)
            parts = [_draw(pairs, torch.cat([chosen, chosen + n_pairs]))]
            half = len(chosen)
            # Rendered pairs: row i (right) against row i + half (its wrong twin).
            first, second = [torch.arange(half)], [torch.arange(half, 2 * half)]
            offset = 2 * half
            if scenes is not None and len(scenes) and options.scenes_per_batch:
                parts.append(_draw(scenes, torch.randint(len(scenes), (options.scenes_per_batch,), generator=generator)))
                offset += options.scenes_per_batch
            if samples is not None and len(samples) and options.samples_per_batch:
                parts.append(_draw(samples, torch.randint(len(samples), (options.samples_per_batch,), generator=generator)))
                n_samples = options.samples_per_batch // 2
                first.append(torch.arange(offset, offset + n_samples))
                second.append(torch.arange(offset + n_samples, offset + 2 * n_samples))
            images = torch.cat([part[0] for part in parts])
            objects = [things for part in parts for things in part[1]]
            image_prompts = [prompt for part in parts for prompt in part[2]]
            quality = torch.cat([part[3] for part in parts])
            first, second = torch.cat(first), torch.cat(second)
            if options.symmetries:
                images, objects = _augment(images, objects, generator)
            labels = label_matrix(objects, specs).float()

            image_embeddings = reward.image_embeddings(images)
            text_embeddings = reward.text_embeddings(prompts)
            scale = reward.backbone.logit_scale()
            logits = scale * image_embeddings @ text_embeddings.T
            sigmoid_loss = F.binary_cross_entropy_with_logits(logits + bias, labels)
            probe_loss = F.binary_cross_entropy_with_logits(probe(image_embeddings * 10), attribute_bits(objects))

            # Bradley-Terry on the pairs the oracle orders.
            prompt_of = torch.tensor([column[image_prompts[row]] for row in first.tolist()])
            merit = labels + quality[:, None]  # the oracle's order: correct first, quality breaks ties
            gap = merit[first, prompt_of] - merit[second, prompt_of]
            ordered = gap.abs() > options.quality_margin
            preference = torch.zeros(())
            if ordered.any():
                preference = preference_loss(logits[first, prompt_of][ordered], logits[second, prompt_of][ordered],
                                             (gap[ordered] > 0).float())
            loss = options.probe_weight * probe_loss
            if not probing:
                loss = loss + options.sigmoid_weight * sigmoid_loss + options.preference_weight * preference
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(parameters, options.max_grad_norm)
            optimizer.step()
            scheduler.step()
            running.append((sigmoid_loss.item(), preference.item(), probe_loss.item()))
            if (step + 1) % 50 == 0 or step + 1 == options.probe_steps + options.steps:
                mean = np.mean(running, axis=0)
                history.append({"step": step + 1, "sigmoid_loss": round(float(mean[0]), 4),
                                "preference_loss": round(float(mean[1]), 4), "probe_loss": round(float(mean[2]), 4)})
                logger.info("reward step %d: sigmoid %.4f preference %.4f", step + 1, mean[0], mean[1])
                running = []
    finally:
        reward.freeze()
    return history


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def _scores(reward, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    return torch.cat([reward(images[start : start + batch_size], list(prompts[start : start + batch_size]))
                      for start in range(0, len(images), batch_size)]) if len(images) else torch.zeros(0)


def _rate(hits: list[float]) -> float | None:
    return round(float(np.mean(hits)), 4) if hits else None


def rendered_agreement(reward, split: str = "heldout", pairs_per_prompt: int = 8, seed: int = 12345,
                       prompt_limit: int | None = None) -> dict:
    """Agreement with the oracle on rendered pairs of ``split`` prompts: for each prompt,
    ``pairs_per_prompt`` pairs of a scene that satisfies it and one wrong in one attribute, the
    kinds of mismatch taken in turn. Neither scene has a distractor (a reward that likes busy
    images gains nothing). Equal scores count half. Returns the overall rate, per category and
    per kind."""
    from .render import mismatch_kinds, mismatched_scene, render_batch, scene_for_prompt

    rng = np.random.default_rng(seed)
    right, wrong, prompts, categories, kinds = [], [], [], [], []
    for record in load_prompts(split)[:prompt_limit]:
        spec = parse_prompt(record.prompt)
        options = mismatch_kinds(spec.category)
        for index in range(pairs_per_prompt):
            kind = options[index % len(options)]
            right.append(scene_for_prompt(spec, rng))
            wrong.append(mismatched_scene(spec, rng, kind=kind))
            prompts.append(record.prompt)
            categories.append(record.category)
            kinds.append(kind)
    better, worse = _scores(reward, render_batch(right), prompts), _scores(reward, render_batch(wrong), prompts)
    hits = torch.where(better == worse, 0.5, (better > worse).float()).tolist()
    return {
        "agreement": _rate(hits), "pairs": len(hits),
        "per_category": {c: _rate([h for h, k in zip(hits, categories) if k == c]) for c in dict.fromkeys(categories)},
        "per_kind": {c: _rate([h for h, k in zip(hits, kinds) if k == c]) for c in sorted(set(kinds))},
    }


def sample_agreement(reward, samples: LabelledImages, per_prompt: int, margin: float = 0.05) -> dict:
    """Agreement with the oracle on pairs of samples of one prompt (``per_prompt`` consecutive
    images each): ``correctness`` on every pair where the oracle passes one image and fails
    the other (overall and per category), ``oracle_order`` on every pair whose
    ``correct + quality`` differs by more than ``margin`` (the pairs ``build.oracle_pairs``
    draws from)."""
    from .oracle import oracle

    verdict = oracle(samples.images, samples.prompts)
    scores = _scores(reward, samples.images, samples.prompts).reshape(-1, per_prompt)
    correct = verdict.correct.float().reshape(-1, per_prompt)
    merit = correct + verdict.quality.float().reshape(-1, per_prompt)
    categories = verdict.categories[::per_prompt]
    by_correctness, by_category, by_order = [], {}, []
    for row in range(len(scores)):
        for i in range(per_prompt):
            for j in range(per_prompt):
                hit = 0.5 if scores[row, i] == scores[row, j] else float(scores[row, i] > scores[row, j])
                if correct[row, i] > correct[row, j]:
                    by_correctness.append(hit)
                    by_category.setdefault(categories[row], []).append(hit)
                if merit[row, i] - merit[row, j] > margin:
                    by_order.append(hit)
    return {
        "correctness": _rate(by_correctness), "correctness_pairs": len(by_correctness),
        "per_category": {c: {"agreement": _rate(h), "pairs": len(h)} for c, h in by_category.items()},
        "oracle_order": _rate(by_order), "oracle_order_pairs": len(by_order),
        "oracle_accuracy_of_samples": round(float(verdict.correct.float().mean()), 4),
    }


def value_agreement(reward, by_step: dict[int, LabelledImages], finals: LabelledImages, per_prompt: int) -> dict:
    """How well ``reward`` scores intermediate x0-predictions by what their trajectories become:
    for each step index, agreement with the oracle on pairs of trajectories of one prompt
    (``per_prompt`` consecutive ones) where one final sample is right and the other wrong,
    scoring the two x0-predictions at that step (equal scores count half). The final step's
    row is :func:`sample_agreement`'s ``correctness``."""
    from .oracle import oracle

    correct = oracle(finals.images, finals.prompts).correct.float().reshape(-1, per_prompt)
    figures = {}
    for index, x0 in sorted(by_step.items()):
        scores = _scores(reward, x0.images, x0.prompts).reshape(-1, per_prompt)
        hits = [0.5 if scores[row, i] == scores[row, j] else float(scores[row, i] > scores[row, j])
                for row in range(len(scores)) for i in range(per_prompt) for j in range(per_prompt)
                if correct[row, i] > correct[row, j]]
        figures[str(index)] = {"agreement": _rate(hits), "pairs": len(hits)}
    return figures


# ------------------------------------------------------------------------------ the build


def build_testbed_reward(model_dir: str | os.PathLike | None, destination: str | os.PathLike, work_dir: str | os.PathLike,
                         seed: int = 0, quick: bool = False, options: RewardBuildOptions | None = None) -> dict:
    """Build the testbed's learned reward and save it to ``destination``; returns its figures.

    Args:
        model_dir: the base model (a diffusers folder, e.g. ``assets/testbed/sd``) whose samples
            calibrate the reward and give figure (b); ``None`` trains on renders only.
        destination: the reward folder (replaced).
        work_dir: caches of base-model samples (reused when the model and settings are the same).
        seed: seeds data, initialisation and training.
        quick: :func:`quick_options` (seconds; tests and smoke runs) unless ``options`` is given.
    """
    from rewards.clip import ClipReward
    from rewards.tiny import TESTBED_REWARD_CONFIG, testbed_hpsv2_reward, tiny_open_clip_backbone

    options = options or (quick_options() if quick else RewardBuildOptions())
    if options.kind not in REWARD_KINDS:
        raise ValueError(f"kind must be one of {REWARD_KINDS}, got {options.kind!r}")
    if options.kind == "clip":  # caption matching only: no preference pairs, no base-model samples in training
        options = replace(options, preference_weight=0.0, train_samples_per_prompt=0)
    destination, work_dir = Path(destination), Path(work_dir)
    start, timings = time.perf_counter(), {}
    cpu_start = time.process_time()
    train_prompts = [record.prompt for record in load_prompts("train")][: options.prompt_limit]
    heldout_prompts = [record.prompt for record in load_prompts("heldout")][: options.prompt_limit]

    mark = time.perf_counter()
    rendered = render_pairs(train_prompts, options.rendered_pairs, seed)
    scenes = render_scenes(train_prompts, options.distractor_scenes, seed + 3) if options.distractor_scenes else None
    timings["render_s"] = round(time.perf_counter() - mark, 1)

    samples = heldout_samples = heldout_x0 = generator = None
    if model_dir is not None:
        from ..models import load_generator

        mark = time.perf_counter()
        generator = load_generator(model_dir)
        if options.train_samples_per_prompt and options.x0_steps:
            finals, by_step = sample_x0_and_read(generator, train_prompts, options.train_samples_per_prompt,
                                                 options.sample_steps, options.guidance_scale, seed + 1,
                                                 options.x0_steps, options.x0_eta, cache=work_dir)
            samples = concat_labelled([finals, *by_step.values()])
        elif options.train_samples_per_prompt:
            samples = sample_and_read(generator, train_prompts, options.train_samples_per_prompt, options.sample_steps,
                                      options.guidance_scale, seed + 1, cache=work_dir)
        if options.eval_samples_per_prompt and options.x0_steps:
            heldout_samples, heldout_x0 = sample_x0_and_read(generator, heldout_prompts, options.eval_samples_per_prompt,
                                                             options.sample_steps, options.guidance_scale, seed + 2,
                                                             options.x0_steps, options.x0_eta, cache=work_dir)
        elif options.eval_samples_per_prompt:
            heldout_samples = sample_and_read(generator, heldout_prompts, options.eval_samples_per_prompt,
                                              options.sample_steps, options.guidance_scale, seed + 2, cache=work_dir)
        timings["sample_s"] = round(time.perf_counter() - mark, 1)

    mark = time.perf_counter()
    if options.kind == "clip":
        reward = ClipReward(tiny_open_clip_backbone(seed, TESTBED_REWARD_CONFIG))
    else:
        reward = testbed_hpsv2_reward(seed=seed)
    history = train_scorer(reward, train_prompts, rendered, scenes, samples, options, seed)
    timings["train_s"] = round(time.perf_counter() - mark, 1)

    # The figures are those of the saved reward, read back as users will load it.
    save_reward(reward, destination, options.save_dtype)
    reward = _load(destination, options.kind)
    mark = time.perf_counter()
    figures = {
        "heldout_rendered": rendered_agreement(reward, "heldout", options.eval_pairs_per_prompt,
                                               prompt_limit=options.prompt_limit),
        "train_rendered": rendered_agreement(reward, "train", max(1, options.eval_pairs_per_prompt // 2),
                                             prompt_limit=options.prompt_limit),
    }
    if heldout_samples is not None:
        figures["heldout_samples"] = sample_agreement(reward, heldout_samples, options.eval_samples_per_prompt,
                                                      options.quality_margin)
    if heldout_x0:
        figures["heldout_x0"] = value_agreement(reward, heldout_x0, heldout_samples, options.eval_samples_per_prompt)
    timings["eval_s"] = round(time.perf_counter() - mark, 1)
    timings["total_s"] = round(time.perf_counter() - start, 1)
    timings["cpu_s"] = round(time.process_time() - cpu_start, 1)

    summary = {
        "reward": options.kind, "architecture": TESTBED_REWARD_CONFIG, "parameters": sum(p.numel() for p in reward.parameters()),
        "base_model": str(model_dir) if model_dir is not None else None, "seed": seed, "quick": quick,
        "options": asdict(options), "train_prompts": len(train_prompts), "heldout_prompts": len(heldout_prompts),
        "rendered_pairs": options.rendered_pairs, "train_sample_count": len(samples) if samples is not None else 0,
        "heldout_sample_count": len(heldout_samples) if heldout_samples is not None else 0,
        **figures, "history": history, "timings": timings, "machine": _machine(),
    }
    (destination / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def save_reward(reward, destination: Path, dtype: str = "float16") -> Path:
    """``save_pretrained`` into a fresh ``destination`` with weights in ``dtype`` (the reward
    loads them into float32 whatever they are stored in)."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"save_dtype must be 'float16' or 'float32', got {dtype!r}")
    if destination.exists():
        shutil.rmtree(destination)
    stored = getattr(torch, dtype)
    reward.to(stored)
    try:
        reward.save_pretrained(destination)
    finally:
        reward.to(torch.float32)
    return destination


def load_testbed_reward(model: str | os.PathLike | None = None):
    """The testbed's learned reward (``rewards.load("testbed-reward")``): the shipped one in
    ``assets/testbed/reward``, or the folder ``model`` written by :func:`build_testbed_reward`."""
    return _load(Path(model) if model is not None else SHIPPED_REWARD, "hpsv2")


def load_testbed_clip(model: str | os.PathLike | None = None):
    """The testbed's CLIP-score-style reward (``rewards.load("testbed-clip")``): the shipped one
    in ``assets/testbed/clip``, or a folder written by :func:`build_testbed_reward` with ``kind="clip"``."""
    return _load(Path(model) if model is not None else SHIPPED_CLIP, "clip")


def _load(folder: Path, kind: str):
    from rewards.registry import load_pretrained

    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(
            f"no testbed {kind} reward at {folder}: build it with `visalign testbed build` or "
            f"visalign.testbed.reward_build.build_testbed_reward(model_dir, {str(folder)!r}, work_dir)")
    return load_pretrained(folder)


def _machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "torch": torch.__version__}


def main(argv=None) -> None:
    """``python -m visalign.testbed.reward_build --out DIR [--model M] [--<option> value ...]``: build one
    learned testbed reward (options: the fields of :class:`RewardBuildOptions`; ``--x0-steps 4,8,12,16``)."""
    import argparse

    parser = argparse.ArgumentParser(description="Build a learned testbed reward (an HPS-style or CLIP-score-style scorer).")
    parser.add_argument("--out", required=True, help="the reward folder written (replaced)")
    parser.add_argument("--model", default=str(SHIPPED_REWARD.parent / "sd"),
                        help="the base model whose samples calibrate it; 'none': renders only")
    parser.add_argument("--work-dir", default=None, help="cache of base-model samples (default: <out>-work)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="seconds of everything (smoke run)")
    for name, value in asdict(RewardBuildOptions()).items():
        kind = str if isinstance(value, (tuple, type(None))) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    args = parser.parse_args(argv)
    options = quick_options() if args.quick else RewardBuildOptions()
    overrides = {}
    for name, default in asdict(RewardBuildOptions()).items():
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(default, tuple):
            value = tuple(int(part) for part in value.split(",") if part.strip())
        elif name == "prompt_limit":
            value = int(value)
        overrides[name] = value
    options = replace(options, **overrides)
    model = None if args.model.lower() == "none" else args.model
    summary = build_testbed_reward(model, args.out, args.work_dir or f"{args.out}-work", seed=args.seed, quick=args.quick,
                                   options=options)
    print(json.dumps({key: summary[key] for key in ("heldout_rendered", "heldout_samples", "heldout_x0", "timings")
                      if key in summary}, indent=2))


if __name__ == "__main__":
    main()
