"""GPU local kernels (CUDA sources in ``kernels/``, compiled by CuPy) and their NumPy twins.

The kernels are found, compiled and launched by :mod:`distconv.cudakernels`
(whose names ``KERNELS``, ``kernels_dir``, ``compile_all``... are re-exported
here); the channel-block packing used by :mod:`distconv.comm` lives in
:mod:`distconv.packing` and is re-exported here too.

Every GPU function here has the signature and semantics of the CPU op of the
same name in :mod:`distconv.ops` (or of ``comm._pack``/``comm._assemble`` for
the channel-block packing), and a NumPy twin ``<name>_numpy`` that transliterates
the CUDA kernel's index math with vectorised NumPy: it is the reference the GPU
tests compare against and works on any machine. The GPU functions accept NumPy
arrays too, and then simply call their twin, so::

    from distconv.ops import cuda as K
    cols = K.im2col(x, (3, 3), (1, 1), (1, 1), (1, 1))   # CuPy in -> CUDA kernel
                                                          # NumPy in -> im2col_numpy

GPU kernels take float32 or float64 data (the packing kernels any dtype) and
use 64-bit index math; the convolutions are im2col/col2im plus one cuBLAS GEMM
(``cupy.matmul``) per block of samples. With ``DISTCONV_CUDNN=1`` in the
environment and a CuPy that has ``cupy.cudnn`` (CuPy <= 13 with cuDNN), the
convolutions call cuDNN instead; if cuDNN is missing or fails, they fall back
to the im2col path (with one warning). This module imports without CuPy:
CuPy is imported inside the functions that need it.

Numerics: kernels are compiled with ``--fmad=false`` so element-wise results
round exactly like NumPy's separate operations (CuPy adds ``-ftz=true``:
float32 denormals flush to zero on the GPU). Reductions and GEMMs sum in a
different order than NumPy, so they agree to rounding only.
"""
from __future__ import annotations

import importlib
import os
import warnings

import numpy as np

from .. import cudakernels as _ck
from . import _workspace

__all__ = [
    "COMPILE_OPTIONS", "KERNELS", "kernels_dir", "kernel_source", "get_module", "compile_all",
    "cudnn_available", "cudnn_enabled",
    "im2col", "col2im", "im2col_numpy", "col2im_numpy",
    "pack_channel_blocks", "unpack_channel_blocks",
    "pack_channel_blocks_numpy", "unpack_channel_blocks_numpy",
    "bn_local_stats", "bn_forward_apply", "bn_backward_reduce", "bn_backward_apply",
    "bn_local_stats_numpy", "bn_forward_apply_numpy", "bn_backward_reduce_numpy",
    "bn_backward_apply_numpy",
    "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward",
    "max_pool2d_forward_numpy", "max_pool2d_backward_numpy", "avg_pool2d_forward_numpy",
    "avg_pool2d_backward_numpy",
    "relu_forward", "relu_backward", "relu_forward_numpy", "relu_backward_numpy",
    "conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter",
    "conv2d_forward_numpy", "conv2d_backward_data_numpy", "conv2d_backward_filter_numpy",
]

# The kernel table, loading and launching live in distconv/cudakernels.py (shared with the
# channel-block packing of distconv/packing.py, which comm.py uses); re-exported here.
from ..cudakernels import (COMPILE_OPTIONS, KERNELS, kernels_dir, kernel_source,  # noqa: F401
                           get_module, compile_all)

_COLS_BYTES = 256 * 2 ** 20  # column buffer of the im2col convolution, at most


# ------------------------------------------------------------------- geometry
from .conv import _pair  # noqa: E402  (one argument parser for the CPU and GPU ops)
from . import pool as _pool  # noqa: E402  (one pooling output-size and divisor rule)


def _out_hw(H, W, kh, kw, sh, sw, ph, pw, dh, dw):
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel size must be >= 1, got {(kh, kw)}")
    if min(sh, sw) < 1:
        raise ValueError(f"stride must be >= 1, got {(sh, sw)}")
    if min(ph, pw) < 0:
        raise ValueError(f"padding must be >= 0, got {(ph, pw)}")
    if min(dh, dw) < 1:
        raise ValueError(f"dilation must be >= 1, got {(dh, dw)}")
    eh = H + 2 * ph - dh * (kh - 1) - 1
    ew = W + 2 * pw - dw * (kw - 1) - 1
    if eh < 0 or ew < 0:
        raise ValueError(
            f"convolution output would be empty: input {H}x{W}, kernel {kh}x{kw}, stride "
            f"{(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}")
    return eh // sh + 1, ew // sw + 1


class _Geom:
    """Shapes of one convolution / im2col: x (N, C, H, W), kernel (kh, kw) -> (Ho, Wo)."""

    def __init__(self, x_shape, kernel_hw, stride, padding, dilation):
        if len(x_shape) != 4:
            raise ValueError(f"expected an NCHW shape, got {tuple(x_shape)}")
        self.N, self.C, self.H, self.W = (int(s) for s in x_shape)
        self.kh, self.kw = _pair(kernel_hw, "kernel_hw")
        self.sh, self.sw = _pair(stride, "stride")
        self.ph, self.pw = _pair(padding, "padding")
        self.dh, self.dw = _pair(dilation, "dilation")
        self.Ho, self.Wo = _out_hw(self.H, self.W, self.kh, self.kw, self.sh, self.sw,
                                   self.ph, self.pw, self.dh, self.dw)
        self.K = self.C * self.kh * self.kw
        self.L = self.Ho * self.Wo

    def kargs(self, n):
        """The 14 geometry arguments of im2col/col2im for a block of ``n`` samples."""
        return (n, self.C, self.H, self.W, self.kh, self.kw, self.sh, self.sw, self.ph, self.pw,
                self.dh, self.dw, self.Ho, self.Wo)


def _pool_geom(x_shape, kernel, stride, padding, ceil_mode=False):
    """Pooling geometry; output size by PyTorch's rule, shared with the CPU op."""
    if len(x_shape) != 4:
        raise ValueError(f"expected an NCHW shape, got {tuple(x_shape)}")
    return _pool._geom(x_shape, kernel, stride, padding, ceil_mode)


def _check4(x, name="x"):
    if x.ndim != 4:
        raise ValueError(f"{name} must be NCHW (4-D), got shape {tuple(x.shape)}")


def _check_shape(a, shape, name):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def _fwd_pairs(n_out, n_in, s, p, d, i):
    """Output/input index pairs (o, h) with h = o*s - p + i*d inside [0, n_in)."""
    o = np.arange(n_out, dtype=np.int64)
    h = o * s - p + i * d
    ok = (h >= 0) & (h < n_in)
    return o[ok], h[ok]


def _adj_pairs(n_in, n_out, s, p, d, i):
    """Input/output index pairs (h, o): h + p - i*d == o*s with 0 <= o < n_out (the gather of
    the adjoint kernels: col2im, pooling backward)."""
    h = np.arange(n_in, dtype=np.int64)
    t = h + p - i * d
    ok = (t >= 0) & (t % s == 0) & (t // s < n_out)
    return h[ok], t[ok] // s


# ------------------------------------------------------------- im2col / col2im
def im2col_numpy(x, kernel_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """NumPy twin of :func:`im2col`: x (N, C, H, W) -> cols (N, C*kh*kw, Ho*Wo).

    cols[n, (c*kh + i)*kw + j, ho*Wo + wo] = x[n, c, ho*sh - ph + i*dh, wo*sw - pw + j*dw]
    (0 outside the image); rows ordered like ``torch.nn.functional.unfold``.
    """
    x = np.asarray(x)
    g = _Geom(x.shape, kernel_hw, stride, padding, dilation)
    cols = np.zeros((g.N, g.C, g.kh, g.kw, g.Ho, g.Wo), x.dtype)
    if cols.size:
        for i in range(g.kh):
            ho, h = _fwd_pairs(g.Ho, g.H, g.sh, g.ph, g.dh, i)
            for j in range(g.kw):
                wo, w = _fwd_pairs(g.Wo, g.W, g.sw, g.pw, g.dw, j)
                cols[:, :, i, j][:, :, ho[:, None], wo[None, :]] = x[:, :, h[:, None], w[None, :]]
    return cols.reshape(g.N, g.K, g.L)


def col2im_numpy(cols, x_shape, kernel_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """NumPy twin of :func:`col2im`, the adjoint of :func:`im2col_numpy`.

    cols (N, C*kh*kw, Ho*Wo) -> x (N, C, H, W): each pixel gathers its
    contributions in kernel-offset order (i, j), like the CUDA kernel.
    """
    cols = np.asarray(cols)
    g = _Geom(x_shape, kernel_hw, stride, padding, dilation)
    _check_shape(cols, (g.N, g.K, g.L), "cols")
    x = np.zeros((g.N, g.C, g.H, g.W), cols.dtype)
    if x.size == 0:
        return x
    c6 = cols.reshape(g.N, g.C, g.kh, g.kw, g.Ho, g.Wo)
    for i in range(g.kh):
        h, ho = _adj_pairs(g.H, g.Ho, g.sh, g.ph, g.dh, i)
        if h.size == 0:
            continue
        for j in range(g.kw):
            w, wo = _adj_pairs(g.W, g.Wo, g.sw, g.pw, g.dw, j)
            if w.size:
                x[:, :, h[:, None], w[None, :]] += c6[:, :, i, j][:, :, ho[:, None], wo[None, :]]
    return x


def _im2col_launch(x, cols, g, n, col_sn, col_sk):
    """im2col of the contiguous (n, C, H, W) CuPy array ``x`` into ``cols`` (any layout)."""
    if n * g.K * g.L:
        _ck.launch("im2col_" + _ck.float_suffix(x.dtype)[0], n * g.K * g.L,
                (x, cols) + g.kargs(n) + (col_sn, col_sk))


def _col2im_launch(cols, x, g, n, col_sn, col_sk):
    if n * g.C * g.H * g.W:
        _ck.launch("col2im_" + _ck.float_suffix(x.dtype)[0], n * g.C * g.H * g.W,
                (cols, x) + g.kargs(n) + (col_sn, col_sk))


def im2col(x, kernel_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Patch matrix of an NCHW image batch: x (N, C, H, W) -> cols (N, C*kh*kw, Ho*Wo).

    Rows are ordered (c, i, j) and columns (ho, wo), as ``torch.nn.functional.unfold``;
    padded positions read 0. CuPy input: CUDA kernel; NumPy input: :func:`im2col_numpy`.
    """
    if not _ck.is_gpu_array(x):
        return im2col_numpy(x, kernel_hw, stride, padding, dilation)
    cp = _ck.cupy()
    g = _Geom(x.shape, kernel_hw, stride, padding, dilation)
    _ck.float_suffix(x.dtype)
    x = cp.ascontiguousarray(x)
    cols = cp.empty((g.N, g.K, g.L), x.dtype)
    _im2col_launch(x, cols, g, g.N, g.K * g.L, g.L)
    return cols


def col2im(cols, x_shape, kernel_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Adjoint of :func:`im2col`: cols (N, C*kh*kw, Ho*Wo) -> x (N, C, H, W), summing overlaps.

    Atomic-free on the GPU (each pixel gathers its contributions in (i, j) order).
    """
    if not _ck.is_gpu_array(cols):
        return col2im_numpy(cols, x_shape, kernel_hw, stride, padding, dilation)
    cp = _ck.cupy()
    g = _Geom(x_shape, kernel_hw, stride, padding, dilation)
    _check_shape(cols, (g.N, g.K, g.L), "cols")
    _ck.float_suffix(cols.dtype)
    cols = cp.ascontiguousarray(cols)
    x = cp.empty((g.N, g.C, g.H, g.W), cols.dtype)
    _col2im_launch(cols, x, g, g.N, g.K * g.L, g.L)
    return x


# ------------------------------------------------------------- channel blocks
from ..packing import (pack_channel_blocks, unpack_channel_blocks,  # noqa: E402,F401
                       pack_channel_blocks_numpy, unpack_channel_blocks_numpy)


# ------------------------------------------------------------------ batch norm
def _vec(xp, v, C, dtype, name):
    a = xp.asarray(v)
    if a.size != C:
        raise ValueError(f"{name} must have {C} entries (one per channel), got shape {a.shape}")
    return xp.ascontiguousarray(a.reshape(C).astype(dtype, copy=False))


def bn_local_stats_numpy(x):
    """NumPy twin of :func:`bn_local_stats`: (sum (C,) f64, sumsq (C,) f64, count N*H*W)."""
    x = np.asarray(x)
    _check4(x)
    N, C, H, W = (int(s) for s in x.shape)
    s = np.zeros(C, np.float64)
    ss = np.zeros(C, np.float64)
    if x.size:
        v = x.reshape(N, C, H * W).astype(np.float64)
        s = v.sum(axis=(0, 2))
        ss = (v * v).sum(axis=(0, 2))
    return s, ss, N * H * W


def bn_backward_reduce_numpy(dy, x, mean):
    """NumPy twin of :func:`bn_backward_reduce`: (sum dy, sum dy*(x - mean)), (C,) f64 each."""
    x, dy = np.asarray(x), np.asarray(dy)
    _check4(x)
    _check_shape(dy, x.shape, "dy")
    N, C, H, W = (int(s) for s in x.shape)
    m = _vec(np, mean, C, np.float64, "mean")
    if x.size == 0:
        return np.zeros(C), np.zeros(C)
    d = dy.reshape(N, C, H * W).astype(np.float64)
    xm = x.reshape(N, C, H * W).astype(np.float64) - m.reshape(1, C, 1)
    return d.sum(axis=(0, 2)), (d * xm).sum(axis=(0, 2))


def _bn_fwd_vectors(xp, C, dt, mean, invstd, weight, bias):
    scale = xp.asarray(invstd, dtype=np.float64).reshape(-1)
    if weight is not None:
        scale = scale * xp.asarray(weight, dtype=np.float64).reshape(-1)
    b = xp.zeros(C, dt) if bias is None else _vec(xp, bias, C, dt, "bias")
    return _vec(xp, mean, C, dt, "mean"), _vec(xp, scale, C, dt, "invstd*weight"), b


def bn_forward_apply_numpy(x, mean, invstd, weight=None, bias=None):
    """NumPy twin of :func:`bn_forward_apply`: y = (x - mean) * (invstd*weight) + bias."""
    x = np.asarray(x)
    _check4(x)
    C = int(x.shape[1])
    m, sc, b = _bn_fwd_vectors(np, C, x.dtype, mean, invstd, weight, bias)
    r = (1, C, 1, 1)
    return (x - m.reshape(r)) * sc.reshape(r) + b.reshape(r)


def _bn_bwd_vectors(xp, C, dt, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    count = float(count)
    inv = xp.asarray(invstd, dtype=np.float64).reshape(-1)
    scale = inv if weight is None else inv * xp.asarray(weight, dtype=np.float64).reshape(-1)
    k = xp.asarray(sum_dy_xmu, dtype=np.float64).reshape(-1) * inv * inv / count
    mdy = xp.asarray(sum_dy, dtype=np.float64).reshape(-1) / count
    return (_vec(xp, mean, C, dt, "mean"), _vec(xp, -k, C, dt, "sum_dy_xmu"),
            _vec(xp, mdy, C, dt, "sum_dy"), _vec(xp, scale, C, dt, "invstd*weight"))


def bn_backward_apply_numpy(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """NumPy twin of :func:`bn_backward_apply`:
    dx = ((x - mean) * negk + dy - mdy) * scale in dy's dtype."""
    dy = np.asarray(dy)
    _check4(dy, "dy")
    dt = dy.dtype
    x = np.asarray(x).astype(dt, copy=False)
    _check_shape(x, dy.shape, "x")
    C = int(dy.shape[1])
    m, nk, mdy, sc = _bn_bwd_vectors(np, C, dt, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
    r = (1, C, 1, 1)
    return ((x - m.reshape(r)) * nk.reshape(r) + dy - mdy.reshape(r)) * sc.reshape(r)


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


# --------------------------------------------------------------------- pooling
def _argmax_dtype(kh, kw):
    return np.dtype(np.uint8) if kh * kw <= 256 else np.dtype(np.int32)


def max_pool2d_forward_numpy(x, kernel, stride=None, padding=(0, 0), *, ceil_mode=False):
    """NumPy twin of :func:`max_pool2d_forward` -> (y, argmax)."""
    x = np.asarray(x)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = _pool_geom(x.shape, kernel, stride, padding,
                                                           ceil_mode)
    y = np.empty((N, C, Ho, Wo), x.dtype)
    arg = np.zeros((N, C, Ho, Wo), _argmax_dtype(kh, kw))
    if y.size == 0:
        return y, arg
    ninf = x.dtype.type(-np.inf)
    ho = np.arange(Ho)
    wo = np.arange(Wo)
    best = np.full(y.shape, ninf, x.dtype)
    # first in-bounds offset of each window (PyTorch's initial index)
    barg = np.broadcast_to(np.maximum(ph - ho * sh, 0)[:, None] * kw
                           + np.maximum(pw - wo * sw, 0)[None, :], y.shape).astype(np.int64)
    for i in range(kh):
        h = ho * sh - ph + i
        hin = (h >= 0) & (h < H)
        hc = np.clip(h, 0, H - 1)
        for j in range(kw):
            w = wo * sw - pw + j
            win = (w >= 0) & (w < W)
            wc = np.clip(w, 0, W - 1)
            v = np.where(hin[:, None] & win[None, :], x[:, :, hc[:, None], wc[None, :]], ninf)
            k = i * kw + j
            take = (v > best) | (v != v)
            best = np.where(take, v, best)
            barg = np.where(take, k, barg)
    y[...] = best
    arg[...] = barg
    return y, arg


def max_pool2d_backward_numpy(dy, argmax, x_shape, kernel, stride=None, padding=(0, 0), *,
                              ceil_mode=False):
    """NumPy twin of :func:`max_pool2d_backward` (gather per input pixel, (i, j) order)."""
    dy = np.asarray(dy)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = _pool_geom(x_shape, kernel, stride, padding,
                                                           ceil_mode)
    _check_shape(dy, (N, C, Ho, Wo), "dy")
    _check_shape(argmax, (N, C, Ho, Wo), "argmax")
    dx = np.zeros((N, C, H, W), dy.dtype)
    if dx.size == 0:
        return dx
    arg = np.asarray(argmax).astype(np.int64)
    zero = dy.dtype.type(0)
    for i in range(kh):
        h, ho = _adj_pairs(H, Ho, sh, ph, 1, i)
        if h.size == 0:
            continue
        for j in range(kw):
            w, wo = _adj_pairs(W, Wo, sw, pw, 1, j)
            if w.size == 0:
                continue
            sel = (slice(None), slice(None), ho[:, None], wo[None, :])
            dx[:, :, h[:, None], w[None, :]] += np.where(arg[sel] == i * kw + j, dy[sel], zero)
    return dx


def avg_pool2d_forward_numpy(x, kernel, stride=None, padding=(0, 0), *, ceil_mode=False,
                             count_include_pad=True):
    """NumPy twin of :func:`avg_pool2d_forward`: (sum of the in-bounds window) / divisor
    (:func:`distconv.ops.pool.avg_pool2d_divisor`)."""
    x = np.asarray(x)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = _pool_geom(x.shape, kernel, stride, padding,
                                                           ceil_mode)
    acc = np.zeros((N, C, Ho, Wo), x.dtype)
    if acc.size == 0:
        return acc
    for i in range(kh):
        ho, h = _fwd_pairs(Ho, H, sh, ph, 1, i)
        for j in range(kw):
            wo, w = _fwd_pairs(Wo, W, sw, pw, 1, j)
            acc[:, :, ho[:, None], wo[None, :]] += x[:, :, h[:, None], w[None, :]]
    div = _pool.avg_pool2d_divisor(x.shape, kernel, stride, padding, ceil_mode,
                                   count_include_pad).astype(x.dtype)
    return acc / div


def avg_pool2d_backward_numpy(dy, x_shape, kernel, stride=None, padding=(0, 0), *,
                              ceil_mode=False, count_include_pad=True):
    """NumPy twin of :func:`avg_pool2d_backward`: pixels gather dy/divisor of their windows."""
    dy = np.asarray(dy)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = _pool_geom(x_shape, kernel, stride, padding,
                                                           ceil_mode)
    _check_shape(dy, (N, C, Ho, Wo), "dy")
    dx = np.zeros((N, C, H, W), dy.dtype)
    if dx.size == 0:
        return dx
    g = dy / _pool.avg_pool2d_divisor(x_shape, kernel, stride, padding, ceil_mode,
                                      count_include_pad).astype(dy.dtype)
    for i in range(kh):
        h, ho = _adj_pairs(H, Ho, sh, ph, 1, i)
        for j in range(kw):
            w, wo = _adj_pairs(W, Wo, sw, pw, 1, j)
            if h.size and w.size:
                dx[:, :, h[:, None], w[None, :]] += g[:, :, ho[:, None], wo[None, :]]
    return dx


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
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = _pool_geom(x.shape, kernel, stride, padding,
                                                           ceil_mode)
    suf = _ck.float_suffix(x.dtype)[0]
    adt = _argmax_dtype(kh, kw)
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
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = _pool_geom(x_shape, kernel, stride, padding,
                                                           ceil_mode)
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
    cp = _ck.cupy()
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = _pool_geom(x.shape, kernel, stride, padding,
                                                           ceil_mode)
    suf = _ck.float_suffix(x.dtype)[0]
    y = cp.empty((N, C, Ho, Wo), x.dtype)
    if y.size:
        _ck.launch(f"avg_pool2d_forward_{suf}", y.size,
                (cp.ascontiguousarray(x), y, N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo,
                 int(bool(count_include_pad))))
    return y


def avg_pool2d_backward(dy, x_shape, kernel, stride=None, padding=(0, 0), *, ceil_mode=False,
                        count_include_pad=True):
    """Gradient of average pooling: dy (N, C, Ho, Wo) -> dx (N, C, H, W) of dy's dtype."""
    if not _ck.is_gpu_array(dy):
        return avg_pool2d_backward_numpy(dy, x_shape, kernel, stride, padding,
                                         ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    cp = _ck.cupy()
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = _pool_geom(x_shape, kernel, stride, padding,
                                                           ceil_mode)
    _check_shape(dy, (N, C, Ho, Wo), "dy")
    suf = _ck.float_suffix(dy.dtype)[0]
    dx = cp.empty((N, C, H, W), dy.dtype)
    if dx.size:
        _ck.launch(f"avg_pool2d_backward_{suf}", dx.size,
                (cp.ascontiguousarray(dy), dx, N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo,
                 int(bool(count_include_pad))))
    return dx


# ------------------------------------------------------------------------ ReLU
def relu_forward_numpy(x, out=None):
    """NumPy twin of :func:`relu_forward`: x where x > 0 or x is NaN, else 0."""
    x = np.asarray(x)
    r = np.where((x > 0) | (x != x), x, x.dtype.type(0))
    if out is None:
        return r
    out[...] = r
    return out


def relu_backward_numpy(dy, y, out=None):
    """NumPy twin of :func:`relu_backward`: dy * (0 where y <= 0 else 1)."""
    dy = np.asarray(dy)
    y = np.asarray(y)
    _check_shape(y, dy.shape, "y")
    one, zero = dy.dtype.type(1), dy.dtype.type(0)
    r = dy * np.where(y.astype(dy.dtype, copy=False) <= 0, zero, one)
    if out is None:
        return r
    out[...] = r
    return out


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


# ------------------------------------------------------------------ convolution
_CUDNN = None
_CUDNN_WARNED = False


def cudnn_available() -> bool:
    """True when ``cupy.cudnn`` (or ``cupyx.cudnn``) imports with convolution support."""
    global _CUDNN
    if _CUDNN is None:
        _CUDNN = False
        for name in ("cupy.cudnn", "cupyx.cudnn"):
            try:
                m = importlib.import_module(name)
            except Exception:
                continue
            if all(hasattr(m, f) for f in ("convolution_forward", "convolution_backward_data",
                                            "convolution_backward_filter")):
                _CUDNN = m
                break
    return _CUDNN is not False


def _cudnn_requested() -> bool:
    return os.environ.get("DISTCONV_CUDNN", "0").strip().lower() in ("1", "true", "yes", "on")


def cudnn_enabled() -> bool:
    """True when ``DISTCONV_CUDNN=1`` asks for cuDNN convolutions and cuDNN is available."""
    if not _cudnn_requested():
        return False
    if cudnn_available():
        return True
    _warn_cudnn("DISTCONV_CUDNN=1 but cupy.cudnn is not available; using im2col + cuBLAS")
    return False


def _warn_cudnn(msg):
    global _CUDNN_WARNED
    if not _CUDNN_WARNED:
        _CUDNN_WARNED = True
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _try_cudnn(fn_name, *args, **kw):
    """Call cupy.cudnn.<fn_name>; False (after one warning) if it fails, so callers fall back."""
    try:
        getattr(_CUDNN, fn_name)(*args, **kw)
        return True
    except Exception as e:  # unsupported configuration, missing library, ...
        _warn_cudnn(f"cuDNN {fn_name} failed ({e!r}); using im2col + cuBLAS")
        return False


def _conv_geom(x_shape, w_shape, stride, padding, dilation):
    F, Cw, kh, kw = (int(s) for s in w_shape)
    if Cw != int(x_shape[1]):
        raise ValueError(f"input has {int(x_shape[1])} channels but weight expects {Cw} "
                         f"(x {tuple(x_shape)}, w {tuple(w_shape)})")
    return _Geom(x_shape, (kh, kw), stride, padding, dilation), F


def _samples_per_block(g, itemsize):
    return max(1, min(g.N, _COLS_BYTES // max(1, g.K * g.L * itemsize)))


def _cols_buffer(cp, g, B, b, dtype):
    """A (K, b*L) scratch column buffer (contiguous) from a cached (K*B*L,) one."""
    buf = _workspace.get(cp, "cuda_cols", (g.K * B * g.L,), dtype)
    return buf[:g.K * b * g.L].reshape(g.K, b * g.L)


def _to_fl(cp, a, n0, n1, F, L):
    """a[n0:n1] of an (N, F, Ho, Wo) array as a contiguous (F, b*L) matrix."""
    b = n1 - n0
    if b == 1:
        return a[n0].reshape(F, L)
    return cp.ascontiguousarray(a[n0:n1].reshape(b, F, L).transpose(1, 0, 2)).reshape(F, b * L)


def conv2d_forward(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Convolution forward (cross-correlation, as PyTorch), without bias.

    x: (N, C, H, W); w: (F, C, kh, kw) -> y: (N, F, Ho, Wo), dtype of x.
    GPU: per block of samples, im2col into a (C*kh*kw, b*Ho*Wo) buffer and one
    cuBLAS GEMM; cuDNN instead under ``DISTCONV_CUDNN=1`` when available.
    """
    if not _ck.is_gpu_array(x):
        return conv2d_forward_numpy(x, w, stride, padding, dilation)
    cp = _ck.cupy()
    g, F = _conv_geom(x.shape, w.shape, stride, padding, dilation)
    dt = x.dtype
    _ck.float_suffix(dt)
    y = cp.empty((g.N, F, g.Ho, g.Wo), dt)
    if y.size == 0:
        return y
    if g.K == 0:
        y.fill(0)
        return y
    xc = cp.ascontiguousarray(x)
    wc = cp.ascontiguousarray(cp.asarray(w).astype(dt, copy=False))
    if cudnn_enabled() and _try_cudnn(
            "convolution_forward", xc, wc, None, y, (g.ph, g.pw), (g.sh, g.sw),
            (g.dh, g.dw), 1, auto_tune=False, tensor_core="never"):
        return y
    w2 = wc.reshape(F, g.K)
    B = _samples_per_block(g, dt.itemsize)
    for n0 in range(0, g.N, B):
        n1 = min(g.N, n0 + B)
        b = n1 - n0
        cols = _cols_buffer(cp, g, B, b, dt)
        _im2col_launch(xc[n0:n1], cols, g, b, g.L, b * g.L)
        if b == 1:
            cp.matmul(w2, cols, out=y[n0].reshape(F, g.L))
        else:
            out = cp.matmul(w2, cols)
            y[n0:n1] = out.reshape(F, b, g.Ho, g.Wo).transpose(1, 0, 2, 3)
    return y


def conv2d_backward_data(dy, w, x_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Gradient of the convolution with respect to its input.

    dy: (N, F, Ho, Wo); w: (F, C, kh, kw); x_hw = (H, W) -> dx: (N, C, H, W), dtype of dy.
    GPU: per block of samples, cols = W^T @ dy (cuBLAS) then the atomic-free col2im.
    """
    if not _ck.is_gpu_array(dy):
        return conv2d_backward_data_numpy(dy, w, x_hw, stride, padding, dilation)
    cp = _ck.cupy()
    H, W = (int(v) for v in x_hw)
    N, F = int(dy.shape[0]), int(dy.shape[1])
    g, Fw = _conv_geom((N, int(w.shape[1]), H, W), w.shape, stride, padding, dilation)
    _check_shape(dy, (N, Fw, g.Ho, g.Wo), "dy")
    dt = dy.dtype
    _ck.float_suffix(dt)
    if N * g.C * H * W == 0 or F == 0:
        return cp.zeros((N, g.C, H, W), dt)
    dx = cp.empty((N, g.C, H, W), dt)
    dyc = cp.ascontiguousarray(dy)
    wc = cp.ascontiguousarray(cp.asarray(w).astype(dt, copy=False))
    if cudnn_enabled() and _try_cudnn(
            "convolution_backward_data", wc, dyc, None, dx, (g.ph, g.pw), (g.sh, g.sw),
            (g.dh, g.dw), 1, deterministic=True, auto_tune=False, tensor_core="never"):
        return dx
    w2t = wc.reshape(F, g.K).T  # (K, F)
    B = _samples_per_block(g, dt.itemsize)
    for n0 in range(0, N, B):
        n1 = min(N, n0 + B)
        b = n1 - n0
        cols = _cols_buffer(cp, g, B, b, dt)
        cp.matmul(w2t, _to_fl(cp, dyc, n0, n1, F, g.L), out=cols)
        _col2im_launch(cols, dx[n0:n1], g, b, g.L, b * g.L)
    return dx


def conv2d_backward_filter(x, dy, kernel_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Gradient of the convolution with respect to its weight.

    x: (N, C, H, W); dy: (N, F, Ho, Wo); kernel_hw = (kh, kw) -> dw: (F, C, kh, kw), dtype of x.
    GPU: dw = sum over blocks of samples of dy (F, b*L) @ im2col(x)^T (cuBLAS).
    """
    if not _ck.is_gpu_array(x):
        return conv2d_backward_filter_numpy(x, dy, kernel_hw, stride, padding, dilation)
    cp = _ck.cupy()
    kh, kw = _pair(kernel_hw, "kernel_hw")
    F = int(dy.shape[1])
    g, _ = _conv_geom(x.shape, (F, x.shape[1], kh, kw), stride, padding, dilation)
    _check_shape(dy, (g.N, F, g.Ho, g.Wo), "dy")
    dt = x.dtype
    _ck.float_suffix(dt)
    dw = cp.zeros((F, g.C, kh, kw), dt)
    if dw.size == 0 or g.N == 0:
        return dw
    xc = cp.ascontiguousarray(x)
    dyc = cp.ascontiguousarray(cp.asarray(dy).astype(dt, copy=False))
    if cudnn_enabled() and _try_cudnn(
            "convolution_backward_filter", xc, dyc, dw, (g.ph, g.pw), (g.sh, g.sw),
            (g.dh, g.dw), 1, deterministic=True, auto_tune=False, tensor_core="never"):
        return dw
    dw2 = dw.reshape(F, g.K)
    B = _samples_per_block(g, dt.itemsize)
    for n0 in range(0, g.N, B):
        n1 = min(g.N, n0 + B)
        b = n1 - n0
        cols = _cols_buffer(cp, g, B, b, dt)
        _im2col_launch(xc[n0:n1], cols, g, b, g.L, b * g.L)
        part = cp.matmul(_to_fl(cp, dyc, n0, n1, F, g.L), cols.T)
        if n0 == 0:
            dw2[...] = part
        else:
            dw2 += part
    return dw


def conv2d_forward_numpy(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """NumPy twin of :func:`conv2d_forward`: W (F, K) @ im2col_numpy(x) per sample."""
    x = np.asarray(x)
    g, F = _conv_geom(x.shape, w.shape, stride, padding, dilation)
    dt = x.dtype
    if g.N * F * g.L == 0:
        return np.zeros((g.N, F, g.Ho, g.Wo), dt)
    w2 = np.asarray(w).astype(dt, copy=False).reshape(F, g.K)
    return np.matmul(w2, im2col_numpy(x, (g.kh, g.kw), stride, padding, dilation)).reshape(
        g.N, F, g.Ho, g.Wo)


def conv2d_backward_data_numpy(dy, w, x_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """NumPy twin of :func:`conv2d_backward_data`: col2im_numpy(W^T @ dy)."""
    dy = np.asarray(dy)
    H, W = (int(v) for v in x_hw)
    N, F = int(dy.shape[0]), int(dy.shape[1])
    g, Fw = _conv_geom((N, int(w.shape[1]), H, W), w.shape, stride, padding, dilation)
    _check_shape(dy, (N, Fw, g.Ho, g.Wo), "dy")
    dt = dy.dtype
    if N * g.C * H * W == 0 or F == 0:
        return np.zeros((N, g.C, H, W), dt)
    w2 = np.asarray(w).astype(dt, copy=False).reshape(F, g.K)
    cols = np.matmul(w2.T, dy.reshape(N, F, g.L))
    return col2im_numpy(cols, (N, g.C, H, W), (g.kh, g.kw), stride, padding, dilation)


def conv2d_backward_filter_numpy(x, dy, kernel_hw, stride=(1, 1), padding=(0, 0),
                                 dilation=(1, 1)):
    """NumPy twin of :func:`conv2d_backward_filter`: sum_n dy[n] (F, L) @ im2col(x)[n]^T."""
    x = np.asarray(x)
    dy = np.asarray(dy)
    kh, kw = _pair(kernel_hw, "kernel_hw")
    F = int(dy.shape[1])
    g, _ = _conv_geom(x.shape, (F, x.shape[1], kh, kw), stride, padding, dilation)
    _check_shape(dy, (g.N, F, g.Ho, g.Wo), "dy")
    dt = x.dtype
    if F * g.K == 0 or g.N == 0:
        return np.zeros((F, g.C, kh, kw), dt)
    cols = im2col_numpy(x, (kh, kw), stride, padding, dilation)  # (N, K, L)
    d = dy.astype(dt, copy=False).reshape(g.N, F, g.L)
    return np.matmul(d, cols.transpose(0, 2, 1)).sum(axis=0).reshape(F, g.C, kh, kw)
