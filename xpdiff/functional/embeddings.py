"""Sinusoidal timestep embeddings and table look-ups."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import backend

__all__ = ["EmbeddingCache", "embedding_backward", "embedding_forward", "timestep_embedding"]


@dataclass
class EmbeddingCache:
    """What ``embedding_backward`` needs: the looked-up indices and the table's length."""

    idx: Any  # (N,) integers
    num: int


def timestep_embedding(
    timesteps: Any,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    max_period: float = 10000.0,
    dtype: Any = None,
) -> Any:
    """Sinusoidal embedding (N, dim) of timesteps (N,), as in DDPM / diffusers.

    Frequency ``k`` is ``exp(-ln(max_period) * k / (dim/2 - downscale_freq_shift))``;
    the halves are ``[sin, cos]`` (``[cos, sin]`` when ``flip_sin_to_cos``) and an odd
    ``dim`` gets a zero column.  Computed in float32, like diffusers, then cast to
    ``dtype`` (so float64 models see the same embedding as diffusers' do).
    """
    xp = backend.get_namespace(timesteps)
    dev = backend.device(timesteps)
    half = dim // 2
    exponent = -math.log(max_period) * xp.arange(half, dtype=xp.float32, device=dev)
    f = xp.exp(exponent / (half - downscale_freq_shift))
    arg = xp.astype(timesteps, xp.float32)[:, None] * f[None, :]
    s, c = xp.sin(arg), xp.cos(arg)
    emb = xp.concat([c, s] if flip_sin_to_cos else [s, c], axis=1)
    if dim % 2:
        emb = xp.concat([emb, xp.zeros((emb.shape[0], 1), dtype=emb.dtype, device=dev)], axis=1)
    return emb if dtype is None else xp.astype(emb, dtype)


def embedding_forward(w: Any, idx: Any) -> tuple[Any, EmbeddingCache]:
    """Rows ``w[idx]`` (N, dim) of a table w (num, dim); the cache keeps idx."""
    xp = backend.get_namespace(w, idx)
    return xp.take(w, idx, axis=0), EmbeddingCache(idx, w.shape[0])


def embedding_backward(cache: EmbeddingCache, gy: Any) -> Any:
    """Table gradient (num, dim): every repeated index ADDS its row (one-hot matmul)."""
    xp = backend.get_namespace(gy)
    idx, num = cache.idx, cache.num
    rows = xp.arange(num, device=backend.device(idx))
    onehot = xp.astype(idx[:, None] == rows[None, :], gy.dtype)
    return onehot.T @ gy
