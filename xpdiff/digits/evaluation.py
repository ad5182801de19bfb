"""Judging generated digits: a report that is hard to fool.

* :func:`frechet_distance`: the FID formula (Heusel et al. 2017) on any features, computed in
  float64 on the host with symmetric eigendecompositions.
* :func:`background_stats`: how clean the background of each image is: the mean of its outer
  border, the share of bright pixels in that border, and the share of near-black pixels.
* :func:`evaluate_samples`: class-conditional samples judged by a
  :class:`~xpdiff.digits.classifier.DigitClassifier`: accuracy, confident accuracy
  (correct with probability >= 0.9), the background against real held-out digits, and the
  Frechet distance of classifier features to real held-out digits next to its floor (two
  disjoint halves of the held-out digits, at the same sample size), per digit where it
  applies.
* :func:`save_samples`: the judged images, their labels and the sampling settings as an
  ``.npz`` file, so another judge can score the very same samples.

Host math uses ``backend.host_namespace()``.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import backend
from .. import io as xio
from .classifier import FEATURE_DIM, DigitClassifier, _check_count
from .data import NUM_CLASSES

__all__ = [
    "CONFIDENCE",
    "INK_LEVEL",
    "TARGETS",
    "EvalReport",
    "background_stats",
    "border_width",
    "evaluate_samples",
    "frechet_distance",
    "save_samples",
]

#: A sample counts as confidently correct when the classifier gives the requested digit at
#: least this probability.
CONFIDENCE = 0.9
#: Pixel level in [0, 1] (0 black, 1 white) that separates near-black background from ink.
INK_LEVEL = 0.1
#: What a good generator reaches: accuracy, the worst digit's accuracy, the Frechet distance
#: over its floor, and the background (border mean) over real digits'.
TARGETS = {"accuracy": 0.99, "worst_digit": 0.97, "fd_ratio": 1.5, "background_ratio": 1.2}


# ---------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------
def _host_feats(where: str, feats: Any, name: str) -> Any:
    hx = backend.host_namespace()
    a = hx.astype(hx.asarray(backend.to_numpy(feats)), hx.float64)
    if len(a.shape) != 2:
        raise ValueError(f"{where}: expected {name} of shape (N, D), got {tuple(a.shape)}")
    if a.shape[0] < 2:
        raise ValueError(
            f"{where}: {name} needs at least 2 rows for a covariance, got {a.shape[0]}"
        )
    return a


def _mean_cov(a: Any) -> tuple[Any, Any]:
    hx = backend.host_namespace()
    mu = hx.mean(a, axis=0)
    c = a - mu[None, :]
    cov = (c.T @ c) / (a.shape[0] - 1)
    return mu, (cov + cov.T) / 2.0


def _sqrt_psd(m: Any) -> Any:
    """Symmetric square root of a symmetric positive semi-definite matrix via eigh."""
    hx = backend.host_namespace()
    w, v = hx.linalg.eigh((m + m.T) / 2.0)
    w = hx.sqrt(hx.clip(w, 0.0, None))
    return (v * w[None, :]) @ v.T


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D).

    ``|mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2)`` (the FID formula, Heusel
    et al. 2017, on any features), in float64 on the host; both square roots come from
    symmetric eigendecompositions with tiny negative eigenvalues clamped to 0.  Covariances
    use ``N - 1``.  The estimate is biased upward for few rows: compare distances only at
    equal row counts.

    Raises:
        ValueError: a set is not 2-D, has fewer than 2 rows, or the feature dimensions differ.
    """
    where = "frechet_distance"
    hx = backend.host_namespace()
    a = _host_feats(where, feats_a, "feats_a")
    b = _host_feats(where, feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{where}: feature dimensions differ: feats_a has {a.shape[1]}, feats_b {b.shape[1]}"
        )
    mu_a, sa = _mean_cov(a)
    mu_b, sb = _mean_cov(b)
    ra = _sqrt_psd(sa)
    m = ra @ sb @ ra
    w = hx.linalg.eigvalsh((m + m.T) / 2.0)
    tr_sqrt = float(hx.sum(hx.sqrt(hx.clip(w, 0.0, None))))
    d = mu_a - mu_b
    fd = float(hx.sum(d * d)) + float(hx.linalg.trace(sa) + hx.linalg.trace(sb)) - 2.0 * tr_sqrt
    return max(fd, 0.0)


# ---------------------------------------------------------------------------
# background
# ---------------------------------------------------------------------------
def border_width(size: int) -> int:
    """Width in pixels of the border :func:`background_stats` reads: 4 at 28x28, 2 at 14x14
    (MNIST centres each digit's 20x20 box in 28x28, leaving 4 nearly black pixels)."""
    return max(1, round(size / 7))


def background_stats(images: Any, border: int | None = None) -> dict[str, Any]:
    """Per-image cleanliness of images (N, 1, S, S) float in [-1, 1] (any namespace).

    Pixels are mapped to [0, 1] (``(x + 1) / 2``, clipped; 0 black, 1 white).  The border is
    the outer ring ``border`` pixels wide (default :func:`border_width` of S).

    Returns:
        Host float64 arrays of shape (N,): ``"border_mean"`` (mean level of the border
        pixels), ``"border_ink"`` (share of border pixels above :data:`INK_LEVEL`) and
        ``"near_black"`` (share of all pixels at or below :data:`INK_LEVEL`).

    Raises:
        ValueError: images not of shape (N, 1, S, S), or a border that leaves no inside.
    """
    where = "background_stats"
    hx = backend.host_namespace()
    x = hx.astype(hx.asarray(backend.to_numpy(images)), hx.float64)
    shape = tuple(x.shape)
    if len(shape) != 4 or shape[1] != 1 or shape[2] != shape[3]:
        raise ValueError(f"{where}: expected images of shape (N, 1, S, S), got {shape}")
    s = shape[2]
    w = border_width(s) if border is None else border
    if not 1 <= w or 2 * w >= s:
        raise ValueError(f"{where}: expected a border of 1..{(s - 1) // 2} pixels, got {w}")
    x = hx.clip((x[:, 0, ...] + 1.0) / 2.0, 0.0, 1.0)
    n_all = s * s
    n_inner = (s - 2 * w) ** 2
    inner = x[:, w : s - w, w : s - w]
    total = hx.sum(x, axis=(1, 2))
    lit = hx.astype(x > INK_LEVEL, hx.float64)
    inner_lit = hx.astype(inner > INK_LEVEL, hx.float64)
    return {
        "border_mean": (total - hx.sum(inner, axis=(1, 2))) / (n_all - n_inner),
        "border_ink": (hx.sum(lit, axis=(1, 2)) - hx.sum(inner_lit, axis=(1, 2)))
        / (n_all - n_inner),
        "near_black": 1.0 - hx.sum(lit, axis=(1, 2)) / n_all,
    }


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when either is missing or b is 0."""
    if a is None or b is None or b <= 0.0:
        return None
    return a / b


def _f(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


@dataclass
class EvalReport:
    """Scores of class-conditional samples; see :func:`evaluate_samples`.

    Accuracies are fractions in [0, 1]; background levels are in [0, 1] (0 black); dicts are
    keyed by the requested digit.  ``frechet_distance`` and ``real_floor`` are both measured
    on ``fd_samples`` rows against the same ``fd_samples`` real held-out digits (half A):
    generated (the mean over ``fd_draws`` disjoint draws) vs A, and real half B vs A, on
    ``fd_features`` classifier features; with fewer rows than features the covariances are
    rank-deficient, the floor is large and their ratio means little (the text report says so).
    """

    image_size: int
    n_samples: int
    n_real: int
    accuracy: float
    per_digit_accuracy: dict[int, float]
    per_digit_count: dict[int, int]
    frechet_distance: float
    real_floor: float
    classifier_accuracy: float | None = None
    confident_accuracy: float | None = None
    per_digit_confident: dict[int, float] = field(default_factory=dict)
    confidence: float = CONFIDENCE
    classifier_confident_accuracy: float | None = None
    fd_samples: int = 0
    fd_draws: int = 0
    fd_features: int = FEATURE_DIM
    border: int = 0
    background: float | None = None
    real_background: float | None = None
    per_digit_background: dict[int, float] = field(default_factory=dict)
    real_per_digit_background: dict[int, float] = field(default_factory=dict)
    border_ink: float | None = None
    real_border_ink: float | None = None
    near_black: float | None = None
    real_near_black: float | None = None

    # -- derived ----------------------------------------------------------------
    @property
    def fd_ratio(self) -> float | None:
        """Frechet distance over its floor (1.0: as close as another draw of real digits)."""
        return _ratio(self.frechet_distance, self.real_floor)

    @property
    def background_ratio(self) -> float | None:
        """Generated border mean over the real held-out digits' (1.0: as clean as real)."""
        return _ratio(self.background, self.real_background)

    @property
    def worst_digit(self) -> tuple[int, float]:
        """(digit, accuracy) of the least accurate requested digit; the smallest such digit
        when several tie (:attr:`worst_digits` names them all)."""
        d = min(self.per_digit_accuracy, key=lambda k: (self.per_digit_accuracy[k], k))
        return d, self.per_digit_accuracy[d]

    @property
    def worst_digits(self) -> tuple[list[int], float]:
        """(digits, accuracy): every requested digit at the lowest accuracy, in order."""
        _, worst = self.worst_digit
        return sorted(d for d, a in self.per_digit_accuracy.items() if a == worst), worst

    def checks(self) -> list[tuple[str, float | None, str, bool | None]]:
        """The strict figures against :data:`TARGETS`: (name, value, target, met or None).

        The worst digit's row is named ``"worst digit (d)"`` after the smallest of the tied
        digits, as in earlier JSON reports; the text report names every tied digit.
        """
        return self._checks(f"worst digit ({self.worst_digit[0]})")

    def _worst_text(self) -> str:
        """How the text report names the worst digit(s): "worst digit (3)", "worst digits
        (3, 5)", or "worst digits (all 10 tied)"."""
        digits, _ = self.worst_digits
        if len(digits) == 1:
            return f"worst digit ({digits[0]})"
        if len(digits) == len(self.per_digit_accuracy):
            return f"worst digits (all {len(digits)} tied)"
        return f"worst digits ({', '.join(str(d) for d in digits)})"

    def _checks(self, worst_name: str) -> list[tuple[str, float | None, str, bool | None]]:
        t = TARGETS
        _, worst = self.worst_digit
        rows = [
            ("accuracy", self.accuracy, f">= {t['accuracy']}", self.accuracy >= t["accuracy"]),
            (worst_name, worst, f">= {t['worst_digit']}", worst >= t["worst_digit"]),
            (f"confident accuracy (p >= {self.confidence})", self.confident_accuracy, "", None),
        ]
        for name, value, key in (
            ("Frechet distance / floor", self.fd_ratio, "fd_ratio"),
            ("background / real", self.background_ratio, "background_ratio"),
        ):
            ok = None if value is None else value <= t[key]
            rows.append((name, value, f"<= {t[key]}", ok))
        return rows

    # -- text -------------------------------------------------------------------
    def _headline(self) -> list[str]:
        lines = [f"  {'strict figures':<34} {'value':>7}  {'target':<7}  met"]
        for name, value, target, ok in self._checks(self._worst_text()):
            met = "" if ok is None else ("yes" if ok else "NO")
            lines.append(f"  {name:<34} {_f(value, '>7.3f')}  {target:<7}  {met}")
        return lines

    def _details(self) -> list[str]:
        def row(label: str, gen: float | None, real: float | None, spec: str) -> str:
            ratio = _f(_ratio(gen, real), ">7.2f")
            return f"  {label:<34} {_f(gen, spec)} {_f(real, spec)}  {ratio}"

        lines = [
            f"  {'':<34} {'generated':>9} {'real':>9}  {'ratio':>7}",
            row(
                "Frechet distance to held-out half A",
                self.frechet_distance,
                self.real_floor,
                ">9.2f",
            ),
            f"    ({self.fd_samples} vs {self.fd_samples} classifier features; generated: mean "
            f"of {self.fd_draws} draw{'s' if self.fd_draws != 1 else ''}; real: half B, the floor)",
            *self._few_rows_note(),
            row(
                f"background ({self.border}-pixel border mean)",
                self.background,
                self.real_background,
                ">9.4f",
            ),
            row(f"border pixels above {INK_LEVEL}", self.border_ink, self.real_border_ink, ">9.4f"),
            row(
                f"near-black pixels (<= {INK_LEVEL})",
                self.near_black,
                self.real_near_black,
                ">9.4f",
            ),
        ]
        if self.classifier_accuracy is not None:
            conf = self.classifier_confident_accuracy
            lines.append(
                f"  the classifier on real held-out digits: accuracy {self.classifier_accuracy:.4f}"
                + ("" if conf is None else f", confident {conf:.4f}")
            )
        return lines

    def _few_rows_note(self) -> list[str]:
        """Warning lines when the Frechet distance had fewer rows than features."""
        k, dim = self.fd_samples, self.fd_features
        if not 0 < k < dim:
            return []
        return [
            f"    (note: only {k} rows for {dim} features: the floor is large and the ratio is "
            f"unreliable;",
            f"    at least {dim} rows are needed: {dim} generated digits and 2 x {dim} real "
            f"held-out ones)",
        ]

    def _table(self) -> list[str]:
        lines = [
            "  digit  count  accuracy  confident  background  real bg",
        ]
        for d in sorted(self.per_digit_accuracy):
            lines.append(
                f"  {d:>5}  {self.per_digit_count[d]:>5}  {self.per_digit_accuracy[d]:>8.3f}  "
                f"{_f(self.per_digit_confident.get(d), '>9.3f')}  "
                f"{_f(self.per_digit_background.get(d), '>10.4f')}  "
                f"{_f(self.real_per_digit_background.get(d), '>7.4f')}"
            )
        lines.append(
            f"  {'all':>5}  {self.n_samples:>5}  {self.accuracy:>8.3f}  "
            f"{_f(self.confident_accuracy, '>9.3f')}  {_f(self.background, '>10.4f')}  "
            f"{_f(self.real_background, '>7.4f')}"
        )
        return lines

    def format(self) -> str:
        """A readable multi-line report: the strict figures against :data:`TARGETS` first,
        then the distances and background levels next to real digits, then per digit."""
        s = self.image_size
        head = (
            f"Sample evaluation: {self.n_samples} samples at {s}x{s} against "
            f"{self.n_real} real held-out digits"
        )
        return "\n".join([head, *self._headline(), "", *self._details(), "", *self._table()])

    def to_json(self) -> dict:
        """A JSON-ready dict: the fields, the ratios and the checks; digit keys are strings."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, dict):
                out[k] = {str(d): x for d, x in v.items()}
        out["fd_ratio"] = self.fd_ratio
        out["background_ratio"] = self.background_ratio
        out["worst_digits"] = self.worst_digits[0]
        out["targets"] = dict(TARGETS)
        out["checks"] = [
            {"name": n, "value": v, "target": t, "met": ok} for n, v, t, ok in self.checks()
        ]
        return out


# ---------------------------------------------------------------------------
# samples as a file
# ---------------------------------------------------------------------------
def _npy(a: Any) -> bytes:
    """``a`` (host) in the ``.npy`` format, version 1.0."""
    header = f"{{'descr': '{a.dtype.str}', 'fortran_order': False, 'shape': {tuple(a.shape)}, }}"
    pad = -(10 + len(header) + 1) % 64
    head = (header + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head + a.tobytes()


def _npy_text(text: str) -> bytes:
    """A 0-d unicode ``.npy`` array holding ``text`` (read back with ``str(arr)``)."""
    n = max(1, len(text))
    body = text.ljust(n, "\0").encode("utf-32-le")
    header = f"{{'descr': '<U{n}', 'fortran_order': False, 'shape': (), }}"
    pad = -(10 + len(header) + 1) % 64
    head = (header + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head + body


def save_samples(
    path: str | os.PathLike, images: Any, labels: Any, settings: dict | None = None
) -> None:
    """Write judged samples to an ``.npz`` file (atomically) that ``numpy.load`` reads.

    Members: ``images`` float32 (N, 1, S, S) in [-1, 1]; ``labels`` int64 (N,), the digits
    requested; ``settings``, a 0-d string of JSON (``json.loads(str(z["settings"]))``): the
    sampling settings, e.g. scheduler, steps, guidance and seed.

    Raises:
        ValueError: images not (N, 1, S, S), labels not (N,) or not 0..9.
        TypeError: settings that JSON cannot hold.
    """
    where = "save_samples"
    hx = backend.host_namespace()
    x = hx.astype(hx.asarray(backend.to_numpy(images)), hx.float32)
    y = hx.astype(hx.asarray(backend.to_numpy(labels)), hx.int64)
    shape = tuple(x.shape)
    if len(shape) != 4 or shape[1] != 1 or shape[2] != shape[3]:
        raise ValueError(f"{where}: expected images of shape (N, 1, S, S), got {shape}")
    _check_count(where, x, y)
    if shape[0] and (int(hx.min(y)) < 0 or int(hx.max(y)) >= NUM_CLASSES):
        raise ValueError(
            f"{where}: expected labels in 0..{NUM_CLASSES - 1}, got values in "
            f"[{int(hx.min(y))}, {int(hx.max(y))}]"
        )
    text = json.dumps(settings or {}, sort_keys=True)
    members = {
        "images.npy": _npy(backend.to_numpy(x, contiguous=True)),
        "labels.npy": _npy(backend.to_numpy(y, contiguous=True)),
        "settings.npy": _npy_text(text),
    }

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            for name, blob in members.items():
                z.writestr(name, blob)

    xio.atomic_write(path, write)


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------
def _softmax_max(logits: Any) -> Any:
    """Host float64 (N,): the largest softmax probability of each row of logits (N, C)."""
    hx = backend.host_namespace()
    z = hx.astype(hx.asarray(backend.to_numpy(logits)), hx.float64)
    z = z - hx.max(z, axis=1, keepdims=True)
    e = hx.exp(z)
    return hx.max(e, axis=1) / hx.sum(e, axis=1)


def _judge(classifier: DigitClassifier, images: Any, labels: Any) -> tuple[Any, Any]:
    """Host bool (N,) arrays: classified as ``labels``; and that with probability >= 0.9."""
    hx = backend.host_namespace()
    logits = classifier.logits(images)
    pred = hx.astype(hx.argmax(hx.asarray(backend.to_numpy(logits)), axis=1), hx.int64)
    hit = pred == labels
    return hit, hit & (_softmax_max(logits) >= CONFIDENCE)


def _mean(x: Any) -> float:
    hx = backend.host_namespace()
    return float(hx.mean(hx.astype(x, hx.float64)))


def _per_digit(labels: Any, values: Any) -> dict[int, float]:
    hx = backend.host_namespace()
    out: dict[int, float] = {}
    for d in range(NUM_CLASSES):
        mask = labels == d
        if bool(hx.any(mask)):
            out[d] = _mean(values[mask])
    return out


def _halves(m: int, labels: Any, gen: backend.Generator) -> tuple[Any, Any]:
    """Two disjoint halves of ``m`` real digits; stratified by label when labels are known."""
    hx = backend.host_namespace()
    perm = backend.to_numpy(gen.permutation(m))
    if labels is None:
        half = m // 2
        return perm[:half], perm[half : 2 * half]
    a: list[int] = []
    b: list[int] = []
    for d in range(NUM_CLASSES):  # alternate within each class, in random order
        members = [int(i) for i in perm if int(labels[int(i)]) == d]
        pairs = 2 * (len(members) // 2)  # an odd one out joins neither half
        a.extend(members[0:pairs:2])
        b.extend(members[1:pairs:2])
    return hx.asarray(a, dtype=hx.int64), hx.asarray(b, dtype=hx.int64)


def _frechet_vs_heldout(
    gen_f: Any, real_f: Any, real_labels: Any, seed: int
) -> tuple[float, float, int, int]:
    """(fd, floor, rows, draws): generated vs held-out half A and half B vs half A, all at
    ``rows`` = min(generated, half) rows; fd is the mean over disjoint random draws."""
    hx = backend.host_namespace()
    gen = backend.Generator(seed, xp=hx)
    ia, ib = _halves(real_f.shape[0], real_labels, gen)
    k = min(int(gen_f.shape[0]), int(ia.shape[0]))
    if k < 2:
        raise ValueError(
            f"evaluate_samples: need at least 2 generated and 4 real images for the Frechet "
            f"distance, got {gen_f.shape[0]} and {real_f.shape[0]}"
        )
    half_a = hx.take(real_f, ia[:k], axis=0)
    floor = frechet_distance(hx.take(real_f, ib[:k], axis=0), half_a)
    order = backend.to_numpy(gen.permutation(int(gen_f.shape[0])))
    draws = int(gen_f.shape[0]) // k
    fds = [
        frechet_distance(hx.take(gen_f, order[i * k : (i + 1) * k], axis=0), half_a)
        for i in range(draws)
    ]
    return sum(fds) / draws, floor, k, draws


def _check_inputs(
    where: str, classifier: Any, images: Any, requested: Any, real_images: Any
) -> tuple[Any, int, int]:
    if not isinstance(classifier, DigitClassifier):
        raise TypeError(f"{where}: expected a DigitClassifier, got {type(classifier).__name__}")
    classifier.check_images(images, "generated images")
    classifier.check_images(real_images, "real images")
    hx = backend.host_namespace()
    req = hx.astype(hx.asarray(backend.to_numpy(requested)), hx.int64)
    _check_count(where, images, req)
    n, m = int(images.shape[0]), int(real_images.shape[0])
    if n < 2:
        raise ValueError(f"{where}: need at least 2 generated images, got {n}")
    if m < 4:
        raise ValueError(f"{where}: need at least 4 real images, got {m}")
    if n and (int(hx.min(req)) < 0 or int(hx.max(req)) >= NUM_CLASSES):
        raise ValueError(
            f"{where}: expected requested labels in 0..{NUM_CLASSES - 1}, got values in "
            f"[{int(hx.min(req))}, {int(hx.max(req))}]"
        )
    return req, n, m


def evaluate_samples(
    classifier: DigitClassifier,
    images: Any,
    requested_labels: Any,
    real_images: Any,
    real_labels: Any = None,
    *,
    seed: int = 0,
) -> EvalReport:
    """Score generated digits against the labels they were asked for and against real digits.

    * accuracy: share classified as the requested digit; confident accuracy: share classified
      so with softmax probability >= :data:`CONFIDENCE` (a blurred or ambiguous digit that
      the classifier barely accepts does not count);
    * background (:func:`background_stats`): border mean, bright border pixels and
      near-black pixels of the generated and of the real digits;
    * Frechet distance (FID formula, Heusel et al. 2017) of the classifier's 64 features:
      the real digits are split into two disjoint halves A and B (stratified by label when
      ``real_labels`` is given); generated vs A and the floor B vs A use the same number of
      rows, so ``frechet_distance / real_floor`` is 1 for a generator as good as real data.
      Pass real digits the classifier never trained on (its features of its own training
      digits are biased).

    Args:
        classifier: a :class:`DigitClassifier` of the images' size.
        images: generated images (N, 1, S, S) float in [-1, 1] (any namespace), N >= 2.
        requested_labels: (N,) integer digits 0..9 each image was conditioned on.
        real_images: real held-out digits (M, 1, S, S), M >= 4, e.g.
            ``xpdiff.digits.classifier.heldout_digits(S)``.
        real_labels: their labels (M,); when given, the classifier's (confident) accuracy is
            measured on them, the halves are stratified and the real background is given per
            digit; else the accuracy comes from ``classifier.info["heldout_accuracy"]`` if
            present.
        seed: for the split of the real digits into halves and the draws of generated rows.

    Returns:
        :class:`EvalReport`.

    Raises:
        TypeError: ``classifier`` is not a DigitClassifier, or images are not float arrays.
        ValueError: shapes that do not match the classifier's size, a label count that does
            not match the images, labels outside 0..9, fewer than 2 generated or 4 real images.
    """
    where = "evaluate_samples"
    req, n, m = _check_inputs(where, classifier, images, requested_labels, real_images)
    hx = backend.host_namespace()
    hit, sure = _judge(classifier, images, req)
    bg = background_stats(images)
    real_bg = background_stats(real_images)

    rl = None
    cls_acc = cls_conf = None
    if real_labels is not None:
        rl = hx.astype(hx.asarray(backend.to_numpy(real_labels)), hx.int64)
        _check_count(f"{where} (real)", real_images, rl)
        real_hit, real_sure = _judge(classifier, real_images, rl)
        cls_acc, cls_conf = _mean(real_hit), _mean(real_sure)
    else:
        info = getattr(classifier, "info", None) or {}
        cls_acc = info.get("heldout_accuracy")

    gen_f = backend.to_numpy(classifier.embed(images))
    real_f = hx.asarray(backend.to_numpy(classifier.embed(real_images)))
    fd, floor, k, draws = _frechet_vs_heldout(gen_f, real_f, rl, seed)
    counts = {d: int(hx.sum(hx.astype(req == d, hx.int64))) for d in range(NUM_CLASSES)}

    return EvalReport(
        image_size=classifier.size,
        n_samples=n,
        n_real=m,
        accuracy=_mean(hit),
        per_digit_accuracy=_per_digit(req, hit),
        per_digit_count={d: c for d, c in counts.items() if c},
        frechet_distance=fd,
        real_floor=floor,
        classifier_accuracy=cls_acc,
        confident_accuracy=_mean(sure),
        per_digit_confident=_per_digit(req, sure),
        classifier_confident_accuracy=cls_conf,
        fd_samples=k,
        fd_draws=draws,
        fd_features=int(gen_f.shape[1]),
        border=border_width(classifier.size),
        background=_mean(bg["border_mean"]),
        real_background=_mean(real_bg["border_mean"]),
        per_digit_background=_per_digit(req, bg["border_mean"]),
        real_per_digit_background={} if rl is None else _per_digit(rl, real_bg["border_mean"]),
        border_ink=_mean(bg["border_ink"]),
        real_border_ink=_mean(real_bg["border_ink"]),
        near_black=_mean(bg["near_black"]),
        real_near_black=_mean(real_bg["near_black"]),
    )
