"""Models: diffusers-compatible UNet2DModel and its blocks."""

from .unet_2d import UNet2DModel
from .unet_2d_blocks import AttnDownBlock2D, AttnUpBlock2D, DownBlock2D, UNetMidBlock2D, UpBlock2D

__all__ = [
    "AttnDownBlock2D",
    "AttnUpBlock2D",
    "DownBlock2D",
    "UNet2DModel",
    "UNetMidBlock2D",
    "UpBlock2D",
]
