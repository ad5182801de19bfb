"""Class-conditional sampling with DDPM, DDIM or DPM-Solver++ and classifier-free guidance."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import backend
from .._validation import ArgumentTypeError, check_bool, check_float, check_int, check_int_list
from ..models.unet_2d import UNet2DModel
from ..nn.module import no_grad
from ..schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

__all__ = ["SampleResult", "generate"]


@dataclass
class SampleResult:
    """Generated images in [-1, 1], (B, C, H, W) in the model's namespace, plus
    (optionally) host snapshots of the denoising trajectory for an animation."""

    images: Any
    labels: list[int] | None
    timesteps: list[int]
    trajectory: list[Any] = field(default_factory=list)


def generate(
    model: UNet2DModel,
    scheduler: DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler,
    class_labels: Sequence[int] | None = None,
    *,
    batch_size: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    guidance_interval: tuple[int, int] | None = None,
    eta: float = 0.0,
    seed: int | None = 0,
    size: int | tuple[int, int] | None = None,
    return_trajectory: bool = False,
    max_batch: int = 256,
    progress: bool = False,
) -> SampleResult:
    """Run the reverse process from pure noise.

    Args:
        model: a trained ``UNet2DModel`` (its EMA weights, ideally).
        scheduler: ``DDPMScheduler``, ``DDIMScheduler`` or ``DPMSolverMultistepScheduler``;
            ``set_timesteps`` is called here (which also restarts a multistep solver).
        class_labels: one requested class per image; None for an unconditional model.
        batch_size: number of images when ``class_labels`` is None.
        guidance_scale: classifier-free guidance weight w: the prediction is
            ``eps_null + w * (eps_label - eps_null)``; 1 disables guidance.
        null_class: the class index trained as "no label" (needed when w != 1).
        guidance_interval: ``(t_low, t_high)``: guide only at timesteps t with
            ``t_low <= t <= t_high`` and take the conditional prediction alone elsewhere
            (Kynkaanniemi et al., 2024, "Applying guidance in a limited interval"): guidance
            at the noisiest steps narrows the variety of the samples, and near t = 0 it only
            sharpens what is already decided.  None: guide at every step.  Steps outside
            the interval cost half as much.  Warns (``UserWarning``) when guidance is on
            and the interval holds none of the sampled timesteps (no step is guided).
        eta: DDIM noise weight (ignored by DDPM).
        seed: seed of the initial noise and of the per-step noise.
        size: output (H, W); defaults to the model's ``sample_size``.
        return_trajectory: keep a host copy of x_t after every step.
        max_batch: images per model call (guidance doubles the call's batch).
        progress: show a progress bar of the sampling steps on stderr.

    Returns:
        ``SampleResult`` with images clipped to [-1, 1].

    Raises:
        ValueError: labels out of the model's range, guidance without a null class,
            neither labels nor batch size, an unknown scheduler, any argument of the wrong
            type or out of range (an ``ArgumentError`` naming it), or samples that came out
            NaN or infinite (non-finite weights).
    """
    where = "generate"
    num_inference_steps = check_int(where, "num_inference_steps", num_inference_steps, min=1)
    guidance_scale = check_float(where, "guidance_scale", guidance_scale)
    null_class = check_int(where, "null_class", null_class, min=0, none=True)
    eta = check_float(where, "eta", eta, min=0.0)
    seed = check_int(where, "seed", seed, min=0, none=True)
    batch_size = check_int(where, "batch_size", batch_size, min=1, none=True)
    max_batch = check_int(where, "max_batch", max_batch, min=1)
    return_trajectory = check_bool(where, "return_trajectory", return_trajectory)
    progress = check_bool(where, "progress", progress)
    if size is not None:
        size = (
            check_int(where, "size", size, min=1)
            if not isinstance(size, (tuple, list))
            else tuple(check_int_list(where, "size", size, min=1, length=2))
        )
    labels, B = _labels_and_batch(model, class_labels, batch_size)
    _check_guidance(model, labels, guidance_scale, null_class)
    interval = _check_interval(guidance_interval, scheduler)
    if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler)):
        raise ValueError(
            f"generate: expected a DDPMScheduler or DDIMScheduler (or a "
            f"DPMSolverMultistepScheduler), got "
            f"{type(scheduler).__name__}"
        )
    H, W = _image_size(model, size)

    # 1. initial noise and the timestep grid
    xp = model.xp
    gen = backend.Generator(seed, xp, device=model.device)
    x = gen.normal((B, model.config["in_channels"], H, W), dtype=model.dtype)
    scheduler.set_timesteps(num_inference_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    if guidance_scale != 1.0:
        _warn_if_unguided(interval, timesteps)
    # 2. the (guided) noise prediction, 3. the reverse process
    predict = _predictor(model, labels, guidance_scale, null_class, max_batch, interval)
    trajectory = [backend.to_numpy(x)] if return_trajectory else []
    step_kw = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    with no_grad():
        for t in _steps(timesteps, progress):
            x = scheduler.step(predict(x, t), t, x, generator=gen, **step_kw).prev_sample
            if return_trajectory:
                trajectory.append(backend.to_numpy(x))
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(
            "generate: the samples came out NaN or infinite; the model's weights "
            "are probably not finite (a diverged run?)"
        )
    x = xp.clip(x, -1.0, 1.0)
    return SampleResult(images=x, labels=labels, timesteps=timesteps, trajectory=trajectory)


def _labels_and_batch(
    model: UNet2DModel, class_labels: Any, batch_size: int | None
) -> tuple[list[int] | None, int]:
    """The requested labels (None for an unconditional model) and the number of images."""
    n_classes = model.config["num_class_embeds"]
    if class_labels is None:
        if batch_size is None:
            raise ValueError("generate: expected class_labels or batch_size, got neither")
        if n_classes:
            raise ValueError(
                f"generate: the model is class-conditional ({n_classes} classes); pass class_labels"
            )
        return None, batch_size
    labels = _label_list(class_labels)
    if not n_classes:
        raise ValueError("generate: class_labels given but the model has no class embedding")
    bad = [c for c in labels if not 0 <= c < n_classes]
    if bad:
        raise ValueError(f"generate: expected labels in [0, {n_classes}), got {bad}")
    return labels, len(labels)


def _check_guidance(
    model: UNet2DModel, labels: list[int] | None, guidance_scale: float, null_class: int | None
) -> None:
    if guidance_scale == 1.0:
        return
    if labels is None or null_class is None:
        raise ValueError("generate: guidance_scale != 1 needs class_labels and null_class")
    n_classes = model.config["num_class_embeds"]
    if not 0 <= null_class < n_classes:
        raise ValueError(f"generate: null_class must be in [0, {n_classes}), got {null_class}")


def _check_interval(
    interval: Any, scheduler: Any, where: str = "generate"
) -> tuple[int, int] | None:
    """``guidance_interval`` as a pair of ints ``0 <= t_low <= t_high < T`` (or None)."""
    if interval is None:
        return None
    if not isinstance(interval, (tuple, list)) or len(interval) != 2:
        raise ArgumentTypeError(
            f"{where}: expected guidance_interval to be a pair (t_low, t_high) or None, "
            f"got {interval!r}"
        )
    lo = check_int(where, "guidance_interval[0]", interval[0], min=0)
    T = int(getattr(scheduler, "config", {}).get("num_train_timesteps", 1000))
    hi = check_int(where, "guidance_interval[1]", interval[1], min=lo, max=T - 1)
    return lo, hi


def _warn_if_unguided(interval: tuple[int, int] | None, timesteps: list[int]) -> None:
    """Warn when ``interval`` holds none of ``timesteps``: guidance would apply nowhere."""
    if interval is None:
        return
    lo, hi = interval
    if any(lo <= t <= hi for t in timesteps):
        return
    below = max((t for t in timesteps if t < lo), default=None)
    above = min((t for t in timesteps if t > hi), default=None)
    nearest = " and ".join(
        f"{t} {side}" for t, side in ((below, "below"), (above, "above")) if t is not None
    )
    warnings.warn(
        f"generate: expected guidance_interval ({lo}, {hi}) to hold some of the "
        f"{len(timesteps)} sampled timesteps, got none (the nearest: {nearest}); no step is "
        f"guided: widen the interval, or guide every step (guidance_interval=None; "
        f"--guidance-interval 0 999 on the command line)",
        stacklevel=3,
    )


def _image_size(model: UNet2DModel, size: int | tuple[int, ...] | None) -> tuple[int, int]:
    if size is None:
        size = model.config["sample_size"]
    if size is None:
        raise ValueError("generate: the model has no sample_size; pass size=(H, W)")
    return (size, size) if isinstance(size, int) else tuple(size)


def _predictor(
    model: UNet2DModel,
    labels: list[int] | None,
    guidance_scale: float,
    null_class: int | None,
    max_batch: int,
    interval: tuple[int, int] | None = None,
) -> Callable[[Any, int], Any]:
    """``predict(x_t, t)``: the model's noise prediction in chunks of ``max_batch`` images;
    with guidance w != 1, ``eps_null + w * (eps_label - eps_null)``, both halves from one
    call on the doubled chunk."""
    xp, dev = model.xp, model.device
    lab = null = None
    if labels is not None:
        lab = backend.asarray(labels, xp, dtype=xp.int64, device=dev)
        null = xp.full((len(labels),), null_class or 0, dtype=xp.int64, device=dev)
    lo, hi = interval if interval is not None else (-1, float("inf"))

    def predict(xt: Any, t: int) -> Any:
        guided = guidance_scale != 1.0 and lo <= t <= hi
        B = xt.shape[0]
        outs = []
        for s in range(0, B, max_batch):
            e = min(B, s + max_batch)
            if guided:
                both = model(
                    xp.concat([xt[s:e, ...], xt[s:e, ...]]), t, xp.concat([lab[s:e], null[s:e]])
                )
                cond, uncond = both[: e - s, ...], both[e - s :, ...]
                outs.append(uncond + guidance_scale * (cond - uncond))
            else:
                outs.append(model(xt[s:e, ...], t, lab[s:e] if lab is not None else None))
        return outs[0] if len(outs) == 1 else xp.concat(outs)

    return predict


def _steps(timesteps: list[int], progress: bool) -> Any:
    """The timesteps, behind a progress bar (stderr) when ``progress``."""
    if not progress:
        return timesteps
    from tqdm.auto import tqdm

    return tqdm(timesteps, desc="sampling", unit="step", leave=False, dynamic_ncols=True)


def _label_list(class_labels: Any) -> list[int]:
    """``class_labels`` (a sequence of integers, or a 1-D integer array) as Python ints."""
    if hasattr(class_labels, "shape"):
        host = backend.to_numpy(class_labels)
        if len(host.shape) != 1 or not backend.dtype_name(host.dtype).startswith(("int", "uint")):
            raise ArgumentTypeError(
                f"generate: expected class_labels to be a 1-D integer array, got shape "
                f"{tuple(host.shape)} and dtype {backend.dtype_name(host.dtype)}"
            )
        return [int(host[i]) for i in range(host.shape[0])]
    if isinstance(class_labels, (str, bytes)) or not isinstance(class_labels, Sequence):
        raise ArgumentTypeError(
            f"generate: expected class_labels to be a sequence of integers, "
            f"got {type(class_labels).__name__}"
        )
    return [check_int("generate", f"class_labels[{i}]", c) for i, c in enumerate(class_labels)]
