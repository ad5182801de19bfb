"""Nearest-neighbour upsampling of (B, C, H, W) to any output size."""

from __future__ import annotations

from typing import Any

from .. import backend

__all__ = ["nearest_indices", "upsample_nearest_backward", "upsample_nearest_forward"]


def nearest_indices(n_in: int, n_out: int) -> list[int]:
    """Source index of each output position, ``floor(i * n_in / n_out)`` (PyTorch's 'nearest')."""
    return [(i * n_in) // n_out for i in range(n_out)]


def _one_hot(idx: list[int], n_in: int, like: Any) -> Any:
    """(n_out, n_in) matrix with a one at (i, idx[i])."""
    xp = backend.get_namespace(like)
    dev = backend.device(like)
    src = xp.asarray(idx, device=dev)
    return xp.astype(src[:, None] == xp.arange(n_in, device=dev)[None, :], like.dtype)


def upsample_nearest_forward(x: Any, size: tuple[int, int]) -> tuple[Any, tuple]:
    """Nearest upsampling of x (B, C, H, W) to (B, C, *size); cache is the input shape."""
    xp = backend.get_namespace(x)
    B, C, H, W = x.shape
    Ho, Wo = size
    if Ho == 2 * H and Wo == 2 * W:
        y = xp.broadcast_to(x[:, :, :, None, :, None], (B, C, H, 2, W, 2))
        return xp.reshape(y, (B, C, Ho, Wo)), (tuple(x.shape),)
    dev = backend.device(x)
    ih = xp.asarray(nearest_indices(H, Ho), device=dev)
    iw = xp.asarray(nearest_indices(W, Wo), device=dev)
    y = xp.take(xp.take(x, ih, axis=2), iw, axis=3)
    return y, (tuple(x.shape),)


def upsample_nearest_backward(cache: tuple, gy: Any) -> Any:
    """Sum each output gradient back into its source pixel."""
    xp = backend.get_namespace(gy)
    ((B, C, H, W),) = cache
    Ho, Wo = gy.shape[2], gy.shape[3]
    if Ho == 2 * H and Wo == 2 * W:
        return xp.sum(xp.reshape(gy, (B, C, H, 2, W, 2)), axis=(3, 5))
    mw = _one_hot(nearest_indices(W, Wo), W, gy)  # (Wo, W)
    mh = _one_hot(nearest_indices(H, Ho), H, gy)  # (Ho, H)
    g = gy @ mw  # (B, C, Ho, W)
    g = xp.permute_dims(g, (0, 1, 3, 2)) @ mh  # (B, C, W, H)
    return xp.permute_dims(g, (0, 1, 3, 2))
