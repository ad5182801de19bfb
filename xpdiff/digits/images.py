"""Pictures of images: PNG grids with row and column labels, GIFs of the denoising process
with a title line, and the noising figure's frames with their timesteps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .. import backend
from .._validation import check_int
from .data import from_model_range

__all__ = ["SEPARATOR", "grid", "save_gif", "save_grid"]

#: Grey level of the separators between cells (and of empty cells).
SEPARATOR = 128
_MARGIN = 255  # label margins: white, with black text


def grid(images: Any, nrow: int, pad: int = 1, scale: int = 1) -> Any:
    """Tile (N, C, H, W) images in [-1, 1] (C = 1 grey, C = 3 RGB) into one uint8 host image,
    ``nrow`` per row, with grey (:data:`SEPARATOR`) lines ``pad`` pixels wide between cells.

    Returns:
        (rows, cols) for grey images, (rows, cols, 3) for RGB; empty cells at the end are grey;
        ``scale`` repeats pixels (separators included) for visibility.
    """
    nrow = check_int("grid", "nrow", nrow, min=1)
    pad = check_int("grid", "pad", pad, min=0)
    scale = check_int("grid", "scale", scale, min=1)
    hx = backend.namespace_for("numpy")
    x = backend.to_numpy(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"grid: expected (N, 1, H, W) or (N, 3, H, W) images, got shape {tuple(x.shape)}"
        )
    N, C, H, W = x.shape
    rows = -(-N // nrow)
    u8 = hx.permute_dims(from_model_range(hx.asarray(x)), (0, 2, 3, 1))  # (N, H, W, C)
    canvas = hx.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), SEPARATOR, dtype=hx.uint8)
    for k in range(N):
        r, c = divmod(k, nrow)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        canvas[top : top + H, left : left + W, :] = u8[k, ...]
    if scale > 1:
        canvas = hx.repeat(hx.repeat(canvas, scale, axis=0), scale, axis=1)
    return canvas[..., 0] if C == 1 else canvas


def _pil(canvas: Any) -> Any:
    from PIL import Image

    host = backend.to_numpy(canvas, contiguous=True)
    return Image.fromarray(host, mode="L" if host.ndim == 2 else "RGB")


def _font(px: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)  # a scalable font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _annotate(
    canvas: Any,
    cell: tuple[int, int],
    pad: int,
    scale: int,
    *,
    title: str | None = None,
    row_labels: Sequence[Any] | None = None,
    col_labels: Sequence[Any] | None = None,
) -> Any:
    """The grid ``canvas`` as a PIL image, with a title line above it, a label left of each
    row and one under each column, black on white margins."""
    from PIL import Image, ImageDraw

    img = _pil(canvas)
    if title is None and not row_labels and not col_labels:
        return img
    white, black = (_MARGIN, 0) if img.mode == "L" else ((_MARGIN,) * 3, (0, 0, 0))
    cell_h, cell_w = cell[0] * scale, cell[1] * scale
    font = _font(max(10, min(24, cell_h // 2)))
    measure = ImageDraw.Draw(img)

    def size(text: str) -> tuple[int, int]:
        x0, y0, x1, y1 = measure.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    gap = max(3, cell_h // 8)
    line = size("0123456789tg")[1] + 2 * gap
    left = max(size(str(s))[0] for s in row_labels) + 2 * gap if row_labels else 0
    top = line if title is not None else 0
    bottom = line if col_labels else 0
    out = Image.new(img.mode, (img.width + left, img.height + top + bottom), white)
    out.paste(img, (left, top))
    draw = ImageDraw.Draw(out)

    def text(x: float, y: float, s: str, align: str) -> None:
        x0, y0, x1, y1 = draw.textbbox((0, 0), s, font=font)
        dx = {"left": 0, "center": (x1 - x0) / 2, "right": x1 - x0}[align]
        draw.text((x - dx - x0, y - (y1 - y0) / 2 - y0), s, fill=black, font=font)

    for r, s in enumerate(row_labels or ()):
        text(
            left - gap, top + pad * scale + r * (cell_h + pad * scale) + cell_h / 2, str(s), "right"
        )
    for c, s in enumerate(col_labels or ()):
        text(
            left + pad * scale + c * (cell_w + pad * scale) + cell_w / 2,
            top + img.height + line / 2,
            str(s),
            "center",
        )
    if title is not None:
        text(left + gap, line / 2, title, "left")
    return out


def save_grid(
    images: Any,
    path: str | os.PathLike,
    nrow: int = 10,
    scale: int = 4,
    *,
    title: str | None = None,
    row_labels: Sequence[Any] | None = None,
    col_labels: Sequence[Any] | None = None,
) -> None:
    """Write a PNG grid of (N, C, H, W) images in [-1, 1] (C = 1 or 3), optionally with a title
    line, a label left of each row and one under each column."""
    from ..io import atomic_write

    x = backend.to_numpy(images)
    img = _annotate(
        grid(x, nrow, scale=scale),
        tuple(x.shape[-2:]),
        1,
        scale,
        title=title,
        row_labels=row_labels,
        col_labels=col_labels,
    )
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", optimize=True))


def save_gif(
    frames: Sequence[Any],
    path: str | os.PathLike,
    nrow: int = 10,
    scale: int = 2,
    duration_ms: int = 60,
    hold_last_ms: int = 1500,
    *,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[Any] | None = None,
) -> None:
    """Write an animated GIF; each frame is an (N, C, H, W) batch shown as a grid, under its
    title line (``titles``, one per frame) and with ``row_labels``.

    Frames are kept small: ``scale`` 2 and, for grey images, 64 grey levels."""
    from ..io import atomic_write

    if not frames:
        raise ValueError("save_gif: expected at least one frame, got none")
    check_int("save_gif", "duration_ms", duration_ms, min=1)
    check_int("save_gif", "hold_last_ms", hold_last_ms, min=1)
    if titles is not None and len(titles) != len(frames):
        raise ValueError(
            f"save_gif: expected one title per frame ({len(frames)}), got {len(titles)}"
        )
    pics = []
    for i, f in enumerate(frames):
        x = backend.to_numpy(f)
        pic = _annotate(
            grid(x, nrow, scale=scale),
            tuple(x.shape[-2:]),
            1,
            scale,
            title=None if titles is None else titles[i],
            row_labels=row_labels,
        )
        pics.append(pic.quantize(64) if pic.mode == "L" else pic)
    durations = [duration_ms] * (len(pics) - 1) + [hold_last_ms]
    atomic_write(
        path,
        lambda tmp: pics[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=pics[1:],
            duration=durations,
            loop=0,
            optimize=True,
        ),
    )
