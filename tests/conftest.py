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
