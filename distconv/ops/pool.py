"""Local 2-D pooling (max, average, adaptive average, global average) on NCHW xp arrays.

Semantics follow PyTorch:

* max pooling pads with -inf and, on ties, keeps the first maximum in window
  order (row-major over the kernel), so gradients go to the same element as in
  PyTorch; NaN propagates; a window whose in-bounds values are all -inf picks
  its first in-bounds element (PyTorch's initial index), never the padding.
* ``ceil_mode=True`` rounds the output size up, except that the last window
  must start inside the input or the left padding (PyTorch's rule:
  ``Ho = ceil((H + 2p - k) / s) + 1``, minus one when ``(Ho-1)*s >= H + p``).
  Those last windows may reach past the right padding; the part beyond it is
  ignored (-inf for max, not counted for average).
* average pooling divides by the window clipped to the padded input
  (``count_include_pad=True``: kh*kw except for windows clipped by ceil mode)
  or by the number of in-bounds elements (``count_include_pad=False``).
* adaptive average pooling uses PyTorch's bins ``start = floor(i*H/Ho)``,
  ``end = ceil((i+1)*H/Ho)`` for any output size, larger than the input too.

All loops are over kernel offsets only (kh*kw iterations of whole-array
strided operations), never over samples, channels or pixels.

GPU: CuPy arrays go to the CUDA kernels of :mod:`distconv.ops.cuda` (max and
average pooling, every mode above; adaptive pooling is two small GEMMs and
runs as array-module code on either).
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from ._gpu import gpu_impl
from .geometry import pair, pool2d_geometry
from .geometry import pool2d_output_hw, pool_output_size  # noqa: F401  (ops.pool's names)


def _padded_hw(H, W, kh, kw, sh, sw, ph, pw, Ho, Wo):
    """Size of the padded buffer every window fits in (ceil-mode windows may pass H + 2p)."""
    return (max(H + 2 * ph, (Ho - 1) * sh + kh), max(W + 2 * pw, (Wo - 1) * sw + kw))


def _window(a, i, j, sh, sw, Ho, Wo):
    """The (N, C, Ho, Wo) strided slice of ``a`` read by kernel offset (i, j)."""
    return a[:, :, i:i + sh * (Ho - 1) + 1:sh, j:j + sw * (Wo - 1) + 1:sw]


def _divisor_1d(n, k, s, p, out, count_include_pad):
    """Per-window divisor along one dimension (int64 numpy array of length ``out``)."""
    start = np.arange(out, dtype=np.int64) * s - p
    end = np.minimum(start + k, n + p)
    if count_include_pad:
        return end - start
    return np.minimum(end, n) - np.maximum(start, 0)


def avg_pool2d_divisor(x_shape, kernel, stride=None, padding=0, ceil_mode=False,
                       count_include_pad=True):
    """(Ho, Wo) float64 NumPy array: the divisor of each output of :func:`avg_pool2d_forward`.

    PyTorch's rule: the window clipped to the padded input, ``(min(hs+kh, H+ph) - hs) *
    (min(ws+kw, W+pw) - ws)`` with ``hs = ho*sh - ph``; with ``count_include_pad=False``
    the window clipped to the input itself.
    """
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = pool2d_geometry(
        x_shape, kernel, stride, padding, ceil_mode)
    dh = _divisor_1d(H, kh, sh, ph, Ho, count_include_pad)
    dw = _divisor_1d(W, kw, sw, pw, Wo, count_include_pad)
    return np.multiply.outer(dh, dw).astype(np.float64)


def max_pool_index_dtype(kernel):
    """dtype of max pooling's argmax: uint8 when the kernel has <= 256 elements, else int32."""
    kh, kw = pair(kernel, "kernel")
    return np.dtype(np.uint8 if kh * kw <= 256 else np.int32)


def max_pool2d_forward(x, kernel, stride=None, padding=(0, 0), *, ceil_mode=False):
    """Max pooling.

    x: (N, C, H, W) -> (y, argmax): y (N, C, Ho, Wo) of x's dtype and argmax
    (N, C, Ho, Wo) integer (uint8 when kh*kw <= 256, else int32), the
    row-major kernel offset ``i*kw + j`` of the chosen element in each window
    (pass it unchanged to :func:`max_pool2d_backward`, with the same
    ``ceil_mode``). ``stride`` None means ``kernel``.
    """
    _g = gpu_impl("max_pool2d_forward", x)
    if _g is not None:
        return _g(x, kernel, stride, padding, ceil_mode=ceil_mode)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = pool2d_geometry(
        x.shape, kernel, stride, padding, ceil_mode)
    xp = array_module(x)
    idt = max_pool_index_dtype((kh, kw)).type
    y = xp.empty((N, C, Ho, Wo), x.dtype)
    arg = xp.zeros((N, C, Ho, Wo), idt)
    if y.size == 0:
        return y, arg
    Hp, Wp = _padded_hw(H, W, kh, kw, sh, sw, ph, pw, Ho, Wo)
    if (Hp, Wp) != (H, W):
        xpad = xp.full((N, C, Hp, Wp), -np.inf, x.dtype)
        xpad[:, :, ph:ph + H, pw:pw + W] = x
    else:
        xpad = x
    # PyTorch starts each window at -inf with the index of its first in-bounds element,
    # so a window of -inf values sends its gradient there, never into the padding
    i0 = np.maximum(ph - np.arange(Ho, dtype=np.int64) * sh, 0)
    j0 = np.maximum(pw - np.arange(Wo, dtype=np.int64) * sw, 0)
    arg[...] = xp.asarray((i0[:, None] * kw + j0[None, :]).astype(idt))
    y.fill(-np.inf)
    mask = xp.empty((N, C, Ho, Wo), bool)
    for i in range(kh):
        for j in range(kw):
            v = _window(xpad, i, j, sh, sw, Ho, Wo)
            # PyTorch: take v when v > current max or v is NaN
            xp.greater(v, y, out=mask)
            mask |= xp.isnan(v)
            xp.copyto(y, v, where=mask)
            xp.copyto(arg, idt(i * kw + j), where=mask)
    return y, arg


def max_pool2d_backward(dy, argmax, x_shape, kernel, stride=None, padding=(0, 0), *,
                        ceil_mode=False):
    """Gradient of max pooling.

    dy: (N, C, Ho, Wo); argmax from :func:`max_pool2d_forward`; x_shape =
    (N, C, H, W) -> dx: (N, C, H, W) of dy's dtype.
    """
    _g = gpu_impl("max_pool2d_backward", dy)
    if _g is not None:
        return _g(dy, argmax, x_shape, kernel, stride, padding, ceil_mode=ceil_mode)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = pool2d_geometry(
        x_shape, kernel, stride, padding, ceil_mode)
    xp = array_module(dy)
    if tuple(dy.shape) != (N, C, Ho, Wo) or tuple(argmax.shape) != (N, C, Ho, Wo):
        raise ValueError(f"dy {tuple(dy.shape)} and argmax {tuple(argmax.shape)} must have the "
                         f"pooled shape {(N, C, Ho, Wo)}")
    Hp, Wp = _padded_hw(H, W, kh, kw, sh, sw, ph, pw, Ho, Wo)
    dxp = xp.zeros((N, C, Hp, Wp), dy.dtype)
    if dy.size == 0 or N * C * H * W == 0:
        return xp.zeros((N, C, H, W), dy.dtype)
    tmp = xp.empty_like(dy)
    for i in range(kh):
        for j in range(kw):
            # windows of one offset never overlap each other, so slice += is exact
            xp.multiply(dy, argmax == (i * kw + j), out=tmp)
            _window(dxp, i, j, sh, sw, Ho, Wo)[...] += tmp
    if (Hp, Wp) != (H, W):
        return xp.ascontiguousarray(dxp[:, :, ph:ph + H, pw:pw + W])
    return dxp


def avg_pool2d_forward(x, kernel, stride=None, padding=(0, 0), *, ceil_mode=False,
                       count_include_pad=True):
    """Average pooling, PyTorch's divisor rules (see :func:`avg_pool2d_divisor`).

    x: (N, C, H, W) -> y: (N, C, Ho, Wo) of x's dtype.
    """
    _g = gpu_impl("avg_pool2d_forward", x)
    if _g is not None:
        return _g(x, kernel, stride, padding, ceil_mode=ceil_mode,
                  count_include_pad=count_include_pad)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = pool2d_geometry(
        x.shape, kernel, stride, padding, ceil_mode)
    div = avg_pool2d_divisor(x.shape, kernel, stride, padding, ceil_mode, count_include_pad)
    uniform = bool((div == kh * kw).all())
    xp = array_module(x)
    y = xp.zeros((N, C, Ho, Wo), x.dtype)
    if y.size == 0:
        return y
    Hp, Wp = _padded_hw(H, W, kh, kw, sh, sw, ph, pw, Ho, Wo)
    if (Hp, Wp) != (H, W):
        xpad = xp.zeros((N, C, Hp, Wp), x.dtype)
        xpad[:, :, ph:ph + H, pw:pw + W] = x
    else:
        xpad = x
    for i in range(kh):
        for j in range(kw):
            y += _window(xpad, i, j, sh, sw, Ho, Wo)
    if uniform:
        y *= x.dtype.type(1.0 / (kh * kw))
    else:
        y /= xp.asarray(div.astype(x.dtype))
    return y


def avg_pool2d_backward(dy, x_shape, kernel, stride=None, padding=(0, 0), *, ceil_mode=False,
                        count_include_pad=True):
    """Gradient of average pooling.

    dy: (N, C, Ho, Wo); x_shape = (N, C, H, W) -> dx: (N, C, H, W) of dy's dtype.
    """
    _g = gpu_impl("avg_pool2d_backward", dy)
    if _g is not None:
        return _g(dy, x_shape, kernel, stride, padding, ceil_mode=ceil_mode,
                  count_include_pad=count_include_pad)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = pool2d_geometry(
        x_shape, kernel, stride, padding, ceil_mode)
    div = avg_pool2d_divisor(x_shape, kernel, stride, padding, ceil_mode, count_include_pad)
    uniform = bool((div == kh * kw).all())
    xp = array_module(dy)
    if tuple(dy.shape) != (N, C, Ho, Wo):
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected {(N, C, Ho, Wo)}")
    Hp, Wp = _padded_hw(H, W, kh, kw, sh, sw, ph, pw, Ho, Wo)
    dxp = xp.zeros((N, C, Hp, Wp), dy.dtype)
    if dy.size == 0 or N * C * H * W == 0:
        return xp.zeros((N, C, H, W), dy.dtype)
    if uniform:
        g = dy * dy.dtype.type(1.0 / (kh * kw))
    else:
        g = dy / xp.asarray(div.astype(dy.dtype))
    for i in range(kh):
        for j in range(kw):
            _window(dxp, i, j, sh, sw, Ho, Wo)[...] += g
    if (Hp, Wp) != (H, W):
        return xp.ascontiguousarray(dxp[:, :, ph:ph + H, pw:pw + W])
    return dxp


# ------------------------------------------------------------ adaptive average
def _adaptive_size(output_size, H, W):
    if isinstance(output_size, (int, np.integer)) or output_size is None:
        output_size = (output_size, output_size)
    try:
        oh, ow = output_size
    except (TypeError, ValueError):
        raise ValueError(f"output_size must be an int, None or a pair, got {output_size!r}") \
            from None
    oh = H if oh is None else int(oh)
    ow = W if ow is None else int(ow)
    if oh < 1 or ow < 1:
        raise ValueError(f"adaptive pooling output size must be >= 1, got {(oh, ow)}")
    return oh, ow


def adaptive_pool_bins(n, out):
    """PyTorch's adaptive pooling bins along one dimension of length ``n``:
    (start, end) int64 NumPy arrays of length ``out``, ``start[i] = floor(i*n/out)``,
    ``end[i] = ceil((i+1)*n/out)``."""
    i = np.arange(out, dtype=np.int64)
    return (i * n) // out, -((-(i + 1) * n) // out)


def _adaptive_matrix(n, out):
    """(out, n) float64 averaging matrix: row i has 1/len over bin i."""
    start, end = adaptive_pool_bins(n, out)
    idx = np.arange(n, dtype=np.int64)
    inside = (idx[None, :] >= start[:, None]) & (idx[None, :] < end[:, None])
    length = (end - start).astype(np.float64)
    if n and (length < 1).any():  # cannot happen for n >= 1; guards the division
        raise ValueError(f"empty adaptive pooling bin for input {n}, output {out}")
    return inside / np.maximum(length, 1)[:, None]


def adaptive_avg_pool2d_output_hw(h, w, output_size):
    """Output (Ho, Wo) of :func:`adaptive_avg_pool2d_forward` (None entries keep h or w)."""
    return _adaptive_size(output_size, h, w)


def adaptive_avg_pool2d_forward(x, output_size):
    """Adaptive average pooling, PyTorch's bins (:func:`adaptive_pool_bins`).

    x: (N, C, H, W) -> y: (N, C, Ho, Wo) of x's dtype; ``output_size`` an int,
    a pair, or a pair with None for "the input's size". Computed as
    ``Ah @ x @ Aw^T`` with the per-dimension averaging matrices (each output is
    the mean over its bin in H, then in W, which is the mean over the 2-D bin).
    """
    if x.ndim != 4:
        raise ValueError(f"x must be NCHW (4-D), got shape {tuple(x.shape)}")
    xp = array_module(x)
    N, C, H, W = (int(s) for s in x.shape)
    Ho, Wo = _adaptive_size(output_size, H, W)
    if H * W == 0:
        raise ValueError(f"adaptive average pooling of an empty image: input {tuple(x.shape)}")
    if N * C == 0:
        return xp.zeros((N, C, Ho, Wo), x.dtype)
    ah = xp.asarray(_adaptive_matrix(H, Ho).astype(x.dtype))
    aw = xp.asarray(_adaptive_matrix(W, Wo).T.astype(x.dtype))
    t = xp.matmul(x, aw)                   # (N, C, H, Wo)
    return xp.ascontiguousarray(xp.matmul(ah, t))  # (N, C, Ho, Wo)


def adaptive_avg_pool2d_backward(dy, x_shape, output_size=None):
    """Gradient of :func:`adaptive_avg_pool2d_forward`: dy (N, C, Ho, Wo) -> dx (N, C, H, W).

    ``output_size`` defaults to dy's spatial size; if given it must agree with it.
    """
    xp = array_module(dy)
    N, C, H, W = (int(s) for s in x_shape)
    Ho, Wo = (int(dy.shape[2]), int(dy.shape[3])) if output_size is None else \
        _adaptive_size(output_size, H, W)
    if tuple(dy.shape) != (N, C, Ho, Wo):
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected {(N, C, Ho, Wo)}")
    if H * W == 0:
        raise ValueError(f"adaptive average pooling of an empty image: input {tuple(x_shape)}")
    if N * C == 0:
        return xp.zeros((N, C, H, W), dy.dtype)
    ah = xp.asarray(_adaptive_matrix(H, Ho).T.astype(dy.dtype))  # (H, Ho)
    aw = xp.asarray(_adaptive_matrix(W, Wo).astype(dy.dtype))    # (Wo, W)
    return xp.ascontiguousarray(xp.matmul(ah, xp.matmul(dy, aw)))


def global_avg_pool_forward(x):
    """Mean over H and W: x (N, C, H, W) -> (N, C, 1, 1) of x's dtype."""
    xp = array_module(x)
    N, C, H, W = x.shape
    if H * W == 0:
        raise ValueError(f"global average pooling of an empty image: input {tuple(x.shape)}")
    if N * C == 0:
        return xp.zeros((N, C, 1, 1), x.dtype)
    return x.mean(axis=(2, 3), keepdims=True, dtype=x.dtype)


def global_avg_pool_backward(dy, x_shape):
    """Gradient of global average pooling: dy (N, C, 1, 1) -> dx (N, C, H, W) of dy's dtype."""
    xp = array_module(dy)
    N, C, H, W = (int(s) for s in x_shape)
    dx = xp.empty((N, C, H, W), dy.dtype)
    if dx.size == 0:
        return dx
    xp.multiply(dy.reshape(N, C, 1, 1), dy.dtype.type(1.0 / (H * W)), out=dx)
    return dx
