#!/usr/bin/env python
"""Data-parallel scaling on one machine: 1 process x T BLAS threads against P processes x
1 thread (``mpiexec -n P``), in samples per second of training, plus the all-reduce time of
one step's gradients.

    python benchmarks/scaling.py                      # flagship and mnist28, 1x2 vs 2x1
    python benchmarks/scaling.py --configs flagship --steps 3 --warmup 1   # a smoke run

Each measurement runs in a fresh process (or ``mpiexec`` job) with ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` removed from its environment (see benchmarks/README.md: they force older
kernels) and prints the OpenBLAS kernel it got.  A step is ``Trainer.train_step`` on the
config's global batch (default 64), split across the processes; the all-reduce is timed
apart, on a buffer the size of the model's gradients, after a barrier, median of
``--allreduce-repeats``.  Needs the ``mpi`` extra (``pip install -e ".[mpi]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# flagship: the 14x14 recipe as it trained until 2026-11-30 ([32, 64], no offset noise;
# the default is now [16, 32] with offset noise 0.1), fixed so RESULTS.md's rows compare
CONFIGS = {
    "flagship": {"block_out_channels": [32, 64], "offset_noise": 0.0},
    "mnist28": ROOT / "examples" / "mnist28.json",
}
FORCING = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _config(name: str, batch_size: int | None):
    from xpdiff import io
    from xpdiff.digits.training import TrainConfig

    source = CONFIGS[name]
    if isinstance(source, dict):  # fields left out keep TrainConfig's defaults
        cfg = TrainConfig.from_json(source, name)
    else:
        cfg = TrainConfig.from_json(io.load_json(source), str(source))
    if batch_size is not None:
        cfg.batch_size = batch_size
    return cfg


def _kernel() -> str:
    try:
        from threadpoolctl import threadpool_info

        pools = [d for d in threadpool_info() if d.get("internal_api") == "openblas"]
        return ", ".join(f"{d.get('architecture')} x{d.get('num_threads')}" for d in pools)
    except ImportError:
        return "unknown (no threadpoolctl)"


def worker(args: argparse.Namespace) -> None:
    """One measurement, in every process of the job; rank 0 prints one JSON line."""
    from xpdiff import backend, distributed
    from xpdiff.digits.training import Trainer
    from xpdiff.training import batches

    world = distributed.world()
    cfg = _config(args.config, args.batch_size)
    cfg.max_steps = args.warmup + args.steps
    trainer = Trainer(cfg, Path(args.run) / args.config, progress=False)
    gen = backend.Generator(0, backend.namespace_for("numpy"))
    data = batches(trainer.images, trainer.labels, cfg.batch_size, gen, drop_last=True)
    work = [next(data) for _ in range(args.warmup + args.steps)]
    for xb, yb in work[: args.warmup]:
        trainer.train_step(xb, yb)
    world.barrier()
    t0 = time.perf_counter()
    for xb, yb in work[args.warmup :]:
        trainer.train_step(xb, yb)
    world.barrier()
    seconds = time.perf_counter() - t0
    params = trainer.model.parameters()
    buffer = distributed.gradient_buffer(params)
    reduce_s = []
    for _ in range(args.allreduce_repeats if world.size > 1 else 0):
        world.barrier()
        t = time.perf_counter()
        world.allreduce_sum(buffer)
        reduce_s.append(time.perf_counter() - t)
    if world.is_root:
        record = {
            "config": args.config,
            "processes": world.size,
            "threads": int(os.environ.get("OPENBLAS_NUM_THREADS", "0")),
            "batch_size": cfg.batch_size,
            "steps": args.steps,
            "step_ms": 1e3 * seconds / args.steps,
            "samples_per_s": args.steps * cfg.batch_size / seconds,
            "parameters": trainer.model.num_parameters(),
            "allreduce_bytes": int(buffer.shape[0]) * buffer.dtype.itemsize,
            "allreduce_ms": 1e3 * statistics.median(reduce_s) if reduce_s else None,
            "kernel": _kernel(),
        }
        print("RESULT " + json.dumps(record), flush=True)


def _run(args: argparse.Namespace, config: str, procs: int, threads: int, run: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in FORCING}
    env.update(
        OPENBLAS_NUM_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        XPDIFF_NUM_THREADS=str(threads),
    )
    cmd = [sys.executable, __file__, "--_worker", "--config", config, "--run", str(run)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--allreduce-repeats", str(args.allreduce_repeats)]
    if args.batch_size is not None:
        cmd += ["--batch-size", str(args.batch_size)]
    if procs > 1:
        mpiexec = shutil.which("mpiexec")
        if mpiexec is None:
            raise SystemExit('error: no mpiexec on PATH: pip install -e ".[mpi]"')
        cmd = [mpiexec, "-n", str(procs), *cmd]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1][len("RESULT ") :])


def _table(results: list[dict], procs: int, threads: int) -> str:
    head = (
        f"| config | parameters | all-reduce bytes/step | 1x{threads} samples/s | "
        f"{procs}x1 samples/s | {procs}x1 / 1x{threads} | {procs}x1 step ms | "
        "all-reduce ms/step | all-reduce share of the step |\n" + "|---" * 9 + "|"
    )
    rows = [head]
    by = {(r["config"], r["processes"]): r for r in results}
    for name in dict.fromkeys(r["config"] for r in results):
        one, many = by[name, 1], by[name, procs]
        rows.append(
            f"| {name} | {one['parameters']:,} | {one['allreduce_bytes'] / 1e6:.2f} MB | "
            f"{one['samples_per_s']:.1f} | {many['samples_per_s']:.1f} | "
            f"{many['samples_per_s'] / one['samples_per_s']:.2f}x | {many['step_ms']:.0f} | "
            f"{many['allreduce_ms']:.2f} | {many['allreduce_ms'] / many['step_ms']:.1%} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    p.add_argument("--processes", type=int, default=2, help="P of the P x 1 runs (default 2)")
    p.add_argument("--threads", type=int, default=2, help="T of the 1 x T runs (default 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=int, help="global batch (default: the config's)")
    p.add_argument("--allreduce-repeats", type=int, default=20)
    p.add_argument("--json", help="also write the records to this file")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="xpdiff-scaling-") as tmp:
        for name in args.configs:
            for procs, threads in ((1, args.threads), (args.processes, 1)):
                r = _run(args, name, procs, threads, Path(tmp) / f"{name}-{procs}x{threads}")
                print(
                    f"{name} {procs} process(es) x {threads} thread(s): "
                    f"{r['samples_per_s']:.1f} samples/s, step {r['step_ms']:.0f} ms, "
                    f"all-reduce {r['allreduce_ms'] or 0:.2f} ms; OpenBLAS {r['kernel']}",
                    flush=True,
                )
                results.append(r)
    print()
    print(_table(results, args.processes, args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
