"""The ``sample`` section: digits drawn with DDIM and classifier-free guidance."""

from __future__ import annotations

import argparse
import time

from .harness import fmt, print_table, unet_config


def section_sample(args: argparse.Namespace, results: dict) -> None:
    from xpdiff import backend
    from xpdiff.digits.training import TrainConfig
    from xpdiff.models import UNet2DModel
    from xpdiff.nn import init
    from xpdiff.pipelines import generate

    tc = TrainConfig()
    init.manual_seed(0)
    model = UNet2DModel(**unet_config("flagship"), xp=backend.namespace_for("numpy"))
    sched = tc.sampling_scheduler("ddim")
    labels = [i % 10 for i in range(args.sample_digits)]
    steps = args.sample_steps
    print(f"[sample] {len(labels)} digits, DDIM {steps} steps, guidance 2 ...", flush=True)
    t0 = time.perf_counter()
    out = generate(
        model,
        sched,
        labels,
        num_inference_steps=steps,
        guidance_scale=2.0,
        null_class=tc.null_class,
        seed=0,
    )
    wall = time.perf_counter() - t0
    assert tuple(out.images.shape)[0] == len(labels)
    per_step = wall / steps
    results["sample"] = {
        "digits": len(labels),
        "steps": steps,
        "guidance": 2.0,
        "wall_s": wall,
        "s_per_step": per_step,
        "projected_50_steps_s": per_step * 50,
    }
    rows = [
        [
            "flagship",
            len(labels),
            steps,
            fmt(wall, 2),
            fmt(per_step * 1e3),
            fmt(len(labels) / wall, 1),
            fmt(per_step * 50, 1) + ("" if steps == 50 else " (projected)"),
        ]
    ]
    print_table(
        "Sampling (xpdiff, NumPy, DDIM, guidance 2: two UNet passes per step)",
        ["config", "digits", "steps", "wall s", "ms/step", "digits/s", "50-step s"],
        rows,
    )
