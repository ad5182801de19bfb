"""Bad construction arguments of the public layers raise at construction (issue 13, section 7).

A generated sweep over every numeric, boolean and enumerated argument of the layers of
``xpdiff.nn`` and the UNet blocks: 0, a negative value, NaN, inf, a wrong type and a bool
wherever those are not valid values.  Each must raise ValueError or TypeError whose message
starts with the layer's name and names the argument.  Valid edge values still construct,
and ``backward`` with a gradient of the wrong shape names the expected shape.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_reliability_args import _id, bad_values

from xpdiff import backend
from xpdiff._validation import ArgumentError, ArgumentTypeError
from xpdiff.models.unet_2d_blocks import (
    AttnDownBlock2D,
    DownBlock2D,
    UNetMidBlock2D,
    UpBlock2D,
)
from xpdiff.nn.blocks import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    Upsample2D,
)
from xpdiff.nn.layers import Conv2d, Dropout, Embedding, GroupNorm, Linear

INT1 = ("int", 1, None, {})  # an integer >= 1
INT1_NONE = ("int", 1, None, {"none": True})
POSITIVE = ("float", 0.0, None, {"lo_open": True})  # a finite number > 0
BOOL = ("bool", None, None, {})
LAYOUT = "layout"  # an enumeration: 'NCHW' or 'NHWC'
DTYPE = "dtype"  # 'float32', 'float64' or the namespace's float32 / float64

# layer: (the smallest valid keyword arguments, {argument: what it takes})
LAYERS = {
    Linear: (
        {"in_features": 2, "out_features": 2},
        {"in_features": INT1, "out_features": INT1, "bias": BOOL, "dtype": DTYPE},
    ),
    Conv2d: (
        {"in_channels": 1, "out_channels": 1, "kernel_size": 1},
        {
            "in_channels": INT1,
            "out_channels": INT1,
            "kernel_size": INT1,
            "stride": INT1,
            "padding": ("int", 0, None, {}),
            "bias": BOOL,
            "layout": LAYOUT,
            "dtype": DTYPE,
        },
    ),
    GroupNorm: (
        {"num_groups": 1, "num_channels": 2},
        {
            "num_groups": INT1,
            "num_channels": INT1,
            "eps": POSITIVE,
            "affine": BOOL,
            "activation": "activation",
            "layout": LAYOUT,
            "dtype": DTYPE,
        },
    ),
    Embedding: (
        {"num_embeddings": 2, "embedding_dim": 2},
        {"num_embeddings": INT1, "embedding_dim": INT1, "dtype": DTYPE},
    ),
    Dropout: ({}, {"p": ("float", 0.0, 1.0, {})}),
    Timesteps: (
        {"num_channels": 4, "flip_sin_to_cos": True, "downscale_freq_shift": 1},
        {
            "num_channels": INT1,
            "flip_sin_to_cos": BOOL,
            "downscale_freq_shift": ("float", None, None, {}),
        },
    ),
    TimestepEmbedding: (
        {"in_channels": 2, "time_embed_dim": 2},
        {"in_channels": INT1, "time_embed_dim": INT1, "dtype": DTYPE},
    ),
    Attention: (
        {"query_dim": 2, "heads": 1, "dim_head": 2, "norm_num_groups": 1},
        {
            "query_dim": INT1,
            "heads": INT1,
            "dim_head": INT1,
            "rescale_output_factor": POSITIVE,
            "eps": POSITIVE,
            "norm_num_groups": INT1_NONE,
            "residual_connection": BOOL,
            "bias": BOOL,
            "layout": LAYOUT,
            "dtype": DTYPE,
        },
    ),
    Upsample2D: (
        {"channels": 2},
        {
            "channels": INT1,
            "use_conv": BOOL,
            "out_channels": INT1_NONE,
            "layout": LAYOUT,
            "dtype": DTYPE,
        },
    ),
    Downsample2D: (
        {"channels": 2},
        {
            "channels": INT1,
            "use_conv": BOOL,
            "out_channels": INT1_NONE,
            "padding": ("int", 0, None, {}),
            "layout": LAYOUT,
            "dtype": DTYPE,
        },
    ),
    ResnetBlock2D: (
        {"in_channels": 2, "temb_channels": 2, "groups": 1},
        {
            "in_channels": INT1,
            "out_channels": INT1_NONE,
            "temb_channels": INT1_NONE,
            "groups": INT1,
            "groups_out": INT1_NONE,
            "eps": POSITIVE,
            "output_scale_factor": POSITIVE,
            "dropout": ("float", 0.0, 1.0, {}),
            "layout": LAYOUT,
            "dtype": DTYPE,
        },
    ),
    DownBlock2D: (
        {"in_channels": 2, "out_channels": 2, "temb_channels": 2, "resnet_groups": 1},
        {"num_layers": INT1, "add_downsample": BOOL},
    ),
    UpBlock2D: (
        {
            "in_channels": 2,
            "prev_output_channel": 2,
            "out_channels": 2,
            "temb_channels": 2,
            "resnet_groups": 1,
        },
        {"num_layers": INT1, "add_upsample": BOOL},
    ),
    UNetMidBlock2D: (
        {"in_channels": 2, "temb_channels": 2, "resnet_groups": 1, "attention_head_dim": 2},
        {"num_layers": INT1, "add_attention": BOOL},
    ),
}

ENUM_BAD = {
    "layout": ["NHW", "nchw", "", None, 1, True, ["NCHW"]],
    "activation": ["relu", "SiLU", "", 1, False],
    "dtype": [
        "int32",
        "float",
        "float16",
        "Float32",
        "",
        None,
        3,
        1.5,
        True,
        np.int32,
        np.float16,
        np.dtype("int64"),
        [np.float32],
    ],
}


def _bad(spec) -> list:
    return ENUM_BAD[spec] if isinstance(spec, str) else bad_values(*spec[:3], **spec[3])


CASES = [
    pytest.param(cls, name, v, id=f"{cls.__name__}-{name}={_id(v)}")
    for cls, (_, args) in LAYERS.items()
    for name, spec in args.items()
    for v in _bad(spec)
]


@pytest.mark.parametrize("cls,name,value", CASES)
def test_layer_constructor_sweep(cls, name, value):
    base, _ = LAYERS[cls]
    with pytest.raises((ValueError, TypeError)) as info:
        cls(**{**base, name: value})
    msg = str(info.value)
    assert msg.startswith(f"{cls.__name__}: "), msg
    assert re.search(rf"\b{name}\b", msg), f"the message does not name {name}: {msg}"


def test_sweep_size():
    """Every argument of every layer above is tried with at least five bad values."""
    per_arg = {(c, n): 0 for c, (_, args) in LAYERS.items() for n in args}
    for p in CASES:
        per_arg[p.values[:2]] += 1
    assert min(per_arg.values()) >= 5 and len(CASES) > 500


@pytest.mark.parametrize(
    "factory,match",
    [
        (
            lambda: Conv2d(1, 1, kernel_size=0),
            r"^Conv2d: expected kernel_size to be an integer >= 1, "
            r"got 0$",
        ),
        (
            lambda: Conv2d(1, 1, 3, stride=2.5),
            r"^Conv2d: expected stride to be an integer >= 1, "
            r"got 2.5$",
        ),
        (lambda: Conv2d(1, 1, 3, padding=-1), r"expected padding to be an integer >= 0, got -1"),
        (
            lambda: Conv2d(1, 1, 3, layout="NHW"),
            r"^Conv2d: expected layout to be one of 'NCHW', "
            r"'NHWC', got 'NHW'$",
        ),
        (
            lambda: Linear(2, 2, bias="false"),
            r"^Linear: expected bias to be True or False, got "
            r"'false'$",
        ),
        (
            lambda: Linear(2, 2, dtype="int32"),
            r"^Linear: expected dtype to be one of 'float32', "
            r"'float64', got 'int32'$",
        ),
        (
            lambda: Linear(2, 2, dtype=np.int32, xp=np),
            r"^Linear: expected dtype to be one of "
            r"'float32', 'float64' or the namespace's",
        ),
        (lambda: GroupNorm(2, 4, eps=0.0), r"^GroupNorm: expected eps to be a finite number > 0.0"),
        (
            lambda: GroupNorm(2, 4, activation="relu"),
            r"expected activation to be one of None, "
            r"'silu', got 'relu'",
        ),
        (
            lambda: Embedding(0, 4),
            r"^Embedding: expected num_embeddings to be an integer >= 1, "
            r"got 0$",
        ),
        (
            lambda: Dropout(float("nan")),
            r"^Dropout: expected p to be a finite number >= 0.0 and "
            r"<= 1.0, got nan$",
        ),
        (
            lambda: Timesteps(8, True, 4),
            r"^Timesteps: expected downscale_freq_shift to differ from "
            r"num_channels // 2 = 4, got 4.0$",
        ),
        (
            lambda: Attention(4, heads=0),
            r"^Attention: expected heads to be an integer >= 1, got 0$",
        ),
        (
            lambda: Attention(4, 1, 4, norm_num_groups=3),
            r"^Attention: expected norm_num_groups "
            r"to divide query_dim=4, got 3$",
        ),
        (
            lambda: Attention(4, 1, 4, norm_num_groups=2, rescale_output_factor=float("inf")),
            r"^Attention: expected rescale_output_factor to be a finite number > 0.0, got inf$",
        ),
        (
            lambda: Upsample2D(4, out_channels=0),
            r"^Upsample2D: expected out_channels to be an "
            r"integer >= 1 or None, got 0$",
        ),
        (
            lambda: Downsample2D(4, use_conv=1),
            r"^Downsample2D: expected use_conv to be True or "
            r"False, got 1$",
        ),
        (
            lambda: ResnetBlock2D(in_channels=4, groups=2, out_channels=6, groups_out=4),
            r"^ResnetBlock2D: expected groups_out to divide out_channels=6, got 4$",
        ),
        (
            lambda: ResnetBlock2D(in_channels=4, groups=4, out_channels=6),
            r"^ResnetBlock2D: expected groups to divide out_channels=6, got 4$",
        ),
        (
            lambda: ResnetBlock2D(in_channels=4, groups=2, temb_channels=0),
            r"^ResnetBlock2D: expected temb_channels to be an integer >= 1 or None, got 0$",
        ),
        (
            lambda: ResnetBlock2D(in_channels=4, groups=2, output_scale_factor=-1.0),
            r"expected output_scale_factor to be a finite number > 0.0, got -1.0",
        ),
        (
            lambda: DownBlock2D(
                in_channels=2, out_channels=2, temb_channels=2, resnet_groups=1, num_layers=0
            ),
            r"^DownBlock2D: expected num_layers to be an integer",
        ),
    ],
    ids=[
        "kernel0",
        "stride2.5",
        "padding-1",
        "layout",
        "bias-str",
        "dtype-str",
        "dtype-np-int",
        "gn-eps0",
        "gn-act",
        "emb0",
        "dropout-nan",
        "freq-shift",
        "heads0",
        "attn-groups",
        "attn-rescale-inf",
        "up-out0",
        "down-useconv1",
        "resnet-groups-out",
        "resnet-groups-as-out",
        "resnet-temb0",
        "resnet-scale",
        "block-layers0",
    ],
)
def test_examples(factory, match):
    with pytest.raises(ArgumentError, match=match):
        factory()


def test_wrong_types_are_type_errors():
    for factory in (
        lambda: Linear("3", 2),
        lambda: Conv2d(1, 1, 2.5),
        lambda: GroupNorm(True, 2),
        lambda: Attention(2, 1, 2, norm_num_groups=1, eps="1e-5"),
    ):
        with pytest.raises(ArgumentTypeError):
            factory()


def test_valid_edge_values_still_construct(xp):
    i64, f64 = np.int64, np.float64
    lin = Linear(i64(1), 1, bias=False, dtype="float64", xp=xp)
    assert type(lin.in_features) is int and lin.bias is None
    assert Linear(1, 1, dtype=xp.float64, xp=xp).weight.data.dtype == xp.float64
    assert Linear(1, 1, dtype=xp.float32, xp=xp).weight.data.dtype == xp.float32
    conv = Conv2d(
        1, 1, kernel_size=i64(1), stride=i64(3), padding=0, bias=False, layout="NHWC", xp=xp
    )
    assert (type(conv.kernel_size), type(conv.stride)) == (int, int)
    y = conv(backend.asarray(np.ones((1, 4, 4, 1), np.float32), xp))
    assert tuple(y.shape) == (1, 2, 2, 1)
    gn = GroupNorm(1, 1, eps=1e-12, affine=False, activation="silu", xp=xp)
    assert gn.weight is None and gn.eps == 1e-12
    assert Embedding(1, 1, xp=xp).weight.shape == (1, 1)
    assert Dropout(0).p == 0.0 and Dropout(f64(0.0)).p == 0.0
    assert Timesteps(1, False, 0.0).num_channels == 1 and Timesteps(3, True, 2).num_channels == 3
    a = Attention(
        2,
        heads=i64(1),
        dim_head=1,
        norm_num_groups=None,
        rescale_output_factor=1e-3,
        residual_connection=False,
        bias=False,
        xp=xp,
    )
    assert a.group_norm is None and a.to_q.bias is None
    assert Upsample2D(1, use_conv=False, xp=xp).conv is None
    assert Downsample2D(1, out_channels=3, xp=xp).conv.out_channels == 3
    r = ResnetBlock2D(
        in_channels=1,
        out_channels=2,
        temb_channels=None,
        groups=1,
        groups_out=2,
        eps=f64(1e-6),
        output_scale_factor=2,
        dropout=0.0,
        xp=xp,
    )
    assert r.time_emb_proj is None and r.norm2.num_groups == 2
    assert (
        len(
            AttnDownBlock2D(
                in_channels=2,
                out_channels=2,
                temb_channels=2,
                resnet_groups=1,
                attention_head_dim=1,
                num_layers=i64(2),
                add_downsample=False,
                xp=xp,
            ).resnets
        )
        == 2
    )


def _grad_cases(xp):
    x4 = backend.asarray(
        np.linspace(-1, 1, 2 * 4 * 3 * 3).reshape(2, 4, 3, 3), xp, dtype=xp.float64
    )
    temb = backend.asarray(np.ones((2, 2)), xp, dtype=xp.float64)
    kw = {"dtype": "float64", "xp": xp}
    return [
        (Linear(4, 3, **kw), (backend.asarray(np.ones((5, 4)), xp, dtype=xp.float64),), (5, 3)),
        (Conv2d(4, 2, 3, padding=1, **kw), (x4,), (2, 2, 3, 3)),
        (GroupNorm(2, 4, **kw), (x4,), (2, 4, 3, 3)),
        (Attention(4, 2, 2, norm_num_groups=2, **kw), (x4,), (2, 4, 3, 3)),
        (
            ResnetBlock2D(in_channels=4, out_channels=2, temb_channels=2, groups=2, **kw),
            (x4, temb),
            (2, 2, 3, 3),
        ),
        (Downsample2D(4, **kw), (x4,), (2, 4, 2, 2)),
        (Upsample2D(4, **kw), (x4,), (2, 4, 6, 6)),
    ]


def test_backward_with_a_wrong_gradient_shape_names_the_expected_shape(xp):
    for layer, inputs, shape in _grad_cases(xp):
        name = type(layer).__name__
        y = layer(*inputs)
        assert tuple(y.shape) == shape
        bad_shape = shape[:-1] + (shape[-1] + 1,)
        bad = backend.asarray(np.ones(bad_shape), xp, dtype=xp.float64)
        want = re.escape(f"{name}.backward: expected grad_output of shape {shape} ")
        with pytest.raises(ValueError, match=rf"^{want}.*got shape {re.escape(str(bad_shape))}"):
            layer.backward(bad)
        layer(*inputs)
        with pytest.raises(ValueError, match=rf"^{want}.*got list"):
            layer.backward([[0.0]])
        layer(*inputs)
        g = layer.backward(xp.ones_like(y))  # the right shape still works
        gx = g[0] if isinstance(g, tuple) else g
        assert tuple(gx.shape) == tuple(inputs[0].shape)
