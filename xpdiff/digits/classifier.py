"""The digit classifier that judges generated digits.

* :class:`DigitClassifier`: a 3-conv CNN built from xpdiff's own layers (hand-derived
  backward like everything else), trained by :func:`train_classifier`.
* :func:`load_or_train_classifier`: the classifier for one image size, trained once on the
  TRAINING split of :func:`xpdiff.digits.data.prepare` and cached (safetensors + JSON) under
  ``$XPDIFF_CACHE`` (default ``~/.cache/xpdiff``), keyed by the data, the settings and
  :func:`recipe_hash` of the training code.
* :func:`heldout_digits`: that split; its held-out part is what samples are judged against.

Everything runs on the namespace of the classifier's weights.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from .. import backend
from .. import io as xio
from .._validation import check_bool, check_float, check_int, check_int_list
from ..functional.losses import cross_entropy
from ..nn import init
from ..nn.layers import Conv2d, Linear, ReLU
from ..nn.module import Module, no_grad
from ..optim import AdamW, warmup_cosine
from . import data as xdata
from .data import NUM_CLASSES

__all__ = [
    "HELDOUT_FRACTION",
    "DigitClassifier",
    "cache_dir",
    "heldout_digits",
    "load_or_train_classifier",
    "recipe_hash",
    "train_classifier",
]

#: Bump when the architecture or the training recipe changes: old caches are then ignored.
#: (A change of the code itself is caught by :func:`recipe_hash` as well.)
RECIPE_VERSION = 1
#: Share of each digit held out of the classifier's training (``prepare(..., seed=0)``).
HELDOUT_FRACTION = 0.1
#: How long training the classifier takes on first use, for the notice.
_FIRST_USE = {14: "about 1 minute on 2 CPU cores", 28: "a few minutes on 2 CPU cores"}
_EVAL_BATCH = 500
#: Widths of the three convolutions by image size (14x14 convs are 4x cheaper, so wider),
#: and the width of the feature layer.
CHANNELS = {14: (32, 64, 64), 28: (16, 32, 64)}
DEFAULT_CHANNELS = (16, 32, 64)
FEATURE_DIM = 64
#: Training epochs by image size (``train_classifier(epochs=None)``).
EPOCHS = {14: 20, 28: 15}
DEFAULT_EPOCHS = 15


# ---------------------------------------------------------------------------
# the classifier
# ---------------------------------------------------------------------------
class DigitClassifier(Module):
    """A small CNN for 10 digit classes, built from xpdiff's layers.

    ``conv1`` 1->c1 (stride 1), ``conv2`` c1->c2 (stride 2), ``conv3`` c2->c3 (stride 2), all
    3x3 with padding 1 and ReLU; flatten; ``fc1`` -> 64, ReLU; ``fc2`` 64 -> 10.  The widths
    (c1, c2, c3) default to :data:`CHANNELS` of the size: (16, 32, 64) at 28, (32, 64, 64)
    at 14.  The 64 activations after ``fc1``'s ReLU are the :meth:`features` (the Frechet
    distance uses them).  (A global-average-pool head learned too slowly here: its 9-pixel
    receptive field at 28x28 left it at ~65% after 8 epochs.)

    Input (B, 1, size, size) float in [-1, 1] (``size`` fixed at construction, 28 or 14);
    ``forward`` returns logits (B, 10).

    Args:
        size: image side the classifier is for (checked on every call).
        channels: the three conv widths (default by size, see above).
        seed: when given, the initial weights are drawn from a generator seeded with it
            (the global ``nn.init`` generator is left as it was).
    """

    def __init__(
        self,
        size: int = 28,
        *,
        channels: tuple[int, int, int] | None = None,
        seed: int | None = None,
        dtype: str = "float32",
        xp: Any = None,
    ):
        super().__init__()
        self.size = check_int("DigitClassifier", "size", size, min=4)
        if channels is None:
            channels = CHANNELS.get(self.size, DEFAULT_CHANNELS)
        self.channels = tuple(
            check_int_list("DigitClassifier", "channels", channels, min=1, length=3)
        )
        check_int("DigitClassifier", "seed", seed, min=0, none=True)
        c1, c2, c3 = self.channels
        side = (((self.size + 1) // 2) + 1) // 2  # after two stride-2 convs with padding 1
        with init.seeded(seed):
            self.conv1 = Conv2d(1, c1, 3, stride=1, padding=1, dtype=dtype, xp=xp)
            self.act1 = ReLU()
            self.conv2 = Conv2d(c1, c2, 3, stride=2, padding=1, dtype=dtype, xp=xp)
            self.act2 = ReLU()
            self.conv3 = Conv2d(c2, c3, 3, stride=2, padding=1, dtype=dtype, xp=xp)
            self.act3 = ReLU()
            self.fc1 = Linear(c3 * side * side, FEATURE_DIM, dtype=dtype, xp=xp)
            self.act4 = ReLU()
            self.fc2 = Linear(FEATURE_DIM, NUM_CLASSES, dtype=dtype, xp=xp)
        self.feature_dim = FEATURE_DIM
        self.info: dict = {}

    def _where(self) -> str:
        return f"DigitClassifier(size={self.size})"

    def check_images(self, x: Any, what: str = "images") -> None:
        """Raise a clear error unless ``x`` is an array of shape (B, 1, size, size)."""
        s = self.size
        if not hasattr(x, "shape"):
            raise TypeError(f"{self._where()}: expected an array of {what}, got {type(x).__name__}")
        shape = tuple(x.shape)
        if len(shape) != 4 or shape[1] != 1 or shape[2:] != (s, s):
            hint = ""
            if len(shape) == 4 and shape[1] == 1 and shape[2] == shape[3] and shape[2] != s:
                hint = (
                    f" (these are {shape[2]}x{shape[3]} images: use a classifier of "
                    f"size {shape[2]})"
                )
            raise ValueError(
                f"{self._where()}: expected {what} of shape (B, 1, {s}, {s}), got {shape}{hint}"
            )

    def _trunk(self, x: Any) -> Any:
        self.check_images(x)
        h = self.act1(self.conv1(x))
        h = self.act2(self.conv2(h))
        h = self.act3(self.conv3(h))
        xp = backend.get_namespace(h)
        self._save(tuple(h.shape))
        h = xp.reshape(h, (h.shape[0], -1))  # flatten (B, C, H, W) -> (B, C*H*W)
        return self.act4(self.fc1(h))

    def forward(self, x: Any) -> Any:
        """Logits (B, 10) of images (B, 1, size, size)."""
        return self.fc2(self._trunk(x))

    def features(self, x: Any) -> Any:
        """The 64 penultimate activations (B, 64), computed under ``no_grad``."""
        with no_grad():
            return self._trunk(x)

    def backward(self, grad_output: Any) -> Any:
        """Gradient of the input images for the gradient (B, 10) of the logits."""
        g = self.fc1.backward(self.act4.backward(self.fc2.backward(grad_output)))
        xp = backend.get_namespace(g)
        g = xp.reshape(g, self._take())  # un-flatten
        g = self.conv3.backward(self.act3.backward(g))
        g = self.conv2.backward(self.act2.backward(g))
        return self.conv1.backward(self.act1.backward(g))

    # -- convenience ------------------------------------------------------------
    def _as_input(self, images: Any) -> Any:
        """``images`` (any library) in the weights' namespace, device and dtype."""
        xp, dtype = self.xp, self.dtype
        if not hasattr(images, "dtype"):
            raise TypeError(
                f"{self._where()}: expected an array of images, got {type(images).__name__}"
            )
        ixp = backend.get_namespace(images)
        if not ixp.isdtype(images.dtype, "real floating"):
            raise TypeError(
                f"{self._where()}: expected float images in [-1, 1], got dtype "
                f"{backend.dtype_name(images.dtype)} (convert with "
                f"xpdiff.digits.data.to_model_range)"
            )
        if ixp is xp and images.dtype == dtype:
            return images
        return backend.asarray(images, xp, dtype=dtype, device=self.device)

    def _batched(self, images: Any, fn: Any, batch_size: int) -> Any:
        self.check_images(images)
        xp = self.xp
        n = images.shape[0]
        outs = []
        with no_grad():
            for s in range(0, n, batch_size):
                outs.append(fn(self._as_input(images[s : min(s + batch_size, n), ...])))
        if not outs:
            return fn(self._as_input(images))
        return outs[0] if len(outs) == 1 else xp.concat(outs, axis=0)

    def logits(self, images: Any, batch_size: int = _EVAL_BATCH) -> Any:
        """Logits (N, 10) of any number of images, in batches, without caches."""
        return self._batched(images, self.forward, batch_size)

    def predict(self, images: Any, batch_size: int = _EVAL_BATCH) -> Any:
        """Predicted digits (N,) int64, in the weights' namespace."""
        xp = self.xp
        return xp.astype(xp.argmax(self.logits(images, batch_size), axis=1), xp.int64)

    def embed(self, images: Any, batch_size: int = _EVAL_BATCH) -> Any:
        """Pooled features (N, 64) of any number of images, in batches."""
        return self._batched(images, self.features, batch_size)

    def accuracy(self, images: Any, labels: Any, batch_size: int = _EVAL_BATCH) -> float:
        """Fraction of ``images`` classified as ``labels``."""
        pred = backend.to_numpy(self.predict(images, batch_size))
        lab = backend.to_numpy(labels)
        _check_count("DigitClassifier.accuracy", images, lab)
        hx = backend.host_namespace()
        n = lab.shape[0]
        if not n:
            return 0.0
        return float(hx.sum(hx.astype(pred == hx.astype(lab, hx.int64), hx.int64))) / n


def _check_count(where: str, images: Any, labels: Any) -> None:
    if len(tuple(labels.shape)) != 1:
        raise ValueError(f"{where}: expected labels of shape (N,), got {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{where}: image/label count mismatch: {images.shape[0]} images but "
            f"{labels.shape[0]} labels"
        )


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------
def _shift_augment(x: Any, max_shift: int, gen: backend.Generator, fine: int = 1) -> Any:
    """Random translations of host images (B, C, S, S) by up to ``max_shift / fine`` pixels
    in steps of ``1 / fine`` pixel (background -1).

    ``fine > 1`` shifts on a ``fine``-times finer grid: each pixel is repeated ``fine`` x
    ``fine`` times, shifted, and mean-pooled back, so 14x14 images get half-pixel shifts.
    """
    if max_shift <= 0:
        return x
    hx = backend.host_namespace()
    B, C, S, _ = x.shape
    if fine > 1:
        up = hx.broadcast_to(x[:, :, :, None, :, None], (B, C, S, fine, S, fine))
        up = hx.reshape(up, (B, C, S * fine, S * fine))
        return xdata.downsample(_shift_augment(up, max_shift, gen), fine)
    r = max_shift
    pad = hx.full((B, C, S + 2 * r, S + 2 * r), -1.0, dtype=x.dtype)
    pad[:, :, r : r + S, r : r + S] = x
    offs = backend.to_numpy(gen.integers(0, 2 * r + 1, (B, 2)))
    out = hx.empty_like(x)
    for i in range(B):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i, ...] = pad[i, :, dy : dy + S, dx : dx + S]
    return out


def train_classifier(
    images: Any,
    labels: Any,
    *,
    epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    augment: bool = True,
    channels: tuple[int, int, int] | None = None,
    seed: int = 0,
    xp: Any = None,
    progress: bool = False,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` with AdamW, cross-entropy and a warmup-cosine schedule.

    Args:
        images: (N, 1, S, S) float images in [-1, 1] (host or any namespace); S sets the size.
        labels: (N,) integer digits 0..9.
        epochs: passes over the data (default :data:`EPOCHS` of the size: 15 at 28, 20 at 14).
        augment: random shifts of up to 2/28 of the image side, in steps of 1/28 (whole
            pixels at 28x28, half pixels at 14x14).
        channels: conv widths (default by size, see :class:`DigitClassifier`).
        xp: namespace to train in (default: the default backend's).
        progress: print one line per epoch to stderr.

    Returns:
        The trained classifier, weights in ``xp``.
    """
    where = "train_classifier"
    check_int(where, "epochs", epochs, min=1, none=True)
    check_int(where, "batch_size", batch_size, min=1)
    check_float(where, "lr", lr, min=0.0, min_open=True)
    check_float(where, "weight_decay", weight_decay, min=0.0)
    check_bool(where, "augment", augment)
    check_int(where, "seed", seed, min=0)
    hx = backend.host_namespace()
    x_host = backend.to_numpy(images)
    y_host = backend.to_numpy(labels)
    if len(x_host.shape) != 4 or x_host.shape[1] != 1 or x_host.shape[2] != x_host.shape[3]:
        raise ValueError(
            f"{where}: expected images of shape (N, 1, S, S), got {tuple(x_host.shape)}"
        )
    _check_count(where, x_host, y_host)
    if x_host.shape[0] == 0:
        raise ValueError(f"{where}: no training images")
    x_host = hx.astype(x_host, hx.float32)
    y_host = hx.astype(y_host, hx.int64)
    if int(hx.min(y_host)) < 0 or int(hx.max(y_host)) >= NUM_CLASSES:
        raise ValueError(
            f"{where}: expected labels in 0..9, got values in "
            f"[{int(hx.min(y_host))}, {int(hx.max(y_host))}]"
        )
    xp = backend.default_namespace() if xp is None else xp
    size = int(x_host.shape[2])
    if epochs is None:
        epochs = EPOCHS.get(size, DEFAULT_EPOCHS)
    model = DigitClassifier(size, channels=channels, seed=seed, xp=xp)
    opt = AdamW(model, lr=lr, weight_decay=weight_decay)
    gen = backend.Generator(seed + 1, xp=hx)
    n = y_host.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total // 10)
    fine = 28 // size if size <= 28 and 28 % size == 0 else 1
    shift = (2 if fine > 1 else max(1, round(2 * size / 28))) if augment else 0
    step = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        loss_sum, correct = 0.0, 0
        for xb, yb in xdata.batches(x_host, y_host, batch_size, gen):
            xb = _shift_augment(xb, shift, gen, fine)
            xb = backend.asarray(xb, xp, dtype=xp.float32)
            yb = backend.asarray(yb, xp, dtype=xp.int64)
            opt.lr = warmup_cosine(step, lr, warmup, total)
            model.zero_grad()
            logits = model(xb)
            loss, g = cross_entropy(logits, yb)
            model.backward(g)
            opt.step()
            step += 1
            loss_sum += float(loss) * yb.shape[0]
            correct += int(xp.sum(xp.astype(xp.argmax(logits, axis=1) == yb, xp.int64)))
        if progress:
            print(
                f"{where}: size {size} epoch {epoch + 1}/{epochs} loss {loss_sum / n:.4f} "
                f"train acc {correct / n:.4f} ({time.perf_counter() - t0:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
    return model


# ---------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------
def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$XPDIFF_CACHE``, else ``~/.cache/xpdiff``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("XPDIFF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "xpdiff"


def _code_text(obj: Any) -> str:
    """The source of a function or class, without docstrings, comments or formatting."""
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(obj)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def recipe_hash() -> str:
    """A short hash of the code and settings that train the classifier.

    Covers :class:`DigitClassifier`, :func:`train_classifier`, the shift augmentation, the
    optimizer (``AdamW``), its schedule (``warmup_cosine``), the loss (``cross_entropy``),
    the batching and downsampling of the data, and the constants :data:`CHANNELS`,
    :data:`EPOCHS`, :data:`FEATURE_DIM` and :data:`RECIPE_VERSION`; docstrings, comments
    and formatting do not count.  A cached classifier trained by other code is retrained.
    (The layers' own code is not covered: their results are pinned by the test suite.)
    Computed once, when this module is imported, from the source files as they were then.
    """
    return _RECIPE_HASH


def _recipe_hash() -> str:
    parts = [_code_text(obj) for obj in _RECIPE_CODE]
    parts.append(
        repr((CHANNELS, DEFAULT_CHANNELS, FEATURE_DIM, EPOCHS, DEFAULT_EPOCHS, RECIPE_VERSION))
    )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def heldout_digits(size: int, data_path: str | os.PathLike | None = None) -> xdata.Prepared:
    """The split :func:`load_or_train_classifier` trains on: ``x_test``/``y_test`` are the
    real digits the classifier never saw, the ones to judge samples against.

    ``xpdiff.digits.data.prepare(data_path, size, HELDOUT_FRACTION, seed=0)``.
    """
    return xdata.prepare(data_path, size, test_fraction=HELDOUT_FRACTION, seed=0)


def _data_identity(data_path: Any, prep: xdata.Prepared) -> dict:
    source = "mnist_5k" if data_path is None else os.path.abspath(os.fspath(data_path))
    return {"source": source, "sha256": xdata.fingerprint(*prep)}


def load_or_train_classifier(
    size: int,
    data_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    xp: Any = None,
    progress: bool = False,
    **train_kwargs: Any,
) -> DigitClassifier:
    """The digit classifier for ``size`` (28 or 14), from the cache or trained once.

    Trains on the training split of :func:`heldout_digits` (so the held-out digits used to
    judge samples are never seen) and writes ``digit_classifier_{size}_{tag}.safetensors``
    plus a JSON record (held-out accuracy, size, data source and hash, seed, recipe version,
    :func:`recipe_hash` of the training code) into the cache directory, atomically.  The tag
    hashes the record, so a change of data, settings or training code trains a new
    classifier; a cache entry whose record does not match is retrained and replaced.

    The returned classifier carries the JSON record as ``.info`` (``info["heldout_accuracy"]``).
    """
    if size not in (14, 28):
        raise ValueError(f"load_or_train_classifier: size must be 28 or 14, got {size}")
    prep = heldout_digits(size, data_path)
    ident = _data_identity(data_path, prep)
    record = {
        "kind": "DigitClassifier",
        "size": size,
        "seed": seed,
        "recipe_version": RECIPE_VERSION,
        "recipe_hash": recipe_hash(),
        "data": ident,
        "train_kwargs": {k: train_kwargs[k] for k in sorted(train_kwargs)},
    }
    record = json.loads(json.dumps(record))  # tuples -> lists, as they come back from the file
    key = hashlib.sha256(repr(sorted(record.items())).encode()).hexdigest()[:12]
    root = _cache_root(cache_dir)
    stem = root / f"digit_classifier_{size}_{key}"
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    xp = backend.default_namespace() if xp is None else xp

    if weights.is_file() and meta.is_file():
        try:
            info = xio.load_json(meta)
            if all(info.get(k) == v for k, v in record.items()):
                model = DigitClassifier(size, channels=info["channels"], xp=xp)
                model.load_state_dict(xio.load_safetensors(weights))
                model.info = info
                return model
        except Exception as err:  # unreadable or mismatched files: train afresh
            print(
                f"load_or_train_classifier: ignoring unreadable cache {stem} ({err})",
                file=sys.stderr,
            )

    print(
        f"training the {size}x{size} digit classifier that judges samples, once ("
        f"{_FIRST_USE[size]}); it is cached in {root}",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    model = train_classifier(
        prep.x_train, prep.y_train, seed=seed, xp=xp, progress=progress, **train_kwargs
    )
    seconds = time.perf_counter() - t0
    print(f"trained the digit classifier in {seconds:.0f} s", file=sys.stderr, flush=True)
    acc = model.accuracy(prep.x_test, prep.y_test)
    info = dict(
        record,
        channels=list(model.channels),
        heldout_accuracy=acc,
        n_train=int(prep.y_train.shape[0]),
        n_heldout=int(prep.y_test.shape[0]),
        train_seconds=round(seconds, 2),
    )
    xio.save_safetensors(
        dict(model.state_dict()),
        weights,
        metadata={"size": str(size), "heldout_accuracy": f"{acc:.6f}"},
    )
    xio.save_json(info, meta)  # written last: a record means the weights are complete
    model.info = info
    return model


def _cache_root(path: Any) -> Path:
    return cache_dir(path)


#: What :func:`recipe_hash` reads (the originals, even where a test replaces a module name).
_RECIPE_CODE = (
    DigitClassifier,
    train_classifier,
    _shift_augment,
    AdamW,
    warmup_cosine,
    cross_entropy,
    xdata.batches,
    xdata.downsample,
)
_RECIPE_HASH = _recipe_hash()
