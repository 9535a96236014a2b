"""Records: the four kinds of training example the data layer produces, and image decoding.

A record holds *sources* for its images, not pixels: a ``PIL.Image``, encoded bytes (JPEG,
PNG, WebP, ...), a file path, or the ``{"bytes": ..., "path": ...}`` dict that a
``datasets.Image`` column yields. Decoding happens in :func:`load_image`, inside the torch
``Dataset`` (and so inside DataLoader workers), where a bad image becomes a
:class:`BadRecordError` that the dataset skips and counts instead of crashing the run.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[Image.Image, bytes, bytearray, memoryview, str, os.PathLike, dict]
"""Anything :func:`load_image` accepts: PIL image, encoded bytes, a path, or a
``datasets.Image``-style dict ``{"bytes": bytes | None, "path": str | None}``."""


@dataclass
class PairRecord:
    """One pairwise preference: ``winner`` was preferred over ``loser`` for ``prompt``.

    ``label`` is the probability that ``winner`` is preferred: 1.0 for a strict
    preference, 0.5 for a tie (kept only when a loader is asked to keep ties).
    """

    prompt: str
    winner: ImageSource
    loser: ImageSource
    label: float = 1.0
    user_id: Any = None


@dataclass
class RankingRecord:
    """``k`` images of one prompt with a score each; higher score means more preferred."""

    prompt: str
    images: list[ImageSource]
    scores: list[float]
    user_id: Any = None


@dataclass
class FeedbackRecord:
    """Binary feedback on one image: ``label`` is 1.0 for good (thumbs up), 0.0 for bad."""

    prompt: str
    image: ImageSource
    label: float
    user_id: Any = None


@dataclass
class CaptionRecord:
    """A captioned image (supervised fine-tuning, pretraining the testbed models)."""

    prompt: str
    image: ImageSource


Record = Union[PairRecord, RankingRecord, FeedbackRecord, CaptionRecord]

RECORD_KINDS: dict[str, type] = {
    "pair": PairRecord,
    "ranking": RankingRecord,
    "feedback": FeedbackRecord,
    "caption": CaptionRecord,
}


class BadRecordError(Exception):
    """A record that cannot be used (missing or corrupt image, null prompt, ...).

    ``category`` is a short stable phrase used for counting ("missing image",
    "corrupt image", "invalid record"); ``detail`` says what exactly was wrong.
    """

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}")
        self.category = category
        self.detail = detail


@dataclass(frozen=True)
class SkippedRecord:
    """A record the dataset skipped: its index in the record table, where it came from
    (file and row or line), why, and the substitute index that filled its slot."""

    index: int
    origin: str
    category: str
    detail: str
    replaced_by: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"record {self.index} ({self.origin}): {self.category}: {self.detail}"


def load_image(source: ImageSource) -> Image.Image:
    """Decode ``source`` into a fully loaded RGB ``PIL.Image``.

    EXIF orientation is applied (a no-op for generated images such as Pick-a-Pic's).
    Images with alpha are converted with ``convert("RGB")`` like the reference DPO trainers.

    Raises:
        BadRecordError: category "missing image" when the source is null or the file does
            not exist; "corrupt image" when decoding fails (truncated file, not an image,
            zero-sized image, decompression bomb).
    """
    if source is None:
        raise BadRecordError("missing image", "image is null")
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return load_image(source["bytes"])
        if source.get("path") is not None:
            return load_image(source["path"])
        raise BadRecordError("missing image", "image dict has neither 'bytes' nor 'path'")

    where = "PIL image"
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise BadRecordError("missing image", "image bytes are empty")
            where = f"image bytes ({len(source)} bytes)"
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, (str, os.PathLike)):
            where = os.fspath(source)
            if not os.path.isfile(where):
                raise BadRecordError("missing image", f"no such file: {where}")
            image = Image.open(where)
        else:
            raise BadRecordError(
                "invalid record", f"image source of type {type(source).__name__} is not supported"
            )
        # Force the decode here: PIL is lazy, and a truncated file only fails on load().
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.width == 0 or image.height == 0:
            raise BadRecordError("corrupt image", f"{where} has size {image.size}")
        return image.convert("RGB")
    except BadRecordError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        if isinstance(error, UnidentifiedImageError):
            message = "not a recognised image format"  # PIL's own text names a BytesIO object
        else:
            message = f"{type(error).__name__}: {error}"
        raise BadRecordError("corrupt image", f"{where}: {message}") from error


# --------------------------------------------------------------------------- clips

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _natural_key(name: str) -> list:
    """``frame_2.png`` before ``frame_10.png``."""
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_video(source: Any, where: str) -> list[Image.Image]:
    """Every frame of a video file or encoded bytes (GIF, animated WebP/PNG through Pillow; MP4,
    WebM, ... through imageio's ffmpeg plugin: ``pip install 'visalign[video]'``)."""
    import imageio.v3 as iio
    import numpy as np

    try:
        frames = iio.imread(source, index=None)
    except Exception as error:  # imageio raises plugin-specific types
        hint = ""
        if "ffmpeg" in str(error).lower() or "plugin" in str(error).lower():
            hint = " (reading MP4/WebM needs imageio-ffmpeg: pip install 'visalign[video]')"
        raise BadRecordError("corrupt clip", f"{where}: {type(error).__name__}: {error}{hint}") from error
    frames = np.asarray(frames)
    if frames.ndim == 2 or (frames.ndim == 3 and frames.shape[-1] in (1, 3, 4)):
        frames = frames[None]  # a still image: one frame
    if frames.ndim == 3:  # [F, H, W] greyscale
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[0] == 0 or 0 in frames.shape[1:3]:
        raise BadRecordError("corrupt clip", f"{where}: decoded to an array of shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise BadRecordError("corrupt clip", f"{where}: frames of dtype {frames.dtype}, expected 8-bit")
    return [Image.fromarray(frame.squeeze(-1) if frame.shape[-1] == 1 else frame).convert("RGB") for frame in frames]


def load_clip(source: Any, num_frames: int | None = None) -> list[Image.Image]:
    """Decode a clip into its RGB frames (``PIL.Image``, all of one size).

    ``source`` is a video file (GIF, animated WebP/PNG; MP4/WebM with imageio-ffmpeg), a folder
    of frame images (taken in natural order: ``2.png`` before ``10.png``), a list of frame
    sources (each as :func:`load_image` takes), encoded bytes, or a ``{"bytes", "path"}`` dict.
    With ``num_frames`` the first ``num_frames`` frames are kept, and a shorter clip is a bad
    record.

    Raises:
        BadRecordError: "missing clip" (null, no such file or folder, a folder without frames),
            "corrupt clip" (undecodable, frames of different sizes), "short clip".
    """
    if source is None:
        raise BadRecordError("missing clip", "clip is null")
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return load_clip(source["bytes"], num_frames)
        if source.get("path") is not None:
            return load_clip(source["path"], num_frames)
        raise BadRecordError("missing clip", "clip dict has neither 'bytes' nor 'path'")
    if isinstance(source, (list, tuple)):
        where = f"list of {len(source)} frames"
        if not source:
            raise BadRecordError("missing clip", "clip has no frames")
        frames = []
        for i, frame in enumerate(source):
            try:
                frames.append(load_image(frame))
            except BadRecordError as error:
                raise BadRecordError(error.category, f"frame {i}: {error.detail}") from error
    elif isinstance(source, (bytes, bytearray, memoryview)):
        where = f"clip bytes ({len(source)} bytes)"
        if len(source) == 0:
            raise BadRecordError("missing clip", "clip bytes are empty")
        frames = _read_video(bytes(source), where)
    elif isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        if os.path.isdir(where):
            names = sorted((n for n in os.listdir(where) if n.lower().endswith(FRAME_SUFFIXES)), key=_natural_key)
            if not names:
                raise BadRecordError("missing clip", f"{where}: a folder with no frame images ({', '.join(FRAME_SUFFIXES)})")
            frames = []
            for name in names:
                try:
                    frames.append(load_image(os.path.join(where, name)))
                except BadRecordError as error:
                    raise BadRecordError("corrupt clip", error.detail) from error
        elif os.path.isfile(where):
            frames = _read_video(where, where)
        else:
            raise BadRecordError("missing clip", f"no such file or folder: {where}")
    else:
        raise BadRecordError("invalid record", f"clip source of type {type(source).__name__} is not supported")
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        raise BadRecordError("corrupt clip", f"{where}: frames of different sizes {sorted(sizes)}")
    if num_frames is not None:
        if len(frames) < num_frames:
            raise BadRecordError("short clip", f"{where}: {len(frames)} frames, num_frames={num_frames} needed")
        frames = frames[:num_frames]
    return frames
