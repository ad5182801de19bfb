"""xpdiff.digits.evaluation: classifier gradients, Frechet distance, sample report, cache."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from xpdiff import backend
from xpdiff.digits import classifier as clf
from xpdiff.digits import data
from xpdiff.digits.classifier import DigitClassifier, load_or_train_classifier
from xpdiff.digits.evaluation import (
    EvalReport,
    background_stats,
    border_width,
    evaluate_samples,
    frechet_distance,
    save_samples,
)
from xpdiff.testing import check_backward

#: A quick recipe for the tests (about 4 s on one core): a narrow net at 14x14, few epochs,
#: no augmentation; it reaches about 96% held-out accuracy.
QUICK = {"epochs": 6, "channels": (8, 16, 32), "augment": False, "lr": 5e-3, "batch_size": 64}


@contextlib.contextmanager
def _one_blas_thread():
    """Small matrix products run far slower on 2 busy cores with 2 BLAS threads (spinning)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ---------------------------------------------------------------------------
# the classifier
# ---------------------------------------------------------------------------
def test_classifier_backward_float64(xp):
    model = DigitClassifier(8, channels=(3, 4, 5), seed=0, dtype="float64", xp=xp)
    x = backend.Generator(1, xp).normal((2, 1, 8, 8), dtype=xp.float64)
    res = check_backward(model, [x])
    assert "input 0" in res and "conv1.weight" in res and "fc2.bias" in res


def test_classifier_shapes_and_features(xp):
    model = DigitClassifier(14, channels=(4, 4, 8), seed=0, xp=xp)
    x = backend.Generator(0, xp).normal((3, 1, 14, 14))
    assert tuple(model(x).shape) == (3, 10)
    f = model.features(x)
    assert tuple(f.shape) == (3, 64)
    assert tuple(model.embed(x, batch_size=2).shape) == (3, 64)
    assert tuple(model.predict(x).shape) == (3,)


def test_classifier_seed_is_deterministic_and_leaves_global_init_alone():
    from xpdiff.nn import init

    init.manual_seed(123)
    a = DigitClassifier(14, seed=5)
    after_a = init._gen().uniform((3,))
    init.manual_seed(123)
    b = DigitClassifier(14, seed=5)
    after_b = init._gen().uniform((3,))
    np.testing.assert_array_equal(after_a, after_b)
    init.manual_seed(123)
    expected_next = init._gen().uniform((3,))
    np.testing.assert_array_equal(after_a, expected_next)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        np.testing.assert_array_equal(pa.data, pb.data)


def test_classifier_rejects_wrong_size():
    model = DigitClassifier(14)
    with pytest.raises(
        ValueError,
        match=r"expected images of shape \(B, 1, 14, 14\), got "
        r"\(2, 1, 28, 28\).*classifier of size 28",
    ):
        model(np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"\(B, 1, 14, 14\), got \(2, 14, 14\)"):
        model(np.zeros((2, 14, 14), np.float32))
    with pytest.raises(TypeError, match="to_model_range"):
        model.predict(np.zeros((2, 1, 14, 14), np.uint8))


# ---------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------
def _exact_gaussian_sample(rng, n, mu, var):
    """Rows whose sample mean is exactly ``mu`` and sample covariance exactly diag(var)."""
    d = mu.shape[0]
    z = rng.standard_normal((n, d))
    z -= z.mean(axis=0)
    cov = z.T @ z / (n - 1)
    w, v = np.linalg.eigh(cov)
    z = z @ v @ np.diag(w**-0.5) @ v.T  # whitened: sample covariance = I
    return mu + z * np.sqrt(var)


def test_frechet_identical_is_zero():
    x = np.random.default_rng(0).standard_normal((200, 16))
    assert abs(frechet_distance(x, x)) < 1e-6
    assert abs(frechet_distance(x.astype(np.float32), x.astype(np.float32))) < 1e-6


def test_frechet_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(1)
    d = 6
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    var_a, var_b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    a = _exact_gaussian_sample(rng, 300, mu_a, var_a)
    b = _exact_gaussian_sample(rng, 400, mu_b, var_b)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_symmetric_and_any_namespace(xp):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((100, 8)) @ rng.standard_normal((8, 8))
    b = rng.standard_normal((120, 8)) + 0.5
    ab = frechet_distance(backend.asarray(a, xp), backend.asarray(b, xp))
    ba = frechet_distance(b, a)
    assert ab > 0
    assert ab == pytest.approx(ba, rel=1e-9)


@pytest.mark.oracle
def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((500, 10)) @ rng.standard_normal((10, 10))
    b = rng.standard_normal((400, 10)) @ rng.standard_normal((10, 10)) + 0.3
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb).real
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sa + sb - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_rank_deficient_is_finite_and_nonnegative():
    rng = np.random.default_rng(4)
    a = np.zeros((50, 8))
    a[:, :2] = rng.standard_normal((50, 2))  # six dead features, like ReLU units
    fd = frechet_distance(a, a[::-1].copy())
    assert np.isfinite(fd) and 0.0 <= fd < 1e-6


def test_frechet_errors():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"expected feats_a of shape \(N, D\)"):
        frechet_distance(np.zeros(5), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


# ---------------------------------------------------------------------------
# trained classifier: evaluation and cache
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared14():
    return data.prepare(None, 14, test_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def trained14(prepared14, tmp_path_factory):
    cache = tmp_path_factory.mktemp("xpdiff-cache")
    with pytest.MonkeyPatch.context() as mp, _one_blas_thread():
        mp.setenv("XPDIFF_CACHE", str(cache))
        model = load_or_train_classifier(14, **QUICK)
    return model, cache


def test_trained_classifier_heldout_accuracy(trained14, prepared14):
    model, _ = trained14
    assert model.info["heldout_accuracy"] >= 0.95
    assert model.accuracy(prepared14.x_test, prepared14.y_test) == pytest.approx(
        model.info["heldout_accuracy"]
    )


def test_first_use_notice_says_how_long_and_where(tmp_path, monkeypatch, capsys):
    def quick(x, y, *, seed=0, xp=None, progress=False, **kw):
        return DigitClassifier(14, xp=xp)  # untrained: only the notice is under test

    monkeypatch.setattr(clf, "train_classifier", quick)
    load_or_train_classifier(14, cache_dir=tmp_path)
    err = capsys.readouterr().err
    assert "training the 14x14 digit classifier that judges samples, once (about 1 minute" in err
    assert f"cached in {tmp_path}" in err and "trained the digit classifier in" in err
    load_or_train_classifier(14, cache_dir=tmp_path)
    assert capsys.readouterr().err == ""  # from the cache: silent


def test_cache_second_call_loads(trained14, prepared14, monkeypatch):
    model, cache = trained14
    files = sorted(p.name for p in cache.iterdir())
    assert any(f.endswith(".safetensors") for f in files)
    assert any(f.endswith(".json") for f in files)
    assert not any(f.endswith(".tmp") for f in files)
    meta = json.loads(next(cache.glob("*.json")).read_text())
    assert meta["size"] == 14 and meta["data"]["source"] == "mnist_5k"
    assert meta["heldout_accuracy"] == model.info["heldout_accuracy"]

    def no_training(*a, **k):
        raise AssertionError("load_or_train_classifier trained although a cache exists")

    monkeypatch.setenv("XPDIFF_CACHE", str(cache))
    monkeypatch.setattr(clf, "train_classifier", no_training)
    again = load_or_train_classifier(14, **QUICK)
    x = prepared14.x_test[:200]
    np.testing.assert_array_equal(
        backend.to_numpy(model.logits(x)), backend.to_numpy(again.logits(x))
    )
    assert again.info["heldout_accuracy"] == model.info["heldout_accuracy"]

    # another recipe is another cache entry (so it would train)
    with pytest.raises(AssertionError, match="trained although"):
        load_or_train_classifier(14, **dict(QUICK, epochs=QUICK["epochs"] + 1))


def test_evaluate_real_digits_score_high(trained14, prepared14):
    model, _ = trained14
    p = prepared14
    # "generated" = 300 training digits with their labels; real = the held-out digits
    idx = np.random.default_rng(0).permutation(p.y_train.shape[0])[:300]
    report = evaluate_samples(model, p.x_train[idx], p.y_train[idx], p.x_test, p.y_test)
    assert isinstance(report, EvalReport)
    assert report.accuracy >= 0.95
    assert set(report.per_digit_accuracy) == set(range(10))
    assert sum(report.per_digit_count.values()) == 300
    assert min(report.per_digit_accuracy.values()) >= 0.8
    assert report.classifier_accuracy == pytest.approx(model.info["heldout_accuracy"])
    assert 0 < report.real_floor
    assert report.frechet_distance < 2.0 * report.real_floor

    # noise: chance accuracy and a far larger distance
    gen = np.random.default_rng(1)
    noise = np.clip(gen.standard_normal((300, 1, 14, 14)), -1, 1).astype(np.float32)
    labels = np.arange(300) % 10
    bad = evaluate_samples(model, noise, labels, p.x_test)
    assert bad.accuracy <= 0.25
    assert bad.frechet_distance > 10 * report.real_floor
    assert bad.frechet_distance > 10 * report.frechet_distance
    # without real labels the classifier's recorded held-out accuracy is reported
    assert bad.classifier_accuracy == model.info["heldout_accuracy"]
    assert bad.classifier_confident_accuracy is None and bad.real_per_digit_background == {}
    # noise is far from clean: its background is many times the real one
    assert bad.background_ratio > 10 and not bad.checks()[4][3]

    # the strict figures: confident accuracy, background and FD at equal sample sizes
    assert report.confident_accuracy <= report.accuracy
    assert report.confident_accuracy >= 0.85
    assert set(report.per_digit_confident) == set(range(10))
    assert 0.0 <= report.classifier_confident_accuracy <= report.classifier_accuracy
    assert report.fd_samples == 250 and report.fd_draws == 1  # 300 generated, halves of 250
    assert report.fd_ratio == pytest.approx(report.frechet_distance / report.real_floor)
    assert 0.7 < report.background_ratio < 1.4  # real training digits vs real held-out
    assert 0.0 < report.real_background < 0.05
    assert (
        set(report.per_digit_background) == set(range(10)) == set(report.real_per_digit_background)
    )
    assert report.border == 2
    names = [c[0] for c in report.checks()]
    assert names[0] == "accuracy" and names[3] == "Frechet distance / floor"
    assert report.checks()[0][3] == (report.accuracy >= 0.99)

    text = report.format()
    lines = text.splitlines()
    assert lines[1].split()[:2] == ["strict", "figures"] and lines[2].split()[0] == "accuracy"
    assert "Frechet distance" in text and "floor" in text and len(lines) >= 14
    assert "background (2-pixel border mean)" in text and "confident" in text
    js = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert js["per_digit_accuracy"]["3"] == report.per_digit_accuracy[3]
    assert js["per_digit_background"]["3"] == report.per_digit_background[3]
    assert js["n_samples"] == 300
    assert js["fd_ratio"] == report.fd_ratio and js["checks"][0]["name"] == "accuracy"


def test_evaluate_frechet_uses_equal_counts_and_draws(trained14, prepared14):
    model, _ = trained14
    p = prepared14
    idx = np.random.default_rng(0).permutation(p.y_train.shape[0])[:600]
    report = evaluate_samples(model, p.x_train[idx], p.y_train[idx], p.x_test, p.y_test)
    assert (report.fd_samples, report.fd_draws) == (250, 2)
    few = evaluate_samples(model, p.x_train[idx[:40]], p.y_train[idx[:40]], p.x_test, p.y_test)
    assert (few.fd_samples, few.fd_draws) == (40, 1)
    assert few.real_floor > report.real_floor  # the floor is measured at the same 40 rows
    assert few.fd_features == report.fd_features == 64
    assert "40 rows for 64 features" in few.format() and "rows for" not in report.format()


def test_evaluate_errors(prepared14):
    model = DigitClassifier(14, channels=(2, 2, 2), seed=0)
    x = prepared14.x_test[:20]
    with pytest.raises(ValueError, match=r"image/label count mismatch: 20 images but 19 labels"):
        evaluate_samples(model, x, prepared14.y_test[:19], x)
    big = np.zeros((20, 1, 28, 28), np.float32)
    with pytest.raises(
        ValueError,
        match=r"generated images of shape \(B, 1, 14, 14\), got "
        r"\(20, 1, 28, 28\)",
    ):
        evaluate_samples(model, big, prepared14.y_test[:20], x)
    with pytest.raises(ValueError, match=r"real images of shape \(B, 1, 14, 14\)"):
        evaluate_samples(model, x, prepared14.y_test[:20], big)
    with pytest.raises(ValueError, match="size must be 28 or 14"):
        load_or_train_classifier(7)
    bad_labels = np.full(20, 10)
    with pytest.raises(ValueError, match=r"requested labels in 0..9, got values in \[10, 10\]"):
        evaluate_samples(model, x, bad_labels, x)


# ---------------------------------------------------------------------------
# background, saved samples, the classifier's recipe hash
# ---------------------------------------------------------------------------
def test_background_stats_known_images():
    x = -np.ones((3, 1, 14, 14), np.float32)  # black
    x[1, 0, 5:9, 5:9] = 1.0  # white inside only
    x[2, 0, 0, :] = 1.0  # one white border row: 14 of the 14*14 - 10*10 = 96 border pixels
    x[2, 0, 1, :] = -0.9  # level 0.05: faint, still near-black
    st = background_stats(x)
    assert border_width(14) == 2 and border_width(28) == 4
    np.testing.assert_allclose(st["border_mean"], [0.0, 0.0, (14 + 14 * 0.05) / 96])
    np.testing.assert_allclose(st["border_ink"], [0.0, 0.0, 14 / 96])
    np.testing.assert_allclose(st["near_black"], [1.0, 1 - 16 / 196, 1 - 14 / 196])
    assert background_stats(x, border=1)["border_ink"][2] == pytest.approx(14 / 52)
    with pytest.raises(
        ValueError, match=r"expected images of shape \(N, 1, S, S\), got \(3, 14, 14\)"
    ):
        background_stats(x[:, 0])
    with pytest.raises(ValueError, match="border of 1..6 pixels, got 7"):
        background_stats(x, border=7)


def test_save_samples_roundtrip(tmp_path, xp):
    gen = backend.Generator(0, xp)
    images = gen.uniform((4, 1, 14, 14)) * 2 - 1
    path = tmp_path / "s.npz"
    save_samples(path, images, [0, 1, 2, 9], {"scheduler": "ddim", "steps": 50, "seed": 0})
    with np.load(path) as z:
        assert z["images"].dtype == np.float32 and z["images"].shape == (4, 1, 14, 14)
        np.testing.assert_array_equal(z["images"], backend.to_numpy(images).astype(np.float32))
        assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [0, 1, 2, 9]
        assert json.loads(str(z["settings"])) == {"scheduler": "ddim", "steps": 50, "seed": 0}
    with pytest.raises(ValueError, match=r"image/label count mismatch: 4 images but 3 labels"):
        save_samples(path, images, [0, 1, 2])
    with pytest.raises(ValueError, match=r"\(N, 1, S, S\), got \(4, 14, 14\)"):
        save_samples(path, images[:, 0, ...], [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"labels in 0..9"):
        save_samples(path, images, [0, 1, 2, 12])


def test_recipe_hash_ignores_docs_but_not_code():
    def f(x):
        """One docstring."""
        return x + 1  # a comment

    g_doc = f

    def f(x):  # noqa: F811
        """Another docstring."""

        return x + 1

    g_same = f

    def f(x):  # noqa: F811
        return x + 2

    assert clf._code_text(g_doc) == clf._code_text(g_same) != clf._code_text(f)
    h = clf.recipe_hash()
    assert len(h) == 16 and h == clf.recipe_hash()


def test_cache_is_keyed_by_the_training_code(trained14, monkeypatch):
    _, cache = trained14
    meta = json.loads(next(cache.glob("*.json")).read_text())
    assert meta["recipe_hash"] == clf.recipe_hash()

    def no_training(*a, **k):
        raise AssertionError("trained")

    monkeypatch.setattr(clf, "train_classifier", no_training)
    load_or_train_classifier(14, cache_dir=cache, **QUICK)  # same code: from the cache
    monkeypatch.setattr(clf, "recipe_hash", lambda: "0123456789abcdef")
    with pytest.raises(AssertionError, match="trained"):  # other code: trains afresh
        load_or_train_classifier(14, cache_dir=cache, **QUICK)


def test_shift_augment_keeps_shape_and_range():
    hx = backend.namespace_for("numpy")
    x = np.random.default_rng(0).uniform(-1, 1, (5, 1, 14, 14)).astype(np.float32)
    gen = backend.Generator(0, xp=hx)
    for fine in (1, 2):
        y = clf._shift_augment(x, 2, gen, fine)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= -1.0 and y.max() <= 1.0
    assert clf._shift_augment(x, 0, gen) is x


def _report(per_digit: dict[int, float], fd_samples: int = 250) -> EvalReport:
    """A report with the given per-digit accuracies (100 samples each) and made-up distances."""
    return EvalReport(
        image_size=14,
        n_samples=100 * len(per_digit),
        n_real=500,
        accuracy=sum(per_digit.values()) / len(per_digit),
        per_digit_accuracy=per_digit,
        per_digit_count={d: 100 for d in per_digit},
        frechet_distance=3.0,
        real_floor=2.0,
        fd_samples=fd_samples,
        fd_draws=1,
    )


def test_report_names_every_digit_tied_for_worst():
    acc = {d: 1.0 for d in range(10)}
    acc[3] = acc[5] = 0.98
    report = _report(acc)
    assert report.worst_digits == ([3, 5], 0.98)
    assert report.worst_digit == (3, 0.98)  # unchanged: the smallest tied digit
    assert "worst digits (3, 5)" in report.format()
    assert "worst digit (3)" not in report.format()
    js = report.to_json()
    # the JSON keeps its check name and adds the list of tied digits
    assert js["checks"][1]["name"] == "worst digit (3)" and js["worst_digits"] == [3, 5]
    acc[5] = 0.99
    assert "worst digit (3) " in _report(acc).format()
    assert _report(acc).to_json()["worst_digits"] == [3]
    every = _report(dict.fromkeys(range(10), 1.0))
    assert "worst digits (all 10 tied)" in every.format()
    assert every.to_json()["worst_digits"] == list(range(10))


def test_report_notes_fewer_frechet_rows_than_features():
    acc = dict.fromkeys(range(10), 1.0)
    few, enough = _report(acc, fd_samples=40), _report(acc, fd_samples=64)
    note = "40 rows for 64 features"
    assert note in few.format() and "ratio is unreliable" in few.format()
    assert "at least 64 rows are needed" in few.format()
    assert "rows for" not in enough.format()
    assert few.fd_ratio == enough.fd_ratio == 1.5  # the numbers themselves are unchanged
