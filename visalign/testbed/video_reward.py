"""The video testbed's learned reward (``rewards.load("testbed-video-reward")``).

A :class:`rewards.LearnedVideoReward` trained with the reward library's Bradley-Terry loss
(:func:`rewards.training.preference_loss`) on oracle-labelled clip pairs of the video testbed:
for a train prompt, a rendered clip the video oracle accepts against one it rejects
(:func:`~visalign.testbed.video.mismatched_clip`: the opposite direction, the other axis, no
motion, the other speed, another subject, a teleport, an identity change, the reverse event),
with up to ``extra_objects`` static distractors. Its prompt side is the testbed's CLIP text
tower (``testbed-clip``, frozen), so the shipped folder holds only the video head.

Agreement with the oracle is measured on pairs of the **held-out** video prompts (subjects with
the image testbed's held-out colour-shape pairs), overall and per mismatch kind.

Build (about 10 minutes on a 2-core CPU)::

    python -m visalign.testbed.video_reward --out assets/testbed/video_reward
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "testbed"
SHIPPED_VIDEO_REWARD = ASSETS / "video_reward"
BUILD_RECORD = "reward_build.json"


@dataclass
class VideoRewardBuildOptions:
    train_pairs: int = 12000         # rendered pairs of train prompts
    steps: int = 4000                # optimisation steps
    batch_size: int = 32             # pairs per step
    lr: float = 3e-3                 # AdamW, warm-up 100 steps then cosine (1e-3 sits on a plateau for ~1,000 steps)
    weight_decay: float = 0.01
    num_frames: int = 8
    extra_objects: int = 1           # up to this many static distractors per clip
    eval_pairs_per_prompt: int = 6   # held-out agreement: pairs per held-out prompt
    text_backbone: str = "testbed-clip"
    width: int = 64
    layers: int = 2
    heads: int = 4
    seed: int = 0


def quick_options() -> VideoRewardBuildOptions:
    return VideoRewardBuildOptions(train_pairs=64, steps=4, batch_size=8, eval_pairs_per_prompt=1)


@dataclass
class ClipPairs:
    """Rendered clip pairs (uint8 ``[N, F, 3, H, W]``), the winner right for its prompt."""

    winners: torch.Tensor
    losers: torch.Tensor
    prompts: list[str]
    kinds: list[str]
    dropped: int = 0  # pairs the oracle did not label winner-right, loser-wrong

    def __len__(self) -> int:
        return len(self.prompts)


def _to_uint8(videos: torch.Tensor) -> torch.Tensor:
    return (videos * 255).round().to(torch.uint8)


def render_clip_pairs(prompts: list[str], count: int, seed: int, num_frames: int = 8, extra_objects: int = 1,
                      chunk: int = 256) -> ClipPairs:
    """``count`` pairs (ground truth vs one mismatch) of prompts drawn from ``prompts``, labelled by
    the video oracle: pairs it does not read as winner-right, loser-wrong are dropped and counted."""
    from .video import clip_for_prompt, mismatch_kinds, mismatched_clip, parse_video_prompt, render_clips, video_oracle

    rng = np.random.default_rng(seed)
    winners, losers, kept_prompts, kinds, dropped = [], [], [], [], 0
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        chosen = [prompts[i] for i in rng.integers(len(prompts), size=size)]
        good, bad, chunk_kinds = [], [], []
        for prompt in chosen:
            extra = int(rng.integers(extra_objects + 1))
            kind_options = mismatch_kinds(parse_video_prompt(prompt).category)
            kind = kind_options[rng.integers(len(kind_options))]
            good.append(clip_for_prompt(prompt, rng, num_frames=num_frames, extra_objects=extra))
            bad.append(mismatched_clip(prompt, rng, kind=kind, num_frames=num_frames, extra_objects=extra))
            chunk_kinds.append(kind)
        good_videos, bad_videos = render_clips(good), render_clips(bad)
        right = video_oracle(good_videos, chosen).correct
        wrong = ~video_oracle(bad_videos, chosen).correct
        keep = (right & wrong).tolist()
        dropped += keep.count(False)
        winners.append(_to_uint8(good_videos[torch.tensor(keep)]))
        losers.append(_to_uint8(bad_videos[torch.tensor(keep)]))
        kept_prompts += [p for p, k in zip(chosen, keep) if k]
        kinds += [kind for kind, k in zip(chunk_kinds, keep) if k]
    return ClipPairs(torch.cat(winners), torch.cat(losers), kept_prompts, kinds, dropped)


_MIRROR = {-1: {"left": "right", "right": "left"}, -2: {"up": "down", "down": "up"}}


def mirror(videos: torch.Tensor, prompts: list[str], dim: int) -> tuple[torch.Tensor, list[str]]:
    """Flip clips ``[..., H, W]`` left-right (``dim=-1``) or upside down (``dim=-2``) and swap the
    direction words of their prompts to match: an exact, label-preserving augmentation (shapes
    and relations of the testbed are symmetric under both flips)."""
    import re

    swap = _MIRROR[dim]
    pattern = re.compile(r"\b(" + "|".join(swap) + r")\b")
    return videos.flip(dim), [pattern.sub(lambda match: swap[match.group(1)], prompt) for prompt in prompts]


def train_video_reward(reward, pairs: ClipPairs, options: VideoRewardBuildOptions, progress: bool = True) -> list[dict]:
    """Bradley-Terry training of ``reward``'s head on ``pairs`` (each batch mirrored left-right and
    upside down at random, see :func:`mirror`); returns per-step metrics."""
    import math

    from tqdm.auto import tqdm

    from rewards.training import preference_loss

    reward.unfreeze()
    reward.text_backbone.requires_grad_(False)
    parameters = [p for name, p in reward.named_parameters() if not name.startswith("text_backbone.")]
    optimizer = torch.optim.AdamW(parameters, lr=options.lr, weight_decay=options.weight_decay)
    warmup = min(100, options.steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, options.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(options.seed)
    history = []
    for step in tqdm(range(options.steps), desc="video reward", disable=not progress):
        rows = torch.randint(len(pairs), (options.batch_size,), generator=generator)
        prompts = [pairs.prompts[i] for i in rows.tolist()]
        videos = torch.cat([pairs.winners[rows], pairs.losers[rows]]).float() / 255
        prompts = prompts + prompts
        for dim in (-1, -2):
            if torch.rand((), generator=generator) < 0.5:
                videos, prompts = mirror(videos, prompts, dim)
        scores = reward(videos, prompts)
        score_w, score_l = scores.chunk(2)
        loss = preference_loss(score_w, score_l, 1.0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"video reward training: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        history.append({"step": step + 1, "loss": loss.item(), "accuracy": float((score_w > score_l).float().mean())})
    reward.freeze()
    return history


@torch.no_grad()
def clip_pair_agreement(reward, pairs: ClipPairs, batch_size: int = 64) -> dict:
    """Share of pairs where ``reward`` scores the oracle's winner higher, overall and per mismatch kind."""
    hits = []
    for start in range(0, len(pairs), batch_size):
        stop = min(start + batch_size, len(pairs))
        prompts = pairs.prompts[start:stop]
        videos = torch.cat([pairs.winners[start:stop], pairs.losers[start:stop]]).float() / 255
        score_w, score_l = reward(videos, prompts + prompts).chunk(2)
        hits += (score_w > score_l).tolist()
    per_kind = defaultdict(list)
    for kind, hit in zip(pairs.kinds, hits):
        per_kind[kind].append(hit)
    return {"overall": round(float(np.mean(hits)), 4), "pairs": len(hits),
            "per_kind": {kind: round(float(np.mean(values)), 3) for kind, values in sorted(per_kind.items())}}


def build_testbed_video_reward(destination: str | os.PathLike = SHIPPED_VIDEO_REWARD,
                               options: VideoRewardBuildOptions | None = None, progress: bool = True) -> dict:
    """Render pairs, train, measure held-out agreement, and save the reward to ``destination``
    (``reward.json``, ``video_reward.safetensors`` in fp16, ``reward_build.json``)."""
    from rewards.video import build_learned_video_reward

    from .video import video_prompts

    options = options or VideoRewardBuildOptions()
    torch.manual_seed(options.seed)
    timings = {}
    started = time.perf_counter()
    train_prompts = [spec.text for spec in video_prompts("train")]
    heldout_prompts = [spec.text for spec in video_prompts("heldout")]
    train = render_clip_pairs(train_prompts, options.train_pairs, options.seed, options.num_frames, options.extra_objects)
    heldout = render_clip_pairs(heldout_prompts, options.eval_pairs_per_prompt * len(heldout_prompts), options.seed + 1,
                                options.num_frames, options.extra_objects)
    timings["render_s"] = round(time.perf_counter() - started, 1)
    reward = build_learned_video_reward(text_backbone=options.text_backbone, width=options.width, layers=options.layers,
                                        heads=options.heads)
    before = clip_pair_agreement(reward, heldout)
    started = time.perf_counter()
    history = train_video_reward(reward, train, options, progress)
    timings["train_s"] = round(time.perf_counter() - started, 1)
    destination = Path(destination)
    reward.save_pretrained(destination, dtype=torch.float16)
    reloaded = load_testbed_video_reward(destination)  # the figures are those of the shipped fp16 weights
    last = history[-min(50, len(history)):]
    summary = {
        "reward": "learned-video",
        "options": asdict(options),
        "pairs": {"train": len(train), "heldout": len(heldout), "dropped_by_oracle": train.dropped + heldout.dropped},
        "heldout_agreement": clip_pair_agreement(reloaded, heldout),
        "heldout_agreement_untrained": before["overall"],
        "train_agreement": clip_pair_agreement(reloaded, replace(train, winners=train.winners[:1000], losers=train.losers[:1000],
                                                                 prompts=train.prompts[:1000], kinds=train.kinds[:1000]))["overall"],
        "final_train_loss": round(float(np.mean([row["loss"] for row in last])), 4),
        "timings": timings,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
    }
    (destination / BUILD_RECORD).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_testbed_video_reward(model: str | os.PathLike | None = None):
    """The shipped learned video reward (``assets/testbed/video_reward``) or a folder built by
    :func:`build_testbed_video_reward`."""
    from rewards.registry import load_pretrained

    folder = Path(model) if model is not None else SHIPPED_VIDEO_REWARD
    if not (folder / "reward.json").is_file():
        raise FileNotFoundError(f"no testbed video reward at {folder}: build it with "
                                f"`python -m visalign.testbed.video_reward --out {folder}`")
    return load_pretrained(folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train the video testbed's learned reward on oracle-labelled clip pairs.")
    parser.add_argument("--out", default=str(SHIPPED_VIDEO_REWARD))
    parser.add_argument("--quick", action="store_true", help="a few steps (smoke run)")
    for name, value in asdict(VideoRewardBuildOptions()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args(argv)
    options = quick_options() if args.quick else VideoRewardBuildOptions()
    overrides = {name: getattr(args, name) for name in asdict(options) if getattr(args, name) is not None}
    summary = build_testbed_video_reward(args.out, replace(options, **overrides))
    print(json.dumps({key: summary[key] for key in ("pairs", "heldout_agreement", "heldout_agreement_untrained",
                                                    "train_agreement", "timings")}, indent=2))


if __name__ == "__main__":
    main()
