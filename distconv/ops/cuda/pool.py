"""CUDA max and average pooling (``kernels/pool.cu``), PyTorch's semantics as the CPU op
:mod:`distconv.ops.pool`."""
from __future__ import annotations

import numpy as np

from ... import cudakernels as _ck
from ..pool import max_pool_index_dtype
from ..geometry import pool2d_geometry
from ._common import _check_shape
from .twins import (avg_pool2d_backward_numpy, avg_pool2d_forward_numpy,
                    max_pool2d_backward_numpy, max_pool2d_forward_numpy)


def max_pool2d_forward(x, kernel, stride=None, padding=(0, 0), *, ceil_mode=False):
    """Max pooling: x (N, C, H, W) -> (y (N, C, Ho, Wo), argmax).

    argmax is the row-major kernel offset i*kw + j of the chosen element
    (uint8 when kh*kw <= 256, else int32), as the CPU op: pass it unchanged to
    :func:`max_pool2d_backward`. Padding reads as -inf; ties keep the first
    maximum; NaN propagates; a window of -inf values picks its first in-bounds
    element. ``stride`` None means ``kernel``; ``ceil_mode`` as in PyTorch.
    """
    if not _ck.is_gpu_array(x):
        return max_pool2d_forward_numpy(x, kernel, stride, padding, ceil_mode=ceil_mode)
    cp = _ck.cupy()
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = pool2d_geometry(
        x.shape, kernel, stride, padding, ceil_mode)
    suf = _ck.float_suffix(x.dtype)[0]
    adt = max_pool_index_dtype((kh, kw))
    y = cp.empty((N, C, Ho, Wo), x.dtype)
    arg = cp.zeros((N, C, Ho, Wo), adt)
    if y.size:
        a = "u8" if adt == np.uint8 else "i32"
        _ck.launch(f"max_pool2d_forward_{suf}_{a}", y.size,
                (cp.ascontiguousarray(x), y, arg, N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo))
    return y, arg


def max_pool2d_backward(dy, argmax, x_shape, kernel, stride=None, padding=(0, 0), *,
                        ceil_mode=False):
    """Gradient of max pooling: dy (N, C, Ho, Wo), argmax from :func:`max_pool2d_forward`
    -> dx (N, C, H, W) of dy's dtype (atomic-free gather on the GPU)."""
    if not _ck.is_gpu_array(dy):
        return max_pool2d_backward_numpy(dy, argmax, x_shape, kernel, stride, padding,
                                         ceil_mode=ceil_mode)
    cp = _ck.cupy()
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = pool2d_geometry(
        x_shape, kernel, stride, padding, ceil_mode)
    _check_shape(dy, (N, C, Ho, Wo), "dy")
    _check_shape(argmax, (N, C, Ho, Wo), "argmax")
    suf = _ck.float_suffix(dy.dtype)[0]
    dx = cp.empty((N, C, H, W), dy.dtype)
    if dx.size == 0:
        return dx
    arg = cp.asarray(argmax)
    if arg.dtype == np.uint8:
        a = "u8"
    else:
        a = "i32"
        arg = arg.astype(np.int32, copy=False)
    _ck.launch(f"max_pool2d_backward_{suf}_{a}", dx.size,
            (cp.ascontiguousarray(dy), cp.ascontiguousarray(arg), dx,
             N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo))
    return dx


def avg_pool2d_forward(x, kernel, stride=None, padding=(0, 0), *, ceil_mode=False,
                       count_include_pad=True):
    """Average pooling, PyTorch's ceil_mode and divisor rules: x -> y (N, C, Ho, Wo)."""
    if not _ck.is_gpu_array(x):
        return avg_pool2d_forward_numpy(x, kernel, stride, padding, ceil_mode=ceil_mode,
                                        count_include_pad=count_include_pad)
    return _avg_pool("forward", x, x.shape, kernel, stride, padding, ceil_mode,
                     count_include_pad)


def avg_pool2d_backward(dy, x_shape, kernel, stride=None, padding=(0, 0), *, ceil_mode=False,
                        count_include_pad=True):
    """Gradient of average pooling: dy (N, C, Ho, Wo) -> dx (N, C, H, W) of dy's dtype."""
    if not _ck.is_gpu_array(dy):
        return avg_pool2d_backward_numpy(dy, x_shape, kernel, stride, padding,
                                         ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    return _avg_pool("backward", dy, x_shape, kernel, stride, padding, ceil_mode,
                     count_include_pad)


def _avg_pool(direction, a, x_shape, kernel, stride, padding, ceil_mode, count_include_pad):
    """Launch ``avg_pool2d_<direction>_<f|d>`` (``kernels/pool.cu``), one thread per output
    element. ``"forward"``: ``a`` is x (N, C, H, W), returns y (N, C, Ho, Wo);
    ``"backward"``: ``a`` is dy (N, C, Ho, Wo), checked, returns dx (N, C, H, W) of
    ``x_shape``. Both kernels take (a, out, N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo,
    count_include_pad)."""
    cp = _ck.cupy()
    g = pool2d_geometry(x_shape, kernel, stride, padding, ceil_mode)
    y_shape = (g.N, g.C, g.Ho, g.Wo)
    if direction == "backward":
        _check_shape(a, y_shape, "dy")
    suf = _ck.float_suffix(a.dtype)[0]
    out = cp.empty(y_shape if direction == "forward" else (g.N, g.C, g.H, g.W), a.dtype)
    if out.size:
        _ck.launch(f"avg_pool2d_{direction}_{suf}", out.size,
                   (cp.ascontiguousarray(a), out, *g, int(bool(count_include_pad))))
    return out
