"""CUDA batch norm (``kernels/batchnorm.cu``): per-channel reductions in float64 and the
element-wise normalisation and input gradient."""
from __future__ import annotations

import numpy as np

from ... import cudakernels as _ck
from ._common import _bn_bwd_vectors, _bn_fwd_vectors, _check4, _check_shape, _vec
from .twins import (bn_backward_apply_numpy, bn_backward_reduce_numpy, bn_forward_apply_numpy,
                    bn_local_stats_numpy)


def _bn_parts(C, M):
    """Chunks per channel of the reduction kernels: ~1024 blocks in all, >= 4096 elements each."""
    return max(1, min(-(-M // 4096), -(-1024 // max(C, 1))))


def bn_local_stats(x):
    """Per-channel sum, sum of squares and element count of the local block.

    x: (N, C, H, W) -> (sum (C,) float64, sumsq (C,) float64, count int = N*H*W).
    Accumulated in float64 on the GPU (per-block partial sums, no atomics).
    """
    if not _ck.is_gpu_array(x):
        return bn_local_stats_numpy(x)
    cp = _ck.cupy()
    _check4(x)
    N, C, H, W = (int(s) for s in x.shape)
    L = H * W
    if N * C * L == 0:
        return cp.zeros(C, np.float64), cp.zeros(C, np.float64), N * L
    suf = _ck.float_suffix(x.dtype)[0]
    x = cp.ascontiguousarray(x)
    P = _bn_parts(C, N * L)
    ps = cp.empty(C * P, np.float64)
    pss = cp.empty(C * P, np.float64)
    _ck.launch(f"bn_stats_partial_{suf}", 0, (x, ps, pss, N, C, L, P),
            threads=_ck.RED_THREADS, blocks=C * P)
    return ps.reshape(C, P).sum(axis=1), pss.reshape(C, P).sum(axis=1), N * L


def bn_backward_reduce(dy, x, mean):
    """Per-channel sums of the backward pass: (sum dy, sum dy*(x - mean)), each (C,) float64.

    dy, x: (N, C, H, W) (computed in their common dtype); mean: (C,).
    """
    if not _ck.is_gpu_array(x):
        return bn_backward_reduce_numpy(dy, x, mean)
    cp = _ck.cupy()
    _check4(x)
    _check_shape(dy, x.shape, "dy")
    N, C, H, W = (int(s) for s in x.shape)
    L = H * W
    m = _vec(cp, mean, C, np.float64, "mean")
    if N * C * L == 0:
        return cp.zeros(C, np.float64), cp.zeros(C, np.float64)
    dt = np.result_type(dy.dtype, x.dtype)
    suf = _ck.float_suffix(dt)[0]
    x = cp.ascontiguousarray(x.astype(dt, copy=False))
    dy = cp.ascontiguousarray(cp.asarray(dy).astype(dt, copy=False))
    P = _bn_parts(C, N * L)
    pa = cp.empty(C * P, np.float64)
    pb = cp.empty(C * P, np.float64)
    _ck.launch(f"bn_backward_reduce_partial_{suf}", 0, (dy, x, m, pa, pb, N, C, L, P),
            threads=_ck.RED_THREADS, blocks=C * P)
    return pa.reshape(C, P).sum(axis=1), pb.reshape(C, P).sum(axis=1)


def bn_forward_apply(x, mean, invstd, weight=None, bias=None):
    """Normalise: y = (x - mean) * invstd * weight + bias, in x's dtype.

    x: (N, C, H, W); mean, invstd, weight, bias: (C,) (weight/bias may be None).
    invstd*weight is formed in float64 and cast to x's dtype, as the CPU op.
    """
    if not _ck.is_gpu_array(x):
        return bn_forward_apply_numpy(x, mean, invstd, weight, bias)
    cp = _ck.cupy()
    _check4(x)
    N, C, H, W = (int(s) for s in x.shape)
    suf = _ck.float_suffix(x.dtype)[0]
    m, sc, b = _bn_fwd_vectors(cp, C, x.dtype, mean, invstd, weight, bias)
    x = cp.ascontiguousarray(x)
    y = cp.empty(x.shape, x.dtype)
    if y.size:
        _ck.launch(f"bn_forward_apply_{suf}", y.size, (x, m, sc, b, y, N, C, H * W))
    return y


def bn_backward_apply(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """Input gradient of training-mode batch norm from GLOBAL per-channel sums, in dy's dtype.

    dx = (dy - sum_dy/count - (x - mean) * invstd**2 * sum_dy_xmu/count) * invstd * weight
    """
    if not _ck.is_gpu_array(dy):
        return bn_backward_apply_numpy(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
    cp = _ck.cupy()
    _check4(dy, "dy")
    _check_shape(x, dy.shape, "x")
    N, C, H, W = (int(s) for s in dy.shape)
    dt = dy.dtype
    suf = _ck.float_suffix(dt)[0]
    m, nk, mdy, sc = _bn_bwd_vectors(cp, C, dt, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
    dy = cp.ascontiguousarray(dy)
    x = cp.ascontiguousarray(cp.asarray(x).astype(dt, copy=False))
    dx = cp.empty(dy.shape, dt)
    if dx.size:
        _ck.launch(f"bn_backward_apply_{suf}", dx.size, (dy, x, m, nk, mdy, sc, dx, N, C, H * W))
    return dx
