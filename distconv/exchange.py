"""``exchange``: move blocks of tensors between any layouts with the minimum volume.

The one general data movement of distconv: ``DistTensor.redistribute`` uses it for block
reorderings and for moves between grids (different strategies, different rank sets),
``dc.cat`` and ``dc.fork`` for their joins and forks. Each rank works out, from the
block structure alone, which of its elements each peer needs and which it receives, so
every rank computes the same plan without asking anyone.
"""
from __future__ import annotations

from .backend import array_module
from .distribution import Distribution
from .meta import MetaArray, is_meta


def _inter(b1, b2):
    out = []
    for (s1, e1), (s2, e2) in zip(b1, b2):
        s, e = (s1 if s1 > s2 else s2), (e1 if e1 < e2 else e2)
        if e <= s:
            return None
        out.append((s, e))
    return tuple(out)


def _rel(box, base):
    return tuple(slice(s - b[0], e - b[0]) for (s, e), b in zip(box, base))


def _shift(box, off, sign=1):
    if not any(off):
        return box
    return tuple([(s + sign * o, e + sign * o) for (s, e), o in zip(box, off)])


def _box_size(box) -> int:
    n = 1
    for s, e in box:
        n *= e - s
    return n


def exchange(sources, targets) -> list:
    """Move the blocks of several tensors into several layouts with ONE exchange.

    sources: ``[(DistTensor, offset)]``; targets: ``[(Distribution, global shape, offset)]``.
    Every tensor occupies the box ``[offset, offset + shape)`` of one common index space (a
    concatenation puts its inputs side by side on one dimension). Each rank receives exactly
    the elements of its target blocks that it does not hold itself, each from one holder per
    source (:func:`_holder_class`), so the volume sent is the minimum. All grids must have
    the same world; sources with pending axes must have them in every target (same grid).
    Returns one DistTensor per target.

    Transport: when every grid has the same ranks, one alltoallv over their communicator
    (ranks off a placed grid return at once: they hold nothing and get nothing). Between
    grids of different rank sets (operator placement), point-to-point messages over the
    world between the pairs of ranks that meet (:meth:`Communicator.exchange_p2p`), so a
    rank waits only for the ranks it sends to or receives from. Why that cannot deadlock:
    every rank runs every move and every layer collective in one program order (all ranks
    run the same forward and the same reverse-topological backward, placed or not), and
    each one waits only for the ranks taking part in it; by induction over that order each
    operation completes once its participants have finished the earlier ones, and messages
    between a pair match in order (MPI's non-overtaking rule on one tag).
    """
    g0 = sources[0][0].grid
    grids = [t.grid for t, _ in sources] + [d.grid for d, _, _ in targets]
    for g in grids:
        if not _same_world(g, g0):
            raise ValueError(f"exchange: grids on different communicators: {g}, {g0}")
    world = g0.world
    dtype = sources[0][0].local.dtype
    xp = _out_xp(sources, world)
    dst = []  # per target: (distribution, shape, offset, my box, out array)
    for dist, shape, off in targets:
        box = _shift(dist.box(shape), off)
        lshape = tuple(e - s for s, e in box)
        dst.append((dist, shape, off, box, xp.empty(lshape, dtype) if dist.grid.member
                    else MetaArray(lshape, dtype)))
    same = all(g.ranks is g0.ranks or g.ranks == g0.ranks for g in grids)
    comm = g0.comm if same else world
    if same and not g0.member:
        return _tensors(dst)
    if getattr(comm, "recv_only", False):
        return _exchange_counted(comm, sources, dst)
    sends, recvs, keeps, mine = _plan_exchange(sources, dst, world.rank)
    # a shape-only world: the plan's box sizes are the whole message; nothing is copied
    meta = hasattr(world, "split_grid") and all(is_meta(t.local) for t, _ in sources)
    if not meta:  # the parts this rank keeps, copied here
        for i, j, box in keeps:
            dst[j][4][_rel(box, dst[j][3])] = sources[i][0].local[_rel(box, mine[i])]
    sent = {q: [(sources[i][0].local, box, mine[i]) for i, box in parts]
            for q, parts in sends.items()}
    recv_n = {q: sum(_box_size(b) for _, b in boxes) for q, boxes in recvs.items()}
    if same:
        got = _alltoallv(comm, g0, sent, recv_n, xp, dtype, meta)
    else:
        got = world.exchange_p2p(
            {q: (MetaArray((sum(_box_size(b) for _, b, _ in x),), dtype) if meta
                 else xp.concatenate([_part(*y) for y in x])) for q, x in sent.items()},
            recv_n, xp, dtype)
    if not meta:
        _unpack(got, recvs, dst)
    return _tensors(dst)


def _alltoallv(comm, grid, sent, recv_n, xp, dtype, meta):
    """One alltoallv over ``grid``'s communicator ``comm``: ``sent`` ``{world rank:
    [(local block, box, block's box)]}``, ``recv_n`` ``{world rank: elements}``; returns
    ``{world rank: flat received part}`` (nothing when ``meta``: only counted)."""
    order = sorted(set(sent) | set(recv_n), key=grid.position)
    send_counts, recv_counts = [0] * comm.size, [0] * comm.size
    for q in order:
        send_counts[grid.position(q)] = sum(_box_size(b) for _, b, _ in sent.get(q, ()))
        recv_counts[grid.position(q)] = recv_n.get(q, 0)
    if meta:  # shape-only: the counts are the message
        comm.alltoallv_flat(MetaArray((sum(send_counts),), dtype), send_counts, recv_counts)
        return {}
    parts = [_part(*x) for q in order for x in sent.get(q, ())]
    send = xp.concatenate(parts) if parts else xp.empty(0, dtype)
    flat = comm.alltoallv_flat(send, send_counts, recv_counts)
    got, off = {}, 0
    for q in order:
        got[q] = flat[off:off + recv_counts[grid.position(q)]]
        off += recv_counts[grid.position(q)]
    return got


def _unpack(got, recvs, dst):
    """Each received flat part into its boxes of the target blocks."""
    for q, boxes in recvs.items():
        off = 0
        for j, rbox in boxes:
            n = _box_size(rbox)
            out, dbox = dst[j][4], dst[j][3]
            out[_rel(rbox, dbox)] = got[q][off:off + n].reshape([e - s for s, e in rbox])
            off += n


def _part(local, box, base):
    """The elements of global ``box`` from a block at ``base``, flat (a message part)."""
    return local[_rel(box, base)].reshape(-1)


def _plan_exchange(sources, dst, me: int):
    """The geometry of :func:`exchange` on world rank ``me``, no data touched: ``sends``
    ``{world rank: [(source index, box)]}`` and ``recvs`` ``{world rank: [(target index,
    box)]}``, both in (source, target) order; ``keeps`` ``[(source index, target index,
    box)]``, the parts that stay here; ``mine`` the box of each source this rank holds
    (boxes are global, offsets applied). Partners are found from the block structure
    (only the ranks whose blocks meet mine), so the cost grows with the number of
    partners, not with the job size."""
    sends: dict = {}
    recvs: dict = {}
    keeps: list = []
    mine: list = []
    for i, (t, off) in enumerate(sources):
        d, g = t.distribution, t.grid
        axes = d.replica_axes + d.pending
        my_box = None
        if g.member:
            rep = _holder_class(g, d, me, axes)
            my_box = _shift(d.box(t.shape), off)
        mine.append(my_box)
        for j, (dist, shape, doff, dbox, out) in enumerate(dst):
            # what I send: my block ∩ the target box of each q of my replica class
            for qc, qbox in (dist.blocks_meeting(shape, _shift(my_box, doff, -1))
                             if g.member else ()):
                q = dist.grid.ranks[dist.grid.rank_of(qc)]
                if axes and _holder_class(g, d, q, axes) != rep:
                    continue
                box = _inter(my_box, _shift(qbox, doff))
                if q == me:
                    keeps.append((i, j, box))
                else:
                    sends.setdefault(q, []).append((i, box))
            if not dist.grid.member:
                continue
            # what I receive: from the one holder of each element in my replica class
            for qc, qbox in d.blocks_meeting(t.shape, _shift(dbox, off, -1),
                                             _holder_class(g, d, me, axes)):
                q = g.ranks[g.rank_of(qc)]
                if q != me:
                    recvs.setdefault(q, []).append((j, _inter(_shift(qbox, off), dbox)))
    return sends, recvs, keeps, mine


def _holder_class(g, d: Distribution, q: int, axes=None) -> dict:
    """``{axis: coordinate}`` on the replica and pending axes of ``d`` (on grid ``g``) of
    the holders that send to world rank ``q``: ``q``'s own coordinates when ``q`` is on
    ``g``, else a replica picked by ``q`` (``q`` mod the number of replicas, mixed radix),
    so sender and receiver compute the same holder and the load spreads. ``axes``: those
    axes (``d.replica_axes + d.pending``) when the caller has them."""
    if axes is None:
        axes = d.replica_axes + d.pending
    pos = g.position(q)
    if pos is not None:
        c = g.coords_of(pos)
        return {a: c[g.index(a)] for a in axes}
    out = {}
    for a in reversed(axes):
        n = g.axis_size(a)
        out[a] = q % n
        q //= n
    return out


def _same_world(g, h) -> bool:
    return g.world is h.world or g.world.mpi == h.world.mpi


def _out_xp(sources, world):
    """The array module of received blocks: a real source's, else the backend's (a rank
    that holds no source block receives real data), or shape-only in a shape-only world."""
    for t, _ in sources:
        if not is_meta(t.local):
            return array_module(t.local)
    if hasattr(world, "split_grid"):  # a ShapeComm world (distconv.trace)
        return array_module(sources[0][0].local)
    from .backend import get_xp
    return get_xp()


def _meet(b1, b2) -> int:
    """Number of elements in the intersection of two boxes."""
    n = 1
    for (s1, e1), (s2, e2) in zip(b1, b2):
        k = min(e1, e2) - max(s1, s2)
        if k <= 0:
            return 0
        n *= k
    return n


def _exchange_counted(comm, sources, dst) -> list:
    """``exchange`` on a shape-only world in ``recv_only`` mode: the holders of a source in
    one replica class partition it, so this rank receives, per source and target, its
    target box within the source's extent less what it holds itself -- counted without
    enumerating partners. It is taken to send as many bytes."""
    n = 0
    for t, off in sources:
        d = t.distribution
        my_box = _shift(d.box(t.shape, t.grid.coords), off)
        extent = _shift(tuple((0, s) for s in t.shape), off)
        for dist, _, _, dbox, _ in dst:
            if dist.grid.member:  # a rank off a grid holds and receives nothing there
                n += _meet(dbox, extent) - (_meet(dbox, my_box) if t.grid.member else 0)
    b = n * sources[0][0].local.dtype.itemsize
    comm.count_alltoallv(b, b)
    return _tensors(dst)



def _tensors(dst) -> list:
    from .tensor import DistTensor  # tensor.py imports this module
    return [DistTensor(out, dist, shape) for dist, shape, _, _, out in dst]
