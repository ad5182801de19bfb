"""The ``memory`` section: peak RSS of two training steps, each framework in its own process.

``section_memory`` re-runs ``benchmarks/bench.py --_memprobe xpdiff|torch --config NAME``;
``memprobe`` is what that child process does (it prints one JSON line).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
from typing import Any

from . import BENCH_SCRIPT
from .harness import (
    TorchRunner,
    XpdiffRunner,
    diffusers_model,
    fmt,
    host_inputs,
    print_table,
    ratio,
    unet_config,
)


def section_memory(names: list[str], args: argparse.Namespace, results: dict) -> None:
    rows = []
    for name in names:
        rec = {}
        for fw in ("xpdiff", "torch"):
            print(f"[{name}] memory probe: {fw} in a subprocess ...", flush=True)
            cmd = [
                sys.executable,
                str(BENCH_SCRIPT),
                "--_memprobe",
                fw,
                "--config",
                name,
                "--batch",
                str(args.batch),
                "--threads",
                str(args.threads),
            ]
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
        rows.append(
            [
                name,
                args.batch,
                fmt(xp_),
                fmt(tp_),
                ratio(xp_, tp_),
                fmt(x1),
                fmt(t1),
                fmt(xb, 0),
                fmt(tb, 0),
            ]
        )
    print_table(
        "Peak RSS above the built model over two training steps (MiB; each framework "
        "in its own process)",
        [
            "config",
            "batch",
            "xpdiff peak",
            "torch peak",
            "xpdiff/torch",
            "xpdiff 1st",
            "torch 1st",
            "xpdiff base",
            "torch base",
        ],
        rows,
    )


# ---------------------------------------------------------------------------
# the probe (runs in its own process)
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
        out = {
            "framework": fw,
            "config": name,
            "batch": batch,
            "hwm_reset": can_reset,
            "baseline_kb": s0["VmRSS"],
            "hwm_before_first_kb": s0["VmHWM"],
            "first_step_kb": s1["VmHWM"] - s0["VmRSS"],
        }
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
