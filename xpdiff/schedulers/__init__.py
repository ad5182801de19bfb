"""Noise schedulers with diffusers-compatible configs and numerics.

``DDPMScheduler`` (ancestral sampling) and ``DDIMScheduler`` (deterministic or
eta-stochastic) run on any array-API namespace: arrays stay in the namespace,
device and dtype of the sample given to them.
"""

from ._common import CONFIG_NAME, SchedulerOutput
from .scheduling_ddim import DDIMScheduler
from .scheduling_ddpm import DDPMScheduler

__all__ = ["CONFIG_NAME", "DDIMScheduler", "DDPMScheduler", "SchedulerOutput"]
