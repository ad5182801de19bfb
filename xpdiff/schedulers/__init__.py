"""Noise schedulers with diffusers-compatible configs and numerics.

``DDPMScheduler`` (ancestral sampling), ``DDIMScheduler`` (deterministic or
eta-stochastic) and ``DPMSolverMultistepScheduler`` (DPM-Solver++, first or
second order) run on any array-API namespace: arrays stay in the namespace,
device and dtype of the sample given to them.
"""

from ._common import CONFIG_NAME, SchedulerOutput
from .scheduling_ddim import DDIMScheduler
from .scheduling_ddpm import DDPMScheduler
from .scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

__all__ = [
    "CONFIG_NAME",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "SchedulerOutput",
]
