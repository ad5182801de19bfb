"""Scaled dot-product attention over (B, heads, N, d) queries, keys and values."""

from __future__ import annotations

from typing import Any

from .. import backend

__all__ = ["sdpa_backward", "sdpa_forward", "softmax"]


def softmax(s: Any, axis: int = -1) -> Any:
    xp = backend.get_namespace(s)
    e = xp.exp(s - xp.max(s, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def sdpa_forward(q: Any, k: Any, v: Any, scale: float) -> tuple[Any, tuple]:
    """``o = softmax(scale * q k^T) v``.

    Args:
        q, k, v: (B, h, N, d).
    Returns:
        ``(o, cache)`` with o (B, h, N, d); cache holds q, k, v and the
        attention probabilities p (B, h, N, N).
    """
    p = softmax((q @ k.mT) * scale)
    return p @ v, (q, k, v, p, scale)


def sdpa_backward(cache: tuple, go: Any) -> tuple[Any, Any, Any]:
    """Gradients ``(gq, gk, gv)``; softmax backward is ``p * (gp - sum(gp * p))``."""
    xp = backend.get_namespace(go)
    q, k, v, p, scale = cache
    gv = p.mT @ go
    gp = go @ v.mT
    gs = p * (gp - xp.sum(gp * p, axis=-1, keepdims=True)) * scale
    gq = gs @ k
    gk = gs.mT @ q
    return gq, gk, gv
