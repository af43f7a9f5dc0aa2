"""CUDA ReLU (``kernels/activation.cu``), in place or not."""
from __future__ import annotations

from ... import cudakernels as _ck
from ._common import _check_shape
from .twins import relu_backward_numpy, relu_forward_numpy


def _elementwise_out(cp, out, shape, dtype):
    """(array the kernel writes, final result): ``out`` itself when it is usable directly."""
    if out is None:
        r = cp.empty(shape, dtype)
        return r, r
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype == dtype and out.flags.c_contiguous:
        return out, out
    return cp.empty(shape, dtype), out


def relu_forward(x, out=None):
    """y = max(x, 0), same shape and dtype as x (NaN propagates, like PyTorch).

    ``out`` may be given (it may be ``x`` itself for an in-place ReLU).
    """
    if not _ck.is_gpu_array(x):
        return relu_forward_numpy(x, out)
    cp = _ck.cupy()
    suf = _ck.float_suffix(x.dtype)[0]
    xc = cp.ascontiguousarray(x)
    tgt, res = _elementwise_out(cp, out, x.shape, x.dtype)
    if x.size:
        _ck.launch(f"relu_forward_{suf}", x.size, (xc, tgt, x.size))
    if tgt is not res:
        res[...] = tgt
    return res


def relu_backward(dy, y, out=None):
    """dx = 0 where y <= 0 else dy (gradient 0 at 0), computed as dy * (y > 0 or NaN).

    dy, y: same shape -> dx of dy's dtype. ``out`` may be ``dy`` for in-place.
    """
    if not _ck.is_gpu_array(dy):
        return relu_backward_numpy(dy, y, out)
    cp = _ck.cupy()
    _check_shape(y, dy.shape, "y")
    suf = _ck.float_suffix(dy.dtype)[0]
    dyc = cp.ascontiguousarray(dy)
    yc = cp.ascontiguousarray(cp.asarray(y).astype(dy.dtype, copy=False))
    tgt, res = _elementwise_out(cp, out, dy.shape, dy.dtype)
    if dy.size:
        _ck.launch(f"relu_backward_{suf}", dy.size, (dyc, yc, tgt, dy.size))
    if tgt is not res:
        res[...] = tgt
    return res
