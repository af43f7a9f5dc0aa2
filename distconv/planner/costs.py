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
  them (:meth:`.compute.ComputeModel.layer_overhead`, measured once per layer kind);
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
than 64 ranks count the bytes a rank receives for both directions (O(1) per rank).
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass

from ..distribution import block_sizes
from .commmodel import EXACT_RANKS, cat_events
from .overhead import OVERHEAD_KINDS
from .events import (act_dist, entry_events, inner_events, join_events, out_dist_of,
                     spatial_dist)
from .strategies import (factorizations, is_spatial, parse_strategy,  # noqa: F401
                         strategy_short, strategy_text, to_strategy)

_OPT_SLOTS = {"sgd": 1, "adam": 2}


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

    @property
    def time(self) -> float:
        return (self.compute_fwd + self.compute_bwd + self.comm_fwd + self.comm_bwd
                + self.sync + self.update)


def _prod(xs):
    n = 1
    for s in xs:
        n *= int(s)
    return n


class CostModel:
    """Costs of every layer of ``graph`` on ``nranks`` ranks of ``machine``.

    ``compute``: a :class:`.compute.ComputeModel` (default: fitted defaults, no
    measuring); ``item``: bytes per element (4: float32); ``optimizer``: ``sgd``
    (one momentum slot) or ``adam`` (two); ``spatial``: the strategies include splits of
    H and W (:func:`factorizations`), which a layer without them (a Linear) cannot take:
    its cost under one is infinite.
    """

    def __init__(self, graph, nranks, machine=None, compute=None, item=4, optimizer="sgd",
                 spatial=False):
        from .compute import ComputeModel
        from .machine import Machine
        self.graph = graph
        self.p = int(nranks)
        self.machine = machine if machine is not None else Machine()
        self.compute = compute if compute is not None else ComputeModel(
            measure=False, **_compute_kw(self.machine))
        self.item = int(item)
        self.optimizer = optimizer
        if optimizer not in _OPT_SLOTS:
            raise ValueError(f"optimizer must be one of {sorted(_OPT_SLOTS)}, got {optimizer!r}")
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

    def _events(self, fn):
        return [fn(r) for r in self.ranks]

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
                per = self._events(lambda r: inner_events(layer, st, r, self.item))
                # batch norm reduces its statistics with bare allreduces
                # batch norm's statistics and a spatial layer's halos are not issued by
                # DistTensor.redistribute
                plain = layer.kind != "bn" and not is_spatial(st)
                inner = self._inner[(sig, st)] = tuple(
                    self.events_time([x[i] for x in per], redistribute=plain)
                    for i in range(3))
        entry = self._entry_cost(layer, st, in_dist, key)
        c = LayerCost(out_dist=out_dist_of(layer, st, in_dist))
        (c.comm_fwd, b1), (c.comm_bwd, b2) = entry
        if inner is not None:
            c.comm_fwd += inner[0][0]
            c.comm_bwd += inner[1][0]
            c.sync, c.sync_bytes = inner[2]
            b1 += inner[0][1] + inner[1][1]
        c.bytes = b1 + b2
        ckey = key[:5] + ((in_dist.local_shape(layer.in_shape, [0] * len(in_dist.grid.names)),
                           in_dist.split) if st is None else (),)
        got = self._ccache.get(ckey)
        if got is None:
            tmp = LayerCost(out_dist=c.out_dist)
            self._compute(layer, st, in_dist, tmp)
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
            per = self._events(lambda r: entry_events(layer, st, in_dist, r, self.item))
            entry = self._entry[ekey] = tuple(self.events_time([x[i] for x in per])
                                              for i in range(2))
        return entry

    def layer_table(self, layer, in_dists) -> tuple:
        """Arrays ``(time, mem, work, sync)``, each ``[a, b]``, of strategic ``layer`` under
        strategy ``self.strategies[b]`` with its input in ``in_dists[a]``: the fields of
        :meth:`layer` for every pair, computed once per column (only the entry
        redistribution depends on ``a``)."""
        import numpy as np
        T, Mm, W, Sy = (np.empty((len(in_dists), len(self.strategies))) for _ in range(4))
        # _layout(d, st) is d on st's own grid, else d's physical layout (if it has one);
        # the inputs of one layout share its entry cost (id >= 0 per layout, -1 - a: none)
        phys, ids = [_phys_layout(d, layer.in_shape) for d in in_dists], {}
        grp = [-1 - a if x is None else ids.setdefault(x, len(ids)) for a, x in enumerate(phys)]
        for b, st in enumerate(self.strategies):
            base = self.layer(layer, st, in_dists[0])
            (f0, _), (b0, _) = self._entry_cost(layer, st, in_dists[0])
            rest = base.time - f0 - b0
            Mm[:, b], W[:, b], Sy[:, b] = base.mem, base.work, base.sync
            own, col = tuple(st), {}
            for a, d in enumerate(in_dists):
                g = -1 - a if d.grid.shape == own else grp[a]
                if g not in col:
                    col[g] = self._entry_cost(layer, st, d, lay=d if g < 0 else phys[a])
                (fa, _), (ba, _) = col[g]
                T[a, b] = rest + fa + ba
        return T, Mm, W, Sy

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
                    c = self._cache[key] = dataclasses.replace(twin, out_dist=body_dist)
                    return c
        per = self._events(lambda r: join_events(shape, body_dist, short_dist, r, self.item))
        c = LayerCost(out_dist=body_dist)
        c.comm_fwd, b1 = self.events_time([x[0] for x in per])
        c.comm_bwd, b2 = self.events_time([x[1] for x in per])
        c.bytes = b1 + b2
        n = _prod(body_dist.local_shape(shape, [0, 0, 0]))
        of, ob = self._overhead("join")
        c.compute_fwd = self.compute.add(n) + of
        c.compute_bwd = self.compute.add(n) + ob
        self._cache[key] = c
        if pkey is not None:
            self._cache[pkey] = c
        return c

    def cat_part(self, block, i, src_dist, first_dist) -> LayerCost:
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
        ranks, where rank 0 alone is evaluated, by rank 0's two blocks).
        """
        from ..functional import _cat_layout
        shapes, offs = block.branch_shapes(), block.offsets()
        src_shape, out_shape = shapes[i], tuple(block.out_shape)
        out_dist = _cat_layout(_HasDist(first_dist), 1, out_shape)
        if self.ranks == [0] and _partition(src_dist) and _partition(out_dist):
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
                                                    out_dist, self.p, r, self.item))
            got = LayerCost()
            got.comm_fwd, b1 = self.events_time([x[0] for x in per])
            got.comm_bwd, b2 = self.events_time([x[1] for x in per])
            got.bytes = b1 + b2
            n = _prod(src_dist.local_shape(src_shape, [0] * len(src_dist.grid.names)))
            got.compute_fwd = got.compute_bwd = self.compute.add(n)
            if i == 0:
                of, ob = self._overhead("join")
                got.compute_fwd += of
                got.compute_bwd += ob
            self._cache[key] = got
        return dataclasses.replace(got, out_dist=out_dist)

    def _compute(self, layer, st, in_dist, c: LayerCost) -> None:
        cm, it = self.compute, self.item
        zero = [0] * (3 if st is None else len(st))
        xs, ys = layer.in_shape, layer.out_shape
        k, a = layer.kind, layer.attrs
        slots = 2 + _OPT_SLOTS[self.optimizer]
        if k == "conv" and is_spatial(st):
            self._spatial_conv(layer, st, c, slots)
        elif k in ("conv", "linear"):
            s, ch, f = st
            n = block_sizes(xs[0], s)[0]
            cl = block_sizes(xs[1], ch)[0]
            fl = block_sizes(ys[1], f)[0]
            if k == "conv":
                kh, kw = a["kernel_size"]
                fw, bd, bf = cm.conv(n, cl, xs[2], xs[3], fl, a["kernel_size"], a["stride"],
                                     a["padding"], a["dilation"])
                ho, wo = ys[2], ys[3]
                c.mem = n * cl * xs[2] * xs[3] * it
                c.work = cl * kh * kw * n * ho * wo * it if (kh, kw) != (1, 1) else 0
                nparam = fl * cl * kh * kw
            else:
                fw, bd, bf = cm.linear(n, cl, fl)
                c.mem = n * cl * it
                nparam = fl * cl
            if a.get("bias"):
                nparam += block_sizes(ys[1], ch * f)[0]
            c.compute_fwd, c.compute_bwd = fw, bd + bf
            c.mem += nparam * slots * it
            c.update = cm.update(nparam, self.optimizer)
        elif k == "bn":
            loc = act_dist(st, 4).local_shape(xs, zero)
            fw, bw = cm.bn(*loc)
            c.compute_fwd, c.compute_bwd = fw, bw
            c.mem = _prod(loc) * it + 2 * loc[1] * slots * it
            c.update = cm.update(2 * loc[1], self.optimizer)
        else:
            loc = in_dist.local_shape(xs, [0] * len(in_dist.grid.names))
            if k == "relu":
                fw, bw = cm.relu(_prod(loc))
                c.mem = _prod(loc) * it
            elif k == "avgpool" and "output_size" in a:  # adaptive, output above 1x1
                fw, bw = cm.adaptive_avgpool(*loc, *a["output_size"])
            elif k in ("maxpool", "avgpool"):
                fn = cm.maxpool if k == "maxpool" else cm.avgpool
                pad = a["padding"]
                if spatial_dist(in_dist):  # rank 0's window, halos included, padding 0
                    loc, pad = _window(in_dist, layer, (1, 1))[:4], 0
                fw, bw = fn(*loc, a["kernel_size"], a["stride"], pad)
                if k == "maxpool":
                    oloc = c.out_dist.local_shape(ys, [0] * len(in_dist.grid.names))
                    c.mem = _prod(oloc) * 8
            elif k == "gap":
                fw, bw = cm.global_avgpool(*loc)
            else:
                fw = bw = 0.0
            c.compute_fwd, c.compute_bwd = fw, bw
        # the layer's own Python around its kernels (measured once per kind; an adaptive
        # average pool is an AdaptiveAvgPool2d, not an AvgPool2d)
        of, ob = self._overhead("adaptive" if "output_size" in a else k, bool(a.get("bias")))
        c.compute_fwd += of
        c.compute_bwd += ob

    def _spatial_conv(self, layer, st, c: LayerCost, slots) -> None:
        """Compute and memory of a conv under spatial strategy ``st = (s, 1, 1, h, w)``:
        rank 0's kernels on its input window (its rows and columns plus the halos,
        :func:`distconv.halo.windows`, padding 0), the weight replicated."""
        xs, ys, a, it = layer.in_shape, layer.out_shape, layer.attrs, self.item
        (kh, kw), d = a["kernel_size"], a["dilation"]
        n, _, hw, ww, ho, wo = _window(act_dist(st, 4), layer, d)
        fw, bd, bf = self.compute.conv(n, xs[1], hw, ww, ys[1], (kh, kw), a["stride"], 0, d)
        c.compute_fwd, c.compute_bwd = fw, bd + bf
        nparam = ys[1] * xs[1] * kh * kw + (ys[1] if a.get("bias") else 0)
        c.mem = n * xs[1] * hw * ww * it + nparam * slots * it
        c.work = xs[1] * kh * kw * n * ho * wo * it if (kh, kw) != (1, 1) else 0
        c.update = self.compute.update(nparam, self.optimizer)

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
        return act_dist(tuple(st), len(self.graph.in_shape))


def _window(d, layer, dilation) -> tuple:
    """``(n, c, window h, window w, out h, out w)`` of rank 0's block of a conv or pooling
    ``layer`` on an input in ``d``: its rows and columns and the halos it reads, padding
    included (:func:`distconv.halo.windows`), as the spatial code computes on them."""
    from ..halo import windows
    xs, ys, a = layer.in_shape, layer.out_shape, layer.attrs
    z = [0] * len(d.grid.names)
    n, c = d.local_shape(xs, z)[:2]
    out = []
    for i in (2, 3):
        axes = d.split[i]
        parts = 1
        for ax in axes:
            parts *= d.grid.axis_size(ax)
        out.append(windows(xs[i], parts, a["kernel_size"][i - 2], a["stride"][i - 2],
                           a["padding"][i - 2], dilation[i - 2], n_out=ys[i])[0])
    return (n, c, out[0].size, out[1].size, out[0].out[1] - out[0].out[0],
            out[1].out[1] - out[1].out[0])


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
    if st is None or d.pending or d.grid.shape == tuple(st):
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
    if d.pending:
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


class _HasDist:
    """What ``functional._cat_layout`` reads of its first input: the distribution."""

    def __init__(self, d):
        self.distribution = d
