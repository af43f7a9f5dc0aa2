"""Local 2-D pooling (max, average, global average) on NCHW xp arrays.

Semantics follow PyTorch with ``ceil_mode=False``: max pooling pads with -inf
and, on ties, keeps the first maximum in window order (row-major over the
kernel), so gradients go to the same element as in PyTorch; average pooling
counts padded zeros (``count_include_pad=True``), so the divisor is kh*kw.

All loops are over kernel offsets only (kh*kw iterations of whole-array
strided operations), never over samples, channels or pixels.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from .conv import _pair, conv2d_output_hw
from ._gpu import gpu_impl


def _pool_geom(x_shape, kernel, stride, padding):
    kh, kw = _pair(kernel, "kernel")
    sh, sw = _pair(kernel if stride is None else stride, "stride")
    ph, pw = _pair(padding, "padding")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"pad should be at most half of the kernel size, got padding {(ph, pw)} "
                         f"for kernel {(kh, kw)}")
    N, C, H, W = (int(s) for s in x_shape)
    Ho, Wo = conv2d_output_hw(H, W, (kh, kw), (sh, sw), (ph, pw), (1, 1))
    return N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo


def _window(a, i, j, sh, sw, Ho, Wo):
    """The (N, C, Ho, Wo) strided slice of ``a`` read by kernel offset (i, j)."""
    return a[:, :, i:i + sh * (Ho - 1) + 1:sh, j:j + sw * (Wo - 1) + 1:sw]


def max_pool2d_forward(x, kernel, stride=None, padding=(0, 0)):
    """Max pooling.

    x: (N, C, H, W) -> (y, argmax): y (N, C, Ho, Wo) of x's dtype and argmax
    (N, C, Ho, Wo) integer, the row-major kernel offset ``i*kw + j`` of the
    chosen element in each window (pass it unchanged to
    :func:`max_pool2d_backward`). ``stride`` None means ``kernel``.
    """
    _g = gpu_impl("max_pool2d_forward", x)
    if _g is not None:
        return _g(x, kernel, stride, padding)
    xp = array_module(x)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = _pool_geom(x.shape, kernel, stride, padding)
    idt = np.uint8 if kh * kw <= 256 else np.int32
    y = xp.empty((N, C, Ho, Wo), x.dtype)
    arg = xp.zeros((N, C, Ho, Wo), idt)
    if y.size == 0:
        return y, arg
    if ph or pw:
        xpad = xp.full((N, C, H + 2 * ph, W + 2 * pw), -np.inf, x.dtype)
        xpad[:, :, ph:ph + H, pw:pw + W] = x
    else:
        xpad = x
    mask = xp.empty((N, C, Ho, Wo), bool)
    first = True
    for i in range(kh):
        for j in range(kw):
            v = _window(xpad, i, j, sh, sw, Ho, Wo)
            if first:
                xp.copyto(y, v)
                first = False
                continue
            # PyTorch: take v when v > current max or v is NaN
            xp.greater(v, y, out=mask)
            mask |= xp.isnan(v)
            xp.copyto(y, v, where=mask)
            xp.copyto(arg, idt(i * kw + j), where=mask)
    return y, arg


def max_pool2d_backward(dy, argmax, x_shape, kernel, stride=None, padding=(0, 0)):
    """Gradient of max pooling.

    dy: (N, C, Ho, Wo); argmax from :func:`max_pool2d_forward`; x_shape =
    (N, C, H, W) -> dx: (N, C, H, W) of dy's dtype.
    """
    _g = gpu_impl("max_pool2d_backward", dy)
    if _g is not None:
        return _g(dy, argmax, x_shape, kernel, stride, padding)
    xp = array_module(dy)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = _pool_geom(x_shape, kernel, stride, padding)
    dxp = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), dy.dtype)
    if dy.size == 0 or dxp.size == 0:
        return xp.zeros((N, C, H, W), dy.dtype)
    tmp = xp.empty_like(dy)
    for i in range(kh):
        for j in range(kw):
            # windows of one offset never overlap each other, so slice += is exact
            xp.multiply(dy, argmax == (i * kw + j), out=tmp)
            _window(dxp, i, j, sh, sw, Ho, Wo)[...] += tmp
    if ph or pw:
        return xp.ascontiguousarray(dxp[:, :, ph:ph + H, pw:pw + W])
    return dxp


def avg_pool2d_forward(x, kernel, stride=None, padding=(0, 0)):
    """Average pooling (count_include_pad=True, ceil_mode=False).

    x: (N, C, H, W) -> y: (N, C, Ho, Wo) of x's dtype.
    """
    _g = gpu_impl("avg_pool2d_forward", x)
    if _g is not None:
        return _g(x, kernel, stride, padding)
    xp = array_module(x)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = _pool_geom(x.shape, kernel, stride, padding)
    y = xp.zeros((N, C, Ho, Wo), x.dtype)
    if y.size == 0:
        return y
    if ph or pw:
        xpad = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), x.dtype)
        xpad[:, :, ph:ph + H, pw:pw + W] = x
    else:
        xpad = x
    for i in range(kh):
        for j in range(kw):
            y += _window(xpad, i, j, sh, sw, Ho, Wo)
    y *= x.dtype.type(1.0 / (kh * kw))
    return y


def avg_pool2d_backward(dy, x_shape, kernel, stride=None, padding=(0, 0)):
    """Gradient of average pooling.

    dy: (N, C, Ho, Wo); x_shape = (N, C, H, W) -> dx: (N, C, H, W) of dy's dtype.
    """
    _g = gpu_impl("avg_pool2d_backward", dy)
    if _g is not None:
        return _g(dy, x_shape, kernel, stride, padding)
    xp = array_module(dy)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = _pool_geom(x_shape, kernel, stride, padding)
    dxp = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), dy.dtype)
    if dy.size == 0 or dxp.size == 0:
        return xp.zeros((N, C, H, W), dy.dtype)
    g = dy * dy.dtype.type(1.0 / (kh * kw))
    for i in range(kh):
        for j in range(kw):
            _window(dxp, i, j, sh, sw, Ho, Wo)[...] += g
    if ph or pw:
        return xp.ascontiguousarray(dxp[:, :, ph:ph + H, pw:pw + W])
    return dxp


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
