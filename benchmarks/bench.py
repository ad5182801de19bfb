#!/usr/bin/env python
"""xpdiff against PyTorch eager (diffusers' UNet2DModel): speed, memory, where the time goes.

    python benchmarks/bench.py --help

The entry point of the harness in benchmarks/xpbench/ (flags and sections: xpbench/cli.py;
what each number means: benchmarks/README.md).  The memory section re-runs this file in a
subprocess (``--_memprobe``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # makes ``xpbench`` importable

from xpbench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
