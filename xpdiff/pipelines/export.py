"""Hand a trained run to diffusers users: a folder ``diffusers.DiffusionPipeline.from_pretrained``
loads (``model_index.json``, ``unet/``, ``scheduler/``) plus a README on class-conditional
sampling with classifier-free guidance."""

from __future__ import annotations

import os
from pathlib import Path

from .. import io
from .._validation import check_float
from ..models.unet_2d import UNet2DModel
from ..schedulers import DDIMScheduler
from .sampling import _check_interval

__all__ = ["export_pipeline"]

#: the pipeline class named in model_index.json: diffusers' DDIM pipeline (unet + scheduler)
PIPELINE_CLASS = "DDIMPipeline"


def export_pipeline(
    model: UNet2DModel,
    scheduler: DDIMScheduler,
    save_directory: str | os.PathLike,
    *,
    null_class: int | None = None,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 50,
    eta: float = 0.0,
    guidance_interval: tuple[int, int] | None = None,
) -> Path:
    """Write ``model`` and ``scheduler`` as a diffusers pipeline folder.

    Layout: ``model_index.json`` (``DDIMPipeline``: ``unet`` + ``scheduler``),
    ``unet/`` (``model.save_pretrained``, which warns for sizes diffusers cannot run),
    ``scheduler/`` (``scheduler_config.json``) and ``README.md`` with the class count,
    the null class, the guidance scale and a sampling snippet for diffusers that steps with
    ``eta`` (DDIM's noise weight, Song et al. 2021 eq. 16: 0 deterministic, 1 DDPM-like)
    and guides at the timesteps of ``guidance_interval`` only, as ``generate`` does.

    Returns:
        The folder.

    Raises:
        ValueError: ``save_directory`` is an existing file, a scheduler that is not DDIM,
            eta < 0, or a ``guidance_interval`` that is not ``0 <= t_low <= t_high < T``
            (checked before anything is written).
    """
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(
            f"export_pipeline: expected a DDIMScheduler (the sampling scheduler), "
            f"got {type(scheduler).__name__}"
        )
    eta = check_float("export_pipeline", "eta", eta, min=0.0)
    guidance_interval = _check_interval(guidance_interval, scheduler, "export_pipeline")
    out = Path(save_directory)
    if out.is_file():
        raise ValueError(f"export_pipeline: expected a directory, got the file {out}")
    model.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    io.save_json(
        {
            "_class_name": PIPELINE_CLASS,
            "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        },
        out / "model_index.json",
    )
    text = _readme(
        model, scheduler, null_class, guidance_scale, num_inference_steps, eta, guidance_interval
    )
    io.atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(text))
    return out


def _readme(
    model: UNet2DModel,
    scheduler: DDIMScheduler,
    null_class: int | None,
    guidance: float,
    steps: int,
    eta: float,
    interval: tuple[int, int] | None,
) -> str:
    cfg = model.config
    classes = cfg.num_class_embeds
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    conditional = classes is not None and null_class is not None
    lines = [
        "# Diffusion pipeline exported by xpdiff",
        "",
        f"- `unet/`: UNet2DModel (EMA weights), {cfg.in_channels}x{h}x{w} samples in [-1, 1], "
        f"predicting `{scheduler.config.prediction_type}`.",
        f"- `scheduler/`: DDIMScheduler, the sampler of the run (clip_sample="
        f"{scheduler.config.clip_sample}, {scheduler.config.timestep_spacing} spacing); "
        f"the run samples with eta={eta}.",
    ]
    if conditional:
        lines += [
            f"- Class-conditional: {classes} class embeddings; class {null_class} is the null "
            f"(unconditional) class used for classifier-free guidance.",
            f"- Guidance scale of the run: {guidance}"
            + (f", at timesteps {interval[0]} to {interval[1]} only." if interval else "."),
        ]
    lines += [
        "",
        "## Sampling with diffusers",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")',
        "unet, scheduler = pipe.unet, pipe.scheduler",
        f"scheduler.set_timesteps({steps})",
        "gen = torch.Generator().manual_seed(0)",
    ]
    if conditional:
        lines += [
            f"labels = torch.arange({min(classes - 1, 10)})  # the classes to draw",
            f"null = torch.full_like(labels, {null_class})",
            f"guidance = {guidance}",
            f"x = torch.randn(len(labels), {cfg.in_channels}, {h}, {w}, generator=gen)",
            "with torch.no_grad():",
            "    for t in scheduler.timesteps:",
            "        both = unet(torch.cat([x, x]), t,",
            "                    class_labels=torch.cat([labels, null])).sample",
            "        cond, uncond = both.chunk(2)",
            "        eps = uncond + guidance * (cond - uncond)",
            *(
                [f"        if not {interval[0]} <= t <= {interval[1]}:", "            eps = cond"]
                if interval
                else []
            ),
            f"        x = scheduler.step(eps, t, x, eta={eta}, generator=gen).prev_sample",
        ]
    else:
        lines += [
            f"x = torch.randn(4, {cfg.in_channels}, {h}, {w}, generator=gen)",
            "with torch.no_grad():",
            "    for t in scheduler.timesteps:",
            f"        x = scheduler.step(unet(x, t).sample, t, x, eta={eta}, "
            f"generator=gen).prev_sample",
        ]
    lines += ["images = (x.clamp(-1, 1) + 1) / 2  # in [0, 1]", "```", ""]
    return "\n".join(lines)
