"""Draw the digits 0-9 from a trained run, with DDIM and classifier-free guidance.

python examples/sample_digits.py runs/example --out digits.png [--backend cupy]
"""

import argparse

from xpdiff.digits.images import save_grid
from xpdiff.digits.training import load_for_sampling
from xpdiff.pipelines import generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run")
    p.add_argument("--out", default="digits.png")
    p.add_argument("--backend", default="numpy", choices=("numpy", "cupy"))
    p.add_argument("--guidance", type=float, help="default: the run's guidance_scale")
    args = p.parse_args()

    model, config = load_for_sampling(args.run, args.backend)  # EMA weights
    # DDIM with the run's noise schedule; x_0 is not clipped (config.clip_sample), which
    # spoils guided samples under the cosine schedule
    scheduler = config.sampling_scheduler("ddim")
    labels = [digit for digit in range(10) for _ in range(8)]
    result = generate(
        model,
        scheduler,
        labels,
        num_inference_steps=50,
        guidance_scale=config.guidance_scale if args.guidance is None else args.guidance,
        null_class=config.null_class,
        eta=config.eta,  # the run's DDIM noise weight (1: fresh noise every step)
        guidance_interval=config.guidance_interval,  # guide only at these timesteps
        seed=0,
    )
    save_grid(result.images, args.out, nrow=8)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
