"""Scaled dot-product attention (Vaswani et al., 2017, eq. 1) over token-major arrays.

Queries, keys and values come as (B, N, heads, d): the (B, N, heads*d) output of a
linear projection of (B, N, C) tokens, reshaped without a copy; the output has the same
layout, so merging the heads back is a free reshape too.

The attention probabilities p (B, heads, N, M) are the largest activation of a UNet with
attention at 14x14 (N = 196: 79 MB per layer at batch 64), so, as flash attention does,
the forward keeps only the row maximum and the reciprocal row sum of the exponentials,
(B, heads, N, 1) each, and the backward recomputes p from q and k with the same
operations, which gives p bit for bit.  Both passes run over tiles of a few samples
(``backend.tile_samples``), so one tile's scores stay in the CPU cache from the product
that makes them to the product that consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import backend

__all__ = ["SdpaCache", "sdpa_backward", "sdpa_forward"]


@dataclass
class SdpaCache:
    """What ``sdpa_backward`` needs: the inputs, the output and the softmax row statistics."""

    q: Any  # (B, N, h, d)
    k: Any  # (B, M, h, d)
    v: Any  # (B, M, h, d)
    o: Any  # (B, N, h, d)
    scale: float
    row_max: Any  # (B, h, N, 1): max_j scale q_i . k_j
    inv_sum: Any  # (B, h, N, 1): 1 / sum_j exp(scale q_i . k_j - row_max)


def _heads(t: Any) -> Any:
    """(n, N, h, d) -> (n, h, N, d), a view."""
    return backend.get_namespace(t).permute_dims(t, (0, 2, 1, 3))


def _tile(q: Any, k: Any, arrays: int) -> int:
    """Samples per tile so that ``arrays`` (h, N, M) blocks of scores fit the tile size."""
    B, N, h, _ = q.shape
    M = k.shape[1]
    return backend.tile_samples(arrays * h * N * M, B, q)


def _probabilities(q: Any, k: Any, scale: float, row_max: Any, inv_sum: Any) -> Any:
    """``exp(scale * q k^T - row_max) * inv_sum`` for (n, h, N, d) views, in place."""
    s = (q * scale) @ k.mT  # scale the (N, d) operand, not the (N, M) product
    s -= row_max
    p = backend.exp_inplace(s)
    p *= inv_sum
    return p


def sdpa_forward(q: Any, k: Any, v: Any, scale: float) -> tuple[Any, SdpaCache]:
    """``o = softmax(scale * q k^T) v`` per sample and head.

    Args:
        q: (B, N, h, d) queries.  k, v: (B, M, h, d) keys and values.
        scale: multiplies the scores, usually ``d ** -0.5``.
    Returns:
        ``(o, cache)`` with o (B, N, h, d) in q's dtype; the cache keeps q, k, v, o and
        the (B, h, N, 1) row statistics, never the (B, h, N, M) probabilities.
    """
    xp = backend.get_namespace(q, k, v)
    B, N, h, d = q.shape
    dev = backend.device(q)
    o = xp.empty((B, N, h, v.shape[3]), dtype=q.dtype, device=dev)
    row_max = xp.empty((B, h, N, 1), dtype=q.dtype, device=dev)
    inv_sum = xp.empty((B, h, N, 1), dtype=q.dtype, device=dev)

    def tile(t: slice) -> None:
        s = (_heads(q[t, ...]) * scale) @ _heads(k[t, ...]).mT
        m = xp.max(s, axis=-1, keepdims=True)
        s -= m
        e = backend.exp_inplace(s)
        del s
        r = 1.0 / xp.sum(e, axis=-1, keepdims=True)
        e *= r  # now p, exactly as _probabilities recomputes it
        o[t, ...] = _heads(e @ _heads(v[t, ...]))
        row_max[t, ...] = m
        inv_sum[t, ...] = r

    backend.map_tiles(tile, B, _tile(q, k, 1), xp)
    return o, SdpaCache(q, k, v, o, scale, row_max, inv_sum)


def sdpa_backward(cache: SdpaCache, go: Any) -> tuple[Any, Any, Any]:
    """Gradients ``(gq, gk, gv)`` for the output gradient ``go`` (B, N, h, d).

    With ``s = scale q k^T`` and ``p = softmax(s)``: ``gv = p^T go``, ``gp = go v^T``,
    ``gs = p * (gp - rowsum(gp * p))``, ``gq = scale gs k`` and ``gk = scale gs^T q``.
    The row sum is taken on (N, d) arrays: ``rowsum(gp * p)_i = sum_j p_ij go_i . v_j
    = go_i . o_i``.  Each gradient has its input's shape.
    """
    c = cache
    xp = backend.get_namespace(go)
    B = go.shape[0]
    dev = backend.device(go)
    gq = xp.empty(tuple(c.q.shape), dtype=go.dtype, device=dev)
    gk = xp.empty(tuple(c.k.shape), dtype=go.dtype, device=dev)
    gv = xp.empty(tuple(c.v.shape), dtype=go.dtype, device=dev)

    def tile(t: slice) -> None:
        q, k, v = _heads(c.q[t, ...]), _heads(c.k[t, ...]), _heads(c.v[t, ...])
        g = _heads(go[t, ...])
        p = _probabilities(q, k, c.scale, c.row_max[t, ...], c.inv_sum[t, ...])
        gv[t, ...] = _heads(p.mT @ g)
        gs = g @ v.mT  # gp, turned into gs in place
        gs -= xp.sum(g * _heads(c.o[t, ...]), axis=-1, keepdims=True)
        gs *= p
        del p
        gq[t, ...] = _heads((gs @ k) * c.scale)
        gk[t, ...] = _heads((gs.mT @ q) * c.scale)

    backend.map_tiles(tile, B, _tile(c.q, c.k, 2), xp)
    return gq, gk, gv
