"""Digit data sets: loading, preprocessing, splitting and batching.

Files are parsed with the standard library only (``gzip``, ``struct``); the bytes become host
(NumPy) arrays through :func:`xpdiff.backend.host_frombuffer`, and all host math goes through
the array-API namespace ``backend.namespace_for("numpy")``.  Move a batch to the training
namespace with ``backend.asarray(batch, xp, dtype=...)``.

Sources:

* ``load_mnist_5k``: 5,000 MNIST digits (500 per class) shipped inside xpdiff as a pair of
  gzipped IDX files in :data:`MNIST_5K_DIR` (MNIST's license and attribution in its ``LICENSE``).
* ``load_idx``: standard IDX files (MNIST, Fashion-MNIST), gzipped or raw.  Debian's package
  ``dataset-fashion-mnist`` puts Fashion-MNIST in :data:`FASHION_MNIST_DIR`.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from typing import Any, NamedTuple

from .. import backend
from .._validation import check_float, check_int
from ..training import batches, fingerprint

__all__ = [
    "FASHION_MNIST_DIR",
    "MNIST_5K_DIR",
    "Prepared",
    "batches",
    "downsample",
    "fingerprint",
    "from_model_range",
    "load_dataset",
    "load_idx",
    "load_mnist_5k",
    "prepare",
    "to_model_range",
    "train_test_split",
]

#: Where Debian's ``dataset-fashion-mnist`` installs the four gzipped IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
NUM_CLASSES = 10
_GZIP_MAGIC = b"\x1f\x8b"

#: The embedded digits: ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz`` and
#: MNIST's ``LICENSE``, package data of xpdiff.
MNIST_5K_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist5k")
_MNIST_5K_FILES = ("images-idx3-ubyte", "labels-idx1-ubyte")


# ---------------------------------------------------------------------------
# the embedded 5k MNIST subset
# ---------------------------------------------------------------------------
def load_mnist_5k() -> tuple[Any, Any]:
    """The 5,000 embedded MNIST digits (500 per class, ordered by class).

    Returns:
        images: uint8 host array (5000, 28, 28), values 0..255.
        labels: int64 host array (5000,), values 0..9.

    Raises:
        FileNotFoundError: the package data is missing (a broken installation).
    """
    paths = [os.path.join(MNIST_5K_DIR, f"train-{k}.gz") for k in _MNIST_5K_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"the embedded MNIST digits are missing from this installation of xpdiff "
            f"(looked for {', '.join(missing)}): reinstall xpdiff, or pass a directory of IDX "
            "files"
        )
    return load_idx(*paths)


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------
def _read_maybe_gzip(path: str) -> bytes:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({err})") from err


def _parse_idx(path: str, magic: int, ndim: int) -> tuple[tuple[int, ...], memoryview]:
    """(dims, payload) of an IDX file of unsigned bytes with ``ndim`` dimensions."""
    data = _read_maybe_gzip(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{path}: truncated IDX header: expected {header} bytes, found {len(data)}"
        )
    (found,) = struct.unpack(">i", data[:4])
    if found != magic:
        raise ValueError(
            f"{path}: bad IDX magic number: expected {magic} (0x{magic:08x}), "
            f"found {found} (0x{found & 0xFFFFFFFF:08x})"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    payload = len(data) - header
    if payload < expected:
        raise ValueError(
            f"{path}: truncated IDX data: header promises {expected} bytes for shape {dims}, "
            f"found {payload}"
        )
    if payload > expected:
        raise ValueError(
            f"{path}: IDX data longer than its header says: expected {expected} bytes for "
            f"shape {dims}, found {payload}"
        )
    return dims, memoryview(data)[header:]


def load_idx(images_path: str | os.PathLike, labels_path: str | os.PathLike) -> tuple[Any, Any]:
    """Images and labels from a pair of IDX files (gzip detected by magic bytes, not name).

    Returns:
        images: uint8 host array (N, rows, cols).
        labels: int64 host array (N,), values 0..9.

    Raises:
        FileNotFoundError: a file is missing (the message names it).
        ValueError: bad magic number, truncated (or over-long) data, image/label count
            mismatch, or a label outside 0..9; the message names the file, expected and found.
    """
    images_path, labels_path = os.fspath(images_path), os.fspath(labels_path)
    (n, rows, cols), pix = _parse_idx(images_path, IDX_IMAGES_MAGIC, 3)
    (m,), lab = _parse_idx(labels_path, IDX_LABELS_MAGIC, 1)
    if n != m:
        raise ValueError(
            f"image/label count mismatch: {images_path} holds {n} images, "
            f"{labels_path} holds {m} labels"
        )
    if m and max(lab) >= NUM_CLASSES:
        i = next(i for i, v in enumerate(lab) if v >= NUM_CLASSES)
        raise ValueError(
            f"{labels_path}: expected labels in 0..{NUM_CLASSES - 1}, found {lab[i]} at index {i}"
        )
    hx = backend.host_namespace()
    images = backend.host_frombuffer(pix, (n, rows, cols))
    return images, hx.astype(backend.host_frombuffer(lab, (m,)), hx.int64)


def _find(directory: str, stem: str) -> tuple[str | None, list[str]]:
    # "train-images-idx3-ubyte" and the common variant "train-images.idx3-ubyte"
    prefix, kind, fmt = stem.split("-", 2)
    names = [f"{prefix}-{kind}-{fmt}", f"{prefix}-{kind}.{fmt}"]
    candidates = [n + ext for n in names for ext in (".gz", "")]
    for name in candidates:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path, candidates
    return None, candidates


def load_dataset(path: str | os.PathLike | None = None, split: str = "train") -> tuple[Any, Any]:
    """A digit data set as (uint8 images (N, H, W), int64 labels (N,)) host arrays.

    Args:
        path: ``None`` for the embedded MNIST 5k set (only ``split="train"``: split it with
            :func:`train_test_split`); else a directory holding
            ``{train,t10k}-images-idx3-ubyte[.gz]`` and ``{train,t10k}-labels-idx1-ubyte[.gz]``
            (e.g. :data:`FASHION_MNIST_DIR`).
        split: ``"train"`` or ``"test"`` (the ``t10k-*`` files).
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_dataset: split must be 'train' or 'test', got {split!r}")
    if path is None:
        if split != "train":
            raise ValueError(
                "load_dataset(None) is the MNIST 5k set, which has no test split: load "
                "split='train' and hold out a part with train_test_split"
            )
        return load_mnist_5k()
    directory = os.fspath(path)
    if not os.path.exists(directory):
        raise FileNotFoundError(f"load_dataset: no such directory: {directory}")
    if not os.path.isdir(directory):
        raise NotADirectoryError(
            f"load_dataset: expected a directory of IDX files, got the file {directory}"
        )
    prefix = "train" if split == "train" else "t10k"
    images, tried_i = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels, tried_l = _find(directory, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        missing = ([] if images else tried_i) + ([] if labels else tried_l)
        raise FileNotFoundError(
            f"load_dataset: {directory} lacks the {split} split; looked for " + ", ".join(missing)
        )
    return load_idx(images, labels)


# ---------------------------------------------------------------------------
# preprocessing (any array-API namespace)
# ---------------------------------------------------------------------------
def _float_dtype(xp: Any, x: Any, dtype: Any) -> Any:
    if dtype is not None:
        return dtype
    return x.dtype if xp.isdtype(x.dtype, "real floating") else xp.float32


def downsample(images: Any, factor: int = 2) -> Any:
    """Mean pooling over ``factor`` x ``factor`` blocks of the last two axes.

    Args:
        images: (..., H, W) array of any namespace; H and W divisible by ``factor``.

    Returns:
        (..., H // factor, W // factor) float array (float32 unless the input is floating),
        same value range as the input (28 -> 14 for ``factor=2``).
    """
    xp = backend.get_namespace(images, where="downsample")
    *lead, h, w = images.shape
    factor = check_int("downsample", "factor", factor, min=1)
    if h % factor or w % factor:
        raise ValueError(
            f"downsample: factor {factor} must be >= 1 and divide the image size {h}x{w}"
        )
    x = xp.astype(images, _float_dtype(xp, images, None))
    x = xp.reshape(x, (*lead, h // factor, factor, w // factor, factor))
    return xp.mean(x, axis=(-3, -1))


def to_model_range(images: Any, dtype: Any = None) -> Any:
    """Pixel values 0..255 (uint8 or float) -> float in [-1, 1] (float32 unless ``dtype``)."""
    xp = backend.get_namespace(images, where="to_model_range")
    return xp.astype(images, _float_dtype(xp, images, dtype)) / 127.5 - 1.0


def from_model_range(x: Any) -> Any:
    """Inverse of :func:`to_model_range`: float in [-1, 1] -> uint8 0..255 (clipped, rounded)."""
    xp = backend.get_namespace(x, where="from_model_range")
    y = xp.clip(xp.round((x + 1.0) * 127.5), 0.0, 255.0)
    return xp.astype(y, xp.uint8)


# ---------------------------------------------------------------------------
# splitting and batching (host arrays)
# ---------------------------------------------------------------------------
def train_test_split(
    images: Any, labels: Any, test_fraction: float = 0.1, seed: int = 0
) -> tuple[Any, Any, Any, Any]:
    """Stratified held-out split, deterministic by ``seed``.

    From each class ``round(n_class * test_fraction)`` examples, drawn at random by a
    ``backend.Generator(seed)``, go to the test part; both parts keep the input order.

    Args:
        images: host array (N, ...).
        labels: int host array (N,).

    Returns:
        (train_images, train_labels, test_images, test_labels), host arrays.
    """
    test_fraction = check_float(
        "train_test_split", "test_fraction", test_fraction, min=0.0, max=1.0, max_open=True
    )
    seed = check_int("train_test_split", "seed", seed, min=0)
    hx = backend.host_namespace()
    images, labels = backend.to_numpy(images), backend.to_numpy(labels)
    n = labels.shape[0]
    if images.shape[0] != n:
        raise ValueError(f"train_test_split: {images.shape[0]} images but {n} labels")
    gen = backend.Generator(seed, xp=hx)
    classes = hx.unique_values(labels)
    test: set[int] = set()
    for j in range(classes.shape[0]):
        (idx,) = hx.nonzero(labels == classes[j])
        k = round(idx.shape[0] * test_fraction)
        if k:
            pick = hx.take(idx, gen.permutation(idx.shape[0])[:k], axis=0)
            test.update(int(pick[i]) for i in range(k))
    train_idx = hx.asarray([i for i in range(n) if i not in test], dtype=hx.int64)
    test_idx = hx.asarray(sorted(test), dtype=hx.int64)
    return (
        hx.take(images, train_idx, axis=0),
        hx.take(labels, train_idx, axis=0),
        hx.take(images, test_idx, axis=0),
        hx.take(labels, test_idx, axis=0),
    )


# ---------------------------------------------------------------------------
# one call for training scripts
# ---------------------------------------------------------------------------
class Prepared(NamedTuple):
    """Model-ready host arrays: images float32 (N, 1, S, S) in [-1, 1], labels int64 (N,)."""

    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any


def prepare(
    path: str | os.PathLike | None = None,
    size: int = 28,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Prepared:
    """Load the train split of ``path`` (see :func:`load_dataset`), hold out a stratified
    ``test_fraction`` with ``seed``, and scale to the model's range.

    Args:
        size: 28 (as stored) or 14 (2x2 mean pooling).

    Returns:
        ``Prepared(x_train, y_train, x_test, y_test)``: float32 (N, 1, size, size) in [-1, 1]
        and int64 (N,) host arrays.
    """
    if size not in (28, 14):
        raise ValueError(f"prepare: size must be 28 or 14, got {size}")
    hx = backend.host_namespace()
    images, labels = load_dataset(path)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"prepare: expected 28x28 images, got {images.shape[1:]}")
    x_tr, y_tr, x_te, y_te = train_test_split(images, labels, test_fraction, seed)

    def model(x: Any) -> Any:
        x = downsample(x, 28 // size) if size != 28 else x
        return hx.expand_dims(to_model_range(x, hx.float32), axis=1)

    return Prepared(model(x_tr), y_tr, model(x_te), y_te)
