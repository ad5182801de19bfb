"""Composite layers of diffusers' UNet: embeddings, attention, resampling, residual blocks.

Names of children are diffusers' (``time_embedding.linear_1``, ``attentions.0.to_q``,
``upsamplers.0.conv``, ``resnets.0.norm1``...) so state dicts exchange 1:1.
Constructors check their arguments as the layers of ``xpdiff.nn.layers`` do, group
counts dividing channel counts included.
"""

from __future__ import annotations

import math
from typing import Any

from .. import _validation as _v
from .. import backend
from .. import functional as F
from ._checks import check_input
from .layers import (
    Conv2d,
    Dropout,
    GroupNorm,
    Linear,
    SiLU,
    _channel_axis,
    _check_layout,
    _layout_text,
)
from .module import Module, ModuleList

__all__ = [
    "Attention",
    "Downsample2D",
    "ResnetBlock2D",
    "TimestepEmbedding",
    "Timesteps",
    "Upsample2D",
]


class Timesteps(Module):
    """Sinusoidal embedding (N, num_channels) of integer or float timesteps (N,).

    It has no parameters and its input needs no gradient: ``backward`` returns None.
    """

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        w = "Timesteps"
        num_channels = _v.check_int(w, "num_channels", num_channels, min=1)
        flip_sin_to_cos = _v.check_bool(w, "flip_sin_to_cos", flip_sin_to_cos)
        downscale_freq_shift = _v.check_float(w, "downscale_freq_shift", downscale_freq_shift)
        half = num_channels // 2  # the frequencies divide by (half - downscale_freq_shift)
        if half and downscale_freq_shift == half:
            raise _v.ArgumentError(
                f"{w}: expected downscale_freq_shift to differ from "
                f"num_channels // 2 = {half}, got {downscale_freq_shift}"
            )
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: Any, dtype: Any = None) -> Any:
        check_input("Timesteps", timesteps, ndim=1, layout="(N,)")
        return F.timestep_embedding(
            timesteps,
            self.num_channels,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
            dtype=dtype,
        )

    def backward(self, grad_output: Any) -> None:
        return None


class TimestepEmbedding(Module):
    """``linear_2(silu(linear_1(x)))``: (N, in_channels) -> (N, time_embed_dim)."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        *,
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        w = "TimestepEmbedding"
        in_channels = _v.check_int(w, "in_channels", in_channels, min=1)
        time_embed_dim = _v.check_int(w, "time_embed_dim", time_embed_dim, min=1)
        dtype = _v.check_dtype(w, dtype, xp)
        if act_fn != "silu":
            raise ValueError(f"TimestepEmbedding: only act_fn='silu' is supported, got {act_fn!r}")
        self.linear_1 = Linear(in_channels, time_embed_dim, dtype=dtype, xp=xp)
        self.act = SiLU()
        self.linear_2 = Linear(time_embed_dim, time_embed_dim, dtype=dtype, xp=xp)

    def forward(self, x: Any) -> Any:
        return self.linear_2(self.act(self.linear_1(x)))

    def backward(self, grad_output: Any) -> Any:
        return self.linear_1.backward(self.act.backward(self.linear_2.backward(grad_output)))


class Attention(Module):
    """Spatial self-attention with a residual connection, as diffusers' UNet blocks use it.

    x (B, C, H, W) -> group_norm -> tokens (B, H*W, C) -> to_q/to_k/to_v (C -> heads*d)
    -> softmax(q k^T / sqrt(d)) v per head -> to_out.0 (heads*d -> C) -> back to
    (B, C, H, W) -> ``(out + x) / rescale_output_factor``.  With ``layout="NHWC"`` x is
    (B, H, W, C), whose reshape to tokens and back costs no copy.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int = 8,
        dim_head: int = 64,
        *,
        rescale_output_factor: float = 1.0,
        eps: float = 1e-5,
        norm_num_groups: int | None = 32,
        residual_connection: bool = True,
        bias: bool = True,
        layout: str = "NCHW",
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        w = "Attention"
        query_dim = _v.check_int(w, "query_dim", query_dim, min=1)
        heads = _v.check_int(w, "heads", heads, min=1)
        dim_head = _v.check_int(w, "dim_head", dim_head, min=1)
        rescale_output_factor = _v.check_float(
            w, "rescale_output_factor", rescale_output_factor, min=0.0, min_open=True
        )
        eps = _v.check_float(w, "eps", eps, min=0.0, min_open=True)
        norm_num_groups = _v.check_int(w, "norm_num_groups", norm_num_groups, min=1, none=True)
        if norm_num_groups is not None and query_dim % norm_num_groups:
            raise _v.ArgumentError(
                f"{w}: expected norm_num_groups to divide "
                f"query_dim={query_dim}, got {norm_num_groups}"
            )
        residual_connection = _v.check_bool(w, "residual_connection", residual_connection)
        bias = _v.check_bool(w, "bias", bias)
        dtype = _v.check_dtype(w, dtype, xp)
        _check_layout(w, layout)
        self.layout = layout
        inner = heads * dim_head
        self.query_dim, self.heads, self.dim_head = query_dim, heads, dim_head
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        self.scale = 1.0 / math.sqrt(dim_head)
        self.group_norm = (
            GroupNorm(norm_num_groups, query_dim, eps=eps, layout=layout, dtype=dtype, xp=xp)
            if norm_num_groups is not None
            else None
        )
        self.to_q = Linear(query_dim, inner, bias=bias, dtype=dtype, xp=xp)
        self.to_k = Linear(query_dim, inner, bias=bias, dtype=dtype, xp=xp)
        self.to_v = Linear(query_dim, inner, bias=bias, dtype=dtype, xp=xp)
        self.to_out = ModuleList(
            [Linear(inner, query_dim, bias=True, dtype=dtype, xp=xp), Dropout(0.0)]
        )

    def _tokens(self, xp: Any, h: Any) -> Any:
        """(B, C, H, W) or (B, H, W, C) -> (B, H*W, C)."""
        B, C = h.shape[0], self.query_dim
        if self.layout == "NHWC":
            return xp.reshape(h, (B, -1, C))
        return xp.permute_dims(xp.reshape(h, (B, C, -1)), (0, 2, 1))

    def _image(self, xp: Any, t: Any, shape: tuple) -> Any:
        """(B, H*W, C) tokens -> an array of ``shape`` in this layer's layout."""
        if self.layout == "NHWC":
            return xp.reshape(t, shape)
        return xp.reshape(xp.permute_dims(t, (0, 2, 1)), shape)

    def _split(self, xp: Any, t: Any) -> Any:
        """(B, N, heads*d) -> (B, N, heads, d), a free reshape."""
        B, N, _ = t.shape
        return xp.reshape(t, (B, N, self.heads, self.dim_head))

    def _merge(self, xp: Any, t: Any) -> Any:
        B, N, h, d = t.shape
        return xp.reshape(t, (B, N, h * d))

    def forward(self, x: Any) -> Any:
        where = f"Attention({self.query_dim} channels, {self.heads} heads)"
        xp = check_input(
            where,
            x,
            like=self.to_q.weight.data,
            ndim=4,
            size=self.query_dim,
            axis=_channel_axis(self.layout),
            layout=_layout_text(self.layout),
        )
        h = self.group_norm(x) if self.group_norm is not None else x
        tokens = self._tokens(xp, h)
        q = self._split(xp, self.to_q(tokens))
        k = self._split(xp, self.to_k(tokens))
        v = self._split(xp, self.to_v(tokens))
        o, cache = F.sdpa_forward(q, k, v, self.scale)
        self._save(cache)
        out = self._image(xp, self.to_out[0](self._merge(xp, o)), tuple(x.shape))
        if self.residual_connection:
            out = out + x
        f = self.rescale_output_factor
        return out if f == 1.0 else out / f  # x / 1.0 == x: skip the pass

    def backward(self, grad_output: Any) -> Any:
        xp = backend.get_namespace(grad_output)
        cache = self._take()
        shape = tuple(grad_output.shape)
        f = self.rescale_output_factor
        g = grad_output if f == 1.0 else grad_output / f
        go = self._split(xp, self.to_out[0].backward(self._tokens(xp, g)))
        gq, gk, gv = F.sdpa_backward(cache, go)
        gt = self.to_q.backward(self._merge(xp, gq))
        gt += self.to_k.backward(self._merge(xp, gk))  # gt is a fresh product
        gt += self.to_v.backward(self._merge(xp, gv))
        gh = self._image(xp, gt, shape)
        gx = self.group_norm.backward(gh) if self.group_norm is not None else gh
        return gx + g if self.residual_connection else gx


class Upsample2D(Module):
    """Nearest upsampling x2 (or to an explicit ``output_size``) followed by a 3x3 conv."""

    def __init__(
        self,
        channels: int,
        use_conv: bool = True,
        out_channels: int | None = None,
        *,
        layout: str = "NCHW",
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        w = "Upsample2D"
        channels = _v.check_int(w, "channels", channels, min=1)
        use_conv = _v.check_bool(w, "use_conv", use_conv)
        out_channels = _v.check_int(w, "out_channels", out_channels, min=1, none=True)
        dtype = _v.check_dtype(w, dtype, xp)
        _check_layout(w, layout)
        self.channels, self.layout = channels, layout
        out_channels = out_channels or channels
        self.conv = (
            Conv2d(channels, out_channels, 3, padding=1, layout=layout, dtype=dtype, xp=xp)
            if use_conv
            else None
        )

    def forward(self, x: Any, output_size: tuple[int, int] | None = None) -> Any:
        check_input(
            f"Upsample2D({self.channels})",
            x,
            ndim=4,
            size=self.channels,
            axis=_channel_axis(self.layout),
            layout=_layout_text(self.layout),
        )
        H, W = (x.shape[1], x.shape[2]) if self.layout == "NHWC" else (x.shape[2], x.shape[3])
        size = output_size or (2 * H, 2 * W)
        y, cache = F.upsample_nearest_forward(x, tuple(size), self.layout)
        self._save(cache)
        return self.conv(y) if self.conv is not None else y

    def backward(self, grad_output: Any) -> Any:
        g = self.conv.backward(grad_output) if self.conv is not None else grad_output
        return F.upsample_nearest_backward(self._take(), g)


class Downsample2D(Module):
    """3x3 convolution with stride 2: (B, C, H, W) -> (B, O, ceil(H/2), ceil(W/2)).

    ``padding=1`` pads one zero on every side; ``padding=0`` pads one zero row at the
    bottom and one zero column at the right only, as diffusers does.
    """

    def __init__(
        self,
        channels: int,
        use_conv: bool = True,
        out_channels: int | None = None,
        padding: int = 1,
        *,
        layout: str = "NCHW",
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        w = "Downsample2D"
        channels = _v.check_int(w, "channels", channels, min=1)
        use_conv = _v.check_bool(w, "use_conv", use_conv)
        out_channels = _v.check_int(w, "out_channels", out_channels, min=1, none=True)
        padding = _v.check_int(w, "padding", padding, min=0)
        dtype = _v.check_dtype(w, dtype, xp)
        _check_layout(w, layout)
        if not use_conv:
            raise ValueError("Downsample2D: only use_conv=True (a strided conv) is supported")
        if padding not in (0, 1):
            raise ValueError(f"Downsample2D: only padding 0 or 1 is supported, got {padding}")
        self.padding, self.layout = padding, layout
        self.conv = Conv2d(
            channels,
            out_channels or channels,
            3,
            stride=2,
            padding=padding,
            layout=layout,
            dtype=dtype,
            xp=xp,
        )

    def _spatial_axes(self) -> tuple[int, int]:
        return (1, 2) if self.layout == "NHWC" else (2, 3)

    def forward(self, x: Any) -> Any:
        if self.padding == 0:
            # diffusers' padding=0 (the original DDPM ports): one zero row at the bottom and
            # one zero column at the right, (0, 1, 0, 1), then the unpadded strided conv
            xp = backend.get_namespace(x)
            for axis in self._spatial_axes():
                shape = list(x.shape)
                shape[axis] = 1
                zeros = xp.zeros(tuple(shape), dtype=x.dtype, device=backend.device(x))
                x = xp.concat([x, zeros], axis=axis)
        return self.conv(x)

    def backward(self, grad_output: Any) -> Any:
        g = self.conv.backward(grad_output)
        if self.padding == 0:  # drop the gradient of the padded row and column
            h, w = self._spatial_axes()
            index = [slice(None)] * 4
            index[h] = slice(0, g.shape[h] - 1)
            index[w] = slice(0, g.shape[w] - 1)
            g = g[tuple(index)]
        return g


class ResnetBlock2D(Module):
    """diffusers' residual block with a time embedding (``time_embedding_norm="default"``).

    h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))[:, :, None, None]
    h = conv2(silu(norm2(h)));  out = (shortcut(x) + h) / output_scale_factor
    where shortcut is a 1x1 ``conv_shortcut`` when the channel count changes.

    ``forward(x, temb)`` with x (B, C, H, W) (or (B, H, W, C) with ``layout="NHWC"``)
    and temb (B, temb_channels); ``backward(g)`` returns ``(gx, gtemb)``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "silu",
        output_scale_factor: float = 1.0,
        dropout: float = 0.0,
        layout: str = "NCHW",
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        w = "ResnetBlock2D"
        in_channels = _v.check_int(w, "in_channels", in_channels, min=1)
        out_channels = _v.check_int(w, "out_channels", out_channels, min=1, none=True)
        temb_channels = _v.check_int(w, "temb_channels", temb_channels, min=1, none=True)
        groups = _v.check_int(w, "groups", groups, min=1)
        groups_out = _v.check_int(w, "groups_out", groups_out, min=1, none=True)
        eps = _v.check_float(w, "eps", eps, min=0.0, min_open=True)
        output_scale_factor = _v.check_float(
            w, "output_scale_factor", output_scale_factor, min=0.0, min_open=True
        )
        dropout = _v.check_float(w, "dropout", dropout, min=0.0, max=1.0)
        dtype = _v.check_dtype(w, dtype, xp)
        for key, g, key_c, c in (
            ("groups", groups, "in_channels", in_channels),
            (
                "groups_out" if groups_out else "groups",
                groups_out or groups,
                "out_channels",
                out_channels or in_channels,
            ),
        ):
            if c % g:
                raise _v.ArgumentError(f"{w}: expected {key} to divide {key_c}={c}, got {g}")
        if non_linearity != "silu":
            raise ValueError(
                f"ResnetBlock2D: only non_linearity='silu' is supported, got {non_linearity!r}"
            )
        out_channels = out_channels or in_channels
        groups_out = groups_out or groups
        self.in_channels, self.out_channels = in_channels, out_channels
        self.output_scale_factor = output_scale_factor
        _check_layout("ResnetBlock2D", layout)
        self.layout = layout
        kw = {"dtype": dtype, "xp": xp}
        lkw = {"layout": layout, **kw}
        # each norm is fused with the SiLU after it (GroupNorm(activation="silu"))
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, activation="silu", **lkw)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, **lkw)
        self.time_emb_proj = Linear(temb_channels, out_channels, **kw) if temb_channels else None
        self.norm2 = GroupNorm(groups_out, out_channels, eps=eps, activation="silu", **lkw)
        self.dropout = Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, **lkw)
        self._act_t = SiLU()
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, **lkw) if in_channels != out_channels else None
        )

    def forward(self, x: Any, temb: Any | None) -> Any:
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D: this block has time_emb_proj; temb is required")
            t = self.time_emb_proj(self._act_t(temb))
            h += t[:, None, None, :] if self.layout == "NHWC" else t[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        h += self.conv_shortcut(x) if self.conv_shortcut is not None else x
        f = self.output_scale_factor
        return h if f == 1.0 else h / f  # x / 1.0 == x: skip the pass

    def backward(self, grad_output: Any) -> tuple[Any, Any | None]:
        xp = backend.get_namespace(grad_output)
        f = self.output_scale_factor
        g = grad_output if f == 1.0 else grad_output / f
        gsc = self.conv_shortcut.backward(g) if self.conv_shortcut is not None else g
        gh = self.norm2.backward(self.dropout.backward(self.conv2.backward(g)))
        gtemb = None
        if self.time_emb_proj is not None:
            gt = xp.sum(gh, axis=(1, 2) if self.layout == "NHWC" else (2, 3))
            gtemb = self._act_t.backward(self.time_emb_proj.backward(gt))
        gx = self.norm1.backward(self.conv1.backward(gh))
        gx += gsc  # gx is a fresh array
        return gx, gtemb
