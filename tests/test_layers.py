"""Every layer: finite differences, a PyTorch/diffusers oracle, dtypes and devices, bad input.

Each case in ``CASES`` builds one xpdiff layer, its inputs (host NumPy arrays,
moved to the namespace under test), and the same computation in PyTorch: the
diffusers module itself where one exists, else ``torch.nn`` (thin wrappers of
``torch.nn.functional``).  Weights go from our ``named_parameters`` into theirs
by the same dotted names.

torch and diffusers are oracles only: ``_oracle()`` imports them on first use, and the tests
that need them are marked ``oracle`` (skipped without them); the rest runs without torch.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from xpdiff import backend
from xpdiff.functional.embeddings import timestep_embedding
from xpdiff.nn import init
from xpdiff.nn.blocks import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    Upsample2D,
)
from xpdiff.nn.layers import (
    Conv2d,
    Dropout,
    Embedding,
    GroupNorm,
    Identity,
    Linear,
    MSELoss,
    ReLU,
    SiLU,
)
from xpdiff.nn.module import Module
from xpdiff.testing import check_backward

ORACLE_RTOL = 1e-6


# ---------------------------------------------------------------------------
# the oracle: torch and diffusers, imported on first use
# ---------------------------------------------------------------------------
@functools.cache
def _oracle() -> SimpleNamespace:
    """torch, ``torch.nn``, ``torch.nn.functional`` as ``F``, diffusers' layers under their
    own names, and two small torch modules; skips the calling test without torch/diffusers."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention as DAttention
    from diffusers.models.downsampling import Downsample2D as DDownsample2D
    from diffusers.models.embeddings import TimestepEmbedding as DTimestepEmbedding
    from diffusers.models.embeddings import Timesteps as DTimesteps
    from diffusers.models.embeddings import get_timestep_embedding
    from diffusers.models.resnet import ResnetBlock2D as DResnetBlock2D
    from diffusers.models.upsampling import Upsample2D as DUpsample2D

    F = torch.nn.functional

    class TorchFn(torch.nn.Module):
        """A parameter-free torch module around ``torch.nn.functional.<name>``."""

        def __init__(self, name: str):
            super().__init__()
            self.fn = getattr(F, name)

        def forward(self, *args, **kwargs):
            return self.fn(*args, **kwargs)

    class GroupNormSiLU(torch.nn.GroupNorm):
        """silu(group_norm(x)) with GroupNorm's parameter names."""

        def forward(self, x):
            return F.silu(super().forward(x))

    return SimpleNamespace(
        torch=torch,
        nn=torch.nn,
        F=F,
        TorchFn=TorchFn,
        GroupNormSiLU=GroupNormSiLU,
        Attention=DAttention,
        Downsample2D=DDownsample2D,
        TimestepEmbedding=DTimestepEmbedding,
        Timesteps=DTimesteps,
        get_timestep_embedding=get_timestep_embedding,
        ResnetBlock2D=DResnetBlock2D,
        Upsample2D=DUpsample2D,
    )


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    make: Callable[[Any, str], Module]  # (xp, dtype) -> our layer
    data: Callable[[np.random.Generator], tuple[list, dict]]  # host inputs and kwargs
    torch_mod: Callable[[Module], Any]  # their torch.nn.Module (weights loaded later)
    cached: bool = True  # forward keeps a cache (backward before forward must fail)


def _img(B, C, H, W):
    return lambda rng: ([rng.standard_normal((B, C, H, W))], {})


class ChannelsLast(Module):
    """Runs a ``layout="NHWC"`` layer on (B, C, H, W) arrays, permuting its first input,
    its output and their gradients, so the (B, C, H, W) oracles apply unchanged.  It
    shares the layer's parameters and children, under the same names."""

    def __init__(self, inner: Module):
        super().__init__()
        object.__setattr__(self, "_params", inner._params)
        object.__setattr__(self, "_modules", inner._modules)
        object.__setattr__(self, "inner", inner)

    @staticmethod
    def _perm(a, order):
        return backend.get_namespace(a).permute_dims(a, order)

    def forward(self, x, *rest, **kw):
        y = self.inner(self._perm(x, (0, 2, 3, 1)), *rest, **kw)
        return self._perm(y, (0, 3, 1, 2))

    def backward(self, grad_output):
        if grad_output.ndim == 4:
            grad_output = self._perm(grad_output, (0, 2, 3, 1))
        out = self.inner.backward(grad_output)
        if isinstance(out, tuple):
            return (self._perm(out[0], (0, 3, 1, 2)), *out[1:])
        return self._perm(out, (0, 3, 1, 2))


def _channels_last(case: Case, make) -> Case:
    """The same case with the layer built channels-last (``make(xp, dtype)``)."""
    return Case(
        case.id + "-NHWC",
        lambda xp, dt: ChannelsLast(make(xp, dt)),
        case.data,
        case.torch_mod,
        case.cached,
    )


def _conv_case(C, O, k, s, p, H, W, bias=True, layout="NCHW"):
    case = Case(
        f"Conv2d-{C}to{O}-k{k}-s{s}-p{p}-{H}x{W}" + ("" if bias else "-nobias"),
        lambda xp, dt: Conv2d(C, O, k, s, p, bias, dtype=dt, xp=xp),
        _img(2, C, H, W),
        lambda m: _oracle().nn.Conv2d(C, O, k, s, p, bias=bias),
    )
    if layout == "NCHW":
        return case
    return _channels_last(
        case, lambda xp, dt: Conv2d(C, O, k, s, p, bias, layout=layout, dtype=dt, xp=xp)
    )


def _attention_case(C, heads, dim_head, groups, rescale, H, W, layout="NCHW"):
    case = Case(
        f"Attention-C{C}-h{heads}-d{dim_head}-g{groups}-r{rescale}-{H}x{W}",
        lambda xp, dt: Attention(
            C,
            heads,
            dim_head,
            rescale_output_factor=rescale,
            eps=1e-5,
            norm_num_groups=groups,
            layout=layout,
            dtype=dt,
            xp=xp,
        ),
        _img(2, C, H, W),
        # the kwargs diffusers' UNet2DModel passes (_from_deprecated_attn_block)
        lambda m: _oracle().Attention(
            C,
            heads=heads,
            dim_head=dim_head,
            rescale_output_factor=rescale,
            eps=1e-5,
            norm_num_groups=groups,
            residual_connection=True,
            bias=True,
            upcast_softmax=True,
            _from_deprecated_attn_block=True,
        ),
    )
    return case if layout == "NCHW" else _channels_last(case, case.make)


def _upsample_case(C, O, H, W, size, use_conv=True, layout="NCHW"):
    def data(rng):
        return [rng.standard_normal((2, C, H, W))], ({"output_size": size} if size else {})

    case = Case(
        f"Upsample2D-{C}to{O}-{H}x{W}-to-{size or 'x2'}" + ("" if use_conv else "-noconv"),
        lambda xp, dt: Upsample2D(
            C, use_conv=use_conv, out_channels=O, layout=layout, dtype=dt, xp=xp
        ),
        data,
        lambda m: _oracle().Upsample2D(C, use_conv=use_conv, out_channels=O),
    )
    return case if layout == "NCHW" else _channels_last(case, case.make)


def _resnet_case(C, O, T, groups, scale, H, W, layout="NCHW"):
    def data(rng):
        temb = rng.standard_normal((2, T)) if T else None
        return [rng.standard_normal((2, C, H, W)), temb], {}

    case = Case(
        f"ResnetBlock2D-{C}to{O}-temb{T}-g{groups}-s{scale}-{H}x{W}",
        lambda xp, dt: ResnetBlock2D(
            in_channels=C,
            out_channels=O,
            temb_channels=T,
            groups=groups,
            eps=1e-6,
            output_scale_factor=scale,
            layout=layout,
            dtype=dt,
            xp=xp,
        ),
        data,
        lambda m: _oracle().ResnetBlock2D(
            in_channels=C,
            out_channels=O,
            temb_channels=T,
            groups=groups,
            eps=1e-6,
            output_scale_factor=scale,
        ),
    )
    return case if layout == "NCHW" else _channels_last(case, case.make)


def _mse_data(rng):
    return [rng.standard_normal((2, 3, 4))], {"target": rng.standard_normal((2, 3, 4))}


CASES = [
    Case(
        "Linear-2d",
        lambda xp, dt: Linear(5, 3, dtype=dt, xp=xp),
        lambda rng: ([rng.standard_normal((4, 5))], {}),
        lambda m: _oracle().nn.Linear(5, 3),
    ),
    Case(
        "Linear-3d-nobias",
        lambda xp, dt: Linear(4, 6, bias=False, dtype=dt, xp=xp),
        lambda rng: ([rng.standard_normal((2, 3, 4))], {}),
        lambda m: _oracle().nn.Linear(4, 6, bias=False),
    ),
    *[_conv_case(3, 4, k, s, p, 5, 7) for k in (1, 3) for s in (1, 2) for p in (0, 1)],
    _conv_case(2, 3, 3, 1, 1, 4, 4, bias=False),
    Case(
        "GroupNorm-4d",
        lambda xp, dt: GroupNorm(2, 6, eps=1e-5, dtype=dt, xp=xp),
        _img(2, 6, 3, 4),
        lambda m: _oracle().nn.GroupNorm(2, 6, eps=1e-5),
    ),
    Case(
        "GroupNorm-3d-g1",
        lambda xp, dt: GroupNorm(1, 4, eps=1e-6, dtype=dt, xp=xp),
        lambda rng: ([rng.standard_normal((3, 4, 5))], {}),
        lambda m: _oracle().nn.GroupNorm(1, 4, eps=1e-6),
    ),
    Case(
        "GroupNorm-2d",
        lambda xp, dt: GroupNorm(4, 8, dtype=dt, xp=xp),
        lambda rng: ([rng.standard_normal((3, 8))], {}),
        lambda m: _oracle().nn.GroupNorm(4, 8),
    ),
    Case("SiLU", lambda xp, dt: SiLU(), _img(2, 3, 4, 5), lambda m: _oracle().TorchFn("silu")),
    Case("ReLU", lambda xp, dt: ReLU(), _img(2, 3, 4, 5), lambda m: _oracle().TorchFn("relu")),
    Case(
        "Identity",
        lambda xp, dt: Identity(),
        _img(2, 3, 4, 5),
        lambda m: _oracle().nn.Identity(),
        cached=False,
    ),
    Case(
        "Embedding-repeated",
        lambda xp, dt: Embedding(6, 4, dtype=dt, xp=xp),
        lambda rng: ([np.array([1, 1, 4, 0, 1], dtype=np.int64)], {}),
        lambda m: _oracle().nn.Embedding(6, 4),
    ),
    *[
        Case(
            f"Timesteps-{dim}-flip{flip}-shift{shift}",
            lambda xp, dt, dim=dim, flip=flip, shift=shift: Timesteps(dim, flip, shift),
            lambda rng: ([np.array([0, 1, 17, 999], dtype=np.int64)], {}),
            lambda m, dim=dim, flip=flip, shift=shift: _oracle().Timesteps(dim, flip, shift),
            cached=False,
        )
        for dim, flip, shift in [(8, True, 0), (8, False, 1), (7, True, 1), (9, False, 0)]
    ],
    Case(
        "TimestepEmbedding",
        lambda xp, dt: TimestepEmbedding(6, 8, dtype=dt, xp=xp),
        lambda rng: ([rng.standard_normal((3, 6))], {}),
        lambda m: _oracle().TimestepEmbedding(6, 8),
    ),
    _attention_case(8, 2, 4, 2, 1.0, 3, 3),
    _attention_case(6, 1, 6, 3, 2.0, 2, 3),
    _attention_case(4, 3, 2, 1, 0.5, 3, 2),
    _upsample_case(3, 3, 4, 4, None),
    _upsample_case(3, 2, 4, 4, (7, 7)),
    _upsample_case(2, 2, 3, 5, None),
    _upsample_case(2, 3, 3, 4, (5, 7)),
    _upsample_case(2, 2, 3, 3, (6, 6)),
    _upsample_case(2, 2, 4, 3, (7, 5), use_conv=False),
    Case(
        "Downsample2D-4x4",
        lambda xp, dt: Downsample2D(3, use_conv=True, dtype=dt, xp=xp),
        _img(2, 3, 4, 4),
        lambda m: _oracle().Downsample2D(3, use_conv=True, padding=1),
    ),
    Case(
        "Downsample2D-3to4-5x7",
        lambda xp, dt: Downsample2D(3, use_conv=True, out_channels=4, dtype=dt, xp=xp),
        _img(2, 3, 5, 7),
        lambda m: _oracle().Downsample2D(3, use_conv=True, out_channels=4, padding=1),
    ),
    _resnet_case(4, 4, 5, 2, 1.0, 4, 3),  # identity shortcut
    _resnet_case(4, 6, 5, 2, 2.0, 3, 3),  # 1x1 conv_shortcut, output_scale_factor != 1
    _resnet_case(2, 4, None, 1, 1.0, 3, 2),  # no time embedding
    Case("MSELoss", lambda xp, dt: MSELoss(), _mse_data, lambda m: _oracle().TorchFn("mse_loss")),
    # channels-last: the layers a UNet2DModel runs inside, with layout="NHWC"
    *[
        _conv_case(3, 4, k, s, p, 5, 7, layout="NHWC")
        for k in (1, 3)
        for s in (1, 2)
        for p in (0, 1)
    ],
    _conv_case(2, 3, 3, 1, 1, 4, 4, bias=False, layout="NHWC"),
    Case(
        "GroupNorm-4d-NHWC",
        lambda xp, dt: ChannelsLast(GroupNorm(2, 6, eps=1e-5, layout="NHWC", dtype=dt, xp=xp)),
        _img(2, 6, 3, 4),
        lambda m: _oracle().nn.GroupNorm(2, 6, eps=1e-5),
    ),
    Case(
        "GroupNorm-SiLU-4d",
        lambda xp, dt: GroupNorm(2, 6, eps=1e-5, activation="silu", dtype=dt, xp=xp),
        _img(2, 6, 3, 4),
        lambda m: _oracle().GroupNormSiLU(2, 6, eps=1e-5),
    ),
    Case(
        "GroupNorm-SiLU-noaffine",
        lambda xp, dt: GroupNorm(2, 4, affine=False, activation="silu", dtype=dt, xp=xp),
        _img(2, 4, 3, 3),
        lambda m: _oracle().GroupNormSiLU(2, 4, affine=False),
    ),
    Case(
        "GroupNorm-SiLU-4d-NHWC",
        lambda xp, dt: ChannelsLast(
            GroupNorm(2, 6, eps=1e-5, activation="silu", layout="NHWC", dtype=dt, xp=xp)
        ),
        _img(2, 6, 3, 4),
        lambda m: _oracle().GroupNormSiLU(2, 6, eps=1e-5),
    ),
    Case(
        "GroupNorm-4d-g3-NHWC",
        lambda xp, dt: ChannelsLast(GroupNorm(3, 6, eps=1e-6, layout="NHWC", dtype=dt, xp=xp)),
        _img(3, 6, 2, 5),
        lambda m: _oracle().nn.GroupNorm(3, 6, eps=1e-6),
    ),
    _attention_case(8, 2, 4, 2, 1.0, 3, 3, layout="NHWC"),
    _attention_case(6, 1, 6, 3, 2.0, 2, 3, layout="NHWC"),
    _attention_case(4, 3, 2, 1, 0.5, 3, 2, layout="NHWC"),
    _upsample_case(3, 3, 4, 4, None, layout="NHWC"),
    _upsample_case(3, 2, 4, 4, (7, 7), layout="NHWC"),
    _upsample_case(2, 2, 4, 3, (7, 5), use_conv=False, layout="NHWC"),
    Case(
        "Downsample2D-3to4-5x7-NHWC",
        lambda xp, dt: ChannelsLast(
            Downsample2D(3, use_conv=True, out_channels=4, layout="NHWC", dtype=dt, xp=xp)
        ),
        _img(2, 3, 5, 7),
        lambda m: _oracle().Downsample2D(3, use_conv=True, out_channels=4, padding=1),
    ),
    _resnet_case(4, 4, 5, 2, 1.0, 4, 3, layout="NHWC"),
    _resnet_case(4, 6, 5, 2, 2.0, 3, 3, layout="NHWC"),
    _resnet_case(2, 4, None, 1, 1.0, 3, 2, layout="NHWC"),
]
CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)


def _is_float_host(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind == "f"


def _move(xp, a, dtype: str, device=None):
    """Host array -> xp array (floats cast to ``dtype``; integers stay int64)."""
    if a is None:
        return None
    if _is_float_host(a):
        return backend.asarray(a.astype(dtype), xp, device=device)
    return backend.asarray(a, xp, device=device)


def _setup(case: Case, xp, dtype: str, device=None, seed: int = 0):
    """Our layer (parameters on ``device``), inputs and kwargs in ``xp``."""
    init.manual_seed(seed)
    m = case.make(xp, dtype)
    if device is not None:
        for p in m.parameters():
            p.data = backend.asarray(backend.to_numpy(p.data), xp, device=device)
    rng = np.random.default_rng(seed + 1)
    host, hkw = case.data(rng)
    ins = [_move(xp, a, dtype, device) for a in host]
    kw = {
        k: (_move(xp, v, dtype, device) if isinstance(v, np.ndarray) else v) for k, v in hkw.items()
    }
    return m, ins, kw, host, hkw, rng


def _grads(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _assert_rel(actual, desired, what: str, rtol: float = ORACLE_RTOL, atol: float = 1e-12):
    """max|a - d| <= rtol * max|d| + atol (atol covers gradients that are zero in exact
    arithmetic, e.g. the key bias under softmax)."""
    a = np.asarray(backend.to_numpy(actual), dtype=np.float64)
    d = np.asarray(backend.to_numpy(desired), dtype=np.float64)
    assert a.shape == d.shape, f"{what}: shape {a.shape} != {d.shape}"
    if not d.size:
        return
    err, scale = float(np.abs(a - d).max()), float(np.abs(d).max())
    assert err <= rtol * scale + atol, (
        f"{what}: max abs error {err:.3g}, max |desired| {scale:.3g} (rtol={rtol}, atol={atol})"
    )


# ---------------------------------------------------------------------------
# a. finite differences, float64, every namespace
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_check_backward(xp, case):
    m, ins, kw, *_ = _setup(case, xp, "float64")
    res = check_backward(m, ins, kw)
    names = {n for n, _ in m.named_parameters()}
    checked = set(res)
    assert names <= checked, f"parameters not checked: {names - checked}"
    for i, h in enumerate(case.data(np.random.default_rng(1))[0]):
        if _is_float_host(h):
            assert f"input {i}" in checked
    for _, p in m.named_parameters():
        assert p.grad is not None


# ---------------------------------------------------------------------------
# b. the PyTorch / diffusers oracle, float64
# ---------------------------------------------------------------------------
def _their_params(tm: Any) -> dict[int, str]:
    return {id(p): n for n, p in tm.named_parameters()}


@pytest.mark.oracle
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torch_oracle(xp, case):
    torch = _oracle().torch
    m, ins, kw, host, hkw, rng = _setup(case, xp, "float64")
    y = m(*ins, **kw)
    gy_host = rng.standard_normal(tuple(y.shape)).astype(backend.dtype_name(y.dtype))
    grads = _grads(m.backward(backend.asarray(gy_host, xp)))

    tm = case.torch_mod(m).double()
    # same weights under the same names; every one of theirs must be covered by ours
    ours = dict(m.named_parameters())
    covered = set()
    with torch.no_grad():
        for name, p in ours.items():
            tp = tm.get_parameter(name)
            assert tuple(tp.shape) == p.shape, name
            tp.copy_(torch.from_numpy(np.array(backend.to_numpy(p.data))))
            covered.add(id(tp))
    missing = [n for i, n in _their_params(tm).items() if i not in covered]
    assert not missing, f"their parameters without a counterpart: {missing}"

    tin = [None if a is None else torch.tensor(a, requires_grad=_is_float_host(a)) for a in host]
    tkw = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in hkw.items()}
    ty = tm(*tin, **tkw)
    assert backend.dtype_name(y.dtype) == backend.dtype_name(ty.dtype)
    if isinstance(m, Timesteps):  # float32 on both sides; nothing to differentiate
        _assert_embedding_close(y, ty, host[0])
        assert all(g is None for g in grads)
        return
    _assert_rel(y, ty.detach(), "forward")
    (ty * torch.from_numpy(gy_host)).sum().backward()
    for i, t in enumerate(tin):
        if t is not None and t.requires_grad:
            assert grads[i] is not None, f"no gradient for input {i}"
            _assert_rel(grads[i], t.grad, f"gradient of input {i}")
    for name, p in ours.items():
        _assert_rel(p.grad, tm.get_parameter(name).grad, f"gradient of {name}")


def _assert_embedding_close(ours, theirs, t):
    """Both sides work in float32: the arguments ``t * f`` carry a rounding error of a few
    float32 ulps of ``t`` (library exp()s differ by an ulp), so allow ~4 eps32 * |t| per row."""
    a = np.asarray(backend.to_numpy(ours), dtype=np.float64)
    d = theirs.numpy().astype(np.float64)
    assert a.shape == d.shape
    tol = 1e-6 + 4 * np.finfo(np.float32).eps * np.abs(np.asarray(t, dtype=np.float64))[:, None]
    err = np.abs(a - d)
    assert (err <= tol).all(), f"max error {err.max():.3g}, worst excess {(err - tol).max():.3g}"


# diffusers' own function for the sinusoidal embedding, beyond what Timesteps exposes
@pytest.mark.oracle
@pytest.mark.parametrize("max_period", [10000, 50])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("dim", [6, 7, 32])
def test_timestep_embedding_vs_diffusers(xp, dim, flip, shift, max_period):
    torch, get_timestep_embedding = _oracle().torch, _oracle().get_timestep_embedding
    t = np.array([0, 3, 250, 999], dtype=np.int64)
    ours = timestep_embedding(backend.asarray(t, xp), dim, flip, shift, max_period)
    theirs = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift, 1, max_period)
    assert backend.dtype_name(ours.dtype) == "float32"
    _assert_embedding_close(ours, theirs, t)
    if dim % 2:
        assert (backend.to_numpy(ours)[:, -1] == 0).all()
    # float timesteps and an explicit dtype
    tf = np.array([0.5, 10.25], dtype=np.float32)
    ours64 = timestep_embedding(
        backend.asarray(tf, xp), dim, flip, shift, max_period, dtype=xp.float64
    )
    theirs = get_timestep_embedding(torch.from_numpy(tf), dim, flip, shift, 1, max_period)
    assert backend.dtype_name(ours64.dtype) == "float64"
    _assert_embedding_close(ours64, theirs, tf)


def test_embedding_repeated_labels_accumulate(xp):
    init.manual_seed(0)
    emb = Embedding(6, 3, dtype="float64", xp=xp)
    emb(backend.asarray(np.array([1, 1, 4], dtype=np.int64), xp))
    emb.backward(xp.ones((3, 3), dtype=xp.float64))
    g = backend.to_numpy(emb.weight.grad)
    np.testing.assert_array_equal(g[1], 2 * g[4])
    np.testing.assert_array_equal(g[1], np.full(3, 2.0))
    np.testing.assert_array_equal(g[[0, 2, 3, 5]], 0.0)


@pytest.mark.oracle
def test_state_dict_names_match_diffusers():
    d = _oracle()
    init.manual_seed(0)
    pairs = [
        (
            ResnetBlock2D(in_channels=4, out_channels=6, temb_channels=5, groups=2),
            d.ResnetBlock2D(in_channels=4, out_channels=6, temb_channels=5, groups=2),
        ),
        (
            Attention(8, 2, 4, norm_num_groups=2),
            d.Attention(
                8,
                heads=2,
                dim_head=4,
                norm_num_groups=2,
                residual_connection=True,
                bias=True,
                upcast_softmax=True,
                _from_deprecated_attn_block=True,
            ),
        ),
        (TimestepEmbedding(4, 8), d.TimestepEmbedding(4, 8)),
        (Upsample2D(3, use_conv=True), d.Upsample2D(3, use_conv=True)),
    ]
    for ours, theirs in pairs:
        assert list(ours.state_dict()) == list(theirs.state_dict()), type(ours).__name__
    # diffusers registers Downsample2D's conv twice (Conv2d_0 and conv)
    assert set(Downsample2D(3).state_dict()) <= set(d.Downsample2D(3, use_conv=True).state_dict())


# ---------------------------------------------------------------------------
# c. float32 in, float32 out (and on array_api_strict's second device)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_dtype_and_device(xp, device_f32, case):
    m, ins, kw, _, _, rng = _setup(case, xp, "float32", device=device_f32)
    x0 = ins[0]
    y = m(*ins, **kw)
    assert backend.dtype_name(y.dtype) == "float32"
    assert backend.device(y) == backend.device(x0)
    gy = backend.asarray(
        rng.standard_normal(tuple(y.shape)).astype(np.float32), xp, device=backend.device(y)
    )
    grads = _grads(m.backward(gy))
    for i, (x, g) in enumerate(zip(ins, grads, strict=False)):
        if g is None:
            continue
        assert backend.dtype_name(g.dtype) == "float32", f"input {i} gradient is {g.dtype}"
        assert tuple(g.shape) == tuple(x.shape)
        assert backend.device(g) == backend.device(x)
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert backend.dtype_name(p.grad.dtype) == "float32", f"{name}: {p.grad.dtype}"
        assert backend.device(p.grad) == backend.device(p.data), name
        assert backend.get_namespace(p.grad) is backend.get_namespace(p.data)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_inputs_left_alone_and_strided_inputs_agree(xp, case):
    """Forward and backward leave their inputs and the output gradient unmodified (several
    ops update fresh temporaries in place), and a non-contiguous view of the same values
    gives the same output and gradients as a contiguous array."""
    m, ins, kw, host, hkw, rng = _setup(case, xp, "float64")
    before = [None if a is None else backend.to_numpy(a).copy() for a in ins]
    y = m(*ins, **kw)
    gy_host = rng.standard_normal(tuple(y.shape))
    gy = backend.asarray(gy_host, xp)
    grads = _grads(m.backward(gy))
    for i, (a, b) in enumerate(zip(ins, before, strict=True)):
        if a is not None:
            np.testing.assert_array_equal(backend.to_numpy(a), b, err_msg=f"input {i} changed")
    np.testing.assert_array_equal(backend.to_numpy(gy), gy_host, err_msg="grad_output changed")
    if not _is_float_host(host[0]) or host[0].ndim < 2:
        return
    # the same values as a view with a reversed-then-reversed-back last axis: strided
    m2, *_ = _setup(case, xp, "float64")
    x0 = host[0]
    wide = backend.asarray(np.concatenate([x0, x0], axis=-1), xp)
    view = wide[..., : x0.shape[-1]]
    y2 = m2(view, *ins[1:], **kw)
    grads2 = _grads(m2.backward(backend.asarray(gy_host, xp)))
    # summation order may differ with the strides: agree to float64 rounding
    np.testing.assert_allclose(backend.to_numpy(y2), backend.to_numpy(y), rtol=1e-13, atol=1e-13)
    for g, g2 in zip(grads, grads2, strict=True):
        if g is not None:
            np.testing.assert_allclose(
                backend.to_numpy(g2), backend.to_numpy(g), rtol=1e-13, atol=1e-13
            )


@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_without_grad_keeps_no_cache_and_the_same_output(xp, activation):
    from xpdiff.nn.module import no_grad

    init.manual_seed(0)
    gn = GroupNorm(2, 4, activation=activation, layout="NHWC", dtype="float64", xp=xp)
    x = backend.asarray(np.random.default_rng(3).standard_normal((3, 2, 5, 4)), xp)
    y = backend.to_numpy(gn(x))
    gn.backward(xp.ones_like(x))
    with no_grad():
        y0 = backend.to_numpy(gn(x))
    assert gn._cache is None
    np.testing.assert_array_equal(y0, y)


def test_float32_params_stay_float32(xp):
    init.manual_seed(0)
    block = ResnetBlock2D(in_channels=2, out_channels=4, temb_channels=3, groups=2, xp=xp)
    for name, p in block.named_parameters():
        assert backend.dtype_name(p.dtype) == "float32", name
        assert backend.get_namespace(p.data) is xp, name


# ---------------------------------------------------------------------------
# d. bad input
# ---------------------------------------------------------------------------
def _zeros(xp, shape, dtype="float32"):
    return xp.zeros(shape, dtype=getattr(xp, dtype))


def _ints(xp, values):
    return backend.asarray(np.array(values, dtype=np.int64), xp)


BAD_INPUT = [
    # (id, layer factory(xp), call(layer, xp), exception, message regex)
    (
        "conv-3d",
        lambda xp: Conv2d(3, 4, 3, xp=xp),
        lambda m, xp: m(_zeros(xp, (3, 5, 5))),
        ValueError,
        r"Conv2d\(3->4.*expected a 4-D input \(B, C, H, W\), got shape \(3, 5, 5\)",
    ),
    (
        "conv-channels",
        lambda xp: Conv2d(3, 4, 3, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 2, 5, 5))),
        ValueError,
        r"expected size 3 on axis 1, got shape \(1, 2, 5, 5\)",
    ),
    (
        "conv-too-small",
        lambda xp: Conv2d(3, 4, 3, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 3, 2, 5))),
        ValueError,
        r"smaller than the kernel",
    ),
    (
        "conv-float64",
        lambda xp: Conv2d(3, 4, 3, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 3, 5, 5), "float64")),
        TypeError,
        r"expected dtype float32 \(the layer's weights\), got float64",
    ),
    (
        "conv64-float32",
        lambda xp: Conv2d(3, 4, 3, dtype="float64", xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 3, 5, 5))),
        TypeError,
        r"expected dtype float64.*float32",
    ),
    (
        "conv-list",
        lambda xp: Conv2d(3, 4, 3, xp=xp),
        lambda m, xp: m([[1.0]]),
        TypeError,
        r"expected an array, got list",
    ),
    (
        "linear-features",
        lambda xp: Linear(4, 2, xp=xp),
        lambda m, xp: m(_zeros(xp, (3, 5))),
        ValueError,
        r"Linear\(4->2\).*expected size 4 on axis -1, got shape \(3, 5\)",
    ),
    (
        "linear-float64",
        lambda xp: Linear(4, 2, xp=xp),
        lambda m, xp: m(_zeros(xp, (3, 4), "float64")),
        TypeError,
        r"expected dtype float32",
    ),
    (
        "groupnorm-channels",
        lambda xp: GroupNorm(2, 4, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 6, 3, 3))),
        ValueError,
        r"GroupNorm.*expected size 4 on axis 1",
    ),
    (
        "groupnorm-1d",
        lambda xp: GroupNorm(2, 4, xp=xp),
        lambda m, xp: m(_zeros(xp, (4,))),
        ValueError,
        r"GroupNorm",
    ),
    (
        "groupnorm-float64",
        lambda xp: GroupNorm(2, 4, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 4, 3, 3), "float64")),
        TypeError,
        r"expected dtype float32",
    ),
    (
        "attention-3d",
        lambda xp: Attention(4, 2, 2, norm_num_groups=2, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 4, 9))),
        ValueError,
        r"Attention.*expected a 4-D input",
    ),
    (
        "attention-channels",
        lambda xp: Attention(4, 2, 2, norm_num_groups=2, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 2, 3, 3))),
        ValueError,
        r"expected size 4 on axis 1",
    ),
    (
        "attention-float64",
        lambda xp: Attention(4, 2, 2, norm_num_groups=2, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 4, 3, 3), "float64")),
        TypeError,
        r"expected dtype float32",
    ),
    (
        "upsample-3d",
        lambda xp: Upsample2D(3, xp=xp),
        lambda m, xp: m(_zeros(xp, (3, 4, 4))),
        ValueError,
        r"Upsample2D\(3\).*expected a 4-D input",
    ),
    (
        "upsample-float64",
        lambda xp: Upsample2D(3, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 3, 4, 4), "float64")),
        TypeError,
        r"expected dtype float32",
    ),
    (
        "downsample-channels",
        lambda xp: Downsample2D(3, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 4, 4, 4))),
        ValueError,
        r"expected size 3 on axis 1",
    ),
    (
        "resnet-channels",
        lambda xp: ResnetBlock2D(in_channels=4, out_channels=4, temb_channels=3, groups=2, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 2, 3, 3)), _zeros(xp, (1, 3))),
        ValueError,
        r"expected size 4 on axis 1",
    ),
    (
        "resnet-float64",
        lambda xp: ResnetBlock2D(in_channels=4, out_channels=4, temb_channels=3, groups=2, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 4, 3, 3), "float64"), _zeros(xp, (1, 3), "float64")),
        TypeError,
        r"expected dtype float32",
    ),
    (
        "resnet-temb-missing",
        lambda xp: ResnetBlock2D(in_channels=4, out_channels=4, temb_channels=3, groups=2, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 4, 3, 3)), None),
        ValueError,
        r"temb is required",
    ),
    (
        "resnet-temb-size",
        lambda xp: ResnetBlock2D(in_channels=4, out_channels=4, temb_channels=3, groups=2, xp=xp),
        lambda m, xp: m(_zeros(xp, (1, 4, 3, 3)), _zeros(xp, (1, 5))),
        ValueError,
        r"Linear\(3->4\).*expected size 3 on axis -1",
    ),
    (
        "timesteps-2d",
        lambda xp: Timesteps(8, True, 0),
        lambda m, xp: m(_zeros(xp, (2, 3))),
        ValueError,
        r"Timesteps.*expected a 1-D input",
    ),
    (
        "timestep-embedding-float64",
        lambda xp: TimestepEmbedding(4, 8, xp=xp),
        lambda m, xp: m(_zeros(xp, (2, 4), "float64")),
        TypeError,
        r"expected dtype float32",
    ),
    (
        "embedding-2d",
        lambda xp: Embedding(5, 3, xp=xp),
        lambda m, xp: m(xp.zeros((2, 2), dtype=xp.int64)),
        ValueError,
        r"Embedding\(5, 3\).*expected a 1-D input \(N,\)",
    ),
    (
        "embedding-too-big",
        lambda xp: Embedding(5, 3, xp=xp),
        lambda m, xp: m(_ints(xp, [0, 5, 2])),
        ValueError,
        r"Embedding\(5, 3\).*expected indices in \[0, 5\), got values in \[0, 5\]",
    ),
    (
        "embedding-negative",
        lambda xp: Embedding(5, 3, xp=xp),
        lambda m, xp: m(_ints(xp, [-1, 2])),
        ValueError,
        r"expected indices in \[0, 5\)",
    ),
    (
        "embedding-float-labels",
        lambda xp: Embedding(5, 3, xp=xp),
        lambda m, xp: m(_zeros(xp, (3,))),
        TypeError,
        r"expected integer indices, got float32",
    ),
    (
        "embedding-bool-labels",
        lambda xp: Embedding(5, 3, xp=xp),
        lambda m, xp: m(xp.zeros((3,), dtype=xp.bool)),
        TypeError,
        r"expected integer indices",
    ),
    (
        "mse-shapes",
        lambda xp: MSELoss(),
        lambda m, xp: m(_zeros(xp, (2, 3)), _zeros(xp, (3, 2))),
        ValueError,
        r"mse_loss: expected prediction and target of one shape, got \(2, 3\) and \(3, 2\)",
    ),
]


@pytest.mark.parametrize(
    ("make", "call", "exc", "match"), [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT]
)
def test_bad_input(xp, make, call, exc, match):
    m = make(xp)
    with pytest.raises(exc, match=match):
        call(m, xp)


def _other(xp):
    """A namespace of another library than ``xp``."""
    if backend.library_name(xp) != "numpy":
        return backend.namespace_for("numpy")
    return backend.namespace_for(
        "torch" if importlib.util.find_spec("torch") else "array_api_strict"
    )


MIXED = [
    ("Linear", lambda xp: Linear(4, 2, xp=xp), lambda o: o.zeros((3, 4), dtype=o.float32)),
    ("Conv2d", lambda xp: Conv2d(3, 2, 3, xp=xp), lambda o: o.zeros((1, 3, 4, 4), dtype=o.float32)),
    (
        "GroupNorm",
        lambda xp: GroupNorm(1, 3, xp=xp),
        lambda o: o.zeros((1, 3, 4, 4), dtype=o.float32),
    ),
    (
        "Attention",
        lambda xp: Attention(4, 2, 2, norm_num_groups=2, xp=xp),
        lambda o: o.zeros((1, 4, 2, 2), dtype=o.float32),
    ),
    ("Embedding", lambda xp: Embedding(5, 3, xp=xp), lambda o: o.zeros((3,), dtype=o.int64)),
]


@pytest.mark.parametrize(("make", "arr"), [m[1:] for m in MIXED], ids=[m[0] for m in MIXED])
def test_mixed_namespaces(xp, make, arr):
    m = make(xp)
    x = arr(_other(xp))
    with pytest.raises(TypeError, match=r"expected arrays of one array library, got "):
        m(x)


def test_mixed_namespaces_names_both_libraries():
    torch = pytest.importorskip("torch")
    m = Linear(4, 2, xp=backend.namespace_for("numpy"))
    with pytest.raises(TypeError, match=r"Linear\(4->2\).*numpy\.ndarray.*torch\.Tensor"):
        m(torch.zeros(3, 4))


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.cached], ids=[c.id for c in CASES if c.cached]
)
def test_backward_before_forward(xp, case):
    m, ins, kw, *_ = _setup(case, xp, "float64")
    with pytest.raises(RuntimeError, match=r"forward"):
        m.backward(_zeros(xp, (1,), "float64"))
    # and only once per forward
    y = m(*ins, **kw)
    m.backward(xp.ones_like(y))
    with pytest.raises(RuntimeError, match=r"call backward once per forward"):
        m.backward(xp.ones_like(y))


@pytest.mark.parametrize(
    ("factory", "exc", "match"),
    [
        (
            lambda: GroupNorm(3, 4),
            ValueError,
            r"GroupNorm: num_groups must divide num_channels, got num_groups=3 and num_channels=4",
        ),
        (
            lambda: GroupNorm(0, 4),
            ValueError,
            r"GroupNorm: expected num_groups to be an integer >= 1",
        ),
        (
            lambda: ResnetBlock2D(in_channels=4, groups=3),
            ValueError,
            r"ResnetBlock2D: expected groups to divide in_channels=4, got 3",
        ),
        (
            lambda: Attention(6, 2, 3, norm_num_groups=4),
            ValueError,
            r"Attention: expected norm_num_groups to divide query_dim=6, got 4",
        ),
        (lambda: Dropout(0.1), ValueError, r"Dropout: only p=0\.0 is supported, got p=0\.1"),
        (lambda: ResnetBlock2D(in_channels=4, groups=2, dropout=0.5), ValueError, r"p=0\.5"),
        (lambda: TimestepEmbedding(4, 8, act_fn="relu"), ValueError, r"only act_fn='silu'"),
        (
            lambda: ResnetBlock2D(in_channels=4, groups=2, non_linearity="mish"),
            ValueError,
            r"only non_linearity='silu'",
        ),
        (lambda: Downsample2D(3, use_conv=False), ValueError, r"only use_conv=True"),
        (lambda: Downsample2D(3, padding=2), ValueError, r"only padding 0 or 1"),
    ],
    ids=[
        "gn-3-of-4",
        "gn-0",
        "resnet-groups",
        "attention-groups",
        "dropout",
        "resnet-dropout",
        "temb-act",
        "resnet-act",
        "down-noconv",
        "down-pad2",
    ],
)
def test_bad_construction(factory, exc, match):
    with pytest.raises(exc, match=match):
        factory()


def test_dropout_zero_is_identity(xp):
    d = Dropout(0.0)
    x = _zeros(xp, (2, 3))
    assert d(x) is x and d.backward(x) is x


def test_mse_loss_value_and_default_backward(xp):
    rng = np.random.default_rng(0)
    p, t = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    loss = MSELoss()
    out = loss(backend.asarray(p, xp), backend.asarray(t, xp))
    assert out.ndim == 0
    assert float(out) == pytest.approx(float(((p - t) ** 2).mean()), rel=1e-14)
    np.testing.assert_allclose(backend.to_numpy(loss.backward()), 2 * (p - t) / 6, rtol=1e-14)


def test_weighted_mse_loss_value_gradient_and_errors(xp):
    from xpdiff.functional.losses import mse_loss

    rng = np.random.default_rng(1)
    p, t = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2, 4))
    w = np.array([0.5, 2.0, 0.0])
    loss, grad = mse_loss(backend.asarray(p, xp), backend.asarray(t, xp), backend.asarray(w, xp))
    per_sample = ((p - t) ** 2).mean(axis=(1, 2))
    assert float(loss) == pytest.approx(float((w * per_sample).mean()), rel=1e-14)
    # the gradient against a central difference of the loss, element by element
    num = np.zeros_like(p)
    for idx in np.ndindex(p.shape):
        d = np.zeros_like(p)
        d[idx] = 1e-6
        lp = ((w[:, None, None] * (p + d - t) ** 2).mean(axis=(1, 2))).mean()
        lm = ((w[:, None, None] * (p - d - t) ** 2).mean(axis=(1, 2))).mean()
        num[idx] = (lp - lm) / 2e-6
    np.testing.assert_allclose(backend.to_numpy(grad), num, rtol=1e-6, atol=1e-10)
    # all-ones weights give the plain mean
    pa, ta = backend.asarray(p, xp), backend.asarray(t, xp)
    ones, _ = mse_loss(pa, ta, backend.asarray(np.ones(3), xp))
    plain, _ = mse_loss(pa, ta)
    assert float(ones) == pytest.approx(float(plain), rel=1e-14)
    with pytest.raises(ValueError, match=r"one weight per sample, shape \(3,\), got \(2,\)"):
        mse_loss(pa, ta, backend.asarray(w[:2], xp))


@pytest.mark.oracle
def test_weighted_mse_loss_vs_torch(xp):
    """An independent reference: PyTorch autograd of the same weighted loss."""
    from xpdiff.functional.losses import mse_loss

    torch = _oracle().torch
    rng = np.random.default_rng(1)
    p, t = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2, 4))
    w = np.array([0.5, 2.0, 0.0])
    loss, grad = mse_loss(backend.asarray(p, xp), backend.asarray(t, xp), backend.asarray(w, xp))
    tp = torch.tensor(p, requires_grad=True)
    ref = (torch.tensor(w) * ((tp - torch.tensor(t)) ** 2).mean(dim=(1, 2))).mean()
    ref.backward()
    assert float(loss) == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(backend.to_numpy(grad), tp.grad.numpy(), rtol=1e-12, atol=1e-15)
