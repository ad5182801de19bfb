"""The command line never shows a raw traceback for a user error (issue 13, section 6).

Every bad invocation prints one line ``error: ...`` on stderr and exits with status 2;
``--debug`` or ``XPDIFF_DEBUG=1`` shows the traceback.  The CLI runs in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys

import pytest
from conftest import TINY_RUN

from xpdiff import __version__
from xpdiff.digits.cli import build_parser, main
from xpdiff.digits.training import TrainConfig, Trainer

TINY = TINY_RUN


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A finished tiny run, config files good and bad, an empty data set, a non-UTF-8 file."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    data.mkdir()
    n = 40
    (data / "train-images-idx3-ubyte").write_bytes(
        struct.pack(">iIII", 2051, n, 28, 28)
        + bytes(range(256)) * (n * 784 // 256)
        + bytes(n * 784 % 256)
    )
    (data / "train-labels-idx1-ubyte").write_bytes(
        struct.pack(">iI", 2049, n) + bytes(i % 10 for i in range(n))
    )
    empty = root / "empty"
    empty.mkdir()
    (empty / "train-images-idx3-ubyte").write_bytes(struct.pack(">iIII", 2051, 0, 28, 28))
    (empty / "train-labels-idx1-ubyte").write_bytes(struct.pack(">iI", 2049, 0))
    cfg = dict(TINY, data=str(data))
    run = root / "run"
    Trainer(TrainConfig(**cfg), run, progress=False).train()
    out = {"run": str(run), "data": str(data), "empty": str(empty), "root": str(root)}
    for name, change in {
        "good": {},
        "clip": {"grad_clip": -1},
        "lr": {"lr": -0.1},
        "epochs": {"epochs": 0},
        "lpb": {"layers_per_block": "1"},
        "dtype": {"dtype": "int32"},
        "clipbool": {"clip_sample": "false"},
        "unknown": {"learning_rate": 1},
        "nanguide": {"guidance_scale": float("nan")},
        "seed": {"seed": -1},
        "steps": {"max_steps": 0},
        "bs": {"batch_size": 2.5},
    }.items():
        path = root / f"{name}.json"
        path.write_text(json.dumps({**cfg, **change}))
        out[name] = str(path)
    (root / "list.json").write_text("[1, 2]")
    (root / "garbage.json").write_text("{not json")
    (root / "latin1.json").write_bytes(b'{"lr": "\xe9"}')
    out.update(
        list=str(root / "list.json"),
        garbage=str(root / "garbage.json"),
        latin1=str(root / "latin1.json"),
    )
    return out


BAD = [
    # train: flags
    ("train --steps 0", r"expected --steps to be an integer >= 1, got 0"),
    ("train --steps -5", r"--steps to be an integer >= 1, got -5"),
    ("train --epochs 0", r"--epochs to be an integer >= 1, got 0"),
    ("train --batch-size 0", r"--batch-size to be an integer >= 1"),
    ("train --lr -1", r"--lr to be a finite number > 0.0, got -1.0"),
    ("train --lr nan", r"--lr to be a finite number > 0.0, got nan"),
    ("train --lr inf", r"--lr to be a finite number > 0.0, got inf"),
    ("train --seed -1", r"--seed to be an integer >= 0, got -1"),
    ("train --guidance nan", r"--guidance to be a finite number >= 0.0, got nan"),
    ("train --checkpoint-every 0", r"--checkpoint-every to be an integer >= 1"),
    ("train --sample-steps 0", r"--sample-steps to be an integer >= 1"),
    ("train --size 20", r"argument --size: invalid choice: 20"),
    ("train --steps abc", r"argument --steps: invalid int value: 'abc'"),
    ("train --backend jax", r"argument --backend: invalid choice: 'jax'"),
    # train: files
    ("train --config {root}/missing.json", r"expected a JSON file at .*missing.json"),
    ("train --config {garbage}", r"garbage.json: not valid JSON"),
    ("train --config {latin1}", r"latin1.json: not valid JSON: not UTF-8"),
    ("train --config {list}", r"config file .*list.json: expected a JSON object"),
    (
        "train --config {clip}",
        r"config file .*: expected grad_clip to be a finite number > 0.0 "
        r"or None, got -1",
    ),
    ("train --config {lr}", r"expected lr to be a finite number > 0.0, got -0.1"),
    ("train --config {epochs}", r"expected epochs to be an integer >= 1, got 0"),
    ("train --config {lpb}", r"expected layers_per_block to be an integer >= 1, got '1'"),
    ("train --config {dtype}", r"expected dtype to be one of 'float32', 'float64', got 'int32'"),
    ("train --config {clipbool}", r"expected clip_sample to be True or False, got 'false'"),
    ("train --config {unknown}", r"unknown keys \['learning_rate'\]"),
    ("train --config {nanguide}", r"expected guidance_scale to be a finite number >= 0.0"),
    ("train --config {seed}", r"expected seed to be an integer >= 0, got -1"),
    ("train --config {steps}", r"expected max_steps to be an integer >= 1 or None, got 0"),
    ("train --config {bs}", r"expected batch_size to be an integer >= 1, got 2.5"),
    ("train --data {root}/nowhere --steps 5", r"no such directory: .*nowhere"),
    ("train --data {empty} --steps 5", r"Trainer: no training images in .*empty"),
    ("train --config {good} --out {run}", r"already holds checkpoints; pass --resume"),
    (
        "train --config {good} --out {run} --resume --lr 0.5",
        r"different settings for \['lr'\]; start a new run directory",
    ),
    # sample
    ("sample {root}/nothing", r"found neither at .*nothing"),
    ("sample {run} --per-digit 0", r"--per-digit to be an integer >= 1, got 0"),
    ("sample {run} --steps 0", r"--steps to be an integer >= 1, got 0"),
    (
        "sample {run} --bogus",
        r"^xpdiff sample: error: unrecognized arguments: --bogus \(see xpdiff sample --help\)$",
    ),
    ("sample {run} --steps 5000", r"--steps to be an integer >= 1 and <= 1000, got 5000"),
    ("sample {run} --guidance nan", r"--guidance to be a finite number >= 0.0, got nan"),
    ("sample {run} --guidance=-inf", r"--guidance to be a finite number >= 0.0, got -inf"),
    ("sample {run} --seed -1", r"--seed to be an integer >= 0, got -1"),
    ("sample {run} --eta -0.5", r"--eta to be a finite number >= 0.0, got -0.5"),
    ("evaluate {run} --eta nan", r"--eta to be a finite number >= 0.0, got nan"),
    (
        "sample {run} --guidance-interval 600 100",
        r"--guidance-interval T_HIGH to be an integer >= 600, got 100",
    ),
    (
        "evaluate {run} --guidance-interval -1 5",
        r"--guidance-interval T_LOW to be an integer >= 0, got -1",
    ),
    ("sample {run} --guidance-interval 5", r"--guidance-interval: expected 2 arguments"),
    (
        "sample {run} --guidance-interval 0 5000",
        r"^error: xpdiff: expected --guidance-interval T_HIGH to be an integer >= 0 and <= 999, "
        r"got 5000",
    ),
    ("sample {run} --scheduler euler", r"argument --scheduler: invalid choice: 'euler'"),
    # evaluate
    ("evaluate {run} --per-digit 0", r"--per-digit to be an integer >= 1"),
    ("evaluate {run} --guidance inf", r"--guidance to be a finite number"),
    ("evaluate {root}/nothing", r"found neither"),
    # noise-figure
    ("noise-figure --digit 11", r"--digit to be an integer >= 0 and <= 9, got 11"),
    ("noise-figure --digit -1", r"--digit to be an integer >= 0 and <= 9, got -1"),
    ("noise-figure --seed -1", r"--seed to be an integer >= 0, got -1"),
    ("noise-figure --beta-schedule cosine", r"argument --beta-schedule: invalid choice"),
    ("noise-figure --data {root}/nowhere", r"no such directory"),
    # the parser itself
    ("", r"the following arguments are required: command"),
    ("fly", r"invalid choice: 'fly'"),
    ("train --stepz 3", r"unrecognized arguments: --stepz 3"),
]


@pytest.mark.parametrize("cmd,match", BAD, ids=[c or "(none)" for c, _ in BAD])
def test_bad_invocation_is_one_error_line(files, capsys, cmd, match):
    import re

    argv = [a.format(**files) for a in cmd.split()]
    if argv and argv[0] == "train":
        argv += ["--no-progress", "--no-samples"]
        if "--out" not in argv:
            argv += ["--out", os.path.join(files["root"], "new-run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith(("error: ", "xpdiff")) and "error: " in lines[-1]
    assert re.search(match, lines[-1]), lines[-1]
    assert len(lines) == 1, lines  # no usage block either


def test_debug_shows_the_traceback(files, capsys, monkeypatch):
    missing = os.path.join(files["root"], "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        main(["--debug", "train", "--config", missing])
    with pytest.raises(FileNotFoundError):
        main(["train", "--config", missing, "--debug"])
    monkeypatch.setenv("XPDIFF_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["train", "--config", missing])
    monkeypatch.setenv("XPDIFF_DEBUG", "0")
    assert main(["train", "--config", missing]) == 2


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"xpdiff {__version__}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_has_help_with_its_default_and_choices():
    parser = build_parser()
    for name, sub in _subparsers(parser).items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help text"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()), (
                    f"{name} {action.option_strings}: the help does not show the default"
                )
            elif action.option_strings and action.default is None and action.nargs is None:
                # flags without a fixed default say where the value comes from
                assert "default" in action.help, f"{name} {action.option_strings}"
    enums = {
        ("train", "--size"),
        ("train", "--backend"),
        ("sample", "--scheduler"),
        ("sample", "--backend"),
        ("evaluate", "--backend"),
        ("noise-figure", "--size"),
        ("noise-figure", "--beta-schedule"),
    }
    subs = _subparsers(parser)
    for name, flag in enums:
        action = next(a for a in subs[name]._actions if flag in a.option_strings)
        assert action.choices, f"{name} {flag} should use choices="


def test_divergence_advice_says_how_to_follow_it(files, tmp_path, capsys):
    cfg = tmp_path / "hot.json"
    cfg.write_text(
        json.dumps(
            {
                **json.loads(open(files["good"]).read()),
                "lr": 1e41,
                "max_steps": 4,
                "checkpoint_every": 1,
            }
        )
    )
    rc = main(
        [
            "train",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "hot"),
            "--no-progress",
            "--no-samples",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "start a new run (a new --out) with a lower --lr" in err


def test_console_script_exit_status_and_single_line():
    """The real process: status 2, one line on stderr, nothing on stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "xpdiff.digits.cli", "train", "--steps", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: xpdiff train: expected --steps to be an integer >= 1, got 0\n")


def _tiny_config(files, tmp_path, max_steps):
    """The good test config, stopped after ``max_steps`` steps, as a file."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({**json.loads(open(files["good"]).read()), "max_steps": max_steps}))
    return cfg


def test_resume_without_a_checkpoint_says_it_starts_anew(files, tmp_path, capsys):
    cfg = _tiny_config(files, tmp_path, max_steps=1)
    run = tmp_path / "fresh"
    argv = ["train", "--config", str(cfg), "--out", str(run), "--resume"]
    assert main([*argv, "--no-progress", "--no-samples"]) == 0
    err = capsys.readouterr().err
    assert f"warning: --resume: no checkpoint in {run}; starting a new run" in err


def test_resume_of_a_complete_run_says_so(files, tmp_path, capsys):
    cfg = _tiny_config(files, tmp_path, max_steps=2)
    run = tmp_path / "done"
    argv = ["train", "--config", str(cfg), "--out", str(run), "--no-progress", "--no-samples"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--resume", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{run} is already complete: step 2 of 1" in out
    assert "last loss" not in out


def test_eta_with_a_sampler_that_ignores_it_is_warned(files, capsys, tmp_path):
    out = str(tmp_path / "g.png")
    argv = ["sample", files["run"], "--scheduler", "dpm", "--steps", "2", "--per-digit", "1"]
    assert main([*argv, "--eta", "0.5", "--out", out]) == 0
    assert "warning: --eta is DDIM's; the dpm sampler ignores it" in capsys.readouterr().err
    assert main([*argv, "--out", out]) == 0
    assert "--eta" not in capsys.readouterr().err


def test_sampling_bar_only_on_a_terminal(files, capsys, monkeypatch, tmp_path):
    argv = ["sample", files["run"], "--steps", "2", "--per-digit", "1"]
    argv += ["--out", str(tmp_path / "g.png")]
    assert main(argv) == 0  # stderr captured: not a terminal, so no carriage-return bar
    assert "sampling" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 0
    assert "sampling" in capsys.readouterr().err


def test_evaluate_checks_the_run_bounds_before_the_classifier(files, capsys, monkeypatch):
    from xpdiff.digits import classifier

    def never(*args, **kwargs):
        raise AssertionError("the classifier was loaded before the flags were checked")

    monkeypatch.setattr(classifier, "load_or_train_classifier", never)
    assert main(["evaluate", files["run"], "--guidance-interval", "0", "100000"]) == 2
    err = capsys.readouterr().err
    assert "--guidance-interval T_HIGH to be an integer >= 0 and <= " in err, err


def test_sample_steps_flag_is_saved_with_the_run(files, tmp_path, capsys):
    cfg = _tiny_config(files, tmp_path, max_steps=1)
    run = tmp_path / "steps"
    argv = ["train", "--config", str(cfg), "--out", str(run), "--no-progress"]
    assert main([*argv, "--sample-steps", "3"]) == 0
    assert "with DDIM 3 steps" in capsys.readouterr().out  # the final grid
    assert json.loads((run / "config.json").read_text())["sample_steps"] == 3
    # sample (and evaluate, export) default to the run's saved sample_steps
    grid = str(tmp_path / "g.png")
    assert main(["sample", str(run), "--per-digit", "1", "--out", grid]) == 0
    assert "with DDIM 3 steps" in capsys.readouterr().out
    # --resume treats it as --guidance: another value is refused, the same one continues
    more = [*argv, "--resume", "--steps", "2", "--no-samples"]
    assert main([*more, "--sample-steps", "4"]) == 2
    assert "different settings for ['sample_steps']" in capsys.readouterr().err
    assert main([*more, "--sample-steps", "3"]) == 0
    assert "resumed from step 1 of 2" in capsys.readouterr().out
