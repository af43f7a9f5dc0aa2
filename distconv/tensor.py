"""DistTensor: a local block, its distribution and the global shape.

``redistribute`` moves a tensor between any two distributions of the same
global shape with the cheapest collectives, one grid axis at a time:

1. pending-sum axes the target does not keep: reduce-scatter over that axis
   when the target splits a dimension over it next, otherwise allreduce;
2. split axes the target does not keep where they are: alltoall when the
   target wants that axis on another dimension, otherwise allgather;
3. split axes the target adds: a local slice (no communication);
4. pending axes the target adds: the value stays on coordinate 0, zeros elsewhere.

Between distributions on different grids (consecutive layers with different
strategies, or placed on different ranks), pending sums are first reduced on the
source grid, then one exchange (:func:`distconv.exchange.exchange`) moves each
element from one holder straight to the ranks that need it: one alltoallv when both
grids have the same ranks, point-to-point between the ranks that meet otherwise. No
step ever gathers the whole tensor on one rank to re-split it. A rank off a placed grid
holds a shape-only block there (:mod:`distconv.grid`); its moves on that grid cost
nothing.
"""
from __future__ import annotations


from .backend import array_module
from .distribution import Distribution, block_sizes
from .exchange import _same_world, exchange
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
    ``distribution.local_shape(global_shape)``; on a rank off a placed grid a
    :class:`~distconv.meta.MetaArray` of its stand-in block (an array given there is
    replaced by one: such a rank never holds data of that grid).
    """

    __slots__ = ("local", "distribution", "shape", "grad_fn", "requires_grad", "grad")

    def __init__(self, local, distribution: Distribution, global_shape):
        global_shape = tuple(int(s) for s in global_shape)
        want = distribution.local_shape(global_shape)
        if tuple(local.shape) != want:
            raise ValueError(f"local block has shape {tuple(local.shape)} but {distribution} "
                             f"of global shape {global_shape} needs {want} on rank "
                             f"{distribution.grid.rank}")
        if not getattr(distribution.grid, "member", True) and not is_meta(local):
            local = MetaArray(tuple(local.shape), local.dtype)  # off a placed grid: no data
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
        if distribution.pending and distribution.grid.member and any(
                distribution.grid.coord(a) != 0 for a in distribution.pending):
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
        hook = self.distribution.grid.world.move_hook
        if hook is not None:  # a shape-only world recording moves instead of running them
            return hook(self, target)
        if target == self.distribution:
            return self
        if not self.distribution.same_grid(target):
            return _cross_grid(self, target)
        d = self.distribution
        if not target.pending and target.split == d.split:
            # only pending sums to resolve (a batch norm's statistics, a weight gradient's
            # sync): what step 1 below does, without the walk over the dims
            return _allreduce_axes(self, d.pending)
        t = self
        # 1. resolve pending sums the target does not keep: several that the target splits
        #    nothing over at once, with one allreduce over all of them
        drop = [a for a in t.distribution.pending if a not in target.pending]
        if len(drop) > 1 and not set(drop) & set(target.split_axes):
            t = _allreduce_axes(t, drop)
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
def _allreduce_axes(t: DistTensor, axes) -> DistTensor:
    """Remove the pending axes ``axes`` together: one allreduce over the ranks that differ
    only on them (their sub-communicator), not one per axis."""
    names = tuple(a for a in t.grid.names if a in axes)
    local = t.grid.sub(names).allreduce(t.local)
    pending = tuple(a for a in t.distribution.pending if a not in axes)
    return DistTensor(local, t.distribution.replace(pending=pending), t.shape)


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
        t = t._move(cross_grid_source(t.distribution, t.shape, target))
    return _general(t, target)


def cross_grid_source(src: Distribution, shape, target: Distribution) -> Distribution:
    """Where a move from ``src`` (pending) to another grid's ``target`` (nothing pending)
    first reduces the tensor of global ``shape`` within ``src``'s grid, before its
    alltoallv: each pending axis reduce-scattered onto the dimension with the largest
    blocks, preferring one the target splits (the blocks then land where it wants them);
    judged by the block at grid coordinate 0 so that every rank picks the same one."""
    split = [list(s) for s in src.split]
    first = src.local_shape(shape, [0] * len(src.grid.names))
    n = len(shape)
    dims = [i for i in range(n) if target.split[i]] or list(range(n))
    for a in src.pending:
        d = max(dims, key=lambda i: (first[i], -i))
        split[d].append(a)
    return src.replace(split=split, pending=())


def _general(t: DistTensor, target: Distribution) -> DistTensor:
    """One alltoallv over all ranks: each rank receives exactly the elements of its target
    block that it does not hold, each from one holder (the one with the same coordinates on
    the source's replica axes). Pending axes of ``t`` (same grid only) must be the
    target's too: addends move only between ranks with the same pending coordinates."""
    zero = (0,) * t.ndim
    return exchange([(t, zero)], [(target, t.shape, zero)])[0]
