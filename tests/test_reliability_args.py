"""Bad arguments never give a silent wrong result (issue 13, sections 2 and 7).

The examples of the issue, then a generated sweep: every public numeric, boolean and
enumerated argument of the constructors and functions checked here, given 0, a negative
value, NaN, inf, a wrong type and a bool wherever those are not valid values.  Each must
raise ValueError or TypeError naming the argument.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from xpdiff import backend, io
from xpdiff._validation import ArgumentError, ArgumentTypeError
from xpdiff.digits.training import TrainConfig
from xpdiff.models.unet_2d import UNet2DModel
from xpdiff.optim import EMA, SGD, AdamW, clip_grad_norm, warmup_cosine
from xpdiff.pipelines import generate
from xpdiff.schedulers import DDIMScheduler, DDPMScheduler

SMALL = dict(
    sample_size=6,
    in_channels=1,
    out_channels=1,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[8, 16],
    layers_per_block=1,
    attention_head_dim=4,
    norm_num_groups=4,
    num_class_embeds=4,
)


@pytest.fixture(scope="module")
def model():
    return UNet2DModel(**SMALL, dtype="float32", xp=np)


def bad_values(kind: str, lo=None, hi=None, *, none=False, lo_open=False) -> list:
    """Invalid values of an argument: out of range (0, negative, past the top), NaN, inf,
    wrong types (a string, a bool, a float for an integer), None where it is not allowed."""
    vals: list = [float("nan"), float("inf"), float("-inf"), "1", True, False, [1], 1j]
    if kind == "int":
        vals += [1.5, 2.0]
        if lo is not None:
            vals += [lo - 1, -1] if lo >= 0 else [lo - 1]
        if hi is not None:
            vals.append(hi + 1)
    elif lo is not None:  # float
        vals += [lo - 1.0, lo - 1e-3] + ([lo] if lo_open else [])
        if lo == 0.0:
            vals.append(-0.5)
        if hi is not None:
            vals += [hi + 1.0]
    if kind == "bool":
        vals = ["false", "true", 0, 1, None, 1.0, np.bool_(True)]
    if kind == "int" and lo is not None and lo >= 1:
        vals.append(0)
    if not none and kind != "bool":
        vals.append(None)
    return [v for v in vals if not (isinstance(v, bool) and kind == "bool")]


def _id(v) -> str:
    return f"{type(v).__name__}:{v!r}"


def sweep(spec: dict) -> list:
    return [
        pytest.param(name, v, id=f"{name}={_id(v)}")
        for name, args in spec.items()
        for v in bad_values(*args[:3], **args[3])
    ]


def assert_names(exc_info, name: str) -> None:
    assert name in str(exc_info.value), f"the message does not name {name}: {exc_info.value}"


# ---------------------------------------------------------------------------
# UNet2DModel construction (section 7 and the config-file types of section 2)
# ---------------------------------------------------------------------------
UNET_ARGS = {
    "sample_size": ("int", 1, None, {"none": True}),
    "in_channels": ("int", 1, None, {}),
    "out_channels": ("int", 1, None, {}),
    "layers_per_block": ("int", 1, None, {}),
    "norm_num_groups": ("int", 1, None, {}),
    "time_embedding_dim": ("int", 1, None, {"none": True}),
    "attention_head_dim": ("int", 1, None, {"none": True}),
    "attn_norm_num_groups": ("int", 1, None, {"none": True}),
    "num_class_embeds": ("int", 1, None, {"none": True}),
    "num_train_timesteps": ("int", 1, None, {"none": True}),
    "downsample_padding": ("int", 0, None, {}),
    "mid_block_scale_factor": ("float", 0.0, None, {"lo_open": True}),
    "norm_eps": ("float", 0.0, None, {"lo_open": True}),
    "dropout": ("float", 0.0, None, {}),
    "freq_shift": ("float", None, None, {}),
    "center_input_sample": ("bool", None, None, {}),
    "flip_sin_to_cos": ("bool", None, None, {}),
    "add_attention": ("bool", None, None, {}),
}


@pytest.mark.parametrize("name,value", sweep(UNET_ARGS))
def test_unet_constructor_sweep(name, value):
    with pytest.raises((ValueError, TypeError)) as info:
        UNet2DModel(**{**SMALL, name: value}, dtype="float32", xp=np)
    assert_names(info, name)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"norm_eps": -1.0}, r"expected norm_eps to be a finite number > 0.0, got -1.0"),
        ({"dtype": "int32"}, r"expected dtype to be one of 'float32', 'float64', got 'int32'"),
        ({"dtype": "float"}, r"expected dtype to be one of .*got 'float'"),
        ({"layers_per_block": 0}, r"expected layers_per_block to be an integer >= 1, got 0"),
        ({"in_channels": 0}, r"expected in_channels to be an integer >= 1, got 0"),
        (
            {"block_out_channels": [-8, 16]},
            r"expected block_out_channels to be a list of integers "
            r">= 1, got \[-8, 16\]",
        ),
        ({"block_out_channels": []}, r"expected block_out_channels to be a non-empty list"),
        (
            {"num_class_embeds": -1},
            r"expected num_class_embeds to be an integer >= 1 or None, got -1",
        ),
        ({"norm_num_groups": 3}, r"expected norm_num_groups to divide every channel count"),
        ({"attn_norm_num_groups": 3}, r"expected attn_norm_num_groups to divide every channel"),
        ({"freq_shift": 4}, r"expected freq_shift to differ from block_out_channels\[0\] // 2 = 4"),
        ({"down_block_types": "DownBlock2D"}, r"expected down_block_types to be a list"),
    ],
)
def test_unet_construction_examples(change, match):
    with pytest.raises(ArgumentError, match=match):
        UNet2DModel(**{**SMALL, "dtype": "float32", **change}, xp=np)


@pytest.mark.parametrize(
    "key,value",
    [
        ("flip_sin_to_cos", "false"),
        ("layers_per_block", "1"),
        ("norm_eps", "1e-5"),
        ("block_out_channels", "8,16"),
        ("num_class_embeds", 4.0),
    ],
)
def test_config_file_types(tmp_path, model, key, value):
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / io.CONFIG_NAME).read_text())
    cfg[key] = value
    (tmp_path / io.CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ArgumentTypeError, match=rf"UNet2DModel: expected {key} to be .*got "):
        UNet2DModel.from_pretrained(tmp_path, xp=np)


def test_valid_edge_values_still_build():
    m = UNet2DModel(
        **{
            **SMALL,
            "sample_size": [6, 8],
            "layers_per_block": np.int64(1),
            "freq_shift": 1,
            "norm_eps": 1e-6,
            "downsample_padding": 1,
        },
        dtype="float64",
        xp=np,
    )
    assert m.config["layers_per_block"] == 1 and type(m.config["layers_per_block"]) is int
    json.dumps(m.config)  # plain Python values: the config saves


# ---------------------------------------------------------------------------
# timesteps of the UNet
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "t",
    [
        True,
        False,
        1j,
        float("inf"),
        float("-inf"),
        float("nan"),
        -1,
        "5",
        None,
        np.array([True, False]),
        np.array([1 + 0j, 2]),
        np.array([np.inf, 1.0]),
    ],
    ids=_id,
)
def test_unet_timesteps(model, t):
    x = np.zeros((2, 1, 6, 6), np.float32)
    with pytest.raises((ValueError, TypeError), match="UNet2DModel: expected .*timestep"):
        model(x, t, np.array([0, 1]))


def test_unet_backward_with_wrong_gradient_shape_names_the_expected_shape(model):
    x = np.zeros((2, 1, 6, 6), np.float32)
    y = model(x, np.array([1, 2]), np.array([0, 1]))
    with pytest.raises(
        ValueError,
        match=r"UNet2DModel.backward: expected grad_output of shape "
        r"\(2, 1, 6, 6\) .*got shape \(2, 1, 6\)",
    ):
        model.backward(np.zeros((2, 1, 6), np.float32))
    y = model(x, np.array([1, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"expected grad_output of shape \(2, 1, 6, 6\).*got list"):
        model.backward([[0.0]])
    y = model(x, np.array([1, 2]), np.array([0, 1]))
    assert model.backward(np.ones_like(y)).shape == x.shape  # the right shape still works


# ---------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------
GENERATE_ARGS = {
    "num_inference_steps": ("int", 1, None, {}),
    "guidance_scale": ("float", None, None, {}),
    "null_class": ("int", 0, None, {"none": True}),
    "eta": ("float", 0.0, None, {}),
    "seed": ("int", 0, None, {"none": True}),
    "max_batch": ("int", 1, None, {}),
    "return_trajectory": ("bool", None, None, {}),
}


@pytest.mark.parametrize("name,value", sweep(GENERATE_ARGS))
def test_generate_sweep(model, name, value):
    kw = {"num_inference_steps": 2, "guidance_scale": 2.0, "null_class": 3, name: value}
    with pytest.raises((ValueError, TypeError)) as info:
        generate(model, DDIMScheduler(), [1, 2], **kw)
    assert_names(info, name)


@pytest.mark.parametrize(
    "labels,match",
    [
        ([1.7], r"expected class_labels\[0\] to be an integer, got 1.7"),
        ([1, True], r"expected class_labels\[1\] to be an integer, got True"),
        (["1"], r"expected class_labels\[0\] to be an integer"),
        ([float("nan")], r"class_labels\[0\]"),
        (np.array([1.0, 2.0]), r"expected class_labels to be a 1-D integer array.*float64"),
        (np.array([[1, 2]]), r"1-D integer array, got shape \(1, 2\)"),
        ("12", r"expected class_labels to be a sequence of integers, got str"),
        (3, r"expected class_labels to be a sequence of integers, got int"),
        ([4], r"expected labels in \[0, 4\), got \[4\]"),
        ([-1], r"expected labels in \[0, 4\), got \[-1\]"),
    ],
)
def test_generate_labels(model, labels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        generate(model, DDIMScheduler(), labels, num_inference_steps=2)


def test_generate_examples(model):
    with pytest.raises(
        ValueError, match="expected null_class to be an integer >= 0 or None, got 10.5"
    ):
        generate(model, DDIMScheduler(), [1], guidance_scale=2.0, null_class=10.5)
    with pytest.raises(ValueError, match="expected guidance_scale to be a finite number, got nan"):
        generate(model, DDIMScheduler(), [1], guidance_scale=float("nan"), null_class=3)
    with pytest.raises(ValueError, match="expected eta to be a finite number >= 0.0, got inf"):
        generate(model, DDIMScheduler(), [1], eta=float("inf"))
    with pytest.raises(
        ValueError,
        match=r"expected size to be a list of integers >= 1 of "
        r"length 2, got \(6, 6, 6\)",
    ):
        generate(model, DDIMScheduler(), [1], size=(6, 6, 6))
    with pytest.raises(ValueError, match="expected batch_size to be an integer >= 1 or None"):
        generate(
            UNet2DModel(**{**SMALL, "num_class_embeds": None}, xp=np), DDIMScheduler(), batch_size=0
        )
    # integer-like labels (NumPy integers, an integer array) are fine
    a = generate(model, DDIMScheduler(), [np.int64(1), 2], num_inference_steps=2).images
    b = generate(model, DDIMScheduler(), np.array([1, 2]), num_inference_steps=2).images
    np.testing.assert_array_equal(a, b)


def test_generate_refuses_non_finite_samples():
    m = UNet2DModel(**SMALL, dtype="float32", xp=np)
    m.conv_out.weight.data = m.conv_out.weight.data * np.float32("nan")
    with pytest.raises(ValueError, match="generate: the samples came out NaN or infinite"):
        generate(m, DDIMScheduler(), [1], num_inference_steps=2)


# ---------------------------------------------------------------------------
# schedulers
# ---------------------------------------------------------------------------
SCHED_ARGS = {
    "num_train_timesteps": ("int", 1, None, {}),
    "beta_start": ("float", None, None, {}),
    "beta_end": ("float", None, None, {}),
    "clip_sample_range": ("float", 0.0, None, {"lo_open": True}),
    "steps_offset": ("int", 0, None, {}),
    "clip_sample": ("bool", None, None, {}),
}


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize(
    "name,value",
    sweep(SCHED_ARGS)
    + [
        pytest.param("beta_start", -0.1, id="beta_start=-0.1"),
        pytest.param("beta_start", 0.0, id="beta_start=0"),
        pytest.param("beta_end", 1.5, id="beta_end=1.5"),
    ],
)
def test_scheduler_constructor_sweep(cls, name, value):
    with pytest.raises((ValueError, TypeError)) as info:
        cls(**{name: value})
    assert_names(info, name)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("n", bad_values("int", 1, 1000), ids=_id)
def test_set_timesteps_sweep(cls, n):
    with pytest.raises((ValueError, TypeError), match="num_inference_steps"):
        cls().set_timesteps(n)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize(
    "t",
    [True, 1.5, 5.0, float("nan"), float("inf"), 1j, "5", None, -1, 1000, np.float64(5.0)],
    ids=_id,
)
def test_step_timestep_sweep(cls, t):
    s = cls()
    s.set_timesteps(10)
    x = np.zeros((2, 1, 4, 4), np.float32)
    with pytest.raises((ValueError, TypeError), match="timestep"):
        s.step(x, t, x)


@pytest.mark.parametrize("eta", bad_values("float", 0.0), ids=_id)
def test_ddim_eta_sweep(eta):
    s = DDIMScheduler()
    s.set_timesteps(10)
    x = np.zeros((2, 1, 4, 4), np.float32)
    with pytest.raises((ValueError, TypeError), match="eta"):
        s.step(x, 900, x, eta=eta)


@pytest.mark.parametrize(
    "t",
    [
        True,
        [True, 1],
        [1.5, 2],
        [float("nan"), 1],
        "5",
        None,
        np.array([1.0, 2.0]),
        np.array([True, False]),
        [-1, 2],
        [1000, 2],
        np.array([1, 2, 3]),
    ],
    ids=_id,
)
def test_add_noise_timesteps_sweep(t):
    x = np.zeros((2, 1, 4, 4), np.float32)
    with pytest.raises((ValueError, TypeError), match="timestep"):
        DDPMScheduler().add_noise(x, x, t)


def test_float16_ddpm_step_works(xp):
    if not hasattr(xp, "float16"):
        pytest.skip(f"{backend.library_name(xp)} has no float16")
    s = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    s.set_timesteps(10)
    x = backend.asarray(np.linspace(-1, 1, 32).reshape(2, 1, 4, 4), xp, dtype=xp.float16)
    gen = backend.Generator(0, xp)
    out = s.step(x, 900, x, generator=gen).prev_sample
    assert out.dtype == xp.float16 and tuple(out.shape) == (2, 1, 4, 4)
    assert bool(xp.all(xp.isfinite(out)))
    d = DDIMScheduler()
    d.set_timesteps(10)
    assert d.step(x, 900, x, eta=1.0, generator=gen).prev_sample.dtype == xp.float16


# ---------------------------------------------------------------------------
# TrainConfig (a config file's keys and the CLI's overrides end here)
# ---------------------------------------------------------------------------
CONFIG_ARGS = {
    "size": ("int", 14, 28, {}),
    "test_fraction": ("float", 0.0, 1.0, {}),
    "layers_per_block": ("int", 1, None, {}),
    "norm_num_groups": ("int", 1, None, {}),
    "attention_head_dim": ("int", 1, None, {"none": True}),
    "num_train_timesteps": ("int", 1, None, {}),
    "batch_size": ("int", 1, None, {}),
    "epochs": ("int", 1, None, {}),
    "max_steps": ("int", 1, None, {"none": True}),
    "lr": ("float", 0.0, None, {"lo_open": True}),
    "warmup_steps": ("int", 0, None, {}),
    "min_lr": ("float", 0.0, None, {}),
    "weight_decay": ("float", 0.0, None, {}),
    "grad_clip": ("float", 0.0, None, {"none": True, "lo_open": True}),
    "ema_decay": ("float", 0.0, 1.0, {}),
    "snr_gamma": ("float", 0.0, None, {"none": True, "lo_open": True}),
    "label_dropout": ("float", 0.0, 1.0, {}),
    "seed": ("int", 0, None, {}),
    "checkpoint_every": ("int", 1, None, {}),
    "keep_checkpoints": ("int", 0, None, {}),
    "log_every": ("int", 1, None, {}),
    "sample_steps": ("int", 1, 1000, {}),
    "guidance_scale": ("float", 0.0, None, {}),
    "eta": ("float", 0.0, None, {}),
    "clip_sample": ("bool", None, None, {}),
}


@pytest.mark.parametrize(
    "name,value",
    sweep(CONFIG_ARGS)
    + [
        pytest.param("size", 20, id="size=20"),
        pytest.param("label_dropout", 1.0, id="dropout=1"),
        pytest.param("test_fraction", 1.0, id="test_fraction=1"),
        pytest.param("block_out_channels", [0, 8], id="channels=[0,8]"),
        pytest.param("block_out_channels", "32,64", id="channels=str"),
        pytest.param("down_block_types", "DownBlock2D", id="down=str"),
        pytest.param("beta_schedule", "cosine", id="beta_schedule"),
        pytest.param("prediction_type", "eps", id="prediction_type"),
        pytest.param("backend", "jax", id="backend"),
        pytest.param("dtype", "int32", id="dtype"),
        pytest.param("data", 5, id="data=5"),
        pytest.param("guidance_interval", [600, 100], id="interval=reversed"),
        pytest.param("guidance_interval", [0, 1000], id="interval=past T"),
        pytest.param("guidance_interval", [-1, 10], id="interval=negative"),
        pytest.param("guidance_interval", [100], id="interval=one number"),
        pytest.param("guidance_interval", "0-600", id="interval=str"),
    ],
)
def test_train_config_sweep(name, value):
    with pytest.raises((ValueError, TypeError)) as info:
        TrainConfig(**{name: value}).validate()
    assert_names(info, name)
    with pytest.raises((ValueError, TypeError)) as info:  # the same key in a config file
        TrainConfig.from_json({**TrainConfig().to_json(), name: value}, "config file c.json")
    assert str(info.value).startswith("config file c.json: ") and name in str(info.value)


def test_train_config_examples():
    with pytest.raises(
        ValueError, match="expected grad_clip to be a finite number > 0.0 or None, got -1"
    ):
        TrainConfig(grad_clip=-1).validate()
    with pytest.raises(ValueError, match="expected lr to be a finite number > 0.0, got -0.001"):
        TrainConfig(lr=-0.001).validate()
    TrainConfig(
        grad_clip=None,
        snr_gamma=None,
        max_steps=None,
        attention_head_dim=None,
        keep_checkpoints=0,
        warmup_steps=0,
        weight_decay=0,
        label_dropout=0,
    ).validate()


# ---------------------------------------------------------------------------
# optimisers
# ---------------------------------------------------------------------------
OPT_ARGS = {
    "lr": ("float", 0.0, None, {}),
    "eps": ("float", 0.0, None, {"lo_open": True}),
    "weight_decay": ("float", 0.0, None, {}),
}


@pytest.mark.parametrize(
    "name,value",
    sweep(OPT_ARGS)
    + [
        pytest.param("betas", (0.9, 1.0), id="betas=(0.9,1)"),
        pytest.param("betas", (0.9,), id="betas=(0.9,)"),
        pytest.param("betas", (float("nan"), 0.9), id="betas=nan"),
    ],
)
def test_adamw_sweep(model, name, value):
    with pytest.raises((ValueError, TypeError)) as info:
        AdamW(model, **{name: value})
    assert_names(info, name)


@pytest.mark.parametrize("value", bad_values("float", 0.0, 1.0), ids=_id)
def test_ema_and_sgd_sweep(model, value):
    with pytest.raises((ValueError, TypeError), match="decay"):
        EMA(model, value)
    if not (isinstance(value, float) and 0 <= value):  # any lr >= 0 is valid for SGD
        with pytest.raises((ValueError, TypeError), match="lr"):
            SGD(model, value)


@pytest.mark.parametrize("value", bad_values("float", 0.0, lo_open=True, none=True), ids=_id)
def test_clip_grad_norm_sweep(model, value):
    with pytest.raises((ValueError, TypeError), match="max_norm"):
        clip_grad_norm(model, value)


def test_negative_grad_clip_would_have_negated_gradients(model):
    """The example: a negative max_norm used to flip every gradient's sign."""
    with pytest.raises(ValueError, match="expected max_norm to be a finite number > 0.0"):
        clip_grad_norm(model, -1.0)


@pytest.mark.parametrize(
    "arg,value",
    [("step", -1), ("base_lr", float("nan")), ("warmup", 1.5), ("total", True), ("min_lr", -1.0)],
)
def test_warmup_cosine_sweep(arg, value):
    kw = {"step": 3, "base_lr": 1e-3, "warmup": 2, "total": 10, "min_lr": 0.0, arg: value}
    with pytest.raises((ValueError, TypeError), match=arg):
        warmup_cosine(**kw)
    assert math.isfinite(warmup_cosine(3, 1e-3, 2, 10))


# ---------------------------------------------------------------------------
# data, images, the digit classifier
# ---------------------------------------------------------------------------
def _data_calls():
    from xpdiff.digits import classifier, data, images

    x = np.zeros((4, 1, 4, 4), np.float32)
    y = np.arange(4, dtype=np.int64)
    gen = backend.Generator(0, np)
    return {
        "factor": lambda v: data.downsample(x, v),
        "test_fraction": lambda v: data.train_test_split(x, y, test_fraction=v),
        "seed": lambda v: data.train_test_split(x, y, seed=v),
        "batch_size": lambda v: data.batches(x, y, v, gen),
        "skip": lambda v: data.batches(x, y, 2, gen, skip=v),
        "drop_last": lambda v: data.batches(x, y, 2, gen, drop_last=v),
        "nrow": lambda v: images.grid(x, v),
        "pad": lambda v: images.grid(x, 2, pad=v),
        "scale": lambda v: images.grid(x, 2, scale=v),
        "duration_ms": lambda v: images.save_gif([x], "unused.gif", duration_ms=v),
        "size": lambda v: classifier.DigitClassifier(v, xp=np),
        "channels": lambda v: classifier.DigitClassifier(14, channels=v, xp=np),
        "epochs": lambda v: classifier.train_classifier(x, y, epochs=v, xp=np),
        "lr": lambda v: classifier.train_classifier(x, y, lr=v, xp=np),
    }


DATA_ARGS = {
    "factor": ("int", 1, None, {}),
    "test_fraction": ("float", 0.0, 1.0, {}),
    "seed": ("int", 0, None, {}),
    "batch_size": ("int", 1, None, {}),
    "skip": ("int", 0, None, {}),
    "drop_last": ("bool", None, None, {}),
    "nrow": ("int", 1, None, {}),
    "pad": ("int", 0, None, {}),
    "scale": ("int", 1, None, {}),
    "duration_ms": ("int", 1, None, {}),
    "size": ("int", 4, None, {}),
    "epochs": ("int", 1, None, {"none": True}),
    "lr": ("float", 0.0, None, {"lo_open": True}),
}


@pytest.mark.parametrize(
    "name,value",
    sweep(DATA_ARGS)
    + [
        pytest.param("channels", [8, 0, 8], id="channels=[8,0,8]"),
        pytest.param("channels", [8, 8], id="channels=[8,8]"),
        pytest.param("test_fraction", 1.0, id="test_fraction=1"),
    ],
)
def test_data_images_classifier_sweep(name, value):
    with pytest.raises((ValueError, TypeError)) as info:
        _data_calls()[name](value)
    assert_names(info, name)
