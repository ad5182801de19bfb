"""The one place in xpdiff that knows which array library is underneath.

Everything else in the package is written against the array-API namespace of
its inputs (``xp = get_namespace(x)``).  What the standard lacks lives here:

* choosing the default backend (``set_backend`` / ``XPDIFF_BACKEND``),
* moving arrays between libraries and to NumPy,
* sliding-window views for im2col (stride tricks on NumPy/CuPy, ``as_strided``
  on PyTorch, a portable slice loop for any other namespace),
* the size of cache-sized tiles, and products written into preallocated arrays,
* ``exp_inplace``: ``exp`` written over a fresh temporary where the library has ``out=``,
* seeded random numbers with a saveable state.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "Generator",
    "asarray",
    "available_backends",
    "default_namespace",
    "device",
    "exp_inplace",
    "reciprocal_inplace",
    "get_backend",
    "get_namespace",
    "is_numpy_namespace",
    "library_name",
    "map_tiles",
    "matmul_into",
    "on_host",
    "set_backend",
    "sliding_windows",
    "tile_samples",
    "tile_workers",
    "to_namespace",
    "to_numpy",
]

_BACKENDS = ("numpy", "cupy")
_backend: str | None = None


# ---------------------------------------------------------------------------
# namespaces
# ---------------------------------------------------------------------------
def get_namespace(*arrays: Any, where: str = "xpdiff") -> Any:
    """Array-API namespace shared by ``arrays`` (``None`` entries are skipped).

    Raises:
        TypeError: when the arrays come from different libraries, or an entry
            is not an array; the message names ``where`` and what came.
    """
    arrs = [a for a in arrays if a is not None]
    if not arrs:
        return default_namespace()
    try:
        return array_api_compat.array_namespace(*arrs)
    except TypeError as err:
        kinds = sorted({f"{type(a).__module__}.{type(a).__name__}" for a in arrs})
        raise TypeError(
            f"{where}: expected arrays of one array library, got {', '.join(kinds)}"
        ) from err


def library_name(xp: Any) -> str:
    """Short name of the library behind a namespace: numpy, cupy, torch, array_api_strict, ..."""
    if array_api_compat.is_numpy_namespace(xp):
        return "numpy"
    if array_api_compat.is_cupy_namespace(xp):
        return "cupy"
    if array_api_compat.is_torch_namespace(xp):
        return "torch"
    if array_api_compat.is_array_api_strict_namespace(xp):
        return "array_api_strict"
    return getattr(xp, "__name__", repr(xp))


def is_numpy_namespace(xp: Any) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def on_host(x: Any) -> bool:
    """True when reading ``x``'s values costs no device synchronisation (not a CuPy array).

    Layers check values (label and timestep ranges) only then; a CuPy forward reads
    nothing back, and the entry points check their inputs instead.
    """
    return not array_api_compat.is_cupy_array(x)


def device(x: Any) -> Any:
    """Device of an array, in the standard's sense."""
    return array_api_compat.device(x)


def available_backends() -> list[str]:
    """Backends usable on this machine (cupy only with a working CUDA device)."""
    out = ["numpy"]
    if cupy_available():
        out.append("cupy")
    return out


def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    return cupy_status()[0]


def cupy_status() -> tuple[bool, str]:
    """(usable, reason): whether CuPy can run array operations here, and why not."""
    try:
        import cupy
    except Exception as err:  # ImportError, or a broken CUDA install
        return False, f"cupy is not importable ({type(err).__name__}: {err})"
    try:
        if not cupy.cuda.is_available():
            return False, "cupy imports but cupy.cuda.is_available() is False (no CUDA device)"
    except Exception as err:
        return False, f"cupy.cuda.is_available() failed ({type(err).__name__}: {err})"
    return True, "cupy with a CUDA device"


def cupy_cuda(submodule: str = "") -> Any:
    """``cupy.cuda`` or one of its submodules (``"nccl"``), or None where it does not import.

    For the device collectives of :mod:`xpdiff.distributed` (NCCL, the current device and
    stream): the array library stays behind this module.
    """
    import importlib

    name = "cupy.cuda" + (f".{submodule}" if submodule else "")
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def set_backend(name: str) -> None:
    """Choose the default backend for arrays xpdiff creates: ``"numpy"`` or ``"cupy"``."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"set_backend: expected one of {_BACKENDS}, got {name!r}")
    if name == "cupy":
        ok, why = cupy_status()
        if not ok:
            raise RuntimeError(f"set_backend('cupy'): {why}")
    _backend = name


def get_backend() -> str:
    """Name of the default backend (``set_backend``, else ``$XPDIFF_BACKEND``, else numpy)."""
    if _backend is not None:
        return _backend
    name = os.environ.get("XPDIFF_BACKEND", "numpy")
    if name not in _BACKENDS:
        raise ValueError(f"XPDIFF_BACKEND: expected one of {_BACKENDS}, got {name!r}")
    return name


def namespace_for(name: str) -> Any:
    """Array-API namespace for a backend or test library name."""
    if name == "numpy":
        import array_api_compat.numpy as xp
    elif name == "cupy":
        ok, why = cupy_status()
        if not ok:
            raise RuntimeError(f"backend 'cupy' unavailable: {why}")
        import array_api_compat.cupy as xp
    elif name == "torch":
        import array_api_compat.torch as xp
    elif name == "array_api_strict":
        import array_api_strict as xp
    else:
        raise ValueError(
            f"namespace_for: expected numpy, cupy, torch or array_api_strict, got {name!r}"
        )
    return xp


def host_namespace() -> Any:
    """The namespace of host (NumPy) arrays: files, splits, statistics and pictures."""
    return namespace_for("numpy")


def default_namespace() -> Any:
    """Namespace of the default backend."""
    return namespace_for(get_backend())


# ---------------------------------------------------------------------------
# moving data
# ---------------------------------------------------------------------------
def to_numpy(x: Any, contiguous: bool = False) -> np.ndarray:
    """A NumPy copy (or view) of any supported array, on the host.

    ``contiguous=True`` guarantees a C-contiguous result (for writing files).
    """
    if contiguous:
        return np.ascontiguousarray(to_numpy(x))
    if isinstance(x, np.ndarray):
        return x
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if isinstance(x, (int, float, list, tuple, np.generic)):
        return np.asarray(x)
    # array_api_strict and other DLPack-capable arrays
    try:
        return np.from_dlpack(x)
    except Exception:
        return np.asarray(x)


def asarray(data: Any, xp: Any = None, *, dtype: Any = None, device: Any = None) -> Any:
    """``data`` (array of any library, NumPy array, or nested lists) as an array of ``xp``."""
    xp = default_namespace() if xp is None else xp
    name = library_name(xp)
    host = data if isinstance(data, (int, float, list, tuple)) else to_numpy(data)
    if name == "numpy":
        out = np.asarray(host)
        return out if dtype is None else out.astype(dtype, copy=False)
    if name == "cupy":
        import cupy

        if device is None:
            return cupy.asarray(host, dtype=dtype)
        with device:
            return cupy.asarray(host, dtype=dtype)
    if name == "torch":
        import torch

        t = torch.from_numpy(np.asarray(host, order="C"))  # keeps 0-d arrays 0-d
        return t.to(device=device, dtype=dtype) if (device or dtype) else t
    if device is None:
        return xp.asarray(host, dtype=dtype)
    return xp.asarray(host, dtype=dtype, device=device)


def to_namespace(x: Any, xp: Any, device: Any = None) -> Any:
    """Move array ``x`` to namespace ``xp`` keeping its dtype."""
    if get_namespace(x) is xp and device is None:
        return x
    host = to_numpy(x)
    return asarray(host, xp, dtype=_dtype_in(xp, host.dtype), device=device)


def _dtype_in(xp: Any, np_dtype: np.dtype) -> Any:
    name = np.dtype(np_dtype).name
    return getattr(xp, name, None) or xp.bool


def dtype_name(dtype: Any) -> str:
    """Library-independent dtype name, e.g. ``"float32"``."""
    s = str(dtype)
    return s.rsplit(".", 1)[-1].replace("'>", "").replace("dtype('", "").replace("')", "")


#: safetensors dtype codes readable by ``host_from_tensor_bytes`` -> NumPy dtype (little endian)
_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def host_from_tensor_bytes(
    buf: bytes | memoryview, code: str, shape: tuple[int, ...]
) -> np.ndarray:
    """A host (NumPy) array of ``shape`` from the raw little-endian bytes of one
    safetensors tensor of dtype ``code`` (``"F32"``, ``"F16"``, ``"BF16"``, ...).

    NumPy has no bfloat16: ``"BF16"`` values come out as float32, exactly (a bfloat16
    is the upper 16 bits of a float32, so the bits are shifted into place).

    Raises:
        ValueError: an unknown dtype code, or a byte count that does not fit ``shape``.
    """
    count = 1
    for n in shape:
        count *= n
    if code == "BF16":
        if len(buf) != 2 * count:
            raise ValueError(f"expected {2 * count} bytes for BF16 {shape}, got {len(buf)}")
        bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if code not in _SAFETENSORS_DTYPES:
        raise ValueError(
            f"unsupported safetensors dtype {code!r}; expected one of "
            f"{sorted(_SAFETENSORS_DTYPES) + ['BF16']}"
        )
    dtype = np.dtype(_SAFETENSORS_DTYPES[code])
    if len(buf) != dtype.itemsize * count:
        raise ValueError(
            f"expected {dtype.itemsize * count} bytes for {code} {shape}, got {len(buf)}"
        )
    return np.frombuffer(buf, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------------
# sliding windows (im2col support)
# ---------------------------------------------------------------------------
def sliding_windows(x: Any, kh: int, kw: int, stride: int = 1) -> Any:
    """Windows of a channels-last (B, H, W, C) array as a (B, Ho, Wo, kh, kw, C) array.

    Its reshape to (B*Ho*Wo, kh*kw*C), the im2col column matrix, copies runs of C
    contiguous values.  ``Ho = (H - kh) // stride + 1`` and likewise ``Wo``.  NumPy and
    CuPy get a zero-copy strided view, PyTorch ``as_strided``; any other namespace gets
    the same values built from kh*kw strided slices (a copy).
    """
    B, H, W, C = x.shape
    Ho = (H - kh) // stride + 1
    Wo = (W - kw) // stride + 1
    shape = (B, Ho, Wo, kh, kw, C)

    def strides(s: tuple) -> tuple:
        return (s[0], s[1] * stride, s[2] * stride, s[1], s[2], s[3])

    if array_api_compat.is_numpy_array(x):
        return np.lib.stride_tricks.as_strided(x, shape, strides(x.strides), writeable=False)
    if array_api_compat.is_cupy_array(x):
        import cupy

        return cupy.lib.stride_tricks.as_strided(x, shape, strides(x.strides))
    if array_api_compat.is_torch_array(x):
        return x.as_strided(shape, strides(x.stride()), x.storage_offset())
    xp = get_namespace(x)
    rows = []
    for i in range(kh):
        cols = [
            x[:, i : i + stride * (Ho - 1) + 1 : stride, j : j + stride * (Wo - 1) + 1 : stride, :]
            for j in range(kw)
        ]
        rows.append(xp.stack(cols, axis=3))  # (B, Ho, Wo, kw, C)
    return xp.stack(rows, axis=3)  # (B, Ho, Wo, kh, kw, C)


# ---------------------------------------------------------------------------
# cache-sized tiles and products written into preallocated arrays
# ---------------------------------------------------------------------------
def _l2_cache_bytes() -> int:
    """Size of one core's L2 cache from sysfs (Linux), else 1 MiB."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            with open(os.path.join(base, entry, "level")) as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
            unit = {"K": 1024, "M": 1024**2}.get(text[-1:], 1)
            return int(text.rstrip("KM")) * unit
    except (OSError, ValueError):
        pass
    return 1024**2


TILE_BYTES = int(os.environ.get("XPDIFF_TILE_BYTES", 0)) or 4 * _l2_cache_bytes()
"""Target size of one tile's temporaries (a column matrix, a block of attention scores):
four times one core's L2 cache, the best of 0.5-8x measured for whole training steps
(benchmarks/RESULTS.md).  ``XPDIFF_TILE_BYTES`` overrides it."""


def tile_samples(elements_per_sample: int, batch: int, like: Any) -> int:
    """How many samples of a batch one tile holds so its temporaries fit ``TILE_BYTES``.

    ``elements_per_sample`` counts the temporaries' elements for one sample, of the dtype
    of the array ``like``.  At least 1 and at most ``batch``.  On CuPy the whole batch is
    one tile: a GPU gains nothing from CPU-cache tiles and every extra kernel launch costs.
    """
    if array_api_compat.is_cupy_array(like):
        return max(batch, 1)
    per_sample = int(elements_per_sample) * np.dtype(dtype_name(like.dtype)).itemsize
    return max(1, min(batch, TILE_BYTES // max(per_sample, 1)))


_pool: Any = None
_blas: Any = None  # threadpoolctl's controller of NumPy's BLAS; False when unavailable
_blas_threads: int | None = None  # NumPy's BLAS thread count before xpdiff held it to one


def _blas_controller() -> Any:
    """The thread-count controller of the BLAS NumPy uses, or None (no threadpoolctl)."""
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController

            ctl = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
            # NumPy's own BLAS sits in numpy's wheel folder (numpy.libs); another
            # library's BLAS loaded in the same process (torch's, scipy's) is not ours
            own = [c for c in ctl if "numpy" in os.path.basename(os.path.dirname(c.filepath))]
            ctl = own or ctl
            _blas = ctl[0] if ctl else False
        except Exception:  # not installed, or a BLAS it cannot drive
            _blas = False
    return _blas or None


def tile_workers() -> int:
    """Threads that run tiles at once on NumPy.

    ``XPDIFF_NUM_THREADS`` when set, else as many threads as NumPy's BLAS was set to use
    (so ``OPENBLAS_NUM_THREADS=1`` keeps everything on one core), at most the cores this
    process may run on.
    """
    global _blas_threads
    env = os.environ.get("XPDIFF_NUM_THREADS")
    if env:
        n = int(env)
    else:
        if _blas_threads is None:
            ctl = _blas_controller()
            _blas_threads = ctl.get_num_threads() if ctl is not None else 1
        n = _blas_threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(n, cores))


def _hold_blas_to_one_thread() -> None:
    """From the first parallel tile on, NumPy's BLAS runs one thread per call: the tile
    threads are the parallelism.  Changing the count costs milliseconds (OpenBLAS rebuilds
    its thread pool), so it is done once, not around each parallel region."""
    global _blas_threads
    ctl = _blas_controller()
    if ctl is None:
        return
    if _blas_threads is None:
        _blas_threads = ctl.get_num_threads()
    if ctl.get_num_threads() != 1:
        ctl.set_num_threads(1)


def map_tiles(fn: Any, n_items: int, per_tile: int, xp: Any) -> list:
    """``[fn(t) for t in tiles]``, tiles being slices of ``range(n_items)`` of ``per_tile``.

    On NumPy with ``tile_workers() > 1`` the tiles run on a pool of that many threads:
    NumPy releases the interpreter lock inside copies, elementwise loops and products,
    so the im2col copies and the elementwise passes use every core, not only the
    products.  NumPy's BLAS is then held to one thread per call for the rest of the
    process (``XPDIFF_NUM_THREADS=1`` leaves it alone and runs tiles in order).
    ``fn`` must write only to its own tile's part of any shared output.  Results come
    back in tile order whatever the schedule, so sums over them are deterministic.
    """
    global _pool
    tiles = [slice(s, min(n_items, s + per_tile)) for s in range(0, n_items, per_tile)]
    workers = tile_workers() if is_numpy_namespace(xp) else 1
    # a tile that itself maps tiles runs them in order: waiting on the pool from inside
    # one of its own threads could leave no thread free to run them
    nested = threading.current_thread().name.startswith("xpdiff-tile")
    if workers <= 1 or len(tiles) <= 1 or nested:
        return [fn(t) for t in tiles]
    from concurrent.futures import ThreadPoolExecutor

    _hold_blas_to_one_thread()
    if _pool is None or _pool._max_workers != workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xpdiff-tile")
    return list(_pool.map(fn, tiles))


def matmul_into(out: Any, rows: slice, a: Any, b: Any) -> None:
    """``out[rows] = a @ b`` for a 2-D ``out``, written in place on NumPy and CuPy.

    NumPy and CuPy write the product straight into the rows of ``out`` (``out=``), so no
    temporary of the product's size is made; other namespaces assign a new product.
    """
    if array_api_compat.is_numpy_array(out):
        np.matmul(a, b, out=out[rows, ...])
    elif array_api_compat.is_cupy_array(out):
        import cupy

        cupy.matmul(a, b, out=out[rows, ...])
    else:
        out[rows, ...] = a @ b


# ---------------------------------------------------------------------------
# in-place elementwise functions
# ---------------------------------------------------------------------------
def exp_inplace(x: Any) -> Any:
    """``exp(x)``, written over ``x`` itself where the library allows it.

    Only for a temporary the caller has just made and owns.  The array API has no
    ``out=``: NumPy and CuPy get ``exp(x, out=x)``, which spares a new array of the
    same size (for the (B, heads, N, N) attention scores, 79 MB and its page faults);
    any other namespace gets ``xp.exp(x)``, a new array.  Use the return value in
    both cases.
    """
    if array_api_compat.is_numpy_array(x):
        return np.exp(x, out=x)
    if array_api_compat.is_cupy_array(x):
        import cupy

        return cupy.exp(x, out=x)
    return get_namespace(x).exp(x)


def reciprocal_inplace(x: Any) -> Any:
    """``1 / x``, written over ``x`` itself where the library allows it (as ``exp_inplace``).

    Only for a temporary the caller has just made and owns; use the return value.
    """
    if array_api_compat.is_numpy_array(x):
        return np.reciprocal(x, out=x)
    if array_api_compat.is_cupy_array(x):
        import cupy

        return cupy.reciprocal(x, out=x)
    return 1.0 / x


# ---------------------------------------------------------------------------
# random numbers
# ---------------------------------------------------------------------------
class Generator:
    """Seeded random numbers for one namespace, with a state that can be saved.

    Numbers are drawn on the host by a NumPy ``Generator`` (PCG64) and moved to
    the target namespace and device.  So one seed gives the same stream on
    NumPy, CuPy, torch and array_api_strict, and the state goes into a
    checkpoint as JSON whatever the backend.  The draws are small next to a
    UNet step (one noise tensor per batch), so the copy costs little.
    """

    def __init__(self, seed: int | None = None, xp: Any = None, device: Any = None):
        self.xp = default_namespace() if xp is None else xp
        self.device = device
        self._native = library_name(self.xp) == "numpy"
        self._gen = np.random.default_rng(seed)

    def _out(self, a: np.ndarray) -> Any:
        return a if self._native else asarray(a, self.xp, device=self.device)

    def normal(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        """Standard normal samples of ``shape`` (float32 unless ``dtype``)."""
        name = dtype_name(dtype) if dtype is not None else "float32"
        return self._out(self._gen.standard_normal(shape, dtype=name))

    def uniform(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        """Uniform samples in [0, 1) (float32 unless ``dtype``)."""
        name = dtype_name(dtype) if dtype is not None else "float32"
        return self._out(self._gen.random(shape, dtype=name))

    def integers(self, low: int, high: int, shape: tuple[int, ...]) -> Any:
        """Integers in [low, high) as int64."""
        return self._out(self._gen.integers(low, high, size=shape, dtype=np.int64))

    def permutation(self, n: int) -> Any:
        """A random permutation of ``range(n)`` as int64."""
        return self._out(self._gen.permutation(n).astype(np.int64))

    def get_state(self) -> dict:
        """JSON-serialisable state; restore it with ``set_state``."""
        return self._gen.bit_generator.state

    def set_state(self, state: dict) -> None:
        self._gen.bit_generator.state = state


# ---------------------------------------------------------------------------
# host arrays from raw bytes (for xpdiff.digits.data, which must not import numpy)
# ---------------------------------------------------------------------------
def host_frombuffer(buf: bytes | bytearray | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """A writable host (NumPy) uint8 array of ``shape`` holding a copy of the bytes ``buf``.

    ``len(buf)`` must equal the product of ``shape``.  Used by ``xpdiff.digits.data`` to turn file
    bytes into arrays; move them to a training namespace with ``asarray``.
    """
    return np.frombuffer(buf, dtype=np.uint8).reshape(shape).copy()
