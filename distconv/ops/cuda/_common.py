"""Helpers shared by the CUDA launchers of :mod:`distconv.ops.cuda` and their NumPy twins:
convolution and pooling geometry, shape checks, batch-norm per-channel vectors."""
from __future__ import annotations

import numpy as np

from ..conv import _pair  # one argument parser for the CPU and GPU ops
from .. import pool as _pool  # one pooling output-size and divisor rule


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


def _conv_geom(x_shape, w_shape, stride, padding, dilation):
    F, Cw, kh, kw = (int(s) for s in w_shape)
    if Cw != int(x_shape[1]):
        raise ValueError(f"input has {int(x_shape[1])} channels but weight expects {Cw} "
                         f"(x {tuple(x_shape)}, w {tuple(w_shape)})")
    return _Geom(x_shape, (kh, kw), stride, padding, dilation), F


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
