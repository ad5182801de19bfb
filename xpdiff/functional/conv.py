"""2-D convolution as one matrix product over an im2col column matrix.

Notation: input ``x`` is (B, C, H, W), kernel ``w`` is (O, C, kh, kw), stride
``s`` and zero padding ``p`` on every side.  The output is (B, O, Ho, Wo) with
``Ho = (H + 2p - kh) // s + 1`` (``conv_output_size``) and likewise ``Wo``.

The column matrix ``cols`` is (C*kh*kw, B*Ho*Wo): row ``(c, i, j)`` holds input
channel ``c`` shifted by kernel offset ``(i, j)``.  It is built from a strided
window view (``backend.sliding_windows``) with one copy, so the forward is
``w.reshape(O, C*kh*kw) @ cols``; backward rebuilds ``cols`` from the cached
input for the weight gradient.  The input gradient needs no scatter-add: for
stride 1 it is a convolution of the output gradient with the flipped kernel;
for other strides ``w^T @ g`` gives the column gradient and each of the kh*kw
kernel offsets adds one strided slice back (col2im as a kh*kw slice loop).
"""

from __future__ import annotations

from typing import Any

from .. import backend

__all__ = [
    "col2im",
    "conv2d_backward",
    "conv2d_forward",
    "conv_output_size",
    "im2col",
    "pad2d",
]


def conv_output_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length of a convolution along one axis: ``(size + 2 pad - k) // stride + 1``."""
    return (size + 2 * pad - k) // stride + 1


def pad2d(x: Any, pad: int) -> Any:
    """Zero-pad the last two axes of ``x`` by ``pad`` on every side."""
    if pad == 0:
        return x
    xp = backend.get_namespace(x)
    *lead, H, W = x.shape
    out = xp.zeros((*lead, H + 2 * pad, W + 2 * pad), dtype=x.dtype, device=backend.device(x))
    out[..., pad : pad + H, pad : pad + W] = x
    return out


def im2col(x: Any, kh: int, kw: int, stride: int = 1, pad: int = 0) -> Any:
    """Column matrix (C*kh*kw, B*Ho*Wo) of ``x`` (B, C, H, W)."""
    xp = backend.get_namespace(x)
    B, C, H, W = x.shape
    if kh == kw == 1 and stride == 1 and pad == 0:
        return xp.reshape(xp.permute_dims(x, (1, 0, 2, 3)), (C, B * H * W))
    win = backend.sliding_windows(pad2d(x, pad), kh, kw, stride)  # (B, C, Ho, Wo, kh, kw)
    Ho, Wo = win.shape[2], win.shape[3]
    return xp.reshape(xp.permute_dims(win, (1, 4, 5, 0, 2, 3)), (C * kh * kw, B * Ho * Wo))


def col2im(
    cols: Any, x_shape: tuple[int, ...], kh: int, kw: int, stride: int = 1, pad: int = 0
) -> Any:
    """Adjoint of ``im2col``: sum column entries back into a (B, C, H, W) array."""
    xp = backend.get_namespace(cols)
    B, C, H, W = x_shape
    if kh == kw == 1 and stride == 1 and pad == 0:
        return xp.permute_dims(xp.reshape(cols, (C, B, H, W)), (1, 0, 2, 3))
    Ho = conv_output_size(H, kh, stride, pad)
    Wo = conv_output_size(W, kw, stride, pad)
    c6 = xp.reshape(cols, (C, kh, kw, B, Ho, Wo))
    # accumulate in (C, B, H, W) order, which matches the column layout, then permute once
    gx = xp.zeros((C, B, H + 2 * pad, W + 2 * pad), dtype=cols.dtype, device=backend.device(cols))
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + stride * (Ho - 1) + 1, stride)
            cols_ = slice(j, j + stride * (Wo - 1) + 1, stride)
            gx[:, :, rows, cols_] += c6[:, i, j, ...]
    if pad:
        gx = gx[:, :, pad : pad + H, pad : pad + W]
    gx = xp.permute_dims(gx, (1, 0, 2, 3))
    return gx


def conv2d_forward(
    x: Any, w: Any, b: Any | None, stride: int = 1, pad: int = 0
) -> tuple[Any, tuple]:
    """y = conv2d(x, w) + b.

    Args:
        x: (B, C, H, W).  w: (O, C, kh, kw).  b: (O,) or None.
    Returns:
        ``(y, cache)`` with y (B, O, Ho, Wo); cache holds ``x``, ``w`` and the
        input shape.  Backward rebuilds the column matrix from ``x``: keeping the
        columns (kh*kw times the size of ``x``) instead measured slower here
        (0.83 vs 0.74 s per flagship training step) besides costing the memory.
    """
    xp = backend.get_namespace(x, w)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho = conv_output_size(H, kh, stride, pad)
    Wo = conv_output_size(W, kw, stride, pad)
    cols = im2col(x, kh, kw, stride, pad)
    y = xp.reshape(w, (O, C * kh * kw)) @ cols
    if b is not None:
        y += b[:, None]         # y is the fresh product
    y = xp.permute_dims(xp.reshape(y, (O, B, Ho, Wo)), (1, 0, 2, 3))
    return y, (x, w, stride, pad, b is not None)


def conv2d_backward(cache: tuple, gy: Any) -> tuple[Any, Any, Any | None]:
    """Gradients ``(gx, gw, gb)`` of ``conv2d_forward`` for output gradient ``gy`` (B, O, Ho, Wo).

    ``gw = g @ cols^T`` with the rebuilt column matrix.  For stride 1 the input
    gradient is itself a convolution: ``gy`` padded by ``k - 1 - p`` convolved with the
    flipped, transposed kernel (C, O, kh, kw), a product whose inner dimension is
    O*kh*kw; that measured 1.2-2.9x faster here than ``w^T @ g`` (inner dimension O)
    followed by col2im.  Strided convolutions use ``w^T @ g`` and col2im.
    """
    x, w, stride, pad, has_bias = cache
    xp = backend.get_namespace(gy, w)
    O, C, kh, kw = w.shape
    B, _, Ho, Wo = gy.shape
    x_shape = tuple(x.shape)
    gT = xp.permute_dims(gy, (1, 0, 2, 3))
    gb = xp.sum(gy, axis=(0, 2, 3)) if has_bias else None
    g = xp.reshape(gT, (O, B * Ho * Wo))
    gw = xp.reshape(g @ im2col(x, kh, kw, stride, pad).T, w.shape)
    if stride == 1 and pad <= kh - 1 and pad <= kw - 1 and kh == kw:
        wt = xp.permute_dims(xp.flip(w, axis=(2, 3)), (1, 0, 2, 3))
        gx, _ = conv2d_forward(gy, wt, None, 1, kh - 1 - pad)
    else:
        gcols = xp.reshape(w, (O, C * kh * kw)).T @ g
        gx = col2im(gcols, x_shape, kh, kw, stride, pad)
    return gx, gw, gb
