"""Bytes per rank of every collective distconv issues, learnt from the real code.

:func:`redistribute_events` runs :meth:`distconv.tensor.DistTensor.redistribute` itself
(its ``_move``, unrecorded) shape-only: MetaArray blocks on a
:class:`~distconv.shapecomm.ShapeComm` world of the grid's size seen from one rank, and
returns what that rank's :class:`distconv.comm.Communicator` would record:
``Event(kind, group, sent, recv)`` with ``group`` the world ranks of the
(sub-)communicator and ``sent``/``recv`` bytes counted as ``comm.stats()`` counts them.
:func:`cat_events` does the same for one input's share of ``dc.cat``. Distributions may be
on the planner's :class:`VGrid` (a grid without a communicator); they are rebuilt on the
shape-only world's grids with the same axis names.

``tests/test_planner_comm.py`` checks these numbers against ``comm.stats()`` of real
runs, layer by layer and rank by rank, at 1–4 ranks with uneven shapes.
"""
from __future__ import annotations

from functools import lru_cache

from ..comm import use_world
from ..meta import MetaArray
from ..shapecomm import Event, allreduce_bytes
from ..strategy import AXES
from ..tensor import DistTensor


class VGrid:
    """A process grid without a communicator: ``names``, ``shape``, coordinates of any rank.

    ``ranks``: the world ranks of a placed grid (position ``q`` is world rank
    ``ranks[q]``; ``None``: every rank of the world, position = world rank) in a job of
    ``world`` ranks (default: the grid's size)."""

    comm = None

    def __init__(self, shape, names=AXES, ranks=None, world=None):
        self.shape = tuple(int(s) for s in shape)
        self.names = tuple(names)
        self.size = 1
        for s in self.shape:
            self.size *= s
        self.world = self.size if world is None else int(world)
        if ranks is not None and tuple(ranks) == tuple(range(self.world)):
            ranks = None
        self.ranks = None if ranks is None else tuple(int(r) for r in ranks)
        if (self.world if ranks is None else len(self.ranks)) != self.size:
            raise ValueError(f"a grid of shape {self.shape} cannot lie on ranks {ranks} of "
                             f"a job of {self.world}")
        self._pos = None if ranks is None else {r: q for q, r in enumerate(self.ranks)}

    def like(self, shape, names, ranks=None) -> "VGrid":
        """A grid of ``shape`` and ``names`` on ``ranks`` of this grid's world."""
        return VGrid(shape, names, ranks, self.world)

    def index(self, name):
        return self.names.index(name)

    def axis_size(self, name):
        return self.shape[self.index(name)]

    def rank_set(self) -> tuple:
        """The world ranks on this grid, in grid order (all of them when unplaced)."""
        return tuple(range(self.world)) if self.ranks is None else self.ranks

    def pos(self, rank):
        """The grid position of world rank ``rank`` (``None`` if it is not on the grid)."""
        return rank if self._pos is None else self._pos.get(rank)

    def world_rank(self, q):
        """The world rank at grid position ``q``."""
        return q if self.ranks is None else self.ranks[q]

    def coords_of(self, rank):
        """Coordinates of grid position ``rank``."""
        out = []
        for s in reversed(self.shape):
            out.append(rank % s)
            rank //= s
        return tuple(reversed(out))

    def rank_of(self, coords):
        r = 0
        for c, s in zip(coords, self.shape):
            r = r * s + int(c)
        return r

    def group(self, axes, rank):
        """World ranks of world rank ``rank``'s sub-communicator over ``axes``, in sub-rank
        order."""
        return _group(self, tuple(axes), rank)

    def _group(self, axes, rank):
        me = list(self.coords_of(self.pos(rank)))
        idx = [self.index(a) for a in axes]
        out = [()]
        for i in idx:
            out = [t + (k,) for t in out for k in range(self.shape[i])]
        ranks = []
        for t in out:
            c = list(me)
            for i, k in zip(idx, t):
                c[i] = k
            ranks.append(self.world_rank(self.rank_of(c)))
        return tuple(ranks)

    def __eq__(self, other):
        return isinstance(other, VGrid) and self.shape == other.shape \
            and self.names == other.names and self.ranks == other.ranks \
            and self.world == other.world

    def __hash__(self):
        return hash((self.shape, self.names, self.ranks))

    def __repr__(self):
        if self.ranks is None:
            return f"VGrid({dict(zip(self.names, self.shape))})"
        return f"VGrid({dict(zip(self.names, self.shape))} on {self.ranks} of {self.world})"


@lru_cache(maxsize=None)
def _group(grid, axes, rank):
    return grid._group(axes, rank)


def allreduce_event(grid, axes, rank, n, item) -> Event:
    """The allreduce of ``n`` elements of ``item`` bytes over ``axes`` of ``grid``, on
    ``rank`` (bytes as :class:`~distconv.shapecomm.ShapeComm` records them)."""
    g = grid.group(axes, rank)
    if len(g) == 1:
        return Event("allreduce", g, 0, 0)
    s, r = allreduce_bytes(n, len(g), g.index(rank), item)
    return Event("allreduce", g, s, r)


_DTYPES = {2: "float16", 4: "float32", 8: "float64"}


def _dtype(item):
    dtype = _DTYPES.get(int(item))
    if dtype is None:
        raise ValueError(f"no float dtype of {item} bytes (expected one of {sorted(_DTYPES)})")
    return dtype


def redistribute_events(shape, src, dst, rank: int, item: int) -> list:
    """Events of ``DistTensor.redistribute(src -> dst)`` of a tensor of global ``shape`` on
    ``rank``: the real ``_move`` run shape-only (cached per :func:`move_key`)."""
    shape, rank, item = tuple(int(s) for s in shape), int(rank), int(item)
    key = move_key(shape, src, dst, rank, item)
    got = _MOVES.get(key)
    if got is None:
        if len(_MOVES) > _MOVES_SIZE:
            _MOVES.clear()
            _MIDS.clear()
        if key[0] == "xp":  # the reduction and the exchange _cross_grid makes, each keyed
            mid = _MIDS.get(key[1:4])  # it depends on the shape, src, which dims dst splits
            if mid is None:
                from ..tensor import cross_grid_source
                mid = _MIDS[key[1:4]] = cross_grid_source(src, shape, dst)
            got = tuple(redistribute_events(shape, src, mid, rank, item)
                        + redistribute_events(shape, mid, dst, rank, item))
        else:
            got = run_move(shape, src, dst, rank, item)
        _MOVES[key] = got
    return list(got)


_MOVES: dict = {}
_MIDS: dict = {}  # key[1:4] of an "xp" move_key -> tensor.cross_grid_source
_MOVES_SIZE = 200000


def move_key(shape, src, dst, rank, item) -> tuple:
    """The cache key of a move's events on ``rank``.

    Beyond :data:`EXACT_RANKS` the shape-only world counts an exchange from the rank's own
    two blocks alone (``recv_only``: :func:`distconv.exchange._exchange_counted`). A move
    between two grids into a target with nothing pending is one such exchange when the
    source has nothing pending either (``_cross_grid`` -> ``_general``), so the key is
    the rank's source and target boxes; a pending source is first reduced within its own
    grid onto a dimension chosen by the source and by which dims the target splits, then
    exchanged, so the key is the source, the target's split dims and its box. Every other
    move is keyed by its full arguments. ``tests/test_planner_comm.py`` checks keyed
    results against uncached runs."""
    if src.grid.world > EXACT_RANKS and not dst.pending and (
            tuple(src.grid.shape) != tuple(dst.grid.shape)
            or tuple(src.grid.names) != tuple(dst.grid.names)
            or src.grid.ranks != dst.grid.ranks):
        dbox = box_on(dst, shape, rank)
        if not src.pending:
            return ("x", src.grid.world, shape, box_on(src, shape, rank), dbox, item)
        return ("xp", shape, src, tuple(bool(a) for a in dst.split), dbox, rank, item)
    return (shape, src, dst, rank, item)


def box_on(d, shape, rank):
    """World rank ``rank``'s block of a tensor of ``shape`` in ``d`` (``None`` off its grid)."""
    q = d.grid.pos(rank)
    return None if q is None else d.box(shape, d.grid.coords_of(q))


def run_move(shape, src, dst, rank, item) -> tuple:
    """The events of ``src -> dst`` on ``rank``, uncached: ``DistTensor._move`` (not
    recorded) on a shape-only world of the grid's size."""
    world, real = shape_world(src.grid.world, rank)
    start = len(world.events)
    with use_world(world):
        sd = real(src)
        DistTensor(MetaArray(sd.local_shape(shape), _dtype(item)), sd, shape)._move(real(dst))
    out = tuple(Event(e.kind, e.group, e.sent, e.recv) for e in world.events[start:])
    del world.events[start:]
    return out


def cat_events(src_shape, offset, out_shape, src_dist, out_dist, nranks, rank, item=4):
    """``(forward, backward)`` events on ``rank`` of ``nranks`` of one input's share of
    ``dc.cat`` (dim 1): ``tensor.exchange`` run shape-only moving a tensor of ``src_shape``
    in ``src_dist`` into the box at channel ``offset`` of an output of ``out_shape`` in
    ``out_dist``, then the output gradient back into ``src_dist`` -- the calls ``dc.cat``
    and its backward make, for this input alone."""
    from ..comm import use_world
    from ..meta import MetaArray
    from ..tensor import DistTensor, exchange
    dtype = _dtype(item)
    world, real = shape_world(int(nranks), int(rank))
    nd = len(out_shape)
    zero = (0,) * nd
    off = (0, int(offset)) + (0,) * (nd - 2)
    start = len(world.events)
    with use_world(world):
        sd, od = real(src_dist), real(out_dist)
        t = DistTensor(MetaArray(sd.local_shape(src_shape), dtype), sd, tuple(src_shape))
        exchange([(t, off)], [(od, tuple(out_shape), zero)])
        mid = len(world.events)
        dy = DistTensor(MetaArray(od.local_shape(out_shape), dtype), od, tuple(out_shape))
        exchange([(dy, zero)], [(real(src_dist.replace(pending=())), tuple(src_shape), off)])
        fwd, bwd = world.events[start:mid], world.events[mid:]
        del world.events[start:]
    return fwd, bwd


_WORLDS: dict = {}
# beyond this many ranks a between-grid move counts what a rank receives and takes it to
# send as many (ShapeComm recv_only): finding every partner would cost O(ranks) per move
EXACT_RANKS = 16


def shape_world(nranks, rank):
    """``(world, real)``: a :class:`~distconv.shapecomm.ShapeComm` of ``nranks`` ranks seen
    from ``rank`` (``recv_only`` beyond :data:`EXACT_RANKS`), and ``real(d)``:
    distribution ``d`` (on any grid-like object with ``names`` and ``shape``) on that
    world's grid of the same shape and names. Kept per
    ``(nranks, rank)``."""
    got = _WORLDS.get((nranks, rank))
    if got is not None:
        return got
    from ..shapecomm import ShapeComm
    world = ShapeComm(nranks, rank, recv_only=nranks > EXACT_RANKS)
    if len(_WORLDS) > 64:
        _WORLDS.clear()
    got = _WORLDS[(nranks, rank)] = (world, on_world(world))
    return got


def on_world(world):
    """``real(d)``: distribution ``d`` (on any grid-like object with ``names``, ``shape``
    and ``ranks``) on ``world``'s grid of the same shape, names and ranks (one grid per
    shape, names and ranks; the distributions kept too)."""
    from ..distribution import Distribution
    from ..grid import ProcessGrid
    grids: dict = {}
    dists: dict = {}

    def real(d):
        key = (tuple(d.grid.shape), tuple(d.grid.names), d.grid.ranks, d.split, d.pending)
        r = dists.get(key)
        if r is None:
            gk = key[:3]
            g = grids.get(gk)
            if g is None:
                g = grids[gk] = ProcessGrid(world, *gk)
            r = dists[key] = Distribution(g, d.split, d.pending)
        return r

    return real
