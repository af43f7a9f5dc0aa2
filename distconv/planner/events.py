"""Collectives a layer issues under a strategy, per rank, from the layers' own code.

:func:`layer_events` returns, for one :class:`~distconv.planner.graph.LayerSpec`, the
strategy it runs under and the :class:`~distconv.distribution.Distribution` its input
arrives in, the events of its ``forward``, its ``backward`` and the gradient sync
(:func:`distconv.nn.sync_gradients`, one allreduce per parameter) on one rank, and the
distribution of its output. The moves come from running the real layer
(:mod:`.layermoves`: once per kind and strategy, each move priced on the rank by the real
redistribution code; :mod:`.realrun` for the spatial layers, whose halo exchanges are not
moves), split into the entry moves (the input from where it arrives to where the layer
computes on it, and its gradient back: :func:`entry_events`) and the rest
(:func:`inner_events`). :func:`.layermoves.join_events` gives a residual join's moves
and :func:`graph_events` a whole step's.
"""
from __future__ import annotations

from functools import lru_cache

from ..distribution import Distribution
from ..strategy import ALL_AXES, AXES
from .commmodel import VGrid, redistribute_events
from .layermoves import join_events, layer_moves
from .realrun import run_layer
from .strategies import Placed, as_strategy, grid_shape, is_spatial, to_strategy


@lru_cache(maxsize=None)
def grid_of(st) -> VGrid:
    """The planner's grid of strategy ``st`` (placed on its ranks for :class:`Placed`)."""
    names = ALL_AXES if is_spatial(st) else AXES
    if isinstance(st, Placed):
        return VGrid(grid_shape(st), names, st.ranks, st.world)
    return VGrid(grid_shape(st), names)


@lru_cache(maxsize=None)
def act_dist(st, ndim=4) -> Distribution:
    """Between-layer layout of strategy ``st``: :meth:`distconv.Strategy.
    activation_split` on the planner's grid (``(s, c, f)``: N over sample, C over
    (channel, filter); ``(s, c, f, h, w)`` also H over height and W over width)."""
    return Distribution(grid_of(st), to_strategy(st).activation_split(ndim))


def spatial_dist(d) -> bool:
    """True when ``d`` splits H or W (dims 2 and 3 of a 4-D activation)."""
    return len(d.split) == 4 and bool(d.split[2] or d.split[3])


def free_out_dist(layer, in_dist: Distribution) -> Distribution:
    """Output distribution of a non-strategic layer for input ``in_dist``: where the
    layer's real code puts it (:func:`.realrun.run_layer` on a split of H or W, else
    :func:`.layermoves.layer_moves`)."""
    if spatial_dist(in_dist) and layer.kind != "relu":
        return run_layer(layer, None, in_dist, in_dist.grid.size, 0)[3]
    return layer_moves(layer, None, 4, in_dist).out_dist


def entry_events(layer, st, in_dist: Distribution, rank: int, item: int = 4):
    """``(forward, backward)`` events that move ``layer``'s input from ``in_dist`` to where
    the layer computes on it, and its input gradient back (for a layer without a
    strategy: all its events)."""
    if st is None and layer.kind != "relu" and spatial_dist(in_dist):
        # pooling, flattening on a split of H or W: halo exchanges, gathers of H and W
        f, b, _, _ = run_layer(layer, None, in_dist, in_dist.grid.size, rank, item)
        return f, b
    if st is None:
        return layer_moves(layer, None, item, in_dist).inner_events(layer, rank)[:2]
    return layer_moves(layer, st, item).entry_events(layer, in_dist, rank)


def inner_events(layer, st, rank: int, item: int = 4):
    """``(forward, backward, sync)`` events of a strategic layer that do not depend on where
    its input comes from (output reductions, statistics, gradient allreduces)."""
    if isinstance(st, Placed) and rank not in st.ranks:
        return [], [], []  # a rank off a placed layer takes part in none of them
    if is_spatial(st):  # halo exchanges, statistics and gradients: the layer's own run
        act = act_dist(st, len(layer.in_shape))
        return run_layer(layer, st, act, act.grid.size, rank, item)[:3]
    return layer_moves(layer, st, item).inner_events(layer, rank)


def out_dist_of(layer, st, in_dist):
    if layer.strategic:
        return act_dist(as_strategy(st), len(layer.out_shape))
    return free_out_dist(layer, in_dist)


def layer_events(layer, st, in_dist: Distribution, rank: int, item: int = 4):
    """``(forward, backward, sync, out_dist)`` event lists of ``layer`` on ``rank``.

    ``st``: ``(s, c, f)`` of a strategic layer (ignored for the others); ``in_dist``: the
    distribution its input arrives in (its gradient leaves in the same one).
    """
    ef, eb = entry_events(layer, st, in_dist, rank, item)
    if layer.strategic:
        f, b, s = inner_events(layer, st, rank, item)
    else:
        f, b, s = [], [], []
    return ef + f, b + eb, s, out_dist_of(layer, st, in_dist)


def _first_strategic(graph):
    for layer in graph.layers():
        if layer.strategic:
            return layer
    raise ValueError("graph has no strategic layer")


def graph_events(graph, plan: dict, rank: int, item: int = 4, loss: bool = False) -> dict:
    """Events of one training step of ``graph`` under ``plan`` (``{layer name: (s, c, f)}``
    for every strategic layer) on ``rank``: ``{layer name: {"forward", "backward",
    "sync"}}`` plus ``"(joins)"`` for the joins (residual adds, and each branch's share of
    a cat: :func:`.commmodel.cat_events`) and, with ``loss``, ``"(loss)"`` for the
    cross-entropy loss of each 2-D output (:func:`.realrun.run_loss`). The input arrives
    in the first strategic layer's activation distribution (as ``DistLoader`` delivers
    it)."""
    from .realrun import run_loss
    out: dict = {}
    joins = {"forward": [], "backward": [], "sync": []}
    losses = {"forward": [], "backward": [], "sync": []}

    def add_loss(shape, d):
        if loss and len(shape) == 2:
            f, b = run_loss(shape, d, d.grid.world, rank, item)
            losses["forward"] += f
            losses["backward"] += b
    first = _first_strategic(graph)
    dist = act_dist(as_strategy(plan[first.name]), len(graph.in_shape))

    def run(layer, d):
        st = as_strategy(plan[layer.name]) if layer.strategic else None
        f, b, s, o = layer_events(layer, st, d, rank, item)
        out[layer.name] = {"forward": f, "backward": b, "sync": s}
        return o

    def fork(block, i, d):
        from .placement import fork_target
        t = fork_target(block, i, d, plan, len(block.in_shape))
        if t is not d:  # dc.fork's move onto a placed branch's ranks, and back
            joins["forward"] += redistribute_events(block.in_shape, d, t, rank, item)
            joins["backward"] += redistribute_events(block.in_shape, t, d, rank, item)
        return t

    def join(block, *dists):
        if block.op == "output":  # the other outputs feed losses, not the model
            for shape, d in zip(block.branch_shapes()[1:], dists[1:]):
                add_loss(shape, d)
            return
        if block.op == "cat":  # the real dc.cat's exchange, shape-only, branch by branch
            from ..functional import cat_output_layout
            from .commmodel import cat_events
            shapes, offs = block.branch_shapes(), block.offsets()
            out = cat_output_layout(dists, 1)
            for i, d in enumerate(dists):
                f, b = cat_events(shapes[i], offs[i], block.out_shape, d, out,
                                  d.grid.world, rank, item)
                joins["forward"] += f
                joins["backward"] += b
            return
        f, b = join_events(block.out_shape, dists[0], dists[1], rank, item)
        joins["forward"] += f
        joins["backward"] += b

    add_loss(graph.out_shape, graph.traverse(dist, run, join, fork))
    out["(joins)"] = joins
    if loss:
        out["(loss)"] = losses
    return out
