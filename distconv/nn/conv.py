"""Conv2d and Linear under any Strategy(sample, channel, filter).

Both are the same algorithm on different local math. For a layer on an
``s×c×f`` grid, with activations split on N over ``sample`` and on C over
``(channel, filter)``:

* weight ``(F, C, ...)`` split on F over ``filter`` and on C over ``channel``
  (each rank stores ``|w|/(c*f)``), replicated over ``sample``; bias split like
  the output channels, over ``(channel, filter)``;
* forward: ``x`` -> C over ``channel`` (allgather over ``filter``), local partial
  ``y`` pending over ``channel`` -> reduce-scatter over ``channel`` (and, for
  ``c>1`` and ``f>1``, one alltoallv that puts the blocks in activation order);
* backward: ``dy`` -> F over ``filter`` (allgather over ``channel``); ``dx``
  local partial pending over ``filter`` -> reduce-scatter over ``filter``;
  ``dw`` from the kept ``x`` and the gathered ``dy``, pending over ``sample``
  until :func:`distconv.nn.sync_gradients`.

Conv2d under a spatial strategy (``height``/``width`` above 1, with any ``sample``,
``channel`` and ``filter``) runs the same algorithm with H split over ``height`` and W over
``width`` in every layout; its local convolution is :func:`distconv.spatial.conv2d_core`
(a halo exchange among the ranks that hold the same samples and channels, then the local
kernels on the window). The weight is replicated over sample×height×width, so ``dw`` and
``db`` are pending over those axes and join the same segmented allreduce.
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops, spatial
from ..ops.geometry import pair
from ..distribution import Distribution
from ..strategy import Strategy
from ..tensor import DistTensor
from .module import Layer, check_dtype, default_dtype, init_rng, new_param


def split_layouts(strategy: Strategy, ndim: int, wndim: int) -> dict:
    """The splits (one entry per dimension, no grid) of the layouts a Conv2d or Linear
    under ``strategy`` works in: ``"act"`` (its input and output between layers),
    ``"xc"`` (the input it computes on: C over ``channel``), ``"yf"`` (the output it
    computes: F over ``filter``), ``"w"`` (the weight, ``wndim`` dims) and ``"b"`` (the
    bias). H and W of x and y are split as the activations are (a spatial strategy), else
    whole. The planner lays the same layouts out on its own grids."""
    act = strategy.activation_split(ndim)
    rest = list(act[2:])
    return {"act": act, "xc": [("sample",), ("channel",)] + rest,
            "yf": [("sample",), ("filter",)] + rest,
            "w": [("filter",), ("channel",)] + [None] * (wndim - 2),
            "b": [("channel", "filter")]}


class _SplitOp(Layer):
    """Shared channel/filter/sample algorithm; subclasses give the local math."""

    ndim = 4

    def __init__(self, in_features, out_features, weight_shape, bias, strategy):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"{type(self).__name__}: in and out sizes must be >= 1, got "
                             f"{in_features} and {out_features}")
        self.strategy = self._checked(Strategy() if strategy is None else (
            Strategy.parse(strategy) if isinstance(strategy, str) else strategy))
        rng = init_rng()
        fan_in = int(np.prod(weight_shape[1:]))
        bound = 1.0 / math.sqrt(fan_in)
        dt = default_dtype()
        w = rng.uniform(-bound, bound, size=weight_shape).astype(dt)
        self._dists()
        self.weight = new_param(w, self._wdist)
        if bias:
            b = rng.uniform(-bound, bound, size=(out_features,)).astype(dt)
            self.bias = new_param(b, self._bdist)
        else:
            self.bias = None

    def _dists(self):
        g = self.strategy.grid()
        sp = split_layouts(self.strategy, self.ndim, len(self.wshape))
        self._grid = g
        self._wdist = Distribution(g, sp["w"])
        self._bdist = Distribution(g, sp["b"])
        self._act = Distribution(g, sp["act"])
        self._xc = Distribution(g, sp["xc"])
        self._yf = Distribution(g, sp["yf"])

    def _checked(self, strategy: Strategy) -> Strategy:
        """``strategy`` if this layer can run it; the same ValueError on every rank if not."""
        if strategy.spatial:
            name = type(self).__name__
            if self.ndim != 4:
                raise ValueError(f"{name}: strategy {strategy} splits height/width, but "
                                 f"{name} has no spatial dims; give it a strategy without "
                                 f"height/width")
        return strategy

    def _apply_strategy(self, strategy: Strategy) -> None:
        before, self.strategy = self.strategy, self._checked(strategy)
        try:
            self._dists()
        except ValueError:  # does not fit the ranks: the layer stays as it was
            self.strategy = before
            raise
        self.weight.data = self.weight.data.redistribute(self._wdist)
        self.weight.grad = None
        if self.bias is not None:
            self.bias.data = self.bias.data.redistribute(self._bdist)
            self.bias.grad = None

    @property
    def input_distribution(self) -> Distribution:
        return self._act

    # --------------------------------------------------------------- passes
    def _forward(self, x, save):
        if self.strategy.spatial:
            return self._spatial_forward(x, save)
        self._check_input(x)
        check_dtype(x, self.weight.data.dtype, type(self).__name__)
        xc = x.redistribute(self._xc)
        y_shape = self._out_shape(x.shape)
        y_local = self._local_forward(xc.local, self.weight.data.local)
        yp = DistTensor(y_local, self._yf.replace(pending=("channel",)), y_shape)
        y = yp.redistribute(self._act)
        if self.bias is not None:
            b = self.bias.data.local.reshape((1, -1) + (1,) * (self.ndim - 2))
            y = DistTensor(y.local + b, y.distribution, y.shape)
        return y, ((x.distribution, x.shape, xc) if save else None)

    def _backward(self, ctx, dy, need_dx):
        if self.strategy.spatial:
            return self._spatial_backward(ctx, dy, need_dx)
        x_dist, x_shape, xc = ctx
        rep = self._wdist.replica_axes
        if self.bias is not None:
            # the bias is split like the output channels: move dy there once, then on
            dy = dy.redistribute(self._act)
            axes = (0,) + tuple(range(2, self.ndim))
            self.bias.accumulate(dy.local.sum(axis=axes), rep)
        dyf = dy.redistribute(self._yf)
        w = self.weight.data.local
        self.weight.accumulate(self._local_backward_filter(xc.local, dyf.local), rep)
        if not need_dx:
            return None
        dxp = self._local_backward_data(dyf.local, w, x_shape)
        dx = DistTensor(dxp, self._xc.replace(pending=("filter",)), x_shape)
        return dx.redistribute(x_dist.replace(pending=()))


class Conv2d(_SplitOp):
    """2-D convolution, PyTorch's arguments and OIHW weight, under any Strategy.

    x: (N, in_channels, H, W) -> y: (N, out_channels, H', W').
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, bias=True, strategy=None):
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1 \
                or min(self.padding) < 0:
            raise ValueError(f"Conv2d: bad kernel_size/stride/padding/dilation "
                             f"{self.kernel_size}/{self.stride}/{self.padding}/{self.dilation}")
        self.wshape = (self.out_channels, self.in_channels) + self.kernel_size
        super().__init__(self.in_channels, self.out_channels, self.wshape, bias, strategy)

    def _check_input(self, x):
        if x.ndim != 4:
            raise ValueError(f"Conv2d expects a 4-D (N, C, H, W) input, got shape {x.shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d(in_channels={self.in_channels}) got an input with "
                             f"{x.shape[1]} channels (shape {x.shape})")
        self._out_shape(x.shape)

    def _spatial_forward(self, x, save):
        """The channel/filter algorithm of ``_forward`` with H and W split too: the local
        convolution is :func:`distconv.spatial.conv2d_core` (a halo exchange over the
        height/width axes, among the ranks that hold the same samples and channels)."""
        self._check_input(x)
        check_dtype(x, self.weight.data.dtype, "Conv2d")
        xc = x.redistribute(self._xc)
        pads = tuple((p, p) for p in self.padding)
        yp, bwd = spatial.conv2d_core(xc, self.weight.data.local, None, self.stride, pads,
                                      self.dilation, filters=(self.out_channels, ("filter",)),
                                      pending=("channel",))
        y = yp.redistribute(self._act)
        if self.bias is not None:
            y = DistTensor(y.local + self.bias.data.local.reshape(1, -1, 1, 1),
                           y.distribution, y.shape)
        return y, ((x.distribution, bwd) if save else None)

    def _spatial_backward(self, ctx, dy, need_dx):
        x_dist, bwd = ctx
        if self.bias is not None:
            dy = dy.redistribute(self._act)
            self.bias.accumulate(dy.local.sum(axis=(0, 2, 3)), self._bdist.replica_axes)
        dx, dw, _ = bwd(dy, need_dx, True, False)
        # the weight is replicated over sample, height and width: dw is pending over them
        self.weight.accumulate(dw, self._wdist.replica_axes)
        return dx.redistribute(x_dist.replace(pending=())) if need_dx else None

    def _out_shape(self, s):
        ho, wo = ops.conv2d_output_hw(s[2], s[3], self.kernel_size, self.stride,
                                      self.padding, self.dilation)
        return (s[0], self.out_channels, ho, wo)

    def _local_forward(self, x, w):
        return ops.conv2d_forward(x, w, self.stride, self.padding, self.dilation)

    def _local_backward_data(self, dy, w, x_shape):
        return ops.conv2d_backward_data(dy, w, tuple(x_shape[2:]), self.stride,
                                        self.padding, self.dilation)

    def _local_backward_filter(self, x, dy):
        return ops.conv2d_backward_filter(x, dy, self.kernel_size, self.stride,
                                          self.padding, self.dilation)

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, strategy={self.strategy})")


class Linear(_SplitOp):
    """Fully connected layer, weight (out_features, in_features), under any Strategy.

    x: (N, in_features) -> y: (N, out_features). ``filter`` splits the output
    features (column-parallel), ``channel`` the input features (row-parallel).
    """

    ndim = 2

    def __init__(self, in_features, out_features, bias=True, strategy=None):
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.wshape = (self.out_features, self.in_features)
        super().__init__(self.in_features, self.out_features, self.wshape, bias, strategy)

    def _check_input(self, x):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear(in_features={self.in_features}) expects input shape "
                             f"(N, {self.in_features}), got {x.shape}")

    def _out_shape(self, s):
        return (s[0], self.out_features)

    def _local_forward(self, x, w):
        return x @ w.T

    def _local_backward_data(self, dy, w, x_shape):
        return dy @ w

    def _local_backward_filter(self, x, dy):
        return dy.T @ x

    def __repr__(self):
        return (f"Linear({self.in_features}, {self.out_features}, "
                f"bias={self.bias is not None}, strategy={self.strategy})")
