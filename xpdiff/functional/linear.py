"""Affine map over the last axis: ``y = x @ w.T + b`` with ``w`` (out, in)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import backend

__all__ = ["LinearCache", "linear_backward", "linear_forward"]


@dataclass
class LinearCache:
    """What ``linear_backward`` needs."""

    x: Any  # (..., in) input
    w: Any  # (out, in)
    has_bias: bool


def linear_forward(x: Any, w: Any, b: Any | None) -> tuple[Any, LinearCache]:
    """x (..., in), w (out, in), b (out,) or None -> y (..., out); cache ``(x, w)``.

    Leading axes are folded into one (N, in) @ (in, out) product (a batched product over a
    strided view would be many small ones).
    """
    xp = backend.get_namespace(x, w)
    lead = tuple(x.shape[:-1])
    y = xp.reshape(x, (-1, w.shape[1])) @ w.T
    if b is not None:
        y += b  # y is the fresh product
    return xp.reshape(y, (*lead, w.shape[0])), LinearCache(x, w, b is not None)


def linear_backward(cache: LinearCache, gy: Any) -> tuple[Any, Any, Any | None]:
    """Gradients ``(gx, gw, gb)`` for output gradient ``gy`` (..., out)."""
    x, w, has_bias = cache.x, cache.w, cache.has_bias
    xp = backend.get_namespace(gy, w)
    g2 = xp.reshape(gy, (-1, w.shape[0]))
    x2 = xp.reshape(x, (-1, w.shape[1]))
    gw = g2.T @ x2
    gb = xp.sum(g2, axis=0) if has_bias else None
    gx = xp.reshape(g2 @ w, tuple(x.shape))
    return gx, gw, gb
