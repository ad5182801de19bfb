"""Nearest-neighbour upsampling of (B, C, H, W) or (B, H, W, C) to any output size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import backend
from .conv import LAYOUTS

__all__ = [
    "UpsampleCache",
    "nearest_indices",
    "upsample_nearest_backward",
    "upsample_nearest_forward",
]


@dataclass
class UpsampleCache:
    """What ``upsample_nearest_backward`` needs: the input's shape and layout."""

    shape: tuple
    layout: str


def nearest_indices(n_in: int, n_out: int) -> list[int]:
    """Source index of each output position, ``floor(i * n_in / n_out)`` (PyTorch's 'nearest')."""
    return [(i * n_in) // n_out for i in range(n_out)]


def _one_hot(idx: list[int], n_in: int, like: Any) -> Any:
    """(n_out, n_in) matrix with a one at (i, idx[i])."""
    xp = backend.get_namespace(like)
    dev = backend.device(like)
    src = xp.asarray(idx, device=dev)
    return xp.astype(src[:, None] == xp.arange(n_in, device=dev)[None, :], like.dtype)


def _spatial_axes(layout: str) -> tuple[int, int]:
    if layout not in LAYOUTS:
        raise ValueError(f"upsample_nearest: layout must be one of {LAYOUTS}, got {layout!r}")
    return (1, 2) if layout == "NHWC" else (2, 3)


def upsample_nearest_forward(
    x: Any, size: tuple[int, int], layout: str = "NCHW"
) -> tuple[Any, UpsampleCache]:
    """Nearest upsampling of x to spatial ``size`` (Ho, Wo); the cache keeps the input shape.

    Args:
        x: (B, C, H, W) for ``layout="NCHW"``, (B, H, W, C) for ``"NHWC"``.
    Returns:
        y (B, C, Ho, Wo) or (B, Ho, Wo, C); output pixel i takes input ``floor(i H / Ho)``.
    """
    xp = backend.get_namespace(x)
    ah, aw = _spatial_axes(layout)
    shape = tuple(x.shape)
    H, W = shape[ah], shape[aw]
    Ho, Wo = size
    if Ho == 2 * H and Wo == 2 * W:
        # insert a length-2 axis after each spatial axis and broadcast along it
        y = xp.expand_dims(xp.expand_dims(x, axis=aw + 1), axis=ah + 1)
        wide = list(y.shape)
        wide[ah + 1], wide[aw + 2] = 2, 2
        out = list(shape)
        out[ah], out[aw] = Ho, Wo
        return xp.reshape(xp.broadcast_to(y, tuple(wide)), tuple(out)), UpsampleCache(shape, layout)
    dev = backend.device(x)
    ih = xp.asarray(nearest_indices(H, Ho), device=dev)
    iw = xp.asarray(nearest_indices(W, Wo), device=dev)
    y = xp.take(xp.take(x, ih, axis=ah), iw, axis=aw)
    return y, UpsampleCache(shape, layout)


def upsample_nearest_backward(cache: UpsampleCache, gy: Any) -> Any:
    """Sum each output gradient back into its source pixel; returns gx like the input."""
    xp = backend.get_namespace(gy)
    shape, layout = cache.shape, cache.layout
    ah, aw = _spatial_axes(layout)
    H, W = shape[ah], shape[aw]
    Ho, Wo = gy.shape[ah], gy.shape[aw]
    if Ho == 2 * H and Wo == 2 * W:
        wide = list(shape)
        wide[aw : aw + 1] = [W, 2]
        wide[ah : ah + 1] = [H, 2]
        return xp.sum(xp.reshape(gy, tuple(wide)), axis=(ah + 1, aw + 2))
    mw = _one_hot(nearest_indices(W, Wo), W, gy)  # (Wo, W)
    mh = _one_hot(nearest_indices(H, Ho), H, gy)  # (Ho, H)
    # bring H, W last, apply both adjoint selections as products, then put them back
    order = [a for a in range(4) if a not in (ah, aw)] + [ah, aw]
    g = xp.permute_dims(gy, tuple(order)) @ mw  # (., ., Ho, W)
    g = xp.permute_dims(g, (0, 1, 3, 2)) @ mh  # (., ., W, H)
    g = xp.permute_dims(g, (0, 1, 3, 2))  # (., ., H, W)
    back = [order.index(a) for a in range(4)]
    return xp.permute_dims(g, tuple(back))
