"""CrossEntropyLoss over a batch split over samples and, optionally, classes."""
from __future__ import annotations

import numpy as np

from ..backend import get_xp, to_numpy
from ..strategy import Strategy
from ..tensor import DistTensor
from .module import as_dist


class CrossEntropyLoss:
    """Mean cross-entropy over the global batch, like ``torch.nn.CrossEntropyLoss()``.

    ``criterion(logits, labels)``: logits (N, K), a DistTensor (N split over any axes, K
    split or not) or the same global array on every rank; labels (N,) integers in
    ``[0, K)``, a global array every rank passes alike (or a DistTensor). Returns the loss
    as a float on every rank. ``criterion.backward()`` returns dlogits (N, K) as a
    DistTensor in the logits' distribution. With K split, the max and the sums over classes
    are allreduced over the ranks holding the other class blocks.
    """

    def __call__(self, logits, labels) -> float:
        return self.forward(logits, labels)

    def forward(self, logits, labels) -> float:
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
        loss = float(total[0]) / max(N, 1)
        self._saved = (logits, e, s, loc, mine, k0, N)
        return loss

    def backward(self) -> DistTensor:
        """dlogits of the last loss, (N, K), in the logits' distribution."""
        if getattr(self, "_saved", None) is None:
            raise RuntimeError("CrossEntropyLoss.backward called before the loss was computed")
        xp = get_xp()
        logits, e, s, loc, mine, k0, N = self._saved
        g = e / s[:, None]
        n = g.shape[0]
        if n:
            rows = xp.arange(n)[mine]
            g[rows, (loc - k0)[mine]] -= 1
        g *= g.dtype.type(1.0 / max(N, 1))
        self._saved = None
        return DistTensor(g.astype(logits.dtype, copy=False), logits.distribution, logits.shape)
