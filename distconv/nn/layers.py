"""Layers that work on any channel/sample split as it comes: ReLU, pooling, Flatten.

They need the spatial dimensions whole on each rank (distconv never splits H or
W) and no pending sums; any N and C split passes through unchanged, so they
cost no communication after a Conv2d or BatchNorm2d. A global array input is
cut with the data-parallel activation layout.
"""
from __future__ import annotations

from .. import ops
from ..distribution import Distribution
from ..strategy import Strategy
from ..tensor import DistTensor
from .module import Layer, as_dist


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(int(a) for a in v)


def _elementwise_input(x, ndim=4):
    """``x`` as a DistTensor whose last dims are whole and which has no pending sums."""
    if not isinstance(x, DistTensor):
        nd = getattr(x, "ndim", ndim)
        return as_dist(x, Strategy().activation_distribution(max(nd, 1)))
    d = x.distribution
    if d.pending or any(d.split[i] for i in range(2, x.ndim)):
        split = list(d.split[:2]) + [None] * (x.ndim - 2)
        x = x.redistribute(Distribution(d.grid, split))
    return x


class _Elementwise(Layer):
    def _input(self, x):
        return _elementwise_input(x)


class ReLU(_Elementwise):
    """max(x, 0) elementwise; any shape and distribution."""

    def _forward(self, x, save):
        y = ops.relu_forward(x.local)
        return DistTensor(y, x.distribution, x.shape), ((x.distribution, y) if save else None)

    def _backward(self, ctx, dy, need_dx):
        dist, y = ctx
        dy = dy.redistribute(dist)
        return DistTensor(ops.relu_backward(dy.local, y), dist, dy.shape)

    def __repr__(self):
        return "ReLU()"


class _Pool(_Elementwise):
    def _check(self, x):
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects a 4-D (N, C, H, W) input, "
                             f"got shape {x.shape}")
        H, W = x.shape[2], x.shape[3]
        k, s, p = self.kernel_size, self.stride, self.padding
        if p[0] > k[0] // 2 or p[1] > k[1] // 2:
            raise ValueError(f"{type(self).__name__}: padding {p} must be at most half the "
                             f"kernel size {k}")
        ho = (H + 2 * p[0] - k[0]) // s[0] + 1
        wo = (W + 2 * p[1] - k[1]) // s[1] + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"{type(self).__name__}: kernel {k} is larger than the padded "
                             f"input {H + 2 * p[0]}x{W + 2 * p[1]} (input shape {x.shape})")
        return (x.shape[0], x.shape[1], ho, wo)

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = self.kernel_size if stride is None else _pair(stride)
        self.padding = _pair(padding)
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"{type(self).__name__}: bad kernel_size/stride/padding "
                             f"{self.kernel_size}/{self.stride}/{self.padding}")

    def __repr__(self):
        return (f"{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding})")


class MaxPool2d(_Pool):
    """Max pooling (N, C, H, W) -> (N, C, H', W'); PyTorch's arguments (no ceil_mode)."""

    def _forward(self, x, save):
        shape = self._check(x)
        y, arg = ops.max_pool2d_forward(x.local, self.kernel_size, self.stride, self.padding)
        return DistTensor(y, x.distribution, shape), ((x.distribution, x.shape, arg)
                                                      if save else None)

    def _backward(self, ctx, dy, need_dx):
        dist, xshape, arg = ctx
        dy = dy.redistribute(dist)
        xl = dist.local_shape(xshape)
        dx = ops.max_pool2d_backward(dy.local, arg, xl, self.kernel_size, self.stride,
                                     self.padding)
        return DistTensor(dx, dist, xshape)


class AvgPool2d(_Pool):
    """Average pooling (count_include_pad=True), (N, C, H, W) -> (N, C, H', W')."""

    def _forward(self, x, save):
        shape = self._check(x)
        y = ops.avg_pool2d_forward(x.local, self.kernel_size, self.stride, self.padding)
        return DistTensor(y, x.distribution, shape), (x.distribution, x.shape)

    def _backward(self, ctx, dy, need_dx):
        dist, xshape = ctx
        dy = dy.redistribute(dist)
        dx = ops.avg_pool2d_backward(dy.local, dist.local_shape(xshape), self.kernel_size,
                                     self.stride, self.padding)
        return DistTensor(dx, dist, xshape)


class AdaptiveAvgPool2d(_Elementwise):
    """Global average pooling: (N, C, H, W) -> (N, C, 1, 1). Only output size 1 is supported."""

    def __init__(self, output_size=1):
        super().__init__()
        if _pair(output_size) != (1, 1):
            raise ValueError(f"AdaptiveAvgPool2d supports output_size 1 only, got {output_size}")
        self.output_size = (1, 1)

    def _forward(self, x, save):
        if x.ndim != 4:
            raise ValueError(f"AdaptiveAvgPool2d expects (N, C, H, W), got shape {x.shape}")
        y = ops.global_avg_pool_forward(x.local)
        return DistTensor(y, x.distribution, x.shape[:2] + (1, 1)), (x.distribution, x.shape)

    def _backward(self, ctx, dy, need_dx):
        dist, xshape = ctx
        dy = dy.redistribute(dist)
        return DistTensor(ops.global_avg_pool_backward(dy.local, dist.local_shape(xshape)),
                          dist, xshape)

    def __repr__(self):
        return "AdaptiveAvgPool2d(1)"


class Flatten(_Elementwise):
    """(N, C, H, W) -> (N, C*H*W). A C split carries over to the features when H*W == 1;
    otherwise the channels are gathered first (features of a channel block are not a
    floor+1 block of C*H*W)."""

    def _forward(self, x, save):
        if x.ndim < 2:
            raise ValueError(f"Flatten expects at least 2 dims, got shape {x.shape}")
        d = in_dist = x.distribution
        rest = 1
        for s in x.shape[2:]:
            rest *= s
        if rest != 1 and d.split[1]:
            d = Distribution(d.grid, [d.split[0]] + [None] * (x.ndim - 1))
            x = x.redistribute(d)
        out_dist = Distribution(d.grid, [d.split[0], d.split[1]])
        shape = (x.shape[0], x.shape[1] * rest)
        n, feats = x.local.shape[0], 1
        for s in x.local.shape[1:]:
            feats *= s  # not reshape(n, -1): that fails on an empty block (n == 0)
        y = DistTensor(x.local.reshape(n, feats), out_dist, shape)
        return y, (x.distribution, x.shape, in_dist)

    def _backward(self, ctx, dy, need_dx):
        dist, xshape, in_dist = ctx
        out_dist = Distribution(dist.grid, [dist.split[0], dist.split[1]])
        dy = dy.redistribute(out_dist)
        dx = DistTensor(dy.local.reshape(dist.local_shape(xshape)), dist, xshape)
        # back to the input's C split: a local slice
        return dx.redistribute(in_dist.replace(pending=()))

    def __repr__(self):
        return "Flatten()"
