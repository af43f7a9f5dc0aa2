"""CrossEntropyLoss over a batch split over samples and, optionally, classes, and the
:class:`Loss` value it returns (a float that can ``backward()``)."""
from __future__ import annotations

import numpy as np

from .. import autograd
from ..backend import get_xp, to_numpy
from ..distribution import Distribution
from ..strategy import Strategy
from ..tensor import DistTensor
from .module import as_dist


class Loss(float):
    """A scalar loss: a ``float`` (the mean over the global batch, the same on every rank)
    that remembers how it was computed.

    ``float(loss)`` and ``loss.item()`` give the value; ``loss.backward()`` backpropagates
    through the recorded graph (``torch.Tensor.backward`` of a scalar). Losses add and
    scale (``l1 + 0.4 * l2``) differentiably; other arithmetic gives plain floats.
    ``distribution``/``shape``: a 0-d tensor replicated over the logits' grid.
    """

    def __new__(cls, value, distribution=None, grad_fn=None):
        obj = float.__new__(cls, value)
        obj.distribution = distribution
        obj.shape = ()
        obj.grad_fn = grad_fn
        return obj

    def item(self) -> float:
        return float(self)

    def backward(self, gradient=1.0) -> None:
        """Gradients of every parameter (``p.grad``) through the recorded graph."""
        if self.grad_fn is None:
            raise RuntimeError("loss.backward(): nothing was recorded for this loss (it was "
                               "computed under dc.no_grad(), or is not a loss of recorded "
                               "logits)")
        xp = get_xp()
        g = DistTensor(xp.asarray(float(gradient), dtype=np.float64), self.distribution, ())
        autograd.backward([self], [g])

    def __add__(self, other):
        if isinstance(other, Loss) and (self.grad_fn is not None or other.grad_fn is not None):
            return _combine(float(self) + float(other), [(self, 1.0), (other, 1.0)])
        return float(self) + other

    __radd__ = __add__

    def __mul__(self, other):
        if isinstance(other, (int, float)) and not isinstance(other, Loss) \
                and self.grad_fn is not None:
            return _combine(float(self) * other, [(self, float(other))])
        return float(self) * other

    __rmul__ = __mul__

    def __repr__(self):
        return f"Loss({float(self)!r})"


def _combine(value, terms):
    """``sum(c * loss)`` as a recorded Loss (recorded terms only)."""
    rec = [(t, c) for t, c in terms if t.grad_fn is not None]
    out = Loss(value, rec[0][0].distribution)

    def backward(dy, needs):
        return tuple(DistTensor(dy.local * c, t.distribution, ()) for t, c in rec)

    autograd.record("loss_sum", backward, [t for t, _ in rec], out)
    return out


class CrossEntropyLoss:
    """Mean cross-entropy over the global batch, like ``torch.nn.CrossEntropyLoss()``.

    ``criterion(logits, labels)``: logits (N, K), a DistTensor (N split over any axes, K
    split or not) or the same global array on every rank; labels (N,) integers in
    ``[0, K)``, a global array every rank passes alike (or a DistTensor). Returns the loss
    as a :class:`Loss` on every rank (logits on a placed grid: its first rank broadcasts
    the value over the world) (a float; ``loss.backward()`` backpropagates). The older
    ``criterion.backward()`` returns dlogits (N, K) of the last loss as a DistTensor in the
    logits' distribution, for ``model.backward(dlogits)``. With K split, the max and the sums
    over classes are allreduced over the ranks holding the other class blocks.
    """

    def __init__(self):
        self._last = None

    def __call__(self, logits, labels) -> Loss:
        return self.forward(logits, labels)

    def forward(self, logits, labels) -> Loss:
        xp = get_xp()
        logits = as_dist(logits, Strategy().activation_distribution(2))
        if logits.ndim != 2:
            raise ValueError(f"CrossEntropyLoss expects logits of shape (N, K), got {logits.shape}")
        d = logits.distribution
        if d.pending:
            logits = logits.redistribute(d.replace(pending=()))
            d = logits.distribution
        N, K = logits.shape
        comm = d.grid.comm
        if isinstance(labels, DistTensor):
            labels = labels.to_global()
        lab = np.asarray(to_numpy(labels))
        ok = lab.shape == (N,) and np.issubdtype(lab.dtype, np.integer)
        msg = "" if ok else (f"CrossEntropyLoss: labels must be integers of shape ({N},), got "
                             f"{lab.dtype} of shape {lab.shape}")
        if ok and N and (lab.min() < 0 or lab.max() >= K):
            bad = lab[(lab < 0) | (lab >= K)]
            ok, msg = False, (f"CrossEntropyLoss: labels must be in [0, {K}), got "
                              f"{bad[:5].tolist()} (and {max(0, bad.size - 5)} more)")
        comm.agree(ok, msg)
        n0, n1 = d.dim_range(0, N)
        k0, k1 = d.dim_range(1, K)
        z = logits.local
        loc = xp.asarray(lab[n0:n1])
        kgrp = d.grid.sub(d.split[1])
        ngrp = d.grid.sub(d.split[0])
        n = z.shape[0]
        m = z.max(axis=1) if z.shape[1] else xp.full((n,), -np.inf, z.dtype)
        if kgrp.size > 1:
            m = kgrp.allreduce(m, op="max")
        e = xp.exp(z - m[:, None])
        s = e.sum(axis=1)
        mine = (loc >= k0) & (loc < k1)
        zt = xp.zeros((n,), z.dtype)
        if n:
            idx = xp.where(mine, loc - k0, 0)
            zt = xp.where(mine, z[xp.arange(n), idx] if z.shape[1] else zt, 0)
        if kgrp.size > 1:
            both = kgrp.allreduce(xp.stack([s, zt]))
            s, zt = both[0], both[1]
        per = xp.log(s) + m - zt
        total = xp.asarray([float(per.sum())], dtype=np.float64)
        if ngrp.size > 1:
            total = ngrp.allreduce(total)
        value = float(total[0]) / max(N, 1)
        if not d.grid.spans_world:  # placed logits: their first rank tells every rank
            value = float(d.grid.world.bcast(np.array([value]), root=d.grid.ranks[0])[0])
        loss = Loss(value, Distribution(d.grid, []))
        if autograd.is_grad_enabled():
            saved = [(logits, e, s, loc, mine, k0, N)]

            def backward(dy, needs):
                ctx = saved.pop()
                return (_dlogits(ctx, float(dy.local)),)

            self._last = (autograd.record("CrossEntropyLoss", backward, [logits], loss), saved)
        else:
            self._last = None
        return loss

    def backward(self) -> DistTensor:
        """dlogits of the last loss, (N, K), in the logits' distribution (then
        ``model.backward(dlogits)``); ``loss.backward()`` does both in one call."""
        if self._last is None:
            raise RuntimeError("CrossEntropyLoss.backward called before the loss was computed "
                               "(or the loss was computed under dc.no_grad())")
        node, saved = self._last
        if node.released:
            raise RuntimeError("CrossEntropyLoss.backward called twice for one loss; compute "
                               "a new loss first")
        node.backward_fn = None
        return _dlogits(saved.pop(), 1.0)


def _dlogits(ctx, scale: float) -> DistTensor:
    """The gradient of the mean cross-entropy w.r.t. the logits, times ``scale``."""
    xp = get_xp()
    logits, e, s, loc, mine, k0, N = ctx
    g = e / s[:, None]
    n = g.shape[0]
    if n:
        rows = xp.arange(n)[mine]
        g[rows, (loc - k0)[mine]] -= 1
    g *= g.dtype.type(scale / max(N, 1))
    return DistTensor(g.astype(logits.dtype, copy=False), logits.distribution, logits.shape)
