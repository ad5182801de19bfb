"""DDPM and DDIM schedulers: namespace-generic behaviour, errors, config files,
and oracle comparisons with HuggingFace diffusers (skipped without it).

The oracle runs feed both libraries the same stand-in "model" (a fixed function
of the sample and t, evaluated in NumPy float32 on each library's own sample)
and the same variance noise, and compare every step within 1e-5 in float32
(relative where values exceed 1; for epsilon models pred_original_sample is
compared after scaling by sqrt(abar_t); see ``run_against_diffusers``).
"""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
from conftest import diffusers_or_skip, host, max_abs_diff

from xpdiff import backend
from xpdiff.schedulers import CONFIG_NAME, DDIMScheduler, DDPMScheduler, SchedulerOutput

ATOL = 1e-5
SHAPE = (2, 1, 4, 4)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


def _maxabs(a) -> float:
    return float(np.max(np.abs(host(a))))


def _same_kind(out, ref) -> None:
    """``out`` is in the namespace, dtype and device of ``ref``."""
    assert backend.get_namespace(out) is backend.get_namespace(ref)
    assert out.dtype == ref.dtype
    assert backend.device(out) == backend.device(ref)


# ---------------------------------------------------------------------------
# the stand-in model and the oracle runner
# ---------------------------------------------------------------------------
class FakeModel:
    """Deterministic model outputs consistent with a fixed x_0 (some entries
    outside [-1, 1], so clipping matters) plus a small t-dependent wobble."""

    def __init__(self, prediction_type: str, alphas_cumprod, n_train: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.kind = prediction_type
        self.abar = [float(a) for a in alphas_cumprod]
        self.n_train = n_train
        self.x0 = rng.uniform(-1.15, 1.15, SHAPE).astype(np.float32)
        self.wobble = rng.standard_normal(SHAPE).astype(np.float32)

    def __call__(self, x: np.ndarray, t: int) -> np.ndarray:
        dt = x.dtype
        sa = np.asarray(math.sqrt(self.abar[t]), dt)
        sb = np.asarray(math.sqrt(1.0 - self.abar[t]), dt)
        x0 = self.x0.astype(dt)
        eps = (x - sa * x0) / sb
        small = np.asarray(0.05 * t / self.n_train, dt) * self.wobble.astype(dt)
        if self.kind == "epsilon":  # scaled so that the implied x_0 error stays O(0.05)
            return eps + sa * small
        if self.kind == "v_prediction":
            return sa * eps - sb * x0 + small
        return x0 + small


def _start(seed: int = 1, dtype=np.float32) -> tuple[np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE).astype(dtype), rng


def run_against_diffusers(
    ours,
    theirs,
    num_inference_steps: int | None,
    monkeypatch,
    eta: float | None = None,
    xp=None,
    dtype=np.float32,
    **step_kwargs,
) -> float:
    """Sample with both schedulers on identical inputs; assert every step agrees.

    ``eta`` None means DDPM.  Returns the largest difference seen.
    """
    import torch

    xp = backend.namespace_for("numpy") if xp is None else xp
    if num_inference_steps is not None:
        ours.set_timesteps(num_inference_steps)
        theirs.set_timesteps(num_inference_steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    model = FakeModel(ours.config["prediction_type"], theirs.alphas_cumprod, len(ours))
    x, rng = _start(dtype=dtype)
    x_ours = backend.asarray(x, xp)
    x_theirs = torch.from_numpy(x.copy())
    if eta is None:  # DDPM draws its noise inside step: hand it ours
        import diffusers.schedulers.scheduling_ddpm as ddpm_module

        box = {}
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: box["noise"])
    worst = 0.0
    for t in ours.timesteps:
        z = rng.standard_normal(SHAPE).astype(dtype)
        out_ours = backend.asarray(model(host(x_ours), t), xp)
        out_theirs = torch.from_numpy(model(x_theirs.numpy(), t))
        noise = backend.asarray(z, xp)
        if eta is None:
            box["noise"] = torch.from_numpy(z.copy())
            res = ours.step(out_ours, t, x_ours, variance_noise=noise)
            ref = theirs.step(out_theirs, t, x_theirs)
        else:
            res = ours.step(out_ours, t, x_ours, eta=eta, variance_noise=noise, **step_kwargs)
            if theirs_prev(theirs, t) == ours.previous_timestep(t):
                ref = theirs.step(
                    out_theirs,
                    t,
                    x_theirs,
                    eta=eta,
                    variance_noise=torch.from_numpy(z),
                    **step_kwargs,
                )
            else:  # diffusers leaves the grid here (see ddim_reference_step): the formula
                ref = ddim_reference_step(
                    ours, host(out_ours), t, host(x_ours), eta, z, **step_kwargs
                )
        _same_kind(res.prev_sample, x_ours)
        _same_kind(res.pred_original_sample, x_ours)
        # float32 agreement: 1e-5 absolute, relative where values exceed 1
        # (clipping x_0 while the noise estimate is not clipped lets |x_t| grow)
        d_prev = max_abs_diff(res.prev_sample, ref.prev_sample) / max(1.0, _maxabs(ref.prev_sample))
        assert d_prev <= ATOL, f"t={t}: prev_sample max |ours - diffusers| = {d_prev:.3g}"
        # x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) magnifies float32 rounding by
        # 1 / sqrt(abar_t) (up to ~150 at t = 999), and torch's float32 sqrt is not
        # always correctly rounded: one ulp in sqrt(1 - abar) moves x_0 by ~3e-5
        # there.  So for epsilon models, sqrt(abar_t) x_0 is held to 1e-5.
        scale = 1.0
        if ours.config["prediction_type"] == "epsilon":
            scale = math.sqrt(ours.alphas_cumprod[t])
        d_x0 = max_abs_diff(res.pred_original_sample, ref.pred_original_sample) * scale
        d_x0 /= max(1.0, _maxabs(ref.pred_original_sample) * scale)
        assert d_x0 <= ATOL, f"t={t}: pred_original_sample max diff (x sqrt(abar)) {d_x0:.3g}"
        worst = max(worst, d_prev, d_x0)
        x_ours, x_theirs = res.prev_sample, ref.prev_sample
    assert np.all(np.isfinite(host(x_ours)))
    return worst


def theirs_prev(theirs, t: int) -> int:
    """The timestep diffusers' DDIM steps to from ``t``: t - T // n on every spacing."""
    return int(t) - theirs.config.num_train_timesteps // theirs.num_inference_steps


def ddim_reference_step(ours, out, t, x, eta, z, use_clipped_model_output=False):
    """DDIM's eq. 12 in float64 from ``t`` to the next grid entry (xpdiff's rule).

    Used where diffusers' DDIM lands off the grid (``t - T // n`` for ``trailing`` and
    ``linspace`` spacings, reported upstream), so diffusers cannot be the oracle there.
    Returns torch tensors in the sample's dtype, like diffusers' step.
    """
    import torch

    cfg, t = ours.config, int(t)
    t_prev = ours.previous_timestep(t)
    abar = [float(a) for a in ours.alphas_cumprod]
    a_t = abar[t]
    a_p = abar[t_prev] if t_prev >= 0 else float(ours.final_alpha_cumprod)
    x, out = x.astype(np.float64), out.astype(np.float64)
    sa, sb = math.sqrt(a_t), math.sqrt(1 - a_t)
    if cfg.prediction_type == "epsilon":
        x0, eps = (x - sb * out) / sa, out
    elif cfg.prediction_type == "v_prediction":
        x0, eps = sa * x - sb * out, sa * out + sb * x
    else:
        x0, eps = out, (x - sa * out) / sb
    if cfg.clip_sample:
        x0 = np.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
    if use_clipped_model_output:
        eps = (x - sa * x0) / sb
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    prev = math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - sigma**2, 0.0)) * eps
    if eta > 0:
        prev = prev + sigma * z.astype(np.float64)
    dt = z.dtype
    return SchedulerOutput(torch.from_numpy(prev.astype(dt)), torch.from_numpy(x0.astype(dt)))


# ---------------------------------------------------------------------------
# oracle: tables and timesteps
# ---------------------------------------------------------------------------
@pytest.mark.oracle
@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize(
    "n_train, start, end", [(1000, 0.0001, 0.02), (1000, 0.00085, 0.012), (37, 0.0003, 0.05)]
)
def test_tables_equal_diffusers(schedule, n_train, start, end):
    diffusers = diffusers_or_skip()
    kw = dict(num_train_timesteps=n_train, beta_start=start, beta_end=end, beta_schedule=schedule)
    ours, theirs = DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw)
    assert list(ours.betas) == theirs.betas.tolist()
    assert list(ours.alphas_cumprod) == theirs.alphas_cumprod.tolist()


@pytest.mark.oracle
def test_linear_betas_equal_torch_linspace_random():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    for _ in range(40):
        start = float(rng.uniform(1e-5, 0.01))
        end = float(rng.uniform(start, 0.05))
        n = int(rng.integers(2, 2000))
        ref = torch.linspace(start, end, n, dtype=torch.float32).tolist()
        sched = DDPMScheduler(num_train_timesteps=n, beta_start=start, beta_end=end)
        assert list(sched.betas) == ref


@pytest.mark.oracle
@pytest.mark.parametrize("cls_name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n_train", [1000, 37])
def test_set_timesteps_equal_diffusers(cls_name, spacing, offset, n_train):
    diffusers = diffusers_or_skip()
    kw = dict(num_train_timesteps=n_train, timestep_spacing=spacing, steps_offset=offset)
    ours = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}[cls_name](**kw)
    theirs = getattr(diffusers, cls_name)(**kw)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()  # before set_timesteps: all steps
    for n in range(1, n_train + 1):
        theirs.set_timesteps(n)
        expected = theirs.timesteps.tolist()
        if max(expected) >= n_train:  # leading + offset past the end: ours refuses
            with pytest.raises(ValueError, match="outside"):
                ours.set_timesteps(n)
            continue
        ours.set_timesteps(n)
        if spacing != "trailing" or len(expected) == n:
            assert ours.timesteps.tolist() == expected, n
        else:  # diffusers keeps NumPy arange's extra entry (issue 12, 3a): drop it
            assert ours.timesteps.tolist() == expected[:n] and expected[n] < 0, n
        assert ours.num_inference_steps == n
        assert backend.dtype_name(ours.timesteps.dtype) == "int64"


# ---------------------------------------------------------------------------
# oracle: full trajectories
# ---------------------------------------------------------------------------
DDPM_GRID = list(
    itertools.product(BETA_SCHEDULES, ("fixed_small", "fixed_large"), PREDICTIONS, SPACINGS)
)


@pytest.mark.oracle
@pytest.mark.parametrize("schedule, variance, prediction, spacing", DDPM_GRID)
def test_ddpm_50_steps_match_diffusers(schedule, variance, prediction, spacing, monkeypatch):
    diffusers = diffusers_or_skip()
    # clip and offset alternate over the grid so each value meets every other option
    i = DDPM_GRID.index((schedule, variance, prediction, spacing))
    for clip, offset in ((i % 2 == 0, i % 3 % 2), (i % 2 == 1, 1 - i % 3 % 2)):
        kw = dict(
            beta_schedule=schedule,
            variance_type=variance,
            prediction_type=prediction,
            timestep_spacing=spacing,
            clip_sample=clip,
            steps_offset=offset,
        )
        run_against_diffusers(DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw), 50, monkeypatch)


DDIM_GRID = list(itertools.product(BETA_SCHEDULES, PREDICTIONS, SPACINGS, (0.0, 0.5)))


@pytest.mark.oracle
@pytest.mark.parametrize("schedule, prediction, spacing, eta", DDIM_GRID)
def test_ddim_50_steps_match_diffusers(schedule, prediction, spacing, eta, monkeypatch):
    diffusers = diffusers_or_skip()
    i = DDIM_GRID.index((schedule, prediction, spacing, eta))
    for clip, offset, to_one in ((i % 2 == 0, i % 3 % 2, True), (i % 2 == 1, 1 - i % 3 % 2, False)):
        kw = dict(
            beta_schedule=schedule,
            prediction_type=prediction,
            timestep_spacing=spacing,
            clip_sample=clip,
            steps_offset=offset,
            set_alpha_to_one=to_one,
        )
        ours, theirs = DDIMScheduler(**kw), diffusers.DDIMScheduler(**kw)
        run_against_diffusers(ours, theirs, 50, monkeypatch, eta=eta)


@pytest.mark.oracle
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(
            beta_schedule="scaled_linear",
            variance_type="fixed_large",
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            clip_sample=False,
        ),
        dict(
            beta_schedule="squaredcos_cap_v2",
            prediction_type="sample",
            timestep_spacing="linspace",
            clip_sample_range=1.2,
        ),
    ],
    ids=["default", "scaled-large-v-trailing", "cos-sample-linspace"],
)
def test_ddpm_1000_steps_match_diffusers(kw, monkeypatch):
    diffusers = diffusers_or_skip()
    run_against_diffusers(DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw), 1000, monkeypatch)


@pytest.mark.oracle
def test_ddpm_full_chain_without_set_timesteps_matches_diffusers(monkeypatch):
    diffusers = diffusers_or_skip()
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    run_against_diffusers(DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw), None, monkeypatch)


@pytest.mark.oracle
@pytest.mark.parametrize(
    "kw, eta",
    [
        (dict(), 0.0),
        (
            dict(
                beta_schedule="scaled_linear",
                prediction_type="v_prediction",
                timestep_spacing="trailing",
                clip_sample=False,
            ),
            0.5,
        ),
        (
            dict(
                beta_schedule="squaredcos_cap_v2",
                prediction_type="sample",
                timestep_spacing="linspace",
                set_alpha_to_one=False,
            ),
            0.5,
        ),
    ],
    ids=["default-eta0", "scaled-v-trailing-eta0.5", "cos-sample-linspace-eta0.5"],
)
def test_ddim_1000_steps_match_diffusers(kw, eta, monkeypatch):
    diffusers = diffusers_or_skip()
    run_against_diffusers(
        DDIMScheduler(**kw), diffusers.DDIMScheduler(**kw), 1000, monkeypatch, eta=eta
    )


@pytest.mark.oracle
def test_ddim_clipped_model_output_and_eta1_match_diffusers(monkeypatch):
    diffusers = diffusers_or_skip()
    kw = dict(prediction_type="sample", clip_sample_range=0.8)
    run_against_diffusers(
        DDIMScheduler(**kw),
        diffusers.DDIMScheduler(**kw),
        25,
        monkeypatch,
        eta=1.0,
        use_clipped_model_output=True,
    )


@pytest.mark.oracle
def test_small_train_schedule_matches_diffusers(monkeypatch):
    diffusers = diffusers_or_skip()
    kw = dict(num_train_timesteps=37, beta_end=0.05, timestep_spacing="trailing")
    run_against_diffusers(DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw), 10, monkeypatch)
    run_against_diffusers(
        DDIMScheduler(**kw), diffusers.DDIMScheduler(**kw), 10, monkeypatch, eta=0.3
    )


@pytest.mark.oracle
def test_float64_matches_diffusers(monkeypatch):
    diffusers = diffusers_or_skip()
    run_against_diffusers(
        DDIMScheduler(), diffusers.DDIMScheduler(), 50, monkeypatch, eta=0.5, dtype=np.float64
    )
    run_against_diffusers(
        DDPMScheduler(), diffusers.DDPMScheduler(), 50, monkeypatch, dtype=np.float64
    )


@pytest.mark.oracle
@pytest.mark.parametrize("cls_name", ["DDPMScheduler", "DDIMScheduler"])
def test_trajectory_on_every_namespace_matches_diffusers(xp, cls_name, monkeypatch):
    diffusers = diffusers_or_skip()
    kw = dict(prediction_type="v_prediction", timestep_spacing="trailing")
    ours = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}[cls_name](**kw)
    theirs = getattr(diffusers, cls_name)(**kw)
    eta = 0.5 if cls_name == "DDIMScheduler" else None
    run_against_diffusers(ours, theirs, 20, monkeypatch, eta=eta, xp=xp)


# ---------------------------------------------------------------------------
# add_noise / get_velocity
# ---------------------------------------------------------------------------
@pytest.mark.oracle
@pytest.mark.parametrize("method", ["add_noise", "get_velocity"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_add_noise_and_velocity_match_diffusers(xp, device_f32, method, dtype_name):
    diffusers = diffusers_or_skip()
    import torch

    rng = np.random.default_rng(3)
    x = rng.standard_normal(SHAPE).astype(dtype_name)
    z = rng.standard_normal(SHAPE).astype(dtype_name)
    t = np.array([0, 999], dtype=np.int64)
    for schedule in BETA_SCHEDULES:
        ours = DDIMScheduler(beta_schedule=schedule)
        theirs = diffusers.DDIMScheduler(beta_schedule=schedule)
        dtype = getattr(xp, dtype_name)
        xa = backend.asarray(x, xp, dtype=dtype, device=device_f32)
        za = backend.asarray(z, xp, dtype=dtype, device=device_f32)
        ta = backend.asarray(t, xp, device=device_f32)
        got = getattr(ours, method)(xa, za, ta)
        ref = getattr(theirs, method)(torch.from_numpy(x), torch.from_numpy(z), torch.from_numpy(t))
        _same_kind(got, xa)
        np.testing.assert_allclose(host(got), ref.numpy(), rtol=0, atol=1e-6)
        # a python list and a python int give the same as an array
        same = getattr(ours, method)(xa, za, [0, 999])
        assert np.array_equal(host(same), host(got))
        single = getattr(ours, method)(xa, za, 999)
        assert np.array_equal(host(single)[1], host(got)[1])


def test_add_noise_formula():
    sched = DDPMScheduler()
    x = np.full((3, 2), 2.0)
    z = np.full((3, 2), -1.0)
    out = sched.add_noise(x, z, [0, 500, 999])
    for row, t in zip(out, (0, 500, 999), strict=True):
        a = sched.alphas_cumprod[t]
        assert np.allclose(row, 2 * math.sqrt(a) - math.sqrt(1 - a), rtol=0, atol=1e-12)


def test_add_noise_accepts_timesteps_from_another_namespace(xp):
    sched = DDPMScheduler()
    x = backend.asarray(np.ones(SHAPE, np.float32), xp)
    ts = np.array([10, 20], dtype=np.int32)
    out = sched.add_noise(x, x, ts)
    _same_kind(out, x)
    assert np.allclose(host(out), host(sched.add_noise(x, x, [10, 20])))


# ---------------------------------------------------------------------------
# namespace-generic behaviour
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_step_keeps_namespace_dtype_device(xp, device_f32, cls, dtype_name):
    sched = cls(prediction_type="v_prediction")
    sched.set_timesteps(10)
    dtype = getattr(xp, dtype_name)
    x, rng = _start()
    sample = backend.asarray(x, xp, dtype=dtype, device=device_f32)
    gen = backend.Generator(0, xp, device=device_f32)
    kwargs = {"eta": 1.0} if cls is DDIMScheduler else {}
    for t in sched.timesteps:
        out = sched.step(0.5 * sample, t, sample, generator=gen, **kwargs)
        assert isinstance(out, SchedulerOutput)
        _same_kind(out.prev_sample, sample)
        _same_kind(out.pred_original_sample, sample)
        sample = out.prev_sample
    # no generator and no noise: a fresh unseeded generator on the right device
    out = sched.step(0.5 * sample, sched.timesteps[0], sample, **kwargs)
    _same_kind(out.prev_sample, sample)
    prev, x0 = sched.step(
        0.5 * sample, sched.timesteps[0], sample, variance_noise=sample, return_dict=False, **kwargs
    )
    _same_kind(prev, sample)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_namespaces_agree(xp, cls):
    """The same run on any namespace gives NumPy's numbers (seeded generator)."""
    kwargs = {"eta": 0.7} if cls is DDIMScheduler else {}

    def run(ns):
        sched = cls(beta_schedule="scaled_linear")
        sched.set_timesteps(15)
        x, _ = _start()
        s = backend.asarray(x, ns)
        gen = backend.Generator(42, ns)
        for t in sched.timesteps:
            s = sched.step(0.1 * s, t, s, generator=gen, **kwargs).prev_sample
        return host(s)

    np.testing.assert_allclose(run(xp), run(backend.namespace_for("numpy")), rtol=0, atol=1e-6)


def test_same_seed_same_samples():
    sched = DDPMScheduler()
    sched.set_timesteps(5)
    x, _ = _start()
    outs = []
    for _ in range(2):
        gen = backend.Generator(7)
        outs.append(sched.step(0.1 * x, sched.timesteps[0], x, generator=gen).prev_sample)
    assert np.array_equal(outs[0], outs[1])


def test_ddpm_previous_timestep_follows_inference_steps():
    sched = DDPMScheduler()
    assert sched.previous_timestep(999) == 998
    sched.set_timesteps(50)
    assert sched.timesteps[:3].tolist() == [980, 960, 940]
    assert sched.previous_timestep(980) == 960
    assert sched.previous_timestep(0) == -1
    ddim = DDIMScheduler(timestep_spacing="trailing")
    ddim.set_timesteps(50)
    assert ddim.timesteps[:2].tolist() == [999, 979]
    assert ddim.previous_timestep(999) == 979


def test_ddpm_last_step_adds_no_noise():
    sched = DDPMScheduler()
    sched.set_timesteps(10)
    x, _ = _start()
    a = sched.step(0.1 * x, 0, x, variance_noise=np.zeros_like(x)).prev_sample
    b = sched.step(0.1 * x, 0, x, variance_noise=np.ones_like(x)).prev_sample
    assert np.array_equal(a, b)


def test_ddim_eta0_is_deterministic_and_ignores_noise():
    sched = DDIMScheduler()
    sched.set_timesteps(10)
    x, _ = _start()
    a = sched.step(0.1 * x, 900, x).prev_sample
    b = sched.step(0.1 * x, 900, x, variance_noise=np.ones_like(x)).prev_sample
    # diffusers' positional order: eta, use_clipped_model_output, generator, variance_noise
    c = sched.step(0.1 * x, 900, x, 0.0, True, None, np.ones_like(x), False)[0]
    d = sched.step(0.1 * x, 900, x, eta=0.0, use_clipped_model_output=True).prev_sample
    assert np.array_equal(c, d) and not np.array_equal(a, c)
    assert np.array_equal(a, b)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(beta_schedule="cosine"), r"beta_schedule .*'linear', 'scaled_linear'.*got 'cosine'"),
        (dict(prediction_type="eps"), r"prediction_type .*'epsilon'.*got 'eps'"),
        (dict(timestep_spacing="even"), r"timestep_spacing .*'leading'.*got 'even'"),
        (dict(num_train_timesteps=0), r"num_train_timesteps to be an integer >= 1, got 0"),
        (dict(steps_offset=-1), r"steps_offset .* got -1"),
        (dict(beta_end=1.5), r"every beta in \(0, 1\)"),
        (dict(clip_sample_range=0.0), r"clip_sample_range to be a finite number > 0.0"),
    ],
)
def test_bad_constructor_arguments(cls, kw, match):
    with pytest.raises(ValueError, match=cls.__name__ + ": expected " + match):
        cls(**kw)


def test_bad_variance_type_and_flags():
    with pytest.raises(ValueError, match=r"DDPMScheduler: expected variance_type .*'fixed_small'"):
        DDPMScheduler(variance_type="learned")
    with pytest.raises(TypeError, match="clip_sample to be True or False, got 'yes'"):
        DDPMScheduler(clip_sample="yes")
    with pytest.raises(TypeError, match="set_alpha_to_one to be True or False"):
        DDIMScheduler(set_alpha_to_one=1)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_bad_set_timesteps(cls):
    sched = cls()
    for bad in (1001, 0, 2.5):
        with pytest.raises(
            ValueError,
            match=rf"{cls.__name__}.set_timesteps: expected "
            rf"num_inference_steps to be an integer >= 1 and <= 1000, got {bad}",
        ):
            sched.set_timesteps(bad)
    with pytest.raises(ValueError, match="steps_offset=1 with 1000 steps gives timestep 1000"):
        cls(steps_offset=1).set_timesteps(1000)


def test_step_errors():
    x, _ = _start()
    ddim = DDIMScheduler()
    with pytest.raises(ValueError, match=r"DDIMScheduler: expected set_timesteps.*before step"):
        ddim.step(x, 10, x)
    ddim.set_timesteps(10)
    with pytest.raises(
        ValueError, match=r"DDIMScheduler.step: timestep 1000 is out of range \[0, "
    ):
        ddim.step(x, 1000, x)
    with pytest.raises(ValueError, match=r"timestep -1 is out of range"):
        ddim.step(x, -1, x)
    with pytest.raises(ValueError, match="expected an integer timestep .*got 5.0"):
        ddim.step(x, 5.0, x)
    with pytest.raises(ValueError, match="expected eta to be a finite number >= 0.0, got -0.1"):
        ddim.step(x, 900, x, eta=-0.1)
    with pytest.raises(ValueError, match=r"expected model_output of shape \(2, 1, 4, 4\)"):
        ddim.step(x[:1], 900, x)
    with pytest.raises(ValueError, match="at most one of generator and variance_noise, got both"):
        ddim.step(x, 900, x, eta=1.0, variance_noise=x, generator=backend.Generator(0))
    with pytest.raises(ValueError, match=r"expected variance_noise of shape \(2, 1, 4, 4\), got"):
        ddim.step(x, 900, x, eta=1.0, variance_noise=x[:1])
    with pytest.raises(ValueError, match="expected a floating sample"):
        ddim.step(x.astype(np.int64), 900, x.astype(np.int64))

    ddpm = DDPMScheduler()
    ddpm.set_timesteps(10)
    with pytest.raises(ValueError, match=r"timestep from set_timesteps\(10\).*got 901"):
        ddpm.step(x, 901, x)
    with pytest.raises(ValueError, match=r"timestep 5000 is out of range"):
        ddpm.step(x, 5000, x)


@pytest.mark.oracle
def test_step_rejects_mixed_namespaces():
    torch = pytest.importorskip("torch")
    x, _ = _start()
    with pytest.raises(TypeError, match="DDPMScheduler.step: expected arrays of one array library"):
        DDPMScheduler().step(torch.from_numpy(x), 999, x)


def test_add_noise_errors():
    sched = DDPMScheduler()
    x, _ = _start()
    with pytest.raises(ValueError, match=r"add_noise: timestep 1000 is out of range \[0, num"):
        sched.add_noise(x, x, np.array([3, 1000]))
    with pytest.raises(ValueError, match=r"get_velocity: timestep -2 is out of range"):
        sched.get_velocity(x, x, [-2, 4])
    with pytest.raises(ValueError, match="expected 2 timesteps \\(one per sample\\), got 3"):
        sched.add_noise(x, x, [1, 2, 3])
    with pytest.raises(ValueError, match=r"expected timesteps of shape \(2,\), got \(3,\)"):
        sched.add_noise(x, x, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="expected an integer timesteps array, got dtype float"):
        sched.add_noise(x, x, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"expected noise of shape \(2, 1, 4, 4\) like original"):
        sched.add_noise(x, x[:1], [1, 2])


# ---------------------------------------------------------------------------
# config files
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_config_round_trip(cls, tmp_path):
    sched = cls(beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1)
    json.dumps(sched.config)  # serialisable
    path = sched.save_config(tmp_path / "sched")
    assert os.listdir(tmp_path / "sched") == [CONFIG_NAME]  # no temporary file left behind
    with open(path) as fh:
        assert json.load(fh)["_class_name"] == cls.__name__
    again = cls.from_pretrained(tmp_path / "sched")
    assert again.config == sched.config
    assert cls.from_pretrained(tmp_path, subfolder="sched").config == sched.config
    assert cls.from_config(sched.to_json_dict()).config == sched.config
    assert cls.from_config(sched.config, steps_offset=0).config["steps_offset"] == 0
    assert sched.config.steps_offset == sched.config["steps_offset"] == 1
    with pytest.raises(TypeError):
        sched.config["steps_offset"] = 7  # read-only
    with pytest.raises(AttributeError, match="read-only"):
        sched.config.steps_offset = 7
    assert sched.config.steps_offset == 1


@pytest.mark.oracle
@pytest.mark.parametrize("cls_name", ["DDPMScheduler", "DDIMScheduler"])
def test_diffusers_reads_our_file_and_we_read_theirs(cls_name, tmp_path):
    diffusers = diffusers_or_skip()
    ours_cls = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}[cls_name]
    theirs_cls = getattr(diffusers, cls_name)
    kw = dict(
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        clip_sample=False,
        timestep_spacing="trailing",
        steps_offset=1,
        beta_end=0.03,
    )
    ours = ours_cls(**kw)
    ours.save_config(tmp_path / "ours")
    loaded = theirs_cls.from_pretrained(tmp_path / "ours")
    for key, value in ours.config.items():
        assert loaded.config[key] == value, key

    theirs_cls(**kw).save_pretrained(tmp_path / "theirs")
    back = ours_cls.from_pretrained(tmp_path / "theirs")
    assert back.config == ours.config
    assert ours_cls.from_config(theirs_cls(**kw).config).config == ours.config


def test_config_errors(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="xpdiff"):
        ddpm = DDPMScheduler.from_config(DDIMScheduler(num_train_timesteps=50).to_json_dict())
        DDIMScheduler.from_config({"colour": "red", "shade": 1})
    assert ddpm.config.num_train_timesteps == 50
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2
    assert "ignoring config keys ['set_alpha_to_one'] (saved by DDIMScheduler)" in warned[0]
    assert "['colour', 'shade']" in warned[1]
    with pytest.raises(ValueError, match=r"thresholding=True is not supported"):
        DDIMScheduler.from_config({"thresholding": True})
    with pytest.raises(ValueError, match=r"trained_betas=\[0.1\] is not supported"):
        DDPMScheduler.from_config({"trained_betas": [0.1]})
    with pytest.raises(ValueError, match=r"expected beta_schedule to be one of"):
        DDIMScheduler.from_config(DDPMScheduler().config, beta_schedule="cosine")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['colour'\]"):
        DDIMScheduler.from_config({}, colour="red")
    with pytest.raises(
        FileNotFoundError, match="DDPMScheduler.from_pretrained: no scheduler_config"
    ):
        DDPMScheduler.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DDPMScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize("src", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("dst", [DDPMScheduler, DDIMScheduler])
def test_scheduler_swap_idiom(src, dst, tmp_path):
    """diffusers' ``Other.from_config(sched.config)``, also from a saved training run."""
    sched = src(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    swapped = dst.from_config(sched.config)
    for key in ("num_train_timesteps", "beta_schedule", "clip_sample"):
        assert swapped.config[key] == sched.config[key]
    sched.save_pretrained(tmp_path / "scheduler")
    loaded = dst.from_pretrained(tmp_path, subfolder="scheduler")
    assert loaded.alphas_cumprod == sched.alphas_cumprod


def test_scheduler_modules_import_no_array_library():
    """Only xpdiff/backend.py may import numpy, cupy or torch."""
    import ast

    import xpdiff.schedulers as pkg

    folder = os.path.dirname(pkg.__file__)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name)) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not {"numpy", "cupy", "torch"} & set(roots), f"{name} imports {roots}"


# ---------------------------------------------------------------------------
# numerics (issue 12, section 3)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n_train", [1, 2, 7, 17, 50, 100, 143, 1000])
def test_every_grid_has_n_distinct_descending_timesteps(cls, spacing, n_train):
    sched = cls(num_train_timesteps=n_train, timestep_spacing=spacing, beta_end=0.002)
    for n in range(1, n_train + 1):
        sched.set_timesteps(n)
        steps = sched.timesteps.tolist()
        assert len(steps) == n == sched.num_inference_steps, (n, steps)
        assert all(a > b for a, b in zip(steps[:-1], steps[1:], strict=True)), (n, steps)
        assert 0 <= steps[-1] and steps[0] < n_train, (n, steps)
        assert [sched.previous_timestep(t) for t in steps] == [*steps[1:], -1]


def test_trailing_grid_of_issue():
    sched = DDIMScheduler(num_train_timesteps=17, timestep_spacing="trailing")
    sched.set_timesteps(7)
    assert sched.timesteps.tolist() == [16, 14, 11, 9, 6, 4, 1]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [1, 3, 5, 7, 50])
def test_ddim_with_the_exact_noise_returns_to_x0(spacing, n):
    """A model predicting the true noise takes DDIM (eta = 0) to x_0 on every spacing."""
    sched = DDIMScheduler(
        num_train_timesteps=100,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        timestep_spacing=spacing,
    )
    sched.set_timesteps(n)
    x0 = np.linspace(-0.9, 0.9, 16, dtype=np.float64).reshape(1, 1, 4, 4)
    eps = np.cos(np.arange(16, dtype=np.float64)).reshape(1, 1, 4, 4)
    abar = sched.alphas_cumprod
    t0 = int(sched.timesteps[0])
    x = math.sqrt(abar[t0]) * x0 + math.sqrt(1 - abar[t0]) * eps
    for t in sched.timesteps:
        x = sched.step(eps, t, x).prev_sample
        t_prev = sched.previous_timestep(t)
        if t_prev >= 0:  # on the forward process of the same x_0 and eps
            want = math.sqrt(abar[t_prev]) * x0 + math.sqrt(1 - abar[t_prev]) * eps
            np.testing.assert_allclose(x, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(x, x0, rtol=0, atol=1e-5)


def test_ddim_step_lands_on_the_grid_value_of_issue():
    sched = DDIMScheduler(
        num_train_timesteps=100,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        timestep_spacing="linspace",
    )
    sched.set_timesteps(5)
    assert sched.timesteps.tolist() == [99, 74, 50, 25, 0]
    assert [sched.previous_timestep(t) for t in sched.timesteps] == [74, 50, 25, 0, -1]
    a = sched.alphas_cumprod[99]
    x = np.full((1, 1), math.sqrt(a) * 0.5 + math.sqrt(1 - a), dtype=np.float32)
    prev = sched.step(np.ones_like(x), 99, x).prev_sample
    assert float(prev[0, 0]) == pytest.approx(1.11497, abs=1e-5)  # abar_74, not abar_79


TIMESTEP_FORMS = {
    "int": lambda t: t,
    "numpy int": lambda t: np.int64(t),
    "list of numpy int": lambda t: [np.int64(t)],
    "list of int": lambda t: [t],
    "0-d array": lambda t: np.array(t),
    "1-d array": lambda t: np.array([t], dtype=np.int32),
}


@pytest.mark.parametrize("form", TIMESTEP_FORMS)
def test_integer_like_timesteps_everywhere(form):
    make = TIMESTEP_FORMS[form]
    sched = DDPMScheduler()
    x = np.ones((1, 1, 2, 2), dtype=np.float32)
    abar = sched.alphas_cumprod[5]
    want = math.sqrt(abar) + math.sqrt(1 - abar)
    assert want == pytest.approx(1.029525, abs=1e-6)
    np.testing.assert_allclose(sched.add_noise(x, x, make(5)), want, rtol=1e-6)
    np.testing.assert_allclose(
        sched.get_velocity(x, x, make(5)), math.sqrt(abar) - math.sqrt(1 - abar), rtol=1e-5
    )
    ddim = DDIMScheduler()
    ddim.set_timesteps(10)
    t = int(ddim.timesteps[3])
    if form not in ("list of numpy int", "list of int"):  # step takes one timestep
        ref = ddim.step(0.1 * x, t, x).prev_sample
        np.testing.assert_array_equal(ddim.step(0.1 * x, make(t), x).prev_sample, ref)
        sched.step(0.1 * x, make(5), x, variance_noise=x)


@pytest.mark.oracle
def test_integer_like_timesteps_of_torch():
    torch = pytest.importorskip("torch")
    sched = DDPMScheduler()
    x = np.ones((2, 1, 2, 2), dtype=np.float32)
    ref = sched.add_noise(x, x, [5, 7])
    np.testing.assert_array_equal(sched.add_noise(x, x, torch.tensor([5, 7])), ref)
    np.testing.assert_array_equal(sched.add_noise(x, x, [torch.tensor(5), np.int16(7)]), ref)
    sched.set_timesteps(10)
    sched.step(0.1 * x, torch.tensor(sched.timesteps[0]), x, variance_noise=x)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize(
    "kw, first",
    [
        (dict(num_train_timesteps=143, beta_end=0.9), 141),
        (dict(beta_end=0.25), None),
    ],
)
def test_zero_terminal_snr_is_refused(cls, kw, first):
    with pytest.raises(
        ValueError,
        match=r"zero terminal SNR: float32 alphas_cumprod rounds to "
        r"0 from t = (\d+)",
    ) as info:
        cls(**kw)
    assert "beta_schedule='linear'" in str(info.value)
    if first is not None:
        assert f"t = {first} " in str(info.value)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True is not supported"):
        cls.from_config({"rescale_betas_zero_snr": True})
