#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (no internet; CuPy, PyTorch, NumPy and pytest installed).
#
#   bash benchmarks/gpu.sh            # from anywhere; it runs from the repository root
#
# 1. lists the GPUs (nvidia-smi -L);
# 2. installs the wheels carried in benchmarks/wheels/ (array-api-compat, array-api-strict,
#    ...) with pip --no-index, when that folder holds any;
# 3. runs the test suite on CuPy: XPDIFF_TEST_BACKENDS=cupy XPDIFF_BACKEND=cupy pytest -q -x;
# 4. runs the GPU benchmark: python benchmarks/bench.py --gpu --quick.
# Everything goes to the terminal and, when $OUT is set, to $OUT/gpu_log.txt (the benchmark's
# JSON to $OUT/gpu_bench.json).  Exit status: 0 when the tests and the benchmark both passed.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

LOG=/dev/null
JSON=()
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG="$OUT/gpu_log.txt"
    JSON=(--json "$OUT/gpu_bench.json")
fi

run() {
    echo "== $(date -Is)  $(hostname)  $(pwd)"
    echo "== nvidia-smi -L"
    nvidia-smi -L || echo "nvidia-smi -L failed (rc $?)"

    if [ -d benchmarks/wheels ] && compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
        echo "== pip install --no-index benchmarks/wheels/*.whl"
        python -m pip install --no-index --find-links benchmarks/wheels benchmarks/wheels/*.whl \
            || echo "wheel install failed (rc $?); going on with what is installed"
    else
        echo "== no benchmarks/wheels/*.whl: using the installed packages"
    fi

    echo "== versions"
    python - <<'EOF'
import importlib
for name in ("numpy", "cupy", "torch", "diffusers", "array_api_compat", "array_api_strict",
             "pytest", "threadpoolctl"):
    try:
        print(f"{name:18s} {importlib.import_module(name).__version__}")
    except Exception as err:
        print(f"{name:18s} MISSING ({type(err).__name__}: {err})")
from xpdiff.backend import cupy_status
print("cupy_status:", cupy_status())
EOF

    echo "== tests on cupy"
    PYTHONPATH=. XPDIFF_TEST_BACKENDS=cupy XPDIFF_BACKEND=cupy python -m pytest -q -x tests
    local rc_tests=$?
    echo "== tests rc=$rc_tests"

    echo "== benchmark: python benchmarks/bench.py --gpu --quick"
    PYTHONPATH=. python benchmarks/bench.py --gpu --quick ${JSON[@]+"${JSON[@]}"}
    local rc_bench=$?
    echo "== benchmark rc=$rc_bench"

    [ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
}

export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
run 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
