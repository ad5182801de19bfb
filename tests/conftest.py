"""Backend fixtures: every namespace test runs once per available namespace.

``XPDIFF_TEST_BACKENDS`` (comma separated) picks the namespaces; the default is
``numpy,array_api_strict,torch``.  ``cupy`` is skipped, with the reason, when
no CUDA device is present.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from xpdiff import backend

DEFAULT = "numpy,array_api_strict,torch"


def _names() -> list[str]:
    names = os.environ.get("XPDIFF_TEST_BACKENDS", DEFAULT).split(",")
    return [n.strip() for n in names if n.strip()]


def _param(name: str):
    marks = []
    if name == "cupy":
        ok, why = backend.cupy_status()
        if not ok:
            marks.append(pytest.mark.skip(reason=why))
    elif name == "torch" and importlib.util.find_spec("torch") is None:
        marks.append(pytest.mark.skip(reason="torch is not installed"))
    elif name == "array_api_strict" and importlib.util.find_spec("array_api_strict") is None:
        marks.append(pytest.mark.skip(reason="array_api_strict is not installed"))
    return pytest.param(name, id=name, marks=marks)


@pytest.fixture(params=[_param(n) for n in _names()])
def xp(request):
    """Array-API namespace under test (numpy, array_api_strict, torch or cupy)."""
    return backend.namespace_for(request.param)


@pytest.fixture
def device_f32(xp):
    """A device on which float32 forward checks run: array_api_strict's second
    device (catches a forgotten ``device=``), else the default one."""
    if backend.library_name(xp) == "array_api_strict":
        import array_api_strict

        return array_api_strict.Device("device1")
    return None


# A digits training run small enough for tests (seconds): import it with
# ``from conftest import TINY_RUN`` and override fields with dict(TINY_RUN, key=value).
TINY_RUN = dict(
    block_out_channels=[8, 16],
    norm_num_groups=4,
    attention_head_dim=8,
    batch_size=8,
    max_steps=2,
    checkpoint_every=2,
    log_every=1,
    warmup_steps=1,
    sample_steps=2,
    size=14,
)


# Shared by the scheduler tests: diffusers as an oracle, host copies, differences.
def diffusers_or_skip():
    """The diffusers module; the calling test is skipped without torch or diffusers."""
    pytest.importorskip("torch")
    return pytest.importorskip("diffusers")


def host(x):
    """A NumPy copy (or view) of an array of any namespace."""
    import numpy as np

    return np.asarray(backend.to_numpy(x))


def max_abs_diff(a, b) -> float:
    """max |a - b| in float64, for arrays of any namespaces."""
    import numpy as np

    return float(np.max(np.abs(host(a).astype(np.float64) - host(b).astype(np.float64))))


# A UNet2DModel config for RGB 8x8 training tests (the core Trainer, data parallel).
TINY_RGB_UNET = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=[8, 16],
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    layers_per_block=1,
    norm_num_groups=4,
    attention_head_dim=8,
)

# A UNet2DModel config small enough for sampling tests.
TINY_UNET = dict(
    sample_size=6,
    in_channels=1,
    out_channels=1,
    block_out_channels=[8, 8],
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    layers_per_block=1,
    norm_num_groups=4,
    attention_head_dim=8,
    num_class_embeds=4,
)
