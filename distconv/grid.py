"""ProcessGrid: the ranks of a communicator on a named cartesian grid.

Ranks are laid out row-major with the first axis outermost (``sample`` is
outermost in a strategy's grid), so rank ``r`` of a ``(s, c, f)`` grid has
coordinates ``(r // (c*f), (r // f) % c, r % f)``. ``sub(axes)`` gives the
communicator of the ranks that share all coordinates *outside* ``axes``,
ranked row-major over ``axes`` in the order given; these are created on first
use (a collective call on the whole grid) and cached.
"""
from __future__ import annotations

from typing import Sequence

from . import comm as _comm


def _prod(xs):
    p = 1
    for x in xs:
        p *= x
    return p


class ProcessGrid:
    """``ProcessGrid(comm, shape, names)``: ``comm`` an mpi4py communicator or a
    :class:`distconv.comm.Communicator` (``None``: COMM_WORLD); ``shape`` the size of each
    axis; ``names`` one unique name per axis. ``ValueError`` if ``prod(shape)`` is not the
    number of ranks."""

    def __init__(self, comm, shape: Sequence[int], names: Sequence[str]):
        self.comm = _comm.wrap(comm)
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
                                 and self.comm is other.comm)

    def __repr__(self):
        ax = ", ".join(f"{n}={s}" for n, s in zip(self.names, self.shape))
        return f"ProcessGrid({ax}; rank {self.rank} at {self.coords})"


_GRIDS: dict = {}


def get_grid(shape: Sequence[int], names: Sequence[str], comm=None) -> ProcessGrid:
    """A cached grid, so layers with the same strategy share sub-communicators."""
    c = _comm.wrap(comm)
    key = (id(c), tuple(shape), tuple(names))
    g = _GRIDS.get(key)
    if g is None:
        g = ProcessGrid(c, shape, names)
        _GRIDS[key] = g
    return g
