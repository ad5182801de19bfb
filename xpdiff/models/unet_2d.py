"""UNet2DModel: diffusers' UNet2DModel with hand-derived backward.

Same constructor arguments, defaults, module names and parameter shapes as
diffusers, so checkpoints exchange both ways (``xpdiff.io``).  Any spatial size
works: each upsampler goes to the size of the skip state it meets next, so a
14x14 input with three levels (14 -> 7 -> 4 -> 7 -> 14) is fine.
"""

from __future__ import annotations

import numbers
import operator
import os
import re
import warnings
from pathlib import Path
from typing import Any, ClassVar

from .. import _validation as _v
from .. import backend, io
from ..configuration import ConfigMixin, register_to_config
from ..functional.conv import to_channels_first, to_channels_last
from ..nn._checks import check_input
from ..nn.blocks import TimestepEmbedding, Timesteps
from ..nn.layers import Conv2d, Embedding, GroupNorm
from ..nn.module import Module, ModuleList, is_grad_enabled
from .unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block

__all__ = ["UNet2DModel"]

# Every layer inside works on channels-last (B, H, W, C) arrays: the im2col column matrix
# is then a copy of C-long contiguous runs, and attention's tokens a free reshape.  forward
# and backward convert at entry and exit, so the public API stays (B, C, H, W).
_LAYOUT = "NHWC"

_SUPPORTED = {
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D", None),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu",),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
}


class UNet2DModel(Module, ConfigMixin):
    """A 2-D UNet predicting noise (or v / x0) from a noisy sample, timestep and class label.

    Args: as diffusers' ``UNet2DModel`` (see ``config``), plus ``dtype``
    (``"float32"`` default, or ``"float64"``) and ``xp`` (the array namespace;
    default: the backend chosen by ``xpdiff.set_backend``), which are not part
    of the saved config.  Unsupported argument values raise ``ValueError``.

    ``dropout > 0`` (the original DDPM checkpoints use 0.1) is accepted: dropout is
    the identity at inference, so such a model samples as diffusers' does; training
    it (a forward with gradients enabled) is refused, dropout's backward not being
    implemented.  ``downsample_padding=0`` pads (0, 1, 0, 1) before each strided conv.
    """

    config_name: ClassVar[str] = io.CONFIG_NAME
    _config_exclude: ClassVar[tuple[str, ...]] = ("dtype", "xp")

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = (
            "DownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = (
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "UpBlock2D",
        ),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
        *,
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        args = {**self.config, "dtype": dtype, "xp": xp}
        for key, allowed in _SUPPORTED.items():
            if args[key] not in allowed:
                raise ValueError(f"UNet2DModel: {key} must be one of {allowed}, got {args[key]!r}")
        self._update_config(**_checked_args(args))
        cfg = self.config
        in_channels, out_channels = cfg["in_channels"], cfg["out_channels"]
        time_embedding_dim, freq_shift = cfg["time_embedding_dim"], cfg["freq_shift"]
        block_out_channels, layers_per_block = cfg["block_out_channels"], cfg["layers_per_block"]
        mid_block_scale_factor, norm_eps = cfg["mid_block_scale_factor"], cfg["norm_eps"]
        attention_head_dim, num_class_embeds = cfg["attention_head_dim"], cfg["num_class_embeds"]
        if len(down_block_types) != len(up_block_types):
            raise ValueError(
                f"UNet2DModel: down_block_types and up_block_types must have one length, got "
                f"{len(down_block_types)} and {len(up_block_types)}"
            )
        if len(block_out_channels) != len(down_block_types):
            raise ValueError(
                f"UNet2DModel: block_out_channels and down_block_types must have one length, got "
                f"{len(block_out_channels)} and {len(down_block_types)}"
            )
        xp = backend.default_namespace() if xp is None else xp
        kw = {"layout": _LAYOUT, "dtype": dtype, "xp": xp}
        ch = list(block_out_channels)
        time_embed_dim = time_embedding_dim or ch[0] * 4

        # 1. time and class embeddings
        self.conv_in = Conv2d(in_channels, ch[0], 3, padding=1, **kw)
        self.time_proj = Timesteps(ch[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], time_embed_dim, dtype=dtype, xp=xp)
        self.class_embedding = (
            Embedding(num_class_embeds, time_embed_dim, dtype=dtype, xp=xp)
            if num_class_embeds
            else None
        )

        # 2. down path
        self.down_blocks = ModuleList()
        out = ch[0]
        for i, block_type in enumerate(down_block_types):
            inp, out = out, ch[i]
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    in_channels=inp,
                    out_channels=out,
                    temb_channels=time_embed_dim,
                    num_layers=layers_per_block,
                    resnet_eps=norm_eps,
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim or out,
                    add_downsample=i < len(ch) - 1,
                    downsample_padding=downsample_padding,
                    **kw,
                )
            )

        # 3. middle
        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                in_channels=ch[-1],
                temb_channels=time_embed_dim,
                resnet_eps=norm_eps,
                resnet_groups=norm_num_groups,
                attn_groups=attn_norm_num_groups,
                attention_head_dim=attention_head_dim or ch[-1],
                output_scale_factor=mid_block_scale_factor,
                add_attention=add_attention,
                **kw,
            )

        # 4. up path
        self.up_blocks = ModuleList()
        rev = ch[::-1]
        out = rev[0]
        for i, block_type in enumerate(up_block_types):
            prev, out = out, rev[i]
            inp = rev[min(i + 1, len(ch) - 1)]
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    in_channels=inp,
                    prev_output_channel=prev,
                    out_channels=out,
                    temb_channels=time_embed_dim,
                    num_layers=layers_per_block + 1,
                    resnet_eps=norm_eps,
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim or out,
                    add_upsample=i < len(ch) - 1,
                    **kw,
                )
            )

        # 5. output
        # conv_norm_out carries the SiLU (diffusers' separate conv_act has no parameters)
        self.conv_norm_out = GroupNorm(
            norm_num_groups, ch[0], eps=norm_eps, activation="silu", **kw
        )
        self.conv_out = Conv2d(ch[0], out_channels, 3, padding=1, **kw)

    # ------------------------------------------------------------------
    def _timesteps(self, timestep: Any, batch: int, xp: Any, dev: Any) -> Any:
        """``timestep`` as a (B,) array of the model's namespace: a Python or NumPy number,
        a list of those, or an array (0-d or (1,) or (B,)) of any namespace; integer or
        real.  Also where a model with dropout refuses to train (see the class)."""
        if self.config["dropout"] > 0 and is_grad_enabled():
            raise ValueError(
                f"UNet2DModel: dropout={self.config['dropout']} is only supported at inference "
                f"(dropout is the identity there); training with dropout is not implemented: "
                f"run under xpdiff.no_grad(), or build the model with dropout=0.0"
            )

        def number(v: Any) -> int | float:
            return _timestep_number(v, timestep)

        def own(a: Any) -> bool:  # an array of the model's namespace and device?
            return _of_namespace(a, self.conv_in.weight.data, xp, dev)

        if isinstance(timestep, (list, tuple)):
            values = [number(v) for v in timestep]
            ints = all(isinstance(v, int) for v in values)
            t = backend.asarray(values, xp, dtype=xp.int64 if ints else xp.float32, device=dev)
        elif not hasattr(timestep, "shape") or (tuple(timestep.shape) == () and not own(timestep)):
            v = number(timestep)
            t = xp.full(
                (batch,), v, device=dev, dtype=xp.int64 if isinstance(v, int) else xp.float32
            )
        else:
            t = timestep if own(timestep) else backend.asarray(timestep, xp, device=dev)
        if t.ndim == 0:
            t = xp.broadcast_to(t[None], (batch,))
        elif t.ndim != 1 or t.shape[0] not in (1, batch):
            raise ValueError(
                f"UNet2DModel: expected timestep as a scalar or shape ({batch},), "
                f"got shape {tuple(t.shape)}"
            )
        elif t.shape[0] == 1:
            t = xp.broadcast_to(t, (batch,))
        if not (xp.isdtype(t.dtype, "integral") or xp.isdtype(t.dtype, "real floating")):
            raise TypeError(
                f"UNet2DModel: expected integer or real timesteps, got dtype "
                f"{backend.dtype_name(t.dtype)}"
            )
        if not backend.on_host(t):  # no device read in a CuPy forward; entry points check
            return t
        lo, hi = float(xp.min(t)), float(xp.max(t))
        limit = self.config["num_train_timesteps"]
        if lo < 0 or (limit is not None and hi >= limit) or not hi < float("inf"):
            upper = f", {limit})" if limit is not None else ", inf)"
            raise ValueError(
                f"UNet2DModel: expected timesteps in [0{upper}, got values in [{lo}, {hi}]"
            )
        return t

    def forward(self, sample: Any, timestep: Any, class_labels: Any = None) -> Any:
        """Predict from ``sample`` (B, in_channels, H, W) at ``timestep`` (scalar or (B,)).

        ``class_labels`` (B,) integers are required when ``num_class_embeds`` is set.
        Returns (B, out_channels, H, W) in the model's dtype.
        """
        cfg = self.config
        xp = check_input(
            "UNet2DModel",
            sample,
            like=self.conv_in.weight.data,
            ndim=4,
            size=cfg["in_channels"],
            layout="(B, C, H, W)",
        )
        B = sample.shape[0]
        dev = backend.device(sample)
        if cfg["center_input_sample"]:
            sample = 2 * sample - 1.0

        # 1. time (+ class) embedding
        t = self._timesteps(timestep, B, xp, dev)
        emb = self.time_embedding(self.time_proj(t, dtype=sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(
                    f"UNet2DModel: class_labels of shape ({B},) are required: the model has "
                    f"num_class_embeds={cfg['num_class_embeds']}"
                )
            if tuple(getattr(class_labels, "shape", ())) != (B,):
                raise ValueError(
                    f"UNet2DModel: expected class_labels of shape ({B},), got "
                    f"{tuple(getattr(class_labels, 'shape', ()))}"
                )
            emb = emb + self.class_embedding(class_labels)
        elif class_labels is not None:
            raise ValueError(
                "UNet2DModel: class_labels given but the model has no class "
                "embedding (num_class_embeds is None)"
            )

        # 2. pre-process, channels-last from here on
        h = self.conv_in(to_channels_last(sample))

        # 3. down
        res = [h]
        for block in self.down_blocks:
            h, states = block(h, emb)
            res.extend(states)

        # 4. mid
        if self.mid_block is not None:
            h = self.mid_block(h, emb)

        # 5. up: each block takes as many skip states as it has resnets
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, res = res[-n:], res[:-n]
            size = tuple(res[-1].shape[1:3]) if res and block.upsamplers is not None else None
            h = block(h, skips, emb, size)

        # 6. post-process, back to (B, C, H, W)
        return to_channels_first(self.conv_out(self.conv_norm_out(h)))

    def backward(self, grad_output: Any) -> Any:
        """Backpropagate ``grad_output`` (B, out_channels, H, W) through the whole UNet.

        Adds into every parameter's ``grad`` and returns the gradient of ``sample``.
        """
        g = to_channels_last(grad_output)
        g = self.conv_norm_out.backward(self.conv_out.backward(g))
        gemb = None

        # 5. up path, last block first; collect the skip-state gradients
        grad_res: list = []  # gradients of the down states, in the order they were made
        for block in reversed(list(self.up_blocks)):
            g, g_skips, gt = block.backward(g)
            gemb = gt if gemb is None else gemb + gt
            # later blocks consumed earlier states: append keeps grad_res in state order
            grad_res = grad_res + g_skips

        # 4. mid
        if self.mid_block is not None:
            g, gt = self.mid_block.backward(g)
            gemb = gemb + gt

        # 3. down path: states were appended block by block after conv_in's output
        for block in reversed(list(self.down_blocks)):
            n = len(block.resnets) + (1 if block.downsamplers is not None else 0)
            mine, grad_res = grad_res[-n:], grad_res[:-n]
            g, gt = block.backward(g, mine)
            gemb = gemb + gt

        # 2. conv_in: its output was also the first skip state
        g = g + grad_res[0]
        gsample = to_channels_first(self.conv_in.backward(g))
        if self.config["center_input_sample"]:
            gsample = 2 * gsample

        # 1. embeddings
        if self.class_embedding is not None:
            self.class_embedding.backward(gemb)
        self.time_embedding.backward(gemb)
        return gsample

    # -- files (diffusers' layout) ------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        variant: str | None = None,
        state_dict: dict[str, Any] | None = None,
    ) -> None:
        """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` (diffusers' layout;
        ``diffusion_pytorch_model.<variant>.safetensors`` with ``variant``), atomically.

        ``state_dict`` writes other weights of this model's names and shapes (EMA weights, say)
        instead of its own; ``ValueError`` names the missing and unexpected keys.

        Warns (``UserWarning``) when ``sample_size`` is not divisible by 2^(levels - 1):
        xpdiff runs such a model (each upsampler goes to its skip state's size), diffusers'
        UNet2DModel does not.
        """
        levels = len(self.config["block_out_channels"])
        size = self.config["sample_size"]
        sizes = [] if size is None else ([size] if isinstance(size, int) else list(size))
        factor = 2 ** (levels - 1)
        if any(s % factor for s in sizes):
            warnings.warn(
                f"UNet2DModel.save_pretrained: sample_size {size} is not divisible by "
                f"2^(levels - 1) = {factor}; xpdiff runs this model but diffusers' UNet2DModel "
                f"cannot (its upsampled and skip states differ in size)",
                stacklevel=2,
            )
        own = self.state_dict()
        if state_dict is None:
            state_dict = own
        elif set(state_dict) != set(own):
            raise ValueError(
                f"UNet2DModel.save_pretrained: state_dict keys differ from the model's: missing "
                f"{sorted(set(own) - set(state_dict))}, unexpected "
                f"{sorted(set(state_dict) - set(own))}"
            )
        directory = Path(save_directory)
        io.save_safetensors(
            dict(state_dict), directory / io.weights_name(variant), metadata={"format": "pt"}
        )
        self.save_config(directory)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        subfolder: str | None = None,
        *,
        variant: str | None = None,
        dtype: str = "float32",
        xp: Any = None,
        **overrides: Any,
    ) -> UNet2DModel:
        """Load a model saved by ``save_pretrained`` here or by diffusers.

        ``subfolder`` (``"unet"`` of a pipeline) is joined to ``path``; ``variant="fp16"``
        reads ``diffusion_pytorch_model.fp16.safetensors``.  float16 and bfloat16 weights are
        upcast to ``dtype``; older attention names (``query``, ``proj_attn``...) are converted.
        ``overrides`` replace config values.

        Raises:
            ValueError: unsupported config values; a directory with only pickle (``.bin``)
                weights, which are never loaded; a missing variant.
            KeyError: weights whose keys or shapes do not match (all of them listed).
        """
        directory = Path(path) / subfolder if subfolder else Path(path)
        model = cls.from_config(cls.load_config(directory), dtype=dtype, xp=xp, **overrides)
        state = io.load_weights(directory, variant, where=f"{cls.__name__}.from_pretrained")
        model.load_state_dict(convert_legacy_attention_keys(state))
        return model


def _checked_args(args: dict) -> dict:
    """Type and range of every numeric, boolean and list argument of ``UNet2DModel``;
    returns them in plain Python form (ints, floats, lists)."""
    w = "UNet2DModel"
    out: dict = {}
    size = args["sample_size"]
    out["sample_size"] = (
        _v.check_int(w, "sample_size", size, min=1, none=True)
        if not isinstance(size, (list, tuple))
        else _v.check_int_list(w, "sample_size", size, min=1, length=2)
    )
    for key in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
        out[key] = _v.check_int(w, key, args[key], min=1)
    for key in (
        "time_embedding_dim",
        "attention_head_dim",
        "attn_norm_num_groups",
        "num_class_embeds",
        "num_train_timesteps",
    ):
        out[key] = _v.check_int(w, key, args[key], min=1, none=True)
    out["downsample_padding"] = _v.check_int(
        w, "downsample_padding", args["downsample_padding"], min=0
    )
    for key in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
        out[key] = _v.check_bool(w, key, args[key])
    out["mid_block_scale_factor"] = _v.check_float(
        w, "mid_block_scale_factor", args["mid_block_scale_factor"], min=0.0, min_open=True
    )
    out["norm_eps"] = _v.check_float(w, "norm_eps", args["norm_eps"], min=0.0, min_open=True)
    out["dropout"] = _v.check_float(w, "dropout", args["dropout"], min=0.0)
    ch = _v.check_int_list(w, "block_out_channels", args["block_out_channels"], min=1)
    if not ch:
        raise _v.ArgumentError(f"{w}: expected block_out_channels to be a non-empty list, got []")
    out["block_out_channels"] = ch
    for key in ("down_block_types", "up_block_types"):
        types = args[key]
        if (
            isinstance(types, str)
            or not isinstance(types, (list, tuple))
            or not all(isinstance(t, str) for t in types)
        ):
            raise _v.ArgumentTypeError(
                f"{w}: expected {key} to be a list of block type names, got {types!r}"
            )
        out[key] = list(types)
    shift = _v.check_float(w, "freq_shift", args["freq_shift"])
    if shift == ch[0] // 2:  # the frequencies divide by (block_out_channels[0] // 2 - freq_shift)
        raise _v.ArgumentError(
            f"{w}: expected freq_shift to differ from "
            f"block_out_channels[0] // 2 = {ch[0] // 2}, got {shift}"
        )
    for key, chans in (("norm_num_groups", ch), ("attn_norm_num_groups", ch[-1:])):
        groups = out[key]
        if groups is not None and any(c % groups for c in chans):
            raise _v.ArgumentError(
                f"{w}: expected {key} to divide every channel count {chans}, got {groups}"
            )
    _v.check_dtype(w, args["dtype"], args["xp"])
    return out


_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")


def convert_legacy_attention_keys(state: dict) -> dict:
    """``state`` with the attention names of older diffusers checkpoints (``query``,
    ``key``, ``value``, ``proj_attn``, as in the original DDPM ports) renamed to
    today's (``to_q``, ``to_k``, ``to_v``, ``to_out.0``); other keys unchanged."""
    out = {}
    for name, value in state.items():
        m = _LEGACY_KEY.match(name)
        out[f"{m[1]}{_LEGACY_ATTENTION[m[2]]}.{m[3]}" if m else name] = value
    return out


def _timestep_number(v: Any, timestep: Any) -> int | float:
    """One timestep value (a number, a NumPy scalar or a 0-d array) as a Python int or float;
    ``timestep`` is the whole argument, for the message."""
    if hasattr(v, "shape") and hasattr(v, "dtype") and tuple(v.shape) == ():
        v = backend.to_numpy(v)[()]  # a NumPy scalar or a 0-d array of any namespace
    if not isinstance(v, bool):
        try:
            return operator.index(v)
        except TypeError:
            if isinstance(v, numbers.Real):
                return float(v)
    raise TypeError(
        f"UNet2DModel: expected an integer or real timestep (a number, "
        f"a list of numbers or an array), got {timestep!r}"
    )


def _of_namespace(a: Any, like: Any, xp: Any, dev: Any) -> bool:
    """Whether ``a`` is an array of namespace ``xp`` (that of ``like``) on device ``dev``."""
    try:
        return backend.get_namespace(a, like) is xp and backend.device(a) == dev
    except (TypeError, ValueError):
        return False
