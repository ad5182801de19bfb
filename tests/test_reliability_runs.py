"""Reliability of runs: no hangs, checkpoint integrity, files, concurrency (issue 13, 1/3/4/5).

Each example of the issue is a test here; every training run is a few steps of a tiny UNet
on a small IDX data set written by the test.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN

from xpdiff import io
from xpdiff.digits.cli import main
from xpdiff.digits.training import TrainConfig, Trainer, load_for_sampling
from xpdiff.training import RunLock, RunLocked, TrainingDiverged, latest_checkpoint


@pytest.fixture(autouse=True)
def deadline():
    """A hang fails the test after 60 s instead of blocking the suite."""

    def boom(*_):
        raise TimeoutError("the test ran past its 60 s deadline (a hang?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, 60)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def write_idx(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` random 28x28 digits with labels 0..9 as raw IDX train files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    (folder / "train-images-idx3-ubyte").write_bytes(
        struct.pack(">iIII", 2051, n, 28, 28) + images.tobytes()
    )
    (folder / "train-labels-idx1-ubyte").write_bytes(struct.pack(">iI", 2049, n) + labels.tobytes())
    return folder


def tiny(data: Path | None, **kw) -> TrainConfig:
    base = dict(TINY_RUN, data=None if data is None else str(data), max_steps=4)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data200(tmp_path_factory) -> Path:
    return write_idx(tmp_path_factory.mktemp("d200"), 200)


@pytest.fixture
def run(tmp_path, data200) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path / "run"
    Trainer(tiny(data200), out, progress=False).train()
    return out


def edit_state(ckpt: Path, **changes) -> None:
    f = ckpt / "trainer_state.json"
    state = json.loads(f.read_text())
    state.update(changes)
    for k, v in changes.items():
        if v is KeyError:
            del state[k]
    f.write_text(json.dumps(state))


# ---------------------------------------------------------------------------
# 1. hangs: each ends within seconds with a clear error
# ---------------------------------------------------------------------------
def test_resume_with_batch_in_epoch_beyond_the_epoch(run, data200):
    edit_state(latest_checkpoint(run), batch_in_epoch=99999)
    t = Trainer(tiny(data200, max_steps=8), run, progress=False)
    with pytest.raises(
        ValueError,
        match=r"batch_in_epoch 99999 is beyond the epoch of 23 "
        r"batches",
    ):
        t.resume()
    assert not (run / RunLock.NAME).exists()  # the failed resume let the lock go


def test_resume_after_the_data_shrank(tmp_path):
    data = write_idx(tmp_path / "d", 200)
    out = tmp_path / "run"
    Trainer(tiny(data, max_steps=10, checkpoint_every=10), out, progress=False).train()
    write_idx(data, 50)  # the same --data path now holds 50 digits
    t = Trainer(tiny(data, max_steps=20, checkpoint_every=10), out, progress=False)
    with pytest.raises(ValueError, match=r"trained on 180 images, but .* now gives 50"):
        t.resume()
    # a checkpoint written before the data size was recorded: the position check catches it
    edit_state(latest_checkpoint(out), n_train=KeyError, data_sha256=KeyError)
    with pytest.raises(ValueError, match=r"batch_in_epoch 10 is beyond the epoch of 7 batches"):
        Trainer(tiny(data, max_steps=20, checkpoint_every=10), out, progress=False).resume()


def test_resume_after_the_data_changed_in_place(run, data200, tmp_path):
    other = write_idx(tmp_path / "other", 200, seed=1)
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    t = Trainer(tiny(other, max_steps=8), run, progress=False)
    t.run_config["data"] = state["train_config"]["data"]  # same path, other bytes
    with pytest.raises(ValueError, match=r"the training data \(.*\) changed"):
        t.resume()


def test_empty_data_set(tmp_path, capsys):
    empty = write_idx(tmp_path / "empty", 0)
    with pytest.raises(ValueError, match=r"Trainer: no training images in .*empty"):
        Trainer(tiny(empty), tmp_path / "run", progress=False)
    rc = main(
        [
            "train",
            "--data",
            str(empty),
            "--steps",
            "5",
            "--out",
            str(tmp_path / "r2"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2 and err.startswith("error: Trainer: no training images") and "Traceback" not in err
    )


# ---------------------------------------------------------------------------
# 3. run and checkpoint integrity
# ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_last_good_checkpoint_is_finite(tmp_path, data200, capsys):
    out = tmp_path / "run"
    t = Trainer(tiny(data200, lr=1e41, max_steps=6, checkpoint_every=1), out, progress=False)
    with pytest.raises(TrainingDiverged, match=r"new run .*lower --lr") as info:
        t.train()
    last = latest_checkpoint(out)
    assert ("(none yet)" in str(info.value)) == (last is None)
    if last is not None:
        weights = io.load_safetensors(last / "unet_ema" / io.WEIGHTS_NAME)
        assert all(np.isfinite(w).all() for w in weights.values())
    # a checkpoint whose weights are not finite is refused by sampling, not drawn as black
    Trainer(tiny(data200, max_steps=2), tmp_path / "ok", progress=False).train()
    ckpt = latest_checkpoint(tmp_path / "ok")
    f = ckpt / "unet_ema" / io.WEIGHTS_NAME
    w = io.load_safetensors(f)
    w["conv_out.weight"][...] = np.inf
    io.save_safetensors(w, f)
    png = tmp_path / "s.png"
    assert main(["sample", str(ckpt), "--out", str(png), "--steps", "2", "--per-digit", "1"]) == 2
    assert "the weights hold NaN or inf" in capsys.readouterr().err and not png.exists()


@pytest.mark.parametrize(
    "damage,match",
    [
        ("drop_m", r"optimizer.safetensors: AdamW.load_state_dict: missing m moments \(1\)"),
        ("shape_v", r"optimizer.safetensors: .*v.conv_in.bias: expected shape \(8,\), got \(3,\)"),
        ("extra", r"unexpected entry 'm.nonsense'"),
        ("ema_drop", r"unet_ema.*EMA.load_state_dict: missing entries \(1\): conv_in.bias"),
        ("ema_shape", r"EMA.load_state_dict: conv_in.bias: expected shape \(8,\), got \(2, 4\)"),
    ],
)
def test_mismatched_optimizer_or_ema_state_is_an_error(run, data200, damage, match):
    ckpt = latest_checkpoint(run)
    opt_f, ema_f = ckpt / "optimizer.safetensors", ckpt / "unet_ema" / io.WEIGHTS_NAME
    opt, ema = io.load_safetensors(opt_f), io.load_safetensors(ema_f)
    if damage == "drop_m":
        del opt["m.conv_in.bias"]
    elif damage == "shape_v":
        opt["v.conv_in.bias"] = np.zeros(3, np.float32)
    elif damage == "extra":
        opt["m.nonsense"] = np.zeros(3, np.float32)
    elif damage == "ema_drop":
        del ema["conv_in.bias"]
    else:
        ema["conv_in.bias"] = np.zeros((2, 4), np.float32)
    io.save_safetensors(opt, opt_f)
    io.save_safetensors(ema, ema_f)
    with pytest.raises(ValueError, match=match):
        Trainer(tiny(data200, max_steps=8), run, progress=False).resume()


@pytest.mark.parametrize(
    "change,match",
    [
        ({"step": -4}, r"expected step to be an integer >= 0, got -4"),
        ({"step": 3.5}, r"expected step to be an integer >= 0, got 3.5"),
        ({"step": "4"}, r"expected step to be an integer >= 0, got '4'"),
        ({"step": True}, r"expected step to be an integer >= 0, got True"),
        ({"step": 5}, r"step 5 does not match epoch 0 and batch_in_epoch 4"),
        ({"epoch": -1}, r"expected epoch to be an integer >= 0"),
        ({"step": KeyError}, r"missing entries \['step'\]"),
        ({"optimizer": [1]}, r"expected optimizer to be a JSON object"),
        ({"data_rng_state": {"state": 3}}, r"data_rng_state is not a generator state"),
        ({"ema": {"decay": float("nan"), "updates": 4}}, r"expected decay to be a finite number"),
        ({"optimizer": {"t": -1}}, r"expected t to be an integer >= 0, got -1"),
    ],
)
def test_bad_trainer_state_is_an_error(run, data200, change, match):
    edit_state(latest_checkpoint(run), **change)
    with pytest.raises(ValueError, match=match):
        Trainer(tiny(data200, max_steps=8), run, progress=False).resume()


def test_trainer_state_not_an_object(run, data200):
    (latest_checkpoint(run) / "trainer_state.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"trainer_state.json: expected a JSON object, got list"):
        Trainer(tiny(data200, max_steps=8), run, progress=False).resume()


@pytest.mark.parametrize(
    "text",
    [
        '["checkpoint-0000004"]',
        "garbage{",
        '{"checkpoint": 4}',
        '{"checkpoint": "../../etc"}',
        "\xff\xfe",
    ],
)
def test_malformed_latest_json_falls_back_with_a_warning(run, data200, text):
    (run / "latest.json").write_bytes(text.encode("latin-1"))
    with pytest.warns(RuntimeWarning, match=r"ignoring .*latest.json"):
        assert latest_checkpoint(run).name == "checkpoint-0000004"
    t = Trainer(tiny(data200, max_steps=6), run, progress=False)
    with pytest.warns(RuntimeWarning):
        assert t.resume() and t.step == 4
    t.train()
    assert json.loads((run / "latest.json").read_text())["checkpoint"] == "checkpoint-0000006"


def test_torn_metrics_line_does_not_block_resume(run, data200, capsys):
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "epoch": 0, "lo')  # a write cut short by a full disk
    t = Trainer(tiny(data200, max_steps=6), run, progress=False)
    assert t.resume()
    with pytest.warns(RuntimeWarning, match="dropping a torn last line"):
        t.train()
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    # a broken line in the middle is not a torn write: an error naming the file and line
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: expected a JSON object"):
        Trainer(tiny(data200, max_steps=8), run, progress=False).train()
    # through the CLI the warning is one line
    with open(metrics, "w") as f:
        f.write('{"step": 1}\n{"st')
    cfg = run / "cfg.json"
    cfg.write_text(json.dumps(tiny(data200, max_steps=7).to_json()))
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--out",
                str(run),
                "--resume",
                "--no-samples",
                "--no-progress",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "warning: " in err and "torn last line" in err and "Traceback" not in err


def test_failed_checkpoint_write_leaves_no_temporary_folder(tmp_path, data200, monkeypatch):
    out = tmp_path / "run"
    t = Trainer(tiny(data200, max_steps=4), out, progress=False)
    t.train(until=2)
    real = io.save_safetensors
    calls = {"n": 0}

    def full_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(b"half")
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata)

    monkeypatch.setattr(io, "save_safetensors", full_disk)
    for _ in range(3):  # each retry on a full disk
        calls["n"] = 0
        with pytest.raises(OSError, match="No space left"):
            t.save_checkpoint()
        assert not list(out.glob(".tmp-checkpoint-*"))
    assert latest_checkpoint(out).name == "checkpoint-0000002"
    monkeypatch.setattr(io, "save_safetensors", real)
    # leftovers of a killed writer are removed at the next start
    (out / ".tmp-checkpoint-0000003-99999" / "unet").mkdir(parents=True)
    (out / ".trash-checkpoint-0000001-99999").mkdir()
    t2 = Trainer(tiny(data200, max_steps=4), out, progress=False)
    t2.resume()
    t2.train()
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".trash-*"))


# ---------------------------------------------------------------------------
# 4. concurrency
# ---------------------------------------------------------------------------
def test_second_trainer_in_one_process_is_refused(run, data200):
    lock = RunLock(run)
    lock.acquire()
    try:
        t = Trainer(tiny(data200, max_steps=6), run, progress=False)
        with pytest.raises(RunLocked, match=rf"process {os.getpid()} is training there"):
            t.train()
        with pytest.raises(RunLocked):
            t.resume()
    finally:
        lock.release()
    assert not (run / RunLock.NAME).exists()
    t = Trainer(tiny(data200, max_steps=6), run, progress=False)
    assert t.resume()
    t.train()


def test_two_trainers_on_one_directory(tmp_path, data200, capsys):
    """A live trainer (another process) holds the lock: a second one refuses at start,
    naming its PID; after that process dies, its lock file is stale and is taken over."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from xpdiff.training import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (out / RunLock.NAME).read_text().split()[0] == str(holder.pid)
        with pytest.raises(RunLocked, match=rf"process {holder.pid} is training there"):
            Trainer(tiny(data200), out, progress=False).train()
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps(tiny(data200).to_json()))
        assert (
            main(
                ["train", "--config", str(cfg), "--out", str(out), "--no-progress", "--no-samples"]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert f"error: {out} is in use: process {holder.pid} is training there" in err
        assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (out / RunLock.NAME).exists()  # left behind by the killed process: stale
    Trainer(tiny(data200), out, progress=False).train()
    assert latest_checkpoint(out).name == "checkpoint-0000004"


def test_sampling_survives_a_prune_during_the_read(run, monkeypatch):
    """The reader resolves checkpoint-2; while it reads, the trainer writes a newer one and
    prunes checkpoint-2: the reader takes the newer one."""
    from xpdiff.models.unet_2d import UNet2DModel

    (run / "latest.json").write_text(json.dumps({"checkpoint": "checkpoint-0000002"}))
    real = UNet2DModel.from_pretrained.__func__
    seen = []

    def racing(cls, directory, **kw):
        seen.append(Path(directory).parent.name)
        if len(seen) == 1:  # the trainer moves on while we read
            (run / "latest.json").write_text(json.dumps({"checkpoint": "checkpoint-0000004"}))
            os.rename(run / "checkpoint-0000002", run / ".trash-checkpoint-0000002-1")
        return real(cls, directory, **kw)

    monkeypatch.setattr(UNet2DModel, "from_pretrained", classmethod(racing))
    model, cfg = load_for_sampling(run)
    assert seen == ["checkpoint-0000002", "checkpoint-0000004"]
    assert cfg.max_steps == 4 and model.config["num_class_embeds"] == 11


def test_pruning_never_shows_a_half_deleted_checkpoint(run, data200, monkeypatch):
    """Checkpoints are renamed away before they are deleted."""
    import shutil

    from xpdiff import training

    names_during_delete = []
    real = shutil.rmtree

    def watching(path, *a, **kw):
        names_during_delete.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(training.shutil, "rmtree", watching)
    t = Trainer(tiny(data200, max_steps=8), run, progress=False)
    t.resume()
    t.train()
    assert names_during_delete and all(not n.startswith("checkpoint-") for n in names_during_delete)


# ---------------------------------------------------------------------------
# 5. files and messages
# ---------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_permissions(tmp_path, data200, umask, mode):
    from xpdiff.digits.images import save_gif, save_grid
    from xpdiff.schedulers import DDIMScheduler

    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        Trainer(tiny(data200, max_steps=2), out, progress=False).train()
        imgs = np.zeros((2, 1, 4, 4), np.float32)
        save_grid(imgs, tmp_path / "g.png", nrow=2)
        save_gif([imgs, imgs], tmp_path / "g.gif", nrow=2)
        io.save_json({"a": 1}, tmp_path / "x.json")
        DDIMScheduler().save_config(tmp_path / "sched")
    finally:
        os.umask(old)
    ckpt = latest_checkpoint(out)
    files = [
        out / "config.json",
        out / "latest.json",
        out / "metrics.jsonl",
        ckpt / "trainer_state.json",
        ckpt / "optimizer.safetensors",
        ckpt / "scheduler" / "scheduler_config.json",
        ckpt / "unet" / io.CONFIG_NAME,
        ckpt / "unet" / io.WEIGHTS_NAME,
        tmp_path / "g.png",
        tmp_path / "g.gif",
        tmp_path / "x.json",
        tmp_path / "sched" / "scheduler_config.json",
    ]
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(mode) for f in files}


def test_classifier_cache_files_get_the_umask_permissions(tmp_path):
    from xpdiff.digits.classifier import DigitClassifier

    old = os.umask(0o022)
    try:
        m = DigitClassifier(14, xp=np)
        io.save_safetensors(dict(m.state_dict()), tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "c.safetensors") == 0o644


def test_read_errors_name_the_file(run, tmp_path):
    from xpdiff.digits.data import load_idx
    from xpdiff.models.unet_2d import UNet2DModel
    from xpdiff.schedulers import DDPMScheduler

    ckpt = latest_checkpoint(run)
    weights = ckpt / "unet" / io.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:50])  # truncated
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file"):
        io.load_safetensors(weights)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        UNet2DModel.from_pretrained(ckpt / "unet")
    sched = ckpt / "scheduler" / "scheduler_config.json"
    sched.write_bytes(b'{"beta_schedule": "\xff\xfe"}')
    with pytest.raises(ValueError, match=rf"{sched}: not valid JSON"):
        DDPMScheduler.from_pretrained(ckpt / "scheduler")
    state = ckpt / "trainer_state.json"
    state.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=rf"{state}: not valid JSON: not UTF-8"):
        io.load_json(state)
    idx = write_idx(tmp_path / "idx", 5)
    img = idx / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-3])
    with pytest.raises(ValueError, match=rf"{img}: truncated IDX data"):
        load_idx(img, idx / "train-labels-idx1-ubyte")
