"""DPM-Solver++ multistep sampler (Lu, Zhou, Bao, Chen, Li & Zhu 2022,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", arXiv:2211.01095), numerically matching diffusers'
``DPMSolverMultistepScheduler`` for the options implemented here.

Notation of the paper, for the discrete schedule abar_t of training:

    alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t),
    lambda_t = log(alpha_t / sigma_t)          (half the log signal-to-noise ratio),
    x_theta(x_t, t)                            the model's prediction of x_0 ("data prediction").

The diffusion ODE, written with the data-prediction model, has the exact solution

    x_t = (sigma_t / sigma_s) x_s + sigma_t integral_{lambda_s}^{lambda_t} e^lambda x_theta dlambda,

whose linear part is integrated exactly.  Holding x_theta constant over a step
of length h = lambda_t - lambda_s gives DPM-Solver++1, which is DDIM with eta = 0:

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x_theta(x_s, s).

DPM-Solver++(2M) (the paper's Algorithm 2) reuses the prediction of the
previous step, r = h_prev / h, instead of a second model call:

    D   = (1 + 1 / (2 r)) x_theta(x_s, s) - 1 / (2 r) x_theta(x_prev, prev),
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D.

The schedule is walked in diffusers' parameterisation sigma = sigma_t / alpha_t
= sqrt((1 - abar_t) / abar_t), from which alpha_t = 1 / sqrt(sigma^2 + 1) and
sigma_t = sigma alpha_t.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from .._validation import ArgumentError, check_float, check_int
from ..configuration import register_to_config
from ._common import _ANY, _DIFFUSERS_INACTIVE, BaseScheduler, SchedulerOutput
from .tables import f32, spaced_timesteps

__all__ = ["DPMSolverMultistepScheduler"]


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of sigma = sigma_t / alpha_t, float32-rounded after each
    operation, as diffusers computes them on float32 scalars."""
    alpha = f32(1.0 / f32(math.sqrt(f32(f32(sigma * sigma) + 1.0))))
    return alpha, f32(sigma * alpha)


def _log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha_t) - log(sigma_t); +inf at sigma_t = 0 (the clean end)."""
    if sigma == 0.0:
        return math.inf
    return f32(f32(math.log(alpha)) - f32(math.log(sigma)))


class DPMSolverMultistepScheduler(BaseScheduler):
    """DPM-Solver++ (first or second order multistep) on any array-API namespace.

    Deterministic: it solves the diffusion ODE, so ``generator`` and
    ``variance_noise`` of ``step`` are accepted (for a common sampling loop) and
    unused.  It is a multistep method: ``step`` must be called once for each of
    ``self.timesteps`` in order, and ``set_timesteps`` starts a new chain
    (it forgets the stored predictions).

    Args:
        num_train_timesteps: length T of the training noise schedule.
        beta_start, beta_end: first and last beta of the (scaled) linear schedules.
        beta_schedule: ``"linear"``, ``"scaled_linear"`` or ``"squaredcos_cap_v2"``.
        trained_betas: explicit betas (T numbers) replacing ``beta_schedule``.
        solver_order: 1 (DPM-Solver++1, i.e. DDIM) or 2 (DPM-Solver++(2M)).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        thresholding: apply dynamic thresholding (Saharia et al. 2022, "Photorealistic
            Text-to-Image Diffusion Models with Deep Language Understanding", sec. 2.3)
            to the predicted x_0, as the DPM-Solver++ paper does for pixel-space models:
            s = the ``dynamic_thresholding_ratio`` quantile of |x_0| per sample, clamped
            to [1, ``sample_max_value``], then x_0 <- clip(x_0, -s, s) / s.  With
            ``sample_max_value`` 1 this is plain clipping to [-1, 1].
        dynamic_thresholding_ratio: the quantile, in (0, 1].
        sample_max_value: upper bound of s, > 0.
        algorithm_type: ``"dpmsolver++"`` (the only one implemented).
        solver_type: second-order update: ``"midpoint"`` (Algorithm 2 above) or
            ``"heun"``, which integrates the linear change of x_theta exactly:
            x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m0
            + alpha_t ((e^{-h} - 1) / h + 1) (m0 - m1) / r.
        lower_order_final: take the last step with the first-order update when
            there are fewer than 15 steps (more stable for few steps).
        use_karras_sigmas: only False (the training timesteps are used).
        final_sigmas_type: where the last step lands: ``"zero"`` (sigma = 0, x_0
            itself; the last step is then always first order) or ``"sigma_min"``
            (the noise level of training step 0).
        timestep_spacing: ``"linspace"``, ``"leading"`` or ``"trailing"``
            (diffusers' rules for this scheduler; see ``set_timesteps``).
        steps_offset: added to ``leading`` timesteps.

    Raises:
        ValueError: for an unsupported option, naming the key, the supported
            values and what came.
    """

    _choices: ClassVar[dict[str, tuple[str, ...]]] = {
        **BaseScheduler._choices,
        "algorithm_type": ("dpmsolver++",),
        "solver_type": ("midpoint", "heun"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }
    _bools: ClassVar[tuple[str, ...]] = ("thresholding", "lower_order_final", "use_karras_sigmas")
    _accepted_off: ClassVar[dict[str, Any]] = {
        **_DIFFUSERS_INACTIVE,
        "euler_at_final": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": _ANY,
        "lambda_min_clipped": -math.inf,
        "use_dynamic_shifting": False,
        "time_shift_type": _ANY,
        # DDPM's fixed variances leave the solver alone (a learned variance would show up
        # as a model output of twice the sample's channels, which ``step`` refuses)
        "variance_type": _ANY,
    }

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        name = type(self).__name__
        check_int(name, "solver_order", solver_order)
        if solver_order not in (1, 2):
            raise ArgumentError(
                f"{name}: expected solver_order to be 1 or 2 (third order is not implemented), "
                f"got {solver_order!r}"
            )
        self._update_config(
            dynamic_thresholding_ratio=check_float(
                name,
                "dynamic_thresholding_ratio",
                dynamic_thresholding_ratio,
                min=0.0,
                max=1.0,
                min_open=True,
            ),
            sample_max_value=check_float(
                name, "sample_max_value", sample_max_value, min=0.0, min_open=True
            ),
        )
        self._setup()
        if use_karras_sigmas:
            raise ArgumentError(
                f"{name}: use_karras_sigmas=True is not supported (only False: the sampler "
                f"visits training timesteps)"
            )
        # sigma = sqrt((1 - abar) / abar) per training step, float32 operations
        self._train_sigmas = [f32(math.sqrt(f32(f32(1.0 - a) / a))) for a in self._alphas_cumprod]
        self._sigmas: list[float] = []
        self._reset()

    def _reset(self) -> None:
        self._step_index: int | None = None
        self._lower_order_nums = 0
        self._model_outputs: list[Any] = []

    # -- read-only views ----------------------------------------------------
    @property
    def sigmas(self) -> tuple[float, ...]:
        """sigma = sigma_t / alpha_t at each of ``self.timesteps`` plus the final
        one (0 or sigma of step 0); empty before ``set_timesteps``."""
        return tuple(self._sigmas)

    @property
    def step_index(self) -> int | None:
        """Index into ``self.timesteps`` of the next step (None before the first)."""
        return self._step_index

    # -- timesteps ------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the ``num_inference_steps`` timesteps to sample with and start a new chain.

        diffusers' rules for this scheduler: ``linspace`` and ``leading`` divide
        the schedule into ``num_inference_steps + 1`` points and drop the last
        one (t = 0, which only the final sigma stands for); ``trailing`` is the
        DDIM rule.  Sets ``self.timesteps`` (a descending int64 array),
        ``self.sigmas`` and ``self.num_inference_steps``, and forgets the
        predictions kept from an earlier chain.

        Raises:
            ValueError: when ``num_inference_steps`` is not in [1, num_train_timesteps],
                or ``steps_offset`` pushes a timestep out of range.
        """
        n = self._check_num_inference_steps(num_inference_steps)
        cfg = self._config
        n_train = cfg["num_train_timesteps"]
        spacing = cfg["timestep_spacing"]
        if spacing == "trailing":
            steps = spaced_timesteps(spacing, n_train, n, cfg["steps_offset"])
        else:
            steps = spaced_timesteps(spacing, n_train, n + 1, cfg["steps_offset"])[:-1]
        if not 0 <= steps[0] < n_train:
            raise ArgumentError(
                f"{type(self).__name__}.set_timesteps: steps_offset={cfg['steps_offset']} with "
                f"{n} steps gives timestep {steps[0]}, outside [0, num_train_timesteps={n_train})"
            )
        final = self._train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self._steps = steps
        self.num_inference_steps = n
        self._sigmas = [self._train_sigmas[t] for t in steps] + [final]
        self._reset()

    def _require_timesteps(self, where: str) -> None:
        if self.num_inference_steps is None:
            raise ArgumentError(
                f"{type(self).__name__}.{where}: expected set_timesteps(num_inference_steps) "
                f"to be called first, got num_inference_steps=None"
            )

    def _previous(self, t: int) -> int:
        """The next entry of ``self.timesteps``; after the last one 0 with
        ``final_sigmas_type="sigma_min"`` (its noise level), else -1 (clean)."""
        self._require_timesteps("previous_timestep")
        if t not in self._steps:
            raise ArgumentError(
                f"{type(self).__name__}: expected a timestep from set_timesteps("
                f"{self.num_inference_steps}) (one of self.timesteps), got {t}"
            )
        i = self._steps.index(t)
        if self._step_index is not None and self._step_index < len(self._steps):
            if self._steps[self._step_index] == t:
                i = self._step_index
        if i + 1 < len(self._steps):
            return self._steps[i + 1]
        return 0 if self._config["final_sigmas_type"] == "sigma_min" else -1

    def _index_for(self, t: int) -> int:
        """Index of this step in ``self.timesteps``.  The first step may start
        anywhere in the schedule (at a repeated timestep: its second occurrence,
        as diffusers does); later steps must follow it in order."""
        self._require_timesteps("step")
        cls, steps = type(self).__name__, self._steps
        i = self._step_index
        if i is None:
            found = [k for k, s in enumerate(steps) if s == t]
            if not found:
                raise ArgumentError(
                    f"{cls}.step: expected a timestep from set_timesteps("
                    f"{self.num_inference_steps}) (one of self.timesteps), got {t}"
                )
            return found[1] if len(found) > 1 else found[0]
        if i >= len(steps):
            raise ArgumentError(
                f"{cls}.step: all {len(steps)} steps of this chain are taken; call "
                f"set_timesteps to start a new one (got timestep {t})"
            )
        if steps[i] != t:
            raise ArgumentError(
                f"{cls}.step: expected timestep {steps[i]} (step {i} of {len(steps)}; a "
                f"multistep solver visits self.timesteps in order), got {t}"
            )
        return i

    # -- the solver -------------------------------------------------------------
    def _data_prediction(self, xp: Any, model_output: Any, sample: Any, i: int) -> Any:
        """x_theta(x_s, s), the predicted x_0, from the model output at step ``i``:

        epsilon: x_0 = (x_s - sigma_s eps) / alpha_s
        v:       x_0 = alpha_s x_s - sigma_s v      (Salimans & Ho 2022)
        sample:  x_0 = output
        then dynamic thresholding when ``thresholding`` is on.
        """
        kind = self._config["prediction_type"]
        if kind == "sample":
            x0 = model_output
        else:
            alpha, sigma = _alpha_sigma(self._sigmas[i])
            if kind == "epsilon":
                x0 = (sample - sigma * model_output) / alpha
            else:
                x0 = alpha * sample - sigma * model_output
        if self._config["thresholding"]:
            x0 = self._threshold(xp, x0)
        return x0

    def _threshold(self, xp: Any, x0: Any) -> Any:
        """Dynamic thresholding of ``x0`` (B, ...): per sample, s = quantile of |x_0|
        (linear interpolation between order statistics), clamped to
        [1, sample_max_value]; returns clip(x_0, -s, s) / s."""
        cfg = self._config
        batch = x0.shape[0]
        flat = xp.sort(xp.abs(xp.reshape(x0, (batch, -1))), axis=1)
        n = flat.shape[1]
        pos = cfg["dynamic_thresholding_ratio"] * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        s = flat[:, lo] + frac * (flat[:, hi] - flat[:, lo])
        top = cfg["sample_max_value"]
        # clamped to [1, top]; a top below 1 wins, as with clamp(min=1) then clamp(max=top)
        s = xp.clip(s, 1.0, top) if top >= 1.0 else xp.full_like(s, top)
        s = xp.reshape(s, (batch,) + (1,) * (x0.ndim - 1))
        return xp.minimum(xp.maximum(x0, -s), s) / s

    def step(
        self,
        model_output: Any,
        timestep: int,
        sample: Any,
        generator: Any = None,
        variance_noise: Any = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[Any, Any]:
        """One DPM-Solver++ step x_s -> x_t from ``timestep`` s to the next entry of
        ``self.timesteps`` (to the final sigma after the last one).

        The first step of a chain, and the last when ``final_sigmas_type`` is
        ``"zero"`` or (with ``lower_order_final``) when there are fewer than 15
        steps, use the first-order update; the others use ``solver_order``.

        Args:
            model_output: the model's prediction at (``sample``, ``timestep``),
                shape (B, C, H, W) like ``sample``.
            timestep: current timestep s, a Python int (or integer scalar): the
                next entry of ``self.timesteps``.
            sample: x_s, shape (B, C, H, W), float32 or float64 (computed in its dtype).
            generator, variance_noise: unused (the solver is deterministic); give
                at most one.
            return_dict: False returns a plain tuple instead of ``SchedulerOutput``.

        Returns:
            ``SchedulerOutput(prev_sample, pred_original_sample)``: x_t and the
            data prediction x_theta(x_s, s) (after thresholding), both of shape
            (B, C, H, W) in the namespace, device and dtype of ``sample``.

        Raises:
            ValueError: before ``set_timesteps``, for a timestep out of range or
                out of order, after the chain's last step, for mismatched shapes,
                or both ``generator`` and ``variance_noise``.
        """
        xp, t = self._start_step(model_output, timestep, sample, generator, variance_noise)
        i = self._index_for(t)
        cfg = self._config
        n_steps = len(self._steps)
        first_order_final = i == n_steps - 1 and (
            (cfg["lower_order_final"] and n_steps < 15) or cfg["final_sigmas_type"] == "zero"
        )
        x0 = self._data_prediction(xp, model_output, sample, i)
        self._model_outputs = [*self._model_outputs, x0][-cfg["solver_order"] :]

        alpha_t, sigma_t = _alpha_sigma(self._sigmas[i + 1])
        alpha_s, sigma_s = _alpha_sigma(self._sigmas[i])
        lam_s = _log_snr(alpha_s, sigma_s)
        h = f32(_log_snr(alpha_t, sigma_t) - lam_s)
        ratio = f32(sigma_t / sigma_s)
        em1 = f32(f32(math.exp(-h)) - 1.0)  # e^{-h} - 1 (-1 when sigma_t = 0)
        coef = f32(alpha_t * em1)
        # first order (DPM-Solver++1 = DDIM): x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) x0
        prev = ratio * sample - coef * x0
        second = cfg["solver_order"] == 2 and self._lower_order_nums >= 1 and not first_order_final
        if second:
            alpha_p, sigma_p = _alpha_sigma(self._sigmas[i - 1])
            h_prev = f32(lam_s - _log_snr(alpha_p, sigma_p))
            # a repeated timestep (h = 0 or h_prev = 0) leaves nothing to extrapolate from
            second = h != 0.0 and h_prev != 0.0
        if second:
            # DPM-Solver++(2M): r = h_prev / h, D1 = (m0 - m1) / r
            d1 = f32(1.0 / f32(h_prev / h)) * (x0 - self._model_outputs[0])
            if cfg["solver_type"] == "midpoint":  # D = m0 + D1 / 2 (Algorithm 2)
                prev = prev - f32(0.5 * coef) * d1
            else:  # exact integral of the linear term: alpha_t ((e^{-h} - 1)/h + 1) D1
                prev = prev + f32(alpha_t * f32(f32(em1 / h) + 1.0)) * d1
        self._lower_order_nums = min(self._lower_order_nums + 1, cfg["solver_order"])
        self._step_index = i + 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)
