"""Configs, the xpdiff and torch runners, the timing protocol and the tables."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

SECTIONS = ("train", "infer", "memory", "layers", "gemm", "sample")

_SEED14 = {
    "sample_size": 14,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "num_class_embeds": 10,
}

CONFIGS: dict[str, dict] = {
    "seed14": _SEED14,
    "mnist28": {
        "sample_size": 28,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "num_class_embeds": 10,
    },
    # The 14x14 recipe's UNet until 2026-11-30 (`xpdiff train` now trains [16, 32]); kept
    # fixed so that this config's numbers stay comparable across RESULTS.md.
    "flagship": {
        **_SEED14,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 16,
        "num_class_embeds": 11,
    },
}

LR = 1e-3  # both optimisers: AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)

THROUGHPUT_HEAD = [
    "config",
    "batch",
    "xpdiff ms",
    "torch ms",
    "xpdiff samp/s",
    "torch samp/s",
    "xpdiff/torch",
]


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------
def unet_config(name: str) -> dict:
    """UNet2DModel keyword arguments of a named config."""
    if name not in CONFIGS:
        raise SystemExit(f"bench: unknown config {name!r}; expected one of {sorted(CONFIGS)}")
    return dict(CONFIGS[name])


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join("-" * w for w in widths)
    print(f"\n## {title}")
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    )
    print(line)
    for r in cells:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    sys.stdout.flush()


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def alternate(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int
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

    def __init__(
        self,
        cfg: dict,
        xp: Any,
        inputs: dict,
        state: dict | None = None,
        sync: Callable[[], None] | None = None,
    ):
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
        from xpdiff.functional import losses  # module attribute: the op profile patches it

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


def build_pair(
    cfg: dict, batch: int, xp: Any, device: str = "cpu", sync: Callable[[], None] | None = None
) -> tuple[XpdiffRunner, TorchRunner]:
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


def throughput_rows(
    name: str,
    batch: int,
    times: dict[str, list[float]],
    agree: float | None = None,
    with_agree: bool = False,
) -> tuple[list[Any], dict]:
    """One table row and the JSON record; ``times`` may lack "torch" (no reference)."""
    tx = median(times["xpdiff"])
    tt = median(times["torch"]) if times.get("torch") else None
    sx, st = batch / tx, (batch / tt if tt else None)
    rec = {
        "batch": batch,
        "xpdiff_s": times["xpdiff"],
        "torch_s": times.get("torch"),
        "xpdiff_median_s": tx,
        "torch_median_s": tt,
        "xpdiff_samples_per_s": sx,
        "torch_samples_per_s": st,
        "ratio": sx / st if st else None,
    }
    row = [
        name,
        batch,
        fmt(tx * 1e3),
        fmt(tt * 1e3 if tt else None),
        fmt(sx),
        fmt(st),
        ratio(sx, st),
    ]
    if with_agree:
        rec["forward_max_abs_diff"] = agree
        row.append("n/a" if agree is None else f"{agree:.1e}")
    return row, rec
