"""The benchmark harness behind ``benchmarks/bench.py`` (see benchmarks/README.md).

Modules: ``cli`` (flags, ``main``), ``harness`` (configs, the two runners, timing protocol,
tables), ``environment`` (header, OpenBLAS kernel check), ``speed`` (train/infer), ``profile``
(per-op breakdown), ``gemm``, ``memory`` (the probe runs in its own process), ``sample``,
``gpu`` (CuPy).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
BENCH_SCRIPT = ROOT / "benchmarks" / "bench.py"  # the entry point the memory probe re-runs
if str(ROOT) not in sys.path:  # run from a checkout without ``pip install -e .``
    sys.path.insert(0, str(ROOT))
