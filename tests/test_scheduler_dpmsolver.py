"""DPM-Solver++ multistep scheduler: oracle comparisons with diffusers'
``DPMSolverMultistepScheduler`` (skipped without torch/diffusers), exact
recovery of a known x_0, namespaces and dtypes, errors, config files, and
sampling through ``generate`` and the command line.

The oracle runs feed both libraries the same stand-in model (a fixed x_0 plus a
small t-dependent wobble, evaluated in NumPy on each library's own sample) and
compare every step: the timesteps exactly, the sigmas within one float32 ulp
(torch's float32 sqrt is not always correctly rounded), prev_sample within
``ATOL`` (relative where values exceed 1) and the data prediction x_0 after
scaling by alpha_t (the epsilon-to-x_0 conversion divides by alpha_t).
"""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
from conftest import TINY_UNET, diffusers_or_skip, host, max_abs_diff

from xpdiff import backend
from xpdiff.schedulers import (
    CONFIG_NAME,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    SchedulerOutput,
)

ATOL = 1e-5
# diffusers computes the step in float32 even for float64 samples (it rounds the
# sample to float32 and keeps float32 coefficients), so this is the floor there
ATOL_F64 = 1e-6
SHAPE = (2, 1, 4, 4)

# diffusers' set_timesteps hands a torch tensor to np.array (the oracle's warning, not ours)
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")


def _same_kind(out, ref) -> None:
    assert backend.get_namespace(out) is backend.get_namespace(ref)
    assert out.dtype == ref.dtype
    assert backend.device(out) == backend.device(ref)


def _schedule_kw(schedule: str) -> dict:
    if schedule == "scaled_linear":
        return dict(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
    return dict(beta_schedule=schedule)


class FakeModel:
    """Outputs consistent with a fixed x_0 (some entries outside [-1, 1]) plus a
    t-dependent wobble, so that consecutive data predictions differ."""

    def __init__(self, prediction_type: str, alphas_cumprod, n_train: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.kind = prediction_type
        self.abar = [float(a) for a in alphas_cumprod]
        self.n_train = n_train
        self.x0 = rng.uniform(-1.2, 1.2, SHAPE)
        self.wobble = rng.standard_normal(SHAPE)

    def __call__(self, x: np.ndarray, t: int) -> np.ndarray:
        dt = x.dtype
        sa, sb = math.sqrt(self.abar[t]), math.sqrt(1.0 - self.abar[t])
        eps = (x - sa * self.x0) / sb
        small = 0.05 * t / self.n_train * self.wobble
        if self.kind == "epsilon":
            out = eps + sa * small
        elif self.kind == "v_prediction":
            out = sa * eps - sb * self.x0 + small
        else:
            out = self.x0 + small
        return out.astype(dt)


def run_against_diffusers(kw: dict, steps: int, xp=None, dtype=np.float32, atol=ATOL) -> float:
    """Sample with xpdiff's and diffusers' schedulers built from ``kw`` on identical
    inputs; assert every step agrees.  Returns the largest difference seen."""
    diffusers = diffusers_or_skip()
    import torch

    xp = backend.namespace_for("numpy") if xp is None else xp
    ours, theirs = DPMSolverMultistepScheduler(**kw), diffusers.DPMSolverMultistepScheduler(**kw)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    np.testing.assert_allclose(
        np.asarray(ours.sigmas, np.float32), theirs.sigmas.numpy(), rtol=1.2e-7, atol=0
    )
    model = FakeModel(ours.config["prediction_type"], theirs.alphas_cumprod, len(ours))
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(dtype)
    x_ours, x_theirs = backend.asarray(x, xp), torch.from_numpy(x.copy())
    worst = 0.0
    for i, t in enumerate(ours.timesteps):
        res = ours.step(backend.asarray(model(host(x_ours), t), xp), t, x_ours)
        ref = theirs.step(torch.from_numpy(model(x_theirs.numpy(), t)), t, x_theirs)
        _same_kind(res.prev_sample, x_ours)
        _same_kind(res.pred_original_sample, x_ours)
        scale = max(1.0, float(np.max(np.abs(ref.prev_sample.numpy()))))
        d_prev = max_abs_diff(res.prev_sample, ref.prev_sample) / scale
        assert d_prev <= atol, f"step {i} (t={t}): prev_sample differs by {d_prev:.3g}"
        alpha = 1.0 / math.sqrt(ours.sigmas[i] ** 2 + 1.0)
        d_x0 = max_abs_diff(res.pred_original_sample, theirs.model_outputs[-1]) * alpha
        assert d_x0 <= atol * max(1.0, float(np.max(np.abs(model.x0)))), (
            f"step {i} (t={t}): data prediction differs by {d_x0:.3g} (x alpha_t)"
        )
        worst = max(worst, d_prev, d_x0)
        x_ours, x_theirs = res.prev_sample, ref.prev_sample
    assert np.all(np.isfinite(host(x_ours)))
    return worst


# ---------------------------------------------------------------------------
# oracle: diffusers' DPMSolverMultistepScheduler
# ---------------------------------------------------------------------------
SOLVER_GRID = [
    dict(
        solver_order=order,
        prediction_type=pred,
        solver_type=solver,
        final_sigmas_type=final,
        timestep_spacing=SPACINGS[k % 3],
        **_schedule_kw(SCHEDULES[(k // 3) % 3]),
    )
    for k, (order, pred, solver, final) in enumerate(
        itertools.product(
            (1, 2),
            ("epsilon", "v_prediction", "sample"),
            ("midpoint", "heun"),
            ("zero", "sigma_min"),
        )
    )
]


@pytest.mark.oracle
@pytest.mark.parametrize("kw", SOLVER_GRID, ids=lambda kw: "-".join(map(str, kw.values())))
def test_solver_options_match_diffusers(kw):
    run_against_diffusers(kw, 20)


@pytest.mark.oracle
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 5, 14, 15, 25])
def test_schedules_spacings_and_step_counts_match_diffusers(schedule, spacing, steps):
    # 14 vs 15 steps: where lower_order_final stops forcing a first-order last step
    kw = dict(timestep_spacing=spacing, final_sigmas_type="sigma_min", **_schedule_kw(schedule))
    run_against_diffusers(kw, steps)


@pytest.mark.oracle
@pytest.mark.parametrize(
    "kw",
    [
        dict(timestep_spacing="leading", steps_offset=1),
        dict(lower_order_final=False, final_sigmas_type="sigma_min"),
        dict(lower_order_final=False, solver_type="heun"),
        dict(num_train_timesteps=37, beta_end=0.05, timestep_spacing="trailing"),
        dict(thresholding=True, prediction_type="sample"),
        dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9),
        dict(thresholding=True, sample_max_value=0.8, prediction_type="v_prediction"),
        dict(trained_betas=[0.0001 + 0.0002 * i for i in range(100)], num_train_timesteps=100),
    ],
    ids=[
        "offset",
        "no-lower-order-final",
        "heun-no-lower",
        "short-train",
        "threshold",
        "threshold-1.5",
        "threshold-0.8",
        "trained-betas",
    ],
)
def test_other_options_match_diffusers(kw):
    run_against_diffusers(kw, 12)


@pytest.mark.oracle
def test_many_steps_match_diffusers():
    run_against_diffusers(dict(beta_schedule="squaredcos_cap_v2"), 200)


@pytest.mark.oracle
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(
            beta_schedule="squaredcos_cap_v2",
            solver_type="heun",
            prediction_type="v_prediction",
            timestep_spacing="trailing",
        ),
    ],
)
def test_float64_matches_diffusers(kw):
    worst = run_against_diffusers(kw, 20, dtype=np.float64, atol=ATOL_F64)
    assert worst < ATOL_F64


@pytest.mark.oracle
def test_trajectory_on_every_namespace_matches_diffusers(xp):
    run_against_diffusers(dict(beta_schedule="squaredcos_cap_v2"), 20, xp=xp)


@pytest.mark.oracle
def test_add_noise_matches_diffusers_on_scheduled_timesteps(xp, device_f32):
    diffusers = diffusers_or_skip()
    import torch

    ours, theirs = DPMSolverMultistepScheduler(), diffusers.DPMSolverMultistepScheduler()
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    z = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([ours.timesteps[0], ours.timesteps[-1]], dtype=np.int64)
    xa, za = (backend.asarray(a, xp, device=device_f32) for a in (x, z))
    got = ours.add_noise(xa, za, backend.asarray(t, xp, device=device_f32))
    ref = theirs.add_noise(torch.from_numpy(x), torch.from_numpy(z), torch.from_numpy(t))
    _same_kind(got, xa)
    np.testing.assert_allclose(host(got), ref.numpy(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# a model that knows x_0 brings the sampler back to x_0
# ---------------------------------------------------------------------------
def _exact_model(sched, x0, kind):
    """The output of a perfect model for data ``x0`` at (x_t, t)."""

    def model(x, t):
        sa, sb = math.sqrt(sched.alphas_cumprod[t]), math.sqrt(1.0 - sched.alphas_cumprod[t])
        eps = (x - sa * x0) / sb
        return {"epsilon": eps, "v_prediction": sa * eps - sb * x0, "sample": x0 + 0 * x}[kind]

    return model


@pytest.mark.parametrize("dtype_name, tol", [("float32", 2e-5), ("float64", 1e-6)])
@pytest.mark.parametrize(
    "kw",
    [
        dict(solver_order=1),
        dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="leading"),
        dict(prediction_type="v_prediction", solver_type="heun", timestep_spacing="trailing"),
        dict(prediction_type="sample", lower_order_final=False),
    ],
)
def test_exact_noise_prediction_returns_x0(xp, device_f32, kw, dtype_name, tol):
    sched = DPMSolverMultistepScheduler(**kw)
    sched.set_timesteps(20)
    rng = np.random.default_rng(7)
    dtype = getattr(xp, dtype_name)
    dev = device_f32 if dtype_name == "float32" else None
    x0 = backend.asarray(rng.uniform(-1, 1, SHAPE), xp, dtype=dtype, device=dev)
    x = backend.asarray(rng.standard_normal(SHAPE), xp, dtype=dtype, device=dev)
    model = _exact_model(sched, x0, sched.config["prediction_type"])
    for t in sched.timesteps:
        out = sched.step(model(x, t), t, x)
        _same_kind(out.prev_sample, x)
        x = out.prev_sample
    assert max_abs_diff(x, x0) < tol


def test_sigma_min_ends_on_the_trajectory_at_step_0():
    """With final_sigmas_type="sigma_min" the exact model lands on
    sqrt(abar_0) x_0 + sqrt(1 - abar_0) eps, eps the noise of the start."""
    sched = DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    sched.set_timesteps(25)
    rng = np.random.default_rng(8)
    x0, x = rng.uniform(-1, 1, SHAPE), rng.standard_normal(SHAPE)
    t0 = sched.timesteps[0]
    eps = (x - math.sqrt(sched.alphas_cumprod[t0]) * x0) / math.sqrt(1 - sched.alphas_cumprod[t0])
    model = _exact_model(sched, x0, "epsilon")
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    np.testing.assert_allclose(x, sched.add_noise(x0, eps, 0), rtol=0, atol=1e-6)
    assert sched.previous_timestep(sched.timesteps[-1]) == 0


def test_first_order_is_ddim():
    """DPM-Solver++1 is DDIM with eta = 0 (same timesteps: trailing, T divisible by n)."""
    dpm = DPMSolverMultistepScheduler(solver_order=1, timestep_spacing="trailing")
    ddim = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    dpm.set_timesteps(20)
    ddim.set_timesteps(20)
    assert dpm.timesteps.tolist() == ddim.timesteps.tolist()
    model = FakeModel("epsilon", dpm.alphas_cumprod, 1000)
    a = b = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    for t in dpm.timesteps:
        a = dpm.step(model(a, t), t, a).prev_sample
        b = ddim.step(model(b, t), t, b).prev_sample
        assert max_abs_diff(a, b) < 1e-5


# ---------------------------------------------------------------------------
# namespace-generic behaviour and the multistep state
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("kw", [dict(), dict(thresholding=True, prediction_type="v_prediction")])
def test_step_keeps_namespace_dtype_device(xp, device_f32, kw, dtype_name):
    sched = DPMSolverMultistepScheduler(**kw)
    sched.set_timesteps(6)
    dtype = getattr(xp, dtype_name)
    rng = np.random.default_rng(0)
    sample = backend.asarray(rng.standard_normal(SHAPE), xp, dtype=dtype, device=device_f32)
    gen = backend.Generator(0, xp, device=device_f32)
    for t in sched.timesteps:
        out = sched.step(0.5 * sample, t, sample, generator=gen)
        assert isinstance(out, SchedulerOutput)
        _same_kind(out.prev_sample, sample)
        _same_kind(out.pred_original_sample, sample)
        sample = out.prev_sample
    sched.set_timesteps(6)
    prev, x0 = sched.step(0.5 * sample, sched.timesteps[0], sample, return_dict=False)
    _same_kind(prev, sample)
    _same_kind(x0, sample)


def test_namespaces_agree(xp):
    def run(ns):
        sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", thresholding=True)
        sched.set_timesteps(15)
        s = backend.asarray(np.random.default_rng(4).standard_normal(SHAPE), ns)
        for t in sched.timesteps:
            s = sched.step(0.1 * s + 0.3, t, s).prev_sample
        return host(s)

    np.testing.assert_allclose(run(xp), run(backend.namespace_for("numpy")), rtol=0, atol=1e-6)


def test_set_timesteps_restarts_the_chain():
    sched = DPMSolverMultistepScheduler()
    model = FakeModel("epsilon", sched.alphas_cumprod, 1000)
    x = np.random.default_rng(5).standard_normal(SHAPE)
    results = []
    for _ in range(2):
        sched.set_timesteps(8)
        assert sched.step_index is None
        s = x
        for t in sched.timesteps:
            s = sched.step(model(s, t), t, s).prev_sample
        assert sched.step_index == 8
        results.append(s)
    assert np.array_equal(results[0], results[1])


def test_first_step_may_start_inside_the_schedule():
    """As for image-to-image: begin at a later timestep, then go on in order."""
    sched = DPMSolverMultistepScheduler()
    sched.set_timesteps(10)
    x = np.zeros(SHAPE)
    sched.step(x, sched.timesteps[4], x)
    assert sched.step_index == 5
    sched.step(x, sched.timesteps[5], x)


def test_timesteps_of_each_spacing():
    def steps(spacing, n, **kw):
        s = DPMSolverMultistepScheduler(timestep_spacing=spacing, **kw)
        s.set_timesteps(n)
        return s.timesteps.tolist()

    assert steps("linspace", 4) == [999, 749, 500, 250]
    assert steps("leading", 4) == [800, 600, 400, 200]
    assert steps("leading", 4, steps_offset=1) == [801, 601, 401, 201]
    assert steps("trailing", 4) == [999, 749, 499, 249]


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (
            dict(algorithm_type="dpmsolver"),
            r"expected algorithm_type to be one of 'dpmsolver\+\+', got 'dpmsolver'",
        ),
        (
            dict(algorithm_type="sde-dpmsolver++"),
            r"expected algorithm_type to be one of 'dpmsolver\+\+', got 'sde-dpmsolver\+\+'",
        ),
        (dict(solver_type="bh2"), r"expected solver_type to be one of 'midpoint', 'heun', got"),
        (dict(solver_order=3), r"expected solver_order to be 1 or 2 .*got 3"),
        (dict(solver_order=True), r"expected solver_order to be an integer, got True"),
        (dict(use_karras_sigmas=True), r"use_karras_sigmas=True is not supported \(only False"),
        (
            dict(final_sigmas_type="max"),
            r"expected final_sigmas_type to be one of 'zero', 'sigma_min', got 'max'",
        ),
        (dict(timestep_spacing="karras"), r"expected timestep_spacing to be one of"),
        (
            dict(prediction_type="flow_prediction"),
            r"expected prediction_type to be one of .*got 'flow_prediction'",
        ),
        (dict(beta_schedule="cosine"), r"expected beta_schedule to be one of"),
        (dict(thresholding="yes"), r"expected thresholding to be True or False, got 'yes'"),
        (dict(lower_order_final=1), r"expected lower_order_final to be True or False, got 1"),
        (
            dict(dynamic_thresholding_ratio=0),
            r"expected dynamic_thresholding_ratio to be a finite number > 0.0 and <= 1.0",
        ),
        (
            dict(dynamic_thresholding_ratio=1.5),
            r"expected dynamic_thresholding_ratio to be .* <= 1.0, got 1.5",
        ),
        (dict(sample_max_value=0.0), r"expected sample_max_value to be .* > 0.0, got 0.0"),
        (dict(trained_betas=[0.1, 0.2]), r"expected 1000 trained_betas .*got 2"),
        (dict(trained_betas="abc"), r"expected trained_betas to be None or a sequence"),
        (
            dict(trained_betas=[0.5, 1.0], num_train_timesteps=2),
            r"expected every beta in \(0, 1\), got 1.0 from trained_betas",
        ),
        (dict(num_train_timesteps=0), r"expected num_train_timesteps to be an integer >= 1"),
        (dict(steps_offset=-1), r"expected steps_offset to be an integer >= 0"),
    ],
)
def test_bad_constructor_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=rf"DPMSolverMultistepScheduler: {match}"):
        DPMSolverMultistepScheduler(**kw)


def test_step_errors():
    sched = DPMSolverMultistepScheduler()
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match=r"step: expected set_timesteps\(num_inference_steps\)"):
        sched.step(x, 999, x)
    with pytest.raises(ValueError, match=r"previous_timestep: expected set_timesteps"):
        sched.previous_timestep(999)
    with pytest.raises(ValueError, match=r"num_inference_steps to be an integer >= 1 and <= 1000"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match=r"steps_offset=900 with 4 steps gives timestep 1700"):
        DPMSolverMultistepScheduler(timestep_spacing="leading", steps_offset=900).set_timesteps(4)
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match=r"expected a timestep from set_timesteps\(3\).*got 500"):
        sched.step(x, 500, x)
    with pytest.raises(ValueError, match=r"timestep 1000 is out of range"):
        sched.step(x, 1000, x)
    with pytest.raises(ValueError, match=r"expected an integer timestep .*got 999.0"):
        sched.step(x, 999.0, x)
    with pytest.raises(ValueError, match=r"expected model_output of shape \(2, 1, 4, 4\)"):
        sched.step(x[:1], 999, x)
    with pytest.raises(ValueError, match="at most one of generator and variance_noise"):
        sched.step(x, 999, x, generator=backend.Generator(0), variance_noise=x)
    sched.step(x, sched.timesteps[0], x)
    with pytest.raises(ValueError, match=r"expected timestep 666 \(step 1 of 3; .*got 999"):
        sched.step(x, 999, x)
    sched.step(x, 666, x)
    sched.step(x, 333, x)
    with pytest.raises(ValueError, match=r"all 3 steps of this chain are taken; call set_tim"):
        sched.step(x, 333, x)


@pytest.mark.oracle
def test_step_rejects_mixed_namespaces():
    torch = pytest.importorskip("torch")
    sched = DPMSolverMultistepScheduler()
    sched.set_timesteps(3)
    with pytest.raises(TypeError, match="DPMSolverMultistepScheduler.step"):
        sched.step(torch.zeros(SHAPE), 999, np.zeros(SHAPE, np.float32))


# ---------------------------------------------------------------------------
# config files
# ---------------------------------------------------------------------------
def test_config_round_trip(tmp_path):
    sched = DPMSolverMultistepScheduler(
        beta_schedule="squaredcos_cap_v2",
        solver_type="heun",
        final_sigmas_type="sigma_min",
        timestep_spacing="trailing",
        thresholding=True,
        solver_order=1,
    )
    json.dumps(sched.config)
    path = sched.save_config(tmp_path / "sched")
    assert os.listdir(tmp_path / "sched") == [CONFIG_NAME]
    with open(path) as fh:
        assert json.load(fh)["_class_name"] == "DPMSolverMultistepScheduler"
    assert DPMSolverMultistepScheduler.from_pretrained(tmp_path / "sched").config == sched.config
    again = DPMSolverMultistepScheduler.from_config(sched.config, solver_order=2)
    assert again.config["solver_order"] == 2
    betas = [0.01] * 10
    trained = DPMSolverMultistepScheduler(num_train_timesteps=10, trained_betas=betas)
    assert trained.betas == tuple(trained.config["trained_betas"])
    assert trained.alphas_cumprod[-1] == pytest.approx(0.99**10, rel=1e-6)


@pytest.mark.oracle
def test_diffusers_reads_our_file_and_we_read_theirs(tmp_path):
    diffusers = diffusers_or_skip()
    kw = dict(
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        solver_order=1,
        solver_type="heun",
        final_sigmas_type="sigma_min",
        timestep_spacing="leading",
        steps_offset=1,
        thresholding=True,
        sample_max_value=2.0,
    )
    ours = DPMSolverMultistepScheduler(**kw)
    ours.save_config(tmp_path / "ours")
    loaded = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path / "ours")
    for key, value in ours.config.items():
        assert loaded.config[key] == value, key
    # diffusers writes every key it knows, the unsupported features switched off
    diffusers.DPMSolverMultistepScheduler(**kw).save_pretrained(tmp_path / "theirs")
    assert DPMSolverMultistepScheduler.from_pretrained(tmp_path / "theirs").config == ours.config


def test_config_errors(caplog):
    with pytest.raises(ValueError, match=r"use_lu_lambdas=True is not supported"):
        DPMSolverMultistepScheduler.from_config({"use_lu_lambdas": True})
    with pytest.raises(ValueError, match=r"lambda_min_clipped=-5.1 is not supported"):
        DPMSolverMultistepScheduler.from_config({"lambda_min_clipped": -5.1})
    with pytest.raises(ValueError, match=r"euler_at_final=True is not supported"):
        DPMSolverMultistepScheduler.from_config({"euler_at_final": True})
    with caplog.at_level("WARNING", logger="xpdiff"):
        DPMSolverMultistepScheduler.from_config({"colour": "red"})
    assert "ignoring config keys ['colour']" in caplog.records[0].getMessage()
    ok = DPMSolverMultistepScheduler.from_config(
        {"lambda_min_clipped": -math.inf, "variance_type": None, "flow_shift": 3.0}
    )
    assert ok.config == DPMSolverMultistepScheduler().config


def test_from_the_config_of_ddim_or_ddpm():
    """Switching a model's scheduler as in diffusers: the schedule carries over,
    the DDIM/DDPM-only keys (clip_sample, set_alpha_to_one, variance_type) are ignored."""
    kw = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", steps_offset=1)
    for other in (DDIMScheduler(clip_sample=True, **kw), DDPMScheduler(**kw)):
        sched = DPMSolverMultistepScheduler.from_config(other.to_json_dict())
        assert {k: sched.config[k] for k in kw} == kw
        assert sched.alphas_cumprod == other.alphas_cumprod


# ---------------------------------------------------------------------------
# sampling through generate and the command line
# ---------------------------------------------------------------------------
UNET = TINY_UNET


def _unet(xp, dtype="float32"):
    from xpdiff.models import UNet2DModel
    from xpdiff.nn import init

    init.manual_seed(0)
    return UNet2DModel(**UNET, dtype=dtype, xp=xp)


def test_generate_with_dpm_solver(xp):
    from xpdiff.pipelines import generate

    model = _unet(xp)
    sched = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2")
    kw = dict(num_inference_steps=5, guidance_scale=2.0, null_class=3, seed=1)
    res = generate(model, sched, [0, 1, 2], return_trajectory=True, **kw)
    assert backend.library_name(backend.get_namespace(res.images)) == backend.library_name(xp)
    assert tuple(res.images.shape) == (3, 1, 6, 6)
    assert backend.dtype_name(res.images.dtype) == "float32"
    a = host(res.images)
    assert np.all(np.isfinite(a)) and a.min() >= -1.0 and a.max() <= 1.0
    assert res.timesteps == sched.timesteps.tolist() and len(res.trajectory) == 6
    # the same scheduler object again: set_timesteps restarts the multistep chain
    again = generate(model, sched, [0, 1, 2], **kw)
    assert np.array_equal(host(again.images), a)


def test_generate_first_order_dpm_equals_ddim():
    from xpdiff.pipelines import generate

    model = _unet(backend.namespace_for("numpy"), "float64")
    kw = dict(num_inference_steps=10, guidance_scale=2.0, null_class=3, seed=3)
    dpm = DPMSolverMultistepScheduler(solver_order=1, timestep_spacing="trailing")
    ddim = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    a = generate(model, dpm, [0, 1, 2, 3], **kw).images
    b = generate(model, ddim, [0, 1, 2, 3], **kw).images
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_run_config_builds_dpm_solver():
    from xpdiff.digits.training import TrainConfig

    cfg = TrainConfig(beta_schedule="linear", prediction_type="v_prediction")
    sched = cfg.sampling_scheduler("dpm")
    assert isinstance(sched, DPMSolverMultistepScheduler)
    c = sched.config
    assert (c["beta_schedule"], c["prediction_type"], c["thresholding"]) == (
        "linear",
        "v_prediction",
        False,
    )
    # the run's clip_sample becomes thresholding at 1.0, i.e. clipping x_0 to [-1, 1]
    clipped = TrainConfig(clip_sample=True).sampling_scheduler("dpm").config
    assert clipped["thresholding"] is True and clipped["sample_max_value"] == 1.0


def test_cli_sample_with_dpm(tmp_path, capsys):
    from conftest import TINY_RUN

    from xpdiff.digits.cli import main
    from xpdiff.digits.training import TrainConfig

    cfg = TrainConfig(**TINY_RUN)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_json()))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(tmp_path / "cfg.json"),
                "--out",
                str(run),
                "--no-progress",
                "--no-samples",
            ]
        )
        == 0
    )
    png = tmp_path / "dpm.png"
    assert (
        main(["sample", str(run), "--out", str(png), "--per-digit", "1", "--scheduler", "dpm"]) == 0
    )
    assert png.is_file()
    assert "with DPM 20 steps" in capsys.readouterr().out  # 20 steps unless --steps


def test_cli_evaluate_takes_the_scheduler():
    from xpdiff.digits.cli import _steps_of, build_parser
    from xpdiff.digits.training import TrainConfig

    args = build_parser().parse_args(["evaluate", "RUN", "--scheduler", "dpm"])
    cfg = TrainConfig(sample_steps=100)
    assert (args.scheduler, args.steps, _steps_of(cfg, "dpm")) == ("dpm", None, 20)
    assert build_parser().parse_args(["evaluate", "RUN"]).scheduler == "ddim"
    # DDIM and DDPM default to the run's own sample_steps, as its final grid does
    assert _steps_of(cfg, "ddim") == _steps_of(cfg, "ddpm") == 100
