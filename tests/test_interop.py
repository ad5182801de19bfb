"""Interoperability with diffusers (issue 12, sections 4 and 5): the Google DDPM checkpoint
family (downsample_padding=0, legacy attention names, dropout), float16 / bfloat16 weights,
variant file names and pickle-only directories.

diffusers and torch are oracles only: each test imports them itself (skipped without them).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from xpdiff import io
from xpdiff.models import UNet2DModel
from xpdiff.nn.blocks import Downsample2D
from xpdiff.nn.module import no_grad
from xpdiff.testing import check_backward

#: a small member of the google/ddpm-* family: its flags, with fewer and narrower blocks
GOOGLE_DDPM = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": None,
    "center_input_sample": False,
    "downsample_padding": 0,
    "dropout": 0.1,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
}

LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _torch_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    return torch, diffusers


def _random_diffusers_unet(cfg: dict, seed: int = 0):
    torch, diffusers = _torch_diffusers()
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _legacy_names(path) -> None:
    """Rename today's attention keys of a safetensors file to the old ones."""
    from safetensors.numpy import load_file, save_file

    state = load_file(str(path))
    renamed = {}
    for key, value in state.items():
        for new, old in LEGACY.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    assert any(".query." in k for k in renamed) and any(".proj_attn." in k for k in renamed)
    save_file(renamed, str(path), metadata={"format": "pt"})


def _inputs(seed: int = 0, batch: int = 2, size: int = 8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    t = np.array([3, 917][:batch], dtype=np.int64)
    return x, t


@pytest.mark.oracle
def test_google_ddpm_checkpoint_with_legacy_names_matches_diffusers(tmp_path):
    torch, _ = _torch_diffusers()
    theirs = _random_diffusers_unet(GOOGLE_DDPM)
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    _legacy_names(tmp_path / io.WEIGHTS_NAME)
    ours = UNet2DModel.from_pretrained(tmp_path, dtype="float32", xp=np)
    assert ours.config.downsample_padding == 0 and ours.config.dropout == 0.1
    x, t = _inputs()
    with torch.no_grad():
        want = theirs(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    with no_grad():
        got = ours(x, t)
    scale = float(np.max(np.abs(want)))
    assert float(np.max(np.abs(got - want))) <= 1e-4 * max(1.0, scale)
    # the same file written back by xpdiff (today's names) loads in diffusers
    ours.save_pretrained(tmp_path / "back")
    again = type(theirs).from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        back = again(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    np.testing.assert_array_equal(back, want)


@pytest.mark.oracle
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("hw", [(6, 6), (7, 5)])
def test_downsample_padding_0_matches_torch(layout, hw):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    down = Downsample2D(4, out_channels=5, padding=0, layout=layout, dtype="float64", xp=np)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, *hw))
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    y = down(xin)
    w = torch.from_numpy(np.asarray(down.conv.weight.data))
    b = torch.from_numpy(np.asarray(down.conv.bias.data))
    want = F.conv2d(F.pad(torch.from_numpy(x), (0, 1, 0, 1)), w, b, stride=2).numpy()
    got = y if layout == "NCHW" else y.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    check_backward(down, [xin])


def test_dropout_model_refuses_to_train():
    m = UNet2DModel(**{**GOOGLE_DDPM, "dropout": 0.1}, xp=np)
    x, t = _inputs()
    with pytest.raises(
        ValueError,
        match=r"dropout=0.1 is only supported at inference.*"
        r"training with dropout is not implemented",
    ):
        m(x, t)
    with no_grad():
        assert m(x, t).shape == x.shape


@pytest.mark.oracle
@pytest.mark.parametrize("kind", ["float16", "bfloat16"])
def test_half_precision_weights_are_upcast(kind, tmp_path):
    torch, _ = _torch_diffusers()
    theirs = _random_diffusers_unet({**GOOGLE_DDPM, "dropout": 0.0})
    dtype = getattr(torch, kind)
    variant = "fp16" if kind == "float16" else None
    theirs.to(dtype).save_pretrained(tmp_path, variant=variant, safe_serialization=True)
    ours = UNet2DModel.from_pretrained(tmp_path, variant=variant, xp=np)
    assert str(ours.dtype) == "float32"
    mine = ours.state_dict()
    for key, value in theirs.state_dict().items():
        np.testing.assert_array_equal(mine[key], value.float().numpy(), err_msg=key)


def test_variant_file_names_and_missing_variant(tmp_path):
    m = UNet2DModel(**{**GOOGLE_DDPM, "dropout": 0.0}, xp=np)
    m.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    with pytest.raises(
        FileNotFoundError,
        match=r"found diffusion_pytorch_model.fp16.safetensors "
        r"\(pass variant=...\)",
    ):
        UNet2DModel.from_pretrained(tmp_path, xp=np)
    again = UNet2DModel.from_pretrained(tmp_path, variant="fp16", xp=np)
    for key, value in m.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[key], value)


@pytest.mark.oracle
def test_pickle_only_directory_is_refused(tmp_path):
    theirs = _random_diffusers_unet({**GOOGLE_DDPM, "dropout": 0.0})
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(
        ValueError,
        match=r"only pickle weights \(diffusion_pytorch_model.bin\), "
        r"which xpdiff never loads",
    ):
        UNet2DModel.from_pretrained(tmp_path, xp=np)


@pytest.mark.oracle
def test_bfloat16_bits_convert_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    values = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.1415, 1e-30, 6e4, float("inf")])
    save_file({"w": values.to(torch.bfloat16)}, str(tmp_path / "w.safetensors"))
    got = io.load_safetensors(tmp_path / "w.safetensors")["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values.to(torch.bfloat16).float().numpy())


def test_save_pretrained_warns_when_diffusers_cannot_run_the_size(tmp_path):
    cfg = {**GOOGLE_DDPM, "dropout": 0.0, "sample_size": 7}
    with pytest.warns(
        UserWarning,
        match=r"sample_size 7 is not divisible by 2\^\(levels - 1\) "
        r"= 2; xpdiff runs this model but diffusers",
    ):
        UNet2DModel(**cfg, xp=np).save_pretrained(tmp_path / "odd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UNet2DModel(**{**cfg, "sample_size": 8}, xp=np).save_pretrained(tmp_path / "even")
