"""The Module system: names, state dicts, gradients, no_grad, moving, containers."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from xpdiff import backend
from xpdiff.nn import init
from xpdiff.nn.blocks import Attention, ResnetBlock2D, TimestepEmbedding
from xpdiff.nn.layers import Conv2d, GroupNorm, Identity, Linear, ReLU, SiLU
from xpdiff.nn.module import (
    Module,
    ModuleList,
    Parameter,
    Sequential,
    is_grad_enabled,
    no_grad,
)
from xpdiff.testing import assert_close, check_backward


class Tiny(Module):
    """Linear -> SiLU -> (Linear, Linear) in a ModuleList; the second child a nested block."""

    def __init__(self, xp=None, dtype="float32"):
        super().__init__()
        self.inp = Linear(3, 4, dtype=dtype, xp=xp)
        self.act = SiLU()
        self.heads = ModuleList(
            [Linear(4, 2, dtype=dtype, xp=xp), Linear(4, 2, bias=False, dtype=dtype, xp=xp)]
        )
        self.scale = Parameter(init.ones((2,), dtype, xp))

    def forward(self, x):
        h = self.act(self.inp(x))
        s = self.heads[0](h) + self.heads[1](h)
        self._save(s)
        return s * self.scale.data

    def backward(self, g):
        xp = backend.get_namespace(g)
        s = self._take()
        self.scale.accumulate(xp.sum(xp.reshape(g * s, (-1, 2)), axis=0))
        gs = g * self.scale.data
        gh = self.heads[0].backward(gs) + self.heads[1].backward(gs)
        return self.inp.backward(self.act.backward(gh))


TINY_NAMES = ["scale", "inp.weight", "inp.bias", "heads.0.weight", "heads.0.bias", "heads.1.weight"]


def _x(xp, shape=(5, 3), dtype="float64", seed=0):
    return backend.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype), xp)


# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------
def test_named_parameters_dotted_names_and_order(xp):
    m = Tiny(xp)
    # own parameters first, then children in assignment order, depth first
    assert [n for n, _ in m.named_parameters()] == TINY_NAMES
    assert list(m.state_dict()) == TINY_NAMES
    assert [n for n, _ in m.named_modules()] == ["", "inp", "act", "heads", "heads.0", "heads.1"]
    assert m.parameters()[1] is m.inp.weight
    assert m.num_parameters() == 2 + 12 + 4 + 8 + 2 + 8
    assert [n for n, _ in m.named_parameters("model")][:2] == ["model.scale", "model.inp.weight"]


def test_resnet_names_are_diffusers_names():
    block = ResnetBlock2D(in_channels=2, out_channels=4, temb_channels=3, groups=2)
    assert list(block.state_dict()) == [
        "norm1.weight",
        "norm1.bias",
        "conv1.weight",
        "conv1.bias",
        "time_emb_proj.weight",
        "time_emb_proj.bias",
        "norm2.weight",
        "norm2.bias",
        "conv2.weight",
        "conv2.bias",
        "conv_shortcut.weight",
        "conv_shortcut.bias",
    ]
    att = Attention(4, 2, 2, norm_num_groups=2)
    assert "to_out.0.weight" in att.state_dict() and "group_norm.weight" in att.state_dict()


def test_reassigning_attributes_updates_registration():
    m = Linear(2, 2)
    m.bias = None
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    m.weight = Identity()  # a module replaces the parameter of that name
    assert [n for n, _ in m.named_modules()] == ["", "weight"]
    assert m.parameters() == []


def test_setattr_before_init_is_refused():
    class Bad(Module):
        def __init__(self):
            self.w = 1

    with pytest.raises(RuntimeError, match=r"Bad: call super\(\).__init__\(\) before"):
        Bad()


def test_parameter_basics(xp):
    p = Parameter(xp.zeros((2, 3), dtype=xp.float32))
    assert p.shape == (2, 3) and p.grad is None
    assert repr(p) == "Parameter(shape=(2, 3), dtype=float32)"
    p.accumulate(xp.ones((2, 3), dtype=xp.float32))
    p.accumulate(xp.ones((2, 3), dtype=xp.float32))
    assert float(xp.sum(p.grad)) == 12.0


# ---------------------------------------------------------------------------
# state dicts
# ---------------------------------------------------------------------------
def test_state_dict_round_trip(xp):
    init.manual_seed(1)
    a = Tiny(xp, "float64")
    init.manual_seed(2)
    b = Tiny(xp, "float64")
    x = _x(xp)
    assert not np.allclose(backend.to_numpy(a.forward(x)), backend.to_numpy(b.forward(x)))
    b.load_state_dict(a.state_dict())
    assert_close(b.forward(x), a.forward(x), rtol=0)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and pa.data is not pb.data  # copied, not shared
        assert backend.get_namespace(pb.data) is xp and pb.grad is None


def test_load_state_dict_from_other_library_and_dtype(xp):
    """Arrays of another library/dtype are moved to each parameter's namespace and dtype."""
    init.manual_seed(1)
    src = Tiny(backend.namespace_for("numpy"), "float64")
    dst = Tiny(xp, "float32")
    dst.load_state_dict({k: np.asarray(v) for k, v in src.state_dict().items()})
    for name, p in dst.named_parameters():
        assert backend.get_namespace(p.data) is xp, name
        assert backend.dtype_name(p.dtype) == "float32", name
        np.testing.assert_allclose(backend.to_numpy(p.data), src.state_dict()[name], rtol=1e-6)


def test_load_state_dict_lists_every_problem():
    m = Tiny()
    sd = dict(m.state_dict())
    del sd["inp.bias"], sd["heads.1.weight"]
    sd["extra.a"] = np.zeros(2)
    sd["extra.b"] = np.zeros(2)
    sd["scale"] = np.zeros(3)
    sd["heads.0.weight"] = np.zeros((4, 2))
    with pytest.raises(KeyError) as info:
        m.load_state_dict(sd)
    msg = str(info.value)
    assert "Tiny.load_state_dict" in msg
    assert "missing keys (2): inp.bias, heads.1.weight" in msg
    assert "unexpected keys (2): extra.a, extra.b" in msg
    assert "shape mismatches (2)" in msg
    assert "scale: expected (2,), got (3,)" in msg
    assert "heads.0.weight: expected (2, 4), got (4, 2)" in msg
    # nothing was loaded on failure
    assert backend.to_numpy(m.scale.data).tolist() == [1.0, 1.0]


def test_load_state_dict_non_strict():
    m = Tiny()
    sd = {"inp.bias": np.full(4, 3.0), "unknown": np.zeros(1)}
    m.load_state_dict(sd, strict=False)
    assert backend.to_numpy(m.inp.bias.data).tolist() == [3.0] * 4
    with pytest.raises(KeyError, match=r"shape mismatches \(1\): inp.bias: expected \(4,\)"):
        m.load_state_dict({"inp.bias": np.zeros(5)}, strict=False)


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------
def test_zero_grad_and_accumulation(xp):
    init.manual_seed(0)
    m = Sequential(
        [Linear(3, 4, dtype="float64", xp=xp), SiLU(), Linear(4, 2, dtype="float64", xp=xp)]
    )
    x = _x(xp)
    g = _x(xp, (5, 2), seed=1)
    m(x)
    gx1 = m.backward(g)
    once = {n: backend.to_numpy(p.grad).copy() for n, p in m.named_parameters()}
    m(x)
    gx2 = m.backward(g)
    assert_close(gx2, gx1, rtol=0)  # the input gradient is returned, not accumulated
    for n, p in m.named_parameters():
        np.testing.assert_allclose(backend.to_numpy(p.grad), 2 * once[n], rtol=1e-13)
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    m(x)
    m.backward(g)
    for n, p in m.named_parameters():
        np.testing.assert_allclose(backend.to_numpy(p.grad), once[n], rtol=1e-13)


def test_no_grad_keeps_no_cache(xp):
    m = Sequential([Conv2d(2, 3, 3, padding=1, xp=xp), GroupNorm(1, 3, xp=xp), SiLU()])
    x = _x(xp, (1, 2, 4, 4), "float32")
    assert is_grad_enabled()
    with no_grad():
        assert not is_grad_enabled()
        y = m(x)
    assert is_grad_enabled()
    assert all(mod._cache is None for mod in m.modules())
    with pytest.raises(RuntimeError, match=r"SiLU.backward: no forward cache; call forward"):
        m.backward(xp.ones_like(y))
    # a forward with gradients afterwards works again
    m(x)
    assert m.backward(xp.ones_like(y)).shape == x.shape


def test_no_grad_restores_after_error_and_nests():
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            raise ZeroDivisionError
    assert is_grad_enabled()
    with no_grad():
        with no_grad():
            pass
        assert not is_grad_enabled()
    assert is_grad_enabled()


# ---------------------------------------------------------------------------
# moving, modes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target",
    [
        pytest.param(
            "torch",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("torch") is None, reason="torch is not installed"
            ),
        ),
        "array_api_strict",
        "numpy",
    ],
)
def test_to_backend_and_dtype(target):
    init.manual_seed(0)
    m = TimestepEmbedding(3, 4)
    before = {n: backend.to_numpy(p.data).copy() for n, p in m.named_parameters()}
    m(backend.asarray(np.ones((2, 3), np.float32)))
    m.backward(backend.asarray(np.ones((2, 4), np.float32)))
    assert m.to(target, dtype="float64") is m
    xp = backend.namespace_for(target)
    for n, p in m.named_parameters():
        assert backend.library_name(backend.get_namespace(p.data)) == target, n
        assert backend.dtype_name(p.dtype) == "float64", n
        assert p.grad is None, n
        np.testing.assert_array_equal(backend.to_numpy(p.data), before[n].astype(np.float64))
    y = m(xp.ones((2, 3), dtype=xp.float64))
    assert backend.dtype_name(y.dtype) == "float64" and backend.get_namespace(y) is xp
    m.to(dtype="float32")  # dtype only: stays in its namespace
    assert all(backend.dtype_name(p.dtype) == "float32" for p in m.parameters())
    assert all(backend.get_namespace(p.data) is xp for p in m.parameters())


def test_to_rejects_bad_dtype_and_backend():
    m = Linear(2, 2)
    with pytest.raises(
        ValueError, match=r"Linear.to: dtype must be float32 or float64, got 'int8'"
    ):
        m.to(dtype="int8")
    with pytest.raises(ValueError, match=r"namespace_for: expected numpy"):
        m.to("jax")


# ---------------------------------------------------------------------------
# containers
# ---------------------------------------------------------------------------
def test_module_list():
    a, b = Linear(2, 3), ReLU()
    ml = ModuleList([a])
    ml.append(b)
    assert len(ml) == 2 and ml[0] is a and ml[1] is b and ml[-1] is b
    assert list(ml) == [a, b]
    assert [n for n, _ in ml.named_parameters()] == ["0.weight", "0.bias"]
    assert "(0): Linear()" in repr(ml) and "(1): ReLU()" in repr(ml)
    assert ModuleList().parameters() == []


def test_sequential_forward_backward(xp):
    init.manual_seed(3)
    seq = Sequential(
        [
            Linear(3, 5, dtype="float64", xp=xp),
            SiLU(),
            Linear(5, 4, dtype="float64", xp=xp),
            ReLU(),
            Identity(),
        ]
    )
    x = _x(xp)
    y = seq(x)
    manual = x
    for mod in seq:
        manual = mod(manual)
    assert_close(y, manual, rtol=0)
    check_backward(seq, [x])
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_custom_module_backward(xp):
    init.manual_seed(4)
    m = Tiny(xp, "float64")
    m.scale.data = _x(xp, (2,), seed=7)
    res = check_backward(m, [_x(xp)])
    assert set(res) == {"input 0", *TINY_NAMES}


def test_state_dict_is_json_describable():
    # names and shapes of a state dict make a plain JSON manifest
    sd = Tiny().state_dict()
    manifest = json.dumps({k: list(v.shape) for k, v in sd.items()})
    assert json.loads(manifest)["heads.0.weight"] == [2, 4]


def test_namespace_dtype_and_device_of_a_module(xp):
    m = Sequential([SiLU(), Linear(3, 2, dtype="float64", xp=xp)])
    assert m.xp is xp and backend.dtype_name(m.dtype) == "float64"
    assert m.device == backend.device(m[1].weight.data)
    with pytest.raises(AttributeError, match="SiLU has no parameters"):
        _ = SiLU().dtype


def test_seeded_initialisation_leaves_the_global_generator_alone():
    def weights():
        return backend.to_numpy(Linear(3, 2).weight.data)

    init.manual_seed(3)
    first = weights()
    init.manual_seed(3)
    with init.seeded(7):
        inside = weights()
    np.testing.assert_array_equal(weights(), first)  # as if nothing had been drawn
    with init.seeded(7):
        np.testing.assert_array_equal(weights(), inside)
    assert not np.array_equal(inside, first)


def test_package_faces_re_export_every_public_name():
    import xpdiff.functional as F
    from xpdiff import nn
    from xpdiff.functional import (
        activations,
        attention,
        conv,
        embeddings,
        linear,
        losses,
        norm,
        resampling,
    )
    from xpdiff.nn import blocks, layers, module

    for mod in (activations, attention, conv, embeddings, linear, losses, norm, resampling):
        assert all(getattr(F, name) is getattr(mod, name) for name in mod.__all__)
    for mod in (blocks, layers, module):
        assert all(getattr(nn, name) is getattr(mod, name) for name in mod.__all__)
    assert nn.init is init
