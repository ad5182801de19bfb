#!/usr/bin/env python
"""xpdiff against PyTorch eager (diffusers' UNet2DModel): speed, memory, where the time goes.

Sections (``--sections``, all by default):

* ``train``  training-step throughput: forward, MSE loss against the noise, backward,
  AdamW step; xpdiff on NumPy float32 against diffusers' UNet2DModel on PyTorch CPU
  eager, same config, same initial weights, same thread count, steps alternated
  (x, t, x, t, ...), warm-up excluded, median of ``--repeats``.
* ``infer``  forward-only throughput (``no_grad`` on both sides), same protocol.
* ``memory`` peak RSS above the built model over two training steps, each framework in its
  own process.
* ``layers`` per-op time of one xpdiff training step (functional ops wrapped with timers),
  and xpdiff's effective GFLOP/s (counted conv/linear/attention FLOPs / step time).
* ``gemm``   float32 matrix-product GFLOP/s of this machine (NumPy's BLAS and torch).
* ``sample`` wall time of 100 digits, DDIM 50 steps, guidance 2, flagship config.

``--gpu`` runs the training/inference comparison on CUDA instead: xpdiff on CuPy against
torch CUDA eager, batch 128 (skipped with a message when there is no device).

See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without ``pip install -e .``
    sys.path.insert(0, str(ROOT))

SECTIONS = ("train", "infer", "memory", "layers", "gemm", "sample")

CONFIGS: dict[str, dict | None] = {
    "seed14": {
        "sample_size": 14, "in_channels": 1, "out_channels": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2, "norm_num_groups": 32, "num_class_embeds": 10,
    },
    "mnist28": {
        "sample_size": 28, "in_channels": 1, "out_channels": 1,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2, "norm_num_groups": 32, "num_class_embeds": 10,
    },
    "flagship": None,  # TrainConfig().unet_kwargs(), filled in by unet_config()
}

# Functional ops timed by the per-layer breakdown (module -> function names).
TIMED_OPS = {
    "xpdiff.functional.conv": ["conv2d_forward", "conv2d_backward"],
    "xpdiff.functional.norm": ["group_norm_forward", "group_norm_backward"],
    "xpdiff.functional.activations": ["silu_forward", "silu_backward"],
    "xpdiff.functional.linear": ["linear_forward", "linear_backward"],
    "xpdiff.functional.attention": ["sdpa_forward", "sdpa_backward"],
    "xpdiff.functional.resampling": ["upsample_nearest_forward", "upsample_nearest_backward"],
    "xpdiff.functional.embeddings": ["embedding_forward", "embedding_backward",
                                     "timestep_embedding"],
    "xpdiff.functional.losses": ["mse_loss"],
}

LR = 1e-3  # both optimisers: AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------
def unet_config(name: str) -> dict:
    """UNet2DModel keyword arguments of a named config."""
    if name not in CONFIGS:
        raise SystemExit(f"bench: unknown config {name!r}; expected one of {sorted(CONFIGS)}")
    if name == "flagship":
        from xpdiff.training import TrainConfig

        tc = TrainConfig()
        cfg = tc.unet_kwargs()
        cfg["sample_size"] = tc.size
        return cfg
    return dict(CONFIGS[name])


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n## {title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                    for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    print(line)
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    sys.stdout.flush()


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def alternate(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int
              ) -> dict[str, list[float]]:
    """Run the callables in turn (a, b, a, b, ...); ``warmup`` untimed rounds first.

    Each callable must finish its work (synchronise a device) before returning.
    Returns the list of ``repeats`` wall times (s) of each.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def host_inputs(cfg: dict, batch: int, seed: int = 0) -> dict:
    """Noisy samples, target noise, timesteps and labels as NumPy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    size = cfg["sample_size"]
    shape = (batch, cfg["in_channels"], size, size)
    out_shape = (batch, cfg["out_channels"], size, size)
    return {
        "x": rng.standard_normal(shape, dtype=np.float32),
        "noise": rng.standard_normal(out_shape, dtype=np.float32),
        "t": rng.integers(0, 1000, size=batch, dtype=np.int64),
        "c": rng.integers(0, cfg.get("num_class_embeds") or 1, size=batch, dtype=np.int64),
    }


# ---------------------------------------------------------------------------
# the two frameworks
# ---------------------------------------------------------------------------
def diffusers_model(cfg: dict) -> Any:
    import diffusers
    import torch

    torch.manual_seed(0)
    return diffusers.UNet2DModel(**cfg)


class XpdiffRunner:
    """xpdiff UNet2DModel + AdamW on namespace ``xp``, with fixed inputs."""

    def __init__(self, cfg: dict, xp: Any, inputs: dict, state: dict | None = None,
                 sync: Callable[[], None] | None = None):
        from xpdiff import backend
        from xpdiff.models import UNet2DModel
        from xpdiff.nn import init
        from xpdiff.optim import AdamW

        init.manual_seed(0)
        self.model = UNet2DModel(**cfg, xp=xp)
        if state is not None:
            self.model.load_state_dict(state)
        self.opt = AdamW(self.model, lr=LR)
        dt = {"x": xp.float32, "noise": xp.float32, "t": xp.int64, "c": xp.int64}
        self.inp = {k: backend.asarray(v, xp, dtype=dt[k]) for k, v in inputs.items()}
        self.has_class = bool(cfg.get("num_class_embeds"))
        self.sync = sync or (lambda: None)

    def _labels(self) -> Any:
        return self.inp["c"] if self.has_class else None

    def train_step(self) -> float:
        from xpdiff.functional import losses  # module attribute: the layer timer patches it

        pred = self.model(self.inp["x"], self.inp["t"], self._labels())
        loss, grad = losses.mse_loss(pred, self.inp["noise"])
        self.model.zero_grad()
        self.model.backward(grad)
        self.opt.step()
        out = float(loss)
        self.sync()
        return out

    def forward(self) -> Any:
        from xpdiff.nn.module import no_grad

        with no_grad():
            y = self.model(self.inp["x"], self.inp["t"], self._labels())
        self.sync()
        return y


class TorchRunner:
    """diffusers UNet2DModel + torch.optim.AdamW (eager), with fixed inputs."""

    def __init__(self, model: Any, inputs: dict, device: str = "cpu"):
        import torch

        self.torch = torch
        self.model = model.to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)
        self.inp = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
        self.has_class = model.config.num_class_embeds is not None
        self.cuda = device != "cpu"

    def _labels(self) -> Any:
        return self.inp["c"] if self.has_class else None

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def train_step(self) -> float:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        pred = self.model(self.inp["x"], self.inp["t"], class_labels=self._labels()).sample
        loss = torch.nn.functional.mse_loss(pred, self.inp["noise"])
        loss.backward()
        self.opt.step()
        out = float(loss.item())
        self._sync()
        return out

    def forward(self) -> Any:
        with self.torch.no_grad():
            y = self.model(self.inp["x"], self.inp["t"], class_labels=self._labels()).sample
        self._sync()
        return y


def build_pair(cfg: dict, batch: int, xp: Any, device: str = "cpu",
               sync: Callable[[], None] | None = None) -> tuple[XpdiffRunner, TorchRunner]:
    """Both runners with diffusers' torch.manual_seed(0) weights and the same inputs."""
    d = diffusers_model(cfg)
    state = {k: v.detach().cpu().numpy() for k, v in d.state_dict().items()}
    inputs = host_inputs(cfg, batch)
    return XpdiffRunner(cfg, xp, inputs, state, sync), TorchRunner(d, inputs, device)


def forward_agreement(xr: XpdiffRunner, tr: TorchRunner) -> float:
    """max |y_xpdiff - y_torch| of the initial forward (a sanity check, not a test)."""
    import numpy as np

    from xpdiff import backend

    a = backend.to_numpy(xr.forward())
    b = tr.forward().detach().cpu().numpy()
    return float(np.abs(a - b).max())


def throughput_rows(name: str, batch: int, times: dict[str, list[float]],
                    agree: float | None = None, with_agree: bool = False
                    ) -> tuple[list[Any], dict]:
    """One table row and the JSON record; ``times`` may lack "torch" (no reference)."""
    tx = median(times["xpdiff"])
    tt = median(times["torch"]) if times.get("torch") else None
    sx, st = batch / tx, (batch / tt if tt else None)
    rec = {"batch": batch, "xpdiff_s": times["xpdiff"], "torch_s": times.get("torch"),
           "xpdiff_median_s": tx, "torch_median_s": tt,
           "xpdiff_samples_per_s": sx, "torch_samples_per_s": st,
           "ratio": sx / st if st else None}
    row = [name, batch, fmt(tx * 1e3), fmt(tt * 1e3 if tt else None), fmt(sx), fmt(st),
           ratio(sx, st)]
    if with_agree:
        rec["forward_max_abs_diff"] = agree
        row.append("n/a" if agree is None else f"{agree:.1e}")
    return row, rec


# ---------------------------------------------------------------------------
# per-op timers and FLOP counters
# ---------------------------------------------------------------------------
def _bound(fn: Callable, args: tuple, kwargs: dict) -> dict:
    b = inspect.signature(fn).bind(*args, **kwargs)
    b.apply_defaults()
    return b.arguments


def _conv_fwd_flops(fn: Callable, a: tuple, k: dict) -> float:
    from xpdiff.functional.conv import conv_output_size

    p = _bound(fn, a, k)
    B, C, H, W = p["x"].shape
    O, _, kh, kw = p["w"].shape
    Ho = conv_output_size(H, kh, p["stride"], p["pad"])
    Wo = conv_output_size(W, kw, p["stride"], p["pad"])
    return 2.0 * B * Ho * Wo * O * C * kh * kw


def _conv_bwd_flops(fn: Callable, a: tuple, k: dict) -> float:
    p = _bound(fn, a, k)
    w = p["cache"][1]
    B, O, Ho, Wo = p["gy"].shape
    _, C, kh, kw = w.shape
    return 4.0 * B * Ho * Wo * O * C * kh * kw


def _linear_flops(x_shape: tuple, w_shape: tuple) -> float:
    n = 1
    for s in x_shape[:-1]:
        n *= s
    return 2.0 * n * w_shape[0] * w_shape[1]


def _sdpa_flops(q_shape: tuple, k_shape: tuple) -> float:
    B, h, N, d = q_shape
    return 4.0 * B * h * N * k_shape[2] * d  # q @ k^T and p @ v


FLOPS: dict[str, Callable[[Callable, tuple, dict], float]] = {
    "conv2d_forward": _conv_fwd_flops,
    "conv2d_backward": _conv_bwd_flops,
    "linear_forward": lambda f, a, k: _linear_flops(
        tuple(_bound(f, a, k)["x"].shape), tuple(_bound(f, a, k)["w"].shape)),
    "linear_backward": lambda f, a, k: 2 * _linear_flops(
        tuple(_bound(f, a, k)["cache"][0].shape), tuple(_bound(f, a, k)["cache"][1].shape)),
    "sdpa_forward": lambda f, a, k: _sdpa_flops(
        tuple(_bound(f, a, k)["q"].shape), tuple(_bound(f, a, k)["k"].shape)),
    "sdpa_backward": lambda f, a, k: 2.5 * _sdpa_flops(  # recomputes q @ k^T
        tuple(_bound(f, a, k)["cache"][0].shape), tuple(_bound(f, a, k)["cache"][1].shape)),
}


class OpRecorder:
    """Exclusive wall time, call count and counted FLOPs per wrapped op."""

    def __init__(self) -> None:
        self.time: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.flops: dict[str, float] = {}
        self._stack: list[float] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        flops = FLOPS.get(name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                child = self._stack.pop()
                self.time[name] = self.time.get(name, 0.0) + dt - child
                self.calls[name] = self.calls.get(name, 0) + 1
                if self._stack:
                    self._stack[-1] += dt
                if flops is not None:
                    self.flops[name] = self.flops.get(name, 0.0) + flops(fn, args, kwargs)

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed


@contextlib.contextmanager
def instrumented(optimizer: Any = None):
    """Wrap every TIMED_OPS function wherever an xpdiff module holds it (``fc.conv2d_forward``
    through the functional module, and ``from ... import timestep_embedding`` copies), and
    ``optimizer.step``; restore everything on exit.  Yields the OpRecorder."""
    import importlib

    rec = OpRecorder()
    originals: dict[int, tuple[str, Callable]] = {}
    for modname, names in TIMED_OPS.items():
        mod = importlib.import_module(modname)
        for n in names:
            fn = getattr(mod, n)
            originals[id(fn)] = (n, fn)
    wrappers = {i: rec.wrap(n, fn) for i, (n, fn) in originals.items()}
    patched: list[tuple[Any, str, Any]] = []
    for modname, mod in list(sys.modules.items()):
        if mod is None or not (modname == "xpdiff" or modname.startswith("xpdiff.")):
            continue
        for attr, val in list(vars(mod).items()):
            if callable(val) and id(val) in originals and originals[id(val)][1] is val:
                patched.append((mod, attr, val))
                setattr(mod, attr, wrappers[id(val)])
    if optimizer is not None:
        optimizer.step = rec.wrap("optimizer (AdamW.step)", optimizer.step)
    try:
        yield rec
    finally:
        for mod, attr, val in patched:
            setattr(mod, attr, val)
        if optimizer is not None:
            del optimizer.step  # back to the class method


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------
def section_speed(names: list[str], args: argparse.Namespace, results: dict) -> None:
    """train + infer (+ layers, which needs the same model) for every config."""
    from xpdiff import backend

    xp = backend.namespace_for("numpy")
    train_rows, infer_rows = [], []
    for name in names:
        cfg = unet_config(name)
        print(f"[{name}] building models (batch {args.batch}) ...", flush=True)
        xr, tr = build_pair(cfg, args.batch, xp)
        res = results.setdefault("configs", {}).setdefault(name, {"unet_kwargs": cfg})
        res["num_parameters"] = xr.model.num_parameters()
        agree = forward_agreement(xr, tr)
        if "infer" in args.sections:
            print(f"[{name}] inference: {args.warmup} warm-up + {args.repeats} alternated "
                  "repeats ...", flush=True)
            times = alternate({"xpdiff": xr.forward, "torch": tr.forward},
                              args.warmup, args.repeats)
            row, res["infer"] = throughput_rows(name, args.batch, times, agree, True)
            infer_rows.append(row)
        if "train" in args.sections:
            print(f"[{name}] training: {args.warmup} warm-up + {args.repeats} alternated "
                  "repeats ...", flush=True)
            times = alternate({"xpdiff": xr.train_step, "torch": tr.train_step},
                              args.warmup, args.repeats)
            row, res["train"] = throughput_rows(name, args.batch, times)
            train_rows.append(row)
        if "layers" in args.sections:
            print(f"[{name}] per-op breakdown of one xpdiff training step ...", flush=True)
            section_layers(name, xr, res, args)
        del xr, tr
        gc.collect()
    head = ["config", "batch", "xpdiff ms", "torch ms", "xpdiff samp/s", "torch samp/s",
            "xpdiff/torch"]
    if infer_rows:
        print_table(f"Inference (forward only, no_grad), CPU, {args.threads} threads, "
                    f"median of {args.repeats}", head + ["fwd max|diff|"], infer_rows)
    if train_rows:
        print_table(f"Training step (fwd + MSE + bwd + AdamW), CPU, {args.threads} threads, "
                    f"median of {args.repeats}", head, train_rows)
    for name in names:
        lay = results["configs"][name].get("layers")
        if lay:
            print_layers(name, lay, results["configs"][name].get("train"), results.get("gemm"))


def section_layers(name: str, xr: XpdiffRunner, res: dict, args: argparse.Namespace) -> None:
    xr.train_step()  # warm (the model may not have trained yet)
    with instrumented(xr.opt) as rec:
        t0 = time.perf_counter()
        xr.train_step()
        total = time.perf_counter() - t0
    ops = sorted(rec.time, key=lambda k: -rec.time[k])
    res["layers"] = {
        "step_s": total,
        "ops": {k: {"s": rec.time[k], "calls": rec.calls[k], "flops": rec.flops.get(k, 0.0)}
                for k in ops},
        "other_s": total - sum(rec.time.values()),
        "flops_per_step": sum(rec.flops.values()),
    }


def print_layers(name: str, lay: dict, train: dict | None, gemm: dict | None) -> None:
    total = lay["step_s"]
    rows = []
    for k, v in lay["ops"].items():
        gf = f"{v['flops'] / v['s'] / 1e9:.1f}" if v["flops"] and v["s"] > 0 else ""
        rows.append([k, v["calls"], fmt(v["s"] * 1e3), f"{100 * v['s'] / total:.1f}",
                     f"{v['flops'] / 1e9:.2f}" if v["flops"] else "", gf])
    rows.append(["other (glue)", "", fmt(lay["other_s"] * 1e3),
                 f"{100 * lay['other_s'] / total:.1f}", "", ""])
    rows.append(["total (instrumented step)", "", fmt(total * 1e3), "100.0",
                 f"{lay['flops_per_step'] / 1e9:.2f}", ""])
    print_table(f"[{name}] xpdiff training step by op (one step, exclusive time)",
                ["op", "calls", "ms", "%", "GFLOP", "GFLOP/s"], rows)
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


def section_gemm(args: argparse.Namespace, results: dict) -> None:
    import numpy as np
    import torch

    # (label, m, k, n, layout): (m x k) @ (k x n); layout "nn" = both C-contiguous,
    # "nt" = B is the transpose of a C-contiguous (n x k) array, "tn" = A is a transposed
    # (k x m) array: the layouts xpdiff's conv backward hands to BLAS.
    shapes = [
        ("square 2048^3", 2048, 2048, 2048, "nn"),
        ("conv fwd w@cols (64x576)@(576x12544)", 64, 576, 12544, "nn"),
        ("conv gW g@cols.T (64x12544)@(12544x576)", 64, 12544, 576, "nt"),
        ("conv gW^T cols@g.T (576x12544)@(12544x64)", 576, 12544, 64, "nt"),
        ("conv gX w.T@g (576x64)@(64x12544)", 576, 64, 12544, "tn"),
    ]
    reps = args.gemm_repeats
    rng = np.random.default_rng(0)
    rows, out = [], {}
    for label, m, k, n, layout in shapes:
        a = rng.standard_normal((k, m) if layout == "tn" else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if layout == "nt" else (k, n), dtype=np.float32)
        a, b = (a.T if layout == "tn" else a), (b.T if layout == "nt" else b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        times = alternate({"numpy": lambda a=a, b=b: a @ b,
                           "torch": lambda ta=ta, tb=tb: torch.mm(ta, tb)}, 1, reps)
        fl = 2.0 * m * k * n
        gn, gt = fl / median(times["numpy"]) / 1e9, fl / median(times["torch"]) / 1e9
        out[label] = {"m": m, "k": k, "n": n, "layout": layout, "numpy_gflops": gn,
                      "torch_gflops": gt}
        rows.append([label, fmt(median(times["numpy"]) * 1e3, 2), fmt(gn), fmt(gt)])
    peak = max(v["numpy_gflops"] for v in out.values())
    results["gemm"] = {"shapes": out, "peak_numpy_gflops": peak}
    print_table(f"float32 GEMM, {args.threads} threads, median of {reps}",
                ["shape", "numpy ms", "numpy GFLOP/s", "torch GFLOP/s"], rows)
    print(f"peak (best NumPy GEMM above): {peak:.1f} GFLOP/s")


def square_gemm_gflops(repeats: int, n: int = 2048) -> float:
    import numpy as np

    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    t = alternate({"numpy": lambda: a @ b}, 1, repeats)["numpy"]
    return 2.0 * n**3 / median(t) / 1e9


def drift_check(args: argparse.Namespace, results: dict) -> None:
    """The 2048^3 GEMM again at the end: a changed figure means the machine's load changed
    during the run (other jobs on the same cores), and the timings above are suspect."""
    start = results["gemm"]["shapes"]["square 2048^3"]["numpy_gflops"]
    end = square_gemm_gflops(args.gemm_repeats)
    results["gemm"]["square_numpy_gflops_at_end"] = end
    change = end / start - 1
    note = "" if abs(change) < 0.2 else (
        "  <-- the machine's load changed during the run: rerun when it is quiet")
    print(f"\nload check: NumPy 2048^3 GEMM {start:.1f} GFLOP/s at the start, {end:.1f} at the "
          f"end ({100 * change:+.0f}%){note}")


def section_memory(names: list[str], args: argparse.Namespace, results: dict) -> None:
    rows = []
    for name in names:
        rec = {}
        for fw in ("xpdiff", "torch"):
            print(f"[{name}] memory probe: {fw} in a subprocess ...", flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_memprobe", fw,
                   "--config", name, "--batch", str(args.batch), "--threads", str(args.threads)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(p.stderr[-2000:], file=sys.stderr)
                rec[fw] = {"error": p.stderr[-500:]}
                continue
            rec[fw] = json.loads(p.stdout.strip().splitlines()[-1])
        results.setdefault("configs", {}).setdefault(name, {})["memory"] = rec

        def mb(fw: str, key: str, rec: dict = rec) -> float | None:
            v = rec.get(fw, {}).get(key)
            return None if v is None else v / 1024

        xp_, tp_ = mb("xpdiff", "peak_kb"), mb("torch", "peak_kb")
        x1, t1 = mb("xpdiff", "first_step_kb"), mb("torch", "first_step_kb")
        xb, tb = mb("xpdiff", "baseline_kb"), mb("torch", "baseline_kb")
        rows.append([name, args.batch, fmt(xp_), fmt(tp_), ratio(xp_, tp_), fmt(x1), fmt(t1),
                     fmt(xb, 0), fmt(tb, 0)])
    print_table("Peak RSS above the built model over two training steps (MiB; each framework "
                "in its own process)",
                ["config", "batch", "xpdiff peak", "torch peak", "xpdiff/torch", "xpdiff 1st",
                 "torch 1st", "xpdiff base", "torch base"], rows)


def section_sample(args: argparse.Namespace, results: dict) -> None:
    from xpdiff import backend
    from xpdiff.models import UNet2DModel
    from xpdiff.nn import init
    from xpdiff.pipelines import generate
    from xpdiff.training import TrainConfig

    tc = TrainConfig()
    init.manual_seed(0)
    model = UNet2DModel(**unet_config("flagship"), xp=backend.namespace_for("numpy"))
    sched = tc.sampling_scheduler("ddim")
    labels = [i % 10 for i in range(args.sample_digits)]
    steps = args.sample_steps
    print(f"[sample] {len(labels)} digits, DDIM {steps} steps, guidance 2 ...", flush=True)
    t0 = time.perf_counter()
    out = generate(model, sched, labels, num_inference_steps=steps, guidance_scale=2.0,
                   null_class=tc.null_class, seed=0)
    wall = time.perf_counter() - t0
    assert tuple(out.images.shape)[0] == len(labels)
    per_step = wall / steps
    results["sample"] = {"digits": len(labels), "steps": steps, "guidance": 2.0,
                         "wall_s": wall, "s_per_step": per_step,
                         "projected_50_steps_s": per_step * 50}
    rows = [["flagship", len(labels), steps, fmt(wall, 2), fmt(per_step * 1e3),
             fmt(len(labels) / wall, 1),
             fmt(per_step * 50, 1) + ("" if steps == 50 else " (projected)")]]
    print_table("Sampling (xpdiff, NumPy, DDIM, guidance 2: two UNet passes per step)",
                ["config", "digits", "steps", "wall s", "ms/step", "digits/s", "50-step s"], rows)


class CupyDevice:
    """xpdiff on CuPy, the torch reference on "cuda"; device-memory probes."""

    torch_device = "cuda"

    def __init__(self) -> None:
        import cupy  # only ever imported here, inside the benchmarks

        from xpdiff import backend

        self.cupy = cupy
        self.xp = backend.namespace_for("cupy")
        dev = cupy.cuda.Device()
        self.sync = dev.synchronize
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.info = (f"cupy {cupy.__version__}, CUDA runtime "
                     f"{cupy.cuda.runtime.runtimeGetVersion()}")
        self.pool = cupy.get_default_memory_pool()
        self._used0 = 0
        self._alloc0 = 0

    def xp_mem_start(self) -> None:
        self.pool.free_all_blocks()
        self._used0 = self.pool.used_bytes()

    def xp_mem_end(self) -> float:
        """MiB the CuPy pool grew to above what was in use before (the pool keeps freed
        blocks, so its size after the step is the step's high-water mark)."""
        return (self.pool.total_bytes() - self._used0) / 2**20

    def torch_mem_start(self) -> None:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._alloc0 = torch.cuda.memory_allocated()

    def torch_mem_end(self) -> float:
        import torch

        return (torch.cuda.max_memory_allocated() - self._alloc0) / 2**20

    def cleanup(self) -> None:
        gc.collect()
        self.pool.free_all_blocks()
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()


class HostDryRun(CupyDevice):
    """``--_gpu-dryrun``: the --gpu code path on NumPy and torch CPU (tests the harness on
    a machine without a device; the numbers mean nothing)."""

    torch_device = "cpu"

    def __init__(self) -> None:  # no CuPy here
        from xpdiff import backend

        self.xp = backend.namespace_for("numpy")
        self.sync = lambda: None
        self.name, self.info = "host (dry run)", "numpy, torch cpu"

    def xp_mem_start(self) -> None:
        pass

    def xp_mem_end(self) -> None:
        return None

    def torch_mem_start(self) -> None:
        pass

    def torch_mem_end(self) -> None:
        return None

    def cleanup(self) -> None:
        gc.collect()


def torch_reference_status(device: str) -> str | None:
    """None when diffusers on torch ``device`` can run, else why not."""
    try:
        import diffusers  # noqa: F401
        import torch
    except Exception as err:
        return f"diffusers/torch not importable ({type(err).__name__}: {err})"
    if device == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def section_gpu(names: list[str], args: argparse.Namespace, results: dict) -> None:
    from xpdiff import backend

    if args._gpu_dryrun:
        dev: CupyDevice = HostDryRun()
    else:
        ok, why = backend.cupy_status()
        if not ok:
            print(f"\n## GPU\nSKIPPED: no usable CUDA device for xpdiff ({why})")
            results["gpu"] = {"skipped": why}
            return
        dev = CupyDevice()
    no_ref = torch_reference_status(dev.torch_device)
    print(f"\nGPU: {dev.name} ({dev.info})")
    if no_ref:
        print(f"torch reference SKIPPED: {no_ref}; xpdiff alone is timed (random weights)")
    batch = args.gpu_batch
    res_gpu: dict = {"device": dev.name, "info": dev.info, "batch": batch,
                     "torch_reference": no_ref or "diffusers UNet2DModel, torch eager",
                     "configs": {}}
    results["gpu"] = res_gpu
    train_rows, infer_rows, mem_rows = [], [], []
    for name in names:
        cfg = unet_config(name)
        print(f"[gpu {name}] building models (batch {batch}) ...", flush=True)
        res = res_gpu["configs"].setdefault(name, {"unet_kwargs": cfg})
        if no_ref:
            xr = XpdiffRunner(cfg, dev.xp, host_inputs(cfg, batch), sync=dev.sync)
            tr, agree = None, None
        else:
            xr, tr = build_pair(cfg, batch, dev.xp, device=dev.torch_device, sync=dev.sync)
            agree = forward_agreement(xr, tr)
        fwd = {"xpdiff": xr.forward} | ({"torch": tr.forward} if tr else {})
        step = {"xpdiff": xr.train_step} | ({"torch": tr.train_step} if tr else {})
        print(f"[gpu {name}] inference and training: {args.warmup} warm-up + {args.repeats} "
              "alternated repeats each ...", flush=True)
        row, res["infer"] = throughput_rows(name, batch, alternate(fwd, args.warmup,
                                                                   args.repeats), agree, True)
        infer_rows.append(row)
        row, res["train"] = throughput_rows(name, batch, alternate(step, args.warmup,
                                                                   args.repeats))
        train_rows.append(row)
        # device memory of one (warm) training step above what is held before it
        dev.xp_mem_start()
        xr.train_step()
        x_inc = dev.xp_mem_end()
        t_inc = None
        if tr is not None:
            dev.torch_mem_start()
            tr.train_step()
            t_inc = dev.torch_mem_end()
        res["memory_mib"] = {"xpdiff_pool_growth": x_inc, "torch_peak_increase": t_inc}
        mem_rows.append([name, batch, fmt(x_inc), fmt(t_inc), ratio(x_inc, t_inc)])
        del xr, tr
        dev.cleanup()
    head = ["config", "batch", "xpdiff ms", "torch ms", "xpdiff samp/s", "torch samp/s",
            "xpdiff/torch"]
    print_table(f"GPU inference ({dev.name}), xpdiff on CuPy vs torch eager, median of "
                f"{args.repeats}", head + ["fwd max|diff|"], infer_rows)
    print_table(f"GPU training step (fwd + MSE + bwd + AdamW) ({dev.name}), median of "
                f"{args.repeats}", head, train_rows)
    print_table("GPU memory of one warm training step (MiB above what is held before it: "
                "CuPy pool growth vs torch max_memory_allocated)",
                ["config", "batch", "xpdiff", "torch", "xpdiff/torch"], mem_rows)


# ---------------------------------------------------------------------------
# memory probe (runs in its own process)
# ---------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":", 1)
                out[key] = int(val.split()[0])  # kB
    return out


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    s = _proc_status()
    return s["VmHWM"] <= s["VmRSS"] + 1024


def memprobe(fw: str, name: str, batch: int, threads: int) -> None:
    from threadpoolctl import threadpool_limits

    cfg = unet_config(name)
    inputs = host_inputs(cfg, batch)
    with threadpool_limits(limits=threads, user_api="blas"):
        if fw == "xpdiff":
            from xpdiff import backend

            runner: Any = XpdiffRunner(cfg, backend.namespace_for("numpy"), inputs)
        elif fw == "torch":
            import torch

            torch.set_num_threads(threads)
            runner = TorchRunner(diffusers_model(cfg), inputs)
        else:
            raise SystemExit(f"--_memprobe: expected xpdiff or torch, got {fw!r}")
        gc.collect()
        can_reset = _reset_hwm()
        s0 = _proc_status()
        runner.train_step()  # first step: also allocates the AdamW moments
        s1 = _proc_status()
        out = {"framework": fw, "config": name, "batch": batch, "hwm_reset": can_reset,
               "baseline_kb": s0["VmRSS"], "hwm_before_first_kb": s0["VmHWM"],
               "first_step_kb": s1["VmHWM"] - s0["VmRSS"]}
        # second step: its own increase over the RSS it starts from (allocator-dependent:
        # memory a library keeps after step 1 is reused without raising the mark) ...
        reset2 = _reset_hwm()
        runner.train_step()
        s2 = _proc_status()
        if reset2:
            out["second_step_kb"] = s2["VmHWM"] - s1["VmRSS"]
        # ... and the headline: the highest RSS of either step above the built model
        out["peak_kb"] = max(s1["VmHWM"], s2["VmHWM"]) - s0["VmRSS"]
        out["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(out))


# ---------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------
def environment(args: argparse.Namespace) -> dict:
    import numpy as np

    import xpdiff

    cpu = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": os.getloadavg(),
        "numpy": np.__version__,
        "xpdiff": xpdiff.__version__,
        "threads": args.threads,
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    try:
        from threadpoolctl import threadpool_info

        keys = ("user_api", "internal_api", "prefix", "version", "num_threads",
                "threading_layer", "architecture")
        env["threadpools"] = [{k: v for k, v in d.items() if k in keys}
                              for d in threadpool_info()]
    except ImportError:
        env["threadpools"] = [{"threadpoolctl": "not installed"}]
    return env


def print_environment(env: dict) -> None:
    print("# xpdiff benchmark")
    print(f"date: {env['date']}   host: {env['host']}   python {env['python']}")
    print(f"cpu: {env['cpu']}   cores: {env['cpu_count']} (usable {env['cpu_affinity']})   "
          f"load avg: {', '.join(f'{x:.2f}' for x in env['loadavg'])}")
    print(f"numpy {env['numpy']}   torch {env['torch']}   diffusers {env['diffusers']}   "
          f"xpdiff {env['xpdiff']}   threads: {env['threads']} (torch {env.get('torch_threads')})")
    for d in env["threadpools"]:
        print("threadpool: " + ", ".join(f"{k}={v}" for k, v in d.items()))
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="xpdiff (NumPy / CuPy) against diffusers on PyTorch eager.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="fast smoke run: flagship config only (unless --configs), 2 repeats, "
                        "1 warm-up, 3 GEMM repeats, 5 sampling steps (50-step time projected)")
    p.add_argument("--configs", default=None,
                   help="comma-separated configs from seed14,mnist28,flagship "
                        "(default: all three; flagship with --quick)")
    p.add_argument("--batch", type=int, default=64, help="CPU batch size")
    p.add_argument("--gpu-batch", type=int, default=128, help="batch size of --gpu")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per framework (median reported; default 7, 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed rounds before timing (default 2, 1 with --quick)")
    p.add_argument("--threads", type=int, default=2,
                   help="threads for torch (set_num_threads) and NumPy's BLAS (threadpoolctl, "
                        "user_api='blas')")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (CPU mode)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="DDIM steps of the sampling section (default 50, 5 with --quick)")
    p.add_argument("--sample-digits", type=int, default=100, help="digits drawn by sampling")
    p.add_argument("--gemm-repeats", type=int, default=None,
                   help="timed repeats per GEMM shape (default 7, 3 with --quick)")
    p.add_argument("--gpu", action="store_true",
                   help="CUDA mode: xpdiff on CuPy vs torch CUDA eager, train + infer + device "
                        "memory, batch --gpu-batch (skipped with a message without a device)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write all results here")
    # internal: one framework's memory probe in a fresh process
    p.add_argument("--_memprobe", choices=("xpdiff", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--config", default="flagship", help=argparse.SUPPRESS)
    # internal: the --gpu code path on NumPy + torch CPU, to test the harness without a device
    p.add_argument("--_gpu-dryrun", dest="_gpu_dryrun", action="store_true",
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.configs = args.configs or ("flagship" if q else "seed14,mnist28,flagship")
    args.repeats = args.repeats or (2 if q else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.gemm_repeats = args.gemm_repeats or (3 if q else 7)
    args.sample_steps = args.sample_steps or (5 if q else 50)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; expected a subset of {list(SECTIONS)}")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in names:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}; expected a subset of {sorted(CONFIGS)}")
    args.config_names = names
    if args.repeats < 1 or args.batch < 1 or args.threads < 1:
        p.error("--repeats, --batch and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._memprobe:
        memprobe(args._memprobe, args.config, args.batch, args.threads)
        return 0

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        if not args.gpu:
            raise
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the GPU machines may lack it; the CPU numbers need it
        if not args.gpu:
            raise

        def threadpool_limits(limits: int, user_api: str) -> contextlib.AbstractContextManager:
            return contextlib.nullcontext()
    results: dict = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
    t_start = time.perf_counter()
    with threadpool_limits(limits=args.threads, user_api="blas"):
        env = environment(args)
        results["env"] = env
        print_environment(env)
        if args.gpu or args._gpu_dryrun:
            section_gpu(args.config_names, args, results)
        else:
            if "gemm" in args.sections:
                section_gemm(args, results)
            if {"train", "infer", "layers"} & set(args.sections):
                section_speed(args.config_names, args, results)
            if "memory" in args.sections:
                section_memory(args.config_names, args, results)
            if "sample" in args.sections:
                section_sample(args, results)
            if "gemm" in args.sections:
                drift_check(args, results)
    results["env"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_start
    print(f"\ntotal wall time {results['wall_s']:.0f} s; load avg at end: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
