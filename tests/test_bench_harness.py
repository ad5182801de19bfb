"""Smoke tests of the benchmark harness (benchmarks/xpbench): flags, FLOP counters, op hooks,
one tiny NumPy training step.  No timing is checked; everything runs in a few seconds."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from xpbench import cli, environment, harness, profile  # noqa: E402

TINY = {  # seed14's shape at a few channels: a UNet with attention in a few milliseconds
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "num_class_embeds": 10,
    "attention_head_dim": 8,
}


def _has(*mods: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in mods)


def test_parser_defaults_and_errors():
    a = cli.parse_args([])
    assert a.config_names == ["seed14", "mnist28", "flagship"]
    assert a.sections == list(harness.SECTIONS)
    assert (a.repeats, a.warmup, a.gemm_repeats, a.sample_steps) == (7, 2, 7, 50)
    q = cli.parse_args(["--quick", "--sections", "gemm, layers"])
    assert q.config_names == ["flagship"] and q.sections == ["gemm", "layers"]
    assert (q.repeats, q.warmup, q.gemm_repeats, q.sample_steps) == (2, 1, 3, 5)
    m = cli.parse_args(["--_memprobe", "torch", "--config", "seed14"])
    assert (m._memprobe, m.config) == ("torch", "seed14")
    for bad in (["--sections", "train,nope"], ["--configs", "huge"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


def _z(*shape: int) -> np.ndarray:
    return np.zeros(shape, dtype=np.float32)


def test_flop_counters_read_the_layout():
    B, C, O, H, k = 2, 3, 5, 8, 3
    want = 2.0 * B * H * H * O * C * k * k
    w = _z(O, C, k, k)
    nchw = profile.conv_forward_flops(
        {"x": _z(B, C, H, H), "w": w, "layout": "NCHW"}, (_z(B, O, H, H), None)
    )
    nhwc = profile.conv_forward_flops(
        {"x": _z(B, H, H, C), "w": w, "layout": "NHWC"}, (_z(B, H, H, O), None)
    )
    fixed = profile.conv_forward_flops(
        {"x": _z(B, H, H, C), "w": w}, (_z(B, H, H, O), None), layout="NHWC"
    )
    assert nchw == nhwc == fixed == want
    # backward: the layout from the cache (an attribute, or a string item of a tuple)
    gw = (None, _z(O, C, k, k), None)
    cache = SimpleNamespace(layout="NHWC")
    assert profile.conv_backward_flops({"cache": cache, "gy": _z(B, H, H, O)}, gw) == 2 * want
    assert profile.conv_backward_flops({"cache": (1, "NHWC"), "gy": _z(B, H, H, O)}, gw) == 2 * want
    assert profile.conv_backward_flops({"cache": (), "gy": _z(B, O, H, H)}, gw) == 2 * want
    # linear: 2*N*in*out; attention 4*B*h*N*M*d in either layout
    assert profile.linear_forward_flops({"x": _z(4, 6, 7)}, (_z(4, 6, 9), None)) == 2 * 24 * 7 * 9
    assert (
        profile.linear_backward_flops({"gy": _z(4, 6, 9)}, (None, _z(9, 7), None)) == 4 * 24 * 7 * 9
    )
    h, N, M, d = 2, 5, 7, 4
    sd = 4.0 * B * h * N * M * d
    assert profile.sdpa_forward_flops({"q": _z(B, N, h, d), "k": _z(B, M, h, d)}, None) == sd
    assert (
        profile.sdpa_forward_flops({"q": _z(B, h, N, d), "k": _z(B, h, M, d)}, None, layout="BHND")
        == sd
    )
    assert profile.sdpa_backward_flops({}, (_z(B, N, h, d), _z(B, M, h, d))) == 2.5 * sd


def test_recorder_exclusive_flops_and_counter_errors(monkeypatch):
    monkeypatch.setitem(profile.FLOPS, "outer", lambda p, out: 10.0)
    monkeypatch.setitem(profile.FLOPS, "inner", lambda p, out: 4.0)
    monkeypatch.setitem(profile.FLOPS, "broken", lambda p, out: p["no_such_argument"])
    rec = profile.OpRecorder()
    inner = rec.wrap("inner", lambda a: (a, None))
    outer = rec.wrap("outer", lambda a: inner(a))
    glue = rec.wrap("glue", lambda a: inner(a))  # no counter: passes the inner FLOPs on
    outer(1)
    glue(1)
    assert rec.flops == {"outer": 6.0, "inner": 8.0} and rec.calls["inner"] == 2
    broken = rec.wrap("broken", lambda a: (a, None))
    assert broken(2) == (2, None) and broken(3) == (3, None)
    assert "no_such_argument" in rec.notes["broken"] and rec.calls["broken"] == 2


def test_ops_table_skips_missing_rows():
    found, skipped = profile.resolve_ops(
        (
            ("xpdiff.functional.conv", "conv2d_forward"),
            ("xpdiff.functional.conv", "no_such_op"),
            ("xpdiff.functional.no_such_module", "f"),
        )
    )
    assert [n for n, _, _ in found] == ["conv2d_forward"]
    assert len(skipped) == 2 and "no_such_op" in skipped[0] and "no_such_module" in skipped[1]
    found, skipped = profile.resolve_ops()
    assert {"conv2d_forward", "conv2d_backward"} <= {n for n, _, _ in found}


def test_tiny_numpy_train_infer_and_profile():
    from xpdiff import backend
    from xpdiff.functional import conv, embeddings
    from xpdiff.nn import blocks

    xr = harness.XpdiffRunner(TINY, backend.namespace_for("numpy"), harness.host_inputs(TINY, 2))
    times = harness.alternate({"xpdiff": xr.train_step}, 0, 1)
    row, rec = harness.throughput_rows("tiny", 2, times)
    assert rec["torch_median_s"] is None and row[-1] == "n/a" and rec["xpdiff_median_s"] > 0
    times = harness.alternate({"xpdiff": xr.forward}, 0, 1)
    row, rec = harness.throughput_rows("tiny", 2, times, None, True)
    assert len(row) == len(harness.THROUGHPUT_HEAD) + 1

    originals = (
        conv.conv2d_forward,
        embeddings.timestep_embedding,
        getattr(blocks, "timestep_embedding", None),
    )
    res: dict = {}
    profile.section_layers("tiny", xr, res, SimpleNamespace())
    lay = res["layers"]
    ops = lay["ops"]
    assert ops["conv2d_forward"]["calls"] > 0 and ops["conv2d_forward"]["flops"] > 0
    assert ops["timestep_embedding"]["calls"] == 1  # hooked where it was imported by name
    assert profile.OPTIMIZER_ROW in ops and ops["mse_loss"]["calls"] == 1
    assert sum(v["s"] for v in ops.values()) <= lay["step_s"]
    assert lay["flops_per_step"] == pytest.approx(sum(v["flops"] for v in ops.values()))
    assert (
        conv.conv2d_forward,
        embeddings.timestep_embedding,
        getattr(blocks, "timestep_embedding", None),
    ) == originals  # restored
    assert "step" not in vars(xr.opt)


def test_blas_kernel_warning():
    info = [
        {
            "user_api": "blas",
            "internal_api": "openblas",
            "architecture": "Haswell",
            "version": "0.3.31",
            "filepath": "/x/numpy.libs/libscipy_openblas.so",
        }
    ]
    flags = {"avx", "avx2", "fma", "avx512f"}
    rep = environment.blas_kernel(info, flags, {"OPENBLAS_CORETYPE": "Haswell"})
    assert rep["numpy_openblas_architecture"] == "Haswell"
    assert (
        "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench.py" in rep["warning"]
    )
    assert environment.blas_kernel(info, flags, {})["warning"] is None  # old CPU build: no env
    info[0]["architecture"] = "SkylakeX"
    assert environment.blas_kernel(info, flags, {"OPENBLAS_L2_SIZE": "1048576"})["warning"] is None
    assert (
        environment.blas_kernel(info, {"avx", "avx2"}, {"OPENBLAS_CORETYPE": "Haswell"})["warning"]
        is None
    )


@pytest.mark.oracle
@pytest.mark.skipif(not _has("torch", "diffusers"), reason="torch and diffusers not installed")
def test_tiny_pair_with_torch():
    from xpdiff import backend

    xr, tr = harness.build_pair(TINY, 2, backend.namespace_for("numpy"))
    assert harness.forward_agreement(xr, tr) < 1e-4
    times = harness.alternate({"xpdiff": xr.train_step, "torch": tr.train_step}, 0, 1)
    _, rec = harness.throughput_rows("tiny", 2, times)
    assert rec["ratio"] > 0


@pytest.mark.skipif(not _has("threadpoolctl"), reason="threadpoolctl not installed")
def test_memory_probe_subprocess():
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench.py"),
            "--_memprobe",
            "xpdiff",
            "--config",
            "seed14",
            "--batch",
            "1",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["framework"] == "xpdiff" and out["peak_kb"] >= 0 and out["baseline_kb"] > 0
