"""The header: machine, load, library versions, BLAS thread pools, the OpenBLAS kernel.

Which OpenBLAS kernel runs matters more than most changes to xpdiff: ``OPENBLAS_CORETYPE``
forces one (and ``OPENBLAS_L2_SIZE`` overrides the cache size it is tuned for), and some
machines export them, e.g. Haswell (AVX2) kernels on a CPU with AVX-512.  torch's BLAS does
not read them, so the xpdiff/torch ratios would be skewed too.  ``blas_kernel`` reports the
kernel NumPy's OpenBLAS runs (threadpoolctl's ``architecture``) and warns when the variables
are set and the kernel is older than the CPU's flags allow.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import shlex
import sys
from collections.abc import Mapping

OPENBLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

# OpenBLAS x86-64 kernel names (threadpoolctl's ``architecture``, values of OPENBLAS_CORETYPE)
# by the widest vector instructions they use: index into ISA_NAMES / ISA_FLAGS.
KERNEL_ISA = {
    name.lower(): level
    for level, names in (
        (3, ("SkylakeX", "Cooperlake", "SapphireRapids")),
        (2, ("Haswell", "Zen")),
        (1, ("SandyBridge",)),
        (
            0,
            (
                "Prescott",
                "Core2",
                "Penryn",
                "Dunnington",
                "Nehalem",
                "Atom",
                "Opteron",
                "Barcelona",
                "Nano",
            ),
        ),
    )
    for name in names
}
ISA_NAMES = ("SSE", "AVX", "AVX2", "AVX-512")
ISA_FLAGS = ("sse2", "avx", "avx2", "avx512f")  # the /proc/cpuinfo flag of each level
RERUN = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench.py"


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (``flags`` in /proc/cpuinfo), None where unreadable."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    return None


def cpu_isa(flags: set[str] | None) -> int | None:
    """Index in ISA_NAMES of the widest vector level the flags show (None: unknown)."""
    if not flags:
        return None
    levels = [i for i, f in enumerate(ISA_FLAGS) if f in flags]
    return max(levels) if levels else None


def _openblas_of(pools: list[dict], owner: str) -> dict | None:
    for d in pools:
        if d.get("internal_api") == "openblas" and owner in str(d.get("filepath", "")):
            return d
    return None


def blas_kernel(
    pools: list[dict] | None,
    flags: set[str] | None,
    environ: Mapping[str, str],
    argv: list[str] | None = None,
    torch_info: dict | None = None,
) -> dict:
    """What NumPy's OpenBLAS runs and whether the environment forces an older kernel.

    ``pools``: ``threadpoolctl.threadpool_info()`` (None: threadpoolctl missing); NumPy's
    OpenBLAS is the one whose file lies under numpy's folders (numpy.libs for the wheels),
    else the first one outside torch's.  ``flags``: the CPU's.  The record has a
    ``warning`` (None when all is well) and a ``note``.
    """
    pools = pools or []
    forced = {k: environ[k] for k in OPENBLAS_ENV if environ.get(k)}
    mine = _openblas_of(pools, "numpy") or next(
        (
            d
            for d in pools
            if d.get("internal_api") == "openblas" and "torch" not in str(d.get("filepath", ""))
        ),
        None,
    )
    theirs = _openblas_of(pools, "torch")
    arch = mine.get("architecture") if mine else None
    kernel = KERNEL_ISA.get(str(arch or forced.get("OPENBLAS_CORETYPE") or "").lower())
    cpu = cpu_isa(flags)
    rep = {
        "numpy_openblas_architecture": arch,
        "numpy_openblas_version": mine.get("version") if mine else None,
        "numpy_blas": (mine or {}).get("internal_api")
        or next((d.get("internal_api") for d in pools if d.get("user_api") == "blas"), None),
        "kernel_isa": None if kernel is None else ISA_NAMES[kernel],
        "cpu_isa": None if cpu is None else f"{ISA_NAMES[cpu]} ({ISA_FLAGS[cpu]})",
        "torch_openblas_architecture": theirs.get("architecture") if theirs else None,
        "torch": torch_info,
        "openblas_env": forced,
        "warning": None,
        "note": None,
    }
    older = kernel is not None and cpu is not None and kernel < cpu
    which = arch or forced.get("OPENBLAS_CORETYPE")
    if forced and older:
        setting = " and ".join(f"{k}={v}" for k, v in forced.items())
        torch_too = (
            ""
            if theirs
            else (
                "; torch's BLAS does not read these variables, so the xpdiff/torch ratios are "
                "skewed too"
            )
        )
        cmd = RERUN + (" " + shlex.join(argv) if argv else "")
        rep["warning"] = (
            f"{setting} {'is' if len(forced) == 1 else 'are'} set: NumPy's OpenBLAS runs "
            f"its {which} ({ISA_NAMES[kernel]}) kernels on a CPU with {rep['cpu_isa']}, so "
            f"every NumPy/xpdiff time here is slower than this machine allows{torch_too}. "
            f"For timings, run: {cmd}"
        )
    elif forced:
        rep["note"] = (
            ", ".join(f"{k}={v}" for k, v in forced.items())
            + " set; the kernel is not older than the CPU allows"
        )
    elif older:
        rep["note"] = (
            f"NumPy's OpenBLAS picked {which} ({ISA_NAMES[kernel]}) on a CPU "
            f"with {rep['cpu_isa']}: this OpenBLAS build has no newer kernel for it"
        )
    return rep


def torch_blas() -> dict | None:
    """torch's BLAS (from its build configuration) and ATen's CPU capability."""
    try:
        import torch
    except ImportError:
        return None
    info: dict = {"blas_info": None, "cpu_capability": None}
    with contextlib.suppress(Exception):
        m = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
        info["blas_info"] = m.group(1) if m else None
    with contextlib.suppress(Exception):
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


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
    pools = None
    try:
        from threadpoolctl import threadpool_info

        pools = threadpool_info()
        keys = (
            "user_api",
            "internal_api",
            "prefix",
            "version",
            "num_threads",
            "threading_layer",
            "architecture",
        )
        env["threadpools"] = [{k: v for k, v in d.items() if k in keys} for d in pools]
    except ImportError:
        env["threadpools"] = [{"threadpoolctl": "not installed"}]
    env["blas_kernel"] = blas_kernel(
        pools, cpu_flags(), os.environ, getattr(args, "_argv", None), torch_blas()
    )
    return env


def print_blas_warning(env: dict) -> None:
    """The kernel warning, if any, framed so that it is seen (header and end of the run)."""
    warning = (env.get("blas_kernel") or {}).get("warning")
    if warning:
        bar = "!" * 100
        print(f"\n{bar}\nWARNING: {warning}\n{bar}", flush=True)


def print_environment(env: dict) -> None:
    print("# xpdiff benchmark")
    print(f"date: {env['date']}   host: {env['host']}   python {env['python']}")
    print(
        f"cpu: {env['cpu']}   cores: {env['cpu_count']} (usable {env['cpu_affinity']})   "
        f"load avg: {', '.join(f'{x:.2f}' for x in env['loadavg'])}"
    )
    print(
        f"numpy {env['numpy']}   torch {env['torch']}   diffusers {env['diffusers']}   "
        f"xpdiff {env['xpdiff']}   threads: {env['threads']} (torch {env.get('torch_threads')})"
    )
    for d in env["threadpools"]:
        print("threadpool: " + ", ".join(f"{k}={v}" for k, v in d.items()))
    bk = env.get("blas_kernel") or {}
    if bk.get("numpy_openblas_architecture"):
        mine = (
            f"OpenBLAS {bk['numpy_openblas_version']} {bk['numpy_openblas_architecture']}"
            f" ({bk['kernel_isa'] or '?'})"
        )
    else:
        mine = f"{bk.get('numpy_blas') or 'unknown'} (kernel not reported)"
    t = bk.get("torch")
    if bk.get("torch_openblas_architecture"):
        theirs = f"OpenBLAS {bk['torch_openblas_architecture']}"
    elif t:
        theirs = f"{t['blas_info'] or 'BLAS ?'} (not visible to threadpoolctl)"
    else:
        theirs = "not installed"
    cap = f", ATen CPU capability {t['cpu_capability']}" if t and t["cpu_capability"] else ""
    print(f"BLAS kernel: numpy {mine}   torch {theirs}{cap}   CPU {bk.get('cpu_isa') or '?'}")
    if bk.get("note"):
        print(f"note: {bk['note']}")
    print_blas_warning(env)
    sys.stdout.flush()
