"""Collectives a layer issues under a strategy, per rank (mirror of :mod:`distconv.nn`).

:func:`layer_events` returns, for one :class:`~distconv.planner.graph.LayerSpec`, the
strategy ``(s, c, f)`` it runs under and the :class:`~distconv.distribution.Distribution`
its input arrives in, the events of its ``forward``, its ``backward`` and the gradient
sync (:func:`distconv.nn.sync_gradients`, one allreduce per parameter) on one rank, and
the distribution of its output. :func:`join_events` does the same for a residual join.
Layers follow :mod:`distconv.nn.conv` (Conv2d, Linear), :mod:`distconv.nn.batchnorm`
(global batch statistics, float64 sums) and :mod:`distconv.nn.layers`; a Conv2d's or
Linear's layouts are the layer's own (:func:`distconv.nn.conv.split_layouts`), the order
of its moves is written here and checked against the layers run shape-only
(``tests/test_planner_realrun.py``).
"""
from __future__ import annotations

from functools import lru_cache

from ..distribution import Distribution
from ..strategy import ALL_AXES, AXES
from .commmodel import VGrid, allreduce_event, redistribute_events
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


@lru_cache(maxsize=None)
def _layout(st, name, ndim):
    """Layout ``name`` of a Conv2d/Linear under ``st`` (:func:`distconv.nn.conv.
    split_layouts`, the layer's own) on the planner's grid."""
    from ..nn.conv import split_layouts
    return Distribution(grid_of(st), split_layouts(to_strategy(st), ndim, ndim)[name])


def _xc(st, ndim):
    return _layout(st, "xc", ndim)


@lru_cache(maxsize=None)
def _xc_pending(st, ndim):
    return _xc(st, ndim).replace(pending=("filter",))


@lru_cache(maxsize=None)
def _yf_pending(st, ndim):
    return _yf(st, ndim).replace(pending=("channel",))


def _yf(st, ndim):
    return _layout(st, "yf", ndim)


def _wdist(st, wndim):
    return _layout(st, "w", wndim)


def _cdist(st):
    return _layout(st, "b", 1)


def free_out_dist(layer, in_dist: Distribution) -> Distribution:
    """Output distribution of a non-strategic layer for input ``in_dist`` (on a split of H
    or W: where the layer's real code puts it, :func:`.realrun.run_layer`)."""
    if spatial_dist(in_dist) and layer.kind != "relu":
        return run_layer(layer, None, in_dist, in_dist.grid.size, 0)[3]
    if layer.kind == "flatten":
        rest = 1
        for s in layer.in_shape[2:]:
            rest *= s
        d = in_dist
        if rest != 1 and d.split[1]:
            d = Distribution(d.grid, [d.split[0]] + [None] * (len(layer.in_shape) - 1))
        return Distribution(d.grid, [d.split[0], d.split[1]])
    return in_dist


def entry_events(layer, st, in_dist: Distribution, rank: int, item: int = 4):
    """``(forward, backward)`` events that move ``layer``'s input from ``in_dist`` to where
    the layer computes on it, and its input gradient back."""
    xs = layer.in_shape
    k = layer.kind
    if is_spatial(st):  # a spatial layer computes on the activation layout itself
        act = act_dist(st, len(xs))
        return (redistribute_events(xs, in_dist, act, rank, item),
                redistribute_events(xs, act, in_dist, rank, item))
    if st is None and k != "relu" and spatial_dist(in_dist):
        # pooling, flattening on a split of H or W: halo exchanges, gathers of H and W
        f, b, _, _ = run_layer(layer, None, in_dist, in_dist.grid.size, rank, item)
        return f, b
    if k in ("conv", "linear"):
        xc = _xc(st, len(xs))
        return (redistribute_events(xs, in_dist, xc, rank, item),
                redistribute_events(xs, _xc_pending(st, len(xs)), in_dist, rank, item))
    if k == "bn":
        act = act_dist(st, 4)
        return (redistribute_events(xs, in_dist, act, rank, item),
                redistribute_events(xs, act, in_dist, rank, item))
    if k == "flatten":
        out = free_out_dist(layer, in_dist)
        if not out.split[1] and in_dist.split[1]:
            mid = Distribution(in_dist.grid, [out.split[0]] + [None] * (len(xs) - 1))
            return redistribute_events(xs, in_dist, mid, rank, item), []
        return [], []
    if k in ("relu", "maxpool", "avgpool", "gap"):
        return [], []
    raise ValueError(f"unknown layer kind {k!r}")


def inner_events(layer, st, rank: int, item: int = 4):
    """``(forward, backward, sync)`` events of a strategic layer that do not depend on where
    its input comes from (output reductions, statistics, gradient allreduces)."""
    fwd, bwd, sync = [], [], []
    if isinstance(st, Placed) and rank not in st.ranks:
        return fwd, bwd, sync  # a rank off a placed layer takes part in none of them
    xs, ys = layer.in_shape, layer.out_shape
    k = layer.kind
    if is_spatial(st):  # halo exchanges, statistics and gradients: the layer's own run
        act = act_dist(st, len(xs))
        return run_layer(layer, st, act, act.grid.size, rank, item)[:3]
    if k in ("conv", "linear"):
        nd = len(xs)
        act, yf = act_dist(st, nd), _yf(st, nd)
        fwd += redistribute_events(ys, _yf_pending(st, nd), act, rank, item)
        bwd += redistribute_events(ys, act, yf, rank, item)
        wd = _wdist(st, len(layer.weight_shape))
        rep = wd.replica_axes
        if rep:
            g = wd.grid
            me = g.coords_of(g.pos(rank))
            sync.append(allreduce_event(g, rep, rank, wd.local_size(layer.weight_shape, me),
                                        item))
            if layer.attrs.get("bias"):
                cd = _cdist(st)
                sync.append(allreduce_event(g, cd.replica_axes, rank,
                                            cd.local_size((ys[1],), me), item))
    elif k == "bn":
        act = act_dist(st, 4)
        g = act.grid
        c_loc = act.local_shape(xs, g.coords_of(g.pos(rank)))[1]
        fwd.append(allreduce_event(g, act.split[0], rank, 2 * c_loc, 8))
        bwd.append(allreduce_event(g, act.split[0], rank, 2 * c_loc, 8))
    return fwd, bwd, sync


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


def join_events(shape, body_dist, short_dist, rank, item=4):
    """``(forward, backward)`` events of a residual join: the shortcut's output moves to the
    body's distribution, and the gradient back."""
    return (redistribute_events(shape, short_dist, body_dist, rank, item),
            redistribute_events(shape, body_dist, short_dist, rank, item))


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
