"""UNet2DModel: keys, a float64 diffusers oracle, odd sizes, training signal, backends, files.

The oracle builds diffusers' ``UNet2DModel`` with ``torch.manual_seed``, converts it
to float64, loads its weights into ``xpdiff.models.UNet2DModel`` (float64), feeds
both the same sample / timesteps / class labels and compares the output, the input
gradient and every parameter gradient of ``L = sum(y * gy)``.

Both libraries compute the sinusoidal timestep embedding in float32 (as diffusers
does) and then cast it.  NumPy's and PyTorch's float32 ``exp`` can differ by one
ulp, which moves ``t * freq`` by up to ~1e-4 for t ~ 1000 and so moves the
embedding by ~1e-5: that float32 noise would swamp a float64 comparison.  So the
main oracle gives diffusers' ``time_proj`` xpdiff's embedding values (the
embedding itself is compared separately, to float32 accuracy, in
``test_timestep_embedding_matches_diffusers`` and ``test_oracle_unshared_embedding``).

Run ``pytest tests/test_unet.py -s`` to see the measured differences.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from xpdiff import backend, io
from xpdiff.functional.embeddings import timestep_embedding
from xpdiff.models import UNet2DModel
from xpdiff.testing import check_backward

DATA = Path(__file__).parent / "data"
KEY_FILES = ["unet2d_seed14_keys.tsv", "unet2d_mnist28_keys.tsv"]


def read_keys(name: str) -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    """(config, [(key, shape), ...]) from a reference .tsv: JSON config on comment line 2."""
    lines = (DATA / name).read_text().splitlines()
    comments = [ln[1:].strip() for ln in lines if ln.startswith("#")]
    cfg = json.loads(next(c for c in comments if c.startswith("{")))
    keys = []
    for ln in lines:
        if ln.startswith("#") or not ln.strip():
            continue
        key, shape = ln.split("\t")
        keys.append((key, tuple(int(s) for s in re.findall(r"\d+", shape))))
    return cfg, keys


SEED14, _ = read_keys("unet2d_seed14_keys.tsv")
MNIST28, _ = read_keys("unet2d_mnist28_keys.tsv")

# Everything unusual at once: three levels, mixed block types, 3 groups of 4..8
# channels, 2..4 heads, one layer per block, separate mid-attention groups, own
# time-embedding width, un-flipped embedding with freq_shift 1, centring.
ODD = {
    "sample_size": 12,
    "in_channels": 2,
    "out_channels": 3,
    "center_input_sample": True,
    "time_embedding_dim": 40,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"],
    "block_out_channels": [12, 18, 24],
    "layers_per_block": 1,
    "mid_block_scale_factor": 1.3,
    "attention_head_dim": 6,
    "norm_num_groups": 3,
    "attn_norm_num_groups": 4,
    "norm_eps": 1e-6,
    "num_class_embeds": 5,
}

# No mid block attention, heads as wide as the channels (attention_head_dim None).
NOATTN_MID = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 2,
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "attention_head_dim": None,
    "norm_num_groups": 4,
    "add_attention": False,
}

# Small model for backends, dtypes, files and error tests.
SMALL = {
    "sample_size": 6,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "norm_num_groups": 4,
    "num_class_embeds": 3,
}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These models are tiny: torch's thread pool only costs time here, a lot of it on a
    busy 2-core machine.  Restored afterwards for the other test files."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def numpy_grads(model) -> dict[str, np.ndarray]:
    return {n: backend.to_numpy(p.grad) for n, p in model.named_parameters()}


def run_xpdiff(model, x, t, c, gy):
    """Forward + backward of L = sum(y * gy); returns (y, gx, {name: grad}) on the host."""
    model.zero_grad()
    y = model(x, t, c)
    gx = model.backward(gy)
    return backend.to_numpy(y), backend.to_numpy(gx), numpy_grads(model)


def diffusers_model(cfg: dict, seed: int = 0, share_embedding: bool = True):
    """diffusers' UNet2DModel, float64, randomly initialised from ``seed``.

    With ``share_embedding`` its ``time_proj`` returns xpdiff's float32 embedding
    (see the module docstring); diffusers' own timestep handling (scalars, 0-d,
    broadcasting) still runs before it.
    """
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    d = diffusers.UNet2DModel(**cfg).double()
    if share_embedding:
        tp = d.time_proj

        def forward(t):
            emb = timestep_embedding(
                t.detach().numpy(), tp.num_channels, tp.flip_sin_to_cos, tp.downscale_freq_shift
            )
            return torch.from_numpy(np.array(emb))

        tp.forward = forward
    return d


def xpdiff_from(d, cfg: dict, dtype: str = "float64", xp=np):
    m = UNet2DModel(**cfg, dtype=dtype, xp=xp)
    m.load_state_dict({k: v.detach().cpu().numpy() for k, v in d.state_dict().items()})
    return m


def run_diffusers(d, x, t, c, gy, forward=None):
    """Forward + backward (autograd) of L = sum(y * gy) in diffusers; host arrays out."""
    import torch

    d.zero_grad(set_to_none=True)
    xt = torch.tensor(x, requires_grad=True)
    tt = torch.tensor(t) if isinstance(t, np.ndarray) else t
    ct = None if c is None else torch.tensor(c)
    y = forward(xt, tt, ct) if forward else d(xt, tt, class_labels=ct).sample
    (y * torch.tensor(gy)).sum().backward()
    grads = {
        n: p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape))
        for n, p in d.named_parameters()
    }
    return y.detach().numpy(), xt.grad.numpy(), grads


def compare_grads(ours: dict, ref: dict, tol: float):
    """(worst relative error, tensor), (worst over the theoretically-zero tensors,
    tensor), failures.

    Each tensor is compared relative to max(|ref|max, 1e-9 * global max |grad|):
    some gradients are exactly zero in theory (attention ``to_k.bias`` is
    invariant under softmax's shift; ``conv1.bias`` / ``time_emb_proj`` of a
    resnet whose norm2 has one channel per group is cancelled by that norm), and
    there both sides hold ~1e-15 round-off noise that no relative test can match.
    """
    assert set(ours) == set(ref)
    gmax = max(float(np.abs(g).max()) for g in ref.values())
    worst, worst_zero, failures = (0.0, ""), (0.0, ""), []
    for name, r in ref.items():
        floor = 1e-9 * gmax
        scale = max(float(np.abs(r).max()), floor)
        err = float(np.abs(ours[name] - r).max()) / scale
        if scale > floor:
            worst = max(worst, (err, name))
        else:
            worst_zero = max(worst_zero, (err, name))
        if err > tol:
            failures.append(f"{name}: {err:.3g}")
    return worst, worst_zero, failures


def _report(label, e_y, e_gx, worst, worst_zero):
    zero = (
        f"; zero-in-theory tensors {worst_zero[0]:.1e} of 1e-9*max|grad| ({worst_zero[1]})"
        if worst_zero[1]
        else ""
    )
    print(
        f"\n[{label}] forward {e_y:.2e}  input grad {e_gx:.2e}  worst param grad "
        f"{worst[0]:.2e} ({worst[1]}){zero}"
    )


def oracle(cfg, x, t, c, gy, *, label, share_embedding=True, fwd_tol=1e-6, grad_tol=1e-5, seed=0):
    d = diffusers_model(cfg, seed, share_embedding)
    m = xpdiff_from(d, cfg)
    y, gx, grads = run_xpdiff(m, x, t, c, gy)
    ry, rgx, rgrads = run_diffusers(d, x, t, c, gy)
    e_y, e_gx = rel(y, ry), rel(gx, rgx)
    worst, worst_zero, failures = compare_grads(grads, rgrads, grad_tol)
    _report(f"oracle {label}", e_y, e_gx, worst, worst_zero)
    assert y.shape == ry.shape
    assert e_y <= fwd_tol, f"{label}: forward differs by {e_y:.3g}"
    assert e_gx <= grad_tol, f"{label}: input gradient differs by {e_gx:.3g}"
    assert not failures, f"{label}: parameter gradients differ: {failures}"
    return e_y, e_gx, worst[0]


def inputs(cfg, batch, hw, seed=0, labels=None):
    rng = np.random.default_rng(seed)
    h, w = hw
    x = rng.standard_normal((batch, cfg["in_channels"], h, w))
    t = rng.integers(0, 1000, size=batch)
    gy = rng.standard_normal((batch, cfg["out_channels"], h, w))
    if labels is None and cfg.get("num_class_embeds"):
        labels = [1] * batch  # one class label repeated over the batch
    c = None if labels is None else np.asarray(labels, dtype=np.int64)
    return x, t, c, gy


# ---------------------------------------------------------------------------
# 1. keys and shapes (no torch)
# ---------------------------------------------------------------------------
def _group(name: str) -> str:
    """The ModuleList a parameter lives in: ``down_blocks.1.attentions``, ``mid_block.resnets``."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        return ".".join(parts[:3])
    if parts[0] == "mid_block":
        return ".".join(parts[:2])
    return parts[0]


@pytest.mark.parametrize("name", KEY_FILES)
def test_keys_and_shapes_match_reference(name):
    cfg, ref = read_keys(name)
    m = UNet2DModel(**cfg, dtype="float32", xp=np)
    ours = [(n, p.shape) for n, p in m.named_parameters()]
    assert len(ours) == len(ref)
    assert dict(ours) == dict(ref)
    assert sorted(m.state_dict()) == sorted(k for k, _ in ref)
    # Order: the same within every ModuleList (``down_blocks.1.resnets``...), but
    # diffusers registers a block's ``attentions`` before its ``resnets`` and
    # ``up_blocks`` before ``mid_block`` (it assigns ``self.mid_block = None`` first,
    # which torch does not register); xpdiff registers in forward order.
    # Checkpoints are keyed by name, so this does not matter for file exchange.
    ours_n, ref_n = [n for n, _ in ours], [k for k, _ in ref]
    for g in dict.fromkeys(_group(k) for k in ref_n):
        assert [n for n in ours_n if _group(n) == g] == [k for k in ref_n if _group(k) == g], g
    print(f"\n[keys {name}] {len(ours)} parameters; identical order: {ours_n == ref_n}")


def test_config_round_trips_constructor_arguments():
    m = UNet2DModel(**ODD, dtype="float32", xp=np)
    for k, v in ODD.items():
        assert m.config[k] == v, k
    assert m.config["num_train_timesteps"] is None


# ---------------------------------------------------------------------------
# 2. + 3. float64 oracle against diffusers
# ---------------------------------------------------------------------------
ORACLE_CASES = [
    pytest.param(SEED14, 2, (14, 14), [7, 7], id="seed14"),
    pytest.param(MNIST28, 2, (28, 28), [3, 3], id="mnist28"),
    pytest.param(ODD, 3, (8, 12), [2, 0, 2], id="odd"),
    pytest.param(NOATTN_MID, 2, (8, 8), None, id="noattn_mid"),
    pytest.param(
        {**NOATTN_MID, "mid_block_type": None, "num_class_embeds": 2},
        2,
        (6, 4),
        [1, 1],
        id="no_mid_block",
    ),
]


@pytest.mark.oracle
@pytest.mark.parametrize("cfg,batch,hw,labels", ORACLE_CASES)
def test_oracle_float64(cfg, batch, hw, labels):
    x, t, c, gy = inputs(cfg, batch, hw, labels=labels)
    t[0] = 999  # the largest DDPM timestep, where float32 embedding phases are worst
    oracle(cfg, x, t, c, gy, label=f"{hw} {cfg['block_out_channels']}")


@pytest.mark.oracle
@pytest.mark.parametrize("cfg,label", [(SEED14, "seed14"), (ODD, "odd")])
def test_oracle_unshared_embedding(cfg, label):
    """diffusers entirely as is (its own float32 torch embedding): float32 noise only."""
    batch = 2
    hw = (14, 14) if cfg is SEED14 else (8, 12)
    x, t, c, gy = inputs(cfg, batch, hw, seed=1)
    t[:] = [999, 500]
    oracle(
        cfg,
        x,
        t,
        c,
        gy,
        label=f"{label}, diffusers' own embedding",
        share_embedding=False,
        fwd_tol=1e-5,
        grad_tol=1e-4,
    )


@pytest.mark.oracle
def test_timestep_embedding_matches_diffusers():
    torch = pytest.importorskip("torch")
    emb_mod = pytest.importorskip("diffusers.models.embeddings")
    t = np.array([0, 1, 17, 500, 999], dtype=np.int64)
    for dim, flip, shift in [(32, True, 0), (12, False, 1), (7, True, 1)]:
        ours = timestep_embedding(t, dim, flip, shift)
        ref = emb_mod.get_timestep_embedding(torch.tensor(t), dim, flip, shift).numpy()
        assert ours.dtype == np.float32
        # float32 phases of t * freq (t < 1000) agree to a few ulp of 1000
        assert np.abs(ours - ref).max() < 1e-4  # measured 1.5e-5 (dim 32, t < 1000)


@pytest.mark.oracle
def test_oracle_timestep_forms():
    """Scalar, 0-d, (1,) and non-int64 timesteps are broadcast and embedded as diffusers'."""
    torch = pytest.importorskip("torch")
    cfg = ODD
    x, _, c, gy = inputs(cfg, 3, (4, 8), seed=2, labels=[4, 0, 4])
    d = diffusers_model(cfg, seed=3)
    m = xpdiff_from(d, cfg)
    frac = np.array([12.5, 600.25, 3.75])
    i32 = np.array([5, 900, 41], dtype=np.int32)
    forms = {
        "python int": (250, 250),
        "0-d int64": (np.asarray(731, dtype=np.int64), torch.tensor(731)),
        "shape (1,)": (np.array([12]), torch.tensor([12])),
        "fractional float64": (frac, torch.tensor(frac)),
        "int32": (i32, torch.tensor(i32)),
    }
    # NB: diffusers turns a python *float* timestep into int64 (truncating 3.7 to 3);
    # xpdiff embeds it as float32 3.7, so python floats are not compared here.
    outs = []
    for kind, (ours_t, ref_t) in forms.items():
        y, gx, grads = run_xpdiff(m, x, ours_t, c, gy)
        ry, rgx, rgrads = run_diffusers(d, x, ref_t, c, gy)
        worst, worst_zero, failures = compare_grads(grads, rgrads, 1e-5)
        _report(f"timesteps {kind}", rel(y, ry), rel(gx, rgx), worst, worst_zero)
        assert rel(y, ry) <= 1e-6, kind
        assert rel(gx, rgx) <= 1e-5, kind
        assert not failures, (kind, failures)
        outs.append(y)
    # the same scalar given every way gives one output
    same = [
        m(x, f, c)
        for f in (731, np.asarray(731), np.array([731]), np.array([731] * 3), np.array([731.0]))
    ]
    for y in same[1:]:
        np.testing.assert_array_equal(y, same[0])


@pytest.mark.oracle
@pytest.mark.parametrize(
    "cfg,sizes",
    [
        (SEED14, [(6, 10), (16, 16), (4, 2)]),
        (ODD, [(12, 20), (4, 4)]),
        (NOATTN_MID, [(10, 6)]),
    ],
    ids=["seed14", "odd", "noattn_mid"],
)
def test_oracle_sizes(cfg, sizes):
    """Other (even, non-square) sizes that diffusers' 2x upsampling supports: forward only."""
    torch = pytest.importorskip("torch")
    from xpdiff.nn.module import no_grad

    d = diffusers_model(cfg, seed=5)
    m = xpdiff_from(d, cfg)
    for hw in sizes:
        x, t, c, _ = inputs(cfg, 1, hw, seed=4)
        with no_grad():
            y = m(x, t, c)
        with torch.no_grad():
            ry = d(
                torch.tensor(x),
                torch.tensor(t),
                class_labels=None if c is None else torch.tensor(c),
            ).sample.numpy()
        print(f"\n[size {hw} {cfg['block_out_channels']}] forward {rel(y, ry):.2e}")
        assert y.shape == ry.shape == (1, cfg["out_channels"], *hw)
        assert rel(y, ry) <= 1e-6


# ---------------------------------------------------------------------------
# 4. sizes diffusers cannot do: 14x14 with three levels (14 -> 7 -> 4 -> 7 -> 14)
# ---------------------------------------------------------------------------
SEED14_3 = {
    **SEED14,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}

TINY3 = {
    "sample_size": 7,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 8, 8],
    "norm_num_groups": 4,
    "attention_head_dim": 4,
    "layers_per_block": 1,
    "num_class_embeds": 3,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def _diffusers_forward_with_sizes(d):
    """diffusers' UNet2DModel forward, but each upsampler goes to the size of the next
    skip state (as UNet2DConditionModel's ``upsample_size`` does) -- what xpdiff does."""
    import torch

    def forward(sample, timestep, class_labels):
        t = timestep * torch.ones(sample.shape[0], dtype=timestep.dtype)
        emb = d.time_embedding(d.time_proj(t).to(sample.dtype))
        if d.class_embedding is not None:
            emb = emb + d.class_embedding(class_labels)
        h = d.conv_in(sample)
        res = [h]
        for block in d.down_blocks:
            h, states = block(hidden_states=h, temb=emb)
            res.extend(states)
        h = d.mid_block(h, emb)
        for block in d.up_blocks:
            n = len(block.resnets)
            skips, res = res[-n:], res[:-n]
            attns = getattr(block, "attentions", [None] * n)
            for resnet, attn in zip(block.resnets, attns, strict=True):
                h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
                if attn is not None:
                    h = attn(h)
            if block.upsamplers is not None:
                h = block.upsamplers[0](h, tuple(res[-1].shape[2:]))
        return d.conv_out(d.conv_act(d.conv_norm_out(h)))

    return forward


@pytest.mark.oracle
def test_three_levels_on_14x14_against_diffusers_blocks():
    torch = pytest.importorskip("torch")
    cfg = SEED14_3
    x, t, c, gy = inputs(cfg, 2, (14, 14), seed=6, labels=[5, 5])
    d = diffusers_model(cfg, seed=7)
    # diffusers' own forward cannot: it upsamples 4 -> 8 and then meets a 7x7 skip state
    with pytest.raises(RuntimeError), torch.no_grad():
        d(torch.tensor(x), torch.tensor(t), class_labels=torch.tensor(c))
    m = xpdiff_from(d, cfg)
    y, gx, grads = run_xpdiff(m, x, t, c, gy)
    assert y.shape == (2, 1, 14, 14) and gx.shape == x.shape
    assert all(np.isfinite(g).all() for g in grads.values())
    ry, rgx, rgrads = run_diffusers(d, x, t, c, gy, forward=_diffusers_forward_with_sizes(d))
    worst, worst_zero, failures = compare_grads(grads, rgrads, 1e-5)
    _report(
        "oracle 14x14 three levels, diffusers blocks + upsample_size",
        rel(y, ry),
        rel(gx, rgx),
        worst,
        worst_zero,
    )
    assert rel(y, ry) <= 1e-6
    assert rel(gx, rgx) <= 1e-5
    assert not failures, failures


@pytest.mark.parametrize("hw", [(7, 7), (5, 6)])
def test_three_levels_finite_differences(hw):
    """7 -> 4 -> 2 -> 4 -> 7 (and 5x6 -> 3x3 -> 2x2): every parameter and the input."""
    m = UNet2DModel(**TINY3, dtype="float64", xp=np)
    rng = np.random.default_rng(8)
    # perturb the GroupNorm affine weights away from 1 / 0, so they are checked generically
    for n, p in m.named_parameters():
        if "norm" in n:
            p.data = p.data + 0.3 * rng.standard_normal(p.shape)
    x = rng.standard_normal((1, 1, *hw))
    # atol 1e-8 (default 1e-9): to_k.bias has an exactly-zero gradient, where the central
    # difference of L ~ 1 gives only round-off, ~1e-16 / eps = ~1e-10..1e-9.
    res = check_backward(m, [x, np.array([613]), np.array([2])], rtol=1e-6, atol=1e-8)
    assert len(res) == 1 + len(list(m.named_parameters()))


# ---------------------------------------------------------------------------
# 5. every parameter trains
# ---------------------------------------------------------------------------
def _grads_after_one_step(cfg, hw, seed=9):
    m = UNet2DModel(**cfg, dtype="float64", xp=np)
    x, t, c, gy = inputs(
        cfg, 2, hw, seed=seed, labels=[0, 1] if cfg.get("num_class_embeds") else None
    )
    _, _, grads = run_xpdiff(m, x, t, c, gy)
    return grads


def test_every_parameter_gets_a_gradient():
    """With fewer groups than channels everywhere, no gradient is zero -- except
    attention ``to_k.bias``: adding b to every key adds q.b to every logit of a
    query's row, which softmax ignores, so d L / d to_k.bias = 0 exactly."""
    cfg = {**SEED14, "norm_num_groups": 8}
    grads = _grads_after_one_step(cfg, (14, 14))
    assert set(grads) == {k for k, _ in read_keys("unet2d_seed14_keys.tsv")[1]}
    gmax = max(float(np.abs(g).max()) for g in grads.values())
    for name, g in grads.items():
        assert np.isfinite(g).all(), name
        if name.endswith("to_k.bias"):
            assert np.abs(g).max() <= 1e-10 * gmax, name
        else:
            assert np.abs(g).max() > 1e-6 * gmax, f"{name} gets no gradient"


# seed14 config (norm_num_groups 32) with its 32-channel level: there GroupNorm has
# ONE channel per group, i.e. it removes each channel's spatial mean.  A per-channel
# constant added just before such a norm is cancelled, so its gradient is zero:
#   * in every resnet with 32 output channels (down_blocks.0.resnets.0/1,
#     up_blocks.1.resnets.0/1/2), conv1.bias and time_emb_proj.{weight,bias}: the
#     time embedding is added per channel right before norm2 -- these resnets cannot
#     see the timestep or class at all (an architectural fact of diffusers' model);
#   * up_blocks.1.resnets.2.conv2.bias and .conv_shortcut.bias: that resnet's output
#     goes straight into conv_norm_out (32 groups, 32 channels);
#   * every attention's to_k.bias (softmax shift invariance, as above).
SEED14_ZERO_GRAD = {
    *(
        f"{r}.{p}"
        for r in [
            "down_blocks.0.resnets.0",
            "down_blocks.0.resnets.1",
            "up_blocks.1.resnets.0",
            "up_blocks.1.resnets.1",
            "up_blocks.1.resnets.2",
        ]
        for p in ["conv1.bias", "time_emb_proj.weight", "time_emb_proj.bias"]
    ),
    "up_blocks.1.resnets.2.conv2.bias",
    "up_blocks.1.resnets.2.conv_shortcut.bias",
    *(
        f"{a}.to_k.bias"
        for a in [
            "down_blocks.1.attentions.0",
            "down_blocks.1.attentions.1",
            "mid_block.attentions.0",
            "up_blocks.0.attentions.0",
            "up_blocks.0.attentions.1",
            "up_blocks.0.attentions.2",
        ]
    ),
}


def test_seed14_zero_gradients_are_the_architectural_ones():
    grads = _grads_after_one_step(SEED14, (14, 14))
    gmax = max(float(np.abs(g).max()) for g in grads.values())
    zero = {n for n, g in grads.items() if np.abs(g).max() <= 1e-10 * gmax}
    assert zero == SEED14_ZERO_GRAD
    for n, g in grads.items():
        assert np.isfinite(g).all(), n
        if n not in zero:
            assert np.abs(g).max() > 1e-6 * gmax, n


# ---------------------------------------------------------------------------
# 6. other namespaces, float32
# ---------------------------------------------------------------------------
def _small_reference(seed=10):
    ref = UNet2DModel(**SMALL, dtype="float64", xp=np)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 1, 6, 6))
    t = np.array([3, 870])
    c = np.array([2, 2])
    gy = rng.standard_normal((2, 1, 6, 6))
    y, gx, grads = run_xpdiff(ref, x, t, c, gy)
    return ref, (x, t, c, gy), (y, gx, grads)


def test_namespaces_float64_match_numpy(xp):
    ref, (x, t, c, gy), (y, gx, grads) = _small_reference()
    m = UNet2DModel(**SMALL, dtype="float64", xp=xp)
    m.load_state_dict(ref.state_dict())
    args = [backend.asarray(a, xp) for a in (x, t, c, gy)]
    oy, ogx, ograds = run_xpdiff(m, *args)
    out = m(args[0], 5, args[2])
    assert backend.get_namespace(out) is backend.get_namespace(args[0])
    # The timestep embedding is computed in float32 (as diffusers does) by the
    # namespace itself: torch's / CuPy's float32 exp and sin differ from NumPy's by
    # an ulp, i.e. ~1e-7 after the float64 network.  array_api_strict runs NumPy.
    same_math = backend.library_name(xp) in ("numpy", "array_api_strict")
    tol = 1e-12 if same_math else 1e-6
    assert rel(oy, y) < tol
    assert rel(ogx, gx) < tol
    _, _, failures = compare_grads(ograds, grads, tol if same_math else 1e-5)
    assert not failures, failures


def test_namespaces_float32_keeps_dtype(xp):
    ref, (x, t, c, gy), (y, gx, grads) = _small_reference()
    m = UNet2DModel(**SMALL, dtype="float32", xp=xp)
    m.load_state_dict(ref.state_dict())
    args = [
        backend.asarray(a.astype(np.float32) if a.dtype == np.float64 else a, xp)
        for a in (x, t, c, gy)
    ]
    m.zero_grad()
    out = m(*args[:3])
    g = m.backward(args[3])
    assert backend.dtype_name(out.dtype) == "float32"
    assert backend.dtype_name(g.dtype) == "float32"
    for n, p in m.named_parameters():
        assert backend.dtype_name(p.grad.dtype) == "float32", n
        assert backend.get_namespace(p.grad) is backend.get_namespace(args[0]), n
    assert rel(backend.to_numpy(out), y) < 1e-4
    assert rel(backend.to_numpy(g), gx) < 1e-3


# ---------------------------------------------------------------------------
# 7. files, both ways with diffusers
# ---------------------------------------------------------------------------
def _forward32(m, x, t, c):
    from xpdiff.nn.module import no_grad

    with no_grad():
        return m(x.astype(np.float32), t, c)


@pytest.mark.oracle
def test_diffusers_saved_loads_into_xpdiff(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(11)
    d = diffusers.UNet2DModel(**SMALL)
    d.save_pretrained(tmp_path)
    m = UNet2DModel.from_pretrained(tmp_path, xp=np)
    sd = d.state_dict()
    for n, p in m.named_parameters():
        assert p.data.dtype == np.float32
        np.testing.assert_array_equal(p.data, sd[n].numpy(), err_msg=n)
    x, t, c, _ = inputs(SMALL, 2, (6, 6), seed=12, labels=[1, 1])
    t[:] = [4, 321]
    y = _forward32(m, x, t, c)
    with torch.no_grad():
        ry = d(
            torch.tensor(x, dtype=torch.float32), torch.tensor(t), class_labels=torch.tensor(c)
        ).sample.numpy()
    print(f"\n[diffusers -> xpdiff file, float32] forward {rel(y, ry):.2e}")
    assert rel(y, ry) <= 1e-5


@pytest.mark.oracle
def test_xpdiff_saved_loads_into_diffusers(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    m = UNet2DModel(**ODD, dtype="float32", xp=np)
    m.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [io.CONFIG_NAME, io.WEIGHTS_NAME]
    d = diffusers.UNet2DModel.from_pretrained(tmp_path)
    for k, v in ODD.items():
        assert d.config[k] == (
            tuple(v) if isinstance(v, list) and isinstance(d.config[k], tuple) else v
        ), k
    sd = d.state_dict()
    assert set(sd) == set(m.state_dict())
    for n, p in m.named_parameters():
        np.testing.assert_array_equal(sd[n].numpy(), p.data, err_msg=n)
    x, t, c, _ = inputs(ODD, 2, (8, 8), seed=13, labels=[4, 4])
    t[:] = [9, 654]
    y = _forward32(m, x, t, c)
    with torch.no_grad():
        ry = d(
            torch.tensor(x, dtype=torch.float32), torch.tensor(t), class_labels=torch.tensor(c)
        ).sample.numpy()
    print(f"\n[xpdiff -> diffusers file, float32] forward {rel(y, ry):.2e}")
    assert rel(y, ry) <= 1e-5
    # and back into xpdiff, bit for bit, as float64 too
    m2 = UNet2DModel.from_pretrained(tmp_path, dtype="float64", xp=np)
    assert m2.config == m.config and m2.dtype == np.float64
    for (n, p), (_, q) in zip(m.named_parameters(), m2.named_parameters(), strict=True):
        np.testing.assert_array_equal(p.data.astype(np.float64), q.data, err_msg=n)


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.numpy

    m = UNet2DModel(**SMALL, dtype="float32", xp=np)
    m.save_pretrained(tmp_path)
    m.save_pretrained(tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [io.CONFIG_NAME, io.WEIGHTS_NAME]
    before = (tmp_path / io.WEIGHTS_NAME).read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    m2 = UNet2DModel(**SMALL, dtype="float32", xp=np)
    with pytest.raises(OSError, match="disk full"):
        m2.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [io.CONFIG_NAME, io.WEIGHTS_NAME]
    assert (tmp_path / io.WEIGHTS_NAME).read_bytes() == before


def test_save_other_weights_of_the_same_model(tmp_path):
    m = UNet2DModel(**SMALL, dtype="float32", xp=np)
    halves = {k: v / 2 for k, v in m.state_dict().items()}  # EMA weights, say
    m.save_pretrained(tmp_path, state_dict=halves)
    back = UNet2DModel.from_pretrained(tmp_path, xp=np)
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v, halves[k])
    first = next(iter(halves))
    renamed = {("extra" if k == first else k): v for k, v in halves.items()}
    with pytest.raises(ValueError, match=rf"missing \['{first}'\], unexpected \['extra'\]"):
        m.save_pretrained(tmp_path, state_dict=renamed)


# ---------------------------------------------------------------------------
# 8. bad input
# ---------------------------------------------------------------------------
@pytest.fixture
def small():
    return UNet2DModel(**SMALL, dtype="float32", xp=np)


def _x(shape=(2, 1, 6, 6), dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


T2 = np.array([1, 2])
C2 = np.array([0, 1])


def test_bad_sample(small):
    with pytest.raises(
        ValueError, match=r"expected a 4-D input \(B, C, H, W\), got shape \(1, 6, 6\)"
    ):
        small(_x((1, 6, 6)), T2, C2)
    with pytest.raises(ValueError, match=r"expected size 1 on axis 1, got shape \(2, 3, 6, 6\)"):
        small(_x((2, 3, 6, 6)), T2, C2)
    with pytest.raises(TypeError, match="expected dtype float32 .*got float64"):
        small(_x(dtype=np.float64), T2, C2)
    with pytest.raises(TypeError, match="expected an array, got list"):
        small([[0.0]], T2, C2)


def test_bad_class_labels(small):
    with pytest.raises(
        ValueError, match=r"class_labels of shape \(2,\) are required.*num_class_embeds=3"
    ):
        small(_x(), T2)
    with pytest.raises(ValueError, match=r"indices in \[0, 3\), got values in \[0, 3\]"):
        small(_x(), T2, np.array([0, 3]))
    with pytest.raises(ValueError, match=r"indices in \[0, 3\), got values in \[-1, 1\]"):
        small(_x(), T2, np.array([-1, 1]))
    with pytest.raises(ValueError, match=r"class_labels of shape \(2,\), got \(2, 1\)"):
        small(_x(), T2, np.array([[0], [1]]))
    with pytest.raises(ValueError, match=r"class_labels of shape \(2,\), got \(3,\)"):
        small(_x(), T2, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"class_labels of shape \(2,\), got \(\)"):
        small(_x(), T2, 1)
    with pytest.raises(TypeError, match="expected integer indices, got float"):
        small(_x(), T2, np.array([0.0, 1.0]))
    plain = UNet2DModel(**{**SMALL, "num_class_embeds": None}, dtype="float32", xp=np)
    with pytest.raises(ValueError, match="class_labels given but the model has no class embedding"):
        plain(_x(), T2, C2)


def test_bad_timesteps(small):
    with pytest.raises(ValueError, match=r"timestep as a scalar or shape \(2,\), got shape \(3,\)"):
        small(_x(), np.array([1, 2, 3]), C2)
    with pytest.raises(
        ValueError, match=r"timestep as a scalar or shape \(2,\), got shape \(2, 1\)"
    ):
        small(_x(), np.array([[1], [2]]), C2)
    with pytest.raises(ValueError, match=r"timesteps in \[0, inf\), got values in \[-1"):
        small(_x(), np.array([-1, 5]), C2)
    with pytest.raises(ValueError, match=r"timesteps in \[0, inf\)"):
        small(_x(), -3, C2)
    with pytest.raises(ValueError, match=r"timesteps in \[0, inf\)"):
        small(_x(), np.array([float("nan"), 1.0]), C2)
    limited = UNet2DModel(**{**SMALL, "num_train_timesteps": 1000}, dtype="float32", xp=np)
    limited(_x(), np.array([0, 999]), C2)
    with pytest.raises(
        ValueError, match=r"timesteps in \[0, 1000\), got values in \[5.0, 1000.0\]"
    ):
        limited(_x(), np.array([5, 1000]), C2)
    with pytest.raises(ValueError, match=r"timesteps in \[0, 1000\)"):
        limited(_x(), 1000, C2)


def test_backward_needs_a_forward(small):
    from xpdiff.nn.module import no_grad

    with pytest.raises(RuntimeError, match="no forward cache"):
        small.backward(_x())
    with no_grad():
        y = small(_x(), T2, C2)
    with pytest.raises(RuntimeError, match="no forward cache"):
        small.backward(y)
    y = small(_x(), T2, C2)
    small.backward(y)
    with pytest.raises(RuntimeError, match="call backward once per forward"):
        small.backward(y)


@pytest.mark.oracle
def test_timesteps_of_another_library_are_taken(small):
    """Integer-like timesteps of any namespace work (issue 12, 3c); samples must not mix."""
    torch = pytest.importorskip("torch")
    from xpdiff.nn.module import no_grad
    from xpdiff.testing import assert_close

    with no_grad():
        want = small(_x(), np.array([1, 2]), C2)
        assert_close(small(_x(), torch.tensor([1, 2]), C2), want, rtol=0, atol=0)
        assert_close(small(_x(), [np.int64(1), 2], C2), want, rtol=0, atol=0)
        one = small(_x(), np.int64(3), C2)
        assert_close(small(_x(), torch.tensor(3), C2), one, rtol=0, atol=0)
        assert_close(small(_x(), [3], C2), one, rtol=0, atol=0)


def test_checkpoint_with_wrong_keys_lists_all(tmp_path):
    from safetensors.numpy import load_file, save_file

    m = UNet2DModel(**SMALL, dtype="float32", xp=np)
    m.save_pretrained(tmp_path)
    path = tmp_path / io.WEIGHTS_NAME
    sd = load_file(str(path))
    del sd["mid_block.attentions.0.to_q.weight"]
    sd["up_blocks.0.attentions.0.extra.weight"] = np.zeros(3, dtype=np.float32)
    sd["conv_out.weight"] = sd["conv_out.weight"].reshape(1, 8, 9)
    save_file(sd, str(path))
    with pytest.raises(KeyError) as info:
        UNet2DModel.from_pretrained(tmp_path, xp=np)
    msg = str(info.value)
    assert "missing keys (1): mid_block.attentions.0.to_q.weight" in msg
    assert "unexpected keys (1): up_blocks.0.attentions.0.extra.weight" in msg
    assert "conv_out.weight: expected (1, 8, 3, 3), got (1, 8, 9)" in msg


def test_config_with_unknown_key(tmp_path, caplog):
    """Keys of other classes are ignored with one warning naming them (as diffusers does)."""
    m = UNet2DModel(**SMALL, dtype="float32", xp=np)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / io.CONFIG_NAME).read_text())
    cfg["cross_attention_dim"] = 64
    (tmp_path / io.CONFIG_NAME).write_text(json.dumps(cfg))
    with caplog.at_level("WARNING", logger="xpdiff"):
        again = UNet2DModel.from_pretrained(tmp_path, xp=np)
    assert again.config == m.config
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "['cross_attention_dim']" in warned[0]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        UNet2DModel.from_pretrained(tmp_path / "nothing", xp=np)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"act_fn": "relu"}, r"act_fn must be one of \('silu',\), got 'relu'"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type must be one of"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift must be one of"),
        ({"class_embed_type": "timestep"}, "class_embed_type must be one of"),
        ({"mid_block_type": "UNetMidBlock2DCrossAttn"}, "mid_block_type must be one of"),
        (
            {"up_block_types": ["UpBlock2D"]},
            "down_block_types and up_block_types must have one length, got 2 and 1",
        ),
        (
            {"block_out_channels": [8, 16, 32]},
            "block_out_channels and down_block_types must have one length, got 3 and 2",
        ),
        (
            {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]},
            "got 'CrossAttnDownBlock2D'",
        ),
        ({"attention_head_dim": 5}, "attention_head_dim must divide the channel count"),
        (
            {"norm_num_groups": 3},
            r"expected norm_num_groups to divide every channel count \[8, 16\]",
        ),
        ({"downsample_padding": 2}, "only padding 0 or 1 is supported"),
    ],
)
def test_unsupported_constructor_values(change, match):
    with pytest.raises(ValueError, match=match):
        UNet2DModel(**{**SMALL, **change}, dtype="float32", xp=np)
