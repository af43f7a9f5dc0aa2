"""ProcessGrid: the ranks of a communicator on a named cartesian grid.

Ranks are laid out row-major with the first axis outermost (``sample`` is
outermost in a strategy's grid), so rank ``r`` of a ``(s, c, f)`` grid has
coordinates ``(r // (c*f), (r // f) % c, r % f)``. ``sub(axes)`` gives the
communicator of the ranks that share all coordinates *outside* ``axes``,
ranked row-major over ``axes`` in the order given; these are created on first
use (a collective call on the whole grid) and cached.

Operator placement: ``ProcessGrid(comm, shape, names, ranks=(...))`` puts only those
ranks of ``comm`` (the *world* of the grid) on the grid, position ``q`` being world rank
``ranks[q]``. Its members talk over a communicator of their own
(:meth:`distconv.comm.Communicator.subset`, created by the members alone), so nothing the
layer does ever waits for another rank. A rank outside the set is not ``member``: it
stands in for position 0 on a shape-only communicator
(:class:`distconv.shapecomm.ShapeComm`), so it runs the same layer code on
:class:`~distconv.meta.MetaArray` blocks -- no data, no communication -- and every rank
still walks the same program. Moves between grids of different rank sets go through the
world (:func:`distconv.exchange.exchange`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from . import comm as _comm


def _prod(xs):
    p = 1
    for x in xs:
        p *= x
    return p


@lru_cache(maxsize=None)
def _all_ranks(n: int) -> tuple:
    """``(0, ..., n-1)``, one tuple per ``n``: grids over a whole world share it, so
    comparing their rank sets (every between-grid move does) is an identity check."""
    return tuple(range(n))


class ProcessGrid:
    """``ProcessGrid(comm, shape, names)``: ``comm`` an mpi4py communicator or a
    :class:`distconv.comm.Communicator` (``None``: COMM_WORLD); ``shape`` the size of each
    axis; ``names`` one unique name per axis; ``ranks`` (optional) the ranks of ``comm`` on
    the grid, distinct, in grid order (operator placement; default all). ``ValueError`` if
    ``prod(shape)`` is not the number of ranks or a rank is not one of ``comm``."""

    def __init__(self, comm, shape: Sequence[int], names: Sequence[str],
                 ranks: Sequence[int] | None = None):
        self.world = _comm.wrap(comm)
        self.ranks = _all_ranks(self.world.size) if ranks is None else tuple(ranks)
        self._pos = {r: q for q, r in enumerate(self.ranks)}
        if len(self._pos) != len(self.ranks) or any(
                not 0 <= r < self.world.size for r in self.ranks):
            raise ValueError(f"grid ranks {list(self.ranks)} must be distinct ranks of a "
                             f"communicator of {self.world.size}")
        self.member = self.world.rank in self._pos
        if ranks is None or self.ranks == tuple(range(self.world.size)):
            self.comm = self.world
        elif self.member:
            self.comm = self.world.subset(self.ranks)
        else:  # a stand-in for position 0 that moves nothing and counts nothing
            from .shapecomm import ShapeComm
            self.comm = ShapeComm(len(self.ranks), 0, self.ranks, _comm.CommStats())
        self.shape = tuple(int(s) for s in shape)
        self.names = tuple(names)
        if len(self.shape) != len(self.names):
            raise ValueError(f"grid shape {self.shape} and names {self.names} differ in length")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"grid axis names must be unique, got {self.names}")
        if any(s < 1 for s in self.shape):
            raise ValueError(f"grid axis sizes must be >= 1, got {self.shape}")
        if _prod(self.shape) != self.comm.size:
            raise ValueError(f"grid shape {dict(zip(self.names, self.shape))} has "
                             f"{_prod(self.shape)} ranks but the communicator has {self.comm.size}")
        self.rank = self.comm.rank
        self.coords = self.coords_of(self.rank)
        self._subs: dict[tuple[str, ...], _comm.Communicator] = {}

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def spans_world(self) -> bool:
        """True when every rank of the world is on this grid (no placement)."""
        return len(self.ranks) == self.world.size

    def position(self, world_rank: int):
        """The grid position (rank on the grid) of ``world_rank``, ``None`` if not on it."""
        return self._pos.get(world_rank)

    def full_grid(self) -> "ProcessGrid":
        """A one-axis grid of every rank of this grid's world (``to_global`` lands there)."""
        if self.spans_world:
            return self
        return get_grid((self.world.size,), ("rank",), self.world)

    def rank_set(self) -> tuple:
        """The world ranks on this grid, in grid order."""
        return self.ranks

    def like(self, shape, names, ranks=None) -> "ProcessGrid":
        """A (cached) grid of ``shape`` and ``names`` on ``ranks`` of this grid's world."""
        return get_grid(shape, names, self.world, ranks=ranks)

    def axis_size(self, name: str) -> int:
        return self.shape[self.index(name)]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"grid has no axis {name!r}; its axes are {self.names}") from None

    def coords_of(self, rank: int) -> tuple[int, ...]:
        """Grid coordinates of ``rank`` (row-major, first axis outermost)."""
        out = []
        for s in reversed(self.shape):
            out.append(rank % s)
            rank //= s
        return tuple(reversed(out))

    def rank_of(self, coords: Sequence[int]) -> int:
        r = 0
        for c, s in zip(coords, self.shape):
            r = r * s + int(c)
        return r

    def coord(self, name: str) -> int:
        """This rank's coordinate on axis ``name``."""
        return self.coords[self.index(name)]

    def sub(self, axes: Sequence[str] | str) -> _comm.Communicator:
        """Communicator over ``axes`` (others fixed at this rank's coordinates), cached.

        Rank within it is row-major over ``axes`` in the given order; ``()`` gives a
        communicator of this rank alone, all axes the whole grid.
        """
        if isinstance(axes, str):
            axes = (axes,)
        axes = tuple(axes)
        got = self._subs.get(axes)
        if got is not None:
            return got
        idx = [self.index(a) for a in axes]
        if len(set(idx)) != len(idx):
            raise ValueError(f"axis listed twice in {axes}")
        if axes == self.names:
            sub = self.comm
        elif hasattr(self.comm, "split_grid"):  # a shape-only communicator: no peers to ask
            sub = self.comm.split_grid(self, idx)
        else:
            others = [i for i in range(len(self.shape)) if i not in idx]
            color = 0
            for i in others:
                color = color * self.shape[i] + self.coords[i]
            key = 0
            for i in idx:
                key = key * self.shape[i] + self.coords[i]
            sub = self.comm.split(color, key)
        self._subs[axes] = sub
        return sub

    def same_as(self, other: "ProcessGrid") -> bool:
        return self is other or (self.names == other.names and self.shape == other.shape
                                 and self.comm is other.comm and self.ranks == other.ranks)

    def __repr__(self):
        ax = ", ".join(f"{n}={s}" for n, s in zip(self.names, self.shape))
        if self.spans_world:
            return f"ProcessGrid({ax}; rank {self.rank} at {self.coords})"
        from .strategy import format_ranks
        who = (f"rank {self.rank} at {self.coords}" if self.member
               else f"world rank {self.world.rank} not on it")
        return f"ProcessGrid({ax}; ranks {format_ranks(self.ranks)}; {who})"


def get_grid(shape: Sequence[int], names: Sequence[str], comm=None,
             ranks: Sequence[int] | None = None) -> ProcessGrid:
    """A cached grid, so layers with the same strategy share sub-communicators;
    ``ranks``: the world ranks of a placed grid (see the module doc). The cache lives on
    the communicator: a world's grids go when the world does (shape-only worlds come and
    go by the thousand in the planner)."""
    c = _comm.wrap(comm)
    cache = c.__dict__.setdefault("_grids", {})
    key = (tuple(shape), tuple(names), None if ranks is None else tuple(ranks))
    g = cache.get(key)
    if g is None:
        g = cache[key] = ProcessGrid(c, shape, names, ranks)
    return g
