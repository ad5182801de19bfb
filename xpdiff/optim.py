"""Optimisers and training helpers: AdamW, warmup + cosine schedule, clipping, EMA.

All state is kept as arrays of the parameters' namespace, and exported as a
flat ``name -> array`` dict plus JSON scalars for checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

from . import backend
from .nn.module import Module

__all__ = ["EMA", "SGD", "AdamW", "clip_grad_norm", "warmup_cosine"]


def warmup_cosine(step: int, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Learning rate at ``step``: linear warmup over ``warmup`` steps, then cosine to ``min_lr``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm(model: Module, max_norm: float | None) -> float:
    """Scale all gradients so their global L2 norm is at most ``max_norm``; return the norm
    before clipping (``inf``/``nan`` are returned as they are, and nothing is scaled)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    xp = backend.get_namespace(params[0].grad)
    total = math.sqrt(sum(float(xp.sum(p.grad * p.grad)) for p in params))
    if max_norm is not None and math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            p.grad = p.grad * scale
    return total


class SGD:
    """Plain gradient descent: ``p -= lr * grad``."""

    def __init__(self, model: Module, lr: float = 1e-2):
        self.model, self.lr = model, lr

    def step(self) -> None:
        for p in self.model.parameters():
            if p.grad is not None:
                p.data = p.data - self.lr * p.grad


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter).

    ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``;
    ``p -= lr (m_hat / (sqrt(v_hat) + eps) + weight_decay p)``.
    Parameters without a gradient are left alone.
    """

    def __init__(self, model: Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        self.model = model
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0
        self.m: dict[str, Any] = {}
        self.v: dict[str, Any] = {}

    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1 = 1.0 - b1**self.t
        c2 = 1.0 - b2**self.t
        for name, p in self.model.named_parameters():
            g = p.grad
            if g is None:
                continue
            xp = backend.get_namespace(g)
            if name not in self.m:
                self.m[name] = xp.zeros_like(p.data)
                self.v[name] = xp.zeros_like(p.data)
            m = self.m[name] = b1 * self.m[name] + (1.0 - b1) * g
            v = self.v[name] = b2 * self.v[name] + (1.0 - b2) * (g * g)
            update = (m / c1) / (xp.sqrt(v / c2) + self.eps)
            if self.weight_decay:
                update = update + self.weight_decay * p.data
            p.data = p.data - self.lr * update

    def state_dict(self) -> tuple[dict[str, Any], dict]:
        """``(arrays, scalars)``: moment arrays named ``m.<param>``/``v.<param>``, and JSON."""
        arrays = {f"m.{k}": a for k, a in self.m.items()}
        arrays.update({f"v.{k}": a for k, a in self.v.items()})
        scalars = {"t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                   "weight_decay": self.weight_decay}
        return arrays, scalars

    def load_state_dict(self, arrays: dict[str, Any], scalars: dict) -> None:
        params = dict(self.model.named_parameters())
        self.t = int(scalars["t"])
        self.m, self.v = {}, {}
        for key, a in arrays.items():
            kind, _, name = key.partition(".")
            if name not in params or kind not in ("m", "v"):
                raise KeyError(f"AdamW.load_state_dict: unexpected state entry {key!r}")
            p = params[name].data
            val = backend.asarray(backend.to_numpy(a), backend.get_namespace(p), dtype=p.dtype)
            (self.m if kind == "m" else self.v)[name] = val


class EMA:
    """Exponential moving average of a model's parameters (used for sampling).

    ``shadow = d * shadow + (1 - d) * param`` with ``d = min(decay, (1 + n) / (10 + n))``
    after ``n`` updates, so early averages are not dominated by the initial weights.
    """

    def __init__(self, model: Module, decay: float = 0.999):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: p.data for k, p in model.named_parameters()}

    def update(self, model: Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in model.named_parameters():
            self.shadow[k] = d * self.shadow[k] + (1.0 - d) * p.data

    def copy_to(self, model: Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self.shadow)

    def state_dict(self) -> tuple[dict[str, Any], dict]:
        return dict(self.shadow), {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, arrays: dict[str, Any], scalars: dict) -> None:
        missing = sorted(set(self.shadow) - set(arrays))
        if missing:
            raise KeyError(f"EMA.load_state_dict: missing entries {missing}")
        for k, ref in self.shadow.items():
            self.shadow[k] = backend.asarray(
                backend.to_numpy(arrays[k]), backend.get_namespace(ref), dtype=ref.dtype)
        self.decay = float(scalars["decay"])
        self.updates = int(scalars["updates"])
