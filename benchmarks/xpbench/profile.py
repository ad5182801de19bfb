"""The ``layers`` section: where one xpdiff training step spends its time.

``OPS`` is the one table of what is timed: ``(module, function name)`` of the functional ops.
To time another op, add its row; to count its FLOPs, add a counter to ``FLOPS`` under the same
name.  A row whose module or function does not exist (an op renamed or not written yet) is
skipped with a one-line note, so the table may run ahead of the library.

How an op is hooked: the function is replaced by a timing wrapper in its own module
(``xpdiff.functional.conv.conv2d_forward``), which is where the layers look it up
(``from ..functional import conv as fc`` ... ``fc.conv2d_forward``), and in every xpdiff module
that imported it by name (``from ..functional.embeddings import timestep_embedding`` in
xpdiff.nn.blocks): those copies are the module namespaces that refer to the same function
object (``gc.get_referrers``), so no list of callers has to be kept up to date.  A reference
held anywhere else (a dict of ops, a default argument, a closure) is not hooked; the time of
such calls shows up as "other (glue)".  Everything is restored on exit.

Times and FLOPs are both *exclusive*: when a timed op calls another (``conv2d_backward``
computes a stride-1 input gradient with ``conv2d_forward``), the inner call's time and FLOPs
go to the inner op's row and are subtracted from the outer one, so every row's GFLOP/s is
work / time of the same code and the rows add up to the step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from .harness import XpdiffRunner, fmt, print_table

OPS: tuple[tuple[str, str], ...] = (
    ("xpdiff.functional.conv", "conv2d_forward"),
    ("xpdiff.functional.conv", "conv2d_backward"),
    ("xpdiff.functional.norm", "group_norm_forward"),
    ("xpdiff.functional.norm", "group_norm_backward"),
    ("xpdiff.functional.activations", "silu_forward"),
    ("xpdiff.functional.activations", "silu_backward"),
    ("xpdiff.functional.activations", "relu_forward"),
    ("xpdiff.functional.activations", "relu_backward"),
    ("xpdiff.functional.linear", "linear_forward"),
    ("xpdiff.functional.linear", "linear_backward"),
    ("xpdiff.functional.attention", "sdpa_forward"),
    ("xpdiff.functional.attention", "sdpa_backward"),
    ("xpdiff.functional.resampling", "upsample_nearest_forward"),
    ("xpdiff.functional.resampling", "upsample_nearest_backward"),
    ("xpdiff.functional.embeddings", "embedding_forward"),
    ("xpdiff.functional.embeddings", "embedding_backward"),
    ("xpdiff.functional.embeddings", "timestep_embedding"),
    ("xpdiff.functional.losses", "mse_loss"),
)

OPTIMIZER_ROW = "optimizer (AdamW.step)"


# ---------------------------------------------------------------------------
# FLOP counters: (bound arguments of the call, its result) -> FLOPs of its matrix products
# ---------------------------------------------------------------------------
# Layouts.  Convolutions: NCHW is the public one (and the default); NHWC/channels-last puts
# channels on the last axis.  A counter takes the layout from the op's ``layout`` argument,
# else from the ``layout`` attribute (or a layout string item) of its ``cache`` argument (a
# backward's), else from the ``layout=`` keyword given in FLOPS (for an op whose name fixes
# it, e.g. ``functools.partial(conv_forward_flops, layout="NHWC")``), else NCHW.  Shapes come
# from the arguments and the result, not from the cache: conv FLOPs = 2 * (output pixels
# B*Ho*Wo) * (weight size O*C*kh*kw), whichever axis order the weight has (groups = 1).
# Attention: "BNHD" is token-major (B, N, heads, d), what xpdiff.functional.attention takes;
# "BHND" is (B, heads, N, d).  Only the keys' token axis matters (M in 4*B*h*N*M*d).
CHANNELS_LAST = ("NHWC", "CHANNELS_LAST")
LAYOUT_NAMES = ("NCHW", *CHANNELS_LAST, "BNHD", "BHND")
SDPA_LAYOUT = "BNHD"


def numel(a: Any) -> int:
    return math.prod(tuple(a.shape))


def layout_of(p: dict, default: str | None = None) -> str:
    """The layout of an op call: its ``layout`` argument, the layout its ``cache`` (a
    backward's) records, ``default``, or "NCHW"."""
    lay = p.get("layout")
    if isinstance(lay, str):
        return lay
    cache = p.get("cache")
    lay = getattr(cache, "layout", None)
    if isinstance(lay, str):
        return lay
    if isinstance(cache, tuple):
        for v in cache:
            if isinstance(v, str) and v.upper() in LAYOUT_NAMES:
                return v
    return default or "NCHW"


def channel_axis(layout: str) -> int:
    return -1 if layout.upper() in CHANNELS_LAST else 1


def conv_forward_flops(p: dict, out: Any, layout: str | None = None) -> float:
    """2*B*Ho*Wo*O*C*kh*kw: channels of the input ``x`` (axis 1 or, channels-last, the last
    one) and of the output ``y`` (``out[0]``) per the layout; C*kh*kw*O is the weight size."""
    ax = channel_axis(layout_of(p, layout))
    x, w, y = p["x"], p["w"], out[0]
    C, O = x.shape[ax], y.shape[ax]
    kk = numel(w) // (O * C)  # kh*kw
    return 2.0 * (numel(y) // O) * O * C * kk


def conv_backward_flops(p: dict, out: Any, layout: str | None = None) -> float:
    """Weight and input gradient: twice the forward, 4*B*Ho*Wo*O*C*kh*kw, from ``gy`` (in the
    forward's layout) and the weight gradient ``out[1]`` (the weight's shape)."""
    ax = channel_axis(layout_of(p, layout))
    gy, gw = p["gy"], out[1]
    return 4.0 * (numel(gy) // gy.shape[ax]) * numel(gw)


def linear_forward_flops(p: dict, out: Any) -> float:
    """2*N*in*out: ``y = out[0]`` holds N*out numbers, ``x`` ends in ``in``."""
    return 2.0 * numel(out[0]) * p["x"].shape[-1]


def linear_backward_flops(p: dict, out: Any) -> float:
    """Twice the forward: N = gy.size / out, weight gradient ``out[1]`` (out, in)."""
    gy = p["gy"]
    return 4.0 * (numel(gy) // gy.shape[-1]) * numel(out[1])


def _keys_axis(p: dict, layout: str | None) -> int:
    return 2 if layout_of(p, layout or SDPA_LAYOUT).upper() == "BHND" else 1


def sdpa_forward_flops(p: dict, out: Any, layout: str | None = None) -> float:
    """q @ k^T and p @ v: 4*B*h*N*M*d = 4 * q.size * M, M the number of keys."""
    return 4.0 * numel(p["q"]) * p["k"].shape[_keys_axis(p, layout)]


def sdpa_backward_flops(p: dict, out: Any, layout: str | None = None) -> float:
    """2.5 times the forward (it recomputes q @ k^T); q and k shapes from ``gq``, ``gk``."""
    return 2.5 * 4.0 * numel(out[0]) * out[1].shape[_keys_axis(p, layout)]


FLOPS: dict[str, Callable[..., float]] = {
    "conv2d_forward": conv_forward_flops,
    "conv2d_backward": conv_backward_flops,
    "linear_forward": linear_forward_flops,
    "linear_backward": linear_backward_flops,
    "sdpa_forward": sdpa_forward_flops,
    "sdpa_backward": sdpa_backward_flops,
    # a channels-last op under its own name:
    #     "conv2d_forward_nhwc": functools.partial(conv_forward_flops, layout="NHWC"),
}


class OpRecorder:
    """Exclusive wall time, call count and counted FLOPs per wrapped op."""

    def __init__(self) -> None:
        self.time: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.flops: dict[str, float] = {}
        self.notes: dict[str, str] = {}  # op -> why its FLOPs could not be counted
        self.skipped: list[str] = []  # OPS rows not found (see instrumented)
        self.hooked: dict[str, list[str]] = {}  # op -> "module.attribute" replaced
        self._stack: list[list[float]] = []  # per open call: [child time, child FLOPs]

    def wrap(self, name: str, fn: Callable) -> Callable:
        counter = FLOPS.get(name)
        sig = None
        if counter is not None:
            with contextlib.suppress(TypeError, ValueError):
                sig = inspect.signature(fn)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([0.0, 0.0])
            t0 = time.perf_counter()
            out = None
            try:
                out = fn(*args, **kwargs)
                return out
            finally:
                dt = time.perf_counter() - t0
                child_t, child_f = self._stack.pop()
                counted = child_f  # an op without a counter passes its children's on
                if counter is not None and out is not None and name not in self.notes:
                    try:
                        if sig is None:
                            raise TypeError("no signature to bind the arguments to")
                        b = sig.bind(*args, **kwargs)
                        b.apply_defaults()
                        counted = counter(b.arguments, out)
                    except Exception as err:  # a changed signature must not stop the run
                        self.notes[name] = f"FLOPs not counted ({type(err).__name__}: {err})"
                self.time[name] = self.time.get(name, 0.0) + dt - child_t
                self.calls[name] = self.calls.get(name, 0) + 1
                if counted - child_f:
                    self.flops[name] = self.flops.get(name, 0.0) + counted - child_f
                if self._stack:
                    self._stack[-1][0] += dt
                    self._stack[-1][1] += counted

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed


_NOTED: set[str] = set()  # skipped-op notes already printed (once per process)


def _note(msg: str) -> None:
    if msg not in _NOTED:
        _NOTED.add(msg)
        print(f"note: {msg}", flush=True)


def _named_copies(fn: Callable, home: Any) -> list[tuple[Any, str]]:
    """(module, attribute) of every xpdiff module other than ``home`` whose namespace holds
    ``fn`` itself: the ``from ... import name`` copies."""
    sites = []
    for ref in gc.get_referrers(fn):
        modname = ref.get("__name__") if isinstance(ref, dict) else None
        if not isinstance(modname, str) or not (
            modname == "xpdiff" or modname.startswith("xpdiff.")
        ):
            continue
        mod = sys.modules.get(modname)
        if mod is None or mod is home or vars(mod) is not ref:
            continue
        sites += [(mod, attr) for attr, val in list(ref.items()) if val is fn]
    return sites


def resolve_ops(
    ops: tuple[tuple[str, str], ...] = OPS,
) -> tuple[list[tuple[str, Any, Callable]], list[str]]:
    """The ops of the table that exist, as (name, module, function), and a note for each
    row skipped."""
    found, skipped = [], []
    for modname, name in ops:
        try:
            mod = importlib.import_module(modname)
        except ImportError as err:
            skipped.append(f"{modname}.{name} not timed: module not importable ({err})")
            continue
        fn = getattr(mod, name, None)
        if not callable(fn):
            skipped.append(f"{modname}.{name} not timed: no such function")
            continue
        found.append((name, mod, inspect.unwrap(fn)))
    return found, skipped


@contextlib.contextmanager
def instrumented(optimizer: Any = None, ops: tuple[tuple[str, str], ...] = OPS):
    """Wrap the ``ops`` (see the module docstring) and ``optimizer.step`` in timers; restore
    everything on exit.  Yields the OpRecorder."""
    rec = OpRecorder()
    found, rec.skipped = resolve_ops(ops)
    for msg in rec.skipped:
        _note(msg)
    patched: list[tuple[Any, str, Any]] = []
    try:
        for name, mod, fn in found:
            wrapper = rec.wrap(name, fn)
            for site, attr in [(mod, name), *_named_copies(fn, mod)]:
                patched.append((site, attr, getattr(site, attr)))
                setattr(site, attr, wrapper)
                rec.hooked.setdefault(name, []).append(f"{site.__name__}.{attr}")
        if optimizer is not None:
            optimizer.step = rec.wrap(OPTIMIZER_ROW, optimizer.step)
        yield rec
    finally:
        for site, attr, val in reversed(patched):
            setattr(site, attr, val)
        if optimizer is not None and "step" in vars(optimizer):
            del optimizer.step  # back to the class method


def section_layers(name: str, xr: XpdiffRunner, res: dict, args: argparse.Namespace) -> None:
    xr.train_step()  # warm (the model may not have trained yet)
    with instrumented(xr.opt) as rec:
        t0 = time.perf_counter()
        xr.train_step()
        total = time.perf_counter() - t0
    for op, why in rec.notes.items():
        _note(f"{op}: {why}")
    ops = sorted(rec.time, key=lambda k: -rec.time[k])
    res["layers"] = {
        "step_s": total,
        "ops": {
            k: {"s": rec.time[k], "calls": rec.calls[k], "flops": rec.flops.get(k, 0.0)}
            for k in ops
        },
        "other_s": total - sum(rec.time.values()),
        "flops_per_step": sum(rec.flops.values()),
    }
    if rec.skipped or rec.notes:
        res["layers"]["notes"] = rec.skipped + [f"{k}: {v}" for k, v in rec.notes.items()]


def print_layers(name: str, lay: dict, train: dict | None, gemm: dict | None) -> None:
    total = lay["step_s"]
    rows = []
    for k, v in lay["ops"].items():
        gf = f"{v['flops'] / v['s'] / 1e9:.1f}" if v["flops"] and v["s"] > 0 else ""
        rows.append(
            [
                k,
                v["calls"],
                fmt(v["s"] * 1e3),
                f"{100 * v['s'] / total:.1f}",
                f"{v['flops'] / 1e9:.2f}" if v["flops"] else "",
                gf,
            ]
        )
    rows.append(
        [
            "other (glue)",
            "",
            fmt(lay["other_s"] * 1e3),
            f"{100 * lay['other_s'] / total:.1f}",
            "",
            "",
        ]
    )
    rows.append(
        [
            "total (instrumented step)",
            "",
            fmt(total * 1e3),
            "100.0",
            f"{lay['flops_per_step'] / 1e9:.2f}",
            "",
        ]
    )
    print_table(
        f"[{name}] xpdiff training step by op (one step, exclusive time)",
        ["op", "calls", "ms", "%", "GFLOP", "GFLOP/s"],
        rows,
    )
    flops = lay["flops_per_step"]
    peak = (gemm or {}).get("peak_numpy_gflops")
    lines = [f"counted FLOPs per step (conv/linear/attention matmuls): {flops / 1e9:.2f} GFLOP"]
    for who in ("xpdiff", "torch"):
        t = (train or {}).get(f"{who}_median_s")
        if t:
            eff = flops / t / 1e9
            pct = f" = {100 * eff / peak:.1f}% of the {peak:.0f} GFLOP/s GEMM peak" if peak else ""
            lines.append(f"{who} effective: {eff:.1f} GFLOP/s (median step {t * 1e3:.0f} ms){pct}")
            lay[f"{who}_effective_gflops"] = eff
            if peak:
                lay[f"{who}_pct_of_peak"] = 100 * eff / peak
    print("\n".join(lines))
