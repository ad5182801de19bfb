"""Train a class-conditional diffusion UNet on MNIST digits with the library API.

    python examples/train_mnist.py                      # NumPy, 14x14, embedded digits
    python examples/train_mnist.py --backend cupy       # same code on a CUDA GPU
    python examples/train_mnist.py --size 28 --epochs 30 --out runs/mnist28

Interrupt it at any time; run it again with --resume to continue exactly.
"""

import argparse

from xpdiff.digits.training import TrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", default="numpy", choices=("numpy", "cupy"))
    p.add_argument("--size", type=int, default=14, choices=(14, 28))
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default="runs/example")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    config = TrainConfig(backend=args.backend, size=args.size)
    if args.epochs is not None:
        config.epochs = args.epochs
    trainer = Trainer(config, args.out)
    if args.resume and trainer.resume():
        print(f"resuming at step {trainer.step}")
    summary = trainer.train()
    print(f"{summary['steps']} steps in {summary['seconds']:.0f} s; checkpoints in {args.out}")


if __name__ == "__main__":
    main()
