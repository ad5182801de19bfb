"""The ``gemm`` section (float32 matrix products) and the load check at the end of a run."""

from __future__ import annotations

import argparse

from .harness import alternate, fmt, median, print_table


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
        times = alternate(
            {"numpy": lambda a=a, b=b: a @ b, "torch": lambda ta=ta, tb=tb: torch.mm(ta, tb)},
            1,
            reps,
        )
        fl = 2.0 * m * k * n
        gn, gt = fl / median(times["numpy"]) / 1e9, fl / median(times["torch"]) / 1e9
        out[label] = {
            "m": m,
            "k": k,
            "n": n,
            "layout": layout,
            "numpy_gflops": gn,
            "torch_gflops": gt,
        }
        rows.append([label, fmt(median(times["numpy"]) * 1e3, 2), fmt(gn), fmt(gt)])
    peak = max(v["numpy_gflops"] for v in out.values())
    results["gemm"] = {"shapes": out, "peak_numpy_gflops": peak}
    print_table(
        f"float32 GEMM, {args.threads} threads, median of {reps}",
        ["shape", "numpy ms", "numpy GFLOP/s", "torch GFLOP/s"],
        rows,
    )
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
    note = (
        ""
        if abs(change) < 0.2
        else ("  <-- the machine's load changed during the run: rerun when it is quiet")
    )
    print(
        f"\nload check: NumPy 2048^3 GEMM {start:.1f} GFLOP/s at the start, {end:.1f} at the "
        f"end ({100 * change:+.0f}%){note}"
    )
