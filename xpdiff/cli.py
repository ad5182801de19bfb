"""Command line: ``xpdiff train | sample | evaluate | noise-figure``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from . import io
    from .training import TrainConfig, Trainer, TrainingDiverged

    cfg = TrainConfig.from_json(io.load_json(args.config)) if args.config else TrainConfig()
    overrides = {
        "data": args.data, "size": args.size, "epochs": args.epochs, "max_steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "backend": args.backend, "checkpoint_every": args.checkpoint_every,
        "guidance_scale": args.guidance,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    run = Path(args.out)
    trainer = Trainer(cfg, run, progress=not args.no_progress)
    if args.resume and trainer.resume():
        print(f"resumed from step {trainer.step} of {trainer.total_steps}")
    elif not args.resume and any(run.glob("checkpoint-*")):
        print(f"error: {run} already holds checkpoints; pass --resume to continue, or choose "
              f"another --out", file=sys.stderr)
        return 2
    print(f"training a {trainer.model.num_parameters():,}-parameter UNet on "
          f"{trainer.y_train.shape[0]} digits at {cfg.size}x{cfg.size} for {trainer.total_steps} "
          f"steps ({cfg.backend}, {cfg.dtype}); run directory {run}")
    try:
        summary = trainer.train()
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"done: {summary['steps']} steps in {summary['seconds']:.0f} s, "
          f"last loss {summary['final_loss']:.4f}")
    if not args.no_samples:
        out = run / "samples.png"
        _write_samples(run, out, None, args.sample_steps or cfg.sample_steps, "ddim",
                       None, 0, 10, cfg.backend)
        print(f"wrote {out}")
    return 0


def _write_samples(ckpt: Path, out: Path, gif: Path | None, steps: int, scheduler_name: str,
                   guidance: float | None, seed: int, per_digit: int, backend_name: str) -> None:
    from .images import save_gif, save_grid
    from .pipelines import generate
    from .training import load_for_sampling

    model, cfg = load_for_sampling(ckpt, backend_name)
    guidance = cfg.guidance_scale if guidance is None else guidance
    sched = cfg.sampling_scheduler(scheduler_name)
    labels = [d for d in range(10) for _ in range(per_digit)]
    t0 = time.perf_counter()
    res = generate(model, sched, labels, num_inference_steps=steps, guidance_scale=guidance,
                   null_class=cfg.null_class, seed=seed, return_trajectory=gif is not None)
    print(f"sampled {len(labels)} digits with {scheduler_name.upper()} {steps} steps, "
          f"guidance {guidance} in {time.perf_counter() - t0:.1f} s")
    save_grid(res.images, out, nrow=per_digit)
    if gif is not None:
        stride = max(1, len(res.trajectory) // 40)
        frames = res.trajectory[::stride] + [res.trajectory[-1]]
        save_gif(frames, gif, nrow=per_digit)
        print(f"wrote {gif}")


def _sample(args: argparse.Namespace) -> int:
    _write_samples(Path(args.checkpoint), Path(args.out), Path(args.gif) if args.gif else None,
                   args.steps, args.scheduler, args.guidance, args.seed, args.per_digit,
                   args.backend)
    print(f"wrote {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from . import data
    from .evaluation import evaluate_samples, load_or_train_classifier
    from .pipelines import generate
    from .training import load_for_sampling

    model, cfg = load_for_sampling(args.checkpoint, args.backend)
    guidance = cfg.guidance_scale if args.guidance is None else args.guidance
    clf = load_or_train_classifier(cfg.size, data_path=cfg.data)
    sched = cfg.sampling_scheduler("ddim")
    labels = [d for d in range(10) for _ in range(args.per_digit)]
    t0 = time.perf_counter()
    res = generate(model, sched, labels, num_inference_steps=args.steps,
                   guidance_scale=guidance, null_class=cfg.null_class, seed=args.seed)
    took = time.perf_counter() - t0
    held = data.prepare(cfg.data, cfg.size, cfg.test_fraction, seed=0)
    report = evaluate_samples(clf, res.images, labels, held.x_test, held.y_test)
    print(f"{len(labels)} samples, DDIM {args.steps} steps, guidance {guidance}, "
          f"seed {args.seed} ({took:.1f} s)")
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0


def _noise_figure(args: argparse.Namespace) -> int:
    from . import backend, data
    from .images import save_grid
    from .schedulers import DDPMScheduler

    hx = backend.namespace_for("numpy")
    prep = data.prepare(args.data, args.size, 0.1, seed=0)
    idx = [i for i in range(prep.y_train.shape[0]) if int(prep.y_train[i]) == args.digit][0]
    x0 = prep.x_train[idx : idx + 1]
    sched = DDPMScheduler(beta_schedule=args.beta_schedule)
    ts = [0, 50, 100, 200, 300, 400, 500, 600, 800, 999]
    gen = backend.Generator(args.seed, hx)
    noise = gen.normal(tuple(x0.shape))
    frames = [sched.add_noise(x0, noise, [t]) for t in ts]
    save_grid(hx.clip(hx.concat(frames), -1.0, 1.0), args.out, nrow=len(ts), scale=6)
    print(f"wrote {args.out}: digit {args.digit} at t = {ts}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xpdiff", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a class-conditional UNet on digits")
    t.add_argument("--config", help="TrainConfig JSON file (flags override it)")
    t.add_argument("--out", default="runs/mnist14", help="run directory (default runs/mnist14)")
    t.add_argument("--data", help="folder of IDX files (default: the embedded 5,000 MNIST)")
    t.add_argument("--size", type=int, choices=(14, 28))
    t.add_argument("--epochs", type=int)
    t.add_argument("--steps", type=int, help="total optimisation steps (overrides --epochs)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--backend", choices=("numpy", "cupy"))
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--guidance", type=float, help="guidance scale of the final sample grid")
    t.add_argument("--sample-steps", type=int)
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    t.add_argument("--no-samples", action="store_true", help="skip the final sample grid")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="draw a grid of digits 0-9 (and a GIF)")
    s.add_argument("checkpoint", help="run directory or checkpoint directory")
    s.add_argument("--out", default="samples.png")
    s.add_argument("--gif", help="also write the denoising process as a GIF")
    s.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance", type=float, help="default: the run's guidance_scale")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--per-digit", type=int, default=10)
    s.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    s.set_defaults(func=_sample)

    e = sub.add_parser("evaluate", help="classify generated digits; accuracy and Frechet distance")
    e.add_argument("checkpoint")
    e.add_argument("--per-digit", type=int, default=100)
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--guidance", type=float, help="default: the run's guidance_scale")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    e.add_argument("--json", help="also write the report as JSON")
    e.set_defaults(func=_evaluate)

    n = sub.add_parser("noise-figure", help="one digit at increasing noise levels (PNG)")
    n.add_argument("--out", default="noising.png")
    n.add_argument("--digit", type=int, default=5)
    n.add_argument("--size", type=int, choices=(14, 28), default=28)
    n.add_argument("--data")
    n.add_argument("--beta-schedule", default="linear")
    n.add_argument("--seed", type=int, default=0)
    n.set_defaults(func=_noise_figure)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
