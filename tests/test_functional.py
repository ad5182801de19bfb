"""xpdiff.functional.conv, attention and backend.sliding_windows against brute-force loops.

Every reference is computed on the host with NumPy and plain index loops, so it
shares nothing with the im2col formulation under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from xpdiff import backend
from xpdiff.functional import conv as fc

# (H, W, k, stride, pad): strides 1/2, padding 0/1, kernels 1/3, square and non-square
CONV_CASES = [
    (h, w, k, s, p)
    for (h, w) in [(5, 7), (4, 4)]
    for k in (1, 3)
    for s in (1, 2)
    for p in (0, 1)
]
CONV_IDS = [f"{h}x{w}-k{k}-s{s}-p{p}" for (h, w, k, s, p) in CONV_CASES]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _padded(x: np.ndarray, p: int) -> np.ndarray:
    B, C, H, W = x.shape
    out = np.zeros((B, C, H + 2 * p, W + 2 * p), dtype=x.dtype)
    for b in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    out[b, c, i + p, j + p] = x[b, c, i, j]
    return out


def ref_im2col(x: np.ndarray, k: int, s: int, p: int) -> np.ndarray:
    B, C, H, W = x.shape
    Ho, Wo = _out(H, k, s, p), _out(W, k, s, p)
    xp_ = _padded(x, p)
    cols = np.zeros((C * k * k, B * Ho * Wo), dtype=x.dtype)
    for c in range(C):
        for i in range(k):
            for j in range(k):
                for b in range(B):
                    for oh in range(Ho):
                        for ow in range(Wo):
                            cols[(c * k + i) * k + j, (b * Ho + oh) * Wo + ow] = xp_[
                                b, c, oh * s + i, ow * s + j
                            ]
    return cols


def ref_col2im(cols: np.ndarray, shape: tuple, k: int, s: int, p: int) -> np.ndarray:
    B, C, H, W = shape
    Ho, Wo = _out(H, k, s, p), _out(W, k, s, p)
    gx = np.zeros((B, C, H + 2 * p, W + 2 * p), dtype=cols.dtype)
    for c in range(C):
        for i in range(k):
            for j in range(k):
                for b in range(B):
                    for oh in range(Ho):
                        for ow in range(Wo):
                            gx[b, c, oh * s + i, ow * s + j] += cols[
                                (c * k + i) * k + j, (b * Ho + oh) * Wo + ow
                            ]
    return gx[:, :, p : p + H, p : p + W]


def ref_conv(x: np.ndarray, w: np.ndarray, bias, s: int, p: int) -> np.ndarray:
    B, C, H, W = x.shape
    O, _, k, _ = w.shape
    Ho, Wo = _out(H, k, s, p), _out(W, k, s, p)
    xp_ = _padded(x, p)
    y = np.zeros((B, O, Ho, Wo))
    for b in range(B):
        for o in range(O):
            for oh in range(Ho):
                for ow in range(Wo):
                    acc = 0.0 if bias is None else bias[o]
                    for c in range(C):
                        for i in range(k):
                            for j in range(k):
                                acc += w[o, c, i, j] * xp_[b, c, oh * s + i, ow * s + j]
                    y[b, o, oh, ow] = acc
    return y


def ref_conv_backward(x, w, gy, s, p):
    """Gradients of sum(conv(x, w, b) * gy) by looping over every multiply-add."""
    B, C, H, W = x.shape
    O, _, k, _ = w.shape
    Ho, Wo = gy.shape[2], gy.shape[3]
    xp_ = _padded(x, p)
    gxp = np.zeros_like(xp_)
    gw = np.zeros_like(w)
    gb = np.zeros(O)
    for b in range(B):
        for o in range(O):
            for oh in range(Ho):
                for ow in range(Wo):
                    g = gy[b, o, oh, ow]
                    gb[o] += g
                    for c in range(C):
                        for i in range(k):
                            for j in range(k):
                                gw[o, c, i, j] += g * xp_[b, c, oh * s + i, ow * s + j]
                                gxp[b, c, oh * s + i, ow * s + j] += g * w[o, c, i, j]
    return gxp[:, :, p : p + H, p : p + W], gw, gb


def _to(xp, a):
    return backend.asarray(a, xp, dtype=xp.float64)


def _assert_allclose(actual, desired, rtol=1e-12, atol=1e-12):
    a = backend.to_numpy(actual)
    assert backend.dtype_name(actual.dtype) == "float64"
    assert a.shape == desired.shape
    np.testing.assert_allclose(a, desired, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# im2col / col2im
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(("H", "W", "k", "s", "p"), CONV_CASES, ids=CONV_IDS)
def test_im2col_matches_loops(xp, H, W, k, s, p):
    x = _rng(H, W, k, s, p).standard_normal((2, 3, H, W))
    cols = fc.im2col(_to(xp, x), k, k, s, p)
    assert backend.get_namespace(cols) is xp
    _assert_allclose(cols, ref_im2col(x, k, s, p), rtol=0, atol=0)


@pytest.mark.parametrize(("H", "W", "k", "s", "p"), CONV_CASES, ids=CONV_IDS)
def test_col2im_matches_loops_and_is_adjoint(xp, H, W, k, s, p):
    rng = _rng(1, H, W, k, s, p)
    shape = (2, 3, H, W)
    Ho, Wo = _out(H, k, s, p), _out(W, k, s, p)
    x = rng.standard_normal(shape)
    c = rng.standard_normal((3 * k * k, 2 * Ho * Wo))
    back = fc.col2im(_to(xp, c), shape, k, k, s, p)
    assert backend.get_namespace(back) is xp
    _assert_allclose(back, ref_col2im(c, shape, k, s, p))
    # <im2col(x), c> == <x, col2im(c)>
    lhs = float(xp.sum(fc.im2col(_to(xp, x), k, k, s, p) * _to(xp, c)))
    rhs = float(xp.sum(_to(xp, x) * back))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


def test_col2im_leaves_unvisited_pixels_zero(xp):
    # 5x7 with k=3, stride 2, no padding: the last row (and no column) is never read
    shape, k, s = (1, 1, 6, 7), 3, 2
    Ho, Wo = _out(6, k, s, 0), _out(7, k, s, 0)
    back = backend.to_numpy(fc.col2im(_to(xp, np.ones((k * k, Ho * Wo))), shape, k, k, s, 0))
    assert (back[0, 0, 5, :] == 0).all()
    assert (back[0, 0, :5, :] > 0).all()


@pytest.mark.parametrize("pad", [0, 1, 2])
def test_pad2d(xp, pad):
    x = _rng(pad).standard_normal((2, 3, 4, 5))
    out = fc.pad2d(_to(xp, x), pad)
    _assert_allclose(out, _padded(x, pad), rtol=0, atol=0)


@pytest.mark.parametrize(("n", "k", "s", "p", "want"), [(5, 3, 1, 0, 3), (5, 3, 2, 1, 3),
                                                         (7, 3, 2, 0, 3), (4, 1, 2, 0, 2),
                                                         (28, 3, 1, 1, 28)])
def test_conv_output_size(n, k, s, p, want):
    assert fc.conv_output_size(n, k, s, p) == want


# ---------------------------------------------------------------------------
# conv2d forward / backward
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("H", "W", "k", "s", "p"), CONV_CASES + [(4, 5, 1, 1, 1)],
                         ids=CONV_IDS + ["H4W5k1s1p1"])
def test_conv2d_forward_backward_match_loops(xp, H, W, k, s, p, bias):
    rng = _rng(2, H, W, k, s, p, bias)
    x = rng.standard_normal((2, 3, H, W))
    w = rng.standard_normal((4, 3, k, k))
    b = rng.standard_normal(4) if bias else None
    y, cache = fc.conv2d_forward(_to(xp, x), _to(xp, w), None if b is None else _to(xp, b), s, p)
    assert backend.get_namespace(y) is xp
    _assert_allclose(y, ref_conv(x, w, b, s, p))

    gy = rng.standard_normal(tuple(y.shape))
    gx, gw, gb = fc.conv2d_backward(cache, _to(xp, gy))
    rgx, rgw, rgb = ref_conv_backward(x, w, gy, s, p)
    _assert_allclose(gx, rgx)
    _assert_allclose(gw, rgw)
    if bias:
        _assert_allclose(gb, rgb)
    else:
        assert gb is None


# ---------------------------------------------------------------------------
# sliding windows
# ---------------------------------------------------------------------------
def ref_windows(x: np.ndarray, kh: int, kw: int, s: int) -> np.ndarray:
    B, C, H, W = x.shape
    Ho, Wo = (H - kh) // s + 1, (W - kw) // s + 1
    out = np.zeros((B, C, Ho, Wo, kh, kw), dtype=x.dtype)
    for oh in range(Ho):
        for ow in range(Wo):
            for i in range(kh):
                for j in range(kw):
                    out[:, :, oh, ow, i, j] = x[:, :, oh * s + i, ow * s + j]
    return out


@pytest.mark.parametrize("view", ["contiguous", "offset-slice", "transposed"])
@pytest.mark.parametrize(("H", "W", "kh", "kw", "s"), [(5, 7, 3, 3, 1), (5, 7, 3, 3, 2),
                                                       (6, 4, 2, 3, 2), (4, 4, 1, 1, 1),
                                                       (7, 5, 3, 1, 3)])
def test_sliding_windows_match_slicing(xp, H, W, kh, kw, s, view):
    rng = _rng(3, H, W, kh, kw, s)
    # build the input in xp first so that views are the library's own (strided) views
    if view == "contiguous":
        host = rng.standard_normal((2, 3, H, W))
        x = _to(xp, host)
    elif view == "offset-slice":
        base = rng.standard_normal((2, 3, H + 2, W + 1))
        host = base[:, :, 2:, 1:]
        x = _to(xp, base)[:, :, 2:, 1:]
    else:
        base = rng.standard_normal((2, 3, W, H))
        host = np.transpose(base, (0, 1, 3, 2))
        x = xp.permute_dims(_to(xp, base), (0, 1, 3, 2))
    win = backend.sliding_windows(x, kh, kw, s)
    assert backend.get_namespace(win) is xp
    want = ref_windows(np.ascontiguousarray(host), kh, kw, s)
    assert tuple(win.shape) == want.shape
    np.testing.assert_array_equal(backend.to_numpy(win), want)


# ---------------------------------------------------------------------------
# scaled dot-product attention
# ---------------------------------------------------------------------------
def ref_sdpa(q, k, v, go, scale):
    """Per (batch, head, query) loops with the attention matrix written out: the
    textbook forward and the gradient of sum(o * go), no row-statistics shortcuts."""
    B, h, N, d = q.shape
    M = k.shape[2]
    o = np.zeros_like(q)
    gq, gk, gv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(B):
        for a in range(h):
            for i in range(N):
                s = np.array([scale * float(q[b, a, i] @ k[b, a, j]) for j in range(M)])
                p = np.exp(s - s.max())
                p /= p.sum()
                o[b, a, i] = sum(p[j] * v[b, a, j] for j in range(M))
                gp = np.array([float(go[b, a, i] @ v[b, a, j]) for j in range(M)])
                gs = p * (gp - float(p @ gp))
                for j in range(M):
                    gv[b, a, j] += p[j] * go[b, a, i]
                    gq[b, a, i] += scale * gs[j] * k[b, a, j]
                    gk[b, a, j] += scale * gs[j] * q[b, a, i]
    return o, gq, gk, gv


@pytest.mark.parametrize(("N", "M"), [(5, 5), (4, 7)], ids=["self", "cross"])
def test_sdpa_matches_loops_and_keeps_no_attention_matrix(xp, N, M):
    from xpdiff.functional import attention as fa
    rng = _rng(7, N, M)
    B, h, d = 2, 3, 4
    q = rng.standard_normal((B, h, N, d)) * 2.0   # large scores: the max shift matters
    k = rng.standard_normal((B, h, M, d)) * 2.0
    v = rng.standard_normal((B, h, M, d))
    go = rng.standard_normal((B, h, N, d))
    scale = d ** -0.5
    o, cache = fa.sdpa_forward(_to(xp, q), _to(xp, k), _to(xp, v), scale)
    ro, rgq, rgk, rgv = ref_sdpa(q, k, v, go, scale)
    _assert_allclose(o, ro)
    # the cache holds (B, h, N, 1) row statistics, never the (B, h, N, M) probabilities
    shapes = [tuple(c.shape) for c in cache if hasattr(c, "shape")]
    assert (B, h, N, M) not in shapes, shapes
    gq, gk, gv = fa.sdpa_backward(cache, _to(xp, go))
    _assert_allclose(gq, rgq)
    _assert_allclose(gk, rgk)
    _assert_allclose(gv, rgv)


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_matches_loops_and_leaves_its_input(xp, axis):
    """softmax against a float64 loop over rows, with logits large enough that exp
    without the max shift would overflow; the input array is not modified."""
    vals = (_rng(23, axis + 2).standard_normal((4, 6)) * 5.0 + 100.0).astype(np.float32)
    vals[1, 2] = 200.0
    ref = np.moveaxis(vals.astype(np.float64), axis, -1).copy()
    for row in ref.reshape(-1, ref.shape[-1]):
        e = [np.exp(v - max(row)) for v in row]
        row[:] = [v / sum(e) for v in e]
    ref = np.moveaxis(ref, -1, axis)

    from xpdiff.functional.attention import softmax

    x = backend.asarray(vals, xp)
    got = backend.to_numpy(softmax(x, axis=axis))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(backend.to_numpy(x), vals)
