"""Per-layer time and memory of a strategy: the cost model the search and simulator use.

:class:`CostModel` combines

* the bytes of every collective a layer issues (:func:`.events.layer_events`: which
  moves a layer makes, each priced by the real redistribution code run shape-only in
  :mod:`.commmodel`) turned into seconds by the machine's α–β model
  (:meth:`.machine.Machine.collective_time`, per link class: a group within one node
  is ``intra``, else ``inter``);
* the seconds of the layer's local kernels on the largest shard (rank 0's: floor+1
  blocks put the extra elements first) from a :class:`.compute.ComputeModel`
  (measured on this machine and cached, or fitted), plus the layer's own Python around
  them (:meth:`.compute.ComputeModel.layer_overhead`, measured once per layer kind),
  and its memory (:func:`.layercompute.layer_compute`);
* every collective issued by ``DistTensor.redistribute`` over more than one rank also
  costs the measured Python of a redistribution step (``layer_overhead(
  "redistribute")``), even one that moves no bytes (a move between two grids that
  leaves every element in place still runs the between-grid path);
* memory per rank: weight shards with their gradients and optimizer state, what
  backward keeps (the gathered input of a conv, the input of a batch-norm, the output
  of a ReLU, a max-pool's argmax) and the largest transient workspace (a conv's column
  buffer).

Bytes are evaluated on every rank for up to 16 ranks (the maximum over ranks of each
collective sets its time) and on rank 0 beyond that; between-grid alltoallvs on more
than 64 ranks count the bytes a rank receives for both directions (O(1) per rank). A
layer placed on some ranks (:class:`.strategies.Placed`) is evaluated on its members
for its own collectives, and beyond 16 ranks on its first rank.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .commmodel import EXACT_RANKS, cat_events
from .layercompute import OPT_SLOTS, _prod, layer_compute
from .overhead import OVERHEAD_KINDS
from .events import act_dist, entry_events, grid_of, inner_events, out_dist_of
from .layermoves import join_events
from ..optim import BUCKET_BYTES
from .strategies import (Placed, as_strategy, factorizations, grid_shape,  # noqa: F401
                         is_spatial, parse_strategy, placement, strategy_short,
                         strategy_text, to_strategy)

@dataclass
class LayerCost:
    """Seconds and bytes of one layer under one strategy and input distribution (rank max)."""

    compute_fwd: float = 0.0
    compute_bwd: float = 0.0
    comm_fwd: float = 0.0
    comm_bwd: float = 0.0
    sync: float = 0.0          # gradient allreduce of this layer's shards
    update: float = 0.0        # optimizer step over this rank's shards
    bytes: int = 0             # max(sent, recv) summed over the layer's collectives
    sync_bytes: int = 0
    mem: int = 0               # bytes kept until backward + parameters/grads/optimizer
    work: int = 0              # transient workspace bytes
    out_dist: object = None
    # the gradient allreduces behind ``sync``, one event list per evaluated rank, and the
    # grid they run on (the strategy's): what the simulator puts into GradientSync's
    # buckets (empty: ``sync`` is one unit, e.g. branches merged by placement)
    sync_events: tuple = ()
    sync_grid: object = None

    @property
    def time(self) -> float:
        return (self.compute_fwd + self.compute_bwd + self.comm_fwd + self.comm_bwd
                + self.sync + self.update)


class CostModel:
    """Costs of every layer of ``graph`` on ``nranks`` ranks of ``machine``.

    ``compute``: a :class:`.compute.ComputeModel` (default: fitted defaults, no
    measuring); ``item``: bytes per element (4: float32); ``optimizer``: ``sgd``
    (one momentum slot) or ``adam`` (two); ``spatial``: the strategies include splits of
    H and W (:func:`factorizations`), which a layer without them (a Linear) cannot take:
    its cost under one is infinite. ``bucket_bytes``: how the step reduces its gradients,
    as :class:`distconv.optim.GradientSync` with buckets of that size (the default, what
    ``train.py`` runs) or, for ``None``, as :func:`distconv.nn.sync_gradients` (one
    allreduce per parameter, through ``DistTensor.redistribute``); the simulator uses it,
    the search's per-layer costs price one allreduce per parameter either way.
    """

    def __init__(self, graph, nranks, machine=None, compute=None, item=4, optimizer="sgd",
                 spatial=False, bucket_bytes=BUCKET_BYTES):
        from .compute import ComputeModel
        from .machine import Machine
        self.graph = graph
        self.p = int(nranks)
        self.machine = machine if machine is not None else Machine()
        self.compute = compute if compute is not None else ComputeModel(
            measure=False, **_compute_kw(self.machine))
        self.item = int(item)
        self.optimizer = optimizer
        self.bucket_bytes = None if bucket_bytes is None else int(bucket_bytes)
        if optimizer not in OPT_SLOTS:
            raise ValueError(f"optimizer must be one of {sorted(OPT_SLOTS)}, got {optimizer!r}")
        self.strategies = factorizations(self.p, spatial)
        self.ranks = list(range(self.p)) if self.p <= EXACT_RANKS else [0]
        self._cache: dict = {}
        self._ab: dict = {}
        self._ccache: dict = {}
        self._inner: dict = {}
        self._entry: dict = {}
        self._ovh: dict = {}

    # ----------------------------------------------------------- communication
    def events_time(self, per_rank: list, redistribute: bool = True) -> tuple:
        """``(seconds, bytes)`` of event lists evaluated on several ranks (same structure).

        Each collective over more than one rank that moves bytes costs the machine's
        alpha-beta time of its busiest member's bytes. ``redistribute``: the events come
        from ``DistTensor.redistribute`` (everything but batch norm's statistics), which
        adds its own Python to each collective, the compute model's
        ``layer_overhead("redistribute")``; that is charged for collectives with no bytes
        too (a move between two grids that leaves every element where it is still runs
        the between-grid path). Not charged: the alpha of such an empty collective (the
        MPI alltoallv is still called, ~30 us on 2 ranks of the dev machine).
        """
        t = 0.0
        nb = 0
        o = self._overhead("redistribute")[0] if redistribute else 0.0
        if len({len(x) for x in per_rank}) > 1:
            # ranks on and off a placed grid issue different collectives (the members'
            # own reductions): each rank's events priced alone, the busiest rank counts
            got = [self.events_time([x], redistribute) for x in per_rank]
            return max(x[0] for x in got), max(x[1] for x in got)
        for evs in zip(*per_rank):
            if len(evs[0].group) <= 1:
                continue
            b = max(max(e.sent, e.recv) for e in evs)
            if b == 0:
                t += o
                continue
            # each rank's own group sets its link class (a grid's groups can lie within a
            # node on some ranks and across nodes on others): the slowest member counts
            worst = 0.0
            for e in evs:
                key = (e.kind, e.group)
                ab = self._ab.get(key)
                if ab is None:  # alpha*steps and beta of this group (affine in bytes)
                    t0 = self.machine.collective_time(key[0], 0, key[1])
                    ab = self._ab[key] = (
                        t0, self.machine.collective_time(key[0], 1 << 20, key[1]) - t0)
                worst = max(worst, ab[0] + ab[1] * (max(e.sent, e.recv) / float(1 << 20)))
            t += worst + o
            nb += b
        return t, nb

    def bucket_time(self, parts) -> float:
        """Seconds of one gradient bucket of :class:`distconv.optim.GradientSync`: the
        allreduces ``parts`` (each a tuple of one event per evaluated rank, all over the
        same group on a rank) sent as one buffer, so one alpha for the bucket; no
        ``DistTensor.redistribute`` Python (GradientSync calls the communicator)."""
        from ..shapecomm import Event
        merged = [[Event("allreduce", evs[0].group, sum(e.sent for e in evs),
                         sum(e.recv for e in evs))] for evs in zip(*parts)]
        return self.events_time(merged, redistribute=False)[0]

    def _events(self, fn, *placed):
        """``[fn(rank), ...]`` on the ranks evaluated: every rank up to
        :data:`.commmodel.EXACT_RANKS`, else rank 0. ``placed``: grids (or rank tuples) of
        placed layouts involved; with any, beyond EXACT_RANKS their first rank stands for
        the busiest one (it receives its whole block), and a ``members_only`` list
        restricts the ranks to those of the first (a placed layer's own collectives)."""
        sets = [getattr(g, "ranks", g) for g in placed]
        sets = [r for r in sets if r is not None]
        if not sets:
            return [fn(r) for r in self.ranks]
        if self.p > EXACT_RANKS:
            return [fn(sets[0][0])]
        return [fn(r) for r in self.ranks]

    def _member_events(self, fn, ranks):
        """``[fn(rank), ...]`` on the evaluated ranks of the placed rank set ``ranks``."""
        if self.p > EXACT_RANKS:
            return [fn(ranks[0])]
        return [fn(r) for r in ranks]

    # ----------------------------------------------------------- one layer
    def layer(self, layer, st, in_dist) -> LayerCost:
        """Cost of ``layer`` under strategy ``st`` (``None`` for non-strategic layers) with
        its input in ``in_dist``."""
        key = (layer.kind, layer.in_shape, layer.out_shape, tuple(sorted(layer.attrs.items())),
               st, in_dist)
        got = self._cache.get(key)
        if got is not None:
            return got
        sig = key[:4]
        if is_spatial(st) and (layer.kind == "linear" or len(layer.in_shape) != 4):
            c = self._cache[key] = LayerCost(compute_fwd=float("inf"),
                                             out_dist=act_dist(st, len(layer.out_shape)))
            return c
        inner = None
        if st is not None:
            inner = self._inner.get((sig, st))
            if inner is None:
                fn = lambda r: inner_events(layer, st, r, self.item)  # noqa: E731
                per = (self._events(fn) if placement(st) is None
                       else self._member_events(fn, placement(st)))
                # batch norm's statistics move runs inside its forward and backward,
                # whose measured overhead holds its Python already; a spatial layer's
                # halos are not issued by DistTensor.redistribute
                plain = layer.kind != "bn" and not is_spatial(st)
                inner = self._inner[(sig, st)] = tuple(
                    self.events_time([x[i] for x in per], redistribute=plain)
                    for i in range(3)) + (tuple(tuple(x[2]) for x in per),)
        entry = self._entry_cost(layer, st, in_dist, key)
        c = LayerCost(out_dist=out_dist_of(layer, st, in_dist))
        (c.comm_fwd, b1), (c.comm_bwd, b2) = entry
        if inner is not None:
            c.comm_fwd += inner[0][0]
            c.comm_bwd += inner[1][0]
            c.sync, c.sync_bytes = inner[2]
            if c.sync > 0:
                c.sync_events, c.sync_grid = inner[3], grid_of(st)
            b1 += inner[0][1] + inner[1][1]
        c.bytes = b1 + b2
        ckey = key[:5] + ((in_dist.local_shape(layer.in_shape, [0] * len(in_dist.grid.names)),
                           in_dist.split) if st is None else (),)
        got = self._ccache.get(ckey)
        if got is None:
            tmp = LayerCost(out_dist=c.out_dist)
            layer_compute(self, layer, st, in_dist, tmp)
            got = self._ccache[ckey] = (tmp.compute_fwd, tmp.compute_bwd, tmp.update, tmp.mem,
                                        tmp.work)
        c.compute_fwd, c.compute_bwd, c.update, c.mem, c.work = got
        self._cache[key] = c
        return c

    def _entry_cost(self, layer, st, in_dist, key=None, lay=None):
        """``((fwd s, fwd bytes), (bwd s, bwd bytes))`` of moving ``layer``'s input from
        ``in_dist`` to where strategy ``st`` computes on it, and its gradient back. It
        depends only on the input shape, where the input comes from and where the layer
        needs it: shared by every layer with the same input."""
        if layer.kind == "flatten":
            ekey = key
        else:
            if lay is None:
                lay = _layout(in_dist, st, layer.in_shape)
            ekey = ("conv" if layer.kind == "linear" else layer.kind, layer.in_shape, st, lay)
        entry = self._entry.get(ekey)
        if entry is None:
            per = self._events(lambda r: entry_events(layer, st, in_dist, r, self.item),
                               placement(st), in_dist.grid)
            entry = self._entry[ekey] = self._pair_time(per, placement(st), in_dist.grid)
        return entry

    def _pair_time(self, per, *placed) -> tuple:
        """``((fwd s, fwd bytes), (bwd s, bwd bytes))`` of ``(forward, backward)`` event
        lists per rank. A move onto or off a placed rank set beyond EXACT_RANKS is priced
        on one rank of the set, which receives its block in one direction and sends it
        in the other (the adjoint moves the same elements back): both directions are
        priced as the larger."""
        f, b = (self.events_time([x[i] for x in per]) for i in range(2))
        if self.p > EXACT_RANKS and any(getattr(g, "ranks", g) is not None for g in placed):
            f = b = max(f, b)
        return f, b

    def move(self, shape, src, dst) -> LayerCost:
        """Cost of moving a tensor of ``shape`` from ``src`` to ``dst`` and its gradient
        back (``dc.fork``'s move of a branch's input onto the branch's ranks)."""
        key = ("move", tuple(shape), src, dst)
        got = self._cache.get(key)
        if got is None:
            from .commmodel import redistribute_events
            per = self._events(lambda r: (
                redistribute_events(shape, src, dst, r, self.item),
                redistribute_events(shape, dst.replace(pending=()), src.replace(pending=()),
                                    r, self.item)), src.grid, dst.grid)
            got = LayerCost(out_dist=dst)
            (got.comm_fwd, b1), (got.comm_bwd, b2) = self._pair_time(per, src.grid, dst.grid)
            got.bytes = b1 + b2
            self._cache[key] = got
        return got

    def layer_table(self, layer, in_dists, strategies=None) -> tuple:
        """Arrays ``(time, mem, work, sync)``, each ``[a, b]``, of strategic ``layer`` under
        strategy ``strategies[b]`` (default ``self.strategies``) with its input in
        ``in_dists[a]``: the fields of :meth:`layer` for every pair, computed once per
        column (only the entry redistribution depends on ``a``)."""
        import numpy as np
        strategies = self.strategies if strategies is None else strategies
        T, Mm, W, Sy = (np.empty((len(in_dists), len(strategies))) for _ in range(4))
        # _layout(d, st) is d on st's own grid, else d's physical layout (if it has one);
        # the inputs of one layout share its entry cost (id >= 0 per layout, -1 - a: none)
        phys, ids = [_phys_layout(d, layer.in_shape) for d in in_dists], {}
        grp = [-1 - a if x is None else ids.setdefault(x, len(ids)) for a, x in enumerate(phys)]
        for b, st in enumerate(strategies):
            base = self.layer(layer, st, in_dists[0])
            Mm[:, b], W[:, b], Sy[:, b] = base.mem, base.work, base.sync
            if base.time == float("inf"):  # a strategy the layer cannot run
                T[:, b] = base.time
                continue
            (f0, _), (b0, _) = self._entry_cost(layer, st, in_dists[0])
            rest = base.time - f0 - b0
            own, col = grid_shape(st), {}
            for a, d in enumerate(in_dists):
                g = -1 - a if d.grid.shape == own else grp[a]
                if g not in col:
                    col[g] = self._entry_cost(layer, st, d, lay=d if g < 0 else phys[a])
                (fa, _), (ba, _) = col[g]
                T[a, b] = rest + fa + ba
        return T, Mm, W, Sy

    def loss(self, shape, dist) -> LayerCost:
        """Cost of :class:`distconv.nn.CrossEntropyLoss` on logits of ``shape`` ``(N, K)``
        in ``dist``: the collectives of the real loss run shape-only
        (:func:`.realrun.run_loss`, bare allreduces), not its local arithmetic (a few
        passes over the local logits). Zero for an output that is not 2-D."""
        key = ("loss", tuple(shape), dist)
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = LayerCost(out_dist=dist)
            if len(shape) == 2:
                from .realrun import run_loss
                per = self._events(lambda r: run_loss(shape, dist, self.p, r, self.item),
                                   dist.grid)
                (got.comm_fwd, b1), (got.comm_bwd, b2) = (self.events_time(
                    [x[i] for x in per], redistribute=False) for i in range(2))
                got.bytes = b1 + b2
        return got

    def join(self, shape, body_dist, short_dist) -> LayerCost:
        """Cost of a residual join (the add forward, the gradient split backward)."""
        key = ("join", shape, body_dist, short_dist)
        got = self._cache.get(key)
        if got is not None:
            return got
        # between two grids the join's cost depends only on where the elements lie (see
        # _layout): pairs with the same physical layouts share it (~K^2 pairs per block,
        # ~(number of layouts)^2 distinct ones)
        pkey = None
        if body_dist.grid.shape != short_dist.grid.shape:
            lb, ls = _phys_layout(body_dist, shape), _phys_layout(short_dist, shape)
            if lb is not None and ls is not None:
                pkey = ("join-layout", shape, lb, ls)
                twin = self._cache.get(pkey)
                if twin is not None:
                    c = self._cache[key] = _with_out(twin, body_dist)
                    return c
        per = self._events(lambda r: join_events(shape, body_dist, short_dist, r, self.item))
        c = LayerCost(out_dist=body_dist)
        c.comm_fwd, b1 = self.events_time([x[0] for x in per])
        c.comm_bwd, b2 = self.events_time([x[1] for x in per])
        c.bytes = b1 + b2
        n = _prod(body_dist.local_shape(shape, [0] * len(body_dist.grid.names)))
        of, ob = self._overhead("join")
        c.compute_fwd = self.compute.add(n) + of
        c.compute_bwd = self.compute.add(n) + ob
        self._cache[key] = c
        if pkey is not None:
            self._cache[pkey] = c
        return c

    def cat_part(self, block, i, src_dist, first_dist, out_dist=None) -> LayerCost:
        """Cost of branch ``i``'s share of the cat join of ``block``: its output (in
        ``src_dist``) moved into its slot of the concatenated output, which lies as
        ``dc.cat`` lays it (the splits of the first branch's output, ``first_dist``), and
        the adjoint (the output gradient cut back into ``src_dist``) in backward.

        The bytes are those the real code sends: :func:`cat_events` runs
        ``tensor.exchange`` shape-only, as ``dc.cat`` calls it but for this branch alone
        (per rank, the bytes of ``dc.cat``'s one alltoallv are the sum of its branches'),
        on every rank up to 16 and on rank 0 beyond, and the machine's alpha-beta model
        prices them. ``dc.cat`` issues ONE alltoallv for all branches: pricing each
        branch's share as its own collective (so that the search can add them up, branch
        by branch) counts an alpha and the Python of a redistribution per branch instead
        of one. Branch 0's share also carries the join's own Python; each share the local
        copy of its slot. Cached by the physical layouts of source and output (beyond 16
        ranks, where rank 0 alone is evaluated, by rank 0's two blocks). ``out_dist``: the
        output layout when it is not ``first_dist``'s (branches placed on their own ranks:
        :func:`distconv.functional.cat_output_layout`).
        """
        from ..functional import cat_output_layout
        shapes, offs = block.branch_shapes(), block.offsets()
        src_shape, out_shape = shapes[i], tuple(block.out_shape)
        if out_dist is None:
            out_dist = cat_output_layout([first_dist], 1)
        if (self.ranks == [0] and _partition(src_dist) and _partition(out_dist)
                and src_dist.grid.ranks is None and out_dist.grid.ranks is None):
            # only rank 0 is evaluated: an exchange between layouts that each hold every
            # element once sends what rank 0 holds outside its target block and receives
            # what its target block lacks, so rank 0's two blocks are the whole key
            z = [0] * len(src_dist.grid.names)
            key = ("cat0", src_shape, offs[i], out_shape, i == 0,
                   src_dist.box(src_shape, z), out_dist.box(out_shape, z))
        else:
            key = ("cat", src_shape, offs[i], out_shape, i == 0,
                   _phys_layout(src_dist, src_shape) or src_dist,
                   _phys_layout(out_dist, out_shape) or out_dist)
        got = self._cache.get(key)
        if got is None:
            per = self._events(lambda r: cat_events(src_shape, offs[i], out_shape, src_dist,
                                                    out_dist, self.p, r, self.item),
                               src_dist.grid, out_dist.grid)
            got = LayerCost()
            (got.comm_fwd, b1), (got.comm_bwd, b2) = self._pair_time(per, src_dist.grid,
                                                                     out_dist.grid)
            got.bytes = b1 + b2
            n = _prod(src_dist.local_shape(src_shape, [0] * len(src_dist.grid.names)))
            got.compute_fwd = got.compute_bwd = self.compute.add(n)
            if i == 0:
                of, ob = self._overhead("join")
                got.compute_fwd += of
                got.compute_bwd += ob
            self._cache[key] = got
        return dataclasses.replace(got, out_dist=out_dist)

    # ----------------------------------------------------------- helpers
    def _overhead(self, kind, bias=False):
        """:func:`_overhead` of this model's compute model, memoised per (kind, bias):
        the searches ask for it ~10^5 times at 1024 ranks (it is measured, if at all, on
        the first ask, and constant after)."""
        key = (kind, bool(bias))
        got = self._ovh.get(key)
        if got is None:
            got = self._ovh[key] = _overhead(self.compute, kind, bias)
        return got

    def input_dist(self, st):
        return act_dist(as_strategy(st), len(self.graph.in_shape))


def _with_out(c: LayerCost, out_dist) -> LayerCost:
    """``dataclasses.replace(c, out_dist=out_dist)`` without its checks (one per pair)."""
    new = LayerCost.__new__(LayerCost)
    new.__dict__.update(c.__dict__)
    new.out_dist = out_dist
    return new


def _overhead(cm, kind, bias=False):
    """``cm.layer_overhead`` where the compute model has one (a stand-in may not)."""
    fn = getattr(cm, "layer_overhead", None)
    if fn is None or kind not in OVERHEAD_KINDS:
        return 0.0, 0.0
    return fn(kind, bias)


def _layout(d, st, shape):
    """Cache key of where a tensor in ``d`` lives, as seen by a layer of strategy ``st``.

    A between-layer distribution (N over ``sample``, C over ``(channel, filter)``, no
    replicas, nothing pending) of grid ``(s, c, f)`` puts every element on the same rank
    as that of grid ``(s, 1, c*f)`` when ``c*f`` divides C or ``c`` or ``f`` is 1 (C is
    split in ``c`` blocks, each in ``f``), and moving it to a *different* grid is the same
    between-grid alltoallv whatever ``c`` and ``f`` are; only a move within one grid
    takes other collectives. So such a source is keyed by ``(s, c*f)`` unless its grid is
    the layer's own. Beyond :data:`.commmodel.EXACT_RANKS` ranks any source with nothing
    pending is keyed by rank 0's block (see :func:`_phys_layout`).
    """
    if st is None or d.pending or (d.grid.shape == grid_shape(st)
                                   and d.grid.ranks == placement(st)):
        return d
    lay = _phys_layout(d, shape)
    return d if lay is None else lay


def _phys_layout(d, shape):
    """``("act", s, c*f, ndim)`` for a between-layer distribution whose elements lie as on
    grid ``(s, 1, c*f)`` (see :func:`_layout`), else None.

    Beyond :data:`.commmodel.EXACT_RANKS` ranks, where rank 0 alone is evaluated, any
    distribution with nothing pending gives ``("box", rank 0's block, the dims it
    splits)``: the events of a move between two grids on rank 0 depend on nothing else of
    it (:func:`.commmodel.move_key`), nor do those of a cat's exchange (rank 0's blocks:
    :func:`distconv.exchange._exchange_counted`), nor rank 0's compute."""
    if d.pending or d.grid.ranks is not None:  # placed layouts are keyed by themselves
        return None
    if d.grid.size > EXACT_RANKS:
        return ("box", d.box(shape, (0,) * len(d.grid.names)), tuple(bool(a) for a in d.split))
    sp = d.split
    if (sp[0] in ((), ("sample",)) and sp[1] in ((), ("channel",), ("filter",),
                                                ("channel", "filter"))
            and not any(sp[2:]) and d.grid.names == ("sample", "channel", "filter")):
        s, c, f = d.grid.shape
        if c > 1 and f > 1 and shape[1] % (c * f):
            return None  # C splits in c blocks, each in f: not the flat c*f blocks if uneven
        used = set(sp[0]) | set(sp[1])  # axes of size 1 are dropped from a split
        if all(n == 1 or a in used for a, n in zip(d.grid.names, d.grid.shape)):
            return ("act", s, c * f, len(sp))
    return None


def _compute_kw(machine) -> dict:
    comp = getattr(machine, "compute", None) or {}
    kw = {}
    if comp.get("rates"):
        kw["rates"] = comp["rates"]
    if comp.get("scale") is not None:
        kw["scale"] = float(comp["scale"])
    return kw


def _partition(d) -> bool:
    """``d`` holds every element on exactly one rank (no replicas, nothing pending)."""
    return not d.pending and all(d.axis_size(a) == 1 for a in d.replica_axes)
