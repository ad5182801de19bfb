"""The ``train`` and ``infer`` sections (and ``layers``, which profiles the same model)."""

from __future__ import annotations

import argparse
import gc

from .harness import (
    THROUGHPUT_HEAD,
    alternate,
    build_pair,
    forward_agreement,
    print_table,
    throughput_rows,
    unet_config,
)
from .profile import print_layers, section_layers


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
            print(
                f"[{name}] inference: {args.warmup} warm-up + {args.repeats} alternated "
                "repeats ...",
                flush=True,
            )
            times = alternate(
                {"xpdiff": xr.forward, "torch": tr.forward}, args.warmup, args.repeats
            )
            row, res["infer"] = throughput_rows(name, args.batch, times, agree, True)
            infer_rows.append(row)
        if "train" in args.sections:
            print(
                f"[{name}] training: {args.warmup} warm-up + {args.repeats} alternated repeats ...",
                flush=True,
            )
            times = alternate(
                {"xpdiff": xr.train_step, "torch": tr.train_step}, args.warmup, args.repeats
            )
            row, res["train"] = throughput_rows(name, args.batch, times)
            train_rows.append(row)
        if "layers" in args.sections:
            print(f"[{name}] per-op breakdown of one xpdiff training step ...", flush=True)
            section_layers(name, xr, res, args)
        del xr, tr
        gc.collect()
    if infer_rows:
        print_table(
            f"Inference (forward only, no_grad), CPU, {args.threads} threads, "
            f"median of {args.repeats}",
            THROUGHPUT_HEAD + ["fwd max|diff|"],
            infer_rows,
        )
    if train_rows:
        print_table(
            f"Training step (fwd + MSE + bwd + AdamW), CPU, {args.threads} threads, "
            f"median of {args.repeats}",
            THROUGHPUT_HEAD,
            train_rows,
        )
    for name in names:
        lay = results["configs"][name].get("layers")
        if lay:
            print_layers(name, lay, results["configs"][name].get("train"), results.get("gemm"))
