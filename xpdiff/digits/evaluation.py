"""Judging generated digits: Frechet distance and one report.

* :func:`frechet_distance`: the FID formula on any features, computed in float64 on the
  host with symmetric eigendecompositions.
* :func:`evaluate_samples`: per-digit accuracy of class-conditional samples, judged by a
  :class:`~xpdiff.digits.classifier.DigitClassifier`, and the Frechet distance of their
  classifier features to real held-out digits, next to the distance between two halves of
  the real digits (the "floor": what a perfect generator would score with that many samples).

Host math uses ``backend.host_namespace()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .. import backend
from .classifier import DigitClassifier, _check_count
from .data import NUM_CLASSES

__all__ = ["EvalReport", "evaluate_samples", "frechet_distance"]


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

    ``|mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2)``, in float64 on the host;
    both square roots come from symmetric eigendecompositions with tiny negative
    eigenvalues clamped to 0.  Covariances use ``N - 1``.
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
# evaluation
# ---------------------------------------------------------------------------
@dataclass
class EvalReport:
    """Scores of class-conditional samples; see :func:`evaluate_samples`."""

    image_size: int
    n_samples: int
    n_real: int
    accuracy: float
    per_digit_accuracy: dict[int, float]
    per_digit_count: dict[int, int]
    frechet_distance: float
    real_floor: float
    classifier_accuracy: float | None = None

    def format(self) -> str:
        """A readable multi-line table."""
        lines = [
            f"Sample evaluation ({self.n_samples} samples at {self.image_size}x{self.image_size}, "
            f"{self.n_real} real held-out digits)",
            "  digit  requested  accuracy",
        ]
        for d in sorted(self.per_digit_accuracy):
            lines.append(
                f"  {d:>5}  {self.per_digit_count[d]:>9}  {self.per_digit_accuracy[d]:>8.3f}"
            )
        lines.append(f"  {'all':>5}  {self.n_samples:>9}  {self.accuracy:>8.3f}")
        lines.append(f"  Frechet distance (classifier features): {self.frechet_distance:.4f}")
        lines.append(f"  real-vs-real floor (two halves):         {self.real_floor:.4f}")
        if self.classifier_accuracy is not None:
            lines.append(
                f"  classifier accuracy on real held-out:    {self.classifier_accuracy:.4f}"
            )
        return "\n".join(lines)

    def to_json(self) -> dict:
        """A JSON-ready dict (digit keys become strings)."""
        out = asdict(self)
        out["per_digit_accuracy"] = {str(k): v for k, v in self.per_digit_accuracy.items()}
        out["per_digit_count"] = {str(k): v for k, v in self.per_digit_count.items()}
        return out


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

    Args:
        classifier: a :class:`DigitClassifier` of the images' size.
        images: generated images (N, 1, S, S) float in [-1, 1] (any namespace).
        requested_labels: (N,) the digit each image was conditioned on.
        real_images: real held-out digits (M, 1, S, S), M >= 4, e.g. ``prepare(...).x_test``.
        real_labels: their labels; when given ``classifier_accuracy`` is measured on them,
            else taken from ``classifier.info["heldout_accuracy"]`` if present.
        seed: for the random split of the real digits into the two halves of the floor.

    Returns:
        :class:`EvalReport`.  Note the Frechet distance is biased upward for few samples;
        compare it with ``real_floor`` (computed on M/2 vs M/2 real digits).
    """
    where = "evaluate_samples"
    if not isinstance(classifier, DigitClassifier):
        raise TypeError(f"{where}: expected a DigitClassifier, got {type(classifier).__name__}")
    classifier.check_images(images, "generated images")
    classifier.check_images(real_images, "real images")
    hx = backend.host_namespace()
    req = hx.astype(hx.asarray(backend.to_numpy(requested_labels)), hx.int64)
    _check_count(where, images, req)
    n, m = int(images.shape[0]), int(real_images.shape[0])
    if n < 2:
        raise ValueError(f"{where}: need at least 2 generated images, got {n}")
    if m < 4:
        raise ValueError(f"{where}: need at least 4 real images, got {m}")

    pred = backend.to_numpy(classifier.predict(images))
    hit = pred == req
    per_acc: dict[int, float] = {}
    per_cnt: dict[int, int] = {}
    for d in range(NUM_CLASSES):
        mask = req == d
        k = int(hx.sum(hx.astype(mask, hx.int64)))
        if k:
            per_cnt[d] = k
            per_acc[d] = int(hx.sum(hx.astype(hit & mask, hx.int64))) / k
    acc = int(hx.sum(hx.astype(hit, hx.int64))) / n

    gen_f = backend.to_numpy(classifier.embed(images))
    real_f = hx.asarray(backend.to_numpy(classifier.embed(real_images)))
    fd = frechet_distance(gen_f, real_f)
    perm = backend.to_numpy(backend.Generator(seed, xp=hx).permutation(m))
    half = m // 2
    floor = frechet_distance(
        hx.take(real_f, perm[:half], axis=0), hx.take(real_f, perm[half : 2 * half], axis=0)
    )

    if real_labels is not None:
        rl = hx.asarray(backend.to_numpy(real_labels))
        _check_count(f"{where} (real)", real_images, rl)
        cls_acc = classifier.accuracy(real_images, rl)
    else:
        info = getattr(classifier, "info", None) or {}
        cls_acc = info.get("heldout_accuracy")

    return EvalReport(
        image_size=classifier.size,
        n_samples=n,
        n_real=m,
        accuracy=acc,
        per_digit_accuracy=per_acc,
        per_digit_count=per_cnt,
        frechet_distance=fd,
        real_floor=floor,
        classifier_accuracy=cls_acc,
    )
