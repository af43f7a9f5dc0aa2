"""Typed collectives on NumPy/CuPy arrays: the only module that imports mpi4py.

:class:`Communicator` wraps an ``mpi4py.MPI.Comm``. Its collectives work on
whole arrays along a given axis, take per-rank ``counts`` for uneven (and
empty) blocks, and record, per collective kind, the number of calls, the bytes
this rank sends and receives and the wall time spent (``stats()``).

Byte accounting (what each kind counts): :mod:`distconv.commargs`. Point-to-point
messages (halo exchanges, moves between rank sets): :mod:`distconv.commp2p`.

GPU arrays: the current stream is synchronised before any MPI call; device
pointers go straight to MPI when ``DISTCONV_CUDA_AWARE=1`` (a CUDA-aware MPI),
otherwise data is staged through pinned host buffers.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from .backend import array_module, is_gpu_array, pinned_copy, pinned_empty
from .commargs import CommStats  # noqa: F401  (re-exported)
from .commp2p import PointToPoint
from .errors import agreed_message


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


class Communicator(PointToPoint):
    """Collectives on xp arrays over an MPI communicator, with byte and time accounting.

    ``Communicator(mpi_comm)``; sub-communicators made by :meth:`split` share
    the parent's statistics, so ``world.stats()`` totals everything this rank did.
    """

    #: ``hook(t, target) -> t'`` run by ``DistTensor.redistribute`` instead of a move
    move_hook = None  # (set on a shape-only world: distconv.planner.layermoves records)

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
            return pinned_copy(a)
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
        h = pinned_empty(shape, dtype)
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
            raise exc(agreed_message(bad))

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
        axis, counts = scatter_args(x.shape, axis, counts, self.size)
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


def mpi_info() -> dict:
    """The MPI this process runs on, for results files: ``mpi4py`` (version),
    ``mpi_library`` (first line of ``MPI_Get_library_version``), ``mpi_vendor``,
    ``mpi_standard`` and ``processor_name``."""
    import mpi4py
    return {"mpi4py": mpi4py.__version__,
            "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
            "mpi_vendor": [str(v) for v in MPI.get_vendor()],
            "mpi_standard": "%d.%d" % MPI.Get_version(),
            "processor_name": MPI.Get_processor_name()}


_SUBSET_TAG = 7301    # MPI_Comm_create_group of a placed grid's ranks


# the world and the launch helpers live in .launch, the argument checks and byte counts in
# .commargs; both are part of this module's interface
from .commargs import (_assemble, _displs, _numel, _pack, allreduce_bytes,  # noqa: E402,F401
                       alltoall_args, exchange_bytes, gather_bytes, halo_args, halo_bytes,
                       scatter_args, scatter_bytes)
from .launch import abort, run_guarded, self_comm, use_world, world, wrap  # noqa: E402,F401
