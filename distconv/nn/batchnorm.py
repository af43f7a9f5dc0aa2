"""BatchNorm2d with statistics reduced only over the ranks that share a channel block."""
from __future__ import annotations

import numpy as np

from .. import ops
from ..backend import get_xp, to_numpy
from ..distribution import Distribution
from ..strategy import Strategy
from ..tensor import DistTensor
from .module import Layer, check_dtype, default_dtype, new_param


class BatchNorm2d(Layer):
    """Batch normalisation over (N, H, W) per channel, PyTorch's arguments and state names.

    x: (N, C, H, W) -> y: same shape. Weight, bias and running statistics are split on C
    like the activations (over ``(channel, filter)``), so each rank keeps only its channels.
    In training the per-channel sums are allreduced over the ranks that hold the same
    channels and different samples (the sample group; under a spatial strategy also the
    other height/width blocks: sample×height×width), never over the whole world.
    ``global_stats=False`` normalises with each rank's own batch statistics, like LBANN's
    local batch norm (running statistics are still averaged over the sample group so that
    every replica keeps the same values).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, strategy=None, global_stats=True):
        super().__init__()
        self.num_features = int(num_features)
        if self.num_features < 1:
            raise ValueError(f"BatchNorm2d: num_features must be >= 1, got {num_features}")
        self.eps, self.momentum = float(eps), momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.global_stats = bool(global_stats)
        self.strategy = Strategy() if strategy is None else (
            Strategy.parse(strategy) if isinstance(strategy, str) else strategy)
        self._dists()
        dt = default_dtype()
        C = self.num_features
        if affine:
            self.weight = new_param(np.ones(C, dt), self._cdist)
            self.bias = new_param(np.zeros(C, dt), self._cdist)
        else:
            self.weight = self.bias = None
        if track_running_stats:
            self.register_buffer("running_mean", new_param(np.zeros(C, dt), self._cdist).data)
            self.register_buffer("running_var", new_param(np.ones(C, dt), self._cdist).data)
            self.register_buffer("num_batches_tracked",
                                 new_param(np.zeros((), np.int64), self._sdist).data)

    def _dists(self):
        g = self.strategy.grid()
        self._act = self.strategy.activation_distribution(4)
        self._stats = None  # (group axes, statistics pending over them, summed)
        self._cdist = Distribution(g, [self._act.split[1]])
        self._sdist = Distribution(g, [])

    def _apply_strategy(self, strategy):
        self.strategy = strategy
        self._dists()
        for p in (self.weight, self.bias):
            if p is not None:
                p.data = p.data.redistribute(self._cdist)
                p.grad = None
        if self.track_running_stats:
            for name in ("running_mean", "running_var"):
                self.register_buffer(name, self._buffers[name].redistribute(self._cdist))
            self.register_buffer("num_batches_tracked",
                                 self._buffers["num_batches_tracked"].redistribute(self._sdist))

    _version = 2  # torch's _NormBase: version 2 added num_batches_tracked

    def _upgrade_state(self, state, prefix, version) -> None:
        """torch's compatibility rule: a state dict of version < 2 (or without metadata)
        may lack ``num_batches_tracked``; the current count is kept."""
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state:
            state[key] = to_numpy(self._buffers["num_batches_tracked"].local).copy()

    def _group_axes(self) -> tuple:
        """The grid axes of the ranks holding the same channels and other samples (and,
        under a spatial strategy, other height/width blocks): sample×height×width."""
        sp = self._act.split
        return sp[0] + sp[2] + sp[3]

    def _group(self):
        """Communicator over :meth:`_group_axes`."""
        return self._act.grid.sub(self._group_axes())

    def _group_sum(self, a, b):
        """``(a, b)`` (this rank's per-channel sums, ``(C_loc,)`` float64 each) summed over
        :meth:`_group`: one allreduce, issued as the move of a ``(2, C)`` tensor pending
        over sample×height×width (``DistTensor.redistribute``, so that the planner sees
        it as a move)."""
        axes = self._group_axes()
        got = self._stats
        if got is None or got[0] != axes:
            d = Distribution(self._act.grid, [None, self._act.split[1]], pending=axes)
            got = self._stats = (axes, d, d.replace(pending=()))
        t = DistTensor(get_xp().stack([a, b]), got[1], (2, self.num_features))
        red = t.redistribute(got[2]).local
        return red[0], red[1]

    @property
    def input_distribution(self) -> Distribution:
        return self._act

    def _forward(self, x, save):
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d({self.num_features}) expects (N, {self.num_features}, "
                             f"H, W) input, got shape {x.shape}")
        if self.weight is not None:
            check_dtype(x, self.weight.data.dtype, "BatchNorm2d")
        in_dist = x.distribution  # backward returns dx in this layout
        x = x.redistribute(self._act)
        xl = x.local
        xp = get_xp()
        w = self.weight.data.local if self.weight is not None else None
        b = self.bias.data.local if self.bias is not None else None
        use_batch = self.training or not self.track_running_stats
        if use_batch:
            s, ss, n = ops.bn_local_stats(xl)
            if self.global_stats:
                grp = self._group()
                s, ss = self._group_sum(s, ss)
                # the group holds every sample, all of H and W: the count per channel
                n = x.shape[0] * x.shape[2] * x.shape[3]
            else:
                grp = None
            bad = n == 0 or (self.training and n == 1 and self.global_stats)
            msg = (f"BatchNorm2d: expected more than 1 value per channel when "
                   f"training, got input shape {x.shape}")
            if self.global_stats:  # n is the global count: the same on every rank
                if bad:
                    raise ValueError(msg)
            else:  # n is this rank's own count: raise on every rank alike, not a hang
                x.grid.comm.agree(not bad, msg)
            mean, invstd, var_unb = ops.bn_mean_invstd(s, ss, n, self.eps)
            if self.training and self.track_running_stats:
                self._update_running(mean, var_unb, grp)
        else:
            mean = self.running_mean.local.astype(np.float64)
            invstd = 1.0 / xp.sqrt(self.running_var.local.astype(np.float64) + self.eps)
            n = None
        y = ops.bn_forward_apply(xl, mean, invstd, w, b)
        ctx = (x, mean, invstd, n, use_batch, in_dist) if save else None
        return DistTensor(y, x.distribution, x.shape), ctx

    def _update_running(self, mean, var_unb, grp):
        xp = get_xp()
        if not self.global_stats and self._group().size > 1:
            g = self._group()
            both = g.allreduce(xp.concatenate([mean, var_unb])) / g.size
            C = mean.shape[0]
            mean, var_unb = both[:C], both[C:]
        self.num_batches_tracked.local[...] += 1
        mom = self.momentum
        if mom is None:  # cumulative moving average, as PyTorch
            mom = 1.0 / float(self.num_batches_tracked.local)
        rm, rv = self.running_mean.local, self.running_var.local
        rm *= 1 - mom
        rm += (mom * mean).astype(rm.dtype)
        rv *= 1 - mom
        rv += (mom * var_unb).astype(rv.dtype)

    def _backward(self, ctx, dy, need_dx):
        x, mean, invstd, n, use_batch, in_dist = ctx
        dy = dy.redistribute(x.distribution)
        w = self.weight.data.local if self.weight is not None else None
        sdy, sdyx = ops.bn_backward_reduce(dy.local, x.local, mean)
        rep = self._cdist.replica_axes
        if use_batch:
            if self.global_stats:
                sdy, sdyx = self._group_sum(sdy, sdyx)
                pending = ()  # the sums are global already: the gradient is complete
            else:
                pending = rep
            dx = ops.bn_backward_apply(dy.local, x.local, mean, invstd, w, sdy, sdyx, n)
        else:  # eval mode: the statistics are constants
            scale = invstd if w is None else invstd * w.astype(np.float64)
            dx = (dy.local * scale.reshape(1, -1, 1, 1).astype(dy.dtype)).astype(dy.dtype)
            pending = rep
        if self.weight is not None:
            dw, db = ops.bn_param_grads(sdy, sdyx, invstd)
            dt = self.weight.data.dtype
            self.weight.accumulate(dw.astype(dt), pending)
            self.bias.accumulate(db.astype(dt), pending)
        return DistTensor(dx, x.distribution, x.shape).redistribute(in_dist.replace(pending=()))

    def __repr__(self):
        return (f"BatchNorm2d({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"strategy={self.strategy}, global_stats={self.global_stats})")
