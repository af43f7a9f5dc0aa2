"""Typed collectives on NumPy/CuPy arrays: the only module that imports mpi4py.

:class:`Communicator` wraps an ``mpi4py.MPI.Comm``. Its collectives work on
whole arrays along a given axis, take per-rank ``counts`` for uneven (and
empty) blocks, and record, per collective kind, the number of calls, the bytes
this rank sends and receives and the wall time spent (``stats()``).

Byte accounting counts what this rank's data must leave it and what must reach
it under a bandwidth-optimal algorithm, for ``p`` ranks and per-rank block
sizes ``b_j`` (bytes):

* allgather:       sent = b_me * (p-1),           recv = sum_{j!=me} b_j
* reduce_scatter:  sent = sum_{j!=me} b_j,        recv = b_me * (p-1)
* allreduce:       reduce_scatter + allgather of the buffer cut in p floor+1 blocks
* alltoall:        sent = bytes to other ranks,   recv = bytes from other ranks
* bcast:           root sends n*(p-1), the others receive n
* halo (point-to-point, :meth:`Communicator.halo_exchange`): sent = the boxes this rank
  sends to other ranks, recv = the boxes it receives from them (its own box is a local
  copy and counts nothing); the adjoint (``halo_adjoint``) the other way round

GPU arrays: the current stream is synchronised before any MPI call; device
pointers go straight to MPI when ``DISTCONV_CUDA_AWARE=1`` (a CUDA-aware MPI),
otherwise data is staged through pinned host buffers.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from .backend import array_module, is_gpu_array
from .distribution import block_sizes
from .packing import pack_channel_blocks, unpack_channel_blocks


class _LazyMPI:
    """``mpi4py.MPI``, imported on first use: distributions, shape-only tracing and the
    planner import this module without needing mpi4py."""

    def __getattr__(self, name):
        from mpi4py import MPI as _MPI
        globals()["MPI"] = _MPI
        return getattr(_MPI, name)


MPI = _LazyMPI()


class _Ops(dict):
    def __missing__(self, op):
        return getattr(MPI, op.upper())


_OPS = _Ops()


# ------------------------------------------------------------------ byte accounting
# What this rank sends and receives, in bytes, for per-rank block sizes (elements) under a
# bandwidth-optimal algorithm; the shape-only communicator (distconv.shapecomm) records
# the same numbers.
def gather_bytes(sizes, me, item):
    """allgather(v): ``(sent, recv)``."""
    return sizes[me] * (len(sizes) - 1) * item, (sum(sizes) - sizes[me]) * item


def scatter_bytes(sizes, me, item):
    """reduce-scatter: ``(sent, recv)``."""
    return (sum(sizes) - sizes[me]) * item, sizes[me] * (len(sizes) - 1) * item


def exchange_bytes(ssizes, rsizes, me, item):
    """alltoall(v): ``(sent, recv)``: what goes to and comes from the other ranks."""
    return (sum(ssizes) - ssizes[me]) * item, (sum(rsizes) - rsizes[me]) * item


class CommStats:
    """Per-collective-kind counters shared by a communicator and its sub-communicators."""

    def __init__(self):
        self.reset()

    def reset(self):
        self._d: dict[str, list] = {}

    def add(self, kind, sent, recv, seconds):
        e = self._d.setdefault(kind, [0, 0, 0, 0.0])
        e[0] += 1
        e[1] += int(sent)
        e[2] += int(recv)
        e[3] += seconds

    def as_dict(self):
        out = {k: {"calls": v[0], "bytes_sent": v[1], "bytes_recv": v[2], "time": v[3]}
               for k, v in self._d.items()}
        tot = [sum(v[i] for v in self._d.values()) for i in range(4)]
        out["total"] = {"calls": tot[0], "bytes_sent": tot[1], "bytes_recv": tot[2],
                        "time": tot[3]}
        return out


def _mpi_type(dtype):
    from mpi4py.util.dtlib import from_numpy_dtype
    return from_numpy_dtype(np.dtype(dtype))


def _cuda_aware() -> bool:
    return os.environ.get("DISTCONV_CUDA_AWARE", "0").lower() in ("1", "true", "yes")


class Request:
    """A nonblocking collective in flight; ``wait()`` returns its result array."""

    def __init__(self, comm, req, finish, kind, t0):
        self._comm, self._req, self._finish, self._kind = comm, req, finish, kind
        self._elapsed = time.perf_counter() - t0
        self._result = None
        self._done = False

    def test(self) -> bool:
        """True when the operation has completed (does not block)."""
        if self._done:
            return True
        t0 = time.perf_counter()
        flag = self._req.Test()
        self._elapsed += time.perf_counter() - t0
        return flag

    def wait(self):
        """Block until complete; returns the result (same as the blocking collective)."""
        if not self._done:
            t0 = time.perf_counter()
            self._req.Wait()
            self._result = self._finish()
            self._elapsed += time.perf_counter() - t0
            self._comm._stats.add(self._kind + "_wait", 0, 0, self._elapsed)
            self._done = True
        return self._result


class Communicator:
    """Collectives on xp arrays over an MPI communicator, with byte and time accounting.

    ``Communicator(mpi_comm)``; sub-communicators made by :meth:`split` share
    the parent's statistics, so ``world.stats()`` totals everything this rank did.
    """

    def __init__(self, mpi_comm=None, stats: CommStats | None = None):
        self.mpi = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self._stats = stats if stats is not None else CommStats()
        self.cuda_aware = _cuda_aware()

    # ---------------------------------------------------------------- basics
    def stats(self) -> dict:
        """``{kind: {calls, bytes_sent, bytes_recv, time}, ..., "total": {...}}`` for this rank."""
        return self._stats.as_dict()

    def reset_stats(self) -> None:
        self._stats.reset()

    def split(self, color: int, key: int = 0) -> "Communicator":
        """``MPI_Comm_split``; the result shares this communicator's statistics."""
        return Communicator(self.mpi.Split(color, key), self._stats)

    def subset(self, ranks) -> "Communicator":
        """The communicator of ``ranks`` (ranks of this communicator, in that order), made by
        those ranks alone (``MPI_Comm_create_group``: no other rank takes part, so a placed
        layer's grid never waits for a rank outside it); cached, shares the statistics.
        Only the members call it."""
        ranks = tuple(int(r) for r in ranks)
        cache = self.__dict__.setdefault("_subsets", {})
        got = cache.get(ranks)
        if got is None:
            if ranks == tuple(range(self.size)):
                got = self
            else:
                grp = self.mpi.Get_group().Incl(list(ranks))
                got = Communicator(self.mpi.Create_group(grp, _SUBSET_TAG), self._stats)
                grp.Free()
            cache[ranks] = got
        return got

    def barrier(self) -> None:
        self.mpi.Barrier()

    def idle_barrier(self, poll: float = 0.005) -> None:
        """A barrier that sleeps ``poll`` seconds between tests instead of spinning: a
        blocking MPICH wait keeps a core busy, which would steal it from a rank that is
        timing work alone (benchmarks)."""
        if self.size == 1:
            return
        req = self.mpi.Ibarrier()
        while not req.Test():
            time.sleep(poll)

    def _record(self, kind, sent, recv, t0):
        self._stats.add(kind, sent, recv, time.perf_counter() - t0)

    # ----------------------------------------------------- host/device staging
    def _send_buf(self, a):
        if is_gpu_array(a):
            import cupy
            cupy.cuda.get_current_stream().synchronize()
            if self.cuda_aware:
                return a
            return _pinned_copy(a)
        return a

    def _recv_buf(self, xp, shape, dtype):
        """(buffer MPI writes into, function returning the xp array)."""
        if xp is np:
            b = np.empty(shape, dtype)
            return b, (lambda: b)
        import cupy
        if self.cuda_aware:
            b = cupy.empty(shape, dtype)
            cupy.cuda.get_current_stream().synchronize()
            return b, (lambda: b)
        h = _pinned_empty(shape, dtype)
        return h, (lambda: cupy.asarray(h))

    # ------------------------------------------------------------ agreement
    def allgather_obj(self, obj) -> list:
        """Small Python objects from every rank (for checks and counts)."""
        return self.mpi.allgather(obj)

    def agree(self, ok: bool, message: str = "", exc=ValueError) -> None:
        """Raise ``exc`` on EVERY rank if ``ok`` is false on any rank.

        The message names the failing ranks and their messages, so a bad input
        seen by one rank becomes the same error everywhere instead of a hang.
        """
        if self.size == 1:
            if not ok:
                raise exc(message)
            return
        flags = self.mpi.allgather(None if ok else message)
        bad = [(r, m) for r, m in enumerate(flags) if m is not None]
        if bad:
            msgs = sorted({m for _, m in bad})
            ranks = [r for r, _ in bad]
            if len(msgs) == 1:
                raise exc(f"{msgs[0]} (on rank(s) {ranks})")
            raise exc("; ".join(f"rank {r}: {m}" for r, m in bad))

    def check_same(self, value, what: str) -> None:
        """Raise ``ValueError`` on every rank unless all ranks pass an equal ``value``."""
        if self.size == 1:
            return
        vals = self.mpi.allgather(value)
        if any(v != vals[0] for v in vals):
            detail = ", ".join(f"rank {r}: {v}" for r, v in enumerate(vals))
            raise ValueError(f"ranks disagree on {what}: {detail}")

    def allreduce_untracked(self, x: np.ndarray, op: str = "max") -> np.ndarray:
        """Allreduce of a small host (NumPy) array for checks (e.g. replica checksums);
        like :meth:`check_same` it is not recorded in :meth:`stats`, which count the
        model's own traffic. ``x``: any shape; returns a new array of the same shape."""
        x = np.ascontiguousarray(x)
        if self.size == 1:
            return x.copy()
        out = np.empty_like(x)
        self.mpi.Allreduce(x, out, op=_OPS[op])
        return out

    # ----------------------------------------------------------- collectives
    def allgather(self, x, axis: int = 0, counts: Sequence[int] | None = None):
        """Concatenate every rank's block ``x`` along ``axis`` (allgatherv).

        ``x``: this rank's block; all dims but ``axis`` equal on all ranks.
        ``counts``: each rank's extent along ``axis`` (gathered if ``None``).
        Returns the concatenation, shape ``x.shape`` with ``axis`` -> ``sum(counts)``.
        """
        xp = array_module(x)
        axis = axis % max(x.ndim, 1)
        if counts is None:
            counts = [s[axis] for s in self.allgather_shapes(x.shape, axis)]
        counts = [int(c) for c in counts]
        if len(counts) != self.size or counts[self.rank] != x.shape[axis]:
            raise ValueError(f"allgather: counts {counts} do not fit {self.size} ranks with "
                             f"local extent {x.shape[axis]} on rank {self.rank}")
        t0 = time.perf_counter()
        pre = int(np.prod(x.shape[:axis], dtype=np.int64))
        post = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
        total = sum(counts)
        out_shape = x.shape[:axis] + (total,) + x.shape[axis + 1:]
        item = x.dtype.itemsize
        if self.size == 1:
            out = x.copy()
            self._record("allgather", 0, 0, t0)
            return out
        sizes = [pre * c * post for c in counts]
        x = xp.ascontiguousarray(x)
        sb = self._send_buf(x.reshape(-1))
        even = all(c == counts[0] for c in counts)
        if even and xp is np and pre > 1 and counts[0] > 0:
            # receive straight into the concatenated layout with a strided datatype: no
            # unpack copy (counts are computed from global shapes, so every rank agrees)
            out = np.empty(out_shape, x.dtype)
            vt = _block_type(x.dtype, pre, counts[0] * post, total * post)
            self.mpi.Allgather(sb, [out, 1, vt])
        else:
            rb, get = self._recv_buf(xp, (sum(sizes),), x.dtype)
            if even:  # MPICH's Allgatherv pipelines large messages slowly
                self.mpi.Allgather(sb, rb)
            else:
                displs = _displs(sizes)
                self.mpi.Allgatherv(sb, [rb, sizes, displs, _mpi_type(x.dtype)])
            out = _assemble(xp, get(), out_shape, axis, counts, pre, post)
        self._record("allgather", *gather_bytes(sizes, self.rank, item), t0)
        return out

    def allgather_shapes(self, shape, axis=None):
        """Every rank's ``shape``; ``ValueError`` on all ranks if they differ outside ``axis``."""
        shapes = self.mpi.allgather(tuple(int(s) for s in shape))
        ref = shapes[0]
        for r, s in enumerate(shapes):
            if len(s) != len(ref) or any(a != b for i, (a, b) in enumerate(zip(s, ref))
                                         if i != axis):
                detail = ", ".join(f"rank {i}: {t}" for i, t in enumerate(shapes))
                raise ValueError(f"block shapes must agree except on axis {axis}: {detail}")
        return shapes

    def reduce_scatter(self, x, axis: int = 0, counts: Sequence[int] | None = None, op="sum"):
        """Sum ``x`` over all ranks and keep this rank's block along ``axis``.

        ``x``: the full-extent addend (``x.shape[axis] == sum(counts)``), same on all ranks
        in shape. ``counts``: block sizes along ``axis`` (floor+1 if ``None``).
        Returns shape ``x.shape`` with ``axis`` -> ``counts[rank]``.
        """
        xp = array_module(x)
        axis = axis % max(x.ndim, 1)
        n = x.shape[axis]
        counts = block_sizes(n, self.size) if counts is None else [int(c) for c in counts]
        if len(counts) != self.size or sum(counts) != n:
            raise ValueError(f"reduce_scatter: counts {counts} must have {self.size} entries "
                             f"summing to the extent {n} of axis {axis}")
        t0 = time.perf_counter()
        item = x.dtype.itemsize
        if self.size == 1:
            out = xp.array(x, copy=True)
            self._record("reduce_scatter", 0, 0, t0)
            return out
        pre = int(np.prod(x.shape[:axis], dtype=np.int64))
        post = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
        sizes = [pre * c * post for c in counts]
        send = _pack(xp, x, axis, counts, pre, post)
        my_shape = x.shape[:axis] + (counts[self.rank],) + x.shape[axis + 1:]
        rb, get = self._recv_buf(xp, (sizes[self.rank],), x.dtype)
        sb = self._send_buf(send)
        self.mpi.Reduce_scatter(sb, rb, recvcounts=sizes, op=_OPS[op])
        out = get().reshape(my_shape)
        self._record("reduce_scatter", *scatter_bytes(sizes, self.rank, item), t0)
        return out

    def allreduce(self, x, op: str = "sum"):
        """Elementwise reduction (``sum``, ``max``, ``min``, ``prod``) over all ranks; new array."""
        xp = array_module(x)
        t0 = time.perf_counter()
        if self.size == 1:
            out = xp.array(x, copy=True)
            self._record("allreduce", 0, 0, t0)
            return out
        x = xp.ascontiguousarray(x)
        rb, get = self._recv_buf(xp, x.shape, x.dtype)
        self.mpi.Allreduce(self._send_buf(x), rb, op=_OPS[op])
        out = get()
        s, r = allreduce_bytes(x.size, self.size, self.rank, x.dtype.itemsize)
        self._record("allreduce", s, r, t0)
        return out

    def iallreduce(self, x, op: str = "sum") -> Request:
        """Nonblocking :meth:`allreduce`; ``wait()`` on the result returns the summed array."""
        xp = array_module(x)
        t0 = time.perf_counter()
        x = xp.ascontiguousarray(x)
        if self.size == 1:
            out = xp.array(x, copy=True)
            return _DoneRequest(self, out, "iallreduce", t0)
        rb, get = self._recv_buf(xp, x.shape, x.dtype)
        sb = self._send_buf(x)
        req = self.mpi.Iallreduce(sb, rb, op=_OPS[op])
        s, r = allreduce_bytes(x.size, self.size, self.rank, x.dtype.itemsize)
        self._stats.add("iallreduce", s, r, 0.0)
        keep = (sb, rb)
        return Request(self, req, lambda: (keep, get())[1], "iallreduce", t0)

    def iallgather(self, x, axis: int = 0, counts: Sequence[int] | None = None) -> Request:
        """Nonblocking :meth:`allgather` (``counts`` required for ``size > 1``)."""
        xp = array_module(x)
        axis = axis % max(x.ndim, 1)
        t0 = time.perf_counter()
        if self.size == 1:
            return _DoneRequest(self, x.copy(), "iallgather", t0)
        if counts is None:
            raise ValueError("iallgather needs explicit counts")
        counts = [int(c) for c in counts]
        pre = int(np.prod(x.shape[:axis], dtype=np.int64))
        post = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
        sizes = [pre * c * post for c in counts]
        displs = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64).tolist()
        out_shape = x.shape[:axis] + (sum(counts),) + x.shape[axis + 1:]
        x = xp.ascontiguousarray(x)
        rb, get = self._recv_buf(xp, (sum(sizes),), x.dtype)
        sb = self._send_buf(x.reshape(-1))
        req = self.mpi.Iallgatherv(sb, [rb, sizes, displs, _mpi_type(x.dtype)])
        self._stats.add("iallgather", *gather_bytes(sizes, self.rank, x.dtype.itemsize), 0.0)
        keep = (sb, rb)
        return Request(self, req,
                       lambda: (keep, _assemble(xp, get(), out_shape, axis, counts, pre, post))[1],
                       "iallgather", t0)

    def alltoall(self, x, split_axis: int, concat_axis: int,
                 send_counts: Sequence[int], recv_counts: Sequence[int]):
        """Cut ``x`` along ``split_axis`` in blocks ``send_counts`` (block j goes to rank j) and
        concatenate the blocks received along ``concat_axis`` (rank j's has extent
        ``recv_counts[j]`` there). Returns shape ``x.shape`` with ``split_axis`` ->
        ``send_counts[rank]`` and ``concat_axis`` -> ``sum(recv_counts)``."""
        xp = array_module(x)
        sa, ca, send_counts, recv_counts = alltoall_args(x.shape, split_axis, concat_axis,
                                                         send_counts, recv_counts, self.size,
                                                         self.rank)
        t0 = time.perf_counter()
        me = self.rank
        if self.size == 1:
            self._record("alltoall", 0, 0, t0)
            return xp.array(x, copy=True)
        pre = int(np.prod(x.shape[:sa], dtype=np.int64))
        post = int(np.prod(x.shape[sa + 1:], dtype=np.int64))
        ssizes = [pre * c * post for c in send_counts]
        chunk_shape = list(x.shape)
        chunk_shape[sa] = send_counts[me]
        other = int(np.prod([n for i, n in enumerate(chunk_shape) if i != ca], dtype=np.int64))
        rsizes = [other * c for c in recv_counts]
        out_shape = list(chunk_shape)
        out_shape[ca] = sum(recv_counts)
        pre2 = int(np.prod(out_shape[:ca], dtype=np.int64))
        post2 = int(np.prod(out_shape[ca + 1:], dtype=np.int64))
        even = (all(n == ssizes[0] for n in ssizes) and all(n == rsizes[0] for n in rsizes)
                and ssizes[0] > 0 and rsizes[0] > 0)
        if even and xp is np:
            # strided datatypes on both sides: no pack and no unpack copy
            x = np.ascontiguousarray(x)
            out = np.empty(tuple(out_shape), x.dtype)
            c, r = send_counts[0], recv_counts[0]
            st = _block_type(x.dtype, pre, c * post, x.shape[sa] * post)
            rt = _block_type(x.dtype, pre2, r * post2, out_shape[ca] * post2)
            self.mpi.Alltoall([x, 1, st], [out, 1, rt])
        else:
            send = _pack(xp, x, sa, send_counts, pre, post)
            rb, get = self._recv_buf(xp, (sum(rsizes),), x.dtype)
            if even:
                self.mpi.Alltoall(self._send_buf(send), rb)  # faster than Alltoallv in MPICH
            else:
                t = _mpi_type(x.dtype)
                self.mpi.Alltoallv([self._send_buf(send), ssizes, _displs(ssizes), t],
                                   [rb, rsizes, _displs(rsizes), t])
            out = _assemble(xp, get(), tuple(out_shape), ca, recv_counts, pre2, post2)
        self._record("alltoall", *exchange_bytes(ssizes, rsizes, me, x.dtype.itemsize), t0)
        return out

    def alltoallv_flat(self, send, send_counts, recv_counts, kind="alltoall"):
        """Raw alltoallv of a flat contiguous ``send`` buffer (counts in elements).

        Returns the flat receive buffer (blocks from rank 0, 1, ... in order).
        """
        xp = array_module(send)
        t0 = time.perf_counter()
        send_counts = [int(c) for c in send_counts]
        recv_counts = [int(c) for c in recv_counts]
        me = self.rank
        item = send.dtype.itemsize
        if self.size == 1:
            self._record(kind, 0, 0, t0)
            return xp.array(send, copy=True)
        sdis = np.concatenate(([0], np.cumsum(send_counts)[:-1])).astype(np.int64).tolist()
        rdis = np.concatenate(([0], np.cumsum(recv_counts)[:-1])).astype(np.int64).tolist()
        rb, get = self._recv_buf(xp, (sum(recv_counts),), send.dtype)
        t = _mpi_type(send.dtype)
        self.mpi.Alltoallv([self._send_buf(xp.ascontiguousarray(send)), send_counts, sdis, t],
                           [rb, recv_counts, rdis, t])
        out = get()
        self._record(kind, *exchange_bytes(send_counts, recv_counts, me, item), t0)
        return out

    # ------------------------------------------------------- point-to-point halo
    def halo_exchange(self, x, sends, recvs, out_shape, fill=0, kind: str = "halo"):
        """Boxes of ``x`` to and from chosen peers (a neighbourhood alltoallv, Isend/Irecv).

        ``x``: this rank's block. ``sends``: ``[(peer, region), ...]``: ``x[region]`` goes to
        rank ``peer``; ``recvs``: ``[(peer, region), ...]``: ``out[region]`` is filled with
        the box ``peer`` sends here. ``region``: a tuple of ``slice(start, stop)``, one per
        dim. At most one send and one receive per peer; the pair with ``peer == rank`` is a
        local copy. A peer's send and the receiver's matching region must have the same
        shape: both come from one plan every rank computes alike (:mod:`distconv.halo`).
        Returns ``out`` of ``out_shape`` (dtype of ``x``), ``fill`` where no box lands.
        The checks here are local: a plan that differs between ranks is a caller's bug.
        """
        xp = array_module(x)
        sends, recvs = halo_args(x.shape, out_shape, sends, recvs, self.size, self.rank)
        t0 = time.perf_counter()
        if fill == 0:
            out = xp.zeros(tuple(out_shape), x.dtype)
        else:
            out = xp.full(tuple(out_shape), fill, x.dtype)

        def put(reg, a):
            out[reg] = a

        self._p2p(xp, x, sends, recvs, _HALO_TAG, put)
        self._record(kind, *halo_bytes(sends, recvs, self.rank, x.dtype.itemsize), t0)
        return out

    def halo_exchange_adjoint(self, y, sends, recvs, x_shape, kind: str = "halo_adjoint"):
        """The transpose of :meth:`halo_exchange` with the same ``sends``/``recvs``.

        ``y``: an array of the exchange's ``out_shape`` (a gradient of its result); the
        box ``y[region]`` of every receive goes back to its peer, and every send region
        of the result adds what its peer returns. Returns ``dx`` of ``x_shape`` (zeros
        where ``x`` was sent nowhere), so ``<halo_exchange(x), y> == <x, adjoint(y)>``
        summed over ranks.
        """
        xp = array_module(y)
        sends, recvs = halo_args(x_shape, y.shape, sends, recvs, self.size, self.rank)
        t0 = time.perf_counter()
        dx = xp.zeros(tuple(x_shape), y.dtype)

        def add(reg, a):
            dx[reg] += a

        self._p2p(xp, y, recvs, sends, _HALO_ADJ_TAG, add)
        self._record(kind, *halo_bytes(recvs, sends, self.rank, y.dtype.itemsize), t0)
        return dx

    def _p2p(self, xp, src, sends, recvs, tag, put):
        """Post every receive, then every send, copy the own box, wait, ``put`` each box
        (``keep`` holds the send buffers until the sends completed)."""
        me = self.rank
        reqs, landed, keep = [], [], []
        for peer, reg, shp in recvs:
            if peer != me and _numel(shp):
                rb, get = self._recv_buf(xp, shp, src.dtype)
                reqs.append(self.mpi.Irecv(rb, source=peer, tag=tag))
                landed.append((reg, get))
        for peer, reg, shp in sends:
            if peer != me and _numel(shp):
                sb = self._send_buf(xp.ascontiguousarray(src[reg]))
                keep.append(sb)
                reqs.append(self.mpi.Isend(sb, dest=peer, tag=tag))
        own = [reg for peer, reg, _ in sends if peer == me]
        for peer, reg, _ in recvs:
            if peer == me:
                put(reg, src[own[0]])
        if reqs:
            MPI.Request.Waitall(reqs)
        for reg, get in landed:
            put(reg, get())
        del keep

    def exchange_p2p(self, sends: dict, recv_counts: dict, xp, dtype,
                     kind: str = "alltoall") -> dict:
        """Flat buffers to and from the peers that meet here only (Isend/Irecv, Waitall):
        ``sends`` ``{peer: flat array}``, ``recv_counts`` ``{peer: elements}``; returns
        ``{peer: flat array}``. A rank with no peers returns at once: it waits for nobody.
        Bytes are counted like an alltoallv (``kind``)."""
        t0 = time.perf_counter()
        reqs, got, keep = [], {}, []
        t = _mpi_type(np.dtype(dtype))
        for q in sorted(recv_counts):
            rb, get = self._recv_buf(xp, (int(recv_counts[q]),), dtype)
            reqs.append(self.mpi.Irecv([rb, t], source=q, tag=_EXCHANGE_TAG))
            got[q] = get
        for q in sorted(sends):
            sb = self._send_buf(xp.ascontiguousarray(sends[q]))
            keep.append(sb)
            reqs.append(self.mpi.Isend([sb, t], dest=q, tag=_EXCHANGE_TAG))
        if reqs:
            MPI.Request.Waitall(reqs)
        del keep
        item = np.dtype(dtype).itemsize
        self._record(kind, sum(int(a.size) for a in sends.values()) * item,
                     sum(int(n) for n in recv_counts.values()) * item, t0)
        return {q: get() for q, get in got.items()}

    def bcast(self, x, root: int = 0):
        """Broadcast ``x`` from ``root``; every rank passes an array of the same shape/dtype."""
        xp = array_module(x)
        t0 = time.perf_counter()
        if self.size == 1:
            self._record("bcast", 0, 0, t0)
            return xp.array(x, copy=True)
        x = xp.ascontiguousarray(x)
        if self.rank == root:
            self.mpi.Bcast(self._send_buf(x), root=root)
            self._record("bcast", x.nbytes * (self.size - 1), 0, t0)
            return xp.array(x, copy=True)
        rb, get = self._recv_buf(xp, x.shape, x.dtype)
        self.mpi.Bcast(rb, root=root)
        self._record("bcast", 0, x.nbytes, t0)
        return get()


class _DoneRequest(Request):
    def __init__(self, comm, result, kind, t0):
        self._comm, self._kind = comm, kind
        self._elapsed = time.perf_counter() - t0
        self._result, self._done = result, True
        comm._stats.add(kind, 0, 0, self._elapsed)

    def test(self):
        return True

    def wait(self):
        return self._result


_BLOCK_TYPES: dict = {}


def _block_type(dtype, count, blocklen, stride):
    """Committed MPI datatype of ``count`` blocks of ``blocklen`` elements ``stride`` apart,
    resized to ``blocklen`` so consecutive ranks' blocks interleave (cached)."""
    key = (np.dtype(dtype).str, count, blocklen, stride)
    t = _BLOCK_TYPES.get(key)
    if t is None:
        base = _mpi_type(dtype)
        v = base.Create_vector(count, blocklen, stride)
        t = v.Create_resized(0, blocklen * np.dtype(dtype).itemsize)
        t.Commit()
        v.Free()
        _BLOCK_TYPES[key] = t
    return t


def _displs(sizes):
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += n
    return out


def alltoall_args(shape, split_axis, concat_axis, send_counts, recv_counts, size, rank):
    """Checked ``(split axis, concat axis, send counts, recv counts)`` of an alltoall of a
    local block of ``shape`` on ``size`` ranks; ``ValueError`` naming what does not fit."""
    nd = len(shape)
    sa, ca = split_axis % nd, concat_axis % nd
    send_counts = [int(c) for c in send_counts]
    recv_counts = [int(c) for c in recv_counts]
    if sa == ca:
        raise ValueError("alltoall: split_axis and concat_axis must differ")
    if (len(send_counts) != size or sum(send_counts) != shape[sa]
            or len(recv_counts) != size or recv_counts[rank] != shape[ca]):
        raise ValueError(f"alltoall: send_counts {send_counts} / recv_counts {recv_counts} "
                         f"do not fit local shape {tuple(shape)} on {size} ranks")
    return sa, ca, send_counts, recv_counts


_HALO_TAG = 0x4A10
_HALO_ADJ_TAG = 0x4A11


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _region(region, shape, what):
    """``(tuple of slices, box shape)`` of a region of an array of ``shape``."""
    try:
        region = tuple(region)
    except TypeError:
        raise ValueError(f"halo_exchange: {what} region {region!r} is not a tuple of "
                         f"slices") from None
    if len(region) != len(shape) or not all(isinstance(r, slice) for r in region):
        raise ValueError(f"halo_exchange: {what} region {region!r} must be one slice per dim "
                         f"of shape {tuple(shape)}")
    out, box = [], []
    for r, n in zip(region, shape):
        a, b = (0 if r.start is None else int(r.start)), (n if r.stop is None else int(r.stop))
        if r.step not in (None, 1) or not 0 <= a <= b <= n:
            raise ValueError(f"halo_exchange: {what} region {region!r} is not a box inside "
                             f"shape {tuple(shape)}")
        out.append(slice(a, b))
        box.append(b - a)
    return tuple(out), tuple(box)


def halo_args(x_shape, out_shape, sends, recvs, size, rank):
    """Checked ``(sends, recvs)`` of a halo exchange, each ``[(peer, region, box shape)]``
    (regions of ``x_shape`` and ``out_shape``); ``ValueError`` naming what does not fit."""
    lists = []
    for what, items, shape in (("send", sends, x_shape), ("recv", recvs, out_shape)):
        norm, seen = [], set()
        for item in items:
            peer, region = item
            peer = int(peer)
            if not 0 <= peer < size or peer in seen:
                raise ValueError(f"halo_exchange: {what} peer {peer} is outside {size} ranks "
                                 f"or listed twice")
            seen.add(peer)
            norm.append((peer, *_region(region, shape, what)))
        lists.append(norm)
    own = [[b for p, _, b in lst if p == rank] for lst in lists]
    if own[0] != own[1]:
        raise ValueError(f"halo_exchange: rank {rank}'s own box is sent as {own[0]} but "
                         f"received as {own[1]}")
    return lists[0], lists[1]


def halo_bytes(sends, recvs, me, item):
    """halo exchange: ``(sent, recv)``: the boxes to and from the other ranks."""
    return (sum(_numel(b) for p, _, b in sends if p != me) * item,
            sum(_numel(b) for p, _, b in recvs if p != me) * item)


def allreduce_bytes(n, p, me, item):
    """allreduce of ``n`` elements: a reduce-scatter and an allgather of floor+1 blocks."""
    b = block_sizes(n, p)
    return (n - b[me] + b[me] * (p - 1)) * item, (b[me] * (p - 1) + n - b[me]) * item


def _pack(xp, x, axis, counts, pre, post):
    """Flat buffer of the blocks of ``x`` along ``axis`` one after another (a view if possible)."""
    if pre == 1 or len(counts) == 1:
        return xp.ascontiguousarray(x).reshape(-1)
    if xp is not np:  # CUDA pack kernel (kernels/pack.cu), blocks on axis 1 of (pre, n, post)
        return pack_channel_blocks(xp.ascontiguousarray(x).reshape(pre, x.shape[axis], post),
                                   counts)
    x3 = x.reshape(pre, x.shape[axis], post)
    out = xp.empty(x.size, x.dtype)
    off = 0
    start = 0
    for c in counts:
        n = pre * c * post
        out[off:off + n].reshape(pre, c, post)[...] = x3[:, start:start + c, :]
        off += n
        start += c
    return out


def _assemble(xp, flat, out_shape, axis, counts, pre, post):
    """Inverse of :func:`_pack`: blocks laid one after another -> array concatenated on ``axis``."""
    if pre == 1 or len(counts) == 1:
        return flat.reshape(out_shape)
    total = sum(counts)
    if xp is not np:  # CUDA unpack kernel (kernels/pack.cu)
        return unpack_channel_blocks(flat, (pre, total, post), counts).reshape(out_shape)
    out = xp.empty(out_shape, flat.dtype)
    o3 = out.reshape(pre, total, post)
    off = 0
    start = 0
    for c in counts:
        n = pre * c * post
        o3[:, start:start + c, :] = flat[off:off + n].reshape(pre, c, post)
        off += n
        start += c
    return out


def _pinned_empty(shape, dtype):
    try:
        import cupyx
        return cupyx.empty_pinned(shape, dtype)
    except Exception:  # pragma: no cover - no pinned memory available
        return np.empty(shape, dtype)


def _pinned_copy(a):
    h = _pinned_empty(a.shape, a.dtype)
    a.get(out=h)
    return h


_SUBSET_TAG = 7301    # MPI_Comm_create_group of a placed grid's ranks
_EXCHANGE_TAG = 7302  # point-to-point moves between grids of different rank sets

_WORLD = None
_WORLD_OVERRIDE: list = []


def world() -> Communicator:
    """The (cached) :class:`Communicator` over ``MPI.COMM_WORLD`` (inside
    :func:`use_world`, the communicator given there)."""
    global _WORLD
    if _WORLD_OVERRIDE:
        return _WORLD_OVERRIDE[-1]
    if _WORLD is None:
        try:
            _WORLD = Communicator(MPI.COMM_WORLD)
        except ImportError:
            _WORLD = Communicator(_solo_without_mpi())
    return _WORLD


_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                  "PMIX_RANK", "SLURM_NTASKS")


class _Solo:
    """The world of a single process when mpi4py is not installed (the planner and
    shape-only tracing need no MPI): the mpi4py calls a one-rank Communicator makes."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Barrier(self):
        return None

    def allgather(self, obj):
        return [obj]

    def Split(self, color, key=0):
        return self

    def Dup(self):
        return self

    def Abort(self, code=1):
        os._exit(code)


def _solo_without_mpi():
    launched = [v for v in _LAUNCHER_VARS if int(os.environ.get(v, "1") or 1) > 1
                or (v.endswith("RANK") and v in os.environ)]
    if launched:
        raise ImportError(f"mpi4py is not installed, but this process was started by an MPI "
                          f"launcher ({', '.join(launched)} set): install mpi4py "
                          f"(pip install mpi4py) to run on several ranks")
    return _Solo()


class use_world:
    """``with use_world(comm):`` makes ``comm`` the world: strategies, grids and layers built
    inside live on it (a :class:`distconv.shapecomm.ShapeComm` for shape-only runs)."""

    def __init__(self, comm: Communicator):
        self.comm = comm

    def __enter__(self):
        _WORLD_OVERRIDE.append(self.comm)
        return self.comm

    def __exit__(self, *exc):
        _WORLD_OVERRIDE.pop()
        return False


def self_comm() -> Communicator:
    """A new :class:`Communicator` over ``MPI.COMM_SELF`` (this process alone) with its own
    statistics: collectives on it move nothing and never wait for another rank."""
    return Communicator(MPI.COMM_SELF, CommStats())


def wrap(comm) -> Communicator:
    """A :class:`Communicator` for ``comm`` (an mpi4py communicator, a Communicator, or None)."""
    if comm is None:
        return world()
    if isinstance(comm, Communicator):
        return comm
    if _WORLD_OVERRIDE:
        raise ValueError("an mpi4py communicator was passed inside use_world(); pass None")
    if comm == MPI.COMM_WORLD:
        return world()
    return Communicator(comm)


def abort(code: int = 1) -> None:
    """``MPI_Abort`` on COMM_WORLD: ends every rank of the job."""
    MPI.COMM_WORLD.Abort(code)


def run_guarded(main, *args, grace: float = 3.0) -> int:
    """Run ``main(*args)`` so that an uncaught exception on any rank ends the whole job.

    The failing rank prints ``[rank r] uncaught exception`` and its traceback to stderr.
    When every rank fails alike (distconv raises bad-input errors on all ranks at once)
    they meet in a nonblocking barrier and exit with status 1, so mpiexec forwards every
    message; a rank that fails alone calls ``MPI_Abort`` after ``grace`` seconds, which
    ends the ranks still waiting in a collective. Returns ``main``'s status (0 if None).
    Use it in every entry point: ``sys.exit(run_guarded(main))``.
    """
    import sys
    import traceback
    exit_comm = MPI.COMM_WORLD.Dup()  # only for the exit handshake
    try:
        rc = main(*args)
        exit_comm.Free()
        return 0 if rc is None else int(rc)
    except SystemExit:
        raise
    except BaseException:
        r = MPI.COMM_WORLD.Get_rank()
        sys.stderr.write(f"[rank {r}] uncaught exception, aborting the job:\n"
                         f"{traceback.format_exc()}")
        sys.stderr.flush()
        req = exit_comm.Ibarrier()
        t_end = time.monotonic() + grace
        while not req.Test() and time.monotonic() < t_end:
            time.sleep(0.002)
        if not req.Test():
            MPI.COMM_WORLD.Abort(1)
        return 1
