"""The Python a distconv layer spends besides its kernels, measured on one rank.

:class:`OverheadTimes` is the part of :class:`.compute.ComputeModel` that times the real
layers of :mod:`distconv.nn` on a one-element input on a grid of this process alone
(:mod:`distconv.selfrank`), minus their kernels (:meth:`layer_overhead`).
"""
from __future__ import annotations

import sys

import numpy as np

from ..selfrank import self_grid, self_strategy
from .timing import _median_time

OVERHEAD_KINDS = ("conv", "linear", "bn", "relu", "maxpool", "avgpool", "gap", "adaptive",
                  "flatten", "join", "redistribute")


class OverheadTimes:
    """``layer_overhead`` of :class:`.compute.ComputeModel`."""

    def layer_overhead(self, kind, bias=False):
        """``(forward, backward)`` seconds a distconv layer of ``kind`` (one of
        :data:`OVERHEAD_KINDS`; ``"join"`` is a residual join, ``"gap"`` an
        ``AdaptiveAvgPool2d`` to 1x1 and ``"adaptive"`` one to a larger output) spends
        besides its kernels:
        the Python of the layer, its checks, distributions and DistTensors, the no-op
        redistributions and the small per-channel arithmetic around the kernels.
        ``"redistribute"``: the Python of ``DistTensor.redistribute`` around ONE
        collective (both values alike), timed on a move between two one-rank grids (the
        between-grid path, whose alltoallv has no MPI on one rank); the cost model adds
        it to every collective a redistribution issues, which the alpha-beta machine
        (calibrated on bare ``Communicator`` calls) does not include. On ``p`` ranks the
        between-grid path loops over the ranks, so this one-rank value is a lower bound.

        Measured as the time of the real layer (``bias`` for conv and linear) on a
        one-element input, on a grid of this process alone (no collective: safe on any
        rank of a running job, alone), minus the kernels' own times on that input; the
        median of ``max(reps, 25)`` back-to-back calls (no cache eviction: the layers'
        Python stays cached through a step), clamped at 0.
        Cached as ``overhead_fwd|kind=<kind>,bias=<0|1>|<context>`` (and ``overhead_bwd``).
        Not cached while ``measure=False``: 0.0 (the fitted model has only the kernels'
        per-call ``t0``). Multiplied by ``scale`` like every time.
        """
        if kind not in OVERHEAD_KINDS:
            raise ValueError(f"layer_overhead: unknown kind {kind!r}; expected one of "
                             f"{OVERHEAD_KINDS}")
        b = int(bool(bias)) if kind in ("conv", "linear") else 0
        keys = [f"overhead_{ph}|kind={kind},bias={b}|{self.context}" for ph in ("fwd", "bwd")]
        if all(k in self.entries for k in keys):
            self.hits += 2
        elif self.measure:
            got = self._measure_overhead(kind, bool(b))
            for k, t in zip(keys, got):
                self.entries[k] = t
                self.measured += 1
                if self.verbose:
                    print(f"compute: {k} = {t * 1e3:.4f} ms", file=sys.stderr)
        return tuple(self.entries.get(k, 0.0) * self.scale for k in keys)

    def _measure_overhead(self, kind, bias):
        if self.backend == "cupy":  # the GPU path would need stream syncs: not modelled
            return [0.0, 0.0]
        reps = max(self.reps, 25)
        # The kernels on the one-element input, timed the same way as the layer: back to
        # back, without cache eviction (what is measured here is the Python that every
        # layer call runs, whose code and objects stay cached through a training step;
        # evicting them would time a cold interpreter), by a private uncached model.
        hot = type(self)(measure=True, dtype=self.dtype, backend=self.backend,
                        threads=self.threads, reps=reps, evict_bytes=0)

        def run(timer, fams):
            fwd, setup, bwd, kf, kb = _overhead_case(hot, kind, bias)
            out = []
            single = self._single_thread()
            for fn, pre, k in ((fwd, None, kf), (bwd, setup, kb)):
                pre = pre if pre is not None else (lambda: None)
                pre()
                fn()  # warm-up
                t = _median_time(fn, reps, before=pre, single=single)
                out.append(max(0.0, t - k))
            return out
        return self._measured((), run)


def _overhead_case(cm, kind, bias):
    """``(forward, backward_setup, backward, kernel forward s, kernel backward s)`` of a
    real distconv layer of ``kind`` on a one-element input of this model's dtype, one rank
    (callables; ``backward_setup`` runs the untimed forward each backward needs)."""
    from .. import nn
    from ..functional import add as _add
    from ..nn.module import kept_init_seed
    from ..tensor import DistTensor
    st = self_strategy()
    dt = np.dtype(cm.dtype)
    with kept_init_seed():  # building layers must not move the model's initial weights
        if kind == "conv":
            layer = nn.Conv2d(1, 1, 1, bias=bias, strategy=st)
            shape, kern = (1, 1, 1, 1), cm.conv(1, 1, 1, 1, 1, 1, 1, 0, 1)
            kern = (kern[0], kern[1] + kern[2])
        elif kind == "linear":
            layer = nn.Linear(1, 1, bias=bias, strategy=st)
            shape, kern = (1, 1), cm.linear(1, 1, 1)
            kern = (kern[0], kern[1] + kern[2])
        elif kind == "bn":
            layer, shape = nn.BatchNorm2d(1, strategy=st), (2, 1, 1, 1)
            kern = cm.bn(2, 1, 1, 1)
        elif kind == "relu":
            layer, shape, kern = nn.ReLU(), (1, 1, 1, 1), cm.relu(1)
        elif kind in ("maxpool", "avgpool"):
            layer = (nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d)(2, 2)
            shape = (1, 1, 2, 2)
            kern = getattr(cm, kind)(1, 1, 2, 2, 2, 2, 0)
        elif kind == "gap":
            layer, shape = nn.AdaptiveAvgPool2d(1), (1, 1, 1, 1)
            kern = cm.global_avgpool(1, 1, 1, 1)
        elif kind == "adaptive":  # AdaptiveAvgPool2d to more than 1x1 (its GEMM path)
            layer, shape = nn.AdaptiveAvgPool2d(2), (1, 1, 2, 2)
            kern = cm.adaptive_avgpool(1, 1, 2, 2, 2, 2)
        elif kind == "flatten":
            layer, shape, kern = nn.Flatten(), (1, 1, 1, 1), (0.0, 0.0)
        elif kind == "join":
            layer, shape = None, (1, 1, 1, 1)
            kern = (cm.add(1), cm.add(1))
        elif kind == "redistribute":
            layer, shape, kern = None, (1, 1, 1, 1), (0.0, 0.0)
        else:
            raise ValueError(f"layer_overhead: unknown kind {kind!r}; expected one of "
                             f"{OVERHEAD_KINDS}")
    act = st.activation_distribution(len(shape))
    x = DistTensor(np.ones(shape, dt), act, shape)
    if kind == "redistribute":
        # a move to another grid over the same (one) rank: DistTensor.redistribute, the
        # between-grid path and a one-rank alltoallv (no MPI): the Python around one
        # collective of a redistribution
        other = act.__class__(self_grid(fresh=True), list(act.split))
        return ((lambda: x.redistribute(other)), (lambda: None),
                (lambda: x.redistribute(other)), 0.0, 0.0)
    if layer is None:  # residual join: the add forward, the gradient split backward
        return ((lambda: _add(x, x)), (lambda: None),
                (lambda: _add(x.redistribute(act), x.redistribute(act))), *kern)
    y = layer(x)
    dy = DistTensor(np.ones(y.local.shape, dt), y.distribution, y.shape)
    return (lambda: layer(x)), (lambda: layer(x)), (lambda: layer.backward(dy)), *kern
