"""Group normalization (Wu and He, 2018, eq. 1-3) over (B, C, *spatial) or (B, *spatial, C).

Every statistic is per sample, so both passes run over tiles of a few samples
(``backend.tile_samples``): the dozen elementwise passes of one tile then stay in the
CPU cache instead of streaming the whole batch through memory a dozen times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import backend
from .activations import sigmoid

__all__ = ["GroupNormCache", "group_norm_backward", "group_norm_forward"]


@dataclass
class GroupNormCache:
    """What ``group_norm_backward`` needs; ``xhat`` and ``inv`` are in the view of ``_view``."""

    xhat: Any  # normalised input: (B, G, Cg*S) for NCHW, (B, S, C) for NHWC
    inv: Any  # 1 / sqrt(var + eps), broadcastable to xhat
    w: Any | None  # (C,) or None
    shape: tuple  # the input's shape
    layout: str
    num_groups: int
    s: Any | None = None  # sigmoid of the normalised output when SiLU is fused, else None
    out: Any | None = None  # the returned output when SiLU is fused (shared, not a copy)


def _view(shape: tuple, num_groups: int, layout: str) -> tuple[int, ...]:
    """A 3-D view of the input: (B, G, Cg*S) channels-first, (B, S, C) channels-last."""
    if layout == "NHWC":
        return (shape[0], math.prod(shape[1:-1]), shape[-1])
    return (shape[0], num_groups, math.prod(shape[1:]) // num_groups)


def _stat_shape(shape: tuple, num_groups: int, layout: str) -> tuple[int, ...]:
    """Shape of a per-group statistic, broadcastable to the ``_view``."""
    if layout == "NHWC":
        return (shape[0], 1, shape[-1])
    return (shape[0], num_groups, 1)


def _group_mean(a: Any, num_groups: int, layout: str) -> Any:
    """Mean of ``a`` (in the ``_view`` shape) over each group, broadcastable back to it.

    Channels-last sums each channel over the spatial axis first, as a product with a
    row of ones (faster than a sum over a non-last axis: benchmarks/RESULTS.md), then
    the Cg channels of each group.
    """
    xp = backend.get_namespace(a)
    if layout != "NHWC":
        return xp.mean(a, axis=2, keepdims=True)
    B, S, C = a.shape
    Cg = C // num_groups
    ones = xp.ones((1, S), dtype=a.dtype, device=backend.device(a))
    per_channel = ones @ a  # (B, 1, C)
    g = xp.sum(xp.reshape(per_channel, (B, num_groups, Cg)), axis=2, keepdims=True)
    g = g / (S * Cg)  # (B, G, 1)
    return xp.reshape(xp.broadcast_to(g, (B, num_groups, Cg)), (B, 1, C))


def _channel_shape(shape: tuple, layout: str) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector over the channel axis."""
    if layout == "NHWC":
        return (shape[-1],)
    return (1, shape[1]) + (1,) * (len(shape) - 2)


def _channel_sum(a: Any, layout: str) -> Any:
    """Sum of ``a`` (a tile in the input's shape) over everything but the channels: (C,)."""
    xp = backend.get_namespace(a)
    if layout == "NHWC":
        return xp.sum(xp.reshape(a, (-1, a.shape[-1])), axis=0)
    return xp.sum(a, axis=(0,) + tuple(range(2, a.ndim)))


def _tile(like: Any, shape: tuple) -> int:
    """Samples per tile: about five arrays of a tile live at once."""
    return backend.tile_samples(5 * math.prod(shape[1:]), shape[0], like)


def group_norm_forward(
    x: Any,
    num_groups: int,
    w: Any | None,
    b: Any | None,
    eps: float,
    layout: str = "NCHW",
    activation: str | None = None,
    keep_cache: bool = True,
) -> tuple[Any, GroupNormCache | None]:
    """Normalise each of ``num_groups`` channel groups per sample, then scale and shift.

    Args:
        x: (B, C, *spatial) for ``layout="NCHW"``, or (B, *spatial, C) for ``"NHWC"``,
            with C divisible by ``num_groups``.
        w, b: (C,) or None.  eps: added to the variance (biased, over the group).
        activation: None, or ``"silu"`` to return ``silu(group_norm(x))`` in one pass over
            fresh arrays (Elfwing et al., 2018: ``y * sigmoid(y)``).
        keep_cache: False (inference) skips storing what the backward needs; the cache
            returned is then None.
    Returns:
        ``(y, cache)``, y like x; the cache keeps the normalised input, the per-group
        inverse standard deviation and ``w``; with SiLU also ``sigmoid(y)`` and the
        returned array itself, which callers must not modify in place.
    Raises:
        ValueError: an activation other than None or ``"silu"``.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"group_norm: activation must be None or 'silu', got {activation!r}")
    xp = backend.get_namespace(x)
    dev = backend.device(x)
    shape = tuple(x.shape)
    vshape = _view(shape, num_groups, layout)
    y = xp.empty(shape, dtype=x.dtype, device=dev)
    if keep_cache:
        xhat = xp.empty(vshape, dtype=x.dtype, device=dev)
        inv = xp.empty(_stat_shape(shape, num_groups, layout), dtype=x.dtype, device=dev)
        s = xp.empty(shape, dtype=x.dtype, device=dev) if activation else None
    if w is not None:
        cshape = _channel_shape(shape, layout)
        wc, bc = xp.reshape(w, cshape), xp.reshape(b, cshape)

    def tile(t: slice) -> None:
        xt = x[t, ...]
        tshape = tuple(xt.shape)
        xr = xp.reshape(xt, (tshape[0], *vshape[1:]))
        xh = xr - _group_mean(xr, num_groups, layout)  # fresh: centred, then scaled
        it = 1.0 / xp.sqrt(_group_mean(xh * xh, num_groups, layout) + eps)
        xh *= it
        if keep_cache:
            xhat[t, ...] = xh
            inv[t, ...] = it
        yt = xp.reshape(xh, tshape)
        if w is not None:
            yt = yt * wc
            yt += bc
        elif activation:
            yt = yt * 1.0  # a view of xh, which must keep its values: work on a copy
        if activation:
            st = sigmoid(yt)
            yt *= st  # silu, in place on the fresh yt
            if keep_cache:
                s[t, ...] = st
        y[t, ...] = yt

    backend.map_tiles(tile, shape[0], _tile(x, shape), xp)
    if not keep_cache:
        return y, None
    cache = GroupNormCache(xhat, inv, w, shape, layout, num_groups)
    if activation:
        cache.s, cache.out = s, y
    return y, cache


def group_norm_backward(cache: GroupNormCache, gy: Any) -> tuple[Any, Any | None, Any | None]:
    """Gradients ``(gx, gw, gb)``; gx like the input, gw and gb (C,) or None.

    ``gy`` is the gradient of the returned output, after the SiLU when it was fused:
    ``silu'(y) = s (1 + y (1 - s)) = s + out (1 - s)`` from the kept sigmoid and output.
    With ``xhat`` the normalised group and ``n`` its size,
    ``gx = inv * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat))`` per group.
    """
    c = cache
    G, layout, shape = c.num_groups, c.layout, c.shape
    xp = backend.get_namespace(gy)
    gx = xp.empty(shape, dtype=gy.dtype, device=backend.device(gy))
    gw = gb = None
    if c.w is not None:
        wc = xp.reshape(c.w, _channel_shape(shape, layout))

    def tile(t: slice) -> tuple[Any, Any]:
        """Write this tile's input gradient; return its shares of gb and gw."""
        g = gy[t, ...]
        tshape = tuple(g.shape)
        xh = c.xhat[t, ...]
        if c.s is not None:
            st = c.s[t, ...]
            d = 1.0 - st
            d *= c.out[t, ...]
            d += st
            d *= g
            g = d
        sb = sw = None
        if c.w is not None:
            sb = _channel_sum(g, layout)
            sw = _channel_sum(g * xp.reshape(xh, tshape), layout)
            g = g * wc
        gxhat = xp.reshape(g, tuple(xh.shape))
        m1 = _group_mean(gxhat, G, layout)
        m2 = _group_mean(gxhat * xh, G, layout)
        gt = xh * m2  # fresh array; gxhat may be a view of gy, so not that one
        gt -= gxhat
        gt += m1
        gt *= -c.inv[t, ...]  # inv * (gxhat - m1 - xhat * m2)
        gx[t, ...] = xp.reshape(gt, tshape)
        return sb, sw

    parts = backend.map_tiles(tile, shape[0], _tile(gy, shape), xp)
    if c.w is not None:  # summed in tile order: the same on every schedule
        gb, gw = parts[0]
        for sb, sw in parts[1:]:
            gb = gb + sb
            gw = gw + sw
    return gx, gw, gb
