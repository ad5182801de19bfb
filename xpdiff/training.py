"""Training a diffusion UNet on an image array: loop, checkpoints, exact resume, metrics.

:class:`Trainer` trains any :class:`~xpdiff.models.UNet2DModel` with a noise scheduler on
host images ``(N, C, H, W)`` (grayscale, RGB or any channel count) in the model's range,
unconditionally, or on integer class labels ``(N,)``, a fraction of which is replaced by a
null class for classifier-free guidance.  It knows nothing of where the images come from.

A run directory holds::

    config.json               the run configuration given to the Trainer
    metrics.jsonl             one JSON line per logged step
    checkpoint-<step>/        unet/ and unet_ema/ (diffusers layout), scheduler/,
                              optimizer.safetensors, trainer_state.json
    latest.json               the name of the newest complete checkpoint
    train.lock                while a trainer runs: its PID (see RunLock)

Checkpoints are written into a temporary directory and renamed into place, and
``latest.json`` is replaced atomically afterwards, so a run killed at any moment
resumes from its last complete checkpoint.  Resuming restores the weights, EMA,
optimizer moments, step, the data order of the current epoch and the noise
generator, so a resumed run reproduces the uninterrupted one bit for bit.

Data parallel (``mpiexec -n N``, see :mod:`xpdiff.distributed`): every process draws the
same permutation of the images, and the global batch of ``batch_size`` splits into
``shards`` contiguous parts (sizes differing by at most one; by default one per process).
Shard k draws its noise, timesteps and label dropout from its own generator, seeded by
``seed + 2`` for k = 0 (the stream of a single-process run) and by ``(seed + 2, k)`` for
k > 0, so the numbers do not depend on which process runs which shard, nor on the launch
order.  Each process scales its shards' gradients by their share of the batch, and one
all-reduce of one flattened buffer sums them.  A single process given ``shards=N`` runs the
same shards one after another (``accumulate``) and sums their gradients in shard order:
for N = 2 that is the same single addition as the all-reduce, so one process reproduces a
two-process run bit for bit, in float32 and float64.  Only rank 0 writes checkpoints,
metrics and the progress bar; every process resumes from the same checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _validation, backend, distributed, io
from .functional.losses import mse_loss
from .models.unet_2d import UNet2DModel
from .optim import EMA, AdamW, clip_grad_norm, warmup_cosine

__all__ = [
    "RunLock",
    "RunLocked",
    "Trainer",
    "TrainingDiverged",
    "TrainingSettings",
    "batches",
    "fingerprint",
    "latest_checkpoint",
]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainingSettings:
    """How a :class:`Trainer` optimises: everything but the model, scheduler and data."""

    batch_size: int = 64
    epochs: int = 10
    max_steps: int | None = None  # overrides epochs when set
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr: float = 2e-5
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.995
    # Min-SNR-gamma loss weighting (Hang et al., 2023): each sample's loss is weighted by
    # min(SNR_t, gamma) / SNR_t (epsilon targets; / (SNR_t + 1) for v, none for x_0), which
    # stops the nearly clean timesteps from dominating the gradient.  None: plain MSE.
    snr_gamma: float | None = None
    label_dropout: float = 0.1  # fraction of labels replaced by the null class (CFG)
    # Offset noise (Guttenberg, 2023, "Diffusion with offset noise"): each training sample's
    # noise gains one standard-normal draw per channel, times offset_noise, on every pixel,
    # so the model learns to remove a uniform error of an image's level instead of keeping
    # it (README: the per-image grey backgrounds).  0: the plain DDPM forward process and
    # the noise stream of earlier runs.  Sampling is unchanged.
    offset_noise: float = 0.0
    seed: int = 0  # data order: seed + 1; noise, timesteps, label dropout: seed + 2
    checkpoint_every: int = 200
    keep_checkpoints: int = 2  # 0: keep all
    log_every: int = 10
    # Data parallel: the global batch splits into `shards` parts, each with its own noise
    # generator (see the module docstring); the processes share them out.  None: one shard
    # per process.  shards=N in one process reproduces `mpiexec -n N` (see `accumulate`).
    shards: int | None = None
    # A process holding several shards: True runs them one after another and sums their
    # gradients in shard order (gradient accumulation: the memory of one shard); False runs
    # them as one forward pass (equal up to float rounding of the batch mean).
    accumulate: bool = True

    def validate(self, where: str = "TrainingSettings") -> None:
        """Check the type and range of every field.

        Raises:
            ArgumentError (a ValueError; a TypeError too for a wrong type), naming the field,
            what was expected and what came.
        """
        v = _validation
        v.check_int(where, "batch_size", self.batch_size, min=1)
        v.check_int(where, "epochs", self.epochs, min=1)
        v.check_int(where, "max_steps", self.max_steps, min=1, none=True)
        v.check_float(where, "lr", self.lr, min=0.0, min_open=True)
        v.check_int(where, "warmup_steps", self.warmup_steps, min=0)
        v.check_float(where, "min_lr", self.min_lr, min=0.0)
        v.check_float(where, "weight_decay", self.weight_decay, min=0.0)
        v.check_float(where, "grad_clip", self.grad_clip, min=0.0, min_open=True, none=True)
        v.check_float(where, "ema_decay", self.ema_decay, min=0.0, max=1.0)
        v.check_float(where, "snr_gamma", self.snr_gamma, min=0.0, min_open=True, none=True)
        v.check_float(where, "label_dropout", self.label_dropout, min=0.0, max=1.0, max_open=True)
        v.check_float(where, "offset_noise", self.offset_noise, min=0.0)
        v.check_int(where, "seed", self.seed, min=0)
        v.check_int(where, "checkpoint_every", self.checkpoint_every, min=1)
        v.check_int(where, "keep_checkpoints", self.keep_checkpoints, min=0)
        v.check_int(where, "log_every", self.log_every, min=1)
        v.check_int(where, "shards", self.shards, min=1, max=self.batch_size, none=True)
        v.check_bool(where, "accumulate", self.accumulate)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# data order
# ---------------------------------------------------------------------------
def batches(
    images: Any,
    labels: Any,
    batch_size: int,
    generator: backend.Generator,
    drop_last: bool = False,
    skip: int = 0,
) -> Iterator[tuple[Any, Any]]:
    """One epoch of shuffled host batches ``(images[b], labels[b])`` (``labels[b]`` is None
    when ``labels`` is).

    The epoch's permutation is drawn from ``generator`` when ``batches`` is *called* (not on
    the first ``next``), so the epoch is fully determined by the generator state before the
    call: save ``generator.get_state()`` just before calling, and to resume mid-epoch restore
    that state and pass ``skip`` = number of batches already done.  Each call is a new epoch.

    Args:
        images: host array (N, ...); labels: host array (N,) or None.
        batch_size: examples per batch; the last batch is smaller unless ``drop_last``.
        generator: a ``backend.Generator`` of any namespace (the permutation is brought to
            the host).
        skip: batches to leave out at the start of the epoch.
    """
    n = images.shape[0]
    if labels is not None and labels.shape[0] != n:
        raise ValueError(f"batches: {n} images but {labels.shape[0]} labels")
    batch_size = _validation.check_int("batches", "batch_size", batch_size, min=1)
    skip = _validation.check_int("batches", "skip", skip, min=0)
    drop_last = _validation.check_bool("batches", "drop_last", drop_last)
    perm = backend.to_numpy(generator.permutation(n))
    stop = n - n % batch_size if drop_last else n
    starts = range(skip * batch_size, stop, batch_size)
    return _batch_iter(images, labels, perm, starts, batch_size, stop)


def _batch_iter(
    images: Any, labels: Any, perm: Any, starts: range, batch_size: int, stop: int
) -> Iterator[tuple[Any, Any]]:
    hx = backend.host_namespace()
    for s in starts:
        idx = perm[s : min(s + batch_size, stop)]
        yb = None if labels is None else hx.take(labels, idx, axis=0)
        yield hx.take(images, idx, axis=0), yb


def fingerprint(*arrays: Any) -> str:
    """A short hash (16 hex digits) of the shapes, dtypes and bytes of host arrays: it tells
    whether the data under one path changed."""
    h = hashlib.sha256()
    for a in arrays:
        host = backend.to_numpy(a, contiguous=True)
        h.update(str((tuple(host.shape), backend.dtype_name(host.dtype))).encode())
        h.update(memoryview(host).cast("B"))
    return h.hexdigest()[:16]


class Trainer:
    """Trains a UNet2DModel on an image array; see the module docstring for the run layout.

    Args:
        model: the UNet to train (its namespace and dtype are the training's).  With labels
            it needs class embeddings (``num_class_embeds``), one of them the null class.
        noise_scheduler: the training (noising) scheduler, e.g. a DDPMScheduler; its
            ``num_train_timesteps`` and ``prediction_type`` set the targets.
        images: host array (N, C, H, W), C the model's ``in_channels``, in the model's range
            (e.g. [-1, 1]).
        labels: host integer array (N,) of class indices, or None for unconditional training.
        settings: the optimisation (default: ``TrainingSettings()``).
        run_dir: the run directory (created when needed).
        run_config: the JSON object recorded as the run's ``config.json`` and in every
            checkpoint; resuming refuses a checkpoint whose record differs, except in
            ``resumable_keys`` (default: ``settings.to_json()``).
        null_class: the label that stands for "no label" (default: the model's last class).
        data_name: how messages name the data (e.g. a folder).
        progress: show a progress bar (rank 0 only).
        world: the processes training together (default: :func:`xpdiff.distributed.world`,
            one process unless launched by ``mpiexec``).  Every process builds its Trainer
            with the same arguments; rank 0's initial weights are broadcast to the others.

    Raises:
        ValueError: images or labels of the wrong shape or range for the model, bad
            settings (the message names them), ``shards`` not a multiple of the number of
            processes, or processes that disagree on the model, settings or data.
    """

    #: run_config keys that may differ between a checkpoint and the run resuming it
    resumable_keys: tuple[str, ...] = (
        "epochs",
        "max_steps",
        "checkpoint_every",
        "log_every",
        "keep_checkpoints",
        "shards",  # the shard count itself must match the checkpoint's (checked on resume)
        "accumulate",
    )
    #: the end of a divergence message: what to do about it
    diverged_advice = (
        "to train with a lower learning rate, start a new run directory with a lower lr, "
        "or a smaller grad_clip"
    )

    def __init__(
        self,
        model: UNet2DModel,
        noise_scheduler: Any,
        images: Any,
        labels: Any = None,
        *,
        settings: TrainingSettings | None = None,
        run_dir: str | os.PathLike,
        run_config: Mapping[str, Any] | None = None,
        null_class: int | None = None,
        data_name: str = "the training data",
        progress: bool = True,
        world: distributed.World | None = None,
    ):
        settings = TrainingSettings() if settings is None else settings
        settings.validate()
        self.settings, self.run_dir, self.progress = settings, Path(run_dir), progress
        self.run_config = dict(settings.to_json() if run_config is None else run_config)
        self.data_name = data_name
        self.model, self.noise_scheduler = model, noise_scheduler
        self.xp, self.dtype = model.xp, model.dtype
        self.null_class = self._check_data(images, labels, null_class)
        self.images, self.labels = images, labels
        arrays = (images,) if labels is None else (images, labels)
        self.data_sha256 = fingerprint(*arrays)
        self._lock = RunLock(self.run_dir)
        self.world = distributed.world() if world is None else world
        self.shards, self.local_shards = self._share_out()
        if self.world.size > 1:
            config = json.dumps(dict(model.config), sort_keys=True, default=str)
            self.world.check_same("model configuration", config)
            self.world.check_same("run configuration", self.run_config)
            self.world.check_same("training data (fingerprint)", self.data_sha256)
            distributed.broadcast_parameters(model.parameters(), self.world)
        self.optimizer = AdamW(model, lr=settings.lr, weight_decay=settings.weight_decay)
        self.ema = EMA(model, settings.ema_decay)
        self.loss_weights = self._loss_weight_table()
        self.data_rng = backend.Generator(settings.seed + 1, backend.namespace_for("numpy"))
        self.noise_rngs = [
            backend.Generator(_noise_seed(settings.seed, k), self.xp) for k in self.local_shards
        ]
        self.noise_rng = self.noise_rngs[0]  # this process's first shard
        n = self.num_images
        self.steps_per_epoch = -(-n // settings.batch_size)
        self.total_steps = settings.max_steps or settings.epochs * self.steps_per_epoch
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.epoch_rng_state = self.data_rng.get_state()

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def _share_out(self) -> tuple[int, range]:
        """The number of shards of each batch, and the shards this process runs."""
        size, shards = self.world.size, self.settings.shards or self.world.size
        if shards % size:
            raise ValueError(
                f"Trainer: expected shards to be a multiple of the {size} processes, got "
                f"{shards}; pass shards={size * max(1, shards // size)} or launch another "
                f"number of processes"
            )
        if shards > self.settings.batch_size:
            raise ValueError(
                f"Trainer: expected at most batch_size={self.settings.batch_size} shards "
                f"(one sample each), got {shards} (for {size} processes); raise batch_size"
            )
        per = shards // size
        return shards, range(self.world.rank * per, (self.world.rank + 1) * per)

    def _check_data(self, images: Any, labels: Any, null_class: int | None) -> int | None:
        """Check the images and labels against the model; returns the null class (None
        without labels)."""
        where = "Trainer"
        shape = tuple(getattr(images, "shape", ()))
        channels = self.model.config["in_channels"]
        if len(shape) != 4 or shape[0] == 0 or shape[1] != channels:
            raise ValueError(
                f"{where}: expected images of shape (N, {channels}, H, W) with N >= 1 for a "
                f"model of {channels} input channels, got {shape}"
            )
        n_classes = self.model.config.get("num_class_embeds")
        if labels is None:
            if n_classes is not None:
                raise ValueError(
                    f"{where}: the model has {n_classes} class embeddings: pass labels, or "
                    f"train a model without num_class_embeds"
                )
            return None
        if n_classes is None:
            raise ValueError(
                f"{where}: labels given but the model has no class embeddings "
                f"(num_class_embeds is None)"
            )
        hx = backend.host_namespace()
        if tuple(getattr(labels, "shape", ())) != (shape[0],) or not hx.isdtype(
            labels.dtype, "integral"
        ):
            raise ValueError(
                f"{where}: expected integer labels of shape ({shape[0]},), got "
                f"{getattr(labels, 'dtype', type(labels).__name__)} "
                f"{tuple(getattr(labels, 'shape', ()))}"
            )
        null_class = n_classes - 1 if null_class is None else null_class
        _validation.check_int(where, "null_class", null_class, min=0, max=n_classes - 1)
        low, high = int(hx.min(labels)), int(hx.max(labels))
        if low < 0 or high >= n_classes:
            raise ValueError(
                f"{where}: labels must lie in [0, {n_classes}) for a model of {n_classes} "
                f"class embeddings, got {low}..{high}"
            )
        return null_class

    def _loss_weight_table(self) -> Any:
        """Per-timestep loss weights (num_train_timesteps,) for Min-SNR-gamma, or None."""
        gamma = self.settings.snr_gamma
        if gamma is None:
            return None
        prediction_type = self.noise_scheduler.config["prediction_type"]
        weights = []
        for abar in self.noise_scheduler.alphas_cumprod:
            snr = abar / (1.0 - abar)
            clipped = min(snr, gamma)
            if prediction_type == "epsilon":
                weights.append(clipped / snr)
            elif prediction_type == "v_prediction":
                weights.append(clipped / (snr + 1.0))
            else:
                weights.append(clipped)
        return backend.asarray(weights, self.xp, dtype=self.dtype)

    # ------------------------------------------------------------------ steps
    def train_step(self, x0_host: Any, labels_host: Any = None) -> tuple[float, float]:
        """One optimisation step on the global host batch ``(B, C, H, W)`` (labels ``(B,)``,
        or None when unconditional); returns ``(loss, grad_norm)``, the loss averaged over
        the whole batch (all processes).  Every process passes the same batch and computes
        its own shards of it.

        Raises:
            TrainingDiverged: the loss or the gradient norm is not finite (on every process).
        """
        n = x0_host.shape[0]
        params = self.model.parameters()
        groups = self._local_groups(n)
        gather = len(groups) > 1 or self.world.size > 1  # gradients go through one buffer
        loss, buffer = 0.0, None
        for group in groups:
            lo, hi = group[0][1], group[-1][2]
            share = (hi - lo) / n  # this part's weight in the batch mean
            ys = None if labels_host is None else labels_host[lo:hi]
            part, grad = self._loss_and_grad(x0_host[lo:hi], ys, group)
            loss += part * share
            self.model.zero_grad()
            self.model.backward(grad if share == 1.0 else grad * share)
            if gather:
                flat = distributed.gradient_buffer(params)
                buffer = flat if buffer is None else buffer + flat
        loss = self.world.allreduce_scalar(loss)  # NaN on any process reaches all of them
        if not math.isfinite(loss):
            self._diverged(f"loss became {loss}")
        if self.world.size > 1:
            if buffer is None:  # no sample of this batch fell on this process: zeros
                self.model.zero_grad()
                buffer = distributed.gradient_buffer(params)
            self.world.allreduce_sum(buffer)
        if buffer is not None:
            distributed.set_gradients(params, buffer)
        cfg = self.settings
        norm = clip_grad_norm(self.model, cfg.grad_clip)
        if not math.isfinite(norm):
            self._diverged(f"gradient norm became {norm}")
        self.optimizer.lr = warmup_cosine(
            self.step, cfg.lr, cfg.warmup_steps, self.total_steps, cfg.min_lr
        )
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        return loss, norm

    def _diverged(self, what: str) -> None:
        last = self.latest_checkpoint()
        raise TrainingDiverged(
            f"{what} at step {self.step}; the last good checkpoint is "
            f"{last if last else '(none yet)'}; {self.diverged_advice}"
        )

    def _local_groups(self, n: int) -> list[list[tuple[int, int, int]]]:
        """This process's shards of a batch of ``n`` as ``(shard, start, stop)``, grouped
        into forward passes: one per shard (``accumulate``) or one for all; empty shards
        (a last batch smaller than the shard count) are left out."""
        base, extra = divmod(n, self.shards)
        bounds = [k * base + min(k, extra) for k in range(self.shards + 1)]
        mine = [(k, bounds[k], bounds[k + 1]) for k in self.local_shards]
        mine = [m for m in mine if m[2] > m[1]]
        if not mine:
            return []
        return [[m] for m in mine] if self.settings.accumulate else [mine]

    def _loss_and_grad(
        self, x0_host: Any, labels_host: Any, group: list[tuple[int, int, int]]
    ) -> tuple[float, Any]:
        """Forward pass over consecutive shards; returns the mean loss over their samples
        and its gradient with respect to the model's output."""
        xp, dt, sched = self.xp, self.dtype, self.noise_scheduler
        x0 = backend.asarray(x0_host, xp, dtype=dt)
        draws = [self._draw(k, hi - lo, tuple(x0.shape[1:]), labels_host) for k, lo, hi in group]
        t, noise, drop = (
            parts[0] if len(parts) == 1 or parts[0] is None else xp.concat(parts)
            for parts in zip(*draws, strict=True)
        )
        labels = None
        if labels_host is not None:
            labels = backend.asarray(labels_host, xp, dtype=xp.int64)
            labels = xp.where(drop, xp.full_like(labels, self.null_class), labels)
        xt = sched.add_noise(x0, noise, t)
        prediction_type = sched.config["prediction_type"]
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = sched.get_velocity(x0, noise, t)
        else:
            target = x0
        pred = self.model(xt, t, labels)
        weight = None if self.loss_weights is None else xp.take(self.loss_weights, t, axis=0)
        loss, grad = mse_loss(pred, target, weight)
        return float(loss), grad

    def _draw(self, shard: int, m: int, sample_shape: tuple, labels: Any) -> tuple:
        """Shard ``shard``'s timesteps (m,), noise (m, *sample_shape) and, with labels, label
        dropout mask (m,), from its own generator, in that order; with ``offset_noise`` > 0
        a last draw of shape (m, C, 1, 1), scaled by it, is added to the noise."""
        rng = self.noise_rngs[shard - self.local_shards.start]
        t = rng.integers(0, self.noise_scheduler.config["num_train_timesteps"], (m,))
        noise = rng.normal((m, *sample_shape), dtype=self.dtype)
        drop = None if labels is None else rng.uniform((m,)) < self.settings.label_dropout
        offset = self.settings.offset_noise
        if offset > 0:
            level = rng.normal(
                (m, sample_shape[0], *(1,) * (len(sample_shape) - 1)), dtype=self.dtype
            )
            noise = noise + offset * level
        return t, noise, drop

    def train(self, until: int | None = None) -> dict:
        """Train until ``total_steps`` (or stop early at step ``until``, as an interruption
        would); checkpoint every ``checkpoint_every`` steps and where it stops.

        Holds the run directory's lock while it runs (released when it returns or raises).
        Under MPI every process calls it; rank 0 alone writes the run directory.

        Returns a summary dict (steps, final loss, seconds).

        Raises:
            RunLocked: another process is training in the same run directory.
            TrainingDiverged: the loss, the gradient norm or the weights became non-finite.
        """
        stop = self.total_steps if until is None else min(until, self.total_steps)
        self.lock()
        try:
            self.world.on_root(self._prepare_run_dir)
            return self._train(stop)
        finally:
            self.unlock()

    def _prepare_run_dir(self) -> None:
        self._remove_leftovers()
        self._truncate_metrics()
        io.save_json(self.run_config, self.run_dir / "config.json")

    def lock(self) -> bool:
        """Take the run directory's lock (see :class:`RunLock`) unless this trainer holds it.

        Returns True when this call took it.  ``train`` takes it for its duration; ``resume``
        takes it and keeps it until ``train`` ends or :meth:`unlock`.  Under MPI rank 0
        holds it for all processes (every process calls this; all raise together).

        Raises:
            RunLocked: another process trains in the same directory (the message names it).
        """
        return self.world.on_root(self._take_lock)

    def _take_lock(self) -> bool:
        if self._lock.held:
            return False
        self._lock.acquire()
        return True

    def unlock(self) -> None:
        """Release the run directory's lock (no-op when not held)."""
        self._lock.release()

    def _train(self, stop: int) -> dict:
        cfg = self.settings
        bar = None
        if self.progress and self.world.is_root:
            from tqdm.auto import tqdm

            height, width = self.images.shape[2:]
            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                unit="step",
                desc=f"train {height}x{width}",
                dynamic_ncols=True,
            )
        t_start = time.perf_counter()
        window: list[float] = []
        seen = 0
        t_log = time.perf_counter()
        last_loss = float("nan")
        try:
            while self.step < stop:
                if self.batch_in_epoch == 0:
                    self.epoch_rng_state = self.data_rng.get_state()
                else:  # resuming mid-epoch: redraw this epoch's order, skip what was done
                    self.data_rng.set_state(self.epoch_rng_state)
                done_before = self.step
                for xb, yb in batches(
                    self.images,
                    self.labels,
                    cfg.batch_size,
                    self.data_rng,
                    skip=self.batch_in_epoch,
                ):
                    loss, norm = self.train_step(xb, yb)
                    self.batch_in_epoch += 1
                    if self.batch_in_epoch == self.steps_per_epoch:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    window.append(loss)
                    seen += xb.shape[0]
                    last_loss = loss
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        rate = seen / max(now - t_log, 1e-9)
                        mean = sum(window) / len(window)
                        self._log(
                            {
                                "step": self.step,
                                "epoch": self.epoch,
                                "loss": mean,
                                "grad_norm": norm,
                                "lr": self.optimizer.lr,
                                "samples_per_s": rate,
                                "elapsed_s": now - t_start,
                            }
                        )
                        if bar is not None:
                            bar.set_postfix(loss=f"{mean:.4f}", samples_s=f"{rate:.0f}")
                        window, seen, t_log = [], 0, now
                    if bar is not None:
                        bar.update(1)
                    if self.step % cfg.checkpoint_every == 0 or self.step == stop:
                        self.save_checkpoint()
                    if self.step >= stop:
                        break
                if self.step == done_before:  # never loop over an epoch without batches
                    raise RuntimeError(
                        f"Trainer: epoch {self.epoch} has no batches left after batch "
                        f"{self.batch_in_epoch} of {self.steps_per_epoch}"
                    )
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t_start
        return {"steps": self.step, "final_loss": last_loss, "seconds": seconds}

    # ------------------------------------------------------------ checkpoints
    def _log(self, record: dict) -> None:
        self.world.on_root(self._append_metrics, record)

    def _append_metrics(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def _check_finite(self) -> None:
        """Refuse to checkpoint non-finite weights, EMA or optimizer moments: the last
        checkpoint must always be one to resume or sample from."""
        xp = self.xp
        groups = {
            "weights": {k: p.data for k, p in self.model.named_parameters()},
            "EMA weights": self.ema.shadow,
            "optimizer moments": {
                **{f"m.{k}": a for k, a in self.optimizer.m.items()},
                **{f"v.{k}": a for k, a in self.optimizer.v.items()},
            },
        }
        for what, arrays in groups.items():
            bad = [k for k, a in arrays.items() if not bool(xp.all(xp.isfinite(a)))]
            if bad:
                last = self.latest_checkpoint()
                raise TrainingDiverged(
                    f"the {what} became NaN or infinite by step {self.step} (first: {bad[0]}); "
                    f"not checkpointed; the last good checkpoint is "
                    f"{last if last else '(none yet)'}; {self.diverged_advice}"
                )

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` atomically and point ``latest.json`` at it.

        Under MPI every process calls it: the noise generator states of all shards are
        gathered, rank 0 writes, and the others wait for it (a barrier).

        Raises:
            TrainingDiverged: a weight, EMA weight or optimizer moment is not finite (nothing
                is written; the previous checkpoint stays the latest).
        """
        self._check_finite()
        per_process = self.world.allgather_object([r.get_state() for r in self.noise_rngs])
        noise_states = [state for states in per_process for state in states]
        return self.world.on_root(self._write_checkpoint, noise_states)

    def _write_checkpoint(self, noise_states: list[dict]) -> Path:
        # one shard: the layout of single-process runs before data parallel training
        shards = {"shards": self.shards, "noise_rng_states": noise_states}
        final = self.run_dir / f"checkpoint-{self.step:07d}"
        tmp = self.run_dir / f".tmp-checkpoint-{self.step:07d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.mkdir(parents=True)
            self.model.save_pretrained(tmp / "unet")
            self.model.save_pretrained(tmp / "unet_ema", state_dict=self.ema.shadow)
            self.noise_scheduler.save_config(tmp / "scheduler")
            opt_arrays, opt_scalars = self.optimizer.state_dict()
            io.save_safetensors(opt_arrays, tmp / "optimizer.safetensors")
            _, ema_scalars = self.ema.state_dict()
            io.save_json(
                {
                    "step": self.step,
                    "epoch": self.epoch,
                    "batch_in_epoch": self.batch_in_epoch,
                    "epoch_rng_state": self.epoch_rng_state,
                    "data_rng_state": self.data_rng.get_state(),
                    "noise_rng_state": noise_states[0],
                    "optimizer": opt_scalars,
                    "ema": ema_scalars,
                    "n_train": self.num_images,
                    "data_sha256": self.data_sha256,
                    "train_config": self.run_config,
                    **(shards if self.shards > 1 else {}),
                },
                tmp / "trainer_state.json",
            )
            if final.exists():
                _remove_dir(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # no leftovers after a full disk
            raise
        io.save_json({"checkpoint": final.name, "step": self.step}, self.run_dir / "latest.json")
        self._prune()
        return final

    def _prune(self) -> None:
        keep = self.settings.keep_checkpoints
        ckpts = sorted(self.run_dir.glob("checkpoint-*"))
        for old in ckpts[:-keep] if keep > 0 else []:
            _remove_dir(old)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Remove temporary checkpoint folders of failed writes (ours: we hold the lock)."""
        for stale in [*self.run_dir.glob(".tmp-checkpoint-*"), *self.run_dir.glob(".trash-*")]:
            shutil.rmtree(stale, ignore_errors=True)

    def parse_run_config(self, record: Any, where: str) -> dict:
        """The run configuration a checkpoint records, checked (override to validate it
        further); ``where`` starts every error message."""
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        return record

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore everything a checkpoint holds; training continues exactly from it.

        Raises:
            ValueError: the checkpoint was trained with other settings or other data, or its
                trainer state, optimizer moments or EMA weights do not fit this run (the
                message names the file).
        """
        path = Path(path)
        state_file = path / "trainer_state.json"
        state = io.load_json(state_file)
        where = f"resume: {state_file}"
        if not isinstance(state, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(state).__name__}")
        missing = sorted(
            {
                "train_config",
                "step",
                "epoch",
                "batch_in_epoch",
                "epoch_rng_state",
                "data_rng_state",
                "noise_rng_state",
                "optimizer",
                "ema",
            }
            - set(state)
        )
        if missing:
            raise ValueError(f"{where}: missing entries {missing}")
        saved = self.parse_run_config(state["train_config"], f"{where} (train_config)")
        mine = self.run_config
        differ = [k for k, v in saved.items() if mine.get(k) != v and k not in self.resumable_keys]
        if differ:
            raise ValueError(
                f"resume: the checkpoint {path} was trained with different settings "
                f"for {differ}; start a new run directory instead"
            )
        self._check_position(state, where)
        for key in ("optimizer", "ema"):
            if not isinstance(state[key], dict):
                raise ValueError(f"{where}: expected {key} to be a JSON object, got {state[key]!r}")
        self.model.load_state_dict(io.load_safetensors(path / "unet" / io.WEIGHTS_NAME))
        ema_file = path / "unet_ema" / io.WEIGHTS_NAME
        try:
            self.ema.load_state_dict(io.load_safetensors(ema_file), state["ema"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"resume: {ema_file}: {_message(err)}") from err
        opt_file = path / "optimizer.safetensors"
        try:
            self.optimizer.load_state_dict(io.load_safetensors(opt_file), state["optimizer"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"resume: {opt_file}: {_message(err)}") from err
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.epoch_rng_state = state["epoch_rng_state"]
        noise_states = self._noise_states(state, where)
        restore = [("epoch_rng_state", None, state["epoch_rng_state"])]
        restore.append(("data_rng_state", self.data_rng, state["data_rng_state"]))
        for k, rng in zip(self.local_shards, self.noise_rngs, strict=True):
            key = "noise_rng_state" if self.shards == 1 else f"noise_rng_states[{k}]"
            restore.append((key, rng, noise_states[k]))
        for key, rng, value in restore:
            probe = rng or backend.Generator(0, backend.namespace_for("numpy"))
            try:
                probe.set_state(value)
            except (TypeError, ValueError, KeyError) as err:
                raise ValueError(
                    f"{where}: {key} is not a generator state ({_message(err)})"
                ) from err

    def _noise_states(self, state: dict, where: str) -> list:
        """The noise generator states of every shard a trainer state records."""
        states = state.get("noise_rng_states", [state["noise_rng_state"]])
        if not isinstance(states, list) or len(states) != self.shards:
            got = len(states) if isinstance(states, list) else states
            raise ValueError(
                f"{where}: the checkpoint split each batch into {got} shards, this run into "
                f"{self.shards} ({self.world.size} processes): resume with shards={got} "
                f"(its noise streams), launching a number of processes that divides it"
            )
        return states

    def _check_position(self, state: dict, where: str) -> None:
        """The step, epoch and batch of a trainer state must be consistent with this data."""
        n, spe, source = self.num_images, self.steps_per_epoch, self.data_name
        if "n_train" in state and state["n_train"] != n:
            raise ValueError(
                f"{where}: the checkpoint was trained on {state['n_train']} images, but "
                f"{source} now gives {n}; the data changed: start a new run directory"
            )
        if "data_sha256" in state and state["data_sha256"] != self.data_sha256:
            raise ValueError(
                f"{where}: the training data ({source}) changed since the checkpoint; "
                f"start a new run directory"
            )
        step = _validation.check_int(where, "step", state["step"], min=0)
        epoch = _validation.check_int(where, "epoch", state["epoch"], min=0)
        batch = _validation.check_int(where, "batch_in_epoch", state["batch_in_epoch"], min=0)
        if batch >= spe:
            raise ValueError(
                f"{where}: batch_in_epoch {batch} is beyond the epoch of {spe} batches ({n} "
                f"images in batches of {self.settings.batch_size}); the checkpoint does not "
                f"belong to this data"
            )
        if step != epoch * spe + batch:
            raise ValueError(
                f"{where}: step {step} does not match epoch {epoch} and batch_in_epoch {batch} "
                f"at {spe} batches per epoch (expected step {epoch * spe + batch})"
            )

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the current step (those of a run that went on past
        the checkpoint we resume from).  A torn last line (a write cut short, e.g. by a full
        disk) is dropped with a warning; a broken line before it is an error."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err})") from err
        lines = [ln for ln in text.splitlines() if ln.strip()]
        keep = []
        for i, ln in enumerate(lines):
            try:
                record = json.loads(ln)
                step = record["step"]
                if isinstance(step, bool) or not isinstance(step, int):
                    raise TypeError
            except (ValueError, TypeError, KeyError) as err:
                if i == len(lines) - 1:
                    warnings.warn(
                        f"{path}: dropping a torn last line ({ln[:40]!r}...); the "
                        f"{len(keep)} complete lines are kept",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    break
                raise ValueError(
                    f"{path}:{i + 1}: expected a JSON object with an integer "
                    f"'step', got {ln[:60]!r}"
                ) from err
            if step <= self.step:
                keep.append(ln)
        if keep == lines and text.endswith("\n"):
            return
        io.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in keep)))

    def resume(self) -> bool:
        """Load the latest checkpoint of the run directory if there is one.

        Takes the run directory's lock first (kept until ``train`` ends or ``unlock``).
        """
        locked_here = self.lock()
        try:
            last = self.world.on_root(self.latest_checkpoint)  # one choice for all processes
            if last is None:
                return False
            self.load_checkpoint(last)
        except BaseException:
            if locked_here:
                self.unlock()
            raise
        return True


_CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")


def _noise_seed(seed: int, shard: int) -> int | list[int]:
    """The seed of shard ``shard``'s noise generator: ``seed + 2`` for shard 0 (the noise of
    a single-process run), the entropy ``[seed + 2, shard]`` (a NumPy SeedSequence) after."""
    return seed + 2 if shard == 0 else [seed + 2, shard]


def _message(err: BaseException) -> str:
    """An exception's message (KeyError's without the quotes ``str`` adds)."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint folder: renamed away first (atomically), so no reader ever finds
    a half-deleted checkpoint under its name."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


class RunLocked(RuntimeError):
    """Another live process is training in the same run directory."""


class RunLock:
    """Exclusive lock of a run directory: the file ``train.lock`` holding the owner's PID.

    The lock is an ``fcntl.flock`` on that file, which the system drops when its owner
    exits however it exits (``kill -9`` included): a lock file left behind by a dead process
    is stale and is simply taken over.  A second trainer finds the lock held and raises
    :class:`RunLocked` naming the PID written in the file.
    """

    NAME = "train.lock"

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> str:
        """The PID written in the lock file ('unknown' if unreadable)."""
        try:
            return self.path.read_text().split()[0]
        except (OSError, IndexError, UnicodeDecodeError):
            return "unknown"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunLocked(
                    f"{self.path.parent} is in use: process {self.owner()} is training there "
                    f"(lock file {self.path}); wait for it to finish, or choose another run "
                    f"directory"
                ) from None
            # a releasing owner may have removed the file between our open and flock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)
        raise RunLocked(f"{self.path}: could not take the lock file")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run directory, or None.

    ``latest.json`` names it; when that file is unreadable or malformed, the newest
    complete ``checkpoint-*`` folder is taken, with a warning.
    """
    run_dir = Path(run_dir)
    pointer = run_dir / "latest.json"
    if pointer.exists():
        try:
            record = io.load_json(pointer)
            name = record.get("checkpoint") if isinstance(record, dict) else None
            if not isinstance(name, str) or not _CHECKPOINT_NAME.fullmatch(name):
                raise ValueError(
                    f'{pointer}: expected {{"checkpoint": "checkpoint-<step>", '
                    f"...}}, got {record!r:.80}"
                )
        except (OSError, ValueError) as err:
            warnings.warn(
                f"ignoring {pointer} ({err}); using the newest complete checkpoint",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            if (run_dir / name / "trainer_state.json").exists():
                return run_dir / name
    ckpts = [p for p in sorted(run_dir.glob("checkpoint-*")) if (p / "trainer_state.json").exists()]
    return ckpts[-1] if ckpts else None
