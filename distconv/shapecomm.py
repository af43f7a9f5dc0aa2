"""A communicator for shape-only runs: one rank's view of a job of any size, no MPI.

:class:`ShapeComm` has :class:`distconv.comm.Communicator`'s collectives. It moves no
data: each collective checks its arguments as the real one does, returns a
:class:`~distconv.meta.MetaArray` of the shape the real one returns, and records what
this rank would send and receive with the real communicator's byte accounting
(:func:`distconv.comm.gather_bytes` and friends), in ``stats()`` (the same dictionary as
``Communicator.stats()``) and, per call, in ``events`` (kind, the world ranks of the
group, bytes sent, bytes received). For the point-to-point halo exchange the group is
this rank and the peers it exchanges non-empty boxes with. It needs no mpi4py.

::

    with use_world(ShapeComm(1024, rank=0)) as w:   # the job is 1024 ranks; we are rank 0
        model = resnet50(strategy="sample=256,filter=4")   # built on that world
        ...                                              # run a step on MetaArrays
    w.stats(), w.events
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Sequence

import numpy as np

from .comm import (CommStats, Communicator, allreduce_bytes, alltoall_args, exchange_bytes,
                   gather_bytes, halo_args, halo_bytes, scatter_args, scatter_bytes)
from .meta import MetaArray


@dataclass(frozen=True)
class Event:
    """One collective: ``kind`` (as in ``stats()``), ``group`` (world ranks, in the
    group's rank order), this rank's ``sent`` and ``recv`` bytes, and ``tag`` (what the
    run was doing: set by the caller through :attr:`ShapeComm.tag`)."""

    kind: str
    group: tuple
    sent: int
    recv: int
    tag: object = None


class _Log:
    """Events shared by a world and its sub-communicators."""

    def __init__(self):
        self.events: list = []
        self.tag = None


class ShapeComm(Communicator):
    """``ShapeComm(size, rank=0)``: rank ``rank`` of a job of ``size`` ranks (see module).

    ``recv_only=True``: an alltoallv between layouts (``tensor.exchange``) counts the
    bytes this rank receives, exactly and without enumerating its partners, and takes it
    to send as many (the planner's mode beyond a few ranks, where finding every partner
    of a between-grid move is O(ranks) per move)."""

    def __init__(self, size: int, rank: int = 0, members: Sequence[int] | None = None,
                 stats: CommStats | None = None, log: _Log | None = None,
                 recv_only: bool = False):
        if not 0 <= rank < size:
            raise ValueError(f"ShapeComm: rank {rank} is outside a job of {size} ranks")
        self.size, self.rank = int(size), int(rank)
        self.members = tuple(range(size)) if members is None else tuple(members)
        self._stats = stats if stats is not None else CommStats()
        self._log = log if log is not None else _Log()
        self.cuda_aware = False
        self.mpi = self
        self.recv_only = bool(recv_only)

    # ------------------------------------------------------------ records
    @property
    def events(self) -> list:
        return self._log.events

    @property
    def tag(self):
        return self._log.tag

    @tag.setter
    def tag(self, value):
        self._log.tag = value

    def _record(self, kind, sent, recv, t0=None, group=None):
        self._stats.add(kind, sent, recv, 0.0)
        group = self.members if group is None else group
        self._log.events.append(Event(kind, group, int(sent), int(recv), self._log.tag))

    def _p2p_group(self, sends, recvs) -> tuple:
        """World ranks of a point-to-point exchange: this rank and the peers it sends to or
        receives from (non-empty boxes), ascending."""
        peers = {p for p, _, box in list(sends) + list(recvs) if all(box)} | {self.rank}
        return tuple(sorted(self.members[p] for p in peers))

    def split(self, color, key=0):
        raise NotImplementedError("ShapeComm cannot split by colour (it knows no peers); "
                                  "grids split it with split_grid")

    def split_grid(self, grid, idx) -> "ShapeComm":
        """The sub-communicator of ``grid`` over the axes ``idx`` through this rank: the
        positions that share this rank's coordinates off ``idx``, row-major over ``idx``
        in the order given (enumerated directly, not by scanning the grid)."""
        ranks = []
        c = list(grid.coords)
        for combo in product(*(range(grid.shape[i]) for i in idx)):
            for i, k in zip(idx, combo):
                c[i] = k
            ranks.append(grid.rank_of(c))
        return ShapeComm(len(ranks), ranks.index(grid.rank),
                         [self.members[q] for q in ranks], self._stats, self._log)

    def subset(self, ranks) -> "ShapeComm":
        """The communicator of ``ranks`` (ranks of this one) through this rank, a member."""
        ranks = [int(r) for r in ranks]
        return ShapeComm(len(ranks), ranks.index(self.rank), [self.members[r] for r in ranks],
                         self._stats, self._log, self.recv_only)

    # ------------------------------------------------------------ agreement
    def barrier(self) -> None:
        return None

    def idle_barrier(self, poll: float = 0.005) -> None:
        return None

    def allgather_obj(self, obj) -> list:
        return [obj] * self.size

    def agree(self, ok: bool, message: str = "", exc=ValueError) -> None:
        if not ok:
            raise exc(message)

    def check_same(self, value, what: str) -> None:
        return None

    def allreduce_untracked(self, x, op: str = "max"):
        """A check's reduction (not recorded): this rank's view is everyone's."""
        return x

    def allgather_shapes(self, shape, axis=None):
        raise ValueError("a shape-only allgather needs explicit counts (the other ranks' "
                         "shapes are unknown)")

    # ------------------------------------------------------------ collectives
    def allgather(self, x, axis: int = 0, counts: Sequence[int] | None = None):
        axis = axis % max(x.ndim, 1)
        if counts is None:
            self.allgather_shapes(x.shape, axis)
        counts = [int(c) for c in counts]
        if len(counts) != self.size or counts[self.rank] != x.shape[axis]:
            raise ValueError(f"allgather: counts {counts} do not fit {self.size} ranks with "
                             f"local extent {x.shape[axis]} on rank {self.rank}")
        out = _with(x, axis, sum(counts))
        rest = _rest(x, axis)
        self._record("allgather", *(gather_bytes([c * rest for c in counts], self.rank,
                                                 x.dtype.itemsize) if self.size > 1 else (0, 0)))
        return out

    def iallgather(self, x, axis: int = 0, counts: Sequence[int] | None = None):
        axis = axis % max(x.ndim, 1)
        if self.size == 1:
            self._record("iallgather", 0, 0)
            return _Done(MetaArray(x.shape, x.dtype))
        if counts is None:
            raise ValueError("iallgather needs explicit counts")
        counts = [int(c) for c in counts]
        rest = _rest(x, axis)
        self._record("iallgather", *gather_bytes([c * rest for c in counts], self.rank,
                                                 x.dtype.itemsize))
        return _Done(_with(x, axis, sum(counts)), self, "iallgather")

    def reduce_scatter(self, x, axis: int = 0, counts: Sequence[int] | None = None, op="sum"):
        axis, counts = scatter_args(x.shape, axis, counts, self.size)
        rest = _rest(x, axis)
        self._record("reduce_scatter", *(scatter_bytes([c * rest for c in counts], self.rank,
                                                       x.dtype.itemsize)
                                         if self.size > 1 else (0, 0)))
        return _with(x, axis, counts[self.rank])

    def allreduce(self, x, op: str = "sum"):
        self._record("allreduce", *(allreduce_bytes(_size(x), self.size, self.rank,
                                                    x.dtype.itemsize)
                                    if self.size > 1 else (0, 0)))
        return MetaArray(x.shape, x.dtype)

    def iallreduce(self, x, op: str = "sum"):
        if self.size == 1:
            self._record("iallreduce", 0, 0)
            return _Done(MetaArray(x.shape, x.dtype))
        self._record("iallreduce", *allreduce_bytes(_size(x), self.size, self.rank,
                                                    x.dtype.itemsize))
        return _Done(MetaArray(x.shape, x.dtype), self, "iallreduce")

    def alltoall(self, x, split_axis: int, concat_axis: int,
                 send_counts: Sequence[int], recv_counts: Sequence[int]):
        sa, ca, send_counts, recv_counts = alltoall_args(x.shape, split_axis, concat_axis,
                                                         send_counts, recv_counts, self.size,
                                                         self.rank)
        chunk = list(x.shape)
        chunk[sa] = send_counts[self.rank]
        out = list(chunk)
        out[ca] = sum(recv_counts)
        if self.size == 1:
            self._record("alltoall", 0, 0)
        else:
            rest_s = _rest(x, sa)
            other = 1
            for i, n in enumerate(chunk):
                if i != ca:
                    other *= n
            self._record("alltoall", *exchange_bytes([c * rest_s for c in send_counts],
                                                     [other * c for c in recv_counts],
                                                     self.rank, x.dtype.itemsize))
        return MetaArray(out, x.dtype)

    def alltoallv_flat(self, send, send_counts, recv_counts, kind="alltoall"):
        send_counts = [int(c) for c in send_counts]
        recv_counts = [int(c) for c in recv_counts]
        if self.size == 1:
            self._record(kind, 0, 0)
            return MetaArray(send.shape, send.dtype)
        self._record(kind, *exchange_bytes(send_counts, recv_counts, self.rank,
                                           send.dtype.itemsize))
        return MetaArray((sum(recv_counts),), send.dtype)

    def count_alltoallv(self, sent: int, recv: int, kind="alltoall") -> None:
        """Record an alltoallv of ``sent``/``recv`` bytes counted by the caller
        (``recv_only`` mode)."""
        self._record(kind, sent if self.size > 1 else 0, recv if self.size > 1 else 0)

    def exchange_p2p(self, sends: dict, recv_counts: dict, xp, dtype,
                     kind: str = "alltoall") -> dict:
        item = np.dtype(dtype).itemsize
        group = tuple(sorted(self.members[q] for q in set(sends) | set(recv_counts)
                             | {self.rank}))
        self._record(kind, sum(_size(a) for a in sends.values()) * item,
                     sum(int(n) for n in recv_counts.values()) * item, group=group)
        return {q: MetaArray((int(n),), dtype) for q, n in recv_counts.items()}

    def halo_exchange(self, x, sends, recvs, out_shape, fill=0, kind: str = "halo"):
        sends, recvs = halo_args(x.shape, out_shape, sends, recvs, self.size, self.rank)
        self._record(kind, *halo_bytes(sends, recvs, self.rank, x.dtype.itemsize),
                     group=self._p2p_group(sends, recvs))
        return MetaArray(out_shape, x.dtype)

    def ihalo_exchange(self, x, sends, recvs, out_shape, fill=0, kind: str = "halo"):
        """The nonblocking exchange: recorded as one ``kind`` call, as the real one."""
        return _Done(self.halo_exchange(x, sends, recvs, out_shape, fill, kind))

    def ihalo_exchange_adjoint(self, y, sends, recvs, x_shape, kind: str = "halo_adjoint"):
        """The nonblocking adjoint: recorded as one ``kind`` call, as the real one."""
        return _Done(self.halo_exchange_adjoint(y, sends, recvs, x_shape, kind))

    def halo_exchange_adjoint(self, y, sends, recvs, x_shape, kind: str = "halo_adjoint"):
        sends, recvs = halo_args(x_shape, y.shape, sends, recvs, self.size, self.rank)
        self._record(kind, *halo_bytes(recvs, sends, self.rank, y.dtype.itemsize),
                     group=self._p2p_group(sends, recvs))
        return MetaArray(x_shape, y.dtype)

    def bcast(self, x, root: int = 0):
        if self.size == 1:
            self._record("bcast", 0, 0)
        elif self.rank == root:
            self._record("bcast", _size(x) * x.dtype.itemsize * (self.size - 1), 0)
        else:
            self._record("bcast", 0, _size(x) * x.dtype.itemsize)
        return MetaArray(x.shape, x.dtype)


class _Done:
    """A nonblocking collective; ``wait()`` counts a ``<kind>_wait`` call as the real
    request does (none for a one-rank group, none for a halo exchange); ``out`` is the
    result, as a halo request's."""

    def __init__(self, result, comm=None, kind=None):
        self._result, self._comm, self._kind = result, comm, kind
        self.out = result

    def test(self) -> bool:
        return True

    def wait(self):
        if self._comm is not None:
            self._comm._stats.add(self._kind + "_wait", 0, 0, 0.0)
            self._comm = None
        return self._result


def _size(x) -> int:
    n = 1
    for s in x.shape:
        n *= int(s)
    return n


def _rest(x, axis) -> int:
    """Elements per unit of ``axis``."""
    n = 1
    for i, s in enumerate(x.shape):
        if i != axis:
            n *= int(s)
    return n


def _with(x, axis, extent) -> MetaArray:
    shape = list(x.shape)
    if shape:
        shape[axis] = extent
    return MetaArray(shape, x.dtype)

