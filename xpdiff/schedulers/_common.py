"""Pieces shared by the DDPM, DDIM and DPM-Solver++ schedulers (the schedule tables and
timestep grids they share are in ``tables``).

* configuration through ``xpdiff.configuration.ConfigMixin`` (``config``,
  ``from_config``, ``save_config``, ``from_pretrained``), in diffusers' format;
* argument checks and the per-sample gather used by ``add_noise`` and
  ``get_velocity``.

Arrays never leave the namespace of the sample they come with: tables are
moved onto the sample's namespace, device and dtype, and per-step scalars are
plain Python floats, which the array API applies in the array's dtype.
"""

from __future__ import annotations

import math
import operator
from typing import Any, ClassVar, NamedTuple

from .. import backend
from .._validation import (
    ArgumentError,
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_float,
    check_int,
)
from ..configuration import ANY_VALUE, ConfigMixin
from .tables import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    beta_table,
    cumprod_table,
    f32,
    spaced_timesteps,
)

__all__ = ["CONFIG_NAME", "BaseScheduler", "SchedulerOutput", "f32"]

CONFIG_NAME = "scheduler_config.json"

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Keys diffusers writes for features xpdiff does not implement.  A config that
# carries them is accepted while they hold a value that leaves the feature off
# (``_ANY``: the key only matters when another feature is on).
_ANY = ANY_VALUE
_DIFFUSERS_INACTIVE = {
    "trained_betas": None,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "dynamic_thresholding_ratio": _ANY,
    "sample_max_value": _ANY,
}


class SchedulerOutput(NamedTuple):
    """Result of ``step``; unpacks as ``prev_sample, pred_original_sample``.

    Attributes:
        prev_sample: x_{t_prev}, shape of the sample (B, C, H, W).
        pred_original_sample: predicted x_0 after clipping, same shape.
    """

    prev_sample: Any
    pred_original_sample: Any


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------
def _trained_betas(name: str, values: Any, n: int) -> list[float]:
    """``trained_betas`` (a sequence of ``n`` numbers) as float32-rounded Python floats."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ArgumentTypeError(
            f"{name}: expected trained_betas to be None or a sequence of numbers, got {values!r}"
        )
    betas = [f32(check_float(name, "trained_betas[i]", b)) for b in values]
    if len(betas) != n:
        raise ArgumentError(
            f"{name}: expected {n} trained_betas (num_train_timesteps), got {len(betas)}"
        )
    return betas


def _index(value: Any) -> int:
    """An integer-like ``value`` (int, NumPy integer, 0-d or one-element integer array of
    any namespace) as a Python int; TypeError for bool, floats and everything else."""
    if isinstance(value, (bool, float)):
        raise TypeError
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        if not backend.dtype_name(value.dtype).startswith(("int", "uint")):
            raise TypeError
        if tuple(value.shape) not in ((), (1,)):
            raise TypeError
        value = backend.to_numpy(value).reshape(())[()]
    return operator.index(value)


def _host_ints(values: list[int]) -> Any:
    """``values`` as a host (NumPy) int64 array: the type of ``scheduler.timesteps``."""
    hx = backend.namespace_for("numpy")
    return backend.asarray(values, hx, dtype=hx.int64)


class BaseScheduler(ConfigMixin):
    """Schedule tables, config handling and checks common to the schedulers.

    Subclasses decorate their ``__init__`` with ``register_to_config`` (its argument
    names are the config keys), call ``_setup()`` and implement ``set_timesteps``
    and ``step``.
    """

    config_name: ClassVar[str] = CONFIG_NAME
    order = 1
    init_noise_sigma = 1.0
    _choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "beta_schedule": BETA_SCHEDULES,
        "prediction_type": PREDICTION_TYPES,
        "timestep_spacing": TIMESTEP_SPACINGS,
    }
    _bools: ClassVar[tuple[str, ...]] = ("clip_sample",)
    _accepted_off: ClassVar[dict[str, Any]] = _DIFFUSERS_INACTIVE

    # -- construction -------------------------------------------------------
    def _setup(self) -> None:
        """Check the recorded config, store its plain form and build the tables.

        Raises:
            ArgumentError: a value out of range or not among the choices (naming it),
                a beta outside (0, 1), or a schedule whose float32 abar_t reaches 0
                (zero terminal SNR: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
                divides by zero) or stays 1 at t = 0.
            ArgumentTypeError: a value of the wrong type.
        """
        name = type(self).__name__
        config = self.config.to_dict()
        for key, allowed in self._choices.items():
            check_choice(name, key, config[key], allowed)
        for key in self._bools:
            check_bool(name, key, config[key])
        n = config["num_train_timesteps"] = check_int(
            name, "num_train_timesteps", config["num_train_timesteps"], min=1
        )
        config["steps_offset"] = check_int(name, "steps_offset", config["steps_offset"], min=0)
        for key in ("beta_start", "beta_end"):
            config[key] = check_float(name, key, config[key])
        if "clip_sample_range" in config:  # only schedulers that clip have it
            config["clip_sample_range"] = check_float(
                name, "clip_sample_range", config["clip_sample_range"], min=0.0, min_open=True
            )
        if config.get("trained_betas") is not None:
            betas = _trained_betas(name, config["trained_betas"], n)
            config["trained_betas"] = betas
            source = "trained_betas"
        else:
            betas = beta_table(config["beta_schedule"], config["beta_start"], config["beta_end"], n)
            source = (
                f"beta_schedule={config['beta_schedule']!r}, beta_start={config['beta_start']!r}, "
                f"beta_end={config['beta_end']!r}"
            )
        bad = [b for b in betas if not 0.0 < b < 1.0]
        if bad:
            raise ArgumentError(
                f"{name}: expected every beta in (0, 1), got {bad[0]!r} from {source}"
            )
        abar = cumprod_table(betas)
        zero = next((t for t, a in enumerate(abar) if a == 0.0), None)
        if zero is not None:
            raise ArgumentError(
                f"{name}: the schedule {source}, num_train_timesteps={n} reaches zero terminal "
                f"SNR: float32 alphas_cumprod rounds to 0 from t = {zero} on, where x_0 cannot "
                f"be predicted (rescale_betas_zero_snr is not supported); use a smaller "
                f"beta_end or fewer timesteps"
            )
        if abar[0] == 1.0:
            raise ArgumentError(
                f"{name}: the schedule {source} has beta_0 = {betas[0]!r}, too small for "
                f"float32 (1 - beta_0 rounds to 1, so 1 - alphas_cumprod[0] is 0)"
            )
        self._update_config(**config)
        self._betas = betas
        self._alphas_cumprod = abar
        self._device_tables: dict[tuple[str, str, str], Any] = {}
        self.num_inference_steps: int | None = None
        self._steps: list[int] = list(reversed(range(n)))
        self._prev: dict[int, int] = {}

    # -- read-only views ----------------------------------------------------
    @property
    def timesteps(self) -> Any:
        """The descending timesteps to sample with: a host (NumPy) int64 array of
        length ``num_inference_steps`` (every training step before ``set_timesteps``)."""
        return _host_ints(self._steps)

    @property
    def betas(self) -> tuple[float, ...]:
        """beta_t for t = 0 .. num_train_timesteps - 1 (float32 values as Python floats)."""
        return tuple(self._betas)

    @property
    def alphas_cumprod(self) -> tuple[float, ...]:
        """abar_t = prod_{s<=t} (1 - beta_s), length num_train_timesteps."""
        return tuple(self._alphas_cumprod)

    def __len__(self) -> int:
        return self.config["num_train_timesteps"]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"

    def scale_model_input(self, sample: Any, timestep: int | None = None) -> Any:
        """The model input for ``sample`` at ``timestep``: unchanged for DDPM/DDIM."""
        return sample

    # -- timesteps ------------------------------------------------------------
    def _check_num_inference_steps(self, num_inference_steps: int) -> int:
        n_train = self._config["num_train_timesteps"]
        return check_int(
            f"{type(self).__name__}.set_timesteps",
            "num_inference_steps",
            num_inference_steps,
            min=1,
            max=n_train,
        )

    def _spaced_timesteps(self, num_inference_steps: int) -> list[int]:
        cfg = self._config
        n_train = cfg["num_train_timesteps"]
        steps = spaced_timesteps(
            cfg["timestep_spacing"], n_train, num_inference_steps, cfg["steps_offset"]
        )
        if steps and not 0 <= steps[0] < n_train:
            raise ArgumentError(
                f"{type(self).__name__}.set_timesteps: steps_offset={cfg['steps_offset']} with "
                f"{num_inference_steps} steps gives timestep {steps[0]}, outside "
                f"[0, num_train_timesteps={n_train})"
            )
        return steps

    def _set_grid(self, steps: list[int]) -> None:
        """Make ``steps`` (descending) the chain: each step lands on the next entry,
        the last one on -1 (abar = 1, or the scheduler's final value)."""
        self._steps = list(steps)
        self.num_inference_steps = len(steps)
        self._prev = dict(zip(steps, [*steps[1:], -1], strict=True))

    def _check_timestep(self, timestep: Any, where: str) -> int:
        """``timestep`` (integer-like) as a Python int in [0, num_train_timesteps)."""
        n_train = self._config["num_train_timesteps"]
        try:
            t = _index(timestep)
        except TypeError:
            raise ArgumentTypeError(
                f"{type(self).__name__}.{where}: expected an integer timestep (an int, a NumPy "
                f"integer or a 0-d integer array), got {timestep!r}"
            ) from None
        if not 0 <= t < n_train:
            raise ArgumentError(
                f"{type(self).__name__}.{where}: timestep {t} is out of range "
                f"[0, num_train_timesteps={n_train})"
            )
        return t

    # -- array helpers ---------------------------------------------------------
    def _check_pair(self, a: Any, b: Any, names: tuple[str, str], where: str) -> Any:
        """Namespace shared by two same-shape floating arrays ``a`` and ``b``."""
        cls = type(self).__name__
        xp = backend.get_namespace(a, b, where=f"{cls}.{where}")
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(
                f"{cls}.{where}: expected {names[1]} of shape {tuple(a.shape)} like {names[0]}, "
                f"got {tuple(b.shape)}"
            )
        if not xp.isdtype(a.dtype, "real floating"):
            raise ValueError(f"{cls}.{where}: expected a floating {names[0]}, got dtype {a.dtype}")
        if a.ndim < 1:
            raise ValueError(f"{cls}.{where}: expected {names[0]} of shape (B, ...), got shape ()")
        return xp

    def _batch_timesteps(self, timesteps: Any, sample: Any, xp: Any, where: str) -> Any:
        """Timesteps for each of the B samples as an int64 array of shape (B,) on
        the sample's device, after range and shape checks.

        Accepts anything integer-like: a Python int or NumPy integer, a list or tuple
        of those, or an integer array of any namespace of shape (), (1,) or (B,)."""
        cls = type(self).__name__
        n_train = self._config["num_train_timesteps"]
        batch = sample.shape[0]
        dev = backend.device(sample)
        listed = isinstance(timesteps, (list, tuple))
        if listed or not hasattr(timesteps, "shape") or tuple(timesteps.shape) == ():
            try:
                values = [_index(v) for v in timesteps] if listed else [_index(timesteps)]
            except TypeError:
                raise ArgumentTypeError(
                    f"{cls}.{where}: expected integer timesteps (an int, a list of ints or an "
                    f"integer array), got {timesteps!r}"
                ) from None
            if len(values) == 1:
                values = values * batch
            if len(values) != batch:
                raise ArgumentError(
                    f"{cls}.{where}: expected {batch} timesteps (one per sample), got {len(values)}"
                )
            lo, hi = (min(values), max(values)) if values else (0, 0)
            idx = backend.asarray(values, xp, dtype=xp.int64, device=dev)
        else:
            if not hasattr(timesteps, "dtype"):
                raise ArgumentTypeError(
                    f"{cls}.{where}: expected integer timesteps (an int, a list of ints or an "
                    f"integer array), got {timesteps!r}"
                )
            if backend.get_namespace(timesteps) is not xp or backend.device(timesteps) != dev:
                timesteps = backend.asarray(timesteps, xp, device=dev)
            if not xp.isdtype(timesteps.dtype, "integral"):
                raise ArgumentTypeError(
                    f"{cls}.{where}: expected an integer timesteps array, "
                    f"got dtype {timesteps.dtype}"
                )
            if timesteps.ndim > 1 or timesteps.shape[0] not in (1, batch):
                raise ArgumentError(
                    f"{cls}.{where}: expected timesteps of shape ({batch},), "
                    f"got {tuple(timesteps.shape)}"
                )
            idx = xp.broadcast_to(xp.reshape(xp.astype(timesteps, xp.int64), (-1,)), (batch,))
            lo, hi = (int(xp.min(idx)), int(xp.max(idx))) if batch else (0, 0)
        if lo < 0 or hi >= n_train:
            bad = lo if lo < 0 else hi
            raise ArgumentError(
                f"{cls}.{where}: timestep {bad} is out of range [0, num_train_timesteps={n_train})"
            )
        return idx

    def _abar_per_sample(self, timesteps: Any, sample: Any, xp: Any, where: str) -> Any:
        """abar_t for each sample, shape (B, 1, ..., 1) broadcastable to ``sample``."""
        idx = self._batch_timesteps(timesteps, sample, xp, where)
        dev = backend.device(sample)
        key = (backend.library_name(xp), str(sample.dtype), str(dev))
        table = self._device_tables.get(key)
        if table is None:
            table = backend.asarray(self._alphas_cumprod, xp, dtype=sample.dtype, device=dev)
            self._device_tables[key] = table
        abar = xp.take(table, idx, axis=0)
        return xp.reshape(abar, (sample.shape[0],) + (1,) * (sample.ndim - 1))

    def add_noise(self, original_samples: Any, noise: Any, timesteps: Any) -> Any:
        """Forward process q(x_t | x_0) (DDPM paper, eq. 4):
        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise.

        Args:
            original_samples: x_0, shape (B, C, H, W) (any (B, ...) works).
            noise: same shape, namespace and dtype.
            timesteps: int, list of B ints, or integer array of shape (B,).

        Returns:
            x_t, shape (B, C, H, W), namespace and dtype of ``original_samples``.
        """
        xp = self._check_pair(original_samples, noise, ("original_samples", "noise"), "add_noise")
        abar = self._abar_per_sample(timesteps, original_samples, xp, "add_noise")
        return xp.sqrt(abar) * original_samples + xp.sqrt(1 - abar) * noise

    def get_velocity(self, sample: Any, noise: Any, timesteps: Any) -> Any:
        """v-prediction target (Salimans & Ho 2022, sec. 4):
        v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0, with ``sample`` = x_0.

        Args:
            sample: x_0, shape (B, C, H, W).
            noise: same shape.
            timesteps: int, list of B ints, or integer array of shape (B,).

        Returns:
            v, shape (B, C, H, W), namespace and dtype of ``sample``.
        """
        xp = self._check_pair(sample, noise, ("sample", "noise"), "get_velocity")
        abar = self._abar_per_sample(timesteps, sample, xp, "get_velocity")
        return xp.sqrt(abar) * noise - xp.sqrt(1 - abar) * sample

    def _start_step(
        self, model_output: Any, timestep: Any, sample: Any, generator: Any, noise: Any
    ) -> tuple[Any, int]:
        """Checks common to every ``step`` method; returns (namespace, timestep as int)."""
        xp = self._check_pair(sample, model_output, ("sample", "model_output"), "step")
        if noise is not None and generator is not None:
            raise ArgumentError(
                f"{type(self).__name__}.step: expected at most one of generator and "
                f"variance_noise, got both"
            )
        return xp, self._check_timestep(timestep, "step")

    def previous_timestep(self, timestep: int) -> int:
        """The timestep a step from ``timestep`` lands on (negative after the last step).

        Raises:
            ValueError: for a timestep out of range, or one this scheduler cannot
                step from now (see the subclass).
        """
        return self._previous(self._check_timestep(timestep, "previous_timestep"))

    def _previous(self, t: int) -> int:
        raise NotImplementedError

    def _predict(
        self, model_output: Any, sample: Any, abar_t: float, with_eps: bool = True
    ) -> tuple[Any, Any]:
        """(predicted x_0, predicted noise) from the model output at x_t = ``sample``.

        epsilon: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)   (DDPM eq. 15)
        v:       x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v,
                 eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
        sample:  x_0 = output, eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)
        x_0 comes before clipping.  The noise is None unless ``with_eps``.
        """
        kind = self._config["prediction_type"]
        sa, sb = f32(math.sqrt(abar_t)), f32(math.sqrt(f32(1.0 - abar_t)))
        if kind == "epsilon":
            return (sample - sb * model_output) / sa, model_output
        if kind == "v_prediction":
            eps = sa * model_output + sb * sample if with_eps else None
            return sa * sample - sb * model_output, eps
        eps = (sample - sa * model_output) / sb if with_eps else None
        return model_output, eps

    def _clip(self, xp: Any, x0: Any) -> Any:
        if not self._config["clip_sample"]:
            return x0
        r = self._config["clip_sample_range"]
        return xp.clip(x0, -r, r)

    def _variance_noise(self, xp: Any, sample: Any, generator: Any, noise: Any) -> Any:
        """Standard normal noise shaped like ``sample``: ``noise`` if given, else
        drawn from ``generator`` (a fresh unseeded one when both are None)."""
        cls = type(self).__name__
        if noise is not None:
            backend.get_namespace(sample, noise, where=f"{cls}.step")
            if tuple(noise.shape) != tuple(sample.shape):
                raise ArgumentError(
                    f"{cls}.step: expected variance_noise of shape {tuple(sample.shape)}, "
                    f"got {tuple(noise.shape)}"
                )
            return noise if noise.dtype == sample.dtype else xp.astype(noise, sample.dtype)
        dev = backend.device(sample)
        if generator is None:
            generator = backend.Generator(None, xp, device=dev)
        # float16 (and any other float) samples get float32 noise rounded to their dtype
        wide = sample.dtype in (xp.float32, xp.float64)
        drawn = generator.normal(tuple(sample.shape), dtype=sample.dtype if wide else xp.float32)
        if backend.get_namespace(drawn) is not xp or backend.device(drawn) != dev:
            drawn = backend.asarray(drawn, xp, device=dev)
        return drawn if drawn.dtype == sample.dtype else xp.astype(drawn, sample.dtype)
