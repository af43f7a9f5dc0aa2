"""What the compute model times for each op: the real kernels of :mod:`distconv.ops`.

:class:`OpTimes` is the half of :class:`.compute.ComputeModel` that names, per op, the
passes (families of :mod:`.work`) and how to run them on random inputs of the local shard
shape; the cache, measuring and fitting machinery is the other half. Each method returns
seconds per pass and 0.0 for a shard with any zero extent.
"""
from __future__ import annotations

import types

from .. import ops
from ..ops.geometry import pair

# Optimizer settings the update is timed with (a typical ResNet recipe; Adam's defaults).
SGD_SETTINGS = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False, dampening=0.0)
ADAM_SETTINGS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


class OpTimes:
    """Per-op timing recipes of :class:`.compute.ComputeModel` (uses its ``_times`` and
    ``_rand``)."""

    def conv(self, n, c, h, w, f, kernel, stride, padding, dilation):
        """(forward, backward_data, backward_filter) seconds of ``ops.conv2d_*`` on
        x (n, c, h, w), w (f, c, kh, kw), dy (n, f, ho, wo)."""
        k, s, p, d = pair(kernel), pair(stride), pair(padding), pair(dilation)
        if min(n, c, h, w, f) <= 0:
            return (0.0, 0.0, 0.0)
        ho, wo = ops.conv2d_output_hw(h, w, k, s, p, d)
        args = dict(n=n, c=c, h=h, w=w, f=f, k=k, s=s, p=p, d=d)

        def run(timer, fams):
            x, wt, dy = self._rand(n, c, h, w), self._rand(f, c, *k), self._rand(n, f, ho, wo)
            fns = {"conv_fwd": lambda: ops.conv2d_forward(x, wt, s, p, d),
                   "conv_bwd_data": lambda: ops.conv2d_backward_data(dy, wt, (h, w), s, p, d),
                   "conv_bwd_filter": lambda: ops.conv2d_backward_filter(x, dy, k, s, p, d)}
            return {fam: timer(fns[fam]) for fam in fams}
        return self._times(("conv_fwd", "conv_bwd_data", "conv_bwd_filter"), args, run)

    def linear(self, n, c, f):
        """(forward, backward_data, backward_filter) seconds of x (n, c) @ w.T with
        w (f, c); dy @ w; dy.T @ x with dy (n, f)."""
        if min(n, c, f) <= 0:
            return (0.0, 0.0, 0.0)

        def run(timer, fams):
            x, wt, dy = self._rand(n, c), self._rand(f, c), self._rand(n, f)
            fns = {"linear_fwd": lambda: x @ wt.T, "linear_bwd_data": lambda: dy @ wt,
                   "linear_bwd_filter": lambda: dy.T @ x}
            return {fam: timer(fns[fam]) for fam in fams}
        return self._times(("linear_fwd", "linear_bwd_data", "linear_bwd_filter"),
                           dict(n=n, c=c, f=f), run)

    def bn(self, n, c, h, w):
        """(forward, backward) seconds of training batch norm on x (n, c, h, w): stats +
        mean/invstd + apply; backward reduce + apply + parameter gradients."""
        if min(n, c, h, w) <= 0:
            return (0.0, 0.0)

        def run(timer, fams):
            x, dy = self._rand(n, c, h, w), self._rand(n, c, h, w)
            g, b = self._rand(c), self._rand(c)
            cnt = n * h * w
            mean, inv, _ = ops.bn_mean_invstd(*ops.bn_local_stats(x))

            def fwd():
                m, i, _ = ops.bn_mean_invstd(*ops.bn_local_stats(x))
                return ops.bn_forward_apply(x, m, i, g, b)

            def bwd():
                sdy, sdyx = ops.bn_backward_reduce(dy, x, mean)
                dx = ops.bn_backward_apply(dy, x, mean, inv, g, sdy, sdyx, cnt)
                return dx, ops.bn_param_grads(sdy, sdyx, inv)
            fns = {"bn_fwd": fwd, "bn_bwd": bwd}
            return {fam: timer(fns[fam]) for fam in fams}
        return self._times(("bn_fwd", "bn_bwd"), dict(n=n, c=c, h=h, w=w), run)

    def relu(self, numel):
        """(forward, backward) seconds of ReLU on an array of ``numel`` elements."""
        if numel <= 0:
            return (0.0, 0.0)

        def run(timer, fams):
            x, dy = self._rand(numel), self._rand(numel)
            y = ops.relu_forward(x)
            fns = {"relu_fwd": lambda: ops.relu_forward(x),
                   "relu_bwd": lambda: ops.relu_backward(dy, y)}
            return {fam: timer(fns[fam]) for fam in fams}
        return self._times(("relu_fwd", "relu_bwd"), dict(numel=numel), run)

    def _pool(self, kind, n, c, h, w, kernel, stride, padding):
        k = pair(kernel)
        s = k if stride is None else pair(stride)
        p = pair(padding)
        if min(n, c, h, w) <= 0:
            return (0.0, 0.0)
        fams = (kind + "_fwd", kind + "_bwd")

        def run(timer, want):
            x = self._rand(n, c, h, w)
            if kind == "maxpool":
                y, arg = ops.max_pool2d_forward(x, k, s, p)
                dy = self._rand(*y.shape)
                fns = {fams[0]: lambda: ops.max_pool2d_forward(x, k, s, p),
                       fams[1]: lambda: ops.max_pool2d_backward(dy, arg, x.shape, k, s, p)}
            else:
                dy = self._rand(*ops.avg_pool2d_forward(x, k, s, p).shape)
                fns = {fams[0]: lambda: ops.avg_pool2d_forward(x, k, s, p),
                       fams[1]: lambda: ops.avg_pool2d_backward(dy, x.shape, k, s, p)}
            return {fam: timer(fns[fam]) for fam in want}
        return self._times(fams, dict(n=n, c=c, h=h, w=w, k=k, s=s, p=p), run)

    def maxpool(self, n, c, h, w, kernel, stride, padding):
        """(forward, backward) seconds of max pooling x (n, c, h, w) (stride None = kernel)."""
        return self._pool("maxpool", n, c, h, w, kernel, stride, padding)

    def avgpool(self, n, c, h, w, kernel, stride, padding):
        """(forward, backward) seconds of average pooling x (n, c, h, w)."""
        return self._pool("avgpool", n, c, h, w, kernel, stride, padding)

    def global_avgpool(self, n, c, h, w):
        """(forward, backward) seconds of global average pooling x (n, c, h, w) -> (n, c, 1, 1)."""
        if min(n, c, h, w) <= 0:
            return (0.0, 0.0)

        def run(timer, fams):
            x, dy = self._rand(n, c, h, w), self._rand(n, c, 1, 1)
            fns = {"gap_fwd": lambda: ops.global_avg_pool_forward(x),
                   "gap_bwd": lambda: ops.global_avg_pool_backward(dy, x.shape)}
            return {fam: timer(fns[fam]) for fam in fams}
        return self._times(("gap_fwd", "gap_bwd"), dict(n=n, c=c, h=h, w=w), run)

    def adaptive_avgpool(self, n, c, h, w, ho, wo):
        """(forward, backward) seconds of adaptive average pooling x (n, c, h, w) ->
        (n, c, ho, wo) with PyTorch's bins (:func:`distconv.ops.pool.
        adaptive_avg_pool2d_forward`, two small GEMMs; the (1, 1) case is
        :meth:`global_avgpool`)."""
        if min(n, c, h, w, ho, wo) <= 0:
            return (0.0, 0.0)
        from ..ops import pool as _pool

        def run(timer, fams):
            x, dy = self._rand(n, c, h, w), self._rand(n, c, ho, wo)
            fns = {"adaptive_fwd": lambda: _pool.adaptive_avg_pool2d_forward(x, (ho, wo)),
                   "adaptive_bwd": lambda: _pool.adaptive_avg_pool2d_backward(
                       dy, (n, c, h, w))}
            return {fam: timer(fns[fam]) for fam in fams}
        return self._times(("adaptive_fwd", "adaptive_bwd"),
                           dict(n=n, c=c, h=h, w=w, ho=ho, wo=wo), run)

    def add(self, numel):
        """Seconds of ``a + b`` into a new array, a and b of ``numel`` elements."""
        if numel <= 0:
            return 0.0

        def run(timer, fams):
            a, b = self._rand(numel), self._rand(numel)
            return {"add": timer(lambda: a + b)}
        return self._times(("add",), dict(numel=numel), run)[0]

    def update(self, numel, optimizer="sgd"):
        """Seconds of one optimizer step over ``numel`` parameters: ``"sgd"`` is
        distconv.optim.SGD's update (momentum 0.9, weight decay 1e-4), ``"adam"`` Adam's."""
        opt = str(optimizer).lower()
        if opt not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if numel <= 0:
            return 0.0
        fam = "update_" + opt

        def run(timer, fams):
            from .. import optim
            cls, settings = ((optim.SGD, SGD_SETTINGS) if opt == "sgd"
                             else (optim.Adam, ADAM_SETTINGS))
            fake = types.SimpleNamespace(**settings)  # the attributes _update reads
            w, g, state = self._rand(numel), self._rand(numel) * 1e-3, {}
            cls._update(fake, 0, w, g, state)  # creates the state: time the steady step
            return {fam: timer(lambda: cls._update(fake, 0, w, g, state))}
        return self._times((fam,), dict(numel=numel), run)[0]
