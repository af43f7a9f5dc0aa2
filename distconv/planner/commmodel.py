"""Bytes per rank of every collective distconv issues, computed without MPI.

:func:`redistribute_events` replays the decisions of
:meth:`distconv.tensor.DistTensor.redistribute` (pending sums -> reduce-scatter or
allreduce; split axes -> alltoall, allgather or a local slice; a reordering or a move
between grids -> one alltoallv of exactly the missing elements) for one rank of a
:class:`VGrid` and returns what that rank's :class:`distconv.comm.Communicator` would
record: ``Event(kind, group, sent, recv)`` with ``group`` the world ranks of the
(sub-)communicator and ``sent``/``recv`` bytes counted as ``comm.stats()`` counts them.
:func:`layer_events` does the same for a layer's forward, backward and gradient sync
under a :class:`distconv.Strategy`, given the distribution its input arrives in.

``tests/test_planner_comm.py`` checks these numbers against ``comm.stats()`` of real
runs, layer by layer and rank by rank, at 1–4 ranks with uneven shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..distribution import Distribution, block_sizes

AXES = ("sample", "channel", "filter")
# False: a between-grid alltoallv counts the bytes a rank receives (O(1)) as its sent bytes
# too, instead of looping over every rank (used by the planner on many ranks)
EXACT = True


class VGrid:
    """A process grid without a communicator: ``names``, ``shape``, coordinates of any rank."""

    comm = None

    def __init__(self, shape, names=AXES):
        self.shape = tuple(int(s) for s in shape)
        self.names = tuple(names)
        self.size = 1
        for s in self.shape:
            self.size *= s

    def index(self, name):
        return self.names.index(name)

    def axis_size(self, name):
        return self.shape[self.index(name)]

    def coords_of(self, rank):
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
        """World ranks of ``rank``'s sub-communicator over ``axes``, in sub-rank order."""
        return _group(self, tuple(axes), rank)

    def _group(self, axes, rank):
        me = list(self.coords_of(rank))
        idx = [self.index(a) for a in axes]
        out = [()]
        for i in idx:
            out = [t + (k,) for t in out for k in range(self.shape[i])]
        ranks = []
        for t in out:
            c = list(me)
            for i, k in zip(idx, t):
                c[i] = k
            ranks.append(self.rank_of(c))
        return tuple(ranks)

    def __eq__(self, other):
        return isinstance(other, VGrid) and self.shape == other.shape \
            and self.names == other.names

    def __hash__(self):
        return hash((self.shape, self.names))

    def __repr__(self):
        return f"VGrid({dict(zip(self.names, self.shape))})"


@lru_cache(maxsize=None)
def _group(grid, axes, rank):
    return grid._group(axes, rank)


@lru_cache(maxsize=None)
def _all_ranks(p):
    return tuple(range(p))


@lru_cache(maxsize=None)
def vgrid(s, c, f) -> VGrid:
    return VGrid((s, c, f))


@dataclass(frozen=True)
class Event:
    """One collective as one rank records it (bytes as ``comm.stats()`` counts them)."""

    kind: str
    group: tuple
    sent: int
    recv: int


def _prod(xs):
    n = 1
    for s in xs:
        n *= int(s)
    return n


def _allreduce_bytes(n, p, me, item):
    b = block_sizes(n, p)
    return (n - b[me] + b[me] * (p - 1)) * item, (b[me] * (p - 1) + n - b[me]) * item


def allreduce_event(grid, axes, rank, n, item) -> Event:
    g = grid.group(axes, rank)
    if len(g) == 1:
        return Event("allreduce", g, 0, 0)
    s, r = _allreduce_bytes(n, len(g), g.index(rank), item)
    return Event("allreduce", g, s, r)


# --------------------------------------------------------------- redistribute mirror
def redistribute_events(shape, src: Distribution, dst: Distribution, rank: int,
                        item: int) -> list:
    """Events of ``DistTensor.redistribute(src -> dst)`` on ``rank`` (global ``shape``)."""
    return list(_redistribute_cached(tuple(int(s) for s in shape), src, dst, rank, item,
                                     EXACT))


@lru_cache(maxsize=200000)
def _redistribute_cached(shape, src, dst, rank, item, exact):
    ev: list = []
    _redistribute(shape, src, dst, rank, item, ev)
    return tuple(ev)


@lru_cache(maxsize=200000)
def _needs_general(cur, target):
    from ..tensor import _needs_general as ng
    return ng(cur, target)


@lru_cache(maxsize=500000)
def _box(d: Distribution, shape, rank):
    return d.box(shape, d.grid.coords_of(rank))


def _local(d: Distribution, shape, rank):
    return tuple(e - s for s, e in _box(d, shape, rank))


def _redistribute(shape, cur, target, rank, item, ev):
    if target == cur:
        return cur
    if not cur.same_grid(target):
        return _cross_grid(shape, cur, target, rank, item, ev)
    t = cur
    for a in cur.pending:
        if a in target.pending:
            continue
        t = _reduce_axis(shape, t, a, target, rank, item, ev)
    if _needs_general(t, target):
        g = _general(shape, t, target.replace(pending=t.pending), rank, item, ev)
        return _redistribute(shape, g, target, rank, item, ev)
    changed = True
    while changed:
        changed = False
        for d in range(len(shape)):
            c, w = t.split[d], target.split[d]
            if c == w[:len(c)]:
                continue
            t = _move_or_gather(shape, t, d, c[-1], target, rank, item, ev)
            changed = True
            break
    for d in range(len(shape)):
        if t.split[d] != target.split[d]:
            t = t.with_dim(d, target.split[d])
    if any(a not in t.pending for a in target.pending):
        t = t.replace(pending=target.pending)
    return t


def _reduce_axis(shape, t, a, target, rank, item, ev):
    g = t.grid.group((a,), rank)
    me = g.index(rank)
    pending = tuple(x for x in t.pending if x != a)
    loc = _local(t, shape, rank)
    exact = [d for d in range(len(shape))
             if len(target.split[d]) > len(t.split[d])
             and target.split[d][:len(t.split[d])] == t.split[d]
             and target.split[d][len(t.split[d])] == a]
    somewhere = [d for d in range(len(shape)) if a in target.split[d]]
    for d in exact + somewhere:
        counts = block_sizes(loc[d], len(g))
        pre, post = _prod(loc[:d]), _prod(loc[d + 1:])
        sizes = [pre * c * post for c in counts]
        ev.append(Event("reduce_scatter", g, (sum(sizes) - sizes[me]) * item,
                        sizes[me] * (len(g) - 1) * item))
        return t.replace(split=t.split[:d] + (t.split[d] + (a,),) + t.split[d + 1:],
                         pending=pending)
    s, r = _allreduce_bytes(_prod(loc), len(g), me, item)
    ev.append(Event("allreduce", g, s, r))
    return t.replace(pending=pending)


def _move_or_gather(shape, t, d, a, target, rank, item, ev):
    g = t.grid.group((a,), rank)
    me = g.index(rank)
    coords = t.grid.coords_of(rank)
    cur_d = t.split[d]
    ps, pe = t.dim_range(d, shape[d], coords, upto=len(cur_d) - 1)
    recv_counts = block_sizes(pe - ps, len(g))
    loc = _local(t, shape, rank)
    new_split = list(t.split)
    new_split[d] = cur_d[:-1]
    for d2 in range(len(shape)):
        if d2 == d:
            continue
        cur2, want2 = t.split[d2], target.split[d2]
        if len(want2) > len(cur2) and want2[:len(cur2)] == cur2 and want2[len(cur2)] == a:
            send_counts = block_sizes(loc[d2], len(g))
            pre, post = _prod(loc[:d2]), _prod(loc[d2 + 1:])
            ssizes = [pre * c * post for c in send_counts]
            chunk = list(loc)
            chunk[d2] = send_counts[me]
            other = _prod([n for i, n in enumerate(chunk) if i != d])
            rsizes = [other * c for c in recv_counts]
            ev.append(Event("alltoall", g, (sum(ssizes) - ssizes[me]) * item,
                            (sum(rsizes) - rsizes[me]) * item))
            new_split[d2] = cur2 + (a,)
            return t.replace(split=new_split)
    pre, post = _prod(loc[:d]), _prod(loc[d + 1:])
    sizes = [pre * c * post for c in recv_counts]
    ev.append(Event("allgather", g, sizes[me] * (len(g) - 1) * item,
                    (sum(sizes) - sizes[me]) * item))
    return t.replace(split=new_split)


def _cross_grid(shape, cur, target, rank, item, ev):
    if target.pending:
        base = _redistribute(shape, cur, target.replace(pending=()), rank, item, ev)
        return _redistribute(shape, base, target, rank, item, ev)
    if cur.pending:
        dims = tuple(i for i in range(len(shape)) if target.split[i]) or tuple(range(len(shape)))
        evs, cur = _unpend(shape, cur, dims, rank, item, EXACT)
        ev.extend(evs)
    return _general(shape, cur, target, rank, item, ev)


@lru_cache(maxsize=200000)
def _unpend(shape, cur, dims, rank, item, exact):
    """``(events, distribution)`` of reducing ``cur``'s pending sums before a between-grid
    move: each pending axis splits the largest of ``dims`` of rank 0's block (as
    ``DistTensor.redistribute`` does). Cached: one layer's input gradient arrives the
    same way whatever layout the previous layer wants it in."""
    split = [list(s) for s in cur.split]
    first = _local(cur, shape, 0)
    for a in cur.pending:
        d = max(dims, key=lambda i: (first[i], -i))
        split[d].append(a)
    ev: list = []
    out = _redistribute(shape, cur, cur.replace(split=split, pending=()), rank, item, ev)
    return tuple(ev), out


def _inter_size(b1, b2):
    n = 1
    for (s1, e1), (s2, e2) in zip(b1, b2):
        k = min(e1, e2) - max(s1, s2)
        if k <= 0:
            return 0
        n *= k
    return n


def _general(shape, src, target, rank, item, ev):
    sg = src.grid
    p = sg.size
    if not EXACT:
        b = general_recv_fast(shape, src, target, rank, item)
        ev.append(Event("alltoall", _all_ranks(p), b, b))
        return target
    sent, recv = _general_all(shape, src, target)
    ev.append(Event("alltoall", _all_ranks(p), int(sent[rank]) * item, int(recv[rank]) * item))
    return target


@lru_cache(maxsize=20000)
def _general_all(shape, src, target):
    """Elements every rank sends and receives in a between-grid alltoallv (exact: a rank
    exchanges with the ranks of its replica group only), as two length-``p`` arrays."""
    import numpy as np
    sg = src.grid
    p = sg.size
    rep_idx = [sg.index(a) for a in src.replica_axes + src.pending]
    reps = np.array([[sg.coords_of(q)[i] for i in rep_idx] for q in range(p)],
                    dtype=np.int64).reshape(p, len(rep_idx))
    same = (reps[:, None, :] == reps[None, :, :]).all(axis=2)
    np.fill_diagonal(same, False)
    sb = np.array([_box(src, shape, q) for q in range(p)], dtype=np.int64)  # (p, nd, 2)
    db = np.array([_box(target, shape, q) for q in range(p)], dtype=np.int64)
    lo = np.maximum(sb[:, None, :, 0], db[None, :, :, 0])
    hi = np.minimum(sb[:, None, :, 1], db[None, :, :, 1])
    inter = np.clip(hi - lo, 0, None).prod(axis=2) * same  # [i, j]: i's source in j's target
    return inter.sum(axis=1), inter.sum(axis=0)


def general_recv_fast(shape, src, target, rank, item) -> int:
    """Bytes ``rank`` receives in a between-grid alltoallv without pending sums: its target
    block minus what it holds (O(1); the exact path loops over all ranks)."""
    sb = _box(src, shape, rank)
    db = _box(target, shape, rank)
    return (_prod(e - s for s, e in db) - _inter_size(sb, db)) * item
