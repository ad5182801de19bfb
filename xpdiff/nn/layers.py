"""Basic layers: Linear, Conv2d, GroupNorm, SiLU, ReLU, Embedding, Identity, Dropout.

Weights are laid out as in diffusers/PyTorch: Linear (out, in), Conv2d
(O, C, kh, kw), GroupNorm (C,), Embedding (num, dim).  Every ``backward``
returns the input gradient and ADDS into ``Parameter.grad``.

Constructors check every argument once (``xpdiff._validation``): a bad size, flag,
layout or ``dtype`` (``"float32"``, ``"float64"`` or the namespace's own float32 or
float64) raises ValueError, or TypeError for a wrong type, naming the layer and argument.
"""

from __future__ import annotations

import math
from typing import Any

from .. import _validation as _v
from .. import backend
from .. import functional as F
from . import init
from ._checks import check_input
from .module import Module, Parameter, is_grad_enabled

LAYOUTS = F.conv.LAYOUTS  # ("NCHW", "NHWC")

__all__ = [
    "Conv2d",
    "Dropout",
    "Embedding",
    "GroupNorm",
    "Identity",
    "Linear",
    "ReLU",
    "SiLU",
    "MSELoss",
]


class Linear(Module):
    """``y = x @ weight.T + bias`` over the last axis; x (..., in) -> (..., out)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        in_features = _v.check_int("Linear", "in_features", in_features, min=1)
        out_features = _v.check_int("Linear", "out_features", out_features, min=1)
        bias = _v.check_bool("Linear", "bias", bias)
        dtype = _v.check_dtype("Linear", dtype, xp)
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(init.uniform((out_features, in_features), bound, dtype, xp))
        self.bias = Parameter(init.uniform((out_features,), bound, dtype, xp)) if bias else None

    def forward(self, x: Any) -> Any:
        check_input(
            f"Linear({self.in_features}->{self.out_features})",
            x,
            like=self.weight.data,
            axis=-1,
            size=self.in_features,
        )
        y, cache = F.linear_forward(x, self.weight.data, self.bias.data if self.bias else None)
        self._save(cache)
        return y

    def backward(self, grad_output: Any) -> Any:
        gx, gw, gb = F.linear_backward(self._take(), grad_output)
        self.weight.accumulate(gw)
        if self.bias is not None:
            self.bias.accumulate(gb)
        return gx


def _check_layout(where: str, layout: str) -> None:
    _v.check_choice(where, "layout", layout, LAYOUTS)


def _channel_axis(layout: str) -> int:
    return -1 if layout == "NHWC" else 1


def _layout_text(layout: str) -> str:
    return "(B, H, W, C)" if layout == "NHWC" else "(B, C, H, W)"


class Conv2d(Module):
    """2-D convolution of (B, C, H, W) with square kernel, stride and zero padding.

    Output (B, O, Ho, Wo), ``Ho = (H + 2 padding - k) // stride + 1``.  With
    ``layout="NHWC"`` input and output are channels-last, (B, H, W, C) and
    (B, Ho, Wo, O); the weight stays (O, C, k, k) either way.  See
    ``xpdiff.functional.conv`` for the im2col formulation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        *,
        layout: str = "NCHW",
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        w = "Conv2d"
        in_channels = _v.check_int(w, "in_channels", in_channels, min=1)
        out_channels = _v.check_int(w, "out_channels", out_channels, min=1)
        kernel_size = _v.check_int(w, "kernel_size", kernel_size, min=1)
        stride = _v.check_int(w, "stride", stride, min=1)
        padding = _v.check_int(w, "padding", padding, min=0)
        bias = _v.check_bool(w, "bias", bias)
        dtype = _v.check_dtype(w, dtype, xp)
        _check_layout(w, layout)
        self.layout = layout
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        k = kernel_size
        bound = 1.0 / math.sqrt(in_channels * k * k)
        self.weight = Parameter(init.uniform((out_channels, in_channels, k, k), bound, dtype, xp))
        self.bias = Parameter(init.uniform((out_channels,), bound, dtype, xp)) if bias else None

    def _where(self) -> str:
        return (
            f"Conv2d({self.in_channels}->{self.out_channels}, k={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding})"
        )

    def forward(self, x: Any) -> Any:
        where = self._where()
        check_input(
            where,
            x,
            like=self.weight.data,
            ndim=4,
            size=self.in_channels,
            axis=_channel_axis(self.layout),
            layout=_layout_text(self.layout),
        )
        k, p = self.kernel_size, self.padding
        H, W = (x.shape[1], x.shape[2]) if self.layout == "NHWC" else (x.shape[2], x.shape[3])
        if H + 2 * p < k or W + 2 * p < k:
            raise ValueError(f"{where}: input {tuple(x.shape)} is smaller than the kernel")
        y, cache = F.conv2d_forward(
            x,
            self.weight.data,
            self.bias.data if self.bias else None,
            self.stride,
            p,
            layout=self.layout,
        )
        self._save(cache)
        return y

    def backward(self, grad_output: Any) -> Any:
        gx, gw, gb = F.conv2d_backward(self._take(), grad_output)
        self.weight.accumulate(gw)
        if self.bias is not None:
            self.bias.accumulate(gb)
        return gx


class GroupNorm(Module):
    """Group normalisation of (B, C, *spatial) with per-channel affine weight and bias.

    With ``layout="NHWC"`` the channels are the last axis: (B, *spatial, C).  With
    ``activation="silu"`` the layer returns ``silu(group_norm(x))``, computed in one pass
    (the pair every diffusers resnet block and the UNet's output run back to back).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        activation: str | None = None,
        layout: str = "NCHW",
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        num_groups = _v.check_int("GroupNorm", "num_groups", num_groups, min=1)
        num_channels = _v.check_int("GroupNorm", "num_channels", num_channels, min=1)
        eps = _v.check_float("GroupNorm", "eps", eps, min=0.0, min_open=True)
        affine = _v.check_bool("GroupNorm", "affine", affine)
        dtype = _v.check_dtype("GroupNorm", dtype, xp)
        _check_layout("GroupNorm", layout)
        _v.check_choice("GroupNorm", "activation", activation, (None, "silu"))
        self.layout, self.activation = layout, activation
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: num_groups must divide num_channels, got num_groups={num_groups} "
                f"and num_channels={num_channels}"
            )
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = Parameter(init.ones((num_channels,), dtype, xp)) if affine else None
        self.bias = Parameter(init.zeros((num_channels,), dtype, xp)) if affine else None

    def forward(self, x: Any) -> Any:
        where = f"GroupNorm({self.num_groups} groups, {self.num_channels} channels)"
        like = self.weight.data if self.weight is not None else None
        check_input(where, x, like=like, size=self.num_channels, axis=_channel_axis(self.layout))
        if x.ndim < 2:
            want = "(B, ..., C)" if self.layout == "NHWC" else "(B, C, ...)"
            raise ValueError(f"{where}: expected {want}, got shape {tuple(x.shape)}")
        y, cache = F.group_norm_forward(
            x,
            self.num_groups,
            self.weight.data if self.weight else None,
            self.bias.data if self.bias else None,
            self.eps,
            layout=self.layout,
            activation=self.activation,
            keep_cache=is_grad_enabled(),
        )
        self._save(cache)
        return y

    def backward(self, grad_output: Any) -> Any:
        gx, gw, gb = F.group_norm_backward(self._take(), grad_output)
        if self.weight is not None:
            self.weight.accumulate(gw)
            self.bias.accumulate(gb)
        return gx


class SiLU(Module):
    """``x * sigmoid(x)``, elementwise."""

    def forward(self, x: Any) -> Any:
        check_input("SiLU", x)
        y, cache = F.silu_forward(x)
        self._save(cache)
        return y

    def backward(self, grad_output: Any) -> Any:
        return F.silu_backward(self._take(), grad_output)


class ReLU(Module):
    """``max(x, 0)``, elementwise."""

    def forward(self, x: Any) -> Any:
        check_input("ReLU", x)
        y, cache = F.relu_forward(x)
        self._save(cache)
        return y

    def backward(self, grad_output: Any) -> Any:
        return F.relu_backward(self._take(), grad_output)


class Identity(Module):
    """Returns its input; its backward returns the output gradient."""

    def forward(self, x: Any) -> Any:
        return x

    def backward(self, grad_output: Any) -> Any:
        return grad_output


class Dropout(Identity):
    """Dropout with p = 0 only (diffusers' UNet default); any other p is refused."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        p = _v.check_float("Dropout", "p", p, min=0.0, max=1.0)
        if p != 0.0:
            raise ValueError(f"Dropout: only p=0.0 is supported, got p={p}")
        self.p = p


class Embedding(Module):
    """Table look-up: integer indices (N,) -> rows (N, dim) of ``weight`` (num, dim).

    Repeated indices ADD their gradients into the same row.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, *, dtype: str = "float32", xp: Any = None
    ):
        super().__init__()
        num_embeddings = _v.check_int("Embedding", "num_embeddings", num_embeddings, min=1)
        embedding_dim = _v.check_int("Embedding", "embedding_dim", embedding_dim, min=1)
        dtype = _v.check_dtype("Embedding", dtype, xp)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(init.normal((num_embeddings, embedding_dim), 1.0, dtype, xp))

    def forward(self, idx: Any) -> Any:
        where = f"Embedding({self.num_embeddings}, {self.embedding_dim})"
        xp = check_input(where, idx, ndim=1, layout="(N,)")
        backend.get_namespace(idx, self.weight.data, where=where)
        if not xp.isdtype(idx.dtype, "integral"):
            raise TypeError(
                f"{where}: expected integer indices, got {backend.dtype_name(idx.dtype)}"
            )
        # reading values would stall a GPU stream: on device arrays the entry points
        # (pipelines.generate, the Trainer) check labels before they reach the model
        if (
            idx.shape[0]
            and backend.on_host(idx)
            and (int(xp.min(idx)) < 0 or int(xp.max(idx)) >= self.num_embeddings)
        ):
            raise ValueError(
                f"{where}: expected indices in [0, {self.num_embeddings}), got values in "
                f"[{int(xp.min(idx))}, {int(xp.max(idx))}]"
            )
        y, cache = F.embedding_forward(self.weight.data, idx)
        self._save(cache)
        return y

    def backward(self, grad_output: Any) -> Any:
        self.weight.accumulate(F.embedding_backward(self._take(), grad_output))
        return None


class MSELoss(Module):
    """Mean squared error; ``forward(pred, target)`` returns a 0-D array, ``backward()``
    the gradient of the prediction (scaled by ``grad_output``, default 1)."""

    def forward(self, pred: Any, target: Any) -> Any:
        loss, grad = F.mse_loss(pred, target)
        self._save(grad)
        return loss

    def backward(self, grad_output: Any = 1.0) -> Any:
        return self._take() * grad_output
