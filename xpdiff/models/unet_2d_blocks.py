"""UNet blocks of diffusers' UNet2DModel, built from their type strings.

Down blocks return ``(hidden_states, output_states)``: every resnet (and
attention) output plus the downsampler's, which the up path concatenates back.
Their ``backward(grad_hidden, grad_states)`` takes the gradient of both and
returns ``(grad_input, grad_temb)``.  Up blocks consume those states in reverse
and their ``backward`` splits each concatenated gradient into the part for the
running hidden state and the part for the skip state.
"""

from __future__ import annotations

from typing import Any

from .. import _validation as _v
from .. import backend
from ..nn.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from ..nn.module import Module, ModuleList

__all__ = [
    "AttnDownBlock2D",
    "AttnUpBlock2D",
    "DownBlock2D",
    "UNetMidBlock2D",
    "UpBlock2D",
    "get_down_block",
    "get_up_block",
]


def _attention(
    channels: int, head_dim: int | None, groups: int | None, eps: float, scale: float, kw: dict
) -> Attention:
    head_dim = head_dim or channels
    if channels % head_dim:
        raise ValueError(
            f"Attention: attention_head_dim must divide the channel count, got "
            f"attention_head_dim={head_dim} for {channels} channels"
        )
    return Attention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        rescale_output_factor=scale,
        eps=eps,
        norm_num_groups=groups,
        **kw,
    )


def _check_block(where: str, num_layers: Any, flag: str, value: Any) -> tuple[int, bool]:
    """``num_layers`` and the block's boolean (``add_downsample``...); the resnets and
    attentions check the other arguments."""
    return (_v.check_int(where, "num_layers", num_layers, min=1), _v.check_bool(where, flag, value))


def _add_temb(acc: Any, g: Any) -> Any:
    if g is None:
        return acc
    return g if acc is None else acc + g


class _Stack(Module):
    """Resnets, each optionally followed by self-attention: the body of down and up blocks."""

    _with_attention = False

    def _build(
        self,
        resnet_in: list[int],
        out_channels: int,
        temb_channels: int,
        eps: float,
        groups: int,
        head_dim: int | None,
        scale: float,
        kw: dict,
    ) -> None:
        self.resnets = ModuleList(
            [
                ResnetBlock2D(
                    in_channels=c,
                    out_channels=out_channels,
                    temb_channels=temb_channels,
                    eps=eps,
                    groups=groups,
                    output_scale_factor=scale,
                    **kw,
                )
                for c in resnet_in
            ]
        )
        if self._with_attention:
            self.attentions = ModuleList(
                [_attention(out_channels, head_dim, groups, eps, scale, kw) for _ in resnet_in]
            )

    def _layers(self) -> list[tuple[ResnetBlock2D, Attention | None]]:
        attns = list(self.attentions) if self._with_attention else [None] * len(self.resnets)
        return list(zip(self.resnets, attns, strict=True))


class _DownBlock(_Stack):
    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        attention_head_dim: int | None = None,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        layout: str = "NCHW",
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        num_layers, add_downsample = _check_block(
            type(self).__name__, num_layers, "add_downsample", add_downsample
        )
        self.layout = layout
        kw = {"layout": layout, "dtype": dtype, "xp": xp}
        self._build(
            [in_channels] + [out_channels] * (num_layers - 1),
            out_channels,
            temb_channels,
            resnet_eps,
            resnet_groups,
            attention_head_dim,
            output_scale_factor,
            kw,
        )
        self.downsamplers = (
            ModuleList(
                [
                    Downsample2D(
                        out_channels, out_channels=out_channels, padding=downsample_padding, **kw
                    )
                ]
            )
            if add_downsample
            else None
        )

    def forward(self, hidden_states: Any, temb: Any) -> tuple[Any, tuple]:
        h = hidden_states
        states = []
        for resnet, attn in self._layers():
            h = resnet(h, temb)
            if attn is not None:
                h = attn(h)
            states.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            states.append(h)
        return h, tuple(states)

    def backward(self, grad_hidden: Any, grad_states: list) -> tuple[Any, Any]:
        """Gradients ``(grad_input, grad_temb)`` from the hidden output and each state."""
        grad_states = list(grad_states)
        g = grad_hidden
        gtemb = None
        if self.downsamplers is not None:
            g = self.downsamplers[0].backward(g + grad_states.pop())
        else:
            g = g + grad_states.pop()
            grad_states.append(None)
        for resnet, attn in reversed(self._layers()):
            gs = grad_states.pop()
            if gs is not None:
                g = g + gs
            if attn is not None:
                g = attn.backward(g)
            g, gt = resnet.backward(g)
            gtemb = _add_temb(gtemb, gt)
        return g, gtemb


class DownBlock2D(_DownBlock):
    """Resnets, then a stride-2 conv (``downsamplers.0``) unless it is the last level."""


class AttnDownBlock2D(_DownBlock):
    """Resnets each followed by self-attention, then an optional stride-2 conv."""

    _with_attention = True


class _UpBlock(_Stack):
    def __init__(
        self,
        *,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        attention_head_dim: int | None = None,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        layout: str = "NCHW",
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        num_layers, add_upsample = _check_block(
            type(self).__name__, num_layers, "add_upsample", add_upsample
        )
        self.layout = layout
        kw = {"layout": layout, "dtype": dtype, "xp": xp}
        self.skip_channels = [
            in_channels if i == num_layers - 1 else out_channels for i in range(num_layers)
        ]
        self.hidden_channels = [
            prev_output_channel if i == 0 else out_channels for i in range(num_layers)
        ]
        self._build(
            [h + k for h, k in zip(self.hidden_channels, self.skip_channels, strict=True)],
            out_channels,
            temb_channels,
            resnet_eps,
            resnet_groups,
            attention_head_dim,
            output_scale_factor,
            kw,
        )
        self.upsamplers = (
            ModuleList([Upsample2D(out_channels, out_channels=out_channels, **kw)])
            if add_upsample
            else None
        )

    def forward(
        self,
        hidden_states: Any,
        res_hidden_states_tuple: tuple,
        temb: Any,
        upsample_size: tuple[int, int] | None = None,
    ) -> Any:
        xp = backend.get_namespace(hidden_states)
        res = list(res_hidden_states_tuple)
        h = hidden_states
        for resnet, attn in self._layers():
            h = xp.concat([h, res.pop()], axis=-1 if self.layout == "NHWC" else 1)
            h = resnet(h, temb)
            if attn is not None:
                h = attn(h)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h

    def backward(self, grad_output: Any) -> tuple[Any, list, Any]:
        """Returns ``(grad_hidden_input, grad_res_states, grad_temb)``; the state gradients
        are in the order of ``res_hidden_states_tuple``."""
        g = grad_output
        if self.upsamplers is not None:
            g = self.upsamplers[0].backward(g)
        gtemb = None
        grad_res = []
        for i in reversed(range(len(self.resnets))):
            resnet, attn = self._layers()[i]
            if attn is not None:
                g = attn.backward(g)
            gcat, gt = resnet.backward(g)
            gtemb = _add_temb(gtemb, gt)
            ch = self.hidden_channels[i]
            if self.layout == "NHWC":
                g, gs = gcat[..., :ch], gcat[..., ch:]
            else:
                g, gs = gcat[:, :ch, ...], gcat[:, ch:, ...]
            grad_res.append(gs)
        # resnet i consumed res[-1 - i]; grad_res was filled from the last resnet back
        return g, grad_res, gtemb


class UpBlock2D(_UpBlock):
    """Resnets over [hidden, skip] concatenations, then nearest upsampling + conv."""


class AttnUpBlock2D(_UpBlock):
    """As UpBlock2D with self-attention after each resnet."""

    _with_attention = True


class UNetMidBlock2D(Module):
    """resnets.0, then (attentions.i, resnets.i+1) pairs; all at the lowest resolution."""

    def __init__(
        self,
        *,
        in_channels: int,
        temb_channels: int,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        attn_groups: int | None = None,
        num_layers: int = 1,
        attention_head_dim: int | None = None,
        output_scale_factor: float = 1.0,
        add_attention: bool = True,
        layout: str = "NCHW",
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        num_layers, add_attention = _check_block(
            "UNetMidBlock2D", num_layers, "add_attention", add_attention
        )
        kw = {"layout": layout, "dtype": dtype, "xp": xp}
        attn_groups = resnet_groups if attn_groups is None else attn_groups
        self.add_attention = add_attention
        self.resnets = ModuleList(
            [
                ResnetBlock2D(
                    in_channels=in_channels,
                    out_channels=in_channels,
                    temb_channels=temb_channels,
                    eps=resnet_eps,
                    groups=resnet_groups,
                    output_scale_factor=output_scale_factor,
                    **kw,
                )
                for _ in range(num_layers + 1)
            ]
        )
        if add_attention:
            self.attentions = ModuleList(
                [
                    _attention(
                        in_channels,
                        attention_head_dim,
                        attn_groups,
                        resnet_eps,
                        output_scale_factor,
                        kw,
                    )
                    for _ in range(num_layers)
                ]
            )

    def forward(self, hidden_states: Any, temb: Any) -> Any:
        h = self.resnets[0](hidden_states, temb)
        for i in range(1, len(self.resnets)):
            if self.add_attention:
                h = self.attentions[i - 1](h)
            h = self.resnets[i](h, temb)
        return h

    def backward(self, grad_output: Any) -> tuple[Any, Any]:
        g, gtemb = grad_output, None
        for i in reversed(range(1, len(self.resnets))):
            g, gt = self.resnets[i].backward(g)
            gtemb = _add_temb(gtemb, gt)
            if self.add_attention:
                g = self.attentions[i - 1].backward(g)
        g, gt = self.resnets[0].backward(g)
        return g, _add_temb(gtemb, gt)


_DOWN = {"DownBlock2D": DownBlock2D, "AttnDownBlock2D": AttnDownBlock2D}
_UP = {"UpBlock2D": UpBlock2D, "AttnUpBlock2D": AttnUpBlock2D}


def get_down_block(block_type: str, **kwargs: Any) -> _DownBlock:
    """Build a down block from its diffusers type string."""
    if block_type not in _DOWN:
        raise ValueError(f"get_down_block: expected one of {sorted(_DOWN)}, got {block_type!r}")
    return _DOWN[block_type](**kwargs)


def get_up_block(block_type: str, **kwargs: Any) -> _UpBlock:
    """Build an up block from its diffusers type string."""
    if block_type not in _UP:
        raise ValueError(f"get_up_block: expected one of {sorted(_UP)}, got {block_type!r}")
    return _UP[block_type](**kwargs)
