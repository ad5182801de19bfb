"""Optimisers and training helpers: AdamW, warmup + cosine schedule, clipping, EMA.

All state is kept as arrays of the parameters' namespace, and exported as a
flat ``name -> array`` dict plus JSON scalars for checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

from . import backend
from ._validation import ArgumentTypeError, check_float, check_int
from .nn.module import Module

__all__ = ["EMA", "SGD", "AdamW", "clip_grad_norm", "warmup_cosine"]


def warmup_cosine(step: int, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Learning rate at ``step``: linear warmup over ``warmup`` steps, then cosine to ``min_lr``."""
    where = "warmup_cosine"
    check_int(where, "step", step, min=0)
    check_float(where, "base_lr", base_lr, min=0.0)
    check_int(where, "warmup", warmup, min=0)
    check_int(where, "total", total, min=0)
    check_float(where, "min_lr", min_lr, min=0.0)
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm(model: Module, max_norm: float | None) -> float:
    """Scale all gradients so their global L2 norm is at most ``max_norm``; return the norm
    before clipping (``inf``/``nan`` are returned as they are, and nothing is scaled).

    ``max_norm`` is a finite number > 0, or None for no clipping.
    """
    max_norm = check_float(
        "clip_grad_norm", "max_norm", max_norm, min=0.0, min_open=True, none=True
    )
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    xp = backend.get_namespace(params[0].grad)
    # one device read for the whole model: the per-parameter sums stay arrays until the end
    squares = [xp.astype(xp.sum(p.grad * p.grad), xp.float64) for p in params]
    total = math.sqrt(float(xp.sum(xp.stack(squares))))
    if max_norm is not None and math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            p.grad = p.grad * scale
    return total


class SGD:
    """Plain gradient descent: ``p -= lr * grad``."""

    def __init__(self, model: Module, lr: float = 1e-2):
        self.model, self.lr = model, check_float("SGD", "lr", lr, min=0.0)

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

    def __init__(
        self,
        model: Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        where = "AdamW"
        self.model = model
        self.lr = check_float(where, "lr", lr, min=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ArgumentTypeError(
                f"{where}: expected betas to be a pair of numbers in [0, 1), got {betas!r}"
            )
        self.betas = tuple(
            check_float(where, f"betas[{i}]", b, min=0.0, max=1.0, max_open=True)
            for i, b in enumerate(betas)
        )
        self.eps = check_float(where, "eps", eps, min=0.0, min_open=True)
        self.weight_decay = check_float(where, "weight_decay", weight_decay, min=0.0)
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
        """``(arrays, scalars)``: moment arrays named ``m.<param>``/``v.<param>``, and JSON
        scalars (step count, hyper-parameters, the names of the parameters with moments)."""
        arrays = {f"m.{k}": a for k, a in self.m.items()}
        arrays.update({f"v.{k}": a for k, a in self.v.items()})
        scalars = {
            "t": self.t,
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "params": sorted(self.m),
        }
        return arrays, scalars

    def load_state_dict(self, arrays: dict[str, Any], scalars: dict) -> None:
        """Restore the moments and step count of :meth:`state_dict`.

        Raises:
            ValueError: an entry for no parameter, a moment of the wrong shape, ``m`` and
                ``v`` for different parameters, moments missing for parameters the state
                says it holds (all of them when it does not say, after a step), or a bad
                step count.  Nothing is changed then.
        """
        where = "AdamW.load_state_dict"
        if not isinstance(scalars, dict):
            raise ValueError(f"{where}: expected a dict of scalars, got {scalars!r:.60}")
        t = check_int(where, "t", scalars.get("t"), min=0)
        params = dict(self.model.named_parameters())
        m: dict[str, Any] = {}
        v: dict[str, Any] = {}
        problems = []
        for key, a in arrays.items():
            kind, _, name = key.partition(".")
            if name not in params or kind not in ("m", "v"):
                problems.append(f"unexpected entry {key!r}")
                continue
            p = params[name]
            if tuple(a.shape) != p.shape:
                problems.append(f"{key}: expected shape {p.shape}, got {tuple(a.shape)}")
                continue
            val = backend.asarray(backend.to_numpy(a), backend.get_namespace(p.data), dtype=p.dtype)
            (m if kind == "m" else v)[name] = val
        listed = scalars.get("params")
        expected = set(listed) if isinstance(listed, list) else (set(params) if t else set())
        for kind, got in (("m", m), ("v", v)):
            missing = sorted(expected - set(got))
            if missing:
                problems.append(
                    f"missing {kind} moments ({len(missing)}): "
                    f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}"
                )
        if set(m) != set(v) and not problems:
            problems.append("m and v moments cover different parameters")
        if problems:
            raise ValueError(f"{where}: " + "; ".join(problems))
        self.t, self.m, self.v = t, m, v


class EMA:
    """Exponential moving average of a model's parameters (used for sampling).

    ``shadow = d * shadow + (1 - d) * param`` with ``d = min(decay, (1 + n) / (10 + n))``
    after ``n`` updates, so early averages are not dominated by the initial weights.
    """

    def __init__(self, model: Module, decay: float = 0.999):
        self.decay = check_float("EMA", "decay", decay, min=0.0, max=1.0)
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
        """Restore the averages and counters of :meth:`state_dict`.

        Raises:
            ValueError: missing, unexpected or wrong-shaped entries, or bad scalars
                (nothing is changed then).
        """
        where = "EMA.load_state_dict"
        if not isinstance(scalars, dict):
            raise ValueError(f"{where}: expected a dict of scalars, got {scalars!r:.60}")
        decay = check_float(where, "decay", scalars.get("decay"), min=0.0, max=1.0)
        updates = check_int(where, "updates", scalars.get("updates"), min=0)
        missing = sorted(set(self.shadow) - set(arrays))
        unexpected = sorted(set(arrays) - set(self.shadow))
        problems = []
        if missing:
            problems.append(
                f"missing entries ({len(missing)}): {', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}"
            )
        if unexpected:
            problems.append(
                f"unexpected entries ({len(unexpected)}): "
                f"{', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''}"
            )
        problems += [
            f"{k}: expected shape {tuple(ref.shape)}, got {tuple(arrays[k].shape)}"
            for k, ref in self.shadow.items()
            if k in arrays and tuple(arrays[k].shape) != tuple(ref.shape)
        ]
        if problems:
            raise ValueError(f"{where}: " + "; ".join(problems))
        self.shadow = {
            k: backend.asarray(
                backend.to_numpy(arrays[k]), backend.get_namespace(ref), dtype=ref.dtype
            )
            for k, ref in self.shadow.items()
        }
        self.decay, self.updates = decay, updates
