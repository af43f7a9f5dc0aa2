"""Max and average pooling of NCHW activations whose H and W are split over grid axes.

The pooling twin of :func:`distconv.spatial.conv2d`: each rank pools its block of the
output (Ho/Wo split by the floor+1 rule over ``x``'s H/W axes) from its halo window,
gathered by :func:`distconv.spatial.halo_gather`'s exchange with ``-inf`` (max) or zero
(average) padding; the average divides by the rank's block of the global divisor, so
every PyTorch mode (ceil mode, ``count_include_pad``) holds. Backward is the local
pooling backward on the window, then the adjoint exchange.
"""
from __future__ import annotations

from . import autograd, halo, ops
from .backend import array_module
from .distribution import Distribution
from .spatial import _check_windows, _gather
from .tensor import DistTensor


def _pool_setup(x, kernel, stride, padding, ceil_mode, what):
    """Checked geometry, windows and output layout of a pooling of ``x``."""
    if not isinstance(x, DistTensor) or x.ndim != 4:
        raise ValueError(f"{what}: x must be a 4-D (N, C, H, W) DistTensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    k = halo.pair(kernel, "kernel_size")
    s = k if stride is None else halo.pair(stride, "stride")
    p = halo.pair(padding, "padding")
    ho, wo = ops.pool2d_output_hw(x.shape[2], x.shape[3], k, s, p, ceil_mode)
    dist = x.distribution
    wins = {2 + i: halo.windows(x.shape[2 + i], dist.parts(2 + i), k[i], s[i], p[i], 1,
                                n_out=n_out)
            for i, n_out in enumerate((ho, wo))}
    y_dist = Distribution(dist.grid, dist.split)
    y_shape = (x.shape[0], x.shape[1], ho, wo)
    return k, s, p, wins, y_dist, y_shape


def max_pool2d(x: DistTensor, kernel_size, stride=None, padding=0,
               ceil_mode: bool = False) -> DistTensor:
    """Max pooling (PyTorch's ``F.max_pool2d``) of a spatially split ``x``.

    x: DistTensor (N, C, H, W), N and C split any way, H and W over at most one grid axis
    each. Returns (N, C, Ho, Wo) split like ``x``, Ho/Wo in floor+1 blocks. The window is
    gathered with ``-inf`` padding (ceil-mode windows that pass the right padding read
    ``-inf`` there, as PyTorch ignores them). One difference from PyTorch, for inputs
    holding ``-inf`` only: a window whose values are all ``-inf`` may send its (zero
    contribution) gradient to a padding position instead of its first in-bounds element.
    """
    x = _no_pending(x, "max_pool2d")
    y, core = max_pool2d_core(x, kernel_size, stride, padding, ceil_mode)
    autograd.record("max_pool2d_spatial", lambda dy, needs: (core(dy),), [x], y)
    return y


def avg_pool2d(x: DistTensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True) -> DistTensor:
    """Average pooling (PyTorch's ``F.avg_pool2d``, its divisor rules) of a spatially split
    ``x``; layouts as :func:`max_pool2d`. Each rank sums its zero-padded window and divides
    by its block of the global divisor (:func:`distconv.ops.avg_pool2d_divisor`), so
    ``count_include_pad=False`` and ceil mode divide exactly as on one rank."""
    x = _no_pending(x, "avg_pool2d")
    y, core = avg_pool2d_core(x, kernel_size, stride, padding, ceil_mode, count_include_pad)
    autograd.record("avg_pool2d_spatial", lambda dy, needs: (core(dy),), [x], y)
    return y


def _no_pending(x, what):
    if not isinstance(x, DistTensor) or x.ndim != 4:
        raise ValueError(f"{what}: x must be a 4-D (N, C, H, W) DistTensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if x.distribution.pending:
        x = x.redistribute(x.distribution.replace(pending=()))
    return x


def max_pool2d_core(x: DistTensor, kernel_size, stride=None, padding=0, ceil_mode=False):
    """The unrecorded :func:`max_pool2d` (``x`` without pending sums): ``y`` and
    ``backward(dy) -> dx`` (in ``x``'s layout, halo parts added back into their owners)."""
    k, s, _, wins, y_dist, y_shape = _pool_setup(x, kernel_size, stride, padding, ceil_mode,
                                                 "max_pool2d")
    xw, adjoint = _gather(x, _check_windows(x, wins), -float("inf"))
    want = y_dist.local_shape(y_shape)
    xp = array_module(xw.local)
    live = all(want) and all(xw.local.shape)
    if live:
        y_local, arg = ops.max_pool2d_forward(xw.local, k, s, (0, 0))
    else:
        y_local, arg = xp.zeros(want, x.dtype), None
    y = DistTensor(y_local, y_dist, y_shape)
    win_shape = tuple(xw.local.shape)

    def backward(dy):
        dy = dy._move(y_dist)
        dxw = (ops.max_pool2d_backward(dy.local, arg, win_shape, k, s, (0, 0)) if live
               else xp.zeros(win_shape, x.dtype))
        return adjoint(dxw)

    return y, backward


def avg_pool2d_core(x: DistTensor, kernel_size, stride=None, padding=0, ceil_mode=False,
                    count_include_pad=True):
    """The unrecorded :func:`avg_pool2d` (``x`` without pending sums): ``y`` and
    ``backward(dy) -> dx`` (in ``x``'s layout)."""
    k, s, p, wins, y_dist, y_shape = _pool_setup(x, kernel_size, stride, padding, ceil_mode,
                                                 "avg_pool2d")
    div = ops.avg_pool2d_divisor(tuple(x.shape), k, s, p, ceil_mode, count_include_pad)
    (h0, h1), (w0, w1) = y_dist.dim_range(2, y_shape[2]), y_dist.dim_range(3, y_shape[3])
    xw, adjoint = _gather(x, _check_windows(x, wins), 0.0)
    want = y_dist.local_shape(y_shape)
    xp = array_module(xw.local)
    # the local op divides by kh*kw (no padding, no ceil mode): rescale to the true divisor
    scale = xp.asarray((k[0] * k[1] / div[h0:h1, w0:w1]).astype(x.dtype))
    live = all(want) and all(xw.local.shape)
    if live:
        y_local = ops.avg_pool2d_forward(xw.local, k, s, (0, 0)) * scale
    else:
        y_local = xp.zeros(want, x.dtype)
    y = DistTensor(y_local, y_dist, y_shape)
    win_shape = tuple(xw.local.shape)

    def backward(dy):
        dy = dy._move(y_dist)
        dxw = (ops.avg_pool2d_backward(dy.local * scale, win_shape, k, s, (0, 0)) if live
               else xp.zeros(win_shape, x.dtype))
        return adjoint(dxw)

    return y, backward
