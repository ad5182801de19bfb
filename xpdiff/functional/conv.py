"""2-D convolution as matrix products over channels-last im2col column matrices.

Notation: channels-last input ``x`` is (B, H, W, C), kernel ``w`` is (O, C, kh, kw)
(PyTorch's and diffusers' layout), stride ``s`` and zero padding ``p`` on every side.
The output is (B, Ho, Wo, O) with ``Ho = (H + 2p - kh) // s + 1``
(``conv_output_size``) and likewise ``Wo``.  ``layout="NCHW"`` takes (B, C, H, W)
and returns (B, O, Ho, Wo) by permuting at entry and exit.

The column matrix ``cols`` is (B*Ho*Wo, kh*kw*C): row ``(b, oh, ow)`` holds the
kh*kw*C input values under the kernel at that output position, ordered
``(i, j, c)``.  It is a reshape of the strided window view (B, Ho, Wo, kh, kw, C)
(``backend.sliding_windows``), so every copied run is C contiguous values, and
``cols @ wm`` with ``wm`` (kh*kw*C, O) comes out already as (B, Ho, Wo, O).

The batch is processed in tiles of a few samples (``backend.tile_samples``), so each
tile's column matrix stays in the CPU cache between its copy and its product; the
products write into one preallocated output (``backend.matmul_into``).  The input
gradient needs no scatter-add: for stride 1 it is a convolution of the output gradient,
padded by ``k - 1 - p``, with the flipped kernel; for other strides ``g @ wm^T`` gives
the column gradient and each kernel offset adds one strided slice back (``col2im``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import backend

__all__ = [
    "Conv2dCache",
    "col2im",
    "conv2d_backward",
    "conv2d_forward",
    "conv_output_size",
    "im2col",
    "pad2d",
    "to_channels_first",
    "to_channels_last",
]

LAYOUTS = ("NCHW", "NHWC")


def conv_output_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length of a convolution along one axis: ``(size + 2 pad - k) // stride + 1``."""
    return (size + 2 * pad - k) // stride + 1


def _permuted_copy(x: Any, order: tuple[int, ...]) -> Any:
    """A contiguous copy of ``x`` with its axes in ``order``."""
    xp = backend.get_namespace(x)
    out = xp.empty(tuple(x.shape[i] for i in order), dtype=x.dtype, device=backend.device(x))
    out[...] = xp.permute_dims(x, order)
    return out


def to_channels_last(x: Any) -> Any:
    """(B, C, H, W) -> (B, H, W, C), as a contiguous copy."""
    return _permuted_copy(x, (0, 2, 3, 1))


def to_channels_first(x: Any) -> Any:
    """(B, H, W, C) -> (B, C, H, W), as a contiguous copy."""
    return _permuted_copy(x, (0, 3, 1, 2))


def pad2d(x: Any, pad: int) -> Any:
    """Zero-pad the two spatial axes of a channels-last ``x`` (B, H, W, C) by ``pad``."""
    if pad == 0:
        return x
    xp = backend.get_namespace(x)
    B, H, W, C = x.shape
    out = xp.zeros((B, H + 2 * pad, W + 2 * pad, C), dtype=x.dtype, device=backend.device(x))
    out[:, pad : pad + H, pad : pad + W, :] = x
    return out


def im2col(x: Any, kh: int, kw: int, stride: int = 1, pad: int = 0) -> Any:
    """Column matrix (B*Ho*Wo, kh*kw*C) of a channels-last ``x`` (B, H, W, C)."""
    xp = backend.get_namespace(x)
    B, H, W, C = x.shape
    if kh == kw == 1 and stride == 1 and pad == 0:
        return xp.reshape(x, (B * H * W, C))
    win = backend.sliding_windows(pad2d(x, pad), kh, kw, stride)
    Ho, Wo = win.shape[1], win.shape[2]
    return xp.reshape(win, (B * Ho * Wo, kh * kw * C))


def col2im(
    cols: Any, x_shape: tuple[int, ...], kh: int, kw: int, stride: int = 1, pad: int = 0
) -> Any:
    """Adjoint of ``im2col``: sum the column entries back into a (B, H, W, C) array.

    One strided slice-add per kernel offset (kh*kw of them), no scatter-add.
    """
    xp = backend.get_namespace(cols)
    B, H, W, C = x_shape
    if kh == kw == 1 and stride == 1 and pad == 0:
        return xp.reshape(cols, (B, H, W, C))
    Ho = conv_output_size(H, kh, stride, pad)
    Wo = conv_output_size(W, kw, stride, pad)
    c6 = xp.reshape(cols, (B, Ho, Wo, kh, kw, C))
    gx = xp.zeros((B, H + 2 * pad, W + 2 * pad, C), dtype=cols.dtype, device=backend.device(cols))
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + stride * (Ho - 1) + 1, stride)
            cols_ = slice(j, j + stride * (Wo - 1) + 1, stride)
            gx[:, rows, cols_, :] += c6[:, :, :, i, j, :]
    if pad:
        gx = gx[:, pad : pad + H, pad : pad + W, :]
    return gx


def _kernel_matrix(w: Any) -> Any:
    """(O, C, kh, kw) -> (kh*kw*C, O), rows ordered as the column matrix's ``(i, j, c)``."""
    xp = backend.get_namespace(w)
    O, C, kh, kw = w.shape
    return xp.reshape(xp.permute_dims(w, (2, 3, 1, 0)), (kh * kw * C, O))


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"conv2d: layout must be one of {LAYOUTS}, got {layout!r}")


def _tiled_conv(x: Any, wm: Any, kh: int, kw: int, stride: int, pad: int) -> Any:
    """Channels-last ``conv(x)`` (B, Ho, Wo, O) with kernel matrix ``wm`` (kh*kw*C, O),
    one column-matrix tile of a few samples at a time."""
    xp = backend.get_namespace(x, wm)
    B, H, W, C = x.shape
    O = wm.shape[1]
    if kh == kw == 1 and stride == 1 and pad == 0:
        return xp.reshape(xp.reshape(x, (B * H * W, C)) @ wm, (B, H, W, O))
    Ho = conv_output_size(H, kh, stride, pad)
    Wo = conv_output_size(W, kw, stride, pad)
    per = Ho * Wo
    y = xp.empty((B, Ho, Wo, O), dtype=x.dtype, device=backend.device(x))
    y2 = xp.reshape(y, (B * per, O))

    def tile(t: slice) -> None:
        cols = im2col(x[t, ...], kh, kw, stride, pad)
        backend.matmul_into(y2, slice(t.start * per, t.stop * per), cols, wm)

    n = backend.tile_samples(per * kh * kw * C, B, x)
    backend.map_tiles(tile, B, n, xp)
    return y


@dataclass
class Conv2dCache:
    """What ``conv2d_backward`` needs: the channels-last input, the kernel and the geometry."""

    x: Any  # (B, H, W, C) channels-last input
    w: Any  # (O, C, kh, kw)
    stride: int
    pad: int
    has_bias: bool
    layout: str  # layout of the caller's arrays


def conv2d_forward(
    x: Any, w: Any, b: Any | None, stride: int = 1, pad: int = 0, layout: str = "NCHW"
) -> tuple[Any, Conv2dCache]:
    """y = conv2d(x, w) + b (cross-correlation, as PyTorch's ``conv2d``).

    Args:
        x: (B, C, H, W) for ``layout="NCHW"``, (B, H, W, C) for ``"NHWC"``.
        w: (O, C, kh, kw).  b: (O,) or None.
        stride, pad: stride and zero padding on every side, in pixels.
    Returns:
        ``(y, cache)`` with y (B, O, Ho, Wo) or (B, Ho, Wo, O), in x's dtype; the cache
        keeps the (channels-last) input and the kernel, and backward rebuilds each tile's
        column matrix from them rather than keeping kh*kw copies of the input.
    Raises:
        ValueError: an unknown ``layout``.
    """
    _check_layout(layout)
    if layout == "NCHW":
        x = to_channels_last(x)
    O, _, kh, kw = w.shape
    y = _tiled_conv(x, _kernel_matrix(w), kh, kw, stride, pad)
    if b is not None:
        y += b  # y is a fresh array; broadcast over the last axis
    if layout == "NCHW":
        y = to_channels_first(y)
    return y, Conv2dCache(x, w, stride, pad, b is not None, layout)


def conv2d_backward(cache: Conv2dCache, gy: Any) -> tuple[Any, Any, Any | None]:
    """Gradients ``(gx, gw, gb)`` of ``conv2d_forward`` for the output gradient ``gy``.

    ``gy`` and ``gx`` are in the forward's layout; ``gw`` is (O, C, kh, kw), ``gb`` (O,)
    or None.  Per tile of samples: ``gw += cols^T g`` with the rebuilt column matrix, and
    for stride 1 ``gx`` = ``g`` padded by ``k - 1 - p`` convolved with the flipped,
    transposed kernel (a product with inner dimension O*kh*kw); other strides take
    ``g wm^T`` and col2im.
    """
    x, w, stride, pad = cache.x, cache.w, cache.stride, cache.pad
    xp = backend.get_namespace(gy, w)
    if cache.layout == "NCHW":
        gy = to_channels_last(gy)
    O, C, kh, kw = w.shape
    B, H, W, _ = x.shape
    _, Ho, Wo, _ = gy.shape
    per_out, per_in = Ho * Wo, H * W
    g2 = xp.reshape(gy, (B * per_out, O))
    gb = xp.sum(g2, axis=0) if cache.has_bias else None
    if kh == kw == 1 and stride == 1 and pad == 0:
        x2 = xp.reshape(x, (B * per_in, C))
        gwm = x2.T @ g2
        gx = xp.reshape(g2 @ _kernel_matrix(w).T, (B, H, W, C))
    else:
        flip = stride == 1 and kh == kw and pad <= kh - 1
        gx = xp.empty((B, H, W, C), dtype=gy.dtype, device=backend.device(gy))
        if flip:
            # (O, C, kh, kw) flipped -> rows (i, j, o), columns c
            wfm = _kernel_matrix(xp.permute_dims(xp.flip(w, axis=(2, 3)), (1, 0, 2, 3)))
            gx2 = xp.reshape(gx, (B * per_in, C))
        else:
            wmT = _kernel_matrix(w).T

        def tile(t: slice) -> Any:
            """Write this tile's input gradient; return its share of the weight gradient."""
            nt = t.stop - t.start
            cols = im2col(x[t, ...], kh, kw, stride, pad)
            g_t = g2[t.start * per_out : t.stop * per_out, :]
            if flip:
                gcols = im2col(gy[t, ...], kh, kw, 1, kh - 1 - pad)
                backend.matmul_into(gx2, slice(t.start * per_in, t.stop * per_in), gcols, wfm)
            else:
                gx[t, ...] = col2im(g_t @ wmT, (nt, H, W, C), kh, kw, stride, pad)
            return cols.T @ g_t

        per_sample = per_out * kh * kw * C + per_in * kh * kw * O
        parts = backend.map_tiles(tile, B, backend.tile_samples(per_sample, B, x), xp)
        gwm = parts[0]
        for part in parts[1:]:  # in tile order: the same sum on every schedule
            gwm += part
    gw = xp.permute_dims(xp.reshape(gwm, (kh, kw, C, O)), (3, 2, 0, 1))
    if cache.layout == "NCHW":
        gx = to_channels_first(gx)
    return gx, gw, gb
