"""Optimisers against PyTorch's (oracle tests, skipped without torch), and the schedule,
clipping and EMA formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xpdiff import backend
from xpdiff.nn.layers import Linear
from xpdiff.nn.module import Module
from xpdiff.optim import EMA, SGD, AdamW, clip_grad_norm, warmup_cosine


class Net(Module):
    def __init__(self):
        super().__init__()
        self.a = Linear(4, 3, dtype="float64", xp=backend.namespace_for("numpy"))
        self.b = Linear(3, 2, dtype="float64", xp=backend.namespace_for("numpy"))

    def forward(self, x):
        return self.b(self.a(x))

    def backward(self, g):
        return self.a.backward(self.b.backward(g))


def _torch():
    return pytest.importorskip("torch")


def torch_twin(net: Net):
    torch = _torch()
    tn = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    with torch.no_grad():
        for (_, p), t in zip(net.named_parameters(), tn.parameters(), strict=True):
            t.copy_(torch.from_numpy(np.array(p.data)))
    return tn


@pytest.mark.oracle
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_over_steps(weight_decay):
    torch = _torch()
    rng = np.random.default_rng(0)
    net = Net()
    tn = torch_twin(net)
    opt = AdamW(net, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    topt = torch.optim.AdamW(
        tn.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay
    )
    for step in range(5):
        x = rng.standard_normal((6, 4))
        net.zero_grad()
        y = net(x)
        net.backward(2 * y)  # d/dy of sum(y^2)
        opt.lr = topt.param_groups[0]["lr"] = 1e-2 * (step + 1)  # a changing schedule
        opt.step()
        topt.zero_grad()
        (tn(torch.from_numpy(x)) ** 2).sum().backward()
        topt.step()
    for (_, p), t in zip(net.named_parameters(), tn.parameters(), strict=True):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_adamw_state_round_trip_continues_identically():
    rng = np.random.default_rng(1)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    oa, ob = AdamW(a, lr=1e-2), AdamW(b, lr=1e-2)
    xs = [rng.standard_normal((5, 4)) for _ in range(4)]
    for i, x in enumerate(xs):
        for net, opt in ((a, oa), (b, ob)):
            net.zero_grad()
            net.backward(net(x))
            opt.step()
        if i == 1:  # b's optimiser is rebuilt from a saved state
            arrays, scalars = ob.state_dict()
            ob = AdamW(b, lr=1e-2)
            ob.load_state_dict(arrays, scalars)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert np.array_equal(p.data, q.data)


def test_sgd_step():
    net = Net()
    before = np.array(net.a.weight.data)
    net.zero_grad()
    net.backward(net(np.ones((2, 4))))
    g = np.array(net.a.weight.grad)
    SGD(net, lr=0.5).step()
    np.testing.assert_allclose(net.a.weight.data, before - 0.5 * g)


@pytest.mark.oracle
def test_clip_grad_norm_matches_torch():
    torch = _torch()
    rng = np.random.default_rng(2)
    net = Net()
    tn = torch_twin(net)
    x = rng.standard_normal((6, 4))
    net.zero_grad()
    net.backward(10 * net(x))
    (5 * tn(torch.from_numpy(x)) ** 2).sum().backward()
    norm = clip_grad_norm(net, 1.0)
    tnorm = torch.nn.utils.clip_grad_norm_(tn.parameters(), 1.0)
    assert math.isclose(norm, float(tnorm), rel_tol=1e-12)
    for (_, p), t in zip(net.named_parameters(), tn.parameters(), strict=True):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-9)


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 1.0, 10, 110, 0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] > 0.1


def test_ema_formula_and_copy():
    net = Net()
    ema = EMA(net, decay=0.9)
    w0 = np.array(net.a.weight.data)
    net.a.weight.data = w0 + 1.0
    ema.update(net)  # d = min(0.9, 2/11)
    d = 2 / 11
    np.testing.assert_allclose(ema.shadow["a.weight"], d * w0 + (1 - d) * (w0 + 1.0))
    other = Net()
    ema.copy_to(other)
    np.testing.assert_allclose(other.a.weight.data, ema.shadow["a.weight"])
