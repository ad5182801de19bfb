"""Noise-schedule tables and inference timestep grids, shared by every scheduler.

* ``betas`` and ``alphas_cumprod`` are built on the host in pure Python with the same
  float32 roundings HuggingFace diffusers applies, so both libraries walk exactly the
  same schedule;
* the inference timestep grids: ``leading``, ``trailing``, ``linspace``.
"""

from __future__ import annotations

import math
import struct

__all__ = [
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "beta_table",
    "cumprod_table",
    "f32",
    "spaced_timesteps",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------
# host-side schedule tables
# ---------------------------------------------------------------------------
def f32(x: float) -> float:
    """``x`` rounded to the nearest float32, returned as a Python float.

    Step coefficients go through this after every scalar operation: diffusers
    does that scalar arithmetic on float32 tensors, and near t = T the predicted
    x_0 divides by sqrt(abar_t) ~ 0.006, which turns a one-ulp difference in a
    coefficient into ~1e-5 in the output.  (For + - * / and sqrt, rounding the
    double result to float32 equals the float32 operation.)"""
    return struct.unpack("f", struct.pack("f", x))[0]


def _linspace_f32(start: float, end: float, n: int) -> list[float]:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` value for value.

    PyTorch works in float32: it rounds the end points, their difference and
    the step (a double operation rounded to float32 gives the float32 result for
    + - * /, as 53 >= 2 * 24 + 2).  It fills the first half forwards from
    ``start`` and the second half backwards from ``end``, each entry with a fused
    multiply-add, i.e. one rounding of the exact value.  For beta-sized inputs
    that exact value fits in a double, so one float32 rounding of the double
    expression reproduces it (the tests compare every entry with torch).
    """
    lo, hi = f32(start), f32(end)
    if n == 1:
        return [lo]
    step = f32(f32(hi - lo) / (n - 1))
    half = n // 2
    return [f32(lo + step * i) if i < half else f32(hi - step * (n - 1 - i)) for i in range(n)]


def _cosine_betas(n: int, max_beta: float = 0.999) -> list[float]:
    """Betas of the squared-cosine alpha-bar (Nichol & Dhariwal 2021, eq. 17), capped."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return [f32(min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta)) for i in range(n)]


def beta_table(schedule: str, beta_start: float, beta_end: float, n: int) -> list[float]:
    """Betas (length ``n``) as float32-rounded Python floats, as diffusers makes them."""
    if schedule == "linear":
        return _linspace_f32(beta_start, beta_end, n)
    if schedule == "scaled_linear":
        # linearly spaced square roots, squared in float32 (latent diffusion)
        return [f32(r * r) for r in _linspace_f32(beta_start**0.5, beta_end**0.5, n)]
    if schedule == "squaredcos_cap_v2":
        return _cosine_betas(n)
    raise ValueError(f"beta_table: expected one of {BETA_SCHEDULES}, got {schedule!r}")


def cumprod_table(betas: list[float]) -> list[float]:
    """abar_t = prod_{s<=t} (1 - beta_s): float32 alphas, accumulated in double,
    each output rounded to float32 (what ``torch.cumprod`` does on float32 CPU)."""
    out = []
    acc = 1.0
    for b in betas:
        acc *= f32(1.0 - b)
        out.append(f32(acc))
    return out


# ---------------------------------------------------------------------------
# inference timestep grids
# ---------------------------------------------------------------------------
def _arange_down(start: float, stop: float, step: float) -> list[float]:
    """``numpy.arange(start, stop, step)`` for floats, same length and values."""
    count = math.ceil((stop - start) / step)
    if count <= 0:
        return []
    if count == 1:
        return [float(start)]
    second = start + step
    delta = second - start  # NumPy fills from the first two entries
    return [float(start), second] + [start + i * delta for i in range(2, count)]


def spaced_timesteps(spacing: str, num_train: int, num_inference: int, offset: int) -> list[int]:
    """Descending training timesteps visited by a sampler of ``num_inference`` steps.

    The three spacings of Lin et al. 2023 ("Common Diffusion Noise Schedules and
    Sample Steps are Flawed", table 2), rounded half to even as NumPy does:
    ``linspace`` spreads the steps over [0, num_train - 1]; ``leading`` takes
    multiples of ``num_train // num_inference`` from 0 and adds ``offset``;
    ``trailing`` steps down from ``num_train`` by ``num_train / num_inference``
    and subtracts one.  ``offset`` only applies to ``leading`` (as in diffusers).
    """
    if spacing == "linspace":
        if num_inference == 1:
            grid = [0.0]
        else:
            step = (num_train - 1) / (num_inference - 1)
            grid = [i * step for i in range(num_inference - 1)] + [float(num_train - 1)]
        return [round(v) for v in reversed(grid)]
    if spacing == "leading":
        ratio = num_train // num_inference
        return [i * ratio + offset for i in reversed(range(num_inference))]
    if spacing == "trailing":
        # NumPy's arange can overshoot by one entry when num_train / num_inference is
        # inexact (T = 17, n = 7 gives an 8th value near 0, i.e. timestep -1): keep n
        grid = _arange_down(float(num_train), 0.0, -(num_train / num_inference))
        return [round(v) - 1 for v in grid[:num_inference]]
    raise ValueError(f"spaced_timesteps: expected one of {TIMESTEP_SPACINGS}, got {spacing!r}")
