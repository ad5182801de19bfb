"""Command line: ``xpdiff train | sample | evaluate | export | noise-figure``.

A user error (a bad flag value, a missing or corrupt file, a busy run directory) prints one
line ``error: ...`` on stderr and exits with status 2; ``--debug`` (or ``XPDIFF_DEBUG=1``)
shows the traceback instead.  A diverged training run exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__
from .._validation import check_float, check_int

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from .. import io
    from ..training import TrainingDiverged
    from .training import TrainConfig, Trainer

    if args.config:
        cfg = TrainConfig.from_json(io.load_json(args.config), f"config file {args.config}")
    else:
        cfg = TrainConfig()
    overrides = {
        "data": args.data,
        "size": args.size,
        "epochs": args.epochs,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "backend": args.backend,
        "checkpoint_every": args.checkpoint_every,
        "guidance_scale": args.guidance,
        "sample_steps": args.sample_steps,
        "shards": args.shards,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    cfg.validate("xpdiff train")
    run = Path(args.out)
    trainer = Trainer(cfg, run, progress=not args.no_progress)
    world = trainer.world  # under mpiexec, rank 0 speaks for every process
    say = print if world.is_root else (lambda *a, **k: None)
    trainer.lock()  # a second trainer on the same --out stops here, naming the first
    try:
        if args.resume and trainer.resume():
            if trainer.step >= trainer.total_steps:
                say(
                    f"{run} is already complete: step {trainer.step} of {trainer.total_steps}; "
                    f"pass a larger --epochs or --steps to train further"
                )
                return 0
            say(f"resumed from step {trainer.step} of {trainer.total_steps}")
        elif args.resume:
            say(f"warning: --resume: no checkpoint in {run}; starting a new run", file=sys.stderr)
        elif not args.resume and any(run.glob("checkpoint-*")):
            say(
                f"error: {run} already holds checkpoints; pass --resume to continue, or "
                f"choose another --out",
                file=sys.stderr,
            )
            return 2
        procs = f", {world.size} processes" if world.size > 1 else ""
        if trainer.shards > 1:
            procs += f", each batch in {trainer.shards} shards"
        first_step = trainer.step
        say(
            f"training a {trainer.model.num_parameters():,}-parameter UNet on "
            f"{trainer.y_train.shape[0]} digits at {cfg.size}x{cfg.size} for "
            f"{trainer.total_steps} steps ({cfg.backend}, {cfg.dtype}{procs}); run directory {run}"
        )
        summary = trainer.train()
    except TrainingDiverged as err:
        say(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        trainer.unlock()
    if not world.is_root:
        return 0
    print(
        f"done: {summary['steps'] - first_step} steps in {summary['seconds']:.0f} s "
        f"(step {summary['steps']} of {trainer.total_steps}), "
        f"last batch's loss {summary['final_loss']:.4f}"
    )
    if not args.no_samples:
        out = run / "samples.png"
        # steps and guidance None: the run's own (its saved sample_steps, guidance_scale)
        _write_samples(run, out, None, None, "ddim", None, 0, 10, cfg.backend, not args.no_progress)
        print(f"wrote {out}")
    return 0


def _write_samples(
    ckpt: Path,
    out: Path,
    gif: Path | None,
    steps: int | None,
    scheduler_name: str,
    guidance: float | None,
    seed: int,
    per_digit: int,
    backend_name: str,
    progress: bool = True,
    eta: float | None = None,
    interval: list[int] | None = None,
) -> None:
    from .data import NUM_CLASSES
    from .images import save_gif, save_grid
    from .training import load_for_sampling

    model, cfg = load_for_sampling(ckpt, backend_name)
    _check_run_bounds(cfg, steps, interval)
    labels = [d for d in range(NUM_CLASSES) for _ in range(per_digit)]
    res, used = _generate_digits(
        model,
        cfg,
        labels,
        scheduler_name,
        seed,
        steps=steps,
        guidance=guidance,
        eta=eta,
        interval=interval,
        progress=progress,
        return_trajectory=gif is not None,
    )
    text = _settings_text(scheduler_name, used)
    print(f"sampled {len(labels)} digits with {text} in {used['seconds']:.1f} s")
    rows = [str(d) for d in range(NUM_CLASSES)]
    save_grid(res.images, out, nrow=per_digit, row_labels=rows)
    if gif is not None:
        # about 25 frames: the first (pure noise), every stride-th step and the last
        last = len(res.trajectory) - 1
        keep = sorted({*range(0, last, max(1, last // 24)), last})
        save_gif(
            [res.trajectory[k] for k in keep],
            gif,
            nrow=per_digit,
            row_labels=rows,
            titles=[f"{text}: step {k}/{last}" for k in keep],
        )
        print(f"wrote {gif}")


def _check_run_bounds(cfg: Any, steps: int | None, interval: list[int] | None) -> None:
    """The run's T bounds ``--steps`` and ``--guidance-interval`` T_HIGH (their own checks ran
    at parsing); raises ValueError naming the flag."""
    T = cfg.num_train_timesteps
    if steps is not None:
        check_int("xpdiff", "--steps", steps, min=1, max=T)
    if interval is not None:
        check_int("xpdiff", "--guidance-interval T_HIGH", interval[1], min=interval[0], max=T - 1)


def _generate_digits(
    model: Any,
    cfg: Any,
    labels: list[int],
    scheduler_name: str,
    seed: int,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    eta: float | None = None,
    interval: list[int] | None = None,
    progress: bool = True,
    return_trajectory: bool = False,
) -> tuple[Any, dict]:
    """Sample ``labels`` with the run's sampler; a setting left None is the run's own (its
    ``sample_steps``, ``guidance_scale``, ``eta``, ``guidance_interval``).  Callers check
    ``steps`` and ``interval`` against the run first (:func:`_check_run_bounds`).

    Returns the ``SampleResult`` and the settings used (``steps``, ``guidance``, ``eta``,
    ``guidance_interval``) with the ``seconds`` sampling took.
    """
    from ..pipelines import generate

    used = {
        "steps": _steps_of(cfg, scheduler_name) if steps is None else steps,
        "guidance": cfg.guidance_scale if guidance is None else guidance,
        "eta": cfg.eta if eta is None else eta,
        "guidance_interval": cfg.guidance_interval if interval is None else interval,
    }
    t0 = time.perf_counter()
    res = generate(
        model,
        cfg.sampling_scheduler(scheduler_name),
        labels,
        num_inference_steps=used["steps"],
        guidance_scale=used["guidance"],
        null_class=cfg.null_class,
        seed=seed,
        eta=used["eta"],
        guidance_interval=used["guidance_interval"],
        return_trajectory=return_trajectory,
        # a bar redrawn with carriage returns only garbles a log file: terminals only
        progress=progress and sys.stderr.isatty(),
    )
    used["seconds"] = time.perf_counter() - t0
    return res, used


def _settings_text(scheduler_name: str, used: dict) -> str:
    """How messages name the sampling, e.g. "DDIM 50 steps (eta 1.0), guidance 2.0 at t
    0-600"."""
    sampler = _sampler_text(scheduler_name, used["steps"], used["eta"])
    return f"{sampler}, {_guidance_text(used['guidance'], used['guidance_interval'])}"


def _sampler_text(scheduler_name: str, steps: int, eta: float) -> str:
    """How messages name a sampler, e.g. "DDIM 50 steps (eta 1.0)"."""
    text = f"{scheduler_name.upper()} {steps} steps"
    return f"{text} (eta {eta})" if scheduler_name == "ddim" else text


def _guidance_text(guidance: float, interval: list[int] | None) -> str:
    """How messages name the guidance, e.g. "guidance 2.0 at t 0-600"."""
    if interval is None or guidance == 1.0:
        return f"guidance {guidance}"
    return f"guidance {guidance} at t {interval[0]}-{interval[1]}"


def _steps_of(cfg: Any, scheduler_name: str) -> int:
    """The default number of sampling steps: the run's ``sample_steps`` for DDIM and DDPM,
    20 for DPM-Solver++."""
    return _DPM_STEPS if scheduler_name == "dpm" else cfg.sample_steps


def _sample(args: argparse.Namespace) -> int:
    _write_samples(
        Path(args.checkpoint),
        Path(args.out),
        Path(args.gif) if args.gif else None,
        args.steps,
        args.scheduler,
        args.guidance,
        args.seed,
        args.per_digit,
        args.backend,
        eta=args.eta,
        interval=args.guidance_interval,
    )
    print(f"wrote {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from . import data
    from .classifier import HELDOUT_FRACTION, heldout_digits, load_or_train_classifier
    from .evaluation import evaluate_samples, save_samples
    from .training import load_for_sampling

    model, cfg = load_for_sampling(args.checkpoint, args.backend)
    _check_run_bounds(cfg, args.steps, args.guidance_interval)  # before the classifier's training
    clf = load_or_train_classifier(cfg.size, data_path=cfg.data)
    labels = [d for d in range(data.NUM_CLASSES) for _ in range(args.per_digit)]
    res, used = _generate_digits(
        model,
        cfg,
        labels,
        args.scheduler,
        args.seed,
        steps=args.steps,
        guidance=args.guidance,
        eta=args.eta,
        interval=args.guidance_interval,
    )
    if cfg.test_fraction != HELDOUT_FRACTION:
        print(
            f"warning: the run held out test_fraction={cfg.test_fraction} of the digits, the "
            f"judge {HELDOUT_FRACTION}: some real digits judged against may be training digits "
            f"of the run",
            file=sys.stderr,
        )
    held = heldout_digits(cfg.size, cfg.data)
    report = evaluate_samples(clf, res.images, labels, held.x_test, held.y_test)
    print(
        f"{len(labels)} samples, {_settings_text(args.scheduler, used)}, "
        f"seed {args.seed} ({used['seconds']:.1f} s)"
    )
    print(report.format())
    settings = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "image_size": cfg.size,
        "per_digit": args.per_digit,
        "scheduler": args.scheduler,
        "steps": used["steps"],
        "guidance": used["guidance"],
        "eta": used["eta"],
        "guidance_interval": used["guidance_interval"],
        "seed": args.seed,
        "backend": args.backend,
        "data": cfg.data,
        "xpdiff_version": __version__,
    }
    if args.json:
        from .. import io

        io.save_json({**report.to_json(), "sampling": settings}, args.json)
    if args.save_samples:
        save_samples(args.save_samples, res.images, labels, settings)
        print(f"wrote {args.save_samples}: the {len(labels)} judged samples, labels and settings")
    return 0


def _noise_figure(args: argparse.Namespace) -> int:
    from .. import backend
    from ..schedulers import DDPMScheduler
    from . import data
    from .images import save_grid
    from .training import TrainConfig

    hx = backend.namespace_for("numpy")
    prep = data.prepare(args.data, args.size, 0.1, seed=0)
    found = [i for i in range(prep.y_train.shape[0]) if int(prep.y_train[i]) == args.digit]
    if not found:
        raise ValueError(
            f"xpdiff noise-figure: no image of digit {args.digit} in the data "
            f"{args.data or '(embedded MNIST 5k)'}"
        )
    idx = found[0]
    x0 = prep.x_train[idx : idx + 1]
    T = TrainConfig.num_train_timesteps
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule=args.beta_schedule)
    ts = [0, 50, 100, 200, 300, 400, 500, 600, 800, T - 1]
    gen = backend.Generator(args.seed, hx)
    noise = gen.normal(tuple(x0.shape))
    frames = [sched.add_noise(x0, noise, [t]) for t in ts]
    save_grid(
        hx.clip(hx.concat(frames), -1.0, 1.0),
        args.out,
        nrow=len(ts),
        scale=6,
        title=f"digit {args.digit} noised to step t of {T} ({args.beta_schedule} schedule)",
        col_labels=[f"t={t}" for t in ts],
    )
    print(f"wrote {args.out}: digit {args.digit} at t = {ts} ({args.beta_schedule} schedule)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .training import export_run

    out = export_run(args.run, args.out)
    print(
        f"wrote {out}: a diffusers pipeline (DiffusionPipeline.from_pretrained) with the EMA "
        f"weights and the run's DDIM sampler; see {out / 'README.md'}"
    )
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every flag that has a default (not None, not a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # identity, not ==: a default of 0 (--seed) equals False
        hidden = action.default is None or action.default is False
        if hidden or action.default is argparse.SUPPRESS or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _from_config(field: str) -> str:
    from .training import TrainConfig

    return f"(default: the --config file's, else {getattr(TrainConfig, field)})"


#: Sampling steps of `xpdiff sample` without --steps: DPM-Solver++ is meant for about 20.
_SCHEDULERS = ("ddim", "ddpm", "dpm")
_DPM_STEPS = 20  # DPM-Solver++(2M)'s default number of steps

#: Range of each numeric flag: dest -> (kind, min, max).  Checked once after parsing.
_RANGES = {
    "epochs": ("int", 1, None),
    "steps": ("int", 1, None),
    "batch_size": ("int", 1, None),
    "lr": ("float>0", None, None),
    "seed": ("int", 0, None),
    "checkpoint_every": ("int", 1, None),
    "guidance": ("float", 0.0, None),
    "eta": ("float", 0.0, None),
    "sample_steps": ("int", 1, None),
    "per_digit": ("int", 1, None),
    "digit": ("int", 0, 9),
}


def _check_flags(args: argparse.Namespace) -> None:
    """Range checks of the numeric flags; errors name the flag (``--batch-size``)."""
    where = f"xpdiff {args.command}"
    for dest, (kind, lo, hi) in _RANGES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        if kind == "int":
            check_int(where, flag, value, min=lo, max=hi)
        else:
            check_float(
                where, flag, value, min=0.0 if lo is None else lo, min_open=kind == "float>0"
            )
    if getattr(args, "eta", None) is not None and args.scheduler != "ddim":
        print(f"warning: --eta is DDIM's; the {args.scheduler} sampler ignores it", file=sys.stderr)
    interval = getattr(args, "guidance_interval", None)
    if interval is not None:
        check_int(where, "--guidance-interval T_LOW", interval[0], min=0)
        check_int(where, "--guidance-interval T_HIGH", interval[1], min=interval[0])


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, as every other user error is
    (argparse's own print the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        # a stray argument is reported by the command it followed, naming that command's help
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            commands = getattr(self, "commands", {})  # set on the top-level parser
            parser = commands.get(getattr(ns, "command", None), self)
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def build_parser() -> argparse.ArgumentParser:
    from .training import TrainConfig

    fmt = _HelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error (also: XPDIFF_DEBUG=1)",
    )
    p = _Parser(prog="xpdiff", description=__doc__, formatter_class=fmt, parents=[common])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = sub.choices
    backends = ("numpy", "cupy")

    t = sub.add_parser(
        "train",
        help="train a class-conditional UNet on digits",
        formatter_class=fmt,
        parents=[common],
    )
    t.add_argument(
        "--config",
        help="TrainConfig JSON file; flags override it (default: the TrainConfig defaults)",
    )
    t.add_argument("--out", default="runs/mnist14", help="run directory")
    t.add_argument("--data", help="folder of IDX files (default: the embedded 5,000 MNIST)")
    t.add_argument("--size", type=int, choices=(14, 28), help="image side " + _from_config("size"))
    t.add_argument("--epochs", type=int, help="passes over the data " + _from_config("epochs"))
    t.add_argument(
        "--steps",
        type=int,
        help="total optimisation steps, >= 1; overrides --epochs (default: the "
        "--config file's max_steps, else from --epochs)",
    )
    t.add_argument("--batch-size", type=int, help="images per step " + _from_config("batch_size"))
    t.add_argument("--lr", type=float, help="peak learning rate, > 0 " + _from_config("lr"))
    t.add_argument(
        "--seed",
        type=int,
        help="seed of weights, data order and noise, >= 0 " + _from_config("seed"),
    )
    t.add_argument("--backend", choices=backends, help="array library " + _from_config("backend"))
    t.add_argument(
        "--checkpoint-every",
        type=int,
        help="steps between checkpoints " + _from_config("checkpoint_every"),
    )
    t.add_argument(
        "--guidance",
        type=float,
        help="guidance scale of the final sample grid, >= 0 " + _from_config("guidance_scale"),
    )
    t.add_argument(
        "--sample-steps",
        type=int,
        help="DDIM steps of the final sample grid, saved as the run's sample_steps (the "
        "default of sample, evaluate and export) " + _from_config("sample_steps"),
    )
    t.add_argument(
        "--shards",
        type=int,
        help="parts of each batch with their own noise, >= 1 (default: the --config file's, "
        "else one per process); --shards N in one process reproduces mpiexec -n N",
    )
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    t.add_argument("--no-samples", action="store_true", help="skip the final sample grid")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    # the sampling flags of `sample` and `evaluate`
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument(
        "--scheduler",
        choices=_SCHEDULERS,
        default="ddim",
        help="sampler: DDIM, DDPM or DPM-Solver++(2M)",
    )
    sampling.add_argument(
        "--steps",
        type=int,
        help="sampling steps (default: the run's sample_steps for ddim and ddpm, 20 for dpm)",
    )
    sampling.add_argument(
        "--guidance", type=float, help="guidance scale, >= 0 (default: the run's guidance_scale)"
    )
    sampling.add_argument(
        "--guidance-interval",
        type=int,
        nargs=2,
        metavar=("T_LOW", "T_HIGH"),
        help="guide only at timesteps T_LOW <= t <= T_HIGH; 0 999 guides at every step "
        "(default: the run's guidance_interval)",
    )
    sampling.add_argument(
        "--eta",
        type=float,
        help="DDIM noise weight, >= 0: 0 deterministic, 1 DDPM-like (default: the run's eta)",
    )
    sampling.add_argument("--seed", type=int, default=0, help="seed of the noise, >= 0")
    sampling.add_argument("--backend", choices=backends, default="numpy", help="array library")

    s = sub.add_parser(
        "sample",
        help="draw a grid of digits 0-9 (and a GIF)",
        formatter_class=fmt,
        parents=[common, sampling],
    )
    s.add_argument("checkpoint", help="run directory or checkpoint directory")
    s.add_argument("--out", default="samples.png", help="PNG file to write")
    s.add_argument("--gif", help="also write the denoising process as a GIF (default: no GIF)")
    s.add_argument("--per-digit", type=int, default=10, help="images of each digit")
    s.set_defaults(func=_sample)

    e = sub.add_parser(
        "evaluate",
        help="judge generated digits: accuracy, confident accuracy, background and Frechet "
        "distance against real held-out digits",
        formatter_class=fmt,
        parents=[common, sampling],
    )
    e.add_argument("checkpoint", help="run directory or checkpoint directory")
    e.add_argument("--per-digit", type=int, default=100, help="images of each digit")
    e.add_argument("--json", help="also write the report to this JSON file (default: none)")
    e.add_argument(
        "--save-samples",
        metavar="FILE.npz",
        help="also write the judged samples (float32 in [-1, 1]), their requested digits and "
        "the sampling settings to this .npz file, for benchmarks/judge.py (default: none)",
    )
    e.set_defaults(func=_evaluate)

    x = sub.add_parser(
        "export",
        help="write a run as a folder diffusers loads",
        formatter_class=fmt,
        parents=[common],
    )
    x.add_argument("run", help="run directory (its latest checkpoint) or checkpoint directory")
    x.add_argument(
        "out",
        help="folder to write: model_index.json, unet/ (EMA weights), "
        "scheduler/ (the run's DDIM sampler) and README.md",
    )
    x.set_defaults(func=_export)

    n = sub.add_parser(
        "noise-figure",
        help="one digit at increasing noise levels (PNG)",
        formatter_class=fmt,
        parents=[common],
    )
    n.add_argument("--out", default="noising.png", help="PNG file to write")
    n.add_argument("--digit", type=int, default=5, help="the digit to show, 0-9")
    n.add_argument("--size", type=int, choices=(14, 28), default=28, help="image side")
    n.add_argument("--data", help="folder of IDX files (default: the embedded 5,000 MNIST)")
    n.add_argument(
        "--beta-schedule",
        choices=("linear", "scaled_linear", "squaredcos_cap_v2"),
        default=TrainConfig.beta_schedule,
        help="noise schedule, as in training",
    )
    n.add_argument("--seed", type=int, default=0, help="seed of the noise, >= 0")
    n.set_defaults(func=_noise_figure)
    return p


def _show_warning(
    message: Warning | str,
    category: type,
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _error_text(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 diverged, 2 user error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or argparse's own usage error
        return done.code if isinstance(done.code, int) else 0
    debug = getattr(args, "debug", False) or os.environ.get("XPDIFF_DEBUG", "") not in ("", "0")
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning
        try:
            _check_flags(args)
            return args.func(args)
        except KeyboardInterrupt:
            if debug:
                raise
            print("error: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # every user error: one line, no traceback
            if debug:
                raise
            print(f"error: {_error_text(err)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
