"""DDIM sampler (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit
Models"), numerically matching diffusers' ``DDIMScheduler``.

Equation numbers below refer to that paper (arXiv:2010.02502).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from .._validation import ArgumentError, check_bool, check_float
from ..configuration import register_to_config
from ._common import BaseScheduler, SchedulerOutput
from .tables import f32

__all__ = ["DDIMScheduler"]


class DDIMScheduler(BaseScheduler):
    """DDIM sampling (deterministic at eta = 0) on any array-API namespace.

    Args:
        num_train_timesteps: length T of the training noise schedule.
        beta_start, beta_end: first and last beta of the (scaled) linear schedules.
        beta_schedule: ``"linear"``, ``"scaled_linear"`` or ``"squaredcos_cap_v2"``.
        clip_sample: clip the predicted x_0 to [-clip_sample_range, clip_sample_range].
        clip_sample_range: the clipping bound.
        set_alpha_to_one: abar used after the last step: 1 when True, else abar_0.
        steps_offset: added to ``leading`` timesteps (1 for Stable Diffusion).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``.

    Raises:
        ValueError: for an unsupported option, naming the supported ones.
    """

    _bools: ClassVar[tuple[str, ...]] = (*BaseScheduler._bools, "set_alpha_to_one")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
    ) -> None:
        self._setup()
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else self._alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the ``num_inference_steps`` timesteps to sample with.

        Sets ``self.timesteps`` (a descending int64 array of ``num_inference_steps``
        distinct timesteps) and ``self.num_inference_steps``; each step then lands on
        the next entry of ``self.timesteps`` (the last one on abar = final_alpha_cumprod).

        Raises:
            ValueError: when ``num_inference_steps`` is not in [1, num_train_timesteps],
                or ``steps_offset`` pushes a timestep out of range.
        """
        n = self._check_num_inference_steps(num_inference_steps)
        self._set_grid(self._spaced_timesteps(n))

    def _previous(self, t: int) -> int:
        """The next entry of ``self.timesteps`` (-1 after the last), so that a model
        predicting the exact noise takes DDIM back to x_0 for every spacing.

        diffusers uses ``t - num_train_timesteps // num_inference_steps`` instead,
        which equals this for ``leading`` spacing but can miss the grid for
        ``trailing`` and ``linspace`` (T = 100, 5 linspace steps: the grid is
        [99, 74, 50, 25, 0], diffusers lands on [79, 54, 30, 5, -20])."""
        if self.num_inference_steps is None:
            raise ArgumentError(
                "DDIMScheduler: expected set_timesteps(num_inference_steps) to be called "
                "before step, got num_inference_steps=None"
            )
        if t not in self._prev:
            raise ArgumentError(
                f"DDIMScheduler: expected a timestep from set_timesteps("
                f"{self.num_inference_steps}) (one of self.timesteps), got {t}"
            )
        return self._prev[t]

    def step(
        self,
        model_output: Any,
        timestep: Any,
        sample: Any,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Any = None,
        variance_noise: Any = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[Any, Any]:
        """One DDIM step x_t -> x_{t_prev} (eq. 12), t_prev = ``previous_timestep(t)``.

        The arguments are diffusers' ``DDIMScheduler.step``'s, in its order.

        Args:
            model_output: the model's prediction at (``sample``, ``timestep``),
                shape (B, C, H, W) like ``sample``.
            timestep: current timestep t, integer-like (int, NumPy integer, 0-d
                integer array), one of ``self.timesteps``.
            sample: x_t, shape (B, C, H, W), float32 or float64.
            eta: weight of the fresh noise: sigma_t = eta * sigma_t(1) of eq. 16;
                0 is deterministic DDIM, 1 matches DDPM's posterior variance.
            use_clipped_model_output: recompute the noise from the clipped x_0.
            generator: ``xpdiff.backend.Generator`` for the noise (eta > 0 only).
            variance_noise: explicit standard-normal noise of ``sample``'s shape
                (give at most one of ``generator`` and ``variance_noise``; with
                neither, an unseeded generator is used).
            return_dict: False returns a plain tuple instead of ``SchedulerOutput``.

        Returns:
            ``SchedulerOutput(prev_sample, pred_original_sample)``, both of shape
            (B, C, H, W) in the namespace, device and dtype of ``sample``.

        Raises:
            ValueError: before ``set_timesteps``, for a timestep not on the grid,
                eta < 0, mismatched shapes, or both ``generator`` and ``variance_noise``.
        """
        noise = variance_noise
        use_clipped_model_output = check_bool(
            "DDIMScheduler.step", "use_clipped_model_output", use_clipped_model_output
        )
        xp, t = self._start_step(model_output, timestep, sample, generator, noise)
        t_prev = self._previous(t)
        eta = check_float("DDIMScheduler.step", "eta", eta, min=0.0)
        abar_t = self._alphas_cumprod[t]
        abar_prev = self._alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        one_minus_abar_t = f32(1.0 - abar_t)
        one_minus_abar_prev = f32(1.0 - abar_prev)

        x0, eps = self._predict(model_output, sample, abar_t)  # "predicted x_0" of eq. 12
        x0 = self._clip(xp, x0)
        if use_clipped_model_output:
            sa, sb = f32(math.sqrt(abar_t)), f32(math.sqrt(one_minus_abar_t))
            eps = (sample - sa * x0) / sb

        # sigma_t(eta) of eq. 16: eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev),
        # scalars float32-rounded after each operation, as in diffusers
        ratio = f32(one_minus_abar_prev / one_minus_abar_t)
        var = f32(ratio * f32(1.0 - f32(abar_t / abar_prev)))
        sigma = f32(f32(eta) * f32(math.sqrt(max(var, 0.0))))
        # eq. 12: sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
        coef_eps = f32(math.sqrt(max(f32(one_minus_abar_prev - f32(sigma * sigma)), 0.0)))
        prev = f32(math.sqrt(abar_prev)) * x0 + coef_eps * eps
        if eta > 0:
            prev = prev + sigma * self._variance_noise(xp, sample, generator, noise)
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)
