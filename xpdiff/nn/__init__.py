"""Modules that hold Parameters and call the pure pairs of ``xpdiff.functional``.

Every public name is re-exported here: ``from xpdiff import nn`` and ``nn.Conv2d(...)``;
``nn.init`` seeds and draws initial weights.
"""

from . import init
from .blocks import Attention, Downsample2D, ResnetBlock2D, TimestepEmbedding, Timesteps, Upsample2D
from .layers import Conv2d, Dropout, Embedding, GroupNorm, Identity, Linear, MSELoss, ReLU, SiLU
from .module import Module, ModuleList, Parameter, Sequential, is_grad_enabled, no_grad

__all__ = [
    "Attention",
    "Conv2d",
    "Downsample2D",
    "Dropout",
    "Embedding",
    "GroupNorm",
    "Identity",
    "Linear",
    "MSELoss",
    "Module",
    "ModuleList",
    "Parameter",
    "ReLU",
    "ResnetBlock2D",
    "Sequential",
    "SiLU",
    "TimestepEmbedding",
    "Timesteps",
    "Upsample2D",
    "init",
    "is_grad_enabled",
    "no_grad",
]
