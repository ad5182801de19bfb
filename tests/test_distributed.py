"""Data-parallel training: xpdiff.distributed on its own, the Trainer's shards in one process,
and, under ``mpiexec -n 2`` (skipped with the reason without mpi4py or mpiexec), the proof
that two processes train exactly as one: the same weights bit for bit after 10 steps, in
float64 and float32, an exact resume after a ``kill -9`` of one rank, and the command line.

Run as a script (``python tests/test_distributed.py MODE RUN_DIR``) this file is the worker
that every rank of those ``mpiexec`` runs executes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RGB_UNET

from xpdiff import backend, distributed, io
from xpdiff.models import UNet2DModel
from xpdiff.nn import init
from xpdiff.schedulers import DDPMScheduler
from xpdiff.training import Trainer, TrainingDiverged, TrainingSettings, latest_checkpoint

# 20 images in batches of 16: every epoch ends with a batch of 4, split 2 + 2
SETTINGS = dict(batch_size=16, max_steps=10, checkpoint_every=10, log_every=1, warmup_steps=2)
# The float32 tolerance of a batch mean's reduction order.  After 10 AdamW steps, one forward
# pass over both shards (a mean over 16 samples) against the two shards accumulated (two means
# over 8, halved and added) differ by rounding, which Adam's normalisation amplifies where a
# gradient is near zero: measured max |dw| 1.0e-4 (1% of the largest weight change, 1.2e-2),
# 99th percentile 3.5e-8; float64: max 1.5e-13.  Two processes against one process running
# the same shards accumulated are bit-identical instead (the same additions).
F32_ATOL, F32_P99, F64_ATOL = 5e-4, 1e-6, 1e-10


def make_trainer(run: Path, dtype: str = "float32", labelled: bool = False, **kw) -> Trainer:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (20, 3, 8, 8)).astype(np.float32)
    labels = (np.arange(20) % 3).astype(np.int64) if labelled else None
    world = kw.pop("world", None)
    with init.seeded(0):
        model = UNet2DModel(
            **TINY_RGB_UNET,
            num_class_embeds=4 if labelled else None,
            dtype=dtype,
            xp=backend.namespace_for("numpy"),  # these runs compare host arrays
        )
    return Trainer(
        model,
        DDPMScheduler(num_train_timesteps=100),
        images,
        labels,
        settings=TrainingSettings(**{**SETTINGS, "label_dropout": 0.5, **kw}),
        run_dir=run,
        progress=False,
        world=world,
    )


def saved(run: Path, what: str = "unet") -> dict:
    return io.load_safetensors(latest_checkpoint(run) / what / io.WEIGHTS_NAME)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, first {differ[0]}"


def losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def fingerprint(t: Trainer) -> str:
    h = hashlib.sha256()
    for _, p in t.model.named_parameters():
        h.update(np.ascontiguousarray(p.data).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# xpdiff.distributed alone
# ---------------------------------------------------------------------------
def test_launched_size_reads_the_launchers_variables(monkeypatch):
    for name in distributed._SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched_size() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.launched_size() == 4
    monkeypatch.setenv("PMI_SIZE", "two")
    with pytest.raises(ValueError, match="expected PMI_SIZE to be a positive integer, got 'two'"):
        distributed.launched_size()


def test_a_launch_without_mpi4py_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")

    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(distributed.importlib, "import_module", missing)
    with pytest.raises(
        ImportError, match=r'2 processes, which needs mpi4py: pip install "xpdiff\[mpi\]"'
    ):
        distributed.MPIWorld()


def test_one_process_world_is_a_no_op():
    w = distributed.World()
    assert (w.rank, w.size, w.is_root) == (0, 1, True)
    buf = np.arange(5, dtype=np.float32)
    assert w.allreduce_sum(buf) is buf and w.broadcast(buf) is buf
    assert w.allgather_object({"a": 1}) == [{"a": 1}] and w.allreduce_scalar(2) == 2.0
    w.barrier()
    w.check_same("model configuration", {"x": 1})
    assert w.on_root(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(KeyError):
        w.on_root(lambda: {}["missing"])


def test_flatten_unflatten_and_gradient_buffer(tmp_path):
    xp = backend.namespace_for("numpy")
    arrays = [np.arange(6.0).reshape(2, 3), np.array([7.0]), np.ones((2, 1, 2))]
    buf = distributed.flatten(arrays, xp)
    assert buf.shape == (11,) and buf.flags.c_contiguous
    back = distributed.unflatten(buf, [a.shape for a in arrays])
    assert all(np.array_equal(a, b) for a, b in zip(arrays, back, strict=True))
    assert np.shares_memory(back[0], buf)  # views: one buffer, no copies
    with pytest.raises(ValueError, match="expected a buffer of 11 elements for 3 shapes, got 10"):
        distributed.unflatten(buf[:10], [a.shape for a in arrays])
    with pytest.raises(ValueError, match="expected at least one array, got none"):
        distributed.flatten([], xp)
    model = make_trainer(tmp_path, world=distributed.World()).model
    params = model.parameters()
    zeros = distributed.gradient_buffer(params)  # no backward yet: zeros
    assert zeros.shape == (model.num_parameters(),) and not zeros.any()
    for p in params:
        p.grad = np.full(p.shape, 0.5, dtype=np.float32)
    summed = distributed.allreduce_gradients(params, distributed.World())
    assert summed.dtype == np.float32 and np.all(summed == 0.5)
    assert all(np.shares_memory(p.grad, summed) for p in params)


def test_mpi_world_rejects_buffers_it_cannot_reduce():
    with pytest.raises(ValueError, match="expected a 1-D float32 or float64 buffer, got int64"):
        distributed._check_buffer("allreduce_sum", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"got float32 \(2, 2\)"):
        distributed._check_buffer("allreduce_sum", np.zeros((2, 2), dtype=np.float32))


def test_cupy_buffers_reduce_through_nccl():
    ok, why = backend.cupy_status()
    if not ok:
        print(f"SKIP cupy/NCCL all-reduce: {why}")
        pytest.skip(f"CuPy unusable here: {why}")
    if distributed._nccl() is None:
        pytest.skip("CuPy was built without NCCL (cupy.cuda.nccl); host staging is used")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip('mpi4py is not installed (pip install "xpdiff[mpi]")')
    xp = backend.namespace_for("cupy")
    w = distributed.MPIWorld()  # a world of one process: NCCL with one rank
    w.use_local_device()
    buf = xp.arange(7, dtype=xp.float32)
    assert w.allreduce_sum(buf) is buf
    assert w.broadcast(buf) is buf
    assert backend.to_numpy(buf).tolist() == list(range(7))


# ---------------------------------------------------------------------------
# shards in one process
# ---------------------------------------------------------------------------
class _Pretend(distributed.World):
    """A world that claims several processes but has only this one (for argument checks)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


def test_shards_are_checked_against_processes_and_batch(tmp_path):
    with pytest.raises(
        ValueError, match="expected shards to be a multiple of the 2 processes, got 3"
    ):
        make_trainer(tmp_path, shards=3, world=_Pretend(0, 2))
    with pytest.raises(
        ValueError, match="expected shards to be an integer >= 1 and <= 16 or None, got 17"
    ):
        make_trainer(tmp_path, shards=17)
    t = make_trainer(tmp_path, shards=4, world=_Pretend(1, 2))
    assert t.shards == 4 and list(t.local_shards) == [2, 3]
    assert make_trainer(tmp_path, world=_Pretend(1, 2)).shards == 2  # default: one per process
    groups = t._local_groups(4)  # 4 samples, 4 shards: rank 1 holds samples 2 and 3
    assert groups == [[(2, 2, 3)], [(3, 3, 4)]]
    assert t._local_groups(2) == []  # shards 2 and 3 of a batch of 2 are empty


def test_shard_zero_draws_the_single_process_noise(tmp_path):
    one = make_trainer(tmp_path / "a", world=distributed.World())
    two = make_trainer(tmp_path / "b", shards=2, world=distributed.World())
    t1, n1, _ = one._draw(0, 8, (3, 8, 8), None)
    t2, n2, _ = two._draw(0, 8, (3, 8, 8), None)
    assert np.array_equal(t1, t2) and np.array_equal(n1, n2)
    t3, n3, _ = two._draw(1, 8, (3, 8, 8), None)
    assert not np.array_equal(n3, n2)


def test_accumulated_shards_match_one_forward_pass_within_float32_rounding(tmp_path):
    runs = {}
    for dtype in ("float32", "float64"):
        for acc in (True, False):
            run = tmp_path / f"{dtype}-{acc}"
            make_trainer(run, dtype, labelled=True, shards=2, accumulate=acc).train()
            runs[dtype, acc] = saved(run)
    for dtype, atol in (("float32", F32_ATOL), ("float64", F64_ATOL)):
        a, b = runs[dtype, True], runs[dtype, False]
        diff = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a])
        assert diff.max() < atol, (dtype, diff.max())
        if dtype == "float32":
            assert np.quantile(diff, 0.99) < F32_P99, np.quantile(diff, 0.99)


def test_resume_of_a_sharded_run_is_exact_and_needs_its_shard_count(tmp_path):
    full = make_trainer(tmp_path / "full", shards=2, checkpoint_every=3)
    full.train()
    make_trainer(tmp_path / "part", shards=2, checkpoint_every=3).train(until=3)
    state = io.load_json(latest_checkpoint(tmp_path / "part") / "trainer_state.json")
    assert state["shards"] == 2 and len(state["noise_rng_states"]) == 2
    with pytest.raises(ValueError, match=r"split each batch into 2 shards, this run into 1"):
        make_trainer(tmp_path / "part", checkpoint_every=3).resume()
    resumed = make_trainer(tmp_path / "part", shards=2, checkpoint_every=3)
    assert resumed.resume() and resumed.step == 3
    resumed.train()
    assert_same_weights(saved(tmp_path / "full"), saved(tmp_path / "part"))
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


# ---------------------------------------------------------------------------
# two processes (mpiexec -n 2)
# ---------------------------------------------------------------------------
def _mpiexec() -> list[str]:
    if importlib.util.find_spec("mpi4py") is None:
        print('SKIP mpiexec tests: mpi4py is not installed (pip install "xpdiff[mpi]")')
        pytest.skip('mpi4py is not installed (pip install "xpdiff[mpi]")')
    exe = shutil.which("mpiexec") or shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    if exe is None:
        print("SKIP mpiexec tests: no mpiexec on PATH")
        pytest.skip("no mpiexec on PATH (the mpich package brings one)")
    return [exe, "-n", "2"]


def _env() -> dict:
    one = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "XPDIFF_NUM_THREADS": "1"}
    return {**os.environ, **one}


def _worker(mode: str, run: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [*_mpiexec(), sys.executable, __file__, mode, str(run)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


EQUIVALENCE = {"f64": dict(dtype="float64"), "f32": dict(dtype="float32", labelled=True)}


def test_two_processes_train_as_one_bit_for_bit(tmp_path):
    """Global batch 16 over 2 ranks of 8 against one process running the same 2 shards of 8
    one after another: every sum is the same single addition, so the weights are equal bit
    for bit after 10 steps in float64 and float32; only rank 0 writes."""
    _worker("equivalence", tmp_path / "mpi")
    for name, kw in EQUIVALENCE.items():
        run = tmp_path / "mpi" / name
        ranks = [(run / f"rank{r}.sha").read_text() for r in (0, 1)]
        assert ranks[0] == ranks[1], "the ranks ended with different weights"
        one = make_trainer(tmp_path / "one" / name, shards=2, **kw)
        one.train()
        assert ranks[0] == fingerprint(one)
        assert_same_weights(saved(run), saved(one.run_dir))
        assert_same_weights(saved(run, "unet_ema"), saved(one.run_dir, "unet_ema"))
        assert losses(run) == losses(one.run_dir)  # rank 0 logs the loss of both ranks
        assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-0000010"]
        assert not list(run.glob(".tmp-*")) and not (run / "train.lock").exists()


def test_kill_9_of_one_rank_then_resume_on_two_ranks_is_exact(tmp_path):
    run = tmp_path / "killed"
    cmd = [*_mpiexec(), sys.executable, __file__, "long", str(run)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        ptr = run / "latest.json"
        if ptr.exists() and json.loads(ptr.read_text())["step"] >= 4 and (run / "pid1").exists():
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.kill(int((run / "pid1").read_text()), signal.SIGKILL)
    proc.communicate(timeout=60)  # mpiexec ends the other rank too
    assert proc.returncode != 0
    done = latest_checkpoint(run)
    assert done is not None and 4 <= int(done.name.split("-")[1]) < LONG["max_steps"]
    _worker("resume", run)
    whole = make_trainer(tmp_path / "whole", shards=2, **{**LONG, "checkpoint_every": 100})
    whole.train()
    assert_same_weights(saved(run), saved(whole.run_dir))


def test_mpiexec_xpdiff_train_takes_the_same_flags(tmp_path):
    from xpdiff.digits.cli import main

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TINY_RUN

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(TINY_RUN, max_steps=3)))
    flags = ["train", "--config", str(config), "--no-samples", "--no-progress"]
    script = Path(sys.executable).parent / "xpdiff"
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "xpdiff.digits.cli"]
    cmd = [*_mpiexec(), *entry, *flags, "--out", str(tmp_path / "mpi")]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("training a ") == 1 and "2 processes" in out.stdout
    assert main([*flags, "--shards", "2", "--out", str(tmp_path / "one")]) == 0
    assert_same_weights(saved(tmp_path / "mpi"), saved(tmp_path / "one"))


def test_a_nan_on_one_rank_stops_both_cleanly(tmp_path):
    run = tmp_path / "nan"
    _worker("nan", run)  # exit status 0: both ranks caught TrainingDiverged and returned
    errors = [(run / f"rank{r}.err").read_text() for r in (0, 1)]
    assert all("loss became nan at step 3" in e and "checkpoint-0000002" in e for e in errors)
    assert latest_checkpoint(run).name == "checkpoint-0000002"


# ---------------------------------------------------------------------------
# the worker every rank runs
# ---------------------------------------------------------------------------
LONG = dict(max_steps=40, checkpoint_every=2, batch_size=8, log_every=100)


def _worker_main(mode: str, run: Path) -> None:
    world = distributed.world()
    assert world.size == 2, f"expected 2 processes, got {world.size}"
    if mode == "equivalence":
        for name, kw in EQUIVALENCE.items():
            t = make_trainer(run / name, **kw)
            t.train()
            (run / name / f"rank{world.rank}.sha").write_text(fingerprint(t))
    elif mode == "long":
        run.mkdir(parents=True, exist_ok=True)
        (run / f"pid{world.rank}").write_text(str(os.getpid()))
        make_trainer(run, **LONG).train()
    elif mode == "nan":  # rank 1 alone gets a NaN weight before step 3
        t = make_trainer(run, **{**LONG, "max_steps": 6})
        real_step = t.train_step

        def poisoned(xb, yb):
            if t.step == 3 and world.rank == 1:
                w = t.model.conv_out.weight
                w.data = w.data * float("nan")
            return real_step(xb, yb)

        t.train_step = poisoned
        try:
            t.train()
        except TrainingDiverged as err:
            (run / f"rank{world.rank}.err").write_text(str(err))
    elif mode == "resume":
        t = make_trainer(run, **{**LONG, "checkpoint_every": 100})
        assert t.resume()
        t.train()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    _worker_main(sys.argv[1], Path(sys.argv[2]))
