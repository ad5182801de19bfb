"""Losses: each returns the scalar loss and the gradient of the prediction."""

from __future__ import annotations

import math
from typing import Any

from .. import backend

__all__ = ["cross_entropy", "mse_loss"]


def mse_loss(pred: Any, target: Any, weight: Any | None = None) -> tuple[Any, Any]:
    """Mean squared error; returns ``(loss, d loss / d pred)``.

    Without ``weight`` the mean runs over every element.  With ``weight`` (B,), one
    non-negative factor per sample along the first axis, the loss is
    ``sum_b weight[b] * mean(diff[b]**2) / B``: each sample's mean squared error,
    weighted, averaged over the batch (equal to the plain mean when all weights are 1).
    """
    xp = backend.get_namespace(pred, target)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"mse_loss: expected prediction and target of one shape, got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    diff = pred - target
    n = math.prod(pred.shape)
    if weight is None:
        return xp.sum(diff * diff) / n, diff * (2.0 / n)
    if pred.ndim < 1 or tuple(weight.shape) != (pred.shape[0],):
        want = f"({pred.shape[0]},)" if pred.ndim else "(B,) for a batched prediction"
        raise ValueError(
            f"mse_loss: expected one weight per sample, shape {want}, got {tuple(weight.shape)}"
        )
    w = xp.reshape(xp.astype(weight, pred.dtype), (pred.shape[0],) + (1,) * (pred.ndim - 1))
    wd = w * diff
    return xp.sum(wd * diff) / n, wd * (2.0 / n)


def cross_entropy(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Mean softmax cross-entropy of logits (N, K) and integer labels (N,).

    Returns ``(loss, d loss / d logits)``.
    """
    xp = backend.get_namespace(logits, labels)
    N, K = logits.shape
    z = logits - xp.max(logits, axis=1, keepdims=True)
    ez = xp.exp(z)
    se = xp.sum(ez, axis=1, keepdims=True)
    logp = z - xp.log(se)
    onehot = xp.astype(
        labels[:, None] == xp.arange(K, device=backend.device(labels))[None, :], logits.dtype
    )
    loss = -xp.sum(logp * onehot) / N
    return loss, (ez / se - onehot) / N
