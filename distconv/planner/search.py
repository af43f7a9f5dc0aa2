"""Exact dynamic programming over the layer chain and residual blocks (OptCNN-style).

State: the strategy ``(s, c, f)`` of the last strategic layer, i.e. the activation
distribution the tensor is in (non-strategic layers — ReLU, pools, Flatten — run on it
as it comes). For a strategic layer the cost of strategy ``b`` given state ``a`` is the
layer's time with its input in ``a``'s distribution (the redistribution both ways is
part of it), so a chain is a sequence of ``K x K`` cost matrices combined with min-plus
products. A residual block is eliminated into one ``K x K`` matrix (entry state ->
exit state) by the min-plus product of its body and, for the shortcut, the min-plus
product of its downsample layers and of the join (shortcut state -> body state), as
OptCNN eliminates nodes. The result is the optimum of the additive cost (forward +
backward compute + communication + gradient allreduce + optimizer step) over all
per-layer plans; :func:`brute_force` checks it on small chains in the tests.

Memory: each (layer, strategy) also has a per-rank memory; :func:`search` minimises
``time + lam * memory`` and bisects ``lam`` until the plan's memory fits
``memory_limit`` (Lagrangian relaxation), returning the fastest plan found that fits,
or raises ``ValueError`` naming the smallest memory any plan needs.
"""
from __future__ import annotations

import itertools
import time

import numpy as np

from .graph import BlockSpec

INF = float("inf")


def _minplus(A, B):
    """``(C, arg)`` with ``C[a, b] = min_m A[a, m] + B[m, b]`` and ``arg`` the minimising m."""
    S = A[:, :, None] + B[None, :, :]
    arg = S.argmin(axis=1)
    return np.take_along_axis(S, arg[:, None, :], axis=1)[:, 0, :], arg


class _Chain:
    """Min-plus product of a list of matrices, keeping argmins to read the path back."""

    def __init__(self, mats):
        self.mats = mats
        self.total = mats[0]
        self.args = [None]
        for M in mats[1:]:
            self.total, arg = _minplus(self.total, M)
            self.args.append(arg)

    def path(self, a, b):
        """States after each matrix on the best path from ``a`` ending in ``b``."""
        out = [b]
        for k in range(len(self.mats) - 1, 0, -1):
            b = int(self.args[k][a, b])
            out.append(b)
        return out[::-1]


def generic_layer_table(cost, layer, in_dists, strategies):
    """``(time, mem, work, sync)`` arrays ``[a, b]`` from ``cost.layer`` pair by pair (what
    :meth:`.costs.CostModel.layer_table` computes faster; used for cost models without it)."""
    K, A = len(strategies), len(in_dists)
    T, Mm, W, Sy = (np.empty((A, K)) for _ in range(4))
    for a in range(A):
        for b in range(K):
            c = cost.layer(layer, strategies[b], in_dists[a])
            T[a, b], Mm[a, b], W[a, b], Sy[a, b] = c.time, c.mem, c.work, c.sync
    return T, Mm, W, Sy


class Planner:
    """DP over ``cost.graph`` with the costs of :class:`.costs.CostModel` ``cost``."""

    def __init__(self, cost, lam: float = 0.0, work_cap=None, sync_weight: float = 1.0):
        self.cost = cost
        self.work_cap = work_cap  # strategies whose workspace exceeds it are excluded
        self.sync_weight = float(sync_weight)  # share of the gradient allreduce counted
        self.K = len(cost.strategies)
        self.S = cost.strategies
        self.lam = lam

    # ------------------------------------------------------------ matrices
    def _dists(self, ndim):
        from .events import act_dist
        return [act_dist(st, ndim) for st in self.S]

    def _tables(self, key, fill):
        """``(time, memory, workspace)`` arrays cached on the cost model across ``lam``
        values and planner runs (the memory-limited search runs the DP dozens of times)."""
        store = self.cost.__dict__.setdefault("_dp_tables", {})
        got = store.get(key)
        if got is None:
            got = store[key] = fill()
        return got

    def _combine(self, tables):
        T, Mm, W, Sy = tables
        M = T + self.lam * Mm if self.lam else T.copy()
        if self.sync_weight != 1.0:
            M -= (1.0 - self.sync_weight) * Sy
        if self.work_cap is not None:
            M[W > self.work_cap] = INF
        return M

    def _layer_matrix(self, layer, in_dists):
        """``M[a, b]``: layer with strategy ``b`` on input in ``in_dists[a]``."""
        key = ("layer", layer.kind, layer.in_shape, layer.out_shape,
               tuple(sorted(layer.attrs.items())), tuple(in_dists))

        def fill():
            fast = getattr(self.cost, "layer_table", None)
            return (fast(layer, in_dists) if fast is not None
                    else generic_layer_table(self.cost, layer, in_dists, self.S))
        return self._combine(self._tables(key, fill))

    def _free_vector(self, layer, dists):
        key = ("free", layer.kind, layer.in_shape, layer.out_shape,
               tuple(sorted(layer.attrs.items())), tuple(dists))

        def fill():
            cs = [self.cost.layer(layer, None, d) for d in dists]
            return (np.array([c.time for c in cs]), np.array([float(c.mem) for c in cs]),
                    np.zeros(len(cs)), np.zeros(len(cs)))
        return self._combine(self._tables(key, fill))

    def _join_matrix(self, shape, bdists, sdists):
        """``J[d, b]``: the join of a shortcut in ``sdists[d]`` with a body in ``bdists[b]``."""
        K = self.K

        def fill():
            T, Mm = np.empty((K, K)), np.empty((K, K))
            for d in range(K):
                for b in range(K):
                    c = self.cost.join(shape, bdists[b], sdists[d])
                    T[d, b], Mm[d, b] = c.time, c.mem
            return T, Mm, np.zeros((K, K)), np.zeros((K, K))
        return self._combine(self._tables(("join", shape, tuple(bdists), tuple(sdists)), fill))

    def _segment(self, layers, in_dists):
        """Matrices of a run of layers from states with ``in_dists``; returns
        (matrices, output dists, [strategic layers])."""
        mats, names, dists = [], [], list(in_dists)
        pending_free = np.zeros(self.K)
        for layer in layers:
            if layer.strategic:
                M = self._layer_matrix(layer, dists)
                M += pending_free[:, None]
                pending_free = np.zeros(self.K)
                mats.append(M)
                names.append(layer.name)
                dists = [self.cost.layer(layer, st, dists[0]).out_dist for st in self.S]
            else:
                pending_free += self._free_vector(layer, dists)
                dists = [self.cost.layer(layer, None, d).out_dist for d in dists]
        return mats, names, dists, pending_free

    # ------------------------------------------------------------ search
    def run(self):
        """``(plan {name: (s,c,f)}, predicted additive cost)``."""
        K = self.K
        graph = self.cost.graph
        V = None  # None: input not yet placed (the first strategic layer picks it)
        dists = self._dists(len(graph.in_shape))
        trail = []  # (kind, data) to read the plan back
        for it in graph.items:
            if isinstance(it, BlockSpec):
                mats, names, bdists, free = self._segment(it.body, dists)
                if V is None:
                    # the input arrives in the first body layer's own layout: entry = b0
                    m0 = np.full((K, K), INF)
                    m0[np.arange(K), np.arange(K)] = np.diag(mats[0])
                    mats[0] = m0
                body = _Chain(mats)
                Bm = body.total + free[None, :]
                smats, snames, sdists, sfree = self._segment(it.shortcut, dists)
                J = self._join_matrix(it.out_shape, bdists, sdists)
                if smats:
                    smats[-1] = smats[-1] + sfree[None, :]
                    short = _Chain(smats + [J])
                    Sm = short.total
                else:
                    short = None
                    Sm = J + sfree[:, None]  # identity: shortcut state = entry state
                total = Bm + Sm
                if it.join is not None:
                    total += self._free_vector(it.join, bdists)[None, :]
                if V is None:
                    newV, arg = total.min(axis=0), total.argmin(axis=0)
                else:
                    S2 = V[:, None] + total
                    arg = S2.argmin(axis=0)
                    newV = S2[arg, np.arange(K)]
                trail.append(("block", (it, names, snames, body, short, arg)))
                V, dists = newV, bdists
            elif it.strategic:
                mats, names, odists, _ = self._segment([it], dists)
                M = mats[0]
                if V is None:
                    newV = np.diag(M).copy()
                    arg = np.arange(K)
                else:
                    S2 = V[:, None] + M
                    arg = S2.argmin(axis=0)
                    newV = S2[arg, np.arange(K)]
                trail.append(("layer", (it.name, arg)))
                V, dists = newV, odists
            else:
                if V is None:
                    raise ValueError(f"layer {it.name!r} comes before any conv, linear or "
                                     f"batch-norm layer; the planner cannot place its input")
                V = V + self._free_vector(it, dists)
                dists = [self.cost.layer(it, None, d).out_dist for d in dists]
        state = int(np.argmin(V))
        best = float(V[state])
        plan = {}
        for kind, data in reversed(trail):
            if kind == "layer":
                name, arg = data
                plan[name] = self.S[state]
                state = int(arg[state])
            else:
                it, names, snames, body, short, arg = data
                exit_b = state
                entry = int(arg[exit_b])
                path = body.path(entry, exit_b)
                for n, k in zip(names, path):
                    plan[n] = self.S[k]
                if short is not None:
                    spath = short.path(entry, exit_b)[:-1]  # last is the join's (= exit)
                    for n, k in zip(snames, spath):
                        plan[n] = self.S[k]
                state = entry
        return plan, best


def _weighted_time(cost, plan, w):
    """Additive time of ``plan`` with the gradient allreduces counted at weight ``w``."""
    from .simulate import walk
    return sum(c.time - (1.0 - w) * c.sync for _, _, c, _ in walk(cost, plan))


def search(cost, memory_limit=None, iters: int = 30, sync_weight: float = 1.0) -> dict:
    """Best plan of ``cost.graph``: ``{"plan", "time", "memory", "lam", "seconds"}``.

    ``memory_limit``: bytes per rank (``None``: unlimited); ``sync_weight``: the share of
    each gradient allreduce's time counted (1: all of it, the additive step time; less
    when overlap hides part of it). ``time`` is the additive cost at that weight.
    """
    from .simulate import plan_memory
    w = float(sync_weight)
    t0 = time.perf_counter()
    plan, val = Planner(cost, sync_weight=w).run()
    mem = plan_memory(cost, plan)
    lam_used = 0.0
    if memory_limit is not None and mem > memory_limit:
        best = _lagrange(cost, memory_limit, iters, None, w)
        smallest = INF
        if not isinstance(best, tuple):
            best = None
            # plan_memory is sum(mem) + max(work) but the relaxation only sees sum(mem):
            # retry with the workspace capped at each size a layer can have (exact for
            # the feasibility question: some cap equals the fitting plan's max(work))
            for cap in _work_caps(cost):  # (caps above the limit only size the message)
                got = _lagrange(cost, memory_limit, iters, cap, w)
                if isinstance(got, tuple) and (
                        best is None
                        or _weighted_time(cost, got[0], w) < _weighted_time(cost, best[0], w)):
                    best = got
                elif not isinstance(got, tuple) and got is not None:
                    smallest = min(smallest, got)
        if not isinstance(best, tuple):
            need = (f"{smallest} bytes ({smallest / 2**30:.2f} GiB)" if smallest < INF
                    else "a larger workspace")
            raise ValueError(f"no plan fits the memory limit of {int(memory_limit)} bytes "
                             f"({memory_limit / 2**30:.2f} GiB) per rank: the smallest plan "
                             f"needs {need}")
        plan, mem, lam_used = best
    return {"plan": plan, "time": _weighted_time(cost, plan, w), "memory": mem,
            "lam": lam_used, "seconds": time.perf_counter() - t0}


def _lagrange(cost, memory_limit, iters, work_cap, w=1.0):
    """Bisection on ``lam`` of ``time + lam * sum(mem)`` (workspace <= ``work_cap``):
    ``(plan, memory, lam)`` of the fastest fitting plan found, else the least memory
    seen (``None`` if no plan respects the cap)."""
    from .simulate import plan_memory
    lo, hi = 0.0, 1e-9
    while True:
        p2, v2 = Planner(cost, hi, work_cap, w).run()
        if not np.isfinite(v2):
            return None
        m2 = plan_memory(cost, p2)
        if m2 <= memory_limit:
            break
        hi *= 10
        if hi > 1e3:
            return m2
    best = (p2, m2, hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        p3, _v = Planner(cost, mid, work_cap, w).run()
        m3 = plan_memory(cost, p3)
        if m3 <= memory_limit:
            hi, best = mid, (p3, m3, mid)
        else:
            lo = mid
    return best


def _work_caps(cost) -> list:
    """Every workspace size a strategic layer can have (a conv's depends only on its
    strategy; the other layers need none), ascending, with 0."""
    from .events import act_dist
    caps = {0}
    for layer in cost.graph.layers():
        if layer.strategic:
            for st in cost.strategies:
                caps.add(cost.layer(layer, st, act_dist(st, len(layer.in_shape))).work)
    return sorted(caps)


def brute_force(cost, memory_limit=None):
    """Every plan of the graph's strategic layers (tests only: K**L plans)."""
    from .simulate import additive_time, plan_memory
    names = cost.graph.strategic_names()
    best = (INF, None)
    for combo in itertools.product(cost.strategies, repeat=len(names)):
        plan = dict(zip(names, combo))
        if memory_limit is not None and plan_memory(cost, plan) > memory_limit:
            continue
        t = additive_time(cost, plan)
        if t < best[0]:
            best = (t, plan)
    return best[1], best[0]
