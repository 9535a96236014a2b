"""The video testbed: short clips of the testbed's shapes moving, their prompts, and an exact oracle.

A clip is a sequence of :class:`~visalign.testbed.render.Scene` frames rendered by
:func:`~visalign.testbed.render.render`; the oracle segments every frame with
:func:`~visalign.testbed.oracle.segment` and reasons over the tracks it finds. Nothing about
shapes, colours or pixels is re-implemented here.

Prompts (lower case; a trailing full stop is forgiven)::

    video_prompt := phrase " moving " direction [" " speed] | phrase " appearing" | phrase " disappearing"
    phrase       := "a" [" " colour] " " shape          (the image grammar's one-object phrases)
    direction    := "left" | "right" | "up" | "down"
    speed        := "slowly" | "quickly"

==================  ==================================  =============================================
category            example                             holds when the clip shows
==================  ==================================  =============================================
``direction``       "a red circle moving left"          one such object in every frame, travelling left
``speed``           "a blue square moving up quickly"   ... and at the named speed
``appearing``       "a green triangle appearing"        absent in the first frame, present from some frame on
``disappearing``    "a yellow square disappearing"      present in the first frame, absent from some frame on
==================  ==================================  =============================================

The oracle also checks **identity** (one matching object per frame, whose colour and size do
not change) and **temporal smoothness** (no teleports: the frame-to-frame velocity changes by
at most ``max_jerk``; no step backwards along the motion). Rendered motion has constant
velocity; its smoothness score (1 minus the mean jerk over ``jerk_scale``) is above 0.9, the
rest being centroid quantisation (the renderer's 4x4 supersampling puts edges on a 1/128 grid).
A half-way teleport of 0.1 of the side scores about 0.67.

Speeds are fractions of the frame side per frame: ``slowly`` in [0.015, 0.025] (about half a
pixel a frame at 32 px), ``quickly`` in [0.045, 0.06]; a bare "moving" draws from the whole
range. The oracle's split between the two is 0.035. Objects are smaller than in the image
testbed (equal-area radius 0.08–0.13) so that a fast one stays in the frame for 8 frames.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from rewards.base import Reward
from visalign.testbed.oracle import DetectedObject, OracleConfig, quality_score, segment
from visalign.testbed.prompts import (
    COLOURS,
    SHAPES,
    ObjectSpec,
    PromptParseError,
    PromptSpec,
    is_heldout,
    matching,
    parse_prompt,
)
from visalign.testbed.render import (
    BACKGROUNDS,
    CIRCUMRADIUS,
    FRAME_MARGIN,
    ROTATION_PERIOD,
    Rng,
    Scene,
    SceneObject,
    _rng,
    render,
    well_separated,
)

NUM_FRAMES = 8
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS: dict[str, tuple[float, float]] = {"slowly": (0.015, 0.025), "quickly": (0.045, 0.06)}
ANY_SPEED = (0.015, 0.06)
EVENTS = ("appearing", "disappearing")
VIDEO_CATEGORIES: tuple[str, ...] = ("direction", "speed", "appearing", "disappearing")
VIDEO_SIZE_RANGE = (0.08, 0.13)
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
JUMP = 0.1  # the teleport of a "jump" mismatch, a fraction of the side
_PERPENDICULAR = {"left": ("up", "down"), "right": ("up", "down"), "up": ("left", "right"), "down": ("left", "right")}


# --------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class VideoPromptSpec:
    """A parsed video prompt: one object (``subject``) and what it does."""

    category: str
    subject: ObjectSpec
    direction: str | None = None
    speed: str | None = None

    @property
    def text(self) -> str:
        phrase = self.subject.text()
        if self.category in EVENTS:
            return f"{phrase} {self.category}"
        return f"{phrase} moving {self.direction}" + (f" {self.speed}" if self.speed else "")

    @property
    def image_spec(self) -> PromptSpec:
        """The one-object image prompt of the subject (what each frame shows)."""
        return PromptSpec("colors" if self.subject.colour else "single_object", (self.subject,))


_VIDEO_PROMPT = re.compile(
    r"^(?P<phrase>.+?) (?:moving (?P<direction>left|right|up|down)(?: (?P<speed>slowly|quickly))?|(?P<event>appearing|disappearing))$"
)


def parse_video_prompt(text: str) -> VideoPromptSpec:
    """Parse a video prompt; the inverse of :attr:`VideoPromptSpec.text`.

    Raises :class:`~visalign.testbed.prompts.PromptParseError` naming the prompt otherwise.
    """
    if not isinstance(text, str):
        raise PromptParseError(f"a prompt must be a string, got {type(text).__name__}: {text!r}")
    prompt = " ".join(text.lower().strip().rstrip(".").split())
    match = _VIDEO_PROMPT.match(prompt)
    if match is None:
        raise PromptParseError(
            f"cannot parse video prompt {text!r}: expected '<a [colour] shape> moving <left|right|up|down> "
            f"[slowly|quickly]' or '<a [colour] shape> <appearing|disappearing>'"
        )
    image = parse_prompt(match["phrase"])
    if image.category not in ("single_object", "colors"):
        raise PromptParseError(f"video prompt {text!r} must name one object ('a [colour] shape'), got {match['phrase']!r}")
    subject = image.objects[0]
    if match["event"]:
        return VideoPromptSpec(match["event"], subject)
    return VideoPromptSpec("speed" if match["speed"] else "direction", subject, match["direction"], match["speed"])


def all_video_prompts() -> list[VideoPromptSpec]:
    """Every video prompt, in a fixed order: 15 subjects x 14 motions."""
    subjects = [ObjectSpec(shape) for shape in SHAPES] + [ObjectSpec(shape, colour) for colour in COLOURS for shape in SHAPES]
    specs = []
    for subject in subjects:
        specs += [VideoPromptSpec("direction", subject, direction) for direction in DIRECTIONS]
        specs += [VideoPromptSpec("speed", subject, direction, speed) for direction in DIRECTIONS for speed in SPEEDS]
        specs += [VideoPromptSpec(event, subject) for event in EVENTS]
    return specs


def video_prompts(split: str = "train") -> list[VideoPromptSpec]:
    """The train or held-out video prompts. Held out: subjects with a held-out (colour, shape) pair
    of the image testbed; colour-free subjects have no pair to hold out and are in both."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown prompt split {split!r}; expected 'train' or 'heldout'")
    chosen = []
    for spec in all_video_prompts():
        if spec.subject.colour is None or is_heldout(spec.image_spec) == (split == "heldout"):
            chosen.append(spec)
    return chosen


# ---------------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class Clip:
    """A clip: one scene per frame, and the opacity of each scene's first object (the subject)
    per frame, 1 except while it appears or disappears."""

    frames: tuple[Scene, ...]
    opacity: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", tuple(self.frames))
        object.__setattr__(self, "opacity", tuple(float(a) for a in self.opacity))
        if len(self.frames) != len(self.opacity):
            raise ValueError(f"a clip needs one opacity per frame, got {len(self.frames)} frames and {len(self.opacity)}")


def render_clip(clip: Clip, size: int = 32, supersample: int = 4) -> torch.Tensor:
    """Render a clip to ``[F, 3, size, size]`` in [0, 1]. A partly transparent subject is the
    blend of the frame with and without it (exact: objects never overlap)."""
    frames = []
    for scene, alpha in zip(clip.frames, clip.opacity):
        full = render(scene, size, supersample)
        if alpha < 1:
            without = render(replace(scene, objects=scene.objects[1:]), size, supersample)
            full = alpha * full + (1 - alpha) * without
        frames.append(full)
    return torch.stack(frames)


def render_clips(clips: Sequence[Clip], size: int = 32, supersample: int = 4) -> torch.Tensor:
    """Render clips to ``[N, F, 3, size, size]`` in [0, 1]."""
    return torch.stack([render_clip(clip, size, supersample) for clip in clips])


def _subject(spec: VideoPromptSpec, rng: np.random.Generator, colour: str | None = None, shape: str | None = None) -> SceneObject:
    size = float(rng.uniform(*VIDEO_SIZE_RANGE))
    shape = shape or spec.subject.shape
    colour = colour or spec.subject.colour or COLOURS[rng.integers(len(COLOURS))]
    return SceneObject(shape, colour, 0.5, 0.5, size, float(rng.uniform(0, ROTATION_PERIOD[shape])))


def _path(obj: SceneObject, direction: str | None, speed: float, num_frames: int, rng: np.random.Generator,
          jump: float = 0.0) -> list[tuple[float, float]]:
    """Centres of a straight constant-velocity path that keeps ``obj`` inside the frame (with
    ``jump``, a teleport that far along the motion half-way)."""
    low, high = FRAME_MARGIN + obj.reach, 1 - FRAME_MARGIN - obj.reach
    if direction is None:
        x, y = rng.uniform(low, high, size=2)
        return [(float(x), float(y))] * num_frames
    dx, dy = DIRECTIONS[direction]
    travel = speed * (num_frames - 1) + jump
    if high - low < travel:
        raise ValueError(f"a path of {travel:.2f} ({num_frames} frames) does not fit a {obj.shape} of size {obj.size:.2f} "
                         f"in the frame; clips of up to 9 frames fit every speed")
    along = rng.uniform(low + travel * (dx < 0 or dy < 0), high - travel * (dx > 0 or dy > 0))
    across = rng.uniform(low, high)
    start = (along, across) if dx else (across, along)
    offsets = [speed * f + (jump if f >= num_frames // 2 else 0.0) for f in range(num_frames)]
    return [(float(start[0] + dx * offset), float(start[1] + dy * offset)) for offset in offsets]


def _opacity(event: str | None, num_frames: int, rng: np.random.Generator) -> list[float]:
    """Opacity per frame: 1 throughout, or a ramp of 1–2 frames starting somewhere inside the clip."""
    if event is None:
        return [1.0] * num_frames
    ramp = int(rng.integers(1, 3)) if num_frames >= 4 else 1
    start = int(rng.integers(1, num_frames - ramp + 1))  # the first frame with opacity > 0
    appear = [min(1.0, max(0.0, (f - start + 1) / ramp)) for f in range(num_frames)]
    return appear if event == "appearing" else appear[::-1]


def _distractors(subject_path: list[SceneObject], spec: VideoPromptSpec, count: int, rng: np.random.Generator,
                 tries: int = 50) -> list[SceneObject]:
    """Static objects that the prompt's phrase does not match, apart from the subject in every frame."""
    placed: list[SceneObject] = []
    for _ in range(count):
        for _ in range(tries):
            shape, colour = SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))]
            if matching([SceneObject(shape, colour, 0.5, 0.5, 0.1)], spec.subject):
                continue
            size = float(rng.uniform(*VIDEO_SIZE_RANGE))
            reach = size * CIRCUMRADIUS[shape]
            x, y = rng.uniform(FRAME_MARGIN + reach, 1 - FRAME_MARGIN - reach, size=2)
            candidate = SceneObject(shape, colour, float(x), float(y), size, float(rng.uniform(0, ROTATION_PERIOD[shape])))
            if all(well_separated(Scene((obj, *placed, candidate))) for obj in subject_path):
                placed.append(candidate)
                break
    return placed


def clip_for_prompt(prompt: str | VideoPromptSpec, rng: Rng = None, num_frames: int = NUM_FRAMES, extra_objects: int = 0,
                    background: str | None = None) -> Clip:
    """A random clip that satisfies ``prompt`` (ground truth), with up to ``extra_objects`` static
    distractors that the prompt's phrase does not match."""
    spec = parse_video_prompt(prompt) if isinstance(prompt, str) else prompt
    return _build_clip(spec, _rng(rng), num_frames, extra_objects, background)


def _build_clip(spec: VideoPromptSpec, rng: np.random.Generator, num_frames: int, extra_objects: int,
                background: str | None, subject: SceneObject | None = None, speed: float | None = None,
                jump: float = 0.0) -> Clip:
    if num_frames < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {num_frames}")
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    subject = subject or _subject(spec, rng)
    if speed is None:
        speed = float(rng.uniform(*(SPEEDS[spec.speed] if spec.speed else ANY_SPEED)))
    centres = _path(subject, spec.direction, speed, num_frames, rng, jump)
    path = [replace(subject, x=x, y=y) for x, y in centres]
    others = tuple(_distractors(path, spec, extra_objects, rng))
    opacity = _opacity(spec.category if spec.category in EVENTS else None, num_frames, rng)
    return Clip(tuple(Scene((obj, *others), background) for obj in path), opacity)


def mismatch_kinds(category: str) -> tuple[str, ...]:
    """The ways :func:`mismatched_clip` can make a clip wrong for a prompt of ``category``."""
    moving = ("direction", "axis", "static", "subject", "jump", "identity")
    return {
        "direction": moving,
        "speed": moving + ("speed",),
        "appearing": ("reverse", "static", "subject"),
        "disappearing": ("reverse", "static", "subject"),
    }[category]


def mismatched_clip(prompt: str | VideoPromptSpec, rng: Rng = None, kind: str | None = None, num_frames: int = NUM_FRAMES,
                    extra_objects: int = 0, background: str | None = None) -> Clip:
    """A random clip that is deliberately wrong for ``prompt`` in one way (``kind``, one of
    :func:`mismatch_kinds`, drawn when None):

    - ``direction``: moves the opposite way; ``axis``: moves along the other axis;
      ``static``: does not move (or, for events, is there all along); ``speed``: the other speed;
    - ``subject``: another shape (or colour) does what the prompt says;
    - ``jump``: teleports half-way (right direction, not smooth);
    - ``identity``: changes colour (shape, for colour-free phrases) half-way;
    - ``reverse``: disappears instead of appearing, or the other way round.
    """
    spec = parse_video_prompt(prompt) if isinstance(prompt, str) else prompt
    rng = _rng(rng)
    kinds = mismatch_kinds(spec.category)
    kind = kind or kinds[rng.integers(len(kinds))]
    if kind not in kinds:
        raise ValueError(f"mismatch kind {kind!r} does not apply to {spec.category} prompt {spec.text!r}; expected one of {kinds}")
    build = dict(rng=rng, num_frames=num_frames, extra_objects=extra_objects, background=background)
    if kind == "direction":
        return _build_clip(replace(spec, direction=_OPPOSITE[spec.direction]), **build)
    if kind == "axis":
        options = _PERPENDICULAR[spec.direction]
        return _build_clip(replace(spec, direction=options[rng.integers(2)]), **build)
    if kind == "static":
        return _build_clip(VideoPromptSpec("direction", spec.subject), speed=0.0, **build)
    if kind == "speed":
        return _build_clip(replace(spec, speed="slowly" if spec.speed == "quickly" else "quickly"), **build)
    if kind == "reverse":
        return _build_clip(replace(spec, category="disappearing" if spec.category == "appearing" else "appearing"), **build)
    if kind == "subject":
        if spec.subject.colour is not None and rng.integers(2):
            wrong = replace(spec.subject, colour=[c for c in COLOURS if c != spec.subject.colour][rng.integers(3)])
        else:
            wrong = replace(spec.subject, shape=[s for s in SHAPES if s != spec.subject.shape][rng.integers(2)])
        return _build_clip(replace(spec, subject=wrong), **build)
    if kind == "jump":  # right direction, but a teleport half-way (a small subject, so a fast path still fits)
        subject = replace(_subject(spec, rng), size=float(rng.uniform(VIDEO_SIZE_RANGE[0], 0.1)))
        return _build_clip(spec, subject=subject, jump=JUMP, **build)
    clip = _build_clip(spec, **build)  # identity: the subject turns into another colour / shape half-way
    half = num_frames // 2
    first = clip.frames[0].objects[0]
    if spec.subject.colour is not None:
        change = {"colour": [c for c in COLOURS if c != first.colour][rng.integers(3)]}
    else:
        change = {"shape": [s for s in SHAPES if s != first.shape][rng.integers(2)]}
    frames = list(clip.frames[:half]) + [_with_subject(scene, replace(scene.objects[0], **change)) for scene in clip.frames[half:]]
    return replace(clip, frames=tuple(frames))


def _with_subject(scene: Scene, subject: SceneObject) -> Scene:
    return replace(scene, objects=(subject, *scene.objects[1:]))


# --------------------------------------------------------------------------------- oracle


@dataclass(frozen=True)
class VideoOracleConfig:
    """Tolerances of the video oracle (fractions of the frame side, per frame where it says so);
    ``image`` holds the per-frame oracle's."""

    image: OracleConfig = OracleConfig()
    min_speed: float = 0.008  # per frame along the motion: slower is "not moving"
    speed_split: float = 0.035  # per frame: below is "slowly", above "quickly"
    max_jerk: float = 0.02  # largest change of the frame-to-frame displacement
    max_backstep: float = 0.006  # largest step against the direction of motion
    max_static_drift: float = 0.03  # how far an appearing / disappearing object may wander
    max_area_ratio: float = 1.5  # largest / smallest area of the tracked object
    jerk_scale: float = 0.1  # mean jerk at which the smoothness score reaches 0


@dataclass
class VideoOracleResult:
    """The video oracle's verdict on a batch of clips.

    Attributes:
        correct: ``[B]`` bool, the clip shows what its prompt asks.
        smoothness: ``[B]`` in [0, 1]: 1 minus the tracked object's mean jerk over ``jerk_scale``
            (0 when the object flickers in and out or is never found).
        quality: ``[B]`` the image oracle's quality, averaged over frames that show an object.
        categories, per_category, reasons: as for images.
        tracks: per clip, per frame, the detected objects matching the prompt's phrase.
    """

    correct: torch.Tensor
    smoothness: torch.Tensor
    quality: torch.Tensor
    categories: list[str]
    per_category: dict[str, float]
    reasons: list[str]
    tracks: list[list[list[DetectedObject]]] = field(repr=False)

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if len(self.correct) else float("nan")


def _direction_name(dx: float, dy: float) -> str:
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _smoothness(positions: list[tuple[float, float]], config: VideoOracleConfig) -> tuple[float, float]:
    """(mean, max) change of the frame-to-frame displacement over consecutive present frames."""
    if len(positions) < 3:
        return 0.0, 0.0
    points = np.asarray(positions)
    jerk = np.linalg.norm(np.diff(points, n=2, axis=0), axis=1)
    return float(jerk.mean()), float(jerk.max())


def _check_motion(spec: VideoPromptSpec, track: list[list[DetectedObject]], config: VideoOracleConfig) -> tuple[bool, str, float]:
    """Verdict, reason and smoothness of a moving-object clip."""
    for index, found in enumerate(track):
        if len(found) != 1:
            what = spec.subject.text().removeprefix("a ")
            return False, (f"no {what} in frame {index}" if not found else f"{len(found)} objects match {what!r} in frame {index}"), 0.0
    objects = [found[0] for found in track]
    mean_jerk, max_jerk = _smoothness([(o.x, o.y) for o in objects], config)
    smooth = max(0.0, 1.0 - mean_jerk / config.jerk_scale)
    if len({o.colour for o in objects}) > 1:
        return False, f"the object changes colour ({', '.join(dict.fromkeys(o.colour for o in objects))})", smooth
    areas = [o.area for o in objects]
    if max(areas) > config.max_area_ratio * min(areas):
        return False, f"the object changes size ({min(areas):.3f} to {max(areas):.3f} of the frame)", smooth
    frames = len(objects)
    dx, dy = objects[-1].x - objects[0].x, objects[-1].y - objects[0].y
    ux, uy = DIRECTIONS[spec.direction]
    along = (dx * ux + dy * uy) / (frames - 1)
    across = abs(dx * uy - dy * ux) / (frames - 1)
    if max(abs(along), across) < config.min_speed:
        return False, f"the object does not move (expected it moving {spec.direction})", smooth
    if along < config.min_speed or across >= along:
        return False, f"the object moves {_direction_name(dx, dy)}, expected {spec.direction}", smooth
    if max_jerk > config.max_jerk:
        return False, f"the motion is not smooth (a jump of {max_jerk:.3f} of the frame)", smooth
    steps = [(b.x - a.x) * ux + (b.y - a.y) * uy for a, b in zip(objects, objects[1:])]
    if min(steps) < -config.max_backstep:
        return False, f"the object steps back against its motion ({min(steps):.3f})", smooth
    if spec.speed is not None:
        observed = "quickly" if along >= config.speed_split else "slowly"
        if observed != spec.speed:
            return False, f"the object moves {observed} ({along:.3f} of the frame per frame), expected {spec.speed}", smooth
    return True, "", smooth


def _check_event(spec: VideoPromptSpec, track: list[list[DetectedObject]], config: VideoOracleConfig) -> tuple[bool, str, float]:
    """Verdict, reason and smoothness of an appearing / disappearing clip."""
    what = spec.subject.text().removeprefix("a ")
    for index, found in enumerate(track):
        if len(found) > 1:
            return False, f"{len(found)} objects match {what!r} in frame {index}", 0.0
    present = [bool(found) for found in track]
    switches = sum(a != b for a, b in zip(present, present[1:]))
    objects = [found[0] for found in track if found]
    positions = [(o.x, o.y) for o in objects]
    drift = max((math.dist(p, q) for p in positions for q in positions), default=0.0)
    smooth = 0.0 if switches > 1 or not objects else max(0.0, 1.0 - _smoothness(positions, config)[0] / config.jerk_scale)
    first, last = (present[0], present[-1]) if spec.category == "appearing" else (present[-1], present[0])
    verb = "appears" if spec.category == "appearing" else "disappears"
    if not any(present):
        return False, f"no {what} in any frame", smooth
    if first or not last:
        if all(present):
            return False, f"the {what} is there all along (expected it {spec.category})", smooth
        other = "disappears" if verb == "appears" else "appears"
        return False, f"the {what} {other} (expected it {spec.category})", smooth
    if switches > 1:
        return False, f"the {what} flickers in and out ({switches} changes)", smooth
    if len({o.colour for o in objects}) > 1:
        return False, "the object changes colour", smooth
    if drift > config.max_static_drift:
        return False, f"the {what} moves while it {verb} ({drift:.3f} of the frame)", smooth
    return True, "", smooth


def video_oracle(videos: torch.Tensor, prompts: Sequence[str], config: VideoOracleConfig = VideoOracleConfig()) -> VideoOracleResult:
    """Check each clip ``[B, F, 3, H, W]`` in [0, 1] against its video prompt.

    Every frame is segmented by the image oracle (:func:`~visalign.testbed.oracle.segment`, all
    frames in one batch); the objects matching the prompt's phrase form the track the verdict
    reads. Raises :class:`~visalign.testbed.prompts.PromptParseError` naming a bad prompt.
    """
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"expected clips [B, F, 3, H, W], got shape {tuple(videos.shape)}")
    if len(prompts) != len(videos):
        raise ValueError(f"got {len(videos)} clips but {len(prompts)} prompts")
    if videos.shape[1] < 2:
        raise ValueError("the video oracle needs clips of at least 2 frames")
    specs = [parse_video_prompt(prompt) for prompt in prompts]
    batch, frames = videos.shape[:2]
    flat = videos.detach().flatten(0, 1)
    segmentation = segment(flat, config.image)
    frame_quality = quality_score(segmentation, flat, config.image).view(batch, frames)
    has_objects = torch.tensor([bool(objs) for objs in segmentation.objects]).view(batch, frames).float()
    quality = (frame_quality * has_objects).sum(1) / has_objects.sum(1).clamp_min(1)
    verdicts, tracks = [], []
    for index, spec in enumerate(specs):
        track = [matching(segmentation.objects[index * frames + f], spec.subject) for f in range(frames)]
        tracks.append(track)
        check = _check_event if spec.category in EVENTS else _check_motion
        verdicts.append(check(spec, track, config))
    correct = torch.tensor([ok for ok, _, _ in verdicts], dtype=torch.bool)
    categories = [spec.category for spec in specs]
    per_category = {
        category: float(correct[[c == category for c in categories]].float().mean())
        for category in VIDEO_CATEGORIES
        if category in categories
    }
    return VideoOracleResult(
        correct=correct,
        smoothness=torch.tensor([smooth for _, _, smooth in verdicts], dtype=torch.float32),
        quality=quality,
        categories=categories,
        per_category=per_category,
        reasons=[reason for _, reason, _ in verdicts],
        tracks=tracks,
    )


class VideoOracleReward(Reward):
    """The video oracle as a reward on clips ``[B, F, 3, H, W]``: ``mode="correct"`` (1/0),
    ``"smoothness"`` (in [0, 1]) or ``"both"`` (``(1 - smoothness_weight) * correct +
    smoothness_weight * smoothness``). Not differentiable."""

    name = "testbed-video-oracle"
    differentiable = False
    modality = "video"
    MODES = ("correct", "smoothness", "both")

    def __init__(self, mode: str = "correct", smoothness_weight: float = 0.5, config: VideoOracleConfig | None = None) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown video oracle reward mode {mode!r}; expected one of {self.MODES}")
        if not 0.0 <= smoothness_weight <= 1.0:
            raise ValueError(f"smoothness_weight must be in [0, 1], got {smoothness_weight}")
        self.mode = mode
        self.smoothness_weight = smoothness_weight
        self.config = config or VideoOracleConfig()
        self._finish_init()

    def forward(self, images: torch.Tensor, prompts: list[str] | None, **context: object) -> torch.Tensor:
        if prompts is None:
            raise ValueError("the video oracle needs the prompt of every clip; got prompts=None")
        result = video_oracle(images, prompts, self.config)
        correct = result.correct.float()
        if self.mode == "correct":
            scores = correct
        elif self.mode == "smoothness":
            scores = result.smoothness
        else:
            scores = (1 - self.smoothness_weight) * correct + self.smoothness_weight * result.smoothness
        return scores.to(images.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}, smoothness_weight={self.smoothness_weight}"


__all__ = [
    "Clip",
    "DIRECTIONS",
    "NUM_FRAMES",
    "SPEEDS",
    "VIDEO_CATEGORIES",
    "VideoOracleConfig",
    "VideoOracleResult",
    "VideoOracleReward",
    "VideoPromptSpec",
    "all_video_prompts",
    "clip_for_prompt",
    "mismatch_kinds",
    "mismatched_clip",
    "parse_video_prompt",
    "render_clip",
    "render_clips",
    "video_oracle",
    "video_prompts",
]
