"""Pictures of digits: PNG grids, GIFs of the denoising process, the noising figure."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import backend
from ._validation import check_int
from .data import from_model_range

__all__ = ["grid", "save_gif", "save_grid"]


def grid(images: Any, nrow: int, pad: int = 1, scale: int = 1) -> Any:
    """Tile (N, 1, H, W) images in [-1, 1] into one uint8 host image, ``nrow`` per row.

    Missing cells at the end are black; ``scale`` repeats pixels for visibility.
    """
    nrow = check_int("grid", "nrow", nrow, min=1)
    pad = check_int("grid", "pad", pad, min=0)
    scale = check_int("grid", "scale", scale, min=1)
    hx = backend.namespace_for("numpy")
    x = backend.to_numpy(images)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"grid: expected (N, 1, H, W) images, got shape {tuple(x.shape)}")
    N, _, H, W = x.shape
    rows = -(-N // nrow)
    u8 = from_model_range(hx.asarray(x))[:, 0]
    canvas = hx.zeros((rows * (H + pad) + pad, nrow * (W + pad) + pad), dtype=hx.uint8)
    for k in range(N):
        r, c = divmod(k, nrow)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        canvas[top : top + H, left : left + W] = u8[k]
    if scale > 1:
        canvas = hx.repeat(hx.repeat(canvas, scale, axis=0), scale, axis=1)
    return canvas


def _pil(canvas: Any) -> Any:
    from PIL import Image

    return Image.fromarray(backend.to_numpy(canvas, contiguous=True), mode="L")


def save_grid(images: Any, path: str | os.PathLike, nrow: int = 10, scale: int = 4) -> None:
    """Write a PNG grid of (N, 1, H, W) images in [-1, 1]."""
    from .io import atomic_write

    img = _pil(grid(images, nrow, scale=scale))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_gif(
    frames: Sequence[Any],
    path: str | os.PathLike,
    nrow: int = 10,
    scale: int = 4,
    duration_ms: int = 60,
    hold_last_ms: int = 1500,
) -> None:
    """Write an animated GIF; each frame is an (N, 1, H, W) batch shown as a grid."""
    from .io import atomic_write

    if not frames:
        raise ValueError("save_gif: expected at least one frame, got none")
    check_int("save_gif", "duration_ms", duration_ms, min=1)
    check_int("save_gif", "hold_last_ms", hold_last_ms, min=1)
    pics = [_pil(grid(f, nrow, scale=scale)) for f in frames]
    durations = [duration_ms] * (len(pics) - 1) + [hold_last_ms]
    atomic_write(
        path,
        lambda tmp: pics[0].save(
            tmp, format="GIF", save_all=True, append_images=pics[1:], duration=durations, loop=0
        ),
    )
