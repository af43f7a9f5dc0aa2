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

from .graph import BlockSpec, _layers
from .strategies import as_strategy, placement


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
    if ranks is None or ranks == _ranks(dist.grid):
        return dist
    return act_dist(st, ndim)


def _ranks(grid):
    return tuple(range(grid.world)) if grid.ranks is None else tuple(grid.ranks)


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
