"""xpdiff.backend, and the rule that only backend.py may import numpy, cupy or torch."""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib

import numpy as np
import pytest

import xpdiff
from xpdiff import backend

PACKAGE_DIR = pathlib.Path(xpdiff.__file__).resolve().parent
FORBIDDEN = {"numpy", "cupy", "torch"}
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")


def _other(xp):
    """A namespace of another library than ``xp`` (torch where installed)."""
    if backend.library_name(xp) != "numpy":
        return backend.namespace_for("numpy")
    return backend.namespace_for("torch" if HAS_TORCH else "array_api_strict")


@pytest.fixture
def clean_backend(monkeypatch):
    """No explicit backend and no XPDIFF_BACKEND; the global choice is restored afterwards."""
    monkeypatch.setattr(backend, "_backend", None)
    monkeypatch.delenv("XPDIFF_BACKEND", raising=False)
    yield


# ---------------------------------------------------------------------------
# namespaces
# ---------------------------------------------------------------------------
def test_get_namespace(xp):
    a = xp.zeros((2,), dtype=xp.float32)
    assert backend.get_namespace(a) is xp
    assert backend.get_namespace(a, None, a) is xp  # None entries are skipped


def test_get_namespace_of_nothing_is_the_default(clean_backend):
    assert backend.get_namespace() is backend.namespace_for("numpy")
    assert backend.get_namespace(None) is backend.namespace_for("numpy")


def test_get_namespace_mixed_libraries(xp):
    other = _other(xp)
    a = xp.zeros((2,), dtype=xp.float32)
    b = other.zeros((2,), dtype=other.float32)
    with pytest.raises(TypeError, match=r"^my_layer: expected arrays of one array library, got "):
        backend.get_namespace(a, b, where="my_layer")
    with pytest.raises(TypeError) as info:
        backend.get_namespace(b, a)
    msg = str(info.value)
    assert msg.startswith("xpdiff:")
    assert type(a).__name__ in msg and type(b).__name__ in msg


def test_get_namespace_non_array():
    with pytest.raises(TypeError, match=r"expected arrays of one array library, got builtins.str"):
        backend.get_namespace("not an array")


@pytest.mark.parametrize(
    "name", ["numpy", pytest.param("torch", marks=needs_torch), "array_api_strict"]
)
def test_library_name_and_namespace_for(name):
    xp = backend.namespace_for(name)
    assert backend.library_name(xp) == name
    assert backend.is_numpy_namespace(xp) == (name == "numpy")


def test_namespace_for_unknown():
    with pytest.raises(
        ValueError,
        match=r"namespace_for: expected numpy, cupy, torch or "
        r"array_api_strict, got 'jax'",
    ):
        backend.namespace_for("jax")


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "uint8", "bool"])
def test_dtype_name(xp, dtype):
    assert backend.dtype_name(getattr(xp, dtype)) == dtype
    assert backend.dtype_name(xp.zeros((1,), dtype=getattr(xp, dtype)).dtype) == dtype


# ---------------------------------------------------------------------------
# choosing the backend
# ---------------------------------------------------------------------------
def test_default_backend_is_numpy(clean_backend):
    assert backend.get_backend() == "numpy"
    assert backend.default_namespace() is backend.namespace_for("numpy")


def test_xpdiff_backend_environment(clean_backend, monkeypatch):
    monkeypatch.setenv("XPDIFF_BACKEND", "numpy")
    assert backend.get_backend() == "numpy"
    monkeypatch.setenv("XPDIFF_BACKEND", "tensorflow")
    with pytest.raises(ValueError, match=r"XPDIFF_BACKEND: expected one of .*got 'tensorflow'"):
        backend.get_backend()
    # an explicit choice wins over the environment
    backend.set_backend("numpy")
    assert backend.get_backend() == "numpy"


def test_set_backend(clean_backend):
    backend.set_backend("numpy")
    assert backend.get_backend() == "numpy" and xpdiff.get_backend() == "numpy"
    with pytest.raises(
        ValueError,
        match=r"set_backend: expected one of \('numpy', 'cupy'\), "
        r"got 'torch'",
    ):
        backend.set_backend("torch")
    assert backend.get_backend() == "numpy"


def test_set_backend_cupy_without_device(clean_backend):
    ok, why = backend.cupy_status()
    if ok:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match=r"set_backend\('cupy'\): cupy"):
        backend.set_backend("cupy")
    assert backend.get_backend() == "numpy"  # the failed call changed nothing
    assert backend.available_backends() == ["numpy"]
    assert not backend.cupy_available()
    with pytest.raises(RuntimeError, match=r"backend 'cupy' unavailable"):
        backend.namespace_for("cupy")


def test_xpdiff_backend_cupy_environment_without_device(clean_backend, monkeypatch):
    if backend.cupy_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setenv("XPDIFF_BACKEND", "cupy")
    assert backend.get_backend() == "cupy"
    with pytest.raises(RuntimeError, match=r"cupy"):
        backend.default_namespace()


def test_set_backend_cupy_with_device(clean_backend):
    if not backend.cupy_available():
        pytest.skip(backend.cupy_status()[1])
    backend.set_backend("cupy")
    assert backend.get_backend() == "cupy"
    assert backend.library_name(backend.default_namespace()) == "cupy"


# ---------------------------------------------------------------------------
# moving data
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "uint8"])
def test_asarray_to_numpy_round_trip(xp, dtype):
    host = (np.arange(12).reshape(3, 4) * 3 % 7).astype(dtype)
    a = backend.asarray(host, xp)
    assert backend.get_namespace(a) is xp
    assert backend.dtype_name(a.dtype) == dtype
    back = backend.to_numpy(a)
    assert isinstance(back, np.ndarray) and back.dtype == host.dtype
    np.testing.assert_array_equal(back, host)


@needs_torch
def test_asarray_dtype_lists_and_other_libraries(xp):
    a = backend.asarray([[1, 2], [3, 4]], xp, dtype=xp.float64)
    assert backend.dtype_name(a.dtype) == "float64" and tuple(a.shape) == (2, 2)
    torch_xp = backend.namespace_for("torch")
    t = backend.asarray(np.ones(3, np.float32), torch_xp)
    b = backend.asarray(t, xp)  # from another library
    assert backend.get_namespace(b) is xp and backend.dtype_name(b.dtype) == "float32"
    assert backend.to_numpy(b).tolist() == [1.0, 1.0, 1.0]
    assert backend.to_numpy(3.0).tolist() == 3.0
    assert backend.to_numpy([1, 2]).tolist() == [1, 2]


def test_to_namespace(xp):
    host = np.arange(4, dtype=np.int64)
    a = backend.to_namespace(host, xp)
    assert backend.get_namespace(a) is xp and backend.dtype_name(a.dtype) == "int64"
    assert backend.to_namespace(a, xp) is a  # already there: no copy
    f = backend.to_namespace(
        backend.asarray(np.ones(2, np.float32), xp), backend.namespace_for("numpy")
    )
    assert isinstance(f, np.ndarray) and f.dtype == np.float32


def test_asarray_device_array_api_strict():
    import array_api_strict

    xp = backend.namespace_for("array_api_strict")
    dev = array_api_strict.Device("device1")
    a = backend.asarray(np.ones(3, np.float32), xp, device=dev)
    assert backend.device(a) == dev
    b = backend.to_namespace(np.zeros(2), xp, device=dev)
    assert backend.device(b) == dev and backend.dtype_name(b.dtype) == "float64"
    np.testing.assert_array_equal(backend.to_numpy(a), np.ones(3, np.float32))


def test_host_frombuffer():
    a = backend.host_frombuffer(bytes(range(6)), (2, 3))
    assert a.dtype == np.uint8 and a.shape == (2, 3) and a.flags.writeable
    assert a[1].tolist() == [3, 4, 5]


# ---------------------------------------------------------------------------
# random numbers
# ---------------------------------------------------------------------------
def test_generator_determinism_across_namespaces(xp):
    g1, g2 = backend.Generator(5, xp), backend.Generator(5, backend.namespace_for("numpy"))
    a, b = g1.normal((3, 4)), g2.normal((3, 4))
    assert backend.get_namespace(a) is xp
    assert backend.dtype_name(a.dtype) == "float32"
    np.testing.assert_array_equal(backend.to_numpy(a), b)  # same stream on every library
    assert backend.dtype_name(g1.normal((2,), dtype=xp.float64).dtype) == "float64"
    u = backend.to_numpy(g1.uniform((100,)))
    assert u.dtype == np.float32 and (u >= 0).all() and (u < 1).all()
    i = g1.integers(2, 5, (50,))
    assert backend.dtype_name(i.dtype) == "int64"
    assert set(backend.to_numpy(i).tolist()) <= {2, 3, 4}
    assert sorted(backend.to_numpy(g1.permutation(6)).tolist()) == list(range(6))
    c = backend.Generator(6, xp).normal((3, 4))
    assert not np.array_equal(backend.to_numpy(c), b)


def test_generator_state_round_trip(xp):
    g = backend.Generator(11, xp)
    g.normal((5,))
    state = json.loads(json.dumps(g.get_state()))  # JSON-serialisable
    first = backend.to_numpy(g.normal((4,))), backend.to_numpy(g.integers(0, 9, (3,)))
    g.set_state(state)
    again = backend.to_numpy(g.normal((4,))), backend.to_numpy(g.integers(0, 9, (3,)))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    other = backend.Generator(0, xp)
    other.set_state(state)  # a state moves between generators
    np.testing.assert_array_equal(backend.to_numpy(other.normal((4,))), first[0])


def test_generator_device(xp, device_f32):
    g = backend.Generator(0, xp, device=device_f32)
    a = g.normal((2, 2))
    if device_f32 is not None:
        assert backend.device(a) == device_f32


# ---------------------------------------------------------------------------
# sliding windows: shape contract (values are checked in test_functional)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("H", "W", "k", "s", "want"), [(5, 7, 3, 1, (3, 5)), (5, 7, 3, 2, (2, 3)), (4, 4, 1, 2, (2, 2))]
)
def test_sliding_windows_shape(xp, H, W, k, s, want):
    x = xp.zeros((2, H, W, 3), dtype=xp.float32)
    assert tuple(backend.sliding_windows(x, k, k, s).shape) == (2, *want, k, k, 3)


# ---------------------------------------------------------------------------
# exp_inplace: NumPy/CuPy write over the input, other namespaces return a new array
# ---------------------------------------------------------------------------
def test_exp_inplace(xp):
    vals = np.linspace(-30.0, 5.0, 24, dtype=np.float32).reshape(2, 3, 4)
    x = backend.asarray(vals, xp)
    want = backend.to_numpy(xp.exp(backend.asarray(vals, xp)))  # the library's own exp
    got = backend.exp_inplace(x)
    assert backend.get_namespace(got) is backend.get_namespace(x)
    np.testing.assert_array_equal(backend.to_numpy(got), want)
    if backend.library_name(xp) in ("numpy", "cupy"):
        assert got is x  # written over the temporary, no new array
    else:
        np.testing.assert_array_equal(backend.to_numpy(x), vals)  # input left alone


def test_reciprocal_inplace(xp):
    vals = np.linspace(0.5, 7.0, 24, dtype=np.float32).reshape(2, 3, 4)
    x = backend.asarray(vals, xp)
    want = backend.to_numpy(1.0 / backend.asarray(vals, xp))
    got = backend.reciprocal_inplace(x)
    assert backend.get_namespace(got) is backend.get_namespace(x)
    np.testing.assert_array_equal(backend.to_numpy(got), want)
    if backend.library_name(xp) in ("numpy", "cupy"):
        assert got is x
    else:
        np.testing.assert_array_equal(backend.to_numpy(x), vals)


def test_matmul_into_writes_only_its_rows(xp):
    """NumPy/CuPy write the product into the rows (out=); other namespaces assign it."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    out = xp.zeros((7, 2), dtype=xp.float64)
    backend.matmul_into(out, slice(2, 5), backend.asarray(a, xp), backend.asarray(b, xp))
    got = backend.to_numpy(out)
    np.testing.assert_allclose(got[2:5], a @ b, rtol=1e-14)
    assert (got[:2] == 0).all() and (got[5:] == 0).all()


@pytest.mark.parametrize(
    ("per_sample", "batch", "tile", "want"),
    [(25, 64, 1000, 10), (25, 64, 10**9, 64), (10**9, 64, 1000, 1), (25, 3, 1000, 3)],
)
def test_tile_samples(xp, monkeypatch, per_sample, batch, tile, want):
    """Elements of float32 (4 bytes) per sample against a tile of ``tile`` bytes; float64
    halves the count."""
    monkeypatch.setattr(backend, "TILE_BYTES", tile)
    assert backend.tile_samples(per_sample, batch, xp.zeros(1, dtype=xp.float32)) == want
    if want not in (1, batch):
        assert backend.tile_samples(per_sample, batch, xp.zeros(1, dtype=xp.float64)) == want // 2


def test_map_tiles_runs_every_tile_once_in_order(xp, monkeypatch):
    for threads in ("1", "2"):
        monkeypatch.setenv("XPDIFF_NUM_THREADS", threads)
        got = backend.map_tiles(lambda t: (t.start, t.stop), 10, 3, xp)
        assert got == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_on_host(xp):
    """Host namespaces allow value checks in layers; only CuPy arrays would sync a device."""
    want = backend.library_name(xp) != "cupy"
    assert backend.on_host(xp.zeros((2,), dtype=xp.float32)) is want


def test_map_tiles_inside_a_tile_runs_in_order(xp, monkeypatch):
    """A tile function that maps tiles itself must not wait on its own pool."""
    monkeypatch.setenv("XPDIFF_NUM_THREADS", "2")

    def outer(t):
        return backend.map_tiles(lambda u: (t.start, u.start), 4, 2, xp)

    got = backend.map_tiles(outer, 4, 2, xp)
    assert got == [[(0, 0), (0, 2)], [(2, 0), (2, 2)]]


def test_l2_cache_size_is_positive():
    assert backend._l2_cache_bytes() >= 64 * 1024


# ---------------------------------------------------------------------------
# the import rule
# ---------------------------------------------------------------------------
def forbidden_imports(source: str, filename: str = "<source>") -> list[str]:
    """``"line N: statement"`` for every import of numpy, cupy or torch in ``source``.

    Catches ``import X[.sub] [as y]``, ``from X[.sub] import ...``, the
    array_api_compat wrappers of those libraries (``array_api_compat.numpy``...),
    and ``importlib.import_module("X")`` / ``__import__("X")`` with a literal name.
    Relative imports (``from . import numpy_helpers``) are the package's own.
    """

    def bad(mod: str) -> bool:
        parts = mod.split(".")
        return parts[0] in FORBIDDEN or (
            parts[0] == "array_api_compat" and len(parts) > 1 and parts[1] in FORBIDDEN
        )

    hits = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            hits += [f"line {node.lineno}: import {a.name}" for a in node.names if bad(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if bad(node.module):
                hits.append(f"line {node.lineno}: from {node.module} import ...")
            elif node.module == "array_api_compat":
                hits += [
                    f"line {node.lineno}: from array_api_compat import {a.name}"
                    for a in node.names
                    if a.name in FORBIDDEN
                ]
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            arg = node.args[0]
            if (
                fname in ("import_module", "__import__")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
                and bad(arg.value)
            ):
                hits.append(f"line {node.lineno}: {fname}({arg.value!r})")
    return hits


@pytest.mark.parametrize(
    ("source", "n"),
    [
        ("import numpy as np", 1),
        ("import os, torch.nn", 1),
        ("from cupy import asarray", 1),
        ("from numpy.lib import stride_tricks", 1),
        ("import array_api_compat.numpy as xp", 1),
        ("from array_api_compat import torch", 1),
        ("def f():\n    import torch\n    return torch", 1),
        ("import importlib\nm = importlib.import_module('cupy')", 1),
        ("np = __import__('numpy')", 1),
        ("from . import backend\nfrom .numpy_like import x\nimport numpyro\nimport math", 0),
        ("import array_api_compat\nimport array_api_strict", 0),
    ],
)
def test_import_rule_checker(source, n):
    assert len(forbidden_imports(source)) == n


def test_only_backend_imports_array_libraries():
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert PACKAGE_DIR / "backend.py" in files and len(files) > 5
    offenders = {}
    for path in files:
        if path == PACKAGE_DIR / "backend.py":
            continue
        hits = forbidden_imports(path.read_text(encoding="utf-8"), str(path))
        if hits:
            offenders[str(path.relative_to(PACKAGE_DIR.parent))] = hits
    assert not offenders, (
        "only xpdiff/backend.py may import numpy, cupy or torch; found:\n"
        + "\n".join(f"  {f}: {'; '.join(h)}" for f, h in offenders.items())
    )
