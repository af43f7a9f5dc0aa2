"""Local pieces of (synchronised) 2-D batch normalisation on NCHW xp arrays.

The work is split like PyTorch's SyncBatchNorm so that a distributed layer
can sum per-channel statistics over the ranks that share a channel block
between the steps::

    s, ss, n = bn_local_stats(x)                 # local, per channel
    s, ss, n = allreduce(s), allreduce(ss), allreduce(n)
    mean, invstd, var_unbiased = bn_mean_invstd(s, ss, n, eps)
    y = bn_forward_apply(x, mean, invstd, weight, bias)

    sdy, sdyx = bn_backward_reduce(dy, x, mean)  # local, per channel
    sdy, sdyx = allreduce(sdy), allreduce(sdyx)
    dx = bn_backward_apply(dy, x, mean, invstd, weight, sdy, sdyx, n)
    dweight, dbias = bn_param_grads(sdy, sdyx, invstd)

Numerics: every (sample, channel) row of H*W values is summed in the dtype of
x by NumPy's pairwise summation (error ~ eps * log2(H*W), not eps * H*W), and
the row sums are added in float64. The sum of squares is taken about each
row's own mean and turned back into a raw sum of squares in float64
(``sum x^2 = sum (x - m)^2 + 2 m sum x - L m^2``), so ``sumsq/n - mean**2``
does not lose the variance to float32 cancellation when mean >> std; the
variance is clamped at 0. Statistics are returned as float64 arrays of shape
(C,); the apply functions accept any float dtype for them and compute in the
dtype of x. The element-wise passes run over chunks of (sample, channel) rows small enough
to stay in cache, with the per-channel factors folded first (forward: ``x *
a + b`` with ``a = invstd * weight``, ``b = bias - mean * a``, as PyTorch's CPU
kernel), so each array crosses memory about once per function.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from ._gpu import gpu_impl

_CHUNK_ELEMS = 1 << 16  # elements per cache-resident chunk of (sample, channel) rows


def _chunks(n, per_row):
    """(r0, r1) ranges of at most ~_CHUNK_ELEMS elements (at least one row each)."""
    step = max(1, _CHUNK_ELEMS // max(1, per_row))
    for n0 in range(0, n, step):
        yield n0, min(n, n0 + step)


def _check4(x, name="x"):
    if x.ndim != 4:
        raise ValueError(f"{name} must be NCHW (4-D), got shape {tuple(x.shape)}")


def _row_factor(xp, v, dtype, n):
    """A per-channel vector (C,) repeated for n samples: (n*C, 1) of ``dtype``, so that row r
    of the (N*C, H*W) view of an NCHW array gets channel r % C's factor."""
    v = xp.asarray(v).reshape(-1)
    out = xp.empty((n, v.shape[0]), dtype)
    out[...] = v  # broadcast over the samples (cheaper than xp.tile for these sizes)
    return out.reshape(-1, 1)


def bn_local_stats(x):
    """Per-channel sum, sum of squares and element count of the local block.

    x: (N, C, H, W) -> (sum (C,) float64, sumsq (C,) float64, count int = N*H*W).
    """
    _g = gpu_impl("bn_local_stats", x)
    if _g is not None:
        return _g(x)
    _check4(x)
    xp = array_module(x)
    N, C, H, W = (int(s) for s in x.shape)
    L = H * W
    if N * C * L == 0:
        return xp.zeros((C,), np.float64), xp.zeros((C,), np.float64), N * L
    xr = x.reshape(N * C, L)
    rows = xr.sum(axis=1)                       # (N*C,) pairwise, in x's dtype
    m = rows / x.dtype.type(L)                  # each row's own mean (rounded)
    m2 = xp.empty((N * C,), x.dtype)
    for r0, r1 in _chunks(N * C, L):
        d = xr[r0:r1] - m[r0:r1, None]
        d *= d
        d.sum(axis=1, out=m2[r0:r1])
    r64 = rows.astype(np.float64)
    m64 = m.astype(np.float64)
    ss = (m2.astype(np.float64) + m64 * (2.0 * r64 - L * m64)).reshape(N, C).sum(axis=0)
    return r64.reshape(N, C).sum(axis=0), ss, N * L


def bn_mean_invstd(sum_, sumsq, count, eps=1e-5):
    """Mean, 1/sqrt(var + eps) and unbiased variance from (global) sums.

    sum_, sumsq: (C,); count: int -> (mean, invstd, var_unbiased), each (C,)
    float64. ``var_unbiased`` (for the running variance, as PyTorch) divides
    by count - 1 and is ``nan`` when count == 1 (PyTorch refuses to train
    with one value per channel; callers decide). Raises ValueError on count 0.
    """
    xp = array_module(sum_)
    count = int(count)
    if count <= 0:
        raise ValueError("batch norm statistics over zero elements (global count is 0)")
    sum_ = xp.asarray(sum_, dtype=np.float64)
    sumsq = xp.asarray(sumsq, dtype=np.float64)
    mean = sum_ / count
    var = xp.maximum(sumsq / count - mean * mean, 0.0)
    invstd = 1.0 / xp.sqrt(var + eps)
    var_unbiased = var * (count / (count - 1)) if count > 1 else xp.full_like(var, np.nan)
    return mean, invstd, var_unbiased


def _bc(xp, v, dtype):
    """A per-channel vector (C,) as a (1, C, 1, 1) array of ``dtype``."""
    return xp.asarray(v).astype(dtype, copy=False).reshape(1, -1, 1, 1)


def bn_forward_apply(x, mean, invstd, weight=None, bias=None):
    """Normalise: y = (x - mean) * invstd * weight + bias.

    x: (N, C, H, W); mean, invstd, weight, bias: (C,) (weight/bias may be None)
    -> y: (N, C, H, W) of x's dtype.
    """
    _g = gpu_impl("bn_forward_apply", x)
    if _g is not None:
        return _g(x, mean, invstd, weight, bias)
    _check4(x)
    xp = array_module(x)
    dt = x.dtype
    a = xp.asarray(invstd, dtype=np.float64)
    if weight is not None:
        a = a * xp.asarray(weight, dtype=np.float64)
    b = -xp.asarray(mean, dtype=np.float64) * a
    if bias is not None:
        b = b + xp.asarray(bias, dtype=np.float64)
    y = xp.empty_like(x)
    if y.size == 0:
        return y
    N, C, H, W = (int(s) for s in x.shape)
    L = H * W
    a, b = _row_factor(xp, a, dt, N), _row_factor(xp, b, dt, N)
    xr, yr = x.reshape(N * C, L), y.reshape(N * C, L)
    for r0, r1 in _chunks(N * C, L):
        yc = yr[r0:r1]
        xp.multiply(xr[r0:r1], a[r0:r1], out=yc)
        yc += b[r0:r1]
    return y


def bn_backward_reduce(dy, x, mean):
    """Per-channel sums needed by the backward pass of the local block.

    dy, x: (N, C, H, W); mean: (C,) -> (sum_dy (C,) float64, sum_dy_xmu (C,)
    float64) where sum_dy_xmu = sum(dy * (x - mean)).
    """
    _g = gpu_impl("bn_backward_reduce", x)
    if _g is not None:
        return _g(dy, x, mean)
    _check4(x)
    _check4(dy, "dy")
    xp = array_module(x)
    N, C, H, W = (int(s) for s in x.shape)
    L = H * W
    if N * C * L == 0:
        return xp.zeros((C,), np.float64), xp.zeros((C,), np.float64)
    m = _row_factor(xp, xp.asarray(mean, dtype=np.float64), x.dtype, N)
    xr = x.reshape(N * C, L)
    dr = dy.reshape(N * C, L)
    sdy = dr.sum(axis=1)                        # (N*C,) pairwise, in dy's dtype
    rows = xp.empty((N * C,), x.dtype)
    for r0, r1 in _chunks(N * C, L):
        t = xr[r0:r1] - m[r0:r1]
        t *= dr[r0:r1]
        t.sum(axis=1, out=rows[r0:r1])
    return (sdy.astype(np.float64).reshape(N, C).sum(axis=0),
            rows.astype(np.float64).reshape(N, C).sum(axis=0))


def bn_backward_apply(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """Input gradient of training-mode batch norm from GLOBAL per-channel sums.

    dx = (dy - sum_dy/count - (x - mean) * invstd**2 * sum_dy_xmu/count) * invstd * weight

    dy, x: (N, C, H, W); mean, invstd, weight (or None), sum_dy, sum_dy_xmu:
    (C,); count: global number of elements per channel -> dx: (N, C, H, W) of
    dy's dtype.
    """
    _g = gpu_impl("bn_backward_apply", dy)
    if _g is not None:
        return _g(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
    _check4(x)
    xp = array_module(dy)
    dt = dy.dtype
    dx = xp.empty_like(dy)
    if dx.size == 0:
        return dx
    count = float(count)
    inv = xp.asarray(invstd, dtype=np.float64)
    scale = inv if weight is None else inv * xp.asarray(weight, dtype=np.float64)
    k = xp.asarray(sum_dy_xmu, dtype=np.float64) * inv * inv / count
    mdy = xp.asarray(sum_dy, dtype=np.float64) / count
    N, C, H, W = (int(s) for s in x.shape)
    L = H * W
    m, nk, mdy, scale = (_row_factor(xp, v, dt, N) for v in (mean, -k, mdy, scale))
    xr, dr, dxr = x.reshape(N * C, L), dy.reshape(N * C, L), dx.reshape(N * C, L)
    for r0, r1 in _chunks(N * C, L):
        dc = dxr[r0:r1]
        xp.subtract(xr[r0:r1], m[r0:r1], out=dc)
        dc *= nk[r0:r1]
        dc += dr[r0:r1]
        dc -= mdy[r0:r1]
        dc *= scale[r0:r1]
    return dx


def bn_param_grads(sum_dy, sum_dy_xmu, invstd):
    """Gradients of weight and bias from GLOBAL sums: (dweight, dbias), each (C,) float64.

    dweight = sum_dy_xmu * invstd, dbias = sum_dy. Cast to the parameter dtype.
    """
    xp = array_module(sum_dy)
    return (xp.asarray(sum_dy_xmu, dtype=np.float64) * xp.asarray(invstd, dtype=np.float64),
            xp.asarray(sum_dy, dtype=np.float64).copy())
