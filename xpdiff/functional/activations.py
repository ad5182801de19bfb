"""Elementwise activations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import backend

__all__ = [
    "ReluCache",
    "SiluCache",
    "relu_backward",
    "relu_forward",
    "sigmoid",
    "silu_backward",
    "silu_forward",
]


@dataclass
class SiluCache:
    """What ``silu_backward`` needs: the input and its sigmoid."""

    x: Any
    s: Any


@dataclass
class ReluCache:
    """What ``relu_backward`` needs: where the input was positive."""

    mask: Any


def sigmoid(x: Any) -> Any:
    """``1 / (1 + exp(-x))`` as a new array; ``x`` is left alone."""
    e = backend.exp_inplace(-x)
    e += 1.0
    return backend.reciprocal_inplace(e)


def silu_forward(x: Any) -> tuple[Any, SiluCache]:
    """``y = x * sigmoid(x)`` (Elfwing et al., 2018); the cache keeps x and sigmoid(x)."""
    s = sigmoid(x)
    return x * s, SiluCache(x, s)


def silu_backward(cache: SiluCache, gy: Any) -> Any:
    """``dy/dx = s (1 + x (1 - s))`` with ``s = sigmoid(x)``."""
    x, s = cache.x, cache.s
    d = 1.0 - s  # one temporary, updated in place
    d *= x
    d += 1.0
    d *= s
    d *= gy
    return d


def relu_forward(x: Any) -> tuple[Any, ReluCache]:
    """``y = max(x, 0)``; the cache keeps the mask ``x > 0``."""
    xp = backend.get_namespace(x)
    mask = x > 0
    return xp.where(mask, x, xp.zeros_like(x)), ReluCache(mask)


def relu_backward(cache: ReluCache, gy: Any) -> Any:
    """``gy`` where the input was positive, else 0."""
    xp = backend.get_namespace(gy)
    return xp.where(cache.mask, gy, xp.zeros_like(gy))
