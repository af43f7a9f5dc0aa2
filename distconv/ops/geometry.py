"""Convolution and pooling geometry: the one copy of its rules.

Used by the CPU ops (:mod:`distconv.ops.conv`, :mod:`distconv.ops.pool`), the CUDA
launchers and their twins (:mod:`distconv.ops.cuda`), the shape rules
(:mod:`distconv.ops.shapes`), the layers (:mod:`distconv.nn`), the models' size checks
and the planner's graph. Pure integer arithmetic on shapes; no arrays, no MPI.

Conventions (PyTorch's): images are NCHW, ``(N, C, H, W)`` = (samples, channels,
height, width); convolution weights are OIHW, ``(F, C, kh, kw)`` = (filters, channels,
kernel height, kernel width). Every 2-D argument (kernel, stride, padding, dilation) is an
int or an ``(h, w)`` pair; padding is added on both sides of a dimension. The 1-D
functions take one spatial dimension: ``n`` the input length, ``k`` the kernel length,
``s`` the stride, ``p`` the padding on each side, ``d`` the dilation.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

__all__ = ["pair", "conv_output_size", "conv2d_output_hw", "ConvGeometry",
           "pool_output_size", "pool2d_output_hw", "PoolGeometry", "pool2d_geometry"]


def pair(v, name="value", what=None):
    """``(int, int)`` from an int (used twice) or an iterable of two ints (NumPy integers
    included; bools and floats are not ints here).

    Anything else raises ``ValueError("[what: ]name must be an int or a pair of ints,
    got v")``, the same on every rank.
    """
    if _is_int(v):
        return (int(v), int(v))
    try:
        t = tuple(v)
    except TypeError:
        t = ()
    if len(t) != 2 or not all(_is_int(a) for a in t):
        prefix = f"{what}: " if what else ""
        raise ValueError(f"{prefix}{name} must be an int or a pair of ints, got {v!r}")
    return (int(t[0]), int(t[1]))


def _is_int(v) -> bool:
    if type(v) is int:  # the common case, without the ABC checks below (~1 us each)
        return True
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


# ------------------------------------------------------------------ convolution
def conv_output_size(n, k, s=1, p=0, d=1):
    """Output length of a 1-D convolution (PyTorch's formula):
    ``(n + 2*p - d*(k - 1) - 1) // s + 1``. An int that may be < 1; callers raise on it."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _check_conv_params(stride, padding, dilation):
    """Parsed (stride, padding, dilation) pairs; ValueError on stride < 1, padding < 0 or
    dilation < 1."""
    stride = pair(stride, "stride")
    padding = pair(padding, "padding")
    dilation = pair(dilation, "dilation")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    return stride, padding, dilation


def conv2d_output_hw(h, w, kernel_hw, stride, padding, dilation):
    """Output spatial size ``(Ho, Wo)`` of a convolution of an ``(h, w)`` image.

    ``Ho = conv_output_size(h, kh, sh, ph, dh)`` and likewise for W. Raises ValueError on
    a bad argument or when Ho or Wo would be < 1.
    """
    kh, kw = pair(kernel_hw, "kernel_hw")
    (sh, sw), (ph, pw), (dh, dw) = _check_conv_params(stride, padding, dilation)
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel size must be >= 1, got {(kh, kw)}")
    ho = conv_output_size(h, kh, sh, ph, dh)
    wo = conv_output_size(w, kw, sw, pw, dw)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"convolution output would be empty: input {h}x{w}, kernel {kh}x{kw}, "
            f"stride {(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)} gives "
            f"{ho}x{wo}")
    return ho, wo


def _check_nchw(x_shape):
    if len(x_shape) != 4:
        raise ValueError(f"expected an NCHW shape, got {tuple(x_shape)}")


class ConvGeometry:
    """The shapes of one convolution (or im2col) of an input ``x_shape = (N, C, H, W)``.

    Attributes (ints): ``N, C, H, W``; kernel ``kh, kw``; stride ``sh, sw``; padding
    ``ph, pw``; dilation ``dh, dw``; output ``Ho, Wo``; ``K = C*kh*kw`` (rows of the
    im2col patch matrix) and ``L = Ho*Wo`` (its columns per sample); ``F`` the number of
    filters (None unless built by :meth:`of_weight`). So ``y`` is (N, F, Ho, Wo) and the
    patch matrix of ``x`` is (N, K, L). Raises ValueError on a bad argument or an empty
    output.
    """

    def __init__(self, x_shape, kernel_hw, stride=1, padding=0, dilation=1, *,
                 out_channels=None):
        _check_nchw(x_shape)
        self.N, self.C, self.H, self.W = (int(s) for s in x_shape)
        self.F = None if out_channels is None else int(out_channels)
        self.kh, self.kw = pair(kernel_hw, "kernel_hw")
        (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw) = \
            _check_conv_params(stride, padding, dilation)
        self.Ho, self.Wo = conv2d_output_hw(self.H, self.W, (self.kh, self.kw),
                                            (self.sh, self.sw), (self.ph, self.pw),
                                            (self.dh, self.dw))
        self.K = self.C * self.kh * self.kw
        self.L = self.Ho * self.Wo

    @classmethod
    def of_weight(cls, x_shape, w_shape, stride=1, padding=0, dilation=1):
        """The geometry of ``x_shape`` (N, C, H, W) convolved with a weight of ``w_shape``
        (F, C, kh, kw); ValueError when the channel counts differ."""
        _check_nchw(x_shape)
        F, Cw, kh, kw = (int(s) for s in w_shape)
        if Cw != int(x_shape[1]):
            raise ValueError(f"input has {int(x_shape[1])} channels but weight expects {Cw} "
                             f"(x {tuple(x_shape)}, w {tuple(w_shape)})")
        return cls(x_shape, (kh, kw), stride, padding, dilation, out_channels=F)


# ---------------------------------------------------------------------- pooling
def pool_output_size(n, k, s, p, ceil_mode=False):
    """Output length of a 1-D pooling window sweep (PyTorch's ``pooling_output_shape``).

    ``(n + 2*p - k) // s + 1``, rounded up instead with ``ceil_mode`` except that the last
    window must start inside the input or the left padding. An int that may be < 1;
    callers raise on it.
    """
    num = n + 2 * p - k + ((s - 1) if ceil_mode else 0)
    out = num // s + 1  # floor division == PyTorch's div_rtn
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


class PoolGeometry(NamedTuple):
    """The shapes of one 2-D pooling: input (N, C, H, W), kernel (kh, kw), stride (sh, sw),
    padding (ph, pw) -> output (N, C, Ho, Wo). A tuple: it unpacks in this order."""

    N: int
    C: int
    H: int
    W: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    Ho: int
    Wo: int


def pool2d_geometry(x_shape, kernel, stride=None, padding=0, ceil_mode=False):
    """:class:`PoolGeometry` of max/average pooling of an input ``x_shape = (N, C, H, W)``.

    ``stride`` None means ``kernel``. Raises ValueError on a bad geometry (padding above
    half the kernel, non-positive kernel or stride, empty output).
    """
    _check_nchw(x_shape)
    kh, kw = pair(kernel, "kernel")
    sh, sw = pair(kernel if stride is None else stride, "stride")
    ph, pw = pair(padding, "padding")
    if min(kh, kw) < 1 or min(sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"pooling needs kernel >= 1, stride >= 1, padding >= 0; got kernel "
                         f"{(kh, kw)}, stride {(sh, sw)}, padding {(ph, pw)}")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"pad should be at most half of the kernel size, got padding {(ph, pw)} "
                         f"for kernel {(kh, kw)}")
    N, C, H, W = (int(s) for s in x_shape)
    Ho = pool_output_size(H, kh, sh, ph, ceil_mode)
    Wo = pool_output_size(W, kw, sw, pw, ceil_mode)
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"pooling output would be empty: input {H}x{W}, kernel {(kh, kw)}, stride "
            f"{(sh, sw)}, padding {(ph, pw)}, ceil_mode={bool(ceil_mode)} gives {Ho}x{Wo}")
    return PoolGeometry(N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo)


def pool2d_output_hw(h, w, kernel, stride=None, padding=0, ceil_mode=False):
    """Output ``(Ho, Wo)`` of 2-D max/average pooling of an ``(h, w)`` image, as PyTorch
    computes it (see :func:`pool2d_geometry`)."""
    g = pool2d_geometry((0, 0, h, w), kernel, stride, padding, ceil_mode)
    return g.Ho, g.Wo
