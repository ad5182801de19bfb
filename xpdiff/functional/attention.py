"""Scaled dot-product attention over (B, heads, N, d) queries, keys and values.

The attention probabilities p (B, h, N, N) are the largest activation of a UNet with
attention at 14x14 (N = 196: 79 MB per layer at batch 64), so, as flash attention does,
the forward keeps only the row maximum and the reciprocal row sum of the exponentials,
(B, h, N, 1) each, and the backward recomputes p from q and k with the same operations,
which gives p bit for bit. That costs one more ``q k^T`` and ``exp`` in the backward.
"""

from __future__ import annotations

from typing import Any

from .. import backend

__all__ = ["sdpa_backward", "sdpa_forward", "softmax"]


def softmax(s: Any, axis: int = -1) -> Any:
    xp = backend.get_namespace(s)
    e = backend.exp_inplace(s - xp.max(s, axis=axis, keepdims=True))
    e /= xp.sum(e, axis=axis, keepdims=True)
    return e


def _probabilities(q: Any, k: Any, scale: float, row_max: Any, inv_sum: Any) -> Any:
    """``exp(scale * q k^T - row_max) * inv_sum``, each step in place on the scores."""
    s = (q * scale) @ k.mT      # scale the (N, d) operand, not the (N, N) product
    s -= row_max
    p = backend.exp_inplace(s)
    p *= inv_sum
    return p


def sdpa_forward(q: Any, k: Any, v: Any, scale: float) -> tuple[Any, tuple]:
    """``o = softmax(scale * q k^T) v``.

    Args:
        q, k, v: (B, h, N, d).
    Returns:
        ``(o, cache)`` with o (B, h, N, d); cache holds q, k, v, scale and the softmax
        row statistics (row maximum and reciprocal sum, (B, h, N, 1) each) and o, not p.
    """
    xp = backend.get_namespace(q)
    s = (q * scale) @ k.mT
    row_max = xp.max(s, axis=-1, keepdims=True)
    s -= row_max
    e = backend.exp_inplace(s)
    del s
    inv_sum = 1.0 / xp.sum(e, axis=-1, keepdims=True)
    e *= inv_sum                # now p, exactly as _probabilities recomputes it
    o = e @ v
    return o, (q, k, v, o, scale, row_max, inv_sum)


def sdpa_backward(cache: tuple, go: Any) -> tuple[Any, Any, Any]:
    """Gradients ``(gq, gk, gv)``.

    With ``s = scale q k^T`` and ``p = softmax(s)``: ``gv = p^T go``, ``gp = go v^T``,
    ``gs = p * (gp - rowsum(gp * p))``, ``gq = scale gs k`` and ``gk = scale gs^T q``.
    The row sum is taken on (N, d) arrays: ``rowsum(gp * p)_i = sum_j p_ij go_i . v_j
    = go_i . o_i``.
    """
    xp = backend.get_namespace(go)
    q, k, v, o, scale, row_max, inv_sum = cache
    p = _probabilities(q, k, scale, row_max, inv_sum)
    gv = p.mT @ go
    gs = go @ v.mT              # gp, turned into gs in place
    gs -= xp.sum(go * o, axis=-1, keepdims=True)
    gs *= p
    del p
    gq = (gs @ k) * scale
    gk = (gs.mT @ q) * scale
    return gq, gk, gv
