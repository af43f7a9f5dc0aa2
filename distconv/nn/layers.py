"""Layers that work on any channel/sample split as it comes: ReLU, pooling, Dropout,
Flatten.

They need no pending sums; any N and C split passes through unchanged, so they
cost no communication after a Conv2d or BatchNorm2d. ReLU and Dropout keep any
H/W split too; MaxPool2d and AvgPool2d keep an H/W split over one grid axis each
(a spatially split input, e.g. after a Conv2d with ``height``/``width``) and pool
it with a halo exchange (:mod:`distconv.spatial_pool`); AdaptiveAvgPool2d and Flatten
gather H and W first (the exact-volume redistribution). A global array input is
cut with the data-parallel activation layout.
"""
from __future__ import annotations

import numpy as np

from .. import ops, spatial_pool
from ..ops.geometry import pair, pool_output_size
from ..backend import get_xp
from ..distribution import Distribution
from ..meta import MetaArray, is_meta
from ..strategy import Strategy
from ..tensor import DistTensor
from .module import Layer, as_dist, init_rng


def elementwise_input(x, ndim=4, keep_spatial=None):
    """``x`` as a DistTensor without pending sums whose last dims are whole, except where
    ``keep_spatial(distribution)`` says the split of dims 2.. may stay."""
    if not isinstance(x, DistTensor):
        nd = getattr(x, "ndim", ndim)
        return as_dist(x, Strategy().activation_distribution(max(nd, 1)))
    d = x.distribution
    split_rest = any(d.split[i] for i in range(2, x.ndim))
    if split_rest and keep_spatial is not None and keep_spatial(x):
        return x.redistribute(d.replace(pending=())) if d.pending else x
    if d.pending or split_rest:
        split = list(d.split[:2]) + [None] * (x.ndim - 2)
        x = x.redistribute(Distribution(d.grid, split))
    return x


class _Elementwise(Layer):
    def _input(self, x):
        return elementwise_input(x)


def _spatial_ok(x) -> bool:
    """A 4-D tensor whose H and W are each split over one grid axis at most (what the
    halo exchange of :mod:`distconv.spatial` takes)."""
    d = x.distribution
    return x.ndim == 4 and len(d.split[2]) <= 1 and len(d.split[3]) <= 1


class ReLU(_Elementwise):
    """max(x, 0) elementwise; any shape and distribution (an H/W split stays)."""

    def _input(self, x):
        return elementwise_input(x, keep_spatial=lambda t: True)

    def _forward(self, x, save):
        y = ops.relu_forward(x.local)
        return DistTensor(y, x.distribution, x.shape), ((x.distribution, y) if save else None)

    def _backward(self, ctx, dy, need_dx):
        dist, y = ctx
        dy = dy.redistribute(dist)
        return DistTensor(ops.relu_backward(dy.local, y), dist, dy.shape)

    def __repr__(self):
        return "ReLU()"


def _pool_tuple(v, name, what):
    """int or pair -> pair of ints (:func:`~distconv.ops.geometry.pair`), but a bool is
    neither, as in PyTorch's pooling; the same ValueError on every rank."""
    if isinstance(v, bool):
        raise ValueError(f"{what}: {name} must be an int or a pair of ints, got {v!r}")
    return pair(v, name, what)


class _Pool(_Elementwise):
    """Shared arguments and checks of MaxPool2d and AvgPool2d (PyTorch's rules: padding at
    most half the kernel, output size from :func:`distconv.ops.geometry.pool_output_size`)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        super().__init__()
        what = type(self).__name__
        self.kernel_size = _pool_tuple(kernel_size, "kernel_size", what)
        # torch: stride None or an empty list means the kernel size
        self.stride = self.kernel_size if stride is None or (
            not isinstance(stride, int) and len(stride) == 0) else _pool_tuple(stride,
                                                                               "stride", what)
        self.padding = _pool_tuple(padding, "padding", what)
        self.ceil_mode = bool(ceil_mode)
        k, s, p = self.kernel_size, self.stride, self.padding
        if min(k) < 1 or min(s) < 1 or min(p) < 0:
            raise ValueError(f"{what}: kernel_size and stride must be >= 1 and padding >= 0, "
                             f"got kernel_size={k}, stride={s}, padding={p}")
        if p[0] > k[0] // 2 or p[1] > k[1] // 2:
            raise ValueError(f"{what}: pad should be at most half of effective kernel size, "
                             f"but got padding={p} for kernel_size={k}")

    def _input(self, x):
        return elementwise_input(x, keep_spatial=_spatial_ok)

    @staticmethod
    def _is_spatial(x) -> bool:
        d = x.distribution
        return bool(d.split[2] or d.split[3])

    def _check(self, x):
        """Output shape for input ``x`` (global shape: the same error on every rank)."""
        what = type(self).__name__
        if x.ndim != 4:
            raise ValueError(f"{what} expects a 4-D (N, C, H, W) input, got shape {x.shape}")
        N, C, H, W = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        ho = pool_output_size(H, k[0], s[0], p[0], self.ceil_mode)
        wo = pool_output_size(W, k[1], s[1], p[1], self.ceil_mode)
        if ho < 1 or wo < 1:
            # PyTorch's words: "Given input size: ... Output size is too small"
            raise ValueError(f"{what}: Given input size: ({C}x{H}x{W}). Calculated output "
                             f"size: ({C}x{ho}x{wo}). Output size is too small (kernel {k} is "
                             f"larger than the padded input {H + 2 * p[0]}x{W + 2 * p[1]})")
        return (N, C, ho, wo)

    def _args(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
                f", ceil_mode={self.ceil_mode}")

    def __repr__(self):
        return f"{type(self).__name__}({self._args()})"


class MaxPool2d(_Pool):
    """Max pooling (N, C, H, W) -> (N, C, H', W'), PyTorch's arguments and rules
    (``ceil_mode``; ties go to the first maximum in window order). ``dilation`` other than
    1 and ``return_indices`` are not supported (ValueError)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
                 ceil_mode=False):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.dilation = _pool_tuple(dilation, "dilation", "MaxPool2d")
        if self.dilation != (1, 1):
            raise ValueError(f"MaxPool2d: dilation {self.dilation} is not supported (only 1)")
        if return_indices:
            raise ValueError("MaxPool2d: return_indices=True is not supported")

    def _forward(self, x, save):
        shape = self._check(x)
        if self._is_spatial(x):
            y, bwd = spatial_pool.max_pool2d_core(x, self.kernel_size, self.stride, self.padding,
                                             self.ceil_mode)
            return y, (("spatial", bwd) if save else None)
        y, arg = ops.max_pool2d_forward(x.local, self.kernel_size, self.stride, self.padding,
                                        ceil_mode=self.ceil_mode)
        return DistTensor(y, x.distribution, shape), ((x.distribution, x.shape, arg)
                                                      if save else None)

    def _backward(self, ctx, dy, need_dx):
        if ctx[0] == "spatial":
            return ctx[1](dy)
        dist, xshape, arg = ctx
        dy = dy.redistribute(dist)
        xl = dist.local_shape(xshape)
        dx = ops.max_pool2d_backward(dy.local, arg, xl, self.kernel_size, self.stride,
                                     self.padding, ceil_mode=self.ceil_mode)
        return DistTensor(dx, dist, xshape)


class AvgPool2d(_Pool):
    """Average pooling (N, C, H, W) -> (N, C, H', W'), PyTorch's arguments and divisor
    rules (``ceil_mode``, ``count_include_pad``). ``divisor_override`` is not supported."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = bool(count_include_pad)
        if divisor_override is not None:
            raise ValueError("AvgPool2d: divisor_override is not supported")

    def _kw(self):
        return dict(ceil_mode=self.ceil_mode, count_include_pad=self.count_include_pad)

    def _forward(self, x, save):
        shape = self._check(x)
        if self._is_spatial(x):
            y, bwd = spatial_pool.avg_pool2d_core(x, self.kernel_size, self.stride, self.padding,
                                             self.ceil_mode, self.count_include_pad)
            return y, ("spatial", bwd)
        y = ops.avg_pool2d_forward(x.local, self.kernel_size, self.stride, self.padding,
                                   **self._kw())
        return DistTensor(y, x.distribution, shape), (x.distribution, x.shape)

    def _backward(self, ctx, dy, need_dx):
        if ctx[0] == "spatial":
            return ctx[1](dy)
        dist, xshape = ctx
        dy = dy.redistribute(dist)
        dx = ops.avg_pool2d_backward(dy.local, dist.local_shape(xshape), self.kernel_size,
                                     self.stride, self.padding, **self._kw())
        return DistTensor(dx, dist, xshape)

    def _args(self):
        return super()._args() + f", count_include_pad={self.count_include_pad}"


class AdaptiveAvgPool2d(_Elementwise):
    """Adaptive average pooling (N, C, H, W) -> (N, C, Ho, Wo) with PyTorch's bins, any
    output size (an int, a pair, ``None`` entries keep the input's size; larger than the
    input too). Output (1, 1) is the global average."""

    def __init__(self, output_size=1):
        super().__init__()
        if isinstance(output_size, (int, np.integer)) or output_size is None:
            size = (output_size, output_size)
        else:
            try:
                size = tuple(output_size)
            except TypeError:
                size = ()
        if len(size) != 2 or any(v is not None and (isinstance(v, bool) or not isinstance(
                v, (int, np.integer)) or v < 1) for v in size):
            raise ValueError(f"AdaptiveAvgPool2d: output_size must be a positive int, a pair "
                             f"of them or None entries, got {output_size!r}")
        self.output_size = tuple(None if v is None else int(v) for v in size)

    def _out_hw(self, H, W):
        return ops.pool.adaptive_avg_pool2d_output_hw(H, W, self.output_size)

    def _forward(self, x, save):
        if x.ndim != 4:
            raise ValueError(f"AdaptiveAvgPool2d expects (N, C, H, W), got shape {x.shape}")
        H, W = x.shape[2], x.shape[3]
        if H * W == 0:
            raise ValueError(f"AdaptiveAvgPool2d: empty image, input shape {x.shape}")
        ho, wo = self._out_hw(H, W)
        if (ho, wo) == (1, 1):
            y = ops.global_avg_pool_forward(x.local)
        else:
            y = ops.pool.adaptive_avg_pool2d_forward(x.local, (ho, wo))
        return DistTensor(y, x.distribution, x.shape[:2] + (ho, wo)), (x.distribution, x.shape)

    def _backward(self, ctx, dy, need_dx):
        dist, xshape = ctx
        dy = dy.redistribute(dist)
        xl = dist.local_shape(xshape)
        if tuple(dy.shape[2:]) == (1, 1):
            dx = ops.global_avg_pool_backward(dy.local, xl)
        else:
            dx = ops.pool.adaptive_avg_pool2d_backward(dy.local, xl)
        return DistTensor(dx, dist, xshape)

    def __repr__(self):
        o = self.output_size
        return f"AdaptiveAvgPool2d({o[0] if o[0] == o[1] and o[0] is not None else o})"


class Dropout(_Elementwise):
    """Dropout with PyTorch's scaling (kept elements times ``1/(1-p)``), any shape and
    distribution; identity in eval mode and for ``p=0``.

    The mask depends only on ``(seed, step, global element index)``
    (:func:`distconv.ops.dropout.dropout_mask`), so a rank's block is the same under every
    plan and rank count and the blocks join into the mask of the whole tensor:

    * ``seed``: given, or drawn at construction from the model seed
      (:func:`distconv.manual_seed`; the same draw on every rank, like weight init);
    * ``step``: this module's count of training-mode calls so far (starting at 0; every rank
      makes the same calls, so it is the same everywhere). Set ``m.step`` to replay a call.
      It is not part of the state dict (PyTorch has no dropout state), so a resumed run
      draws the masks of step 0 onwards again.

    Backward multiplies by the mask of the same call. The random stream is not PyTorch's.
    """

    def __init__(self, p=0.5, inplace=False, seed=None):
        super().__init__()
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p
        self.seed = int(init_rng().integers(0, 2 ** 63)) if seed is None else int(seed)
        self.step = 0

    def _input(self, x):
        nd = getattr(x, "ndim", 2)
        if not isinstance(x, DistTensor):
            return as_dist(x, Strategy().activation_distribution(max(nd, 1)))
        if x.distribution.pending:
            x = x.redistribute(x.distribution.replace(pending=()))
        return x

    def _forward(self, x, save):
        if not self.training or self.p == 0.0:
            return DistTensor(x.local, x.distribution, x.shape), None
        if is_meta(x.local):  # shape-only (distconv.trace, the planner): no mask to hash
            mask = MetaArray(tuple(x.local.shape), x.dtype)
        else:
            mask = ops.dropout.dropout_mask(x.shape, x.distribution.slices(x.shape), self.p,
                                            self.seed, self.step, x.dtype, xp=get_xp())
        self.step += 1
        y = DistTensor(x.local * mask, x.distribution, x.shape)
        return y, ((x.distribution, mask) if save else None)

    def _backward(self, ctx, dy, need_dx):
        if ctx is None:  # identity
            return dy
        dist, mask = ctx
        dy = dy.redistribute(dist)
        return DistTensor(dy.local * mask, dist, dy.shape)

    def __repr__(self):
        return f"Dropout(p={self.p})"


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
