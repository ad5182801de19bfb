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
    (h, w, k, s, p) for (h, w) in [(5, 7), (4, 4)] for k in (1, 3) for s in (1, 2) for p in (0, 1)
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
    """Channels-last column matrix (B*Ho*Wo, k*k*C) of a (B, C, H, W) host array:
    row (b, oh, ow), column (i, j, c)."""
    B, C, H, W = x.shape
    Ho, Wo = _out(H, k, s, p), _out(W, k, s, p)
    xp_ = _padded(x, p)
    cols = np.zeros((B * Ho * Wo, k * k * C), dtype=x.dtype)
    for c in range(C):
        for i in range(k):
            for j in range(k):
                for b in range(B):
                    for oh in range(Ho):
                        for ow in range(Wo):
                            cols[(b * Ho + oh) * Wo + ow, (i * k + j) * C + c] = xp_[
                                b, c, oh * s + i, ow * s + j
                            ]
    return cols


def ref_col2im(cols: np.ndarray, shape: tuple, k: int, s: int, p: int) -> np.ndarray:
    """Adjoint of ``ref_im2col``, returned channels-last (B, H, W, C) for ``shape``
    (B, C, H, W)."""
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
                                (b * Ho + oh) * Wo + ow, (i * k + j) * C + c
                            ]
    return _nhwc(gx[:, :, p : p + H, p : p + W])


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1)))


def _nchw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))


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
    cols = fc.im2col(_to(xp, _nhwc(x)), k, k, s, p)
    assert backend.get_namespace(cols) is xp
    _assert_allclose(cols, ref_im2col(x, k, s, p), rtol=0, atol=0)


@pytest.mark.parametrize(("H", "W", "k", "s", "p"), CONV_CASES, ids=CONV_IDS)
def test_col2im_matches_loops_and_is_adjoint(xp, H, W, k, s, p):
    rng = _rng(1, H, W, k, s, p)
    shape = (2, 3, H, W)
    Ho, Wo = _out(H, k, s, p), _out(W, k, s, p)
    x = _nhwc(rng.standard_normal(shape))
    c = rng.standard_normal((2 * Ho * Wo, 3 * k * k))
    back = fc.col2im(_to(xp, c), (2, H, W, 3), k, k, s, p)
    assert backend.get_namespace(back) is xp
    _assert_allclose(back, ref_col2im(c, shape, k, s, p))
    # <im2col(x), c> == <x, col2im(c)>
    lhs = float(xp.sum(fc.im2col(_to(xp, x), k, k, s, p) * _to(xp, c)))
    rhs = float(xp.sum(_to(xp, x) * back))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


def test_col2im_leaves_unvisited_pixels_zero(xp):
    # 6x7 with k=3, stride 2, no padding: the last row (and no column) is never read
    shape, k, s = (1, 6, 7, 1), 3, 2
    Ho, Wo = _out(6, k, s, 0), _out(7, k, s, 0)
    back = backend.to_numpy(fc.col2im(_to(xp, np.ones((Ho * Wo, k * k))), shape, k, k, s, 0))
    assert (back[0, 5, :, 0] == 0).all()
    assert (back[0, :5, :, 0] > 0).all()


@pytest.mark.parametrize("pad", [0, 1, 2])
def test_pad2d(xp, pad):
    x = _rng(pad).standard_normal((2, 3, 4, 5))
    out = fc.pad2d(_to(xp, _nhwc(x)), pad)
    _assert_allclose(out, _nhwc(_padded(x, pad)), rtol=0, atol=0)


def test_layout_conversions_round_trip(xp):
    x = _rng(9).standard_normal((2, 3, 4, 5))
    last = fc.to_channels_last(_to(xp, x))
    _assert_allclose(last, _nhwc(x), rtol=0, atol=0)
    _assert_allclose(fc.to_channels_first(last), x, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("n", "k", "s", "p", "want"),
    [(5, 3, 1, 0, 3), (5, 3, 2, 1, 3), (7, 3, 2, 0, 3), (4, 1, 2, 0, 2), (28, 3, 1, 1, 28)],
)
def test_conv_output_size(n, k, s, p, want):
    assert fc.conv_output_size(n, k, s, p) == want


# ---------------------------------------------------------------------------
# conv2d forward / backward
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    ("H", "W", "k", "s", "p"), CONV_CASES + [(4, 5, 1, 1, 1)], ids=CONV_IDS + ["H4W5k1s1p1"]
)
def test_conv2d_forward_backward_match_loops(xp, H, W, k, s, p, bias, layout):
    rng = _rng(2, H, W, k, s, p, bias)
    x = rng.standard_normal((3, 3, H, W))
    w = rng.standard_normal((4, 3, k, k))
    b = rng.standard_normal(4) if bias else None
    to = _nhwc if layout == "NHWC" else np.ascontiguousarray
    back = _nchw if layout == "NHWC" else np.ascontiguousarray
    y, cache = fc.conv2d_forward(
        _to(xp, to(x)), _to(xp, w), None if b is None else _to(xp, b), s, p, layout=layout
    )
    assert backend.get_namespace(y) is xp
    _assert_allclose(y, to(ref_conv(x, w, b, s, p)))

    gy = rng.standard_normal(tuple(back(backend.to_numpy(y)).shape))
    gx, gw, gb = fc.conv2d_backward(cache, _to(xp, to(gy)))
    rgx, rgw, rgb = ref_conv_backward(x, w, gy, s, p)
    _assert_allclose(gx, to(rgx))
    _assert_allclose(gw, rgw)
    if bias:
        _assert_allclose(gb, rgb)
    else:
        assert gb is None


@pytest.mark.parametrize("tile_bytes", [1, 700, 1 << 30], ids=["1-sample", "2-samples", "whole"])
@pytest.mark.parametrize(("k", "s", "p"), [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_conv2d_tiles_give_the_same_result(xp, monkeypatch, k, s, p, tile_bytes):
    """One sample per tile, a few, or the whole batch: the same values as the loops."""
    rng = _rng(4, k, s, p)
    x = rng.standard_normal((5, 2, 4, 4))
    w = rng.standard_normal((3, 2, k, k))
    monkeypatch.setattr(backend, "TILE_BYTES", tile_bytes)
    y, cache = fc.conv2d_forward(_to(xp, _nhwc(x)), _to(xp, w), None, s, p, layout="NHWC")
    _assert_allclose(y, _nhwc(ref_conv(x, w, None, s, p)))
    gy = rng.standard_normal(tuple(_nchw(backend.to_numpy(y)).shape))
    gx, gw, _ = fc.conv2d_backward(cache, _to(xp, _nhwc(gy)))
    rgx, rgw, _ = ref_conv_backward(x, w, gy, s, p)
    _assert_allclose(gx, _nhwc(rgx))
    _assert_allclose(gw, rgw)


@pytest.mark.parametrize(("k", "s", "p"), [(3, 1, 1), (3, 2, 1)])
def test_conv2d_and_group_norm_on_tile_threads_match_one_thread(monkeypatch, k, s, p):
    """Tiles run on two threads give bit for bit what one thread gives: every tile writes
    its own rows and per-tile partial sums are added in tile order."""
    from xpdiff.functional import norm as fn

    xp = backend.namespace_for("numpy")
    rng = _rng(11, k, s, p)
    x = _to(xp, rng.standard_normal((7, 5, 5, 4)))
    w = _to(xp, rng.standard_normal((6, 4, k, k)))
    gw_, gb_ = _to(xp, rng.standard_normal(4)), _to(xp, rng.standard_normal(4))
    monkeypatch.setattr(backend, "TILE_BYTES", 2000)  # several tiles of 1-2 samples
    out = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("XPDIFF_NUM_THREADS", threads)
        y, cache = fc.conv2d_forward(x, w, None, s, p, layout="NHWC")
        grads = fc.conv2d_backward(cache, y * 0.5)
        z, gcache = fn.group_norm_forward(x, 2, gw_, gb_, 1e-5, "NHWC", activation="silu")
        ggrads = fn.group_norm_backward(gcache, z * 0.25)
        out[threads] = [backend.to_numpy(a) for a in (y, *grads[:2], z, *ggrads)]
    for a, b in zip(out["1"], out["2"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_conv2d_rejects_an_unknown_layout(xp):
    x = xp.zeros((1, 2, 3, 3), dtype=xp.float64)
    with pytest.raises(ValueError, match=r"layout must be one of \('NCHW', 'NHWC'\), got 'HWC'"):
        fc.conv2d_forward(x, xp.zeros((1, 2, 3, 3), dtype=xp.float64), None, layout="HWC")


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
@pytest.mark.parametrize(
    ("H", "W", "kh", "kw", "s"),
    [(5, 7, 3, 3, 1), (5, 7, 3, 3, 2), (6, 4, 2, 3, 2), (4, 4, 1, 1, 1), (7, 5, 3, 1, 3)],
)
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
    # (B, H, W, C) -> (B, Ho, Wo, kh, kw, C), from a permuted (strided) view of x
    win = backend.sliding_windows(xp.permute_dims(x, (0, 2, 3, 1)), kh, kw, s)
    assert backend.get_namespace(win) is xp
    want = np.transpose(ref_windows(np.ascontiguousarray(host), kh, kw, s), (0, 2, 3, 4, 5, 1))
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


@pytest.mark.parametrize("tile_bytes", [1, 1 << 30], ids=["1-sample", "whole"])
@pytest.mark.parametrize(("N", "M"), [(5, 5), (4, 7)], ids=["self", "cross"])
def test_sdpa_matches_loops_and_keeps_no_attention_matrix(xp, monkeypatch, N, M, tile_bytes):
    from xpdiff.functional import attention as fa

    rng = _rng(7, N, M)
    B, h, d = 2, 3, 4
    q = rng.standard_normal((B, h, N, d)) * 2.0  # large scores: the max shift matters
    k = rng.standard_normal((B, h, M, d)) * 2.0
    v = rng.standard_normal((B, h, M, d))
    go = rng.standard_normal((B, h, N, d))
    scale = d**-0.5

    def tok(a):  # (B, h, N, d) -> the token-major (B, N, h, d) that sdpa takes
        return np.ascontiguousarray(np.transpose(a, (0, 2, 1, 3)))

    monkeypatch.setattr(backend, "TILE_BYTES", tile_bytes)
    o, cache = fa.sdpa_forward(_to(xp, tok(q)), _to(xp, tok(k)), _to(xp, tok(v)), scale)
    ro, rgq, rgk, rgv = ref_sdpa(q, k, v, go, scale)
    _assert_allclose(o, tok(ro))
    # the cache holds (B, h, N, 1) row statistics, never the (B, h, N, M) probabilities
    shapes = [tuple(a.shape) for a in vars(cache).values() if hasattr(a, "shape")]
    assert (B, h, N, M) not in shapes, shapes
    gq, gk, gv = fa.sdpa_backward(cache, _to(xp, tok(go)))
    _assert_allclose(gq, tok(rgq))
    _assert_allclose(gk, tok(rgk))
    _assert_allclose(gv, tok(rgv))
