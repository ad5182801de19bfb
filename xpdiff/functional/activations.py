"""Elementwise activations."""

from __future__ import annotations

from typing import Any

from .. import backend

__all__ = ["relu_backward", "relu_forward", "sigmoid", "silu_backward", "silu_forward"]


def sigmoid(x: Any) -> Any:
    """``1 / (1 + exp(-x))`` as a new array; ``x`` is left alone."""
    e = backend.exp_inplace(-x)
    e += 1.0
    return backend.reciprocal_inplace(e)


def silu_forward(x: Any) -> tuple[Any, tuple]:
    """``y = x * sigmoid(x)``; cache ``(x, sigmoid(x))``."""
    s = sigmoid(x)
    return x * s, (x, s)


def silu_backward(cache: tuple, gy: Any) -> Any:
    """``dy/dx = s (1 + x (1 - s))`` with ``s = sigmoid(x)``."""
    x, s = cache
    d = 1.0 - s                 # one temporary, updated in place
    d *= x
    d += 1.0
    d *= s
    d *= gy
    return d


def relu_forward(x: Any) -> tuple[Any, tuple]:
    """``y = max(x, 0)``; cache the mask ``x > 0``."""
    xp = backend.get_namespace(x)
    mask = x > 0
    return xp.where(mask, x, xp.zeros_like(x)), (mask,)


def relu_backward(cache: tuple, gy: Any) -> Any:
    xp = backend.get_namespace(gy)
    (mask,) = cache
    return xp.where(mask, gy, xp.zeros_like(gy))
