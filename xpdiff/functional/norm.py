"""Group normalization over (B, C, *spatial)."""

from __future__ import annotations

import math
from typing import Any

from .. import backend

__all__ = ["group_norm_backward", "group_norm_forward"]


def group_norm_forward(
    x: Any, num_groups: int, w: Any | None, b: Any | None, eps: float
) -> tuple[Any, tuple]:
    """Normalise each of ``num_groups`` channel groups per sample, then scale and shift.

    Args:
        x: (B, C, *spatial) with C divisible by ``num_groups``.
        w, b: (C,) or None.
    Returns:
        ``(y, cache)``; cache holds the normalised input (B, G, C/G * prod(spatial)),
        the per-group inverse standard deviation (B, G, 1) and ``w``.
    """
    xp = backend.get_namespace(x)
    shape = tuple(x.shape)
    B, C = shape[0], shape[1]
    xr = xp.reshape(x, (B, num_groups, -1))
    mean = xp.mean(xr, axis=2, keepdims=True)
    xhat = xr - mean            # fresh array: centred, then scaled in place
    var = xp.mean(xhat * xhat, axis=2, keepdims=True)
    inv = 1.0 / xp.sqrt(var + eps)
    xhat *= inv
    y = xp.reshape(xhat, shape)
    if w is not None:
        bshape = (1, C) + (1,) * (len(shape) - 2)
        y = y * xp.reshape(w, bshape)
        y += xp.reshape(b, bshape)
    return y, (xhat, inv, w, shape)


def group_norm_backward(cache: tuple, gy: Any) -> tuple[Any, Any | None, Any | None]:
    """Gradients ``(gx, gw, gb)``.

    With ``xhat`` the normalised group and ``n`` its size,
    ``gx = inv * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat))`` per group.
    """
    xhat, inv, w, shape = cache
    xp = backend.get_namespace(gy)
    B, C = shape[0], shape[1]
    G = xhat.shape[1]
    spatial_axes = tuple(range(2, len(shape)))
    gw = gb = None
    if w is not None:
        xh = xp.reshape(xhat, shape)
        gb = xp.sum(gy, axis=(0,) + spatial_axes)
        gw = xp.sum(gy * xh, axis=(0,) + spatial_axes)
        bshape = (1, C) + (1,) * (len(shape) - 2)
        gxhat = xp.reshape(gy * xp.reshape(w, bshape), (B, G, -1))
    else:
        gxhat = xp.reshape(gy, (B, G, -1))
    n = math.prod(shape[1:]) // G
    m1 = xp.sum(gxhat, axis=2, keepdims=True) / n
    m2 = xp.sum(gxhat * xhat, axis=2, keepdims=True) / n
    gx = xhat * m2              # fresh array; gxhat may be a view of gy, so not that one
    gx -= gxhat
    gx += m1
    gx *= -inv                  # inv * (gxhat - m1 - xhat * m2)
    return xp.reshape(gx, shape), gw, gb
