"""Training loop: determinism, checkpoints, exact resume, NaN handling, CLI smoke runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import TINY_RUN

from xpdiff import io
from xpdiff.digits.cli import main
from xpdiff.digits.training import TrainConfig, Trainer
from xpdiff.training import TrainingDiverged, latest_checkpoint


def tiny(**kw) -> TrainConfig:
    base = dict(TINY_RUN, max_steps=6, checkpoint_every=3, warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def weights(trainer: Trainer) -> dict:
    return {k: np.array(v) for k, v in trainer.model.state_dict().items()}


def losses(run) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_same_losses_to_the_bit(tmp_path):
    a = Trainer(tiny(), tmp_path / "a", progress=False)
    a.train()
    b = Trainer(tiny(), tmp_path / "b", progress=False)
    b.train()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    wa, wb = weights(a), weights(b)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    c = Trainer(tiny(seed=1), tmp_path / "c", progress=False)
    c.train()
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


@pytest.mark.parametrize("stop_at", [3, 5])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, stop_at):
    full = Trainer(tiny(), tmp_path / "full", progress=False)
    full.train()
    part = Trainer(tiny(), tmp_path / "part", progress=False)
    part.train(until=stop_at)  # as if killed right after the checkpoint at stop_at
    resumed = Trainer(tiny(), tmp_path / "part", progress=False)
    assert resumed.resume() and resumed.step == stop_at
    resumed.train()
    wf, wr = weights(full), weights(resumed)
    assert all(np.array_equal(wf[k], wr[k]) for k in wf)
    ema_f = {k: np.array(v) for k, v in full.ema.shadow.items()}
    assert all(np.array_equal(ema_f[k], np.array(v)) for k, v in resumed.ema.shadow.items())
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


def test_resume_across_epoch_boundary(tmp_path):
    cfg = dict(max_steps=7, batch_size=1000)  # 4500 digits -> 5 steps per epoch
    full = Trainer(tiny(**cfg), tmp_path / "full", progress=False)
    full.train()
    part = Trainer(tiny(**cfg), tmp_path / "part", progress=False)
    part.train(until=5)
    resumed = Trainer(tiny(**cfg), tmp_path / "part", progress=False)
    resumed.resume()
    assert (resumed.epoch, resumed.batch_in_epoch) == (1, 0)
    resumed.train()
    wf, wr = weights(full), weights(resumed)
    assert all(np.array_equal(wf[k], wr[k]) for k in wf)


def test_checkpoint_layout_loads_in_diffusers_layout(tmp_path):
    t = Trainer(tiny(max_steps=3), tmp_path, progress=False)
    t.train()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "checkpoint-0000003"
    for f in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet_ema/config.json",
        "scheduler/scheduler_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ]:
        assert (ckpt / f).is_file(), f
    assert not list(tmp_path.glob(".tmp-*"))
    cfg = io.load_json(ckpt / "unet" / "config.json")
    assert cfg["_class_name"] == "UNet2DModel" and cfg["num_class_embeds"] == 11
    # the keys of runs written before the loop moved into xpdiff.training: they still resume
    state = io.load_json(ckpt / "trainer_state.json")
    assert sorted(state) == [
        "batch_in_epoch",
        "data_rng_state",
        "data_sha256",
        "ema",
        "epoch",
        "epoch_rng_state",
        "n_train",
        "noise_rng_state",
        "optimizer",
        "step",
        "train_config",
    ]
    assert state["train_config"] == io.load_json(tmp_path / "config.json") == t.config.to_json()


def test_incomplete_checkpoint_is_ignored(tmp_path):
    t = Trainer(tiny(max_steps=3), tmp_path, progress=False)
    t.train()
    # a checkpoint killed while being written: a temp dir, and a dir without trainer_state
    (tmp_path / ".tmp-checkpoint-0000006-1").mkdir()
    (tmp_path / "checkpoint-0000009" / "unet").mkdir(parents=True)
    assert latest_checkpoint(tmp_path).name == "checkpoint-0000003"


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path):
    t = Trainer(tiny(max_steps=6, checkpoint_every=2), tmp_path, progress=False)
    real_step = t.train_step
    calls = {"n": 0}

    def poisoned(xb, yb):
        calls["n"] += 1
        if calls["n"] == 4:  # poison a weight: the next forward gives NaN
            w = t.model.conv_out.weight
            w.data = w.data * float("nan")
        return real_step(xb, yb)

    t.train_step = poisoned
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3.*checkpoint-0000002"):
        t.train()
    assert latest_checkpoint(tmp_path).name == "checkpoint-0000002"
    state = io.load_json(latest_checkpoint(tmp_path) / "trainer_state.json")
    assert state["step"] == 2


def test_resume_refuses_other_settings(tmp_path):
    Trainer(tiny(max_steps=3), tmp_path, progress=False).train()
    other = Trainer(tiny(max_steps=6, lr=0.5), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different settings for \['lr'\]"):
        other.resume()


def test_min_snr_weights(tmp_path):
    tr = Trainer(tiny(snr_gamma=5.0), tmp_path / "g", progress=False)
    abar = np.array(tr.noise_scheduler.alphas_cumprod)
    snr = abar / (1 - abar)
    np.testing.assert_allclose(np.asarray(tr.loss_weights), np.minimum(snr, 5.0) / snr, rtol=1e-6)
    w = np.asarray(tr.loss_weights)
    assert float(w[0]) < 0.01 and float(w[-1]) == 1.0
    tr.train()
    # a gamma above every SNR weights every sample by exactly 1: the plain loss, bit for bit
    Trainer(tiny(), tmp_path / "plain", progress=False).train()
    Trainer(tiny(snr_gamma=float(snr.max()) * 2), tmp_path / "one", progress=False).train()
    assert losses(tmp_path / "one") == losses(tmp_path / "plain")
    assert losses(tmp_path / "g") != losses(tmp_path / "plain")


def test_sampling_scheduler_follows_the_run():
    from xpdiff.schedulers import DDIMScheduler, DDPMScheduler

    cfg = tiny(beta_schedule="linear")
    ddim, ddpm = cfg.sampling_scheduler("ddim"), cfg.sampling_scheduler("ddpm")
    assert isinstance(ddim, DDIMScheduler) and isinstance(ddpm, DDPMScheduler)
    for s in (ddim, ddpm):
        assert s.config["beta_schedule"] == "linear" and s.config["clip_sample"] is False
    assert tiny(clip_sample=True).sampling_scheduler().config["clip_sample"] is True
    with pytest.raises(ValueError, match="expected 'ddim' or 'ddpm', got 'euler'"):
        cfg.sampling_scheduler("euler")


def test_example_config_files_load_and_build(tmp_path):
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "examples").glob("*.json"))
    assert files, "examples/ should hold at least one TrainConfig JSON file"
    for f in files:
        cfg = TrainConfig.from_json(io.load_json(f))
        cfg.validate()
        cfg.max_steps, cfg.batch_size = 1, 2
        tr = Trainer(cfg, tmp_path / f.stem, progress=False)
        x = tr.x_train[:2]
        loss, _ = tr.train_step(x, tr.y_train[:2])
        assert math.isfinite(loss)


def test_config_validation():
    with pytest.raises(
        ValueError, match="expected snr_gamma to be a finite number > 0.0 or None, got 0"
    ):
        tiny(snr_gamma=0).validate()
    with pytest.raises(ValueError, match="expected size to be one of 14, 28, got 20"):
        tiny(size=20).validate()
    with pytest.raises(ValueError, match="unknown keys") as info:
        TrainConfig.from_json({"learning_rate": 1})
    assert "did you mean" not in str(info.value)  # nothing close enough to suggest
    with pytest.raises(ValueError, match=r"\(did you mean 'epoch' -> 'epochs'\?\)"):
        TrainConfig.from_json({"epoch": 3})


def test_cli_train_sample_evaluate_figure(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(tiny(max_steps=4).to_json()))
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert (run / "samples.png").is_file()
    out = capsys.readouterr().out
    assert "done: 4 steps" in out
    # a second train into the same directory without --resume is refused
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 2
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--out",
                str(run),
                "--no-progress",
                "--resume",
                "--steps",
                "5",
                "--no-samples",
            ]
        )
        == 0
    )
    assert "resumed from step 4" in capsys.readouterr().out
    png, gif = tmp_path / "s.png", tmp_path / "s.gif"
    assert (
        main(
            [
                "sample",
                str(run),
                "--out",
                str(png),
                "--gif",
                str(gif),
                "--steps",
                "3",
                "--per-digit",
                "2",
                "--scheduler",
                "ddpm",
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(png).size[1] > Image.open(png).size[0]  # 10 rows of 2 digits
    assert Image.open(gif).n_frames >= 2
    fig = tmp_path / "noise.png"
    capsys.readouterr()
    assert main(["noise-figure", "--out", str(fig), "--size", "14"]) == 0
    assert "(squaredcos_cap_v2 schedule)" in capsys.readouterr().out  # training's schedule
    w, h = Image.open(fig).size
    assert w == 10 * 15 * 6 + 6 and h > 15 * 6 + 6 + 20  # frames, a title and the timesteps


def test_metrics_log_has_rates(tmp_path):
    Trainer(tiny(max_steps=3), tmp_path, progress=False).train()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in rows)


def test_kill_9_loses_only_the_steps_since_the_last_checkpoint(tmp_path):
    """A real SIGKILL mid-run: resuming finishes with the weights of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(tiny(max_steps=40, checkpoint_every=2, log_every=100).to_json()))
    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "xpdiff.digits.cli",
        "train",
        "--config",
        str(cfg),
        "--no-progress",
        "--no-samples",
    ]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd + ["--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ptr = run / "latest.json"
        if ptr.exists() and json.loads(ptr.read_text())["step"] >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = latest_checkpoint(run)
    assert last is not None
    done = int(last.name.split("-")[1])
    assert 6 <= done < 40
    resumed = subprocess.run(
        cmd + ["--out", str(run), "--resume"], env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {done}" in resumed.stdout
    whole = tmp_path / "whole"
    subprocess.run(
        cmd + ["--out", str(whole)], env=env, check=True, capture_output=True, timeout=300
    )
    a = io.load_safetensors(run / "checkpoint-0000040" / "unet" / io.WEIGHTS_NAME)
    b = io.load_safetensors(whole / "checkpoint-0000040" / "unet" / io.WEIGHTS_NAME)
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_a_run_recorded_before_offset_noise_parses_as_trained_without_it():
    record = TrainConfig().to_json()
    del record["offset_noise"]  # a checkpoint written before the setting existed
    parse = Trainer.parse_run_config
    assert parse(None, record, "old")["offset_noise"] == 0.0
    assert parse(None, {**record, "offset_noise": 0.1}, "new")["offset_noise"] == 0.1
    assert TrainConfig.from_json({}, "a config file").offset_noise == 0.1  # recipe default
