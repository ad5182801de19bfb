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
import json
import os
import sys
import time
from pathlib import Path

from .environment import environment, print_blas_warning, print_environment
from .harness import CONFIGS, SECTIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="xpdiff (NumPy / CuPy) against diffusers on PyTorch eager.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fast smoke run: flagship config only (unless --configs), 2 repeats, "
        "1 warm-up, 3 GEMM repeats, 5 sampling steps (50-step time projected)",
    )
    p.add_argument(
        "--configs",
        default=None,
        help="comma-separated configs from seed14,mnist28,flagship "
        "(default: all three; flagship with --quick)",
    )
    p.add_argument("--batch", type=int, default=64, help="CPU batch size")
    p.add_argument("--gpu-batch", type=int, default=128, help="batch size of --gpu")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per framework (median reported; default 7, 2 with --quick)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed rounds before timing (default 2, 1 with --quick)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="threads for torch (set_num_threads) and NumPy's BLAS (threadpoolctl, "
        "user_api='blas')",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (CPU mode)",
    )
    p.add_argument(
        "--sample-steps",
        type=int,
        default=None,
        help="DDIM steps of the sampling section (default 50, 5 with --quick)",
    )
    p.add_argument("--sample-digits", type=int, default=100, help="digits drawn by sampling")
    p.add_argument(
        "--gemm-repeats",
        type=int,
        default=None,
        help="timed repeats per GEMM shape (default 7, 3 with --quick)",
    )
    p.add_argument(
        "--gpu",
        action="store_true",
        help="CUDA mode: xpdiff on CuPy vs torch CUDA eager, train + infer + device "
        "memory, batch --gpu-batch (skipped with a message without a device)",
    )
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write all results here")
    # internal: one framework's memory probe in a fresh process
    p.add_argument("--_memprobe", choices=("xpdiff", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--config", default="flagship", help=argparse.SUPPRESS)
    # internal: the --gpu code path on NumPy + torch CPU, to test the harness without a device
    p.add_argument("--_gpu-dryrun", dest="_gpu_dryrun", action="store_true", help=argparse.SUPPRESS)
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


def _thread_limits(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """Set torch's thread count; a context holding NumPy's BLAS to ``--threads``.

    torch and threadpoolctl are required for the CPU comparison; the GPU machines may
    lack threadpoolctl, and then nothing is limited.
    """
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        if not args.gpu:
            raise
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if not args.gpu:
            raise
        return contextlib.nullcontext()
    return threadpool_limits(limits=args.threads, user_api="blas")


def _run_sections(args: argparse.Namespace, results: dict) -> None:
    """The GPU comparison, or the CPU sections chosen by ``--sections``, in order."""
    if args.gpu or args._gpu_dryrun:
        from .gpu import section_gpu

        section_gpu(args.config_names, args, results)
        return
    if "gemm" in args.sections:
        from .gemm import section_gemm

        section_gemm(args, results)
    if {"train", "infer", "layers"} & set(args.sections):
        from .speed import section_speed

        section_speed(args.config_names, args, results)
    if "memory" in args.sections:
        from .memory import section_memory

        section_memory(args.config_names, args, results)
    if "sample" in args.sections:
        from .sample import section_sample

        section_sample(args, results)
    if "gemm" in args.sections:
        from .gemm import drift_check

        drift_check(args, results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args._argv = sys.argv[1:] if argv is None else list(argv)  # for the rerun hint
    if args._memprobe:
        from .memory import memprobe

        memprobe(args._memprobe, args.config, args.batch, args.threads)
        return 0

    results: dict = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
    t_start = time.perf_counter()
    with _thread_limits(args):
        env = environment(args)
        results["env"] = env
        print_environment(env)
        _run_sections(args, results)
    print_blas_warning(results["env"])  # again: the header has scrolled away by now
    results["env"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_start
    print(
        f"\ntotal wall time {results['wall_s']:.0f} s; load avg at end: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {args.json}")
    return 0
