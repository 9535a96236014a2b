"""Saving generated images (PNG files, labelled grids, MP4/GIF clips) and reading clips back."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor


def slugify(text: str, max_length: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_length] or "prompt"


def save_png(image: Tensor, path: str | os.PathLike) -> Path:
    """Save one image ``[3, H, W]`` in [0, 1] as PNG."""
    from .models.base import to_pil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image.unsqueeze(0))[0].save(path)
    return path


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int, upscale: int = 1) -> Path:
    """Save ``[N, 3, H, W]`` images in [0, 1] as one grid PNG with ``nrow`` images per row.

    ``upscale`` enlarges small images (nearest neighbour) so a 32 px testbed grid is readable.
    """
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, pad_value=1.0)
    if upscale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=upscale, mode="nearest")[0]
    return save_png(grid, path)


def save_labelled_grid(
    images: Tensor, labels: Sequence[str], path: str | os.PathLike, per_row: int, cell_inches: float = 1.2
) -> Path:
    """A grid with one row per label (e.g. a prompt), ``per_row`` images each, drawn with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(labels)
    figure, axes = plt.subplots(rows, per_row, figsize=(per_row * cell_inches + 2.5, rows * cell_inches), squeeze=False)
    pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for row in range(rows):
        for col in range(per_row):
            axis = axes[row][col]
            index = row * per_row + col
            if index < len(pixels):
                axis.imshow(pixels[index], interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row][0].set_ylabel(labels[row], rotation=0, ha="right", va="center", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# -------------------------------------------------------------------------------- video

VIDEO_FORMATS = ("mp4", "gif", "both")


def save_video(video: Tensor, path: str | os.PathLike, fps: int = 8) -> Path:
    """Save one clip ``[F, 3, H, W]`` in [0, 1] as ``.mp4`` (H.264 through imageio-ffmpeg) or
    ``.gif``, by the file's suffix."""
    from .models.base import to_pil

    path = Path(path)
    if video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(f"save_video expects a clip [F, 3, H, W], got shape {tuple(video.shape)}")
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise ImportError("saving video needs imageio: pip install 'visalign[video]'") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [frame for frame in (video.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")]
    if path.suffix == ".gif":
        # PIL writes the GIF: imageio's pillow plugin takes the frame time in milliseconds.
        pictures = to_pil(video)
        pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=round(1000 / fps), loop=0)
    elif path.suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ImportError("writing MP4 needs imageio-ffmpeg: pip install 'visalign[video]' (or video_format=gif)") from None
        # macro_block_size=1: keep the frame size (small testbed clips) instead of padding to 16.
        imageio.mimwrite(path, frames, fps=fps, codec="libx264", macro_block_size=1, quality=8)
    else:
        raise ValueError(f"video files are .mp4 or .gif, got {path.name!r}")
    return path


VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".avi")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_video(source: str | os.PathLike) -> Tensor:
    """Read a clip as ``[F, 3, H, W]`` float in [0, 1]: an ``.mp4``/``.gif``/``.webm``/``.mov``/``.avi``
    file (imageio; MP4 needs imageio-ffmpeg) or a folder of frame images taken in name order.

    A missing, empty or unreadable source raises ``ValueError`` naming it.
    """
    import numpy as np
    from PIL import Image

    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"clip folder {path} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        try:
            frames = [np.asarray(Image.open(file).convert("RGB")) for file in files]
        except OSError as error:
            raise ValueError(f"clip folder {path}: unreadable frame ({error})") from None
        if len({frame.shape for frame in frames}) > 1:
            raise ValueError(f"clip folder {path}: frames differ in size")
        array = np.stack(frames)
    elif path.is_file():
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"{path}: not a video file ({', '.join(VIDEO_SUFFIXES)}) or a folder of frames")
        try:
            import imageio.v3 as iio
        except ImportError:
            raise ImportError("reading video needs imageio: pip install 'visalign[video]'") from None
        try:
            array = np.asarray(iio.imread(path, index=None))
        except Exception as error:  # imageio raises plugin-specific errors for corrupt files
            raise ValueError(f"{path}: cannot read the video ({type(error).__name__}: {error})") from None
        if array.ndim == 3:  # one frame
            array = array[None]
        if array.ndim != 4 or array.shape[0] == 0:
            raise ValueError(f"{path}: expected frames [F, H, W, C], got shape {array.shape}")
        if array.shape[-1] == 4:
            array = array[..., :3]
        elif array.shape[-1] == 1:
            array = array.repeat(3, axis=-1)
    else:
        raise ValueError(f"no clip at {path}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0


def save_sample(sample: Tensor, stem: str | os.PathLike, video_format: str = "mp4", fps: int = 8) -> Path:
    """Save one generated sample next to ``stem`` (a path without suffix): an image ``[3, H, W]``
    as ``stem.png``, a clip ``[F, 3, H, W]`` as ``stem.mp4``, ``stem.gif`` or both
    (``video_format``). Returns the (first) file written."""
    stem = Path(stem)
    if sample.dim() == 3:
        return save_png(sample, stem.with_name(stem.name + ".png"))
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"video_format must be one of {VIDEO_FORMATS}, got {video_format!r}")
    suffixes = ("mp4", "gif") if video_format == "both" else (video_format,)
    written = [save_video(sample, stem.with_name(f"{stem.name}.{suffix}"), fps) for suffix in suffixes]
    return written[0]


def save_sample_grid(samples: Tensor, prompts: Sequence[str], path: str | os.PathLike, per_row: int,
                     max_frames: int = 16) -> Path:
    """The overview of a run: for images ``[N, 3, H, W]``, one row per prompt with ``per_row``
    images (:func:`save_labelled_grid`); for clips ``[N, F, 3, H, W]``, a frame grid with one row
    per clip (labelled with its prompt) and its frames along the row (at most ``max_frames``,
    evenly spaced)."""
    if samples.dim() == 4:
        return save_labelled_grid(samples, prompts, path, per_row=per_row)
    num_frames = samples.shape[1]
    shown = torch.linspace(0, num_frames - 1, min(num_frames, max_frames)).round().long()
    labels = [f"{prompt} ({index})" for prompt in prompts for index in range(per_row)][: samples.shape[0]]
    frames = samples[:, shown].flatten(0, 1)
    return save_labelled_grid(frames, labels, path, per_row=len(shown), cell_inches=0.8)
