"""Pure forward/backward pairs.

Each ``*_forward`` returns ``(output, cache)`` with the smallest cache its
``*_backward`` needs; each ``*_backward(cache, grad_output)`` returns the
gradients of the forward's inputs, in order.  Everything is written against the
array-API namespace of the inputs.

Every public name is re-exported here: ``from xpdiff import functional as F`` and
``F.conv2d_forward(...)``.
"""

from .activations import (
    ReluCache,
    SiluCache,
    relu_backward,
    relu_forward,
    sigmoid,
    silu_backward,
    silu_forward,
)
from .attention import SdpaCache, sdpa_backward, sdpa_forward
from .conv import (
    Conv2dCache,
    col2im,
    conv2d_backward,
    conv2d_forward,
    conv_output_size,
    im2col,
    pad2d,
    to_channels_first,
    to_channels_last,
)
from .embeddings import EmbeddingCache, embedding_backward, embedding_forward, timestep_embedding
from .linear import LinearCache, linear_backward, linear_forward
from .losses import cross_entropy, mse_loss
from .norm import GroupNormCache, group_norm_backward, group_norm_forward
from .resampling import (
    UpsampleCache,
    nearest_indices,
    upsample_nearest_backward,
    upsample_nearest_forward,
)

__all__ = [
    "col2im",
    "conv2d_backward",
    "conv2d_forward",
    "Conv2dCache",
    "conv_output_size",
    "cross_entropy",
    "embedding_backward",
    "embedding_forward",
    "EmbeddingCache",
    "group_norm_backward",
    "group_norm_forward",
    "GroupNormCache",
    "im2col",
    "linear_backward",
    "linear_forward",
    "LinearCache",
    "mse_loss",
    "nearest_indices",
    "pad2d",
    "relu_backward",
    "relu_forward",
    "ReluCache",
    "sdpa_backward",
    "sdpa_forward",
    "SdpaCache",
    "sigmoid",
    "silu_backward",
    "silu_forward",
    "SiluCache",
    "timestep_embedding",
    "to_channels_first",
    "to_channels_last",
    "upsample_nearest_backward",
    "upsample_nearest_forward",
    "UpsampleCache",
]
