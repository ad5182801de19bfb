"""Group normalization (Wu and He, 2018, eq. 1-3) over (B, C, *spatial) or (B, *spatial, C)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import backend

__all__ = ["GroupNormCache", "group_norm_backward", "group_norm_forward"]


@dataclass
class GroupNormCache:
    """What ``group_norm_backward`` needs; ``xhat`` and ``inv`` are in the view of ``_view``."""

    xhat: Any           # normalised input: (B, G, Cg*S) for NCHW, (B, S, C) for NHWC
    inv: Any            # 1 / sqrt(var + eps), broadcastable to xhat
    w: Any | None       # (C,) or None
    shape: tuple        # the input's shape
    layout: str
    num_groups: int


def _view(shape: tuple, num_groups: int, layout: str) -> tuple[int, ...]:
    """A 3-D view of the input: (B, G, Cg*S) channels-first, (B, S, C) channels-last."""
    if layout == "NHWC":
        return (shape[0], math.prod(shape[1:-1]), shape[-1])
    return (shape[0], num_groups, math.prod(shape[1:]) // num_groups)


def _group_mean(a: Any, num_groups: int, layout: str) -> Any:
    """Mean of ``a`` (in the ``_view`` shape) over each group, broadcastable back to it.

    Channels-last sums each channel over the spatial axis first (contiguous row adds),
    then the Cg channels of each group: a reduction over two strided axes at once
    measured 5x slower.
    """
    xp = backend.get_namespace(a)
    if layout != "NHWC":
        return xp.mean(a, axis=2, keepdims=True)
    B, S, C = a.shape
    per_channel = xp.sum(a, axis=1)                                   # (B, C)
    g = xp.sum(xp.reshape(per_channel, (B, num_groups, C // num_groups)), axis=2,
               keepdims=True) / (S * (C // num_groups))              # (B, G, 1)
    return xp.reshape(xp.broadcast_to(g, (B, num_groups, C // num_groups)), (B, 1, C))


def _channel_shape(shape: tuple, layout: str) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector over the channel axis."""
    if layout == "NHWC":
        return (shape[-1],)
    return (1, shape[1]) + (1,) * (len(shape) - 2)


def group_norm_forward(
    x: Any, num_groups: int, w: Any | None, b: Any | None, eps: float, layout: str = "NCHW"
) -> tuple[Any, GroupNormCache]:
    """Normalise each of ``num_groups`` channel groups per sample, then scale and shift.

    Args:
        x: (B, C, *spatial) for ``layout="NCHW"``, or (B, *spatial, C) for ``"NHWC"``,
            with C divisible by ``num_groups``.
        w, b: (C,) or None.  eps: added to the variance (biased, over the group).
    Returns:
        ``(y, cache)``, y like x; the cache keeps the normalised input, the per-group
        inverse standard deviation and ``w``.
    """
    xp = backend.get_namespace(x)
    shape = tuple(x.shape)
    xr = xp.reshape(x, _view(shape, num_groups, layout))
    xhat = xr - _group_mean(xr, num_groups, layout)   # fresh array: centred, then scaled
    var = _group_mean(xhat * xhat, num_groups, layout)
    inv = 1.0 / xp.sqrt(var + eps)
    xhat *= inv
    y = xp.reshape(xhat, shape)
    if w is not None:
        cshape = _channel_shape(shape, layout)
        y = y * xp.reshape(w, cshape)
        y += xp.reshape(b, cshape)
    return y, GroupNormCache(xhat, inv, w, shape, layout, num_groups)


def group_norm_backward(cache: GroupNormCache, gy: Any) -> tuple[Any, Any | None, Any | None]:
    """Gradients ``(gx, gw, gb)``; gx like the input, gw and gb (C,) or None.

    With ``xhat`` the normalised group and ``n`` its size,
    ``gx = inv * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat))`` per group.
    """
    xhat, inv, w, shape, layout = cache.xhat, cache.inv, cache.w, cache.shape, cache.layout
    G = cache.num_groups
    xp = backend.get_namespace(gy)
    gshape = tuple(xhat.shape)
    gw = gb = None
    if w is not None:
        xh = xp.reshape(xhat, shape)
        if layout == "NHWC":
            C = shape[-1]
            gb = xp.sum(xp.reshape(gy, (-1, C)), axis=0)
            gw = xp.sum(xp.reshape(gy * xh, (-1, C)), axis=0)
        else:
            axes = (0,) + tuple(range(2, len(shape)))
            gb = xp.sum(gy, axis=axes)
            gw = xp.sum(gy * xh, axis=axes)
        gxhat = xp.reshape(gy * xp.reshape(w, _channel_shape(shape, layout)), gshape)
    else:
        gxhat = xp.reshape(gy, gshape)
    m1 = _group_mean(gxhat, G, layout)
    m2 = _group_mean(gxhat * xhat, G, layout)
    gx = xhat * m2              # fresh array; gxhat may be a view of gy, so not that one
    gx -= gxhat
    gx += m1
    gx *= -inv                  # inv * (gxhat - m1 - xhat * m2)
    return xp.reshape(gx, shape), gw, gb
