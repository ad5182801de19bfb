"""DDPM ancestral sampler (Ho, Jain & Abbeel 2020, "Denoising Diffusion
Probabilistic Models"), numerically matching diffusers' ``DDPMScheduler``.

Equation numbers below refer to that paper (arXiv:2006.11239).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from .._validation import ArgumentError
from ..configuration import register_to_config
from ._common import BaseScheduler, SchedulerOutput
from .tables import f32

__all__ = ["DDPMScheduler"]

_VAR_FLOOR = f32(1e-20)


class DDPMScheduler(BaseScheduler):
    """Ancestral sampling of the DDPM reverse process, on any array-API namespace.

    Args:
        num_train_timesteps: length T of the training noise schedule.
        beta_start, beta_end: first and last beta of the (scaled) linear schedules.
        beta_schedule: ``"linear"``, ``"scaled_linear"`` (linear in sqrt(beta)) or
            ``"squaredcos_cap_v2"`` (cosine alpha-bar, betas capped at 0.999).
        variance_type: ``"fixed_small"`` (sigma_t^2 = beta-tilde_t, the posterior
            variance of eq. 7) or ``"fixed_large"`` (sigma_t^2 = beta_t); sec. 3.2.
        clip_sample: clip the predicted x_0 to [-clip_sample_range, clip_sample_range].
        clip_sample_range: the clipping bound.
        prediction_type: what the model predicts: ``"epsilon"`` (the noise),
            ``"v_prediction"`` (v = sqrt(abar) eps - sqrt(1 - abar) x_0) or ``"sample"`` (x_0).
        timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``; how
            ``set_timesteps`` picks inference timesteps.
        steps_offset: added to ``leading`` timesteps (1 for Stable Diffusion).

    Raises:
        ValueError: for an unsupported option, naming the supported ones.
    """

    _choices: ClassVar[dict[str, tuple[str, ...]]] = {
        **BaseScheduler._choices,
        "variance_type": ("fixed_small", "fixed_large"),
    }

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ) -> None:
        self._setup()

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the ``num_inference_steps`` timesteps to sample with.

        Sets ``self.timesteps`` (a descending int64 array of ``num_inference_steps``
        distinct timesteps) and ``self.num_inference_steps``; each step then jumps to
        the next entry of ``self.timesteps`` (the last one to t = -1, i.e. abar = 1).

        Raises:
            ValueError: when ``num_inference_steps`` is not in [1, num_train_timesteps],
                or ``steps_offset`` pushes a timestep out of range.
        """
        n = self._check_num_inference_steps(num_inference_steps)
        self._set_grid(self._spaced_timesteps(n))

    def _previous(self, t: int) -> int:
        """Before ``set_timesteps`` the chain visits every training step (t - 1);
        afterwards the next entry of ``self.timesteps`` (-1 after the last), and
        ``t`` must be one of them."""
        if self.num_inference_steps is None:
            return t - 1
        if t not in self._prev:
            raise ArgumentError(
                f"DDPMScheduler: expected a timestep from set_timesteps("
                f"{self.num_inference_steps}) (one of self.timesteps), got {t}"
            )
        return self._prev[t]

    def step(
        self,
        model_output: Any,
        timestep: Any,
        sample: Any,
        generator: Any = None,
        return_dict: bool = True,
        *,
        variance_noise: Any = None,
    ) -> SchedulerOutput | tuple[Any, Any]:
        """One ancestral step x_t -> x_{t_prev}, t_prev = ``previous_timestep(t)``.

        The arguments are diffusers' ``DDPMScheduler.step``'s, in its order, plus
        the keyword-only ``variance_noise``.

        Args:
            model_output: the model's prediction at (``sample``, ``timestep``),
                shape (B, C, H, W) like ``sample``.
            timestep: current timestep t, integer-like (int, NumPy integer, 0-d
                integer array) in [0, num_train_timesteps).
            sample: x_t, shape (B, C, H, W), float32 or float64.
            generator: ``xpdiff.backend.Generator`` for the variance noise.
            return_dict: False returns a plain tuple instead of ``SchedulerOutput``.
            variance_noise: explicit standard-normal variance noise, shape of
                ``sample`` (give at most one of ``generator`` and ``variance_noise``;
                with neither, an unseeded generator is used).  Unused when t = 0.

        Returns:
            ``SchedulerOutput(prev_sample, pred_original_sample)``, both of shape
            (B, C, H, W) in the namespace, device and dtype of ``sample``.
        """
        noise = variance_noise
        xp, t = self._start_step(model_output, timestep, sample, generator, noise)
        t_prev = self._previous(t)
        abar = self._alphas_cumprod
        abar_t = abar[t]
        abar_prev = abar[t_prev] if t_prev >= 0 else 1.0
        # alpha_t, beta_t of the (possibly strided) one-step transition t -> t_prev;
        # scalars are float32-rounded after each operation, as in diffusers
        alpha_t = f32(abar_t / abar_prev)
        beta_t = f32(1.0 - alpha_t)
        one_minus_abar_t = f32(1.0 - abar_t)
        one_minus_abar_prev = f32(1.0 - abar_prev)

        x0, _ = self._predict(model_output, sample, abar_t, with_eps=False)  # eq. 15
        x0 = self._clip(xp, x0)

        # posterior mean mu-tilde_t(x_t, x_0) of q(x_{t-1} | x_t, x_0), eq. 7
        coef_x0 = f32(f32(f32(math.sqrt(abar_prev)) * beta_t) / one_minus_abar_t)
        coef_xt = f32(f32(f32(math.sqrt(alpha_t)) * one_minus_abar_prev) / one_minus_abar_t)
        prev = coef_x0 * x0 + coef_xt * sample

        if t > 0:
            if self._config["variance_type"] == "fixed_small":
                # beta-tilde_t of eq. 7, floored so that its sqrt stays positive
                var = f32(f32(one_minus_abar_prev / one_minus_abar_t) * beta_t)
                var = max(var, _VAR_FLOOR)
            else:
                var = beta_t
            z = self._variance_noise(xp, sample, generator, noise)
            prev = prev + f32(math.sqrt(var)) * z
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)
