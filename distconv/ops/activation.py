"""Element-wise activations on xp arrays (any shape)."""
from __future__ import annotations

from ..backend import array_module
from ._gpu import gpu_impl


def relu_forward(x, out=None):
    """y = max(x, 0), same shape and dtype as x (NaN propagates, like PyTorch).

    ``out`` may be given (it may be ``x`` itself for an in-place ReLU).
    """
    _g = gpu_impl("relu_forward", x)
    if _g is not None:
        return _g(x, out)
    xp = array_module(x)
    if out is None:
        out = xp.empty_like(x)
    # numpy/cupy maximum propagates NaN, as torch.relu does
    xp.maximum(x, x.dtype.type(0), out=out)
    return out


def relu_backward(dy, y, out=None):
    """dx = 0 where y <= 0 else dy (gradient 0 at 0; NaN passes dy, like PyTorch).

    dy, y: same shape (y is the forward output, or its input: the sign is the
    same) -> dx of dy's dtype. ``out`` may be ``dy`` for in-place.
    """
    _g = gpu_impl("relu_backward", dy)
    if _g is not None:
        return _g(dy, y, out)
    xp = array_module(dy)
    if out is None:
        out = xp.empty_like(dy)
    xp.multiply(dy, xp.logical_not(y <= 0), out=out)
    return out
