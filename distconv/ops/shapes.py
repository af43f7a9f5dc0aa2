"""Shape rules of the ops that have their own kernels, for shape-only arrays.

Each function has the name and signature of the op it stands for (the dispatch in
:func:`distconv.ops._gpu.gpu_impl` picks it when the input is a
:class:`~distconv.meta.MetaArray`) and returns MetaArrays of the shapes and dtypes the op
returns, computed with the same geometry helpers the op uses.
"""
from __future__ import annotations

import numpy as np

from ..meta import MetaArray
from .geometry import conv2d_output_hw, pool2d_output_hw
from .pool import max_pool_index_dtype


def conv2d_forward(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    ho, wo = conv2d_output_hw(x.shape[2], x.shape[3], w.shape[2:], stride, padding, dilation)
    return MetaArray((x.shape[0], w.shape[0], ho, wo), x.dtype)


def conv2d_backward_data(dy, w, x_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    return MetaArray((dy.shape[0], w.shape[1]) + tuple(int(v) for v in x_hw), dy.dtype)


def conv2d_backward_filter(x, dy, kernel_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    return MetaArray((dy.shape[1], x.shape[1]) + tuple(int(v) for v in kernel_hw), x.dtype)


def max_pool2d_forward(x, kernel, stride=None, padding=(0, 0), *, ceil_mode=False):
    ho, wo = pool2d_output_hw(x.shape[2], x.shape[3], kernel, stride, padding, ceil_mode)
    shape = (x.shape[0], x.shape[1], ho, wo)
    return MetaArray(shape, x.dtype), MetaArray(shape, max_pool_index_dtype(kernel))


def max_pool2d_backward(dy, argmax, x_shape, kernel, stride=None, padding=(0, 0), *,
                        ceil_mode=False):
    return MetaArray(x_shape, dy.dtype)


def avg_pool2d_forward(x, kernel, stride=None, padding=(0, 0), *, ceil_mode=False,
                       count_include_pad=True):
    ho, wo = pool2d_output_hw(x.shape[2], x.shape[3], kernel, stride, padding, ceil_mode)
    return MetaArray((x.shape[0], x.shape[1], ho, wo), x.dtype)


def avg_pool2d_backward(dy, x_shape, kernel, stride=None, padding=(0, 0), *, ceil_mode=False,
                        count_include_pad=True):
    return MetaArray(x_shape, dy.dtype)


def relu_forward(x, out=None):
    return out if out is not None else MetaArray(x.shape, x.dtype)


def relu_backward(dy, y, out=None):
    return out if out is not None else MetaArray(dy.shape, dy.dtype)


def bn_local_stats(x):
    N, C, H, W = x.shape
    return MetaArray((C,), np.float64), MetaArray((C,), np.float64), N * H * W


def bn_forward_apply(x, mean, invstd, weight=None, bias=None):
    return MetaArray(x.shape, x.dtype)


def bn_backward_reduce(dy, x, mean):
    C = x.shape[1]
    return MetaArray((C,), np.float64), MetaArray((C,), np.float64)


def bn_backward_apply(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    return MetaArray(dy.shape, dy.dtype)
