"""Exact dynamic programming over series-parallel layer graphs (OptCNN-style).

State: the strategy ``(s, c, f)`` of the last strategic layer, i.e. the activation
distribution the tensor is in (non-strategic layers — ReLU, pools, Flatten — run on it
as it comes). For a strategic layer the cost of strategy ``b`` given state ``a`` is the
layer's time with its input in ``a``'s distribution (the redistribution both ways is
part of it), so a chain is a sequence of ``K x K`` cost matrices combined with min-plus
products (OptCNN's node elimination). A block (a fork whose branches meet at one join,
:class:`.graph.BlockSpec`) is eliminated into one ``K x K`` matrix from the entry state
to the join's output state, which is the first branch's exit state (an add's output
lies as its first operand, a cat's takes the first input's splits): every branch,
nested blocks included, reduces to an entry x exit matrix; each other branch's exit
state is minimised together with its move into the join -- the residual join (shortcut
state -> body state), or for a cat that branch's share of the concatenation, its
output moved into its slot of the output layout and the gradient back
(:meth:`.costs.CostModel.cat_part`) -- and the branches' entry x join-output matrices
are summed (edge elimination). Branches run one after another on all ranks, so their
costs add -- unless ``placement`` lets a cat block run its branches at the same time on
disjoint rank sets (:func:`.placement.placed_block`: the block then costs its slowest
branch, as one more candidate for the exit state of grid ``(1, 1, p)``). A model with
several outputs has ``"output"`` blocks (Inception-v3's auxiliary classifier): a branch
that ends in another output joins nothing, so its cost for each entry state is its
minimum over every exit state. The input is placed where
the graph's first strategic layer computes (that layer's matrix is restricted to its
diagonal). The result is the optimum of the
additive cost (forward + backward compute + communication + gradient allreduce +
optimizer step) over all per-layer plans; :func:`brute_force` checks it on small graphs
in the tests (``tests/test_planner_search.py``, ``tests/test_planner_dag.py``). A graph
that is not series-parallel is rejected by :func:`.graph.trace` with a ``GraphError``
naming the node.

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
    """``(C, arg)`` with ``C[a, b] = min_m A[a, m] + B[m, b]`` and ``arg`` the minimising m
    (the first, on ties). ``S[a, b, m]`` keeps ``m`` last, so each minimum runs over
    contiguous memory."""
    S = A[:, None, :] + np.ascontiguousarray(B.T)[None, :, :]
    arg = S.argmin(axis=2)
    return np.take_along_axis(S, arg[:, :, None], axis=2)[:, :, 0], arg


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


class _Seq:
    """A reduced sequence: ``total[a, b]``, the least cost from entry state ``a`` to exit
    state ``b``; ``steps`` (``("layer", name)`` or ``("block", _Block)``) to read it back.
    Without steps it is the identity (exit = entry) plus its free layers' costs."""

    def __init__(self, mats, steps, tail, K):
        self.steps = steps
        if mats:
            mats[-1] = mats[-1] + tail[None, :]
            self.chain = _Chain(mats)
            self.total = self.chain.total
        else:
            self.chain = None
            self.tail = tail
            self.total = np.full((K, K), INF)
            self.total[np.arange(K), np.arange(K)] = tail

    def then(self, M):
        """``(total (min,+) M, argmin)``; the identity needs no product (exit = entry)."""
        if self.chain is not None:
            return _minplus(self.total, M)
        K = len(M)
        return self.tail[:, None] + M, np.repeat(np.arange(K)[:, None], M.shape[1], axis=1)

    def readback(self, a, b, plan, S):
        if self.chain is None:
            return
        prev = a
        for (kind, data), k in zip(self.steps, self.chain.path(a, b)):
            if kind == "layer":
                plan[data] = S[k]
            else:
                data.readback(prev, k, plan, S)
            prev = k


class _Block:
    """A reduced fork: ``total[a, j]`` (entry state, join-output state = the first
    branch's exit state), the branches' reductions and, for the others, the argmin exit
    state per ``(a, j)``."""

    def __init__(self, spec, reds, args, total, placed=None):
        self.spec, self.reds, self.args, self.total = spec, reds, args, total
        self.placed = placed  # (state j*, mask over a, readback(a, plan)) or None

    def readback(self, a, j, plan, S):
        if self.placed is not None and j == self.placed[0] and self.placed[1][a]:
            self.placed[2](a, plan)
            return
        self.reds[0].readback(a, j, plan, S)
        for red, arg in zip(self.reds[1:], self.args[1:]):
            red.readback(a, int(arg[a, j]), plan, S)


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

    def __init__(self, cost, lam: float = 0.0, work_cap=None, sync_weight: float = 1.0,
                 strategies=None, placement: bool = False):
        self.cost = cost
        self.work_cap = work_cap  # strategies whose workspace exceeds it are excluded
        self.sync_weight = float(sync_weight)  # share of the gradient allreduce counted
        self.S = cost.strategies if strategies is None else strategies
        self.K = len(self.S)
        self.lam = lam
        self.placement = placement  # forks may put their branches on disjoint rank sets
        ids = cost.__dict__.setdefault("_dp_strategy_sets", {})
        self._sid = ids.setdefault(tuple(self.S), len(ids))  # tables' key of self.S

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
               tuple(sorted(layer.attrs.items())), tuple(in_dists), self._sid)

        def fill():
            fast = getattr(self.cost, "layer_table", None)
            if fast is None:
                return generic_layer_table(self.cost, layer, in_dists, self.S)
            return (fast(layer, in_dists) if self.S is self.cost.strategies
                    else fast(layer, in_dists, self.S))
        return self._combine(self._tables(key, fill))

    def _free_vector(self, layer, dists):
        key = ("free", layer.kind, layer.in_shape, layer.out_shape,
               tuple(sorted(layer.attrs.items())), tuple(dists))

        def fill():
            cs = [self.cost.layer(layer, None, d) for d in dists]
            return (np.array([c.time for c in cs]), np.array([float(c.mem) for c in cs]),
                    np.zeros(len(cs)), np.zeros(len(cs)))
        return self._combine(self._tables(key, fill))

    def _loss_vector(self, shape, dists):
        """The loss on an output of ``shape`` in each of ``dists`` (:meth:`.costs.
        CostModel.loss`)."""
        def fill():
            t, z = np.array([self.cost.loss(shape, d).time for d in dists]), np.zeros(len(dists))
            return t, z, z, z
        return self._combine(self._tables(("loss", tuple(shape), tuple(dists)), fill))

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

    def _vector(self, key, costs):
        """A cached combined vector of LayerCosts ``costs()`` (moves, cat shares)."""
        def fill():
            cs = costs()
            return (np.array([c.time for c in cs]), np.array([float(c.mem) for c in cs]),
                    np.zeros(len(cs)), np.zeros(len(cs)))
        return self._combine(self._tables(key, fill))

    def _cat_matrix(self, block, i, idists, fdists):
        """``C[e, j]``: branch ``i``'s share of ``block``'s cat with that branch's output in
        ``idists[e]`` and the first branch's in ``fdists[j]`` (:meth:`.costs.CostModel.
        cat_part`); for branch 0 (``e`` is ``j``) the diagonal holds it, the rest is INF."""
        K = self.K
        shapes = block.branch_shapes()

        def fill():
            T, Mm = np.full((K, K), INF), np.zeros((K, K))
            for j in range(K):
                for e in (range(K) if i else (j,)):
                    c = self.cost.cat_part(block, i, idists[e], fdists[j])
                    T[e, j], Mm[e, j] = c.time, c.mem
            return T, Mm, np.zeros((K, K)), np.zeros((K, K))
        key = ("cat", shapes[i], block.offsets()[i], tuple(block.out_shape), i == 0,
               tuple(idists), tuple(fdists))
        return self._combine(self._tables(key, fill))

    def _strategic(self, layer, dists, pin):
        """``(matrix, output dists)`` of a strategic layer; ``pin``: the name of the graph's
        first strategic layer while the input is unplaced (it arrives in that layer's own
        layout, so only the diagonal is allowed)."""
        M = self._layer_matrix(layer, dists)
        if layer.name == pin:
            D = np.full((self.K, self.K), INF)
            D[np.arange(self.K), np.arange(self.K)] = np.diag(M)
            M = D
        return M, [self.cost.layer(layer, st, dists[0]).out_dist for st in self.S]

    def _free(self, layer, dists):
        return (self._free_vector(layer, dists),
                [self.cost.layer(layer, None, d).out_dist for d in dists])

    def _seq(self, items, dists, pin):
        """Node elimination of a sequence: ``(_Seq, output dists)``."""
        steps, mats = [], []
        pending = np.zeros(self.K)
        for it in items:
            if isinstance(it, BlockSpec):
                blk, dists = self._block(it, dists, pin)
                M, step = blk.total, ("block", blk)
            elif it.strategic:
                M, dists = self._strategic(it, dists, pin)
                step = ("layer", it.name)
            else:
                v, dists = self._free(it, dists)
                pending = pending + v
                continue
            if pending.any():
                M = M + pending[:, None]
                pending = np.zeros(self.K)
            mats.append(M)
            steps.append(step)
        return _Seq(mats, steps, pending, self.K), dists

    def _block(self, it, dists, pin):
        """Edge elimination of a fork: every branch reduced to an entry x exit matrix, the
        move into the join folded into each (min over the branch's exit), summed into one
        entry x join-output matrix. Returns ``(_Block, output dists)``."""
        reds, outs = [], []
        for br in it.branches:
            r, d = self._seq(br, dists, pin)
            reds.append(r)
            outs.append(d)
        total = reds[0].total.copy()
        args = [None]
        if it.op == "add":
            J = self._join_matrix(it.out_shape, outs[0], outs[1])
            S, arg = reds[1].then(J)
            total += S
            args.append(arg)
        elif it.op == "output":
            # a branch to another output of the model joins nothing: its exit state is
            # free (the best one for each entry state, its loss included), whatever the
            # block's output state
            shapes = it.branch_shapes()
            for i, red in enumerate(reds[1:], 1):
                free = np.repeat(self._loss_vector(shapes[i], outs[i])[:, None], self.K, 1)
                S, arg = red.then(free)
                total += S
                args.append(arg)
        else:
            total += np.diag(self._cat_matrix(it, 0, outs[0], outs[0]))[None, :]
            for i in range(1, len(it.branches)):
                S, arg = reds[i].then(self._cat_matrix(it, i, outs[i], outs[0]))
                total += S
                args.append(arg)
        out = outs[0]
        if it.op == "cat":
            out = [self.cost.cat_part(it, 0, d, d).out_dist for d in out]
        placed = None
        if self.placement and it.op == "cat" and pin is None:
            from .placement import placed_block
            placed = placed_block(self, it, dists, out, total, reds, outs)
        if it.join is not None:
            v, out = self._free(it.join, out)
            total += v[None, :]
        return _Block(it, reds, args, total, placed), out

    # ------------------------------------------------------------ search
    def run(self):
        """``(plan {name: (s,c,f)}, predicted additive cost)``."""
        K = self.K
        graph = self.cost.graph
        V = None  # None: input not yet placed (the first strategic layer picks it)
        first = next((x.name for x in graph.layers() if x.strategic), None)
        dists = self._dists(len(graph.in_shape))
        trail = []  # (kind, data) to read the plan back
        for it in graph.items:
            if isinstance(it, BlockSpec) or it.strategic:
                pin = first if V is None else None
                if isinstance(it, BlockSpec):
                    blk, odists = self._block(it, dists, pin)
                    M, step = blk.total, ("block", blk)
                else:
                    M, odists = self._strategic(it, dists, pin)
                    step = ("layer", it.name)
                if V is None:
                    V = np.zeros(K)  # the pin ties the entry state to the first layer
                S2 = V[:, None] + M
                arg = S2.argmin(axis=0)
                newV = S2[arg, np.arange(K)]
                trail.append((step, arg))
                V, dists = newV, odists
            else:
                if V is None:
                    raise ValueError(f"layer {it.name!r} comes before any conv, linear or "
                                     f"batch-norm layer; the planner cannot place its input")
                v, dists = self._free(it, dists)
                V = V + v
        V = V + self._loss_vector(graph.out_shape, dists)
        state = int(np.argmin(V))
        best = float(V[state])
        plan = {}
        for (kind, data), arg in reversed(trail):
            entry = int(arg[state])
            if kind == "layer":
                plan[data] = self.S[state]
            else:
                data.readback(entry, state, plan, self.S)
            state = entry
        return plan, best


def _weighted_time(cost, plan, w):
    """Additive time of ``plan`` with the gradient allreduces counted at weight ``w``."""
    from .simulate import walk
    return sum(c.time - (1.0 - w) * c.sync for _, _, c, _ in walk(cost, plan))


def search(cost, memory_limit=None, iters: int = 30, sync_weight: float = 1.0,
           placement: bool = False) -> dict:
    """Best plan of ``cost.graph``: ``{"plan", "time", "memory", "lam", "seconds"}``.

    ``memory_limit``: bytes per rank (``None``: unlimited); ``sync_weight``: the share of
    each gradient allreduce's time counted (1: all of it, the additive step time; less
    when overlap hides part of it). ``time`` is the additive cost at that weight.
    ``placement``: forks may also run their branches at the same time on disjoint
    contiguous halves and quarters of the ranks (:meth:`Planner._placed_block`).
    """
    from .simulate import plan_memory
    w = float(sync_weight)
    t0 = time.perf_counter()
    plan, val = Planner(cost, sync_weight=w, placement=placement).run()
    mem = plan_memory(cost, plan)
    lam_used = 0.0
    if memory_limit is not None and mem > memory_limit:
        best = _lagrange(cost, memory_limit, iters, None, w, placement)
        smallest = INF
        if not isinstance(best, tuple):
            best = None
            # plan_memory is sum(mem) + max(work) but the relaxation only sees sum(mem):
            # retry with the workspace capped at each size a layer can have (exact for
            # the feasibility question: some cap equals the fitting plan's max(work))
            for cap in _work_caps(cost):  # (caps above the limit only size the message)
                got = _lagrange(cost, memory_limit, iters, cap, w, placement)
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


def _lagrange(cost, memory_limit, iters, work_cap, w=1.0, placement=False):
    """Bisection on ``lam`` of ``time + lam * sum(mem)`` (workspace <= ``work_cap``):
    ``(plan, memory, lam)`` of the fastest fitting plan found, else the least memory
    seen (``None`` if no plan respects the cap)."""
    from .simulate import plan_memory
    lo, hi = 0.0, 1e-9
    while True:
        p2, v2 = Planner(cost, hi, work_cap, w, placement=placement).run()
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
        p3, _v = Planner(cost, mid, work_cap, w, placement=placement).run()
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


def brute_force(cost, memory_limit=None, placement=False):
    """Every plan of the graph's strategic layers (tests only: K**L plans); with
    ``placement`` also every placement of each cat block's branches on the partitions
    the search considers (:func:`.strategies.partitions`)."""
    from .simulate import additive_time, plan_memory
    names = cost.graph.strategic_names()
    best = (INF, None)
    from .placement import layer_choices
    for choices in layer_choices(cost, placement):
        for combo in itertools.product(*(choices[n] for n in names)):
            plan = dict(zip(names, combo))
            if memory_limit is not None and plan_memory(cost, plan) > memory_limit:
                continue
            t = additive_time(cost, plan)
            if t < best[0]:
                best = (t, plan)
    return best[1], best[0]
