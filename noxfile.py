"""Test sessions: ``nox -s tests-numpy tests-cupy``, plus ``lint`` and ``bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests-numpy", "tests-cupy"]
nox.options.reuse_existing_virtualenvs = True

# torch==2.13.0 is pinned: on the project's machines it installs a CPU build from local disk.
ORACLE = ["torch==2.13.0", "diffusers", "scipy"]
# pinned: another ruff version may format differently (.pre-commit-config.yaml pins the same)
RUFF = "ruff==0.17.6"

# The tests use small arrays: one BLAS thread is faster for them, and it keeps the suite from
# collapsing when the machine is shared (two BLAS threads on a busy 2-core machine wait on each
# other for whole scheduler time slices).  Results do not depend on it.
SINGLE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@nox.session(name="tests-numpy")
def tests_numpy(session: nox.Session) -> None:
    """The whole suite on numpy, array_api_strict and torch namespaces, with the oracle tests
    and the data-parallel tests under ``mpiexec -n 2`` (the ``mpi`` extra brings mpi4py and
    MPICH)."""
    session.install(*ORACLE)
    session.install("-e", ".[test,mpi]")
    session.run(
        "pytest",
        *session.posargs,
        env={
            "XPDIFF_TEST_BACKENDS": "numpy,array_api_strict,torch",
            "XPDIFF_BACKEND": "numpy",
            **SINGLE_THREAD,
        },
    )


@nox.session(name="tests-cupy")
def tests_cupy(session: nox.Session) -> None:
    """The same suite on CuPy; without a CUDA device it says so and tests nothing."""
    session.install("-e", ".[test,cuda]")
    probe = "from xpdiff.backend import cupy_status; ok, why = cupy_status(); print(ok, why)"
    out = (session.run("python", "-c", probe, silent=True) or "").strip()
    if not out.startswith("True"):
        session.log(f"tests-cupy TESTED NOTHING: {out.partition(' ')[2]}")
        return
    session.install(*ORACLE)
    session.run(
        "pytest",
        *session.posargs,
        env={"XPDIFF_TEST_BACKENDS": "cupy", "XPDIFF_BACKEND": "cupy", **SINGLE_THREAD},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check (with the complexity and banned-import rules) and ruff format --check over
    the whole project (the README's code blocks included; ignored files skipped)."""
    session.install(RUFF)
    session.run("ruff", "check")
    session.run("ruff", "format", "--check")


@nox.session
def bench(session: nox.Session) -> None:
    """xpdiff (NumPy) against PyTorch CPU eager: see benchmarks/README.md and RESULTS.md.

    threadpoolctl (thread limits and the OpenBLAS kernel in the header) is the benchmark's
    own need, installed here rather than made a dependency of xpdiff."""
    session.install(*ORACLE, "threadpoolctl")
    session.install("-e", ".")
    session.run("python", "benchmarks/bench.py", *session.posargs)
