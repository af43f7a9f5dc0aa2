"""Helpers shared by the CUDA launchers of :mod:`distconv.ops.cuda` and their NumPy twins:
shape checks and batch-norm per-channel vectors (the geometry is
:mod:`distconv.ops.geometry`, shared with the CPU ops)."""
from __future__ import annotations

import numpy as np

from ..geometry import ConvGeometry, pair


def _check4(x, name="x"):
    if x.ndim != 4:
        raise ValueError(f"{name} must be NCHW (4-D), got shape {tuple(x.shape)}")


def _check_shape(a, shape, name):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def _bwd_data_geom(dy, w, x_hw, stride, padding, dilation):
    """ConvGeometry (F set) of the input gradient of x (N, C, *x_hw) from dy (N, F, Ho, Wo)
    and w (F, C, kh, kw); ValueError when dy's shape does not fit."""
    H, W = (int(v) for v in x_hw)
    N = int(dy.shape[0])
    g = ConvGeometry.of_weight((N, int(w.shape[1]), H, W), w.shape, stride, padding, dilation)
    _check_shape(dy, (N, g.F, g.Ho, g.Wo), "dy")
    return g


def _bwd_filter_geom(x, dy, kernel_hw, stride, padding, dilation):
    """ConvGeometry (F set) of the weight gradient (F, C, *kernel_hw) from x (N, C, H, W) and
    dy (N, F, Ho, Wo); ValueError when dy's shape does not fit."""
    kh, kw = pair(kernel_hw, "kernel_hw")
    g = ConvGeometry.of_weight(x.shape, (int(dy.shape[1]), x.shape[1], kh, kw), stride,
                               padding, dilation)
    _check_shape(dy, (g.N, g.F, g.Ho, g.Wo), "dy")
    return g


def _vec(xp, v, C, dtype, name):
    a = xp.asarray(v)
    if a.size != C:
        raise ValueError(f"{name} must have {C} entries (one per channel), got shape {a.shape}")
    return xp.ascontiguousarray(a.reshape(C).astype(dtype, copy=False))


def _bn_fwd_vectors(xp, C, dt, mean, invstd, weight, bias):
    scale = xp.asarray(invstd, dtype=np.float64).reshape(-1)
    if weight is not None:
        scale = scale * xp.asarray(weight, dtype=np.float64).reshape(-1)
    b = xp.zeros(C, dt) if bias is None else _vec(xp, bias, C, dt, "bias")
    return _vec(xp, mean, C, dt, "mean"), _vec(xp, scale, C, dt, "invstd*weight"), b


def _bn_bwd_vectors(xp, C, dt, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    count = float(count)
    inv = xp.asarray(invstd, dtype=np.float64).reshape(-1)
    scale = inv if weight is None else inv * xp.asarray(weight, dtype=np.float64).reshape(-1)
    k = xp.asarray(sum_dy_xmu, dtype=np.float64).reshape(-1) * inv * inv / count
    mdy = xp.asarray(sum_dy, dtype=np.float64).reshape(-1) / count
    return (_vec(xp, mean, C, dt, "mean"), _vec(xp, -k, C, dt, "sum_dy_xmu"),
            _vec(xp, mdy, C, dt, "sum_dy"), _vec(xp, scale, C, dt, "invstd*weight"))
