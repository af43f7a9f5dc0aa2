"""Distributions: which tensor dimension is split over which grid axes.

Pure math, no MPI. A :class:`Distribution` lives on a grid (anything with
``names`` and ``shape``, normally a :class:`distconv.grid.ProcessGrid`) and
says, for each tensor dimension, the ordered grid axes it is split over
(outermost first), plus the grid axes over which the tensor is a *pending
sum* (every rank of such an axis holds an addend; the value is their sum).
Axes that neither split a dimension nor are pending hold replicas.

Block rule ("floor+1"): a dimension of ``d`` split in ``p`` gives the first
``d mod p`` blocks ``d//p + 1`` elements and the rest ``d//p``; blocks may be
empty. A split over several axes ``(a, b)`` is nested: the dimension is split
over ``a`` first and each of those blocks is split again over ``b``. Nesting
makes "split over (a, b)" -> "split over (a,)" an allgather over ``b``, which is
what the channel/filter algorithms rely on.
"""
from __future__ import annotations

from bisect import bisect_right
from itertools import product
from typing import Iterable, Mapping, Sequence

# blocks and boundaries, memoised per (geometry, shape, coordinates): distributions are
# immutable, their blocks depend on the split and the grid's names and shape alone, and a
# planner run asks for the same blocks many times
_MEMO: dict = {}
_GEOMS: dict = {}
_MEMO_SIZE = 200000


def block_sizes(d: int, p: int) -> list[int]:
    """Sizes of the ``p`` blocks of a dimension of length ``d`` (floor+1 rule)."""
    if p < 1:
        raise ValueError(f"number of blocks must be >= 1, got {p}")
    if d < 0:
        raise ValueError(f"dimension length must be >= 0, got {d}")
    q, r = divmod(d, p)
    return [q + 1 if i < r else q for i in range(p)]


def block_range(d: int, p: int, i: int) -> tuple[int, int]:
    """``(start, stop)`` of block ``i`` of ``p`` of a dimension of length ``d``."""
    if not 0 <= i < p:
        raise ValueError(f"block index {i} out of range for {p} blocks")
    q, r = divmod(d, p)
    start = i * q + min(i, r)
    return start, start + q + (1 if i < r else 0)


def block_offsets(d: int, p: int) -> list[int]:
    """Start offsets of the ``p`` blocks of a dimension of length ``d``."""
    sizes = block_sizes(d, p)
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def _norm_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


class Distribution:
    """How a tensor is laid out over a grid.

    Parameters
    ----------
    grid : object with ``names`` (tuple of str) and ``shape`` (tuple of int)
    split : sequence with one entry per tensor dimension: ``None`` (not split),
        an axis name, or a tuple of axis names (nested split, outermost first)
    pending : axis names over which the tensor is a pending sum

    Raises ``ValueError`` naming the problem when an axis is not on the grid or
    is used twice.
    """

    __slots__ = ("grid", "split", "pending", "_hash", "_pend", "_geom")

    def __init__(self, grid, split: Sequence, pending: Iterable[str] = ()):
        names = tuple(grid.names)
        sp = tuple(_norm_axes(e) for e in split)
        pend = tuple(_norm_axes(tuple(pending)))
        used: dict[str, str] = {}
        for d, axes in enumerate(sp):
            for a in axes:
                if a not in names:
                    raise ValueError(
                        f"distribution splits dim {d} over grid axis {a!r}, "
                        f"but the grid has axes {names}")
                if a in used:
                    raise ValueError(f"grid axis {a!r} used twice in distribution "
                                     f"({used[a]} and dim {d})")
                used[a] = f"dim {d}"
        for a in pend:
            if a not in names:
                raise ValueError(f"distribution is pending over grid axis {a!r}, "
                                 f"but the grid has axes {names}")
            if a in used:
                raise ValueError(f"grid axis {a!r} is both pending and splitting {used[a]}")
            used[a] = "pending"
        # canonical form: axes of size 1 split nothing and sum nothing, so they are dropped;
        # pending axes are kept in grid order so equal distributions compare equal
        size = dict(zip(names, grid.shape))
        sp = tuple(tuple(a for a in axes if size[a] > 1) for axes in sp)
        pend = tuple(a for a in names if a in pend and size[a] > 1)
        self.grid = grid
        self.split = sp
        self.pending = pend
        # a grid without a communicator (the planner's) never equals one with: hashed
        # apart, so the two kinds of the same layout do not collide in a dict
        self._hash = hash((sp, pend, tuple(grid.names), tuple(grid.shape),
                           getattr(grid, "comm", None) is None))
        self._pend = None  # pending -> the distribution with it (replace)
        # the key of the block memo: what the blocks depend on (not the communicator, not
        # pending sums; a subclass whose blocks differ extends it), one object per
        # geometry so that equal keys compare by identity
        geom = (type(self), sp, names, tuple(grid.shape))
        if len(_GEOMS) > _MEMO_SIZE:
            _GEOMS.clear()
        self._geom = _GEOMS.setdefault(geom, geom)

    # ------------------------------------------------------------------ basics
    @classmethod
    def replicated(cls, grid, ndim: int) -> "Distribution":
        """Every rank holds the whole tensor."""
        return cls(grid, (None,) * ndim)

    @property
    def ndim(self) -> int:
        return len(self.split)

    def axis_size(self, name: str) -> int:
        return self.grid.shape[self.grid.names.index(name)]

    def parts(self, dim: int) -> int:
        """Number of blocks dimension ``dim`` is cut into."""
        p = 1
        for a in self.split[dim]:
            p *= self.axis_size(a)
        return p

    @property
    def split_axes(self) -> tuple[str, ...]:
        return tuple(a for axes in self.split for a in axes)

    @property
    def replica_axes(self) -> tuple[str, ...]:
        """Grid axes over which the tensor is replicated (neither split nor pending)."""
        used = set(self.split_axes) | set(self.pending)
        return tuple(a for a in self.grid.names if a not in used)

    def dim_of(self, axis: str):
        """The tensor dimension split over ``axis`` or ``None``."""
        for d, axes in enumerate(self.split):
            if axis in axes:
                return d
        return None

    def replace(self, split=None, pending=None) -> "Distribution":
        """A copy with ``split`` and/or ``pending`` replaced (a plain Distribution).

        Changing only ``pending`` -- what every layer call and gradient accumulation does
        -- gives the same object each time for the same ``pending`` (kept per
        distribution), and ``self`` when nothing changes: building one checks and
        canonicalises its axes."""
        if split is None and type(self) is Distribution:
            pending = self.pending if pending is None else tuple(pending)
            if pending == self.pending:
                return self
            memo = self._pend
            if memo is None:
                memo = self._pend = {}
            got = memo.get(pending)
            if got is None:
                got = memo[pending] = Distribution(self.grid, self.split, pending)
            return got
        return Distribution(self.grid, self.split if split is None else split,
                            self.pending if pending is None else pending)

    def with_dim(self, dim: int, axes) -> "Distribution":
        sp = list(self.split)
        sp[dim] = _norm_axes(axes)
        return Distribution(self.grid, sp, self.pending)

    # -------------------------------------------------------------- block math
    def _coord_map(self, coords) -> Mapping[str, int]:
        if coords is None:
            coords = self.grid.coords
        if type(coords) is not tuple and (type(coords) is dict or isinstance(coords, Mapping)):
            return coords
        return dict(zip(self.grid.names, coords))

    def dim_range(self, dim: int, length: int, coords=None, upto: int | None = None):
        """``(start, stop)`` of this rank's block of dimension ``dim`` (global length ``length``).

        ``upto`` limits the nesting to the first ``upto`` split axes.
        """
        cm = self._coord_map(coords)
        start, n = 0, length
        axes = self.split[dim] if upto is None else self.split[dim][:upto]
        for a in axes:
            s, e = block_range(n, self.axis_size(a), cm[a])
            start, n = start + s, e - s
        return start, start + n

    def box(self, global_shape: Sequence[int], coords=None) -> tuple[tuple[int, int], ...]:
        """Per-dimension ``(start, stop)`` of the block at grid ``coords`` (default: this rank).
        Memoised per ``(global_shape, coords)`` given as a sequence (blocks never change)."""
        if type(coords) is dict:
            self._check_shape(global_shape)
            return tuple(self.dim_range(d, n, coords) for d, n in enumerate(global_shape))
        key = (self._geom, tuple(global_shape),
               self.grid.coords if coords is None else tuple(coords))
        got = _MEMO.get(key)
        if got is None:
            self._check_shape(global_shape)
            got = tuple(self.dim_range(d, n, coords) for d, n in enumerate(global_shape))
            if len(_MEMO) > _MEMO_SIZE:
                _MEMO.clear()
            _MEMO[key] = got
        return got

    def local_shape(self, global_shape: Sequence[int], coords=None) -> tuple[int, ...]:
        """Shape of the local block at ``coords`` (default: this rank)."""
        return tuple(e - s for s, e in self.box(global_shape, coords))

    def slices(self, global_shape: Sequence[int], coords=None) -> tuple[slice, ...]:
        """Slices that cut the local block out of the global array."""
        return tuple(slice(s, e) for s, e in self.box(global_shape, coords))

    def local_size(self, global_shape: Sequence[int], coords=None) -> int:
        n = 1
        for s in self.local_shape(global_shape, coords):
            n *= s
        return n

    def split_counts(self, dim: int, length: int, axis: str, coords=None) -> list[int]:
        """Block sizes along ``dim`` for each coordinate of ``axis`` (the innermost split axis
        considered), the other coordinates fixed at ``coords``: the counts of a v-collective."""
        axes = self.split[dim]
        if axis not in axes:
            raise ValueError(f"dim {dim} is not split over axis {axis!r}")
        k = axes.index(axis)
        s, e = self.dim_range(dim, length, coords, upto=k)
        return block_sizes(e - s, self.axis_size(axis))

    def dim_bounds(self, dim: int, length: int) -> tuple[int, ...]:
        """Boundaries of the ``parts(dim)`` blocks of dimension ``dim`` in block order (the
        first split axis outermost): ``parts + 1`` offsets, block ``i`` is
        ``[b[i], b[i+1])``. Memoised per distribution (blocks never change)."""
        key = (self._geom, "bounds", dim, int(length))
        got = _MEMO.get(key)
        if got is None:
            bounds = [0, int(length)]
            for a in self.split[dim]:
                n = self.axis_size(a)
                nb = [0]
                for s, e in zip(bounds[:-1], bounds[1:]):
                    for k in block_sizes(e - s, n):
                        nb.append(nb[-1] + k)
                bounds = nb
            got = _MEMO[key] = tuple(bounds)
        return got

    def _block_coords(self, dim: int) -> tuple:
        """``((axis, coordinate), ...)`` of each block of dimension ``dim`` in block order
        (:meth:`dim_bounds`; the first split axis outermost). Memoised per geometry."""
        key = (self._geom, "coords", dim)
        got = _MEMO.get(key)
        if got is None:
            axes = self.split[dim]
            grids = product(*(range(self.axis_size(a)) for a in axes))
            got = _MEMO[key] = tuple(tuple(zip(axes, cs)) for cs in grids)
        return got

    def blocks_meeting(self, global_shape: Sequence[int], box, fixed: Mapping[str, int]
                       | None = None) -> list:
        """``[(coords, block box)]`` of every grid position whose block meets ``box``
        (per-dimension ``(start, stop)``) in at least one element: the coordinates on
        split axes are those of the blocks that overlap, axes in ``fixed`` (name ->
        coordinate) are pinned, and every other axis takes all its values. Cost
        proportional to the number of positions returned, not to the grid size."""
        self._check_shape(global_shape)
        names = self.grid.names
        fixed = fixed or {}
        choices = []  # per split tensor dim: [(((grid index, coord), ...), (start, stop))]
        whole = []  # the unsplit dims' boxes
        for d, n in enumerate(global_shape):
            lo, hi = box[d]
            s, e = (lo if lo > 0 else 0), (hi if hi < n else int(n))
            if e <= s:
                return []
            if not self.split[d]:
                whole.append((d, (0, int(n))))
                continue
            b = self.dim_bounds(d, n)
            coords = self._block_index_coords(d)
            pins = [(k, fixed[a]) for k, a in enumerate(self.split[d]) if a in fixed]
            opts = []
            i, last = bisect_right(b, s) - 1, len(b) - 1
            if i < 0:
                i = 0
            while i < last:
                lo, hi = b[i], b[i + 1]
                if lo >= e:
                    break
                if hi > s and hi != lo and all(coords[i][k][1] == v for k, v in pins):
                    opts.append((coords[i], (lo, hi)))
                i += 1
            if not opts:
                return []
            choices.append((d, opts))
        free = self._free_axes()
        values = [(fixed[names[i]],) if names[i] in fixed else range(self.grid.shape[i])
                  for i in free]
        bx = [None] * len(global_shape)
        for d, r in whole:
            bx[d] = r
        dims = [d for d, _ in choices]
        out = []
        c = [0] * len(names)
        for combo in product(*(o for _, o in choices)):
            for (pairs, r), d in zip(combo, dims):
                for i, v in pairs:
                    c[i] = v
                bx[d] = r
            t = tuple(bx)
            for vals in product(*values):
                for i, v in zip(free, vals):
                    c[i] = v
                out.append((tuple(c), t))
        return out

    def _block_index_coords(self, dim: int) -> tuple:
        """:meth:`_block_coords` with each axis given by its index on the grid."""
        key = (self._geom, "icoords", dim)
        got = _MEMO.get(key)
        if got is None:
            at = {a: i for i, a in enumerate(self.grid.names)}
            got = _MEMO[key] = tuple(tuple((at[a], c) for a, c in pairs)
                                     for pairs in self._block_coords(dim))
        return got

    def _free_axes(self) -> tuple:
        """Grid indices of the axes that split no dim (they take every value)."""
        key = (self._geom, "free")
        got = _MEMO.get(key)
        if got is None:
            used = set(self.split_axes)
            got = _MEMO[key] = tuple(i for i, a in enumerate(self.grid.names) if a not in used)
        return got

    def _check_shape(self, global_shape):
        if len(global_shape) != self.ndim:
            raise ValueError(f"distribution has {self.ndim} dims but the tensor shape "
                             f"{tuple(global_shape)} has {len(global_shape)}")

    # ------------------------------------------------------------------ dunder
    def same_grid(self, other: "Distribution") -> bool:
        g, h = self.grid, other.grid
        return g is h or (tuple(g.names) == tuple(h.names) and tuple(g.shape) == tuple(h.shape)
                          and getattr(g, "comm", None) is getattr(h, "comm", None)
                          and getattr(g, "ranks", None) == getattr(h, "ranks", None))

    def __eq__(self, other):
        return (isinstance(other, Distribution) and self.split == other.split
                and self.pending == other.pending and self.same_grid(other))

    def __hash__(self):
        return self._hash

    def __repr__(self):
        parts = []
        for d, axes in enumerate(self.split):
            parts.append("R" if not axes else "S(" + ",".join(axes) + ")")
        s = f"Distribution([{', '.join(parts)}]"
        if self.pending:
            s += f", pending={self.pending}"
        grid = ",".join(f"{n}={k}" for n, k in zip(self.grid.names, self.grid.shape))
        return s + f", grid=({grid}))"
