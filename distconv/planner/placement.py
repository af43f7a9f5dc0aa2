"""Operator placement in a plan: which branches of a fork run on their own ranks, where
``dc.fork`` moves their input, and which of them run at the same time.

A branch is *placed* when its first strategic layer's strategy is a
:class:`.strategies.Placed` on other ranks than the fork's input: ``dc.fork`` moves the
input into that layer's activation layout on those ranks before any branch runs
(:func:`fork_target`), so the branch's leading pooling runs there too. Branches placed
on pairwise disjoint rank sets run at the same time (:func:`parallel_branches`): each
rank runs only its own branch, so the block costs the slowest of them. The planner
assumes the model forks its branches with :func:`distconv.fork` (as
:mod:`distconv.models.inception` does); a model that does not runs them one after
another.
"""
from __future__ import annotations

import itertools

import numpy as np

from .graph import BlockSpec, _layers
from .strategies import (as_strategy, partitions, placed_factorizations, placement,
                         rank_sets)

INF = float("inf")


def first_strategic(items):
    """The first strategic LayerSpec of a branch (depth first), ``None`` if it has none."""
    return next((x for x in _layers(items) if x.strategic), None)


def fork_target(block, i, dist, plan, ndim):
    """Where ``dc.fork`` puts branch ``i``'s input when the fork's input lies in ``dist``:
    the activation layout of the branch's first strategic layer when that layer is
    placed on other ranks than ``dist``'s, else ``dist`` itself."""
    from .events import act_dist
    first = first_strategic(block.branches[i])
    if first is None:
        return dist
    st = as_strategy(plan[first.name])
    ranks = placement(st)
    if ranks is None or ranks == dist.grid.rank_set():
        return dist
    return act_dist(st, ndim)


def branch_ranks(items, plan, world):
    """The world ranks a branch's strategic layers run on (all ``world`` ranks for an
    unplaced layer), as a frozenset; ``None`` for a branch without strategic layers."""
    out = set()
    any_layer = False
    for x in _layers(items):
        if x.strategic:
            any_layer = True
            r = placement(as_strategy(plan[x.name]))
            out |= set(range(world)) if r is None else set(r)
    return frozenset(out) if any_layer else None


def parallel_branches(block, plan, world) -> list:
    """Indices of ``block``'s branches that run at the same time: those whose strategic
    layers all lie on a proper subset of the ranks, the subsets pairwise disjoint (at
    least two such branches; else none). Only cat blocks fork into placed branches."""
    if block.op != "cat":
        return []
    sets = {}
    for i, br in enumerate(block.branches):
        r = branch_ranks(br, plan, world)
        if r is not None and len(r) < world:
            sets[i] = r
    seen = set()
    for r in sets.values():
        if seen & r:
            return []
        seen |= r
    return sorted(sets) if len(sets) >= 2 else []


def group_tags(graph, plan, world) -> tuple:
    """``(layer tags, block tags)``: for every layer name and every block (by ``id``)
    inside a branch that runs in parallel with others, ``(id(block), i)`` of the outermost
    such branch; others are absent."""
    layers, blocks = {}, {}

    def rec(items, tag):
        for it in items:
            if isinstance(it, BlockSpec):
                if tag is not None:
                    blocks[id(it)] = tag
                par = set(parallel_branches(it, plan, world)) if tag is None else set()
                for i, br in enumerate(it.branches):
                    rec(br, tag if tag is not None else
                        ((id(it), i) if i in par else None))
                if it.join is not None and tag is not None:
                    layers[it.join.name] = tag
            elif tag is not None:
                layers[it.name] = tag
    rec(graph.items, None)
    return layers, blocks


def placed_block(planner, it, dists, out, total, reds, outs):
    """The cat block ``it`` with its branches on disjoint contiguous halves and
    quarters of the job (:func:`.strategies.partitions`), running at the same time.

    Each placed branch ``i`` on ranks ``R`` is reduced over the strategies on ``R``
    (:func:`.strategies.placed_factorizations`) from where ``dc.fork`` puts its input
    (its first strategic layer's activation layout; the move from entry state ``a``
    is :meth:`.costs.CostModel.move`) to its share of the cat, whose output lies on
    all ranks as grid ``(1, 1, p)``'s activations (:func:`distconv.functional.
    cat_output_layout`): ``v_i[a]``, the least cost of the branch, its moves
    included. Branches on disjoint ranks run at the same time, so the block costs
    ``max_i v_i[a]`` plus the branches without strategic layers (pooling on the
    input, run where it is). Where that beats the unplaced block at exit state
    ``j*`` = ``(1, 1, p)``, ``total[a, j*]`` takes it (in place). Returns ``(j*,
    mask over a, readback(a, plan))`` or ``None`` when no partition applies."""
    from ..functional import cat_output_layout
    from .events import act_dist
    p, nd, K = planner.cost.p, len(it.in_shape), planner.K
    sb = [i for i, br in enumerate(it.branches) if first_strategic(br) is not None]
    parts = partitions(p, len(sb))
    if (1, 1, p) not in planner.S or not parts:
        return None
    jstar = planner.S.index((1, 1, p))
    free = [i for i in range(len(it.branches)) if i not in sb]
    best, choice, infos = np.full(K, INF), np.zeros(K, dtype=int), []
    for k, sets in enumerate(parts):
        subs = {i: placed_factorizations(R, p) for i, R in zip(sb, sets)}
        U = cat_output_layout([act_dist(subs[i][0], nd) if i in subs else outs[i][0]
                               for i in range(len(it.branches))], 1)
        if out[jstar] != U:
            return None
        v, info = np.full(K, -INF), {}
        for i in sb:
            v, info[i] = placed_branch(planner, it, i, dists, subs[i], U, v)
        for i in free:  # runs on the entry layout: its tail and its cat share
            v = v + np.diag(reds[i].total) + planner._vector(
                ("catU", id(it), i, tuple(outs[i]), U),
                lambda i=i: [planner.cost.cat_part(it, i, d, d, U) for d in outs[i]])
        better = v < best
        best[better], choice[better] = v[better], k
        infos.append(info)
    mask = best < total[:, jstar]
    total[mask, jstar] = best[mask]

    def readback(a, plan):
        for i, (red, S_i, barg, targ) in infos[choice[a]].items():
            b = int(barg[a])
            red.readback(b, int(targ[b]), plan, S_i)
        for i in free:
            reds[i].readback(a, a, plan, planner.S)
    return jstar, mask, readback


def placed_branch(planner, it, i, dists, S_i, U, vmax):
    """Branch ``i`` of ``it`` on the placed strategies ``S_i`` (see
    :func:`placed_block`): ``(max(vmax, v_i), (reduction, S_i, best entry layout per
    a, best exit per entry layout))``."""
    from .events import act_dist
    br, nd = it.branches[i], len(it.in_shape)
    sub = type(planner)(planner.cost, planner.lam, planner.work_cap, planner.sync_weight,
                      strategies=S_i)
    di = [act_dist(b, nd) for b in S_i]
    key = ("fork", tuple(it.in_shape), tuple(dists), tuple(di))

    def fill():
        T, Mm = np.empty((len(dists), len(di))), np.zeros((len(dists), len(di)))
        for a, d in enumerate(dists):
            for b, t in enumerate(di):
                T[a, b] = planner.cost.move(it.in_shape, d, t).time
        return T, Mm, np.zeros_like(T), np.zeros_like(T)
    E = planner._combine(planner._tables(key, fill))
    red, outs_i = sub._seq(br, di, first_strategic(br).name)
    C = sub._vector(("catU", id(it), i, tuple(outs_i), U),
                    lambda: [planner.cost.cat_part(it, i, d, d, U) for d in outs_i])
    T2 = red.total + C[None, :]
    targ = T2.argmin(axis=1)
    S2 = E + T2[np.arange(len(di)), targ][None, :]
    barg = S2.argmin(axis=1)
    v = S2[np.arange(len(dists)), barg]
    return np.maximum(vmax, v), (red, S_i, barg, targ)


def layer_choices(cost, placement):
    """``{layer name: candidate strategies}`` for each way of placing the cat blocks
    (none placed first; a block inside a placed branch is not placed again)."""
    names = cost.graph.strategic_names()
    plain = {n: cost.strategies for n in names}
    yield plain
    if not placement:
        return
    blocks = [b for b in cost.graph.blocks() if b.op == "cat"]
    modes = []
    for b in blocks:
        sb = [i for i, br in enumerate(b.branches) if first_strategic(br) is not None]
        modes.append([None] + [dict(zip(sb, sets)) for sets in partitions(cost.p, len(sb))])
    for combo in itertools.product(*modes):
        if all(m is None for m in combo):
            continue
        choices, ok = dict(plain), True
        for b, m in zip(blocks, combo):
            if m is None:
                continue
            for i, R in m.items():
                for layer in _layers(b.branches[i]):
                    if layer.strategic:
                        if choices[layer.name] is not plain[layer.name]:
                            ok = False  # nested in another placed branch
                        choices[layer.name] = placed_factorizations(R, cost.p)
        if ok:
            yield choices


def placement_choices(cost) -> dict:
    """MCMC's configurations (:func:`.mcmc.mcmc` ``choices``) with placement: for every
    strategic layer every strategy of ``cost`` and every strategy on each contiguous half
    and quarter of the ranks (:func:`.strategies.rank_sets`), so that a layer too small
    to split well may run on fewer ranks; :func:`.simulate.walk` runs the branches of a
    fork whose layers end up on disjoint rank sets at the same time."""
    placed = [st for R in rank_sets(cost.p) for st in placed_factorizations(R, cost.p)]
    return {n: list(cost.strategies) + placed for n in cost.graph.strategic_names()}


def placement_moves(cost) -> list:
    """MCMC's group moves with placement (:func:`.mcmc.mcmc` ``group_moves``): per cat
    block, its strategic branches on each partition the DP considers
    (:func:`.strategies.partitions`; each branch's layers get one strategy of its rank
    set), or the whole block on all ranks under one of ``cost.strategies``."""
    out = []
    for b in cost.graph.blocks():
        if b.op != "cat":
            continue
        sb = [[x.name for x in _layers(br) if x.strategic] for br in b.branches]
        sb = [names for names in sb if names]
        parts = partitions(cost.p, len(sb))
        if not parts:
            continue
        alts = [[(sum(sb, []), list(cost.strategies))]]
        alts += [[(names, placed_factorizations(R, cost.p)) for names, R in zip(sb, sets)]
                 for sets in parts]
        out.append(alts)
    return out

