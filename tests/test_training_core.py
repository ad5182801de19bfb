"""The library's Trainer on a plain image array: unconditional RGB and labelled, with exact
resume after an interruption and after a real SIGKILL; it imports nothing of the digits."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RGB_UNET

from xpdiff import io
from xpdiff.models import UNet2DModel
from xpdiff.nn import init
from xpdiff.schedulers import DDPMScheduler
from xpdiff.training import Trainer, TrainingSettings, latest_checkpoint

SETTINGS = dict(batch_size=8, max_steps=6, checkpoint_every=2, log_every=1, warmup_steps=2)


def rgb_images(n: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 8, 8)).astype(np.float32)


def tiny_unet(num_class_embeds: int | None = None) -> UNet2DModel:
    with init.seeded(0):
        return UNet2DModel(**TINY_RGB_UNET, num_class_embeds=num_class_embeds)


def trainer(run: Path, labels=None, **kw) -> Trainer:
    n_classes = None if labels is None else 4
    return Trainer(
        tiny_unet(n_classes),
        DDPMScheduler(num_train_timesteps=100),
        rgb_images(),
        labels,
        settings=TrainingSettings(**{**SETTINGS, **kw}),
        run_dir=run,
        progress=False,
    )


def weights(t: Trainer) -> dict:
    return {k: np.array(v) for k, v in t.model.state_dict().items()}


def losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Trainer, b: Trainer) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    ea = {k: np.array(v) for k, v in a.ema.shadow.items()}
    assert all(np.array_equal(ea[k], np.array(v)) for k, v in b.ema.shadow.items())
    assert losses(a.run_dir) == losses(b.run_dir)


def test_unconditional_rgb_run_layout(tmp_path):
    t = trainer(tmp_path)
    summary = t.train()
    assert summary["steps"] == 6 and math.isfinite(summary["final_loss"])
    assert t.null_class is None and t.model.config["in_channels"] == 3
    assert io.load_json(tmp_path / "config.json") == t.settings.to_json()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "checkpoint-0000006"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-0000004",
        "checkpoint-0000006",
    ]
    for f in ("unet", "unet_ema", "scheduler", "optimizer.safetensors"):
        assert (ckpt / f).exists(), f
    state = io.load_json(ckpt / "trainer_state.json")
    assert (state["step"], state["n_train"], state["train_config"]) == (6, 20, t.run_config)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "train.lock").exists()


@pytest.mark.parametrize("stop_at", [2, 3])  # at a checkpoint / past one, mid-epoch
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, stop_at):
    full = trainer(tmp_path / "full")
    full.train()
    trainer(tmp_path / "part").train(until=stop_at)  # as if killed right after a checkpoint
    resumed = trainer(tmp_path / "part")
    assert resumed.resume() and resumed.step == stop_at
    resumed.train()
    assert_same_run(full, resumed)


def test_labelled_run_drops_labels_to_the_null_class_and_resumes(tmp_path):
    labels = np.arange(20, dtype=np.int64) % 3
    full = trainer(tmp_path / "full", labels, label_dropout=0.5)
    assert full.null_class == 3  # the model's last class embedding
    full.train()
    trainer(tmp_path / "part", labels, label_dropout=0.5).train(until=3)
    resumed = trainer(tmp_path / "part", labels, label_dropout=0.5)
    assert resumed.resume()
    resumed.train()
    assert_same_run(full, resumed)
    other = trainer(tmp_path / "other", labels[::-1].copy(), label_dropout=0.5)
    other.train()
    assert losses(tmp_path / "other") != losses(tmp_path / "full")


def test_resume_refuses_other_settings_and_other_images(tmp_path):
    trainer(tmp_path).train(until=2)
    with pytest.raises(ValueError, match=r"different settings for \['lr'\]"):
        trainer(tmp_path, lr=0.5).resume()
    longer = trainer(tmp_path, max_steps=8, checkpoint_every=4)
    assert longer.resume()  # the length of a run and its bookkeeping may change
    longer.unlock()
    t = Trainer(
        tiny_unet(),
        DDPMScheduler(num_train_timesteps=100),
        rgb_images(seed=1),
        settings=TrainingSettings(**SETTINGS),
        run_dir=tmp_path,
        data_name="the noise images",
        progress=False,
    )
    with pytest.raises(ValueError, match=r"the training data \(the noise images\) changed"):
        t.resume()


def test_images_and_labels_are_checked_against_the_model(tmp_path):
    sched = DDPMScheduler(num_train_timesteps=100)
    x = rgb_images()
    y = np.zeros(20, dtype=np.int64)
    cases = [
        (tiny_unet(), x[:, :1], None, r"expected images of shape \(N, 3, H, W\)"),
        (tiny_unet(), x[:0], None, r"with N >= 1"),
        (tiny_unet(4), x, None, "the model has 4 class embeddings: pass labels"),
        (tiny_unet(), x, y, "labels given but the model has no class embeddings"),
        (tiny_unet(4), x, y[:5], r"expected integer labels of shape \(20,\)"),
        (tiny_unet(4), x, y.astype(np.float32), r"expected integer labels"),
        (tiny_unet(4), x, y + 4, r"labels must lie in \[0, 4\)"),
    ]
    for model, images, labels, match in cases:
        with pytest.raises(ValueError, match=match):
            Trainer(model, sched, images, labels, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="expected lr to be"):
        Trainer(
            tiny_unet(), sched, x, settings=TrainingSettings(lr=0), run_dir=tmp_path, progress=False
        )


_KILLABLE = """
import sys
sys.path.insert(0, {tests!r})
from test_training_core import trainer
trainer(__import__("pathlib").Path(sys.argv[1]), max_steps=100, log_every=100).train()
"""


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    """A real SIGKILL mid-run; resuming in-process finishes bit for bit as a whole run."""
    run = tmp_path / "killed"
    script = _KILLABLE.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(run)], env=env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        ptr = run / "latest.json"
        if ptr.exists() and json.loads(ptr.read_text())["step"] >= 6:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = latest_checkpoint(run)
    assert done is not None and 6 <= int(done.name.split("-")[1]) < 100
    # checkpoints change no number: the rest of the run writes only its last one
    resumed = trainer(run, max_steps=100, log_every=100, checkpoint_every=100)
    assert resumed.resume()  # the lock the killed process held is stale: taken over
    resumed.train()
    whole = trainer(tmp_path / "whole", max_steps=100, log_every=100, checkpoint_every=100)
    whole.train()
    wr, ww = weights(resumed), weights(whole)
    assert all(np.array_equal(wr[k], ww[k]) for k in ww)


def test_the_core_trainer_loads_nothing_of_the_digits_application():
    code = (
        "import sys, xpdiff.training; "
        "print(sorted(m for m in sys.modules if m.startswith('xpdiff.digits')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_offset_noise_adds_one_level_per_sample_and_channel(tmp_path):
    """offset_noise > 0 shifts each sample's noise by a constant per channel (drawn after
    everything else, so timesteps and label dropout keep their stream); 0 changes nothing."""
    labels = np.arange(20) % 3
    plain = trainer(tmp_path / "a", labels=labels)
    shifted = trainer(tmp_path / "b", labels=labels, offset_noise=0.5)
    t0, n0, d0 = plain._draw(0, 8, (3, 8, 8), labels[:8])
    t1, n1, d1 = shifted._draw(0, 8, (3, 8, 8), labels[:8])
    np.testing.assert_array_equal(np.asarray(t0), np.asarray(t1))
    np.testing.assert_array_equal(np.asarray(d0), np.asarray(d1))
    diff = np.asarray(n1) - np.asarray(n0)
    assert diff.shape == (8, 3, 8, 8)
    level = diff[:, :, :1, :1]
    np.testing.assert_allclose(diff, np.broadcast_to(level, diff.shape), atol=1e-6)
    assert 0.2 < float(np.std(level)) < 1.0  # 0.5 times a standard normal, 24 draws
    with pytest.raises(ValueError, match=r"offset_noise.*>= 0"):
        TrainingSettings(offset_noise=-0.1).validate()
