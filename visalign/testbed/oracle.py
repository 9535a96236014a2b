"""The exact oracle: checks an image against a testbed prompt, and scores its quality.

Method, for a batch ``[B, 3, H, W]`` at once:

1. **Background** — the per-channel median of the border pixels.
2. **Colour** — a pixel belongs to an object when its hue is within ``hue_tol`` of a
   palette colour's hue; it is a *core* pixel when its chroma (max − min over RGB) is at
   least ``chroma_min`` and it is at least ``background_tol`` from the background, and an
   *edge* pixel when its chroma is at least ``fringe_min``. Backgrounds are neutral and
   objects saturated, so mixing the two along an edge (anti-aliasing, blur) scales
   chroma and keeps hue: an edge pixel never changes colour, and its chroma over the
   object's full chroma is its *coverage*.
3. **Objects** — connected components (8-neighbourhood) of the core pixels of each
   colour, by min-label propagation with pointer jumping; each edge pixel joins the
   component of its colour next to it. Components whose coverage-weighted area is under
   ``min_area`` of the image are specks and ignored. Count, centroid (coverage-weighted)
   and colour follow.
4. **Shape** — from coverage-weighted complex moments about the centroid,
   ``τ_k = |Σ w (x + iy)^k|``: ``τ_3 / m^2.5`` is 0.0676 for an equilateral triangle and
   0 for a disc or a square; ``τ_4 / m^3`` is 1/60 for a square and 0 for a disc or a
   triangle (``m = Σ w``). Both are unchanged by rotation, scale, and (about the
   centroid) any isotropic blur. Divided by the ideal values they give ``triangleness``
   and ``squareness`` (1 for the ideal shape); a component is a triangle if its
   triangleness is at least ``min_triangleness``, else a square if its squareness is at
   least ``min_squareness``, else a circle. On renders the two read above 0.85 for their
   own shape and below 0.2 for the others.
5. **Check** — :func:`visalign.testbed.prompts.check` on the objects found: the same
   semantics the scene sampler uses (positions by centroid, ``position_margin`` apart).

Quality, in [0, 1], is the mean of three terms: ``inside`` (the share of objects not cut
by the frame), ``crisp`` (per object, 1 while its soft edge is at most
``sharp_edge_width`` pixels wide on average, falling to 0 at ``blurry_edge_width``) and
``clean`` (1 minus the mean distance of non-object pixels from the background over
``clean_scale``). A render scores 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from rewards.base import Reward
from visalign.testbed.prompts import CATEGORIES, POSITION_MARGIN, PromptSpec, check, parse_prompt
from visalign.testbed.render import PALETTE

COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)
# Normalised complex moments of the ideal shapes (see the module docstring).
TRIANGLE_CUBIC = 0.0676
SQUARE_QUARTIC = 1 / 60
# Perimeter over that of the disc of equal area.
PERIMETER_FACTOR = {"circle": 1.0, "square": 2 / math.sqrt(math.pi), "triangle": 3 / (math.sqrt(math.pi) * 3**0.25)}


@dataclass(frozen=True)
class OracleConfig:
    """Tolerances of the oracle; the defaults are exact on renders and lenient on samples."""

    chroma_min: float = 0.2
    fringe_min: float = 0.03
    background_tol: float = 0.15  # RGB distance from the background colour
    hue_tol: float = 30.0  # degrees; the palette's hues are at least 53° apart
    min_area: float = 0.01  # fraction of the image; 10 pixels at 32×32 (the smallest object covers 31)
    min_triangleness: float = 0.4
    min_squareness: float = 0.4
    position_margin: float = POSITION_MARGIN
    partial_coverage: float = 0.15  # a pixel covered less than 1 - this is an edge pixel
    sharp_edge_width: float = 1.5  # pixels; anti-aliasing gives about one
    blurry_edge_width: float = 4.0
    clean_scale: float = 0.2


@dataclass(frozen=True)
class DetectedObject:
    """An object the oracle found. ``x``, ``y`` are its centroid as fractions of the side."""

    shape: str
    colour: str
    x: float
    y: float
    area: float  # coverage-weighted, fraction of the image
    triangleness: float
    squareness: float
    edge_width: float  # pixels: partly covered pixels over the perimeter
    touches_border: bool


@dataclass
class Segmentation:
    """What the oracle sees in a batch of images.

    Attributes:
        background: ``[B, 3]`` background colour estimated from the border.
        labels: ``[B, H, W]`` component per pixel (0: none), specks included.
        object_mask: ``[B, H, W]`` pixels of kept (non-speck) objects, edges included.
        objects: per image, the objects found.
    """

    background: torch.Tensor
    labels: torch.Tensor
    object_mask: torch.Tensor
    objects: list[list[DetectedObject]]


@dataclass
class OracleResult:
    """The oracle's verdict on a batch.

    Attributes:
        correct: ``[B]`` bool, the image shows what the prompt asks.
        quality: ``[B]`` float in [0, 1].
        categories: per image, the prompt's category.
        per_category: accuracy per category present in the batch.
        geneval_score (property): the mean of ``per_category`` -- GenEval's "overall" score, which
            weighs each category equally whatever its number of prompts (``accuracy`` is the
            per-image mean).
        reasons: per image, why it is wrong ("" when correct).
        objects: per image, the objects found.
        recall: which parts of the prompts the images get, whether or not the whole prompt holds:
            ``colour`` (share of named colours found on some object, any shape), ``shape`` (named
            shapes found, any colour) and ``colour_shape`` (named colour-shape pairs found), each
            averaged over the images whose prompts name one (see :func:`attribute_recall`).
    """

    correct: torch.Tensor
    quality: torch.Tensor
    categories: list[str]
    per_category: dict[str, float]
    reasons: list[str]
    objects: list[list[DetectedObject]] = field(repr=False)
    recall: dict[str, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if len(self.correct) else float("nan")

    @property
    def geneval_score(self) -> float:
        return category_mean(self.per_category)


def attribute_recall(specs: Sequence[PromptSpec], objects: Sequence[Sequence[DetectedObject]]) -> dict[str, float]:
    """Per-attribute recall of a batch: for each image, the share of its prompt's named colours,
    shapes and (colour, shape) pairs present among the objects found (counts and relations
    ignored), averaged over the images whose prompt names that kind of attribute; a kind no
    prompt names is left out. It tells which part of prompt following a model lacks (a model that
    draws the named colours as blobs of the wrong shape has high ``colour``, low ``shape``)."""
    sums = {"colour": [0.0, 0], "shape": [0.0, 0], "colour_shape": [0.0, 0]}
    for spec, found in zip(specs, objects):
        named = {"colour": [o.colour for o in spec.objects if o.colour],
                 "shape": [o.shape for o in spec.objects],
                 "colour_shape": [(o.colour, o.shape) for o in spec.objects if o.colour]}
        present = {"colour": {o.colour for o in found}, "shape": {o.shape for o in found},
                   "colour_shape": {(o.colour, o.shape) for o in found}}
        for kind, wanted in named.items():
            if wanted:
                sums[kind][0] += sum(w in present[kind] for w in wanted) / len(wanted)
                sums[kind][1] += 1
    return {kind: total / count for kind, (total, count) in sums.items() if count}


def category_mean(per_category: dict[str, float]) -> float:
    """GenEval's overall score: the unweighted mean of the per-category accuracies."""
    return sum(per_category.values()) / len(per_category) if per_category else float("nan")


# -------------------------------------------------------------------------- colour


def hue_degrees(rgb: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Hue in [0, 360) of RGB values along ``dim``; 0 where chroma is 0."""
    r, g, b = rgb.unbind(dim)
    maxc, argmax = rgb.max(dim)
    chroma = maxc - rgb.min(dim).values
    safe = chroma.clamp_min(1e-8)
    hue = torch.where(
        argmax == 0, ((g - b) / safe) % 6, torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    return torch.where(chroma > 0, hue * 60.0, torch.zeros_like(hue))


_PALETTE_HUE = hue_degrees(torch.tensor([PALETTE[name] for name in COLOUR_NAMES]), dim=1)


def estimate_background(images: torch.Tensor) -> torch.Tensor:
    """Per-channel median of the border pixels: ``[B, 3, H, W] -> [B, 3]``."""
    border = torch.cat(
        [images[:, :, 0, :], images[:, :, -1, :], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], dim=2
    )
    return border.median(dim=2).values


# ---------------------------------------------------------------------- components


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _neighbour(values: torch.Tensor, dy: int, dx: int, fill: int) -> torch.Tensor:
    """``values[b, i + dy, j + dx]`` for ``[B, H, W]`` values, ``fill`` outside the image."""
    padded = F.pad(values, (1, 1, 1, 1), value=fill)
    height, width = values.shape[-2:]
    return padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]


def label_components(colour_index: torch.Tensor) -> torch.Tensor:
    """Connected components (8-neighbourhood) of pixels of equal colour index.

    ``colour_index`` is ``[B, H, W]`` long, -1 for "no colour". Returns ``[B, H, W]`` long
    labels: 0 for no colour, else 1 + the smallest flat pixel index in the component.
    """
    batch, height, width = colour_index.shape
    none = height * width + 1  # larger than any label
    coloured = colour_index >= 0
    links = [(dy, dx, coloured & (_neighbour(colour_index, dy, dx, -1) == colour_index)) for dy, dx in _NEIGHBOURS]
    index = torch.arange(1, height * width + 1).view(1, height, width).expand(batch, -1, -1)
    labels = torch.where(coloured, index, none)
    for _ in range(height * width):
        updated = labels
        for dy, dx, same in links:
            updated = torch.minimum(updated, torch.where(same, _neighbour(labels, dy, dx, none), none))
        # Pointer jumping: a label names a pixel of the same component; taking that
        # pixel's label makes long components converge in a few steps.
        flat = updated.view(batch, height * width)
        jumped = flat.gather(1, (flat - 1).clamp(max=height * width - 1))
        updated = torch.where(coloured, torch.minimum(updated, jumped.view_as(updated)), none)
        if torch.equal(updated, labels):
            break
        labels = updated
    return torch.where(coloured, labels, 0)


def _grow(labels: torch.Tensor, colour_index: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """Give each ``into`` pixel the smallest label of a labelled neighbour of its colour."""
    none = labels.shape[-1] * labels.shape[-2] + 1
    grown = torch.full_like(labels, none)
    for dy, dx in _NEIGHBOURS:
        same = (_neighbour(colour_index, dy, dx, -1) == colour_index) & (_neighbour(labels, dy, dx, 0) > 0)
        grown = torch.minimum(grown, torch.where(same, _neighbour(labels, dy, dx, 0), none))
    return torch.where(into & (grown < none), grown, labels)


def _complex_power(x: torch.Tensor, y: torch.Tensor, power: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of (x + iy)^power."""
    real, imag = torch.ones_like(x), torch.zeros_like(x)
    for _ in range(power):
        real, imag = real * x - imag * y, real * y + imag * x
    return real, imag


def segment(images: torch.Tensor, config: OracleConfig = OracleConfig()) -> Segmentation:
    """Segment ``[B, 3, H, W]`` images in [0, 1] into background and coloured objects."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0, 1)
    batch, _, height, width = images.shape
    n_pixels = height * width
    background = estimate_background(images)
    distance_to_background = (images - background[:, :, None, None]).norm(dim=1)
    chroma = images.max(dim=1).values - images.min(dim=1).values
    hue_gap = (hue_degrees(images, dim=1)[:, None] - _PALETTE_HUE[None, :, None, None]).abs()
    hue_gap = torch.minimum(hue_gap, 360 - hue_gap)  # [B, C, H, W]
    nearest_gap, nearest = hue_gap.min(dim=1)
    palette_hue = nearest_gap <= config.hue_tol
    core = palette_hue & (chroma >= config.chroma_min) & (distance_to_background >= config.background_tol)
    fringe = palette_hue & (chroma >= config.fringe_min) & ~core
    no_colour = torch.full_like(nearest, -1)

    # Components are the cores; an edge pixel (anti-aliased or blurred) joins the
    # component of its colour next to it, so that coverage-weighted moments see it.
    core_labels = label_components(torch.where(core, nearest, no_colour))
    labels = _grow(core_labels, torch.where(core | fringe, nearest, no_colour), fringe)

    flat_labels = labels.view(batch, n_pixels)
    foreground = flat_labels > 0
    key = torch.arange(batch)[:, None] * (n_pixels + 1) + flat_labels
    keys, component = torch.unique(key[foreground], return_inverse=True)
    n_components = len(keys)
    image_of = keys // (n_pixels + 1)

    rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width).expand(batch, -1)[foreground] + 0.5
    cols = torch.arange(width, dtype=torch.float64).repeat(height).expand(batch, -1)[foreground] + 0.5
    pixel_chroma = chroma.view(batch, n_pixels)[foreground].double()

    def total(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_components, dtype=values.dtype).index_add_(0, component, values)

    # Coverage of each pixel: its chroma over the component's full chroma (exact for a
    # render: an edge pixel mixes the object colour with a neutral background).
    # The full chroma is the mean over the pixels within 10% of the brightest, which
    # is the palette chroma on a render and is not carried off by one noisy pixel.
    brightest = torch.zeros(n_components, dtype=torch.float64).scatter_reduce_(0, component, pixel_chroma, "amax")
    interior = (pixel_chroma >= 0.9 * brightest[component]).double()
    full = total(interior * pixel_chroma) / total(interior)
    coverage = (pixel_chroma / full[component]).clamp(0, 1)
    mass = total(coverage)
    centre_y, centre_x = total(coverage * rows) / mass, total(coverage * cols) / mass
    dx, dy = cols - centre_x[component], rows - centre_y[component]
    # |Σ w z^k| is unchanged by rotation and (about the centroid) by any isotropic blur;
    # it vanishes for a disc, and for k = 3 (4) for every shape without 3-fold (4-fold)
    # symmetry, so it reads triangles and squares.
    cubic = torch.stack([total(coverage * part) for part in _complex_power(dx, dy, 3)]).norm(dim=0)
    quartic = torch.stack([total(coverage * part) for part in _complex_power(dx, dy, 4)]).norm(dim=0)
    triangleness = cubic / mass**2.5 / TRIANGLE_CUBIC
    squareness = quartic / mass**3 / SQUARE_QUARTIC
    on_border = (rows < 1) | (rows > height - 1) | (cols < 1) | (cols > width - 1)
    touches = torch.zeros(n_components, dtype=torch.bool).scatter_reduce_(0, component, on_border, "amax")
    colour_of = torch.zeros(n_components, dtype=torch.long).scatter_reduce_(
        0, component, nearest.view(batch, n_pixels)[foreground], "amax"
    )
    partial = total((coverage < 1 - config.partial_coverage).double())
    kept = mass >= config.min_area * n_pixels

    objects: list[list[DetectedObject]] = [[] for _ in range(batch)]
    kept_index = kept.nonzero().flatten()
    columns = zip(
        *(values[kept_index].tolist() for values in (image_of, colour_of, centre_x, centre_y, mass, triangleness, squareness, partial, touches))
    )
    for image, colour, x, y, area, triangle_score, square_score, edge_pixels, touches_border in columns:
        if triangle_score >= config.min_triangleness:
            shape = "triangle"
        elif square_score >= config.min_squareness:
            shape = "square"
        else:
            shape = "circle"
        objects[image].append(
            DetectedObject(
                shape=shape,
                colour=COLOUR_NAMES[colour],
                x=x / width,
                y=y / height,
                area=area / n_pixels,
                triangleness=triangle_score,
                squareness=square_score,
                edge_width=edge_pixels / (2 * math.sqrt(math.pi * area) * PERIMETER_FACTOR[shape]),
                touches_border=touches_border,
            )
        )

    object_mask = torch.zeros(batch * n_pixels, dtype=torch.bool)
    object_mask[foreground.flatten().nonzero().flatten()[kept[component]]] = True
    return Segmentation(background, labels, object_mask.view(batch, height, width), objects)


# ---------------------------------------------------------------------------- oracle


def quality_score(segmentation: Segmentation, images: torch.Tensor, config: OracleConfig = OracleConfig()) -> torch.Tensor:
    """Quality in [0, 1] per image, ``[B]``: mean of ``inside``, ``crisp`` and ``clean``."""
    images = images.detach().float().cpu().clamp(0, 1)
    inside, crisp = [], []
    span = config.blurry_edge_width - config.sharp_edge_width
    for objects in segmentation.objects:
        inside.append(sum(not obj.touches_border for obj in objects) / len(objects) if objects else 0.0)
        crisp.append(
            sum(min(1.0, max(0.0, (config.blurry_edge_width - obj.edge_width) / span)) for obj in objects) / len(objects)
            if objects
            else 0.0
        )
    deviation = (images - segmentation.background[:, :, None, None]).norm(dim=1)
    non_object = (~segmentation.object_mask).float()
    mean_deviation = (deviation * non_object).flatten(1).sum(1) / non_object.flatten(1).sum(1).clamp_min(1)
    clean = (1 - mean_deviation / config.clean_scale).clamp(0, 1)
    return (torch.tensor(inside) + torch.tensor(crisp) + clean) / 3


def oracle(images: torch.Tensor, prompts: Sequence[str], config: OracleConfig = OracleConfig()) -> OracleResult:
    """Check each image against its prompt.

    Args:
        images: ``[B, 3, H, W]`` float in [0, 1].
        prompts: ``B`` testbed prompts (see :mod:`visalign.testbed.prompts`).

    Raises :class:`~visalign.testbed.prompts.PromptParseError` naming any prompt outside
    the grammar.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    specs: list[PromptSpec] = [parse_prompt(prompt) for prompt in prompts]
    segmentation = segment(images, config)
    verdicts = [check(spec, objs, config.position_margin) for spec, objs in zip(specs, segmentation.objects)]
    correct = torch.tensor([ok for ok, _ in verdicts], dtype=torch.bool)
    categories = [spec.category for spec in specs]
    per_category = {
        category: float(correct[[c == category for c in categories]].float().mean())
        for category in CATEGORIES
        if category in categories
    }
    return OracleResult(
        correct=correct,
        quality=quality_score(segmentation, images, config),
        categories=categories,
        per_category=per_category,
        reasons=[reason for _, reason in verdicts],
        objects=segmentation.objects,
        recall=attribute_recall(specs, segmentation.objects),
    )


class OracleReward(Reward):
    """The testbed oracle as a reward: ``reward(images, prompts) -> Tensor[B]``.

    ``mode="correct"`` gives 1.0 where the image shows what its prompt asks and 0.0
    elsewhere (GenEval's score), ``"quality"`` the quality score in [0, 1], and ``"both"``
    ``(1 - quality_weight) * correct + quality_weight * quality``. Not differentiable:
    it reads discrete objects off the pixels.
    """

    name = "testbed-oracle"
    differentiable = False
    modality = "image"
    MODES = ("correct", "quality", "both")

    def __init__(self, mode: str = "correct", quality_weight: float = 0.5, config: OracleConfig | None = None) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown oracle reward mode {mode!r}; expected one of {self.MODES}")
        if not 0.0 <= quality_weight <= 1.0:
            raise ValueError(f"quality_weight must be in [0, 1], got {quality_weight}")
        self.mode = mode
        self.quality_weight = quality_weight
        self.config = config or OracleConfig()
        self._finish_init()

    def forward(self, images: torch.Tensor, prompts: list[str] | None, **context: object) -> torch.Tensor:
        if prompts is None:
            raise ValueError("the testbed oracle needs the prompt of every image; got prompts=None")
        result = oracle(images, prompts, self.config)
        correct = result.correct.float()
        if self.mode == "correct":
            scores = correct
        elif self.mode == "quality":
            scores = result.quality
        else:
            scores = (1 - self.quality_weight) * correct + self.quality_weight * result.quality
        return scores.to(images.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}, quality_weight={self.quality_weight}"
