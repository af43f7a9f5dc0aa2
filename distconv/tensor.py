"""DistTensor: a local block, its distribution and the global shape.

``redistribute`` moves a tensor between any two distributions of the same
global shape with the cheapest collectives, one grid axis at a time:

1. pending-sum axes the target does not keep: reduce-scatter over that axis
   when the target splits a dimension over it next, otherwise allreduce;
2. split axes the target does not keep where they are: alltoall when the
   target wants that axis on another dimension, otherwise allgather;
3. split axes the target adds: a local slice (no communication);
4. pending axes the target adds: the value stays on coordinate 0, zeros elsewhere.

Between distributions on different grids over the same ranks (consecutive
layers with different strategies), pending sums are first reduced on the
source grid, then one alltoallv over all ranks moves each element from one
holder straight to the ranks that need it. No step ever gathers the whole
tensor on one rank to re-split it.
"""
from __future__ import annotations


from .backend import array_module
from .distribution import Distribution, block_sizes
from .meta import MetaArray, is_meta


def _check_same_global(comm, array, shape) -> None:
    """``ValueError`` on every rank unless every rank's ``array`` has the same shape, dtype
    and checksum (one allgather of three small values per rank)."""
    if comm.size == 1:
        return
    from .replicas import digest
    try:
        # a shape-only array (distconv.trace) has no values: shape and dtype only
        d = 0 if type(array).__module__ == "distconv.meta" else digest(array)
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        d = f"cannot checksum: {type(e).__name__}: {e}"
    vals = comm.allgather_obj((shape, str(array.dtype), d))
    errs = sorted({v[2] for v in vals if isinstance(v[2], str)})
    if errs:
        raise ValueError(f"from_global: {'; '.join(errs)}")
    if any(v[:2] != vals[0][:2] for v in vals):
        detail = ", ".join(f"rank {r}: {v[:2]}" for r, v in enumerate(vals))
        raise ValueError(f"ranks disagree on global (shape, dtype) in from_global: {detail}")
    if any(v[2] != vals[0][2] for v in vals):
        groups = {}
        for r, v in enumerate(vals):
            groups.setdefault(v[2], []).append(r)
        raise ValueError(f"from_global: the ranks passed different values for the global "
                         f"array of shape {shape} (ranks grouped by equal values: "
                         f"{sorted(groups.values())}); every rank must pass the same array, "
                         f"else its replicas would differ")


class DistTensor:
    """``DistTensor(local, distribution, global_shape)``.

    ``local``: this rank's block (numpy/cupy array) of shape
    ``distribution.local_shape(global_shape)``.
    """

    __slots__ = ("local", "distribution", "shape", "grad_fn", "requires_grad", "grad")

    def __init__(self, local, distribution: Distribution, global_shape):
        global_shape = tuple(int(s) for s in global_shape)
        want = distribution.local_shape(global_shape)
        if tuple(local.shape) != want:
            raise ValueError(f"local block has shape {tuple(local.shape)} but {distribution} "
                             f"of global shape {global_shape} needs {want} on rank "
                             f"{distribution.grid.rank}")
        self.local = local
        self.distribution = distribution
        self.shape = global_shape
        #: the recorded call that produced this tensor (None: a leaf); see distconv.autograd
        self.grad_fn = None
        #: a leaf whose gradient ``backward`` adds into ``grad``, as ``torch.Tensor``
        self.requires_grad = False
        self.grad = None

    # ------------------------------------------------------------- properties
    @property
    def grid(self):
        return self.distribution.grid

    @property
    def dtype(self):
        return self.local.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self):
        return (f"DistTensor(shape={self.shape}, dtype={self.local.dtype}, "
                f"local={tuple(self.local.shape)}, {self.distribution})")

    # ------------------------------------------------------------ conversion
    @classmethod
    def from_global(cls, array, distribution: Distribution, check: bool = True) -> "DistTensor":
        """Cut this rank's block out of ``array`` (every rank passes the same global array).

        ``array``: the global tensor, shape ``distribution``'s global shape (numpy or cupy).
        With ``check`` (default) the ranks first agree on shape, dtype and a 64-bit
        checksum of the values (:func:`distconv.replicas.digest`, one allgather of three
        small values per rank): an array that differs on any rank raises the same
        ``ValueError`` on every rank naming which ranks passed which values, so replicas
        can never start out different. ``check=False`` skips this (for callers that
        already compared the values, e.g. checkpoint loading). For a pending
        distribution the value is put on coordinate 0 of each pending axis and zeros
        elsewhere.
        """
        xp = array_module(array)
        shape = tuple(int(s) for s in array.shape)
        if check and distribution.grid.member:  # a placed grid: its members compare
            _check_same_global(distribution.grid.comm, array, shape)
        comm_ok = len(shape) == distribution.ndim
        if not comm_ok:
            raise ValueError(f"array of shape {shape} has {len(shape)} dims but {distribution} "
                             f"has {distribution.ndim}")
        local = local_block(array, distribution)
        if distribution.pending and any(distribution.grid.coord(a) != 0
                                        for a in distribution.pending):
            local = xp.zeros_like(local)
        return cls(local, distribution, shape)

    def to_global(self):
        """The whole tensor on every rank (allgather / allreduce as needed); an xp array."""
        full = Distribution.replicated(self.grid.full_grid(), self.ndim)
        return self._move(full).local

    def copy(self) -> "DistTensor":
        return DistTensor(self.local.copy(), self.distribution, self.shape)

    # ------------------------------------------------------------ autograd
    def backward(self, gradient=None) -> None:
        """Backpropagate ``gradient`` (a DistTensor or the same global array on every rank,
        of this tensor's shape) through the recorded graph, as ``torch.Tensor.backward``:
        parameter gradients and the ``grad`` of leaves with ``requires_grad`` accumulate."""
        from . import autograd
        if gradient is None:
            raise RuntimeError(f"backward of a tensor of shape {self.shape} needs a gradient "
                               f"of that shape (only a loss is differentiated implicitly)")
        if not isinstance(gradient, DistTensor):
            from .backend import get_xp
            gradient = DistTensor.from_global(get_xp().asarray(gradient),
                                              self.distribution.replace(pending=()))
        if tuple(gradient.shape) != tuple(self.shape):
            raise ValueError(f"backward: gradient has shape {tuple(gradient.shape)}, expected "
                             f"{tuple(self.shape)}")
        autograd.backward([self], [gradient])

    def __add__(self, other):
        from .functional import add
        return add(self, other)

    def __radd__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # sum([a, b, ...])
            return self
        return NotImplemented

    # ------------------------------------------------------------ redistribute
    def redistribute(self, target: Distribution) -> "DistTensor":
        """This tensor laid out as ``target`` (same global shape); self if already so.

        Differentiable: when gradients are recorded and this tensor is part of the graph,
        the move is recorded and its adjoint is the move back (a pending sum's gradient is
        the value replicated over the pending axes)."""
        if self.grad_fn is None and not self.requires_grad:
            return self._move(target)
        return recorded_move(self, target)

    def _move(self, target: Distribution) -> "DistTensor":
        """``redistribute`` without recording."""
        if target.ndim != self.ndim:
            raise ValueError(f"cannot redistribute a {self.ndim}-d tensor to {target}")
        if target == self.distribution:
            return self
        if not self.distribution.same_grid(target):
            return _cross_grid(self, target)
        t = self
        # 1. resolve pending sums the target does not keep
        for a in t.distribution.pending:
            if a in target.pending:
                continue
            t = _reduce_axis(t, a, target)
        # 2. move or gather split axes that are not where the target wants them; when an
        #    axis would be gathered and then used again by the target (a reordering of
        #    blocks), one alltoallv of exactly the missing elements is cheaper
        if _needs_general(t.distribution, target):
            # pending axes still here are kept by the target: they stay where they are
            return _general(t, target.replace(pending=t.distribution.pending)
                            )._move(target)
        changed = True
        while changed:
            changed = False
            for d in range(t.ndim):
                cur, want = t.distribution.split[d], target.split[d]
                if cur == want[:len(cur)]:
                    continue
                a = cur[-1]
                t = _move_or_gather(t, d, a, target)
                changed = True
                break
        # 3. local slices for axes the target adds
        for d in range(t.ndim):
            cur, want = t.distribution.split[d], target.split[d]
            if cur != want:
                t = _slice_more(t, d, want)
        # 4. pending axes the target adds
        new_pending = tuple(a for a in target.pending if a not in t.distribution.pending)
        if new_pending:
            xp = array_module(t.local)
            local = t.local
            if any(t.grid.coord(a) != 0 for a in new_pending):
                local = xp.zeros_like(local)
            t = DistTensor(local, t.distribution.replace(pending=target.pending), t.shape)
        assert t.distribution == target, (t.distribution, target)
        return t


def local_block(array, dist: Distribution):
    """This rank's block of the global ``array`` under ``dist``: always a new C-contiguous
    copy (in-place updates of ``t.local``, e.g. by an optimizer, must not write into the
    caller's array); a rank off a placed grid gets a MetaArray of its stand-in block (no
    data, see :mod:`distconv.grid`)."""
    shape = tuple(int(s) for s in array.shape)
    if not dist.grid.member:
        return MetaArray(dist.local_shape(shape), array.dtype)
    return array_module(array).array(array[dist.slices(shape)], copy=True, order="C")


def recorded_move(t: DistTensor, target: Distribution) -> DistTensor:
    """``t._move(target)``, recorded as an autograd node (when recording) even for a leaf
    that does not require grad, so the gradient of the result reaches ``t``."""
    out = t._move(target)
    if out is not t:
        from . import autograd
        src = t.distribution.replace(pending=())
        autograd.record("redistribute", lambda dy, needs: (dy._move(src) if needs[0] else None,),
                        [t], out)
    return out


# ---------------------------------------------------------------- the steps
def _reduce_axis(t: DistTensor, a: str, target: Distribution) -> DistTensor:
    """Remove pending axis ``a``: reduce-scatter if the target splits a dim over ``a`` next."""
    dist = t.distribution
    sub = t.grid.sub(a)
    pending = tuple(x for x in dist.pending if x != a)
    # the target splits dim d over ``a`` right after what d is split over now: reduce-scatter
    # lands exactly there; if it splits d over ``a`` elsewhere, reduce-scatter still halves
    # the bytes of an allreduce and a later alltoallv reorders the blocks
    exact = [d for d in range(t.ndim)
             if len(target.split[d]) > len(dist.split[d])
             and target.split[d][:len(dist.split[d])] == dist.split[d]
             and target.split[d][len(dist.split[d])] == a]
    somewhere = [d for d in range(t.ndim) if a in target.split[d]]
    for d in exact + somewhere:
        cur = dist.split[d]
        counts = block_sizes(t.local.shape[d], sub.size)
        local = sub.reduce_scatter(t.local, axis=d, counts=counts)
        nd = dist.replace(split=dist.split[:d] + (cur + (a,),) + dist.split[d + 1:],
                          pending=pending)
        return DistTensor(local, nd, t.shape)
    local = sub.allreduce(t.local)
    return DistTensor(local, dist.replace(pending=pending), t.shape)


def _move_or_gather(t: DistTensor, d: int, a: str, target: Distribution) -> DistTensor:
    """Remove innermost split axis ``a`` of dim ``d``: alltoall to another dim if the target
    wants ``a`` there next, otherwise allgather along ``d``."""
    dist = t.distribution
    sub = t.grid.sub(a)
    cur_d = dist.split[d]
    parent = dist.dim_range(d, t.shape[d], upto=len(cur_d) - 1)
    recv_counts = block_sizes(parent[1] - parent[0], sub.size)
    new_split = list(dist.split)
    new_split[d] = cur_d[:-1]
    for d2 in range(t.ndim):
        if d2 == d:
            continue
        cur2, want2 = dist.split[d2], target.split[d2]
        if len(want2) > len(cur2) and want2[:len(cur2)] == cur2 and want2[len(cur2)] == a:
            send_counts = block_sizes(t.local.shape[d2], sub.size)
            local = sub.alltoall(t.local, split_axis=d2, concat_axis=d,
                                 send_counts=send_counts, recv_counts=recv_counts)
            new_split[d2] = cur2 + (a,)
            return DistTensor(local, dist.replace(split=new_split), t.shape)
    local = sub.allgather(t.local, axis=d, counts=recv_counts)
    return DistTensor(local, dist.replace(split=new_split), t.shape)


def _needs_general(cur: Distribution, target: Distribution) -> bool:
    """True if the gather/alltoall/slice steps would gather an axis the target splits over."""
    want_axes = set(target.split_axes)
    split = [list(s) for s in cur.split]
    changed = True
    while changed:
        changed = False
        for d in range(len(split)):
            c, w = tuple(split[d]), target.split[d]
            if c == w[:len(c)]:
                continue
            a = split[d].pop()
            moved = False
            for d2 in range(len(split)):
                c2, w2 = tuple(split[d2]), target.split[d2]
                if d2 != d and len(w2) > len(c2) and w2[:len(c2)] == c2 and w2[len(c2)] == a:
                    split[d2].append(a)
                    moved = True
                    break
            if not moved and a in want_axes:
                return True
            changed = True
            break
    return False


def _slice_more(t: DistTensor, d: int, want) -> DistTensor:
    dist = t.distribution
    nd = dist.with_dim(d, want)
    lo, _ = dist.dim_range(d, t.shape[d])
    s, e = nd.dim_range(d, t.shape[d])
    idx = [slice(None)] * t.ndim
    idx[d] = slice(s - lo, e - lo)
    xp = array_module(t.local)
    return DistTensor(xp.ascontiguousarray(t.local[tuple(idx)]), nd, t.shape)


def _cross_grid(t: DistTensor, target: Distribution) -> DistTensor:
    """Redistribute between two grids over the same ranks with one alltoallv."""
    src_grid, dst_grid = t.grid, target.grid
    if not _same_world(src_grid, dst_grid):
        raise ValueError(f"cannot redistribute between grids on different communicators: "
                         f"{src_grid} and {dst_grid}")
    if target.pending:
        # go to the target's layout without pending, then add the pending axes locally
        base = DistTensor._move(t, target.replace(pending=()))
        return base._move(target)
    if t.distribution.pending:
        # reduce-scatter each pending axis onto the dimension with the largest blocks; judged
        # by the block at grid coordinate 0 so that every rank picks the same dimension
        src = t.distribution
        split = [list(s) for s in src.split]
        first = src.local_shape(t.shape, [0] * len(src.grid.names))
        # prefer a dimension the target splits: the blocks then land where it wants them
        dims = [i for i in range(t.ndim) if target.split[i]] or list(range(t.ndim))
        for a in src.pending:
            d = max(dims, key=lambda i: (first[i], -i))
            split[d].append(a)
        t = t._move(src.replace(split=split, pending=()))
    return _general(t, target)


def _general(t: DistTensor, target: Distribution) -> DistTensor:
    """One alltoallv over all ranks: each rank receives exactly the elements of its target
    block that it does not hold, each from one holder (the one with the same coordinates on
    the source's replica axes). Pending axes of ``t`` (same grid only) must be the
    target's too: addends move only between ranks with the same pending coordinates."""
    zero = (0,) * t.ndim
    return exchange([(t, zero)], [(target, t.shape, zero)])[0]


def _inter(b1, b2):
    out = tuple((max(x[0], y[0]), min(x[1], y[1])) for x, y in zip(b1, b2))
    return out if all(e > s for s, e in out) else None


def _rel(box, base):
    return tuple(slice(s - b[0], e - b[0]) for (s, e), b in zip(box, base))


def _shift(box, off, sign=1):
    return tuple((s + sign * o, e + sign * o) for (s, e), o in zip(box, off))


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
    same = all(g.ranks == g0.ranks for g in grids)
    comm = g0.comm if same else world
    if same and not g0.member:
        return [DistTensor(out, dist, shape) for dist, shape, _, _, out in dst]
    if getattr(comm, "recv_only", False):
        return _exchange_counted(comm, sources, dst)
    sends, recvs = _plan_exchange(sources, dst, world.rank)
    if same:
        order = sorted(set(sends) | set(recvs), key=g0.position)
        send_counts, recv_counts = [0] * comm.size, [0] * comm.size
        for q in order:
            send_counts[g0.position(q)] = sum(part.size for part in sends.get(q, ()))
            recv_counts[g0.position(q)] = sum(_box_size(b) for _, b in recvs.get(q, ()))
        parts = [part for q in order for part in sends.get(q, ())]
        send = xp.concatenate(parts) if parts else xp.empty(0, dtype)
        flat = comm.alltoallv_flat(send, send_counts, recv_counts)
        got, off = {}, 0
        for q in order:
            got[q] = flat[off:off + recv_counts[g0.position(q)]]
            off += recv_counts[g0.position(q)]
    else:
        got = world.exchange_p2p(
            {q: xp.concatenate(parts) for q, parts in sends.items()},
            {q: sum(_box_size(b) for _, b in boxes) for q, boxes in recvs.items()}, xp, dtype)
    for q, boxes in recvs.items():
        off = 0
        for j, rbox in boxes:
            n = _box_size(rbox)
            out, dbox = dst[j][4], dst[j][3]
            out[_rel(rbox, dbox)] = got[q][off:off + n].reshape([e - s for s, e in rbox])
            off += n
    return [DistTensor(out, dist, shape) for dist, shape, _, _, out in dst]


def _plan_exchange(sources, dst, me: int):
    """What this rank (world rank ``me``) sends and receives in :func:`exchange`:
    ``sends`` ``{world rank: [flat parts]}`` and ``recvs`` ``{world rank: [(target index,
    box)]}``, both in (source, target) order; the parts it keeps are copied into ``dst``
    here. Partners are found from the block structure (only the ranks whose blocks meet
    mine), so the cost grows with the number of partners, not with the job size."""
    sends: dict = {}
    recvs: dict = {}
    for t, off in sources:
        d, g = t.distribution, t.grid
        if g.member:
            rep = _holder_class(g, d, me)
            my_box = _shift(d.box(t.shape), off)
        for j, (dist, shape, doff, dbox, out) in enumerate(dst):
            # what I send: my block ∩ the target box of each q of my replica class
            for qc, qbox in (dist.blocks_meeting(shape, _shift(my_box, doff, -1))
                             if g.member else ()):
                q = dist.grid.ranks[dist.grid.rank_of(qc)]
                if _holder_class(g, d, q) != rep:
                    continue
                box = _inter(my_box, _shift(qbox, doff))
                if q == me:
                    out[_rel(box, dbox)] = t.local[_rel(box, my_box)]
                else:
                    sends.setdefault(q, []).append(t.local[_rel(box, my_box)].reshape(-1))
            if not dist.grid.member:
                continue
            # what I receive: from the one holder of each element in my replica class
            for qc, qbox in d.blocks_meeting(t.shape, _shift(dbox, off, -1),
                                             _holder_class(g, d, me)):
                q = g.ranks[g.rank_of(qc)]
                if q != me:
                    recvs.setdefault(q, []).append((j, _inter(_shift(qbox, off), dbox)))
    return sends, recvs


def _holder_class(g, d: Distribution, q: int) -> dict:
    """``{axis: coordinate}`` on the replica and pending axes of ``d`` (on grid ``g``) of
    the holders that send to world rank ``q``: ``q``'s own coordinates when ``q`` is on
    ``g``, else a replica picked by ``q`` (``q`` mod the number of replicas, mixed radix),
    so sender and receiver compute the same holder and the load spreads."""
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
    return [DistTensor(out, dist, shape) for dist, shape, _, _, out in dst]

