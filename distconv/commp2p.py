"""Point-to-point messages of :class:`distconv.comm.Communicator` (a mixin): halo
exchanges, and moves between grids on different rank sets (:meth:`exchange_p2p`).

A halo exchange sends boxes of this rank's block to chosen peers and receives boxes from
them (a neighbourhood alltoallv with Isend/Irecv); its adjoint sends the received boxes'
gradients back and adds them. Both come blocking and nonblocking (:class:`HaloRequest`:
the own box is in place at once, ``wait()`` lands the rest). Bytes: what goes to and comes
from other ranks (:func:`distconv.commargs.halo_bytes`), recorded once per exchange.
"""
from __future__ import annotations

import time

import numpy as np

from . import comm as _comm
from .backend import array_module
from .commargs import _numel, halo_args, halo_bytes

_HALO_TAG = 0x4A10
_HALO_ADJ_TAG = 0x4A11
_EXCHANGE_TAG = 7302  # point-to-point moves between grids of different rank sets


class PointToPoint:
    """The point-to-point methods of :class:`distconv.comm.Communicator` (it supplies
    ``mpi``, ``rank``, ``size``, ``_send_buf``, ``_recv_buf``, ``_record`` and
    ``_stats``)."""

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
        return self.ihalo_exchange(x, sends, recvs, out_shape, fill, kind).wait()

    def ihalo_exchange(self, x, sends, recvs, out_shape, fill=0, kind: str = "halo"):
        """Nonblocking :meth:`halo_exchange`: posts every message and returns a
        :class:`HaloRequest` whose ``out`` (``out_shape``) already holds ``fill`` and this
        rank's own box, so work on that part may start; ``wait()`` lands the received boxes
        and returns ``out``. Recorded once, under ``kind``, when it completes (the same
        call and bytes as the blocking exchange; the time is the posting plus the wait)."""
        xp = array_module(x)
        sends, recvs = halo_args(x.shape, out_shape, sends, recvs, self.size, self.rank)
        t0 = time.perf_counter()
        if fill == 0:
            out = xp.zeros(tuple(out_shape), x.dtype)
        else:
            out = xp.full(tuple(out_shape), fill, x.dtype)

        def put(reg, a):
            out[reg] = a

        post = self._p2p(xp, x, sends, recvs, _HALO_TAG, put)
        return HaloRequest(self, post, out, kind,
                           halo_bytes(sends, recvs, self.rank, x.dtype.itemsize), t0)

    def halo_exchange_adjoint(self, y, sends, recvs, x_shape, kind: str = "halo_adjoint"):
        """The transpose of :meth:`halo_exchange` with the same ``sends``/``recvs``.

        ``y``: an array of the exchange's ``out_shape`` (a gradient of its result); the
        box ``y[region]`` of every receive goes back to its peer, and every send region
        of the result adds what its peer returns. Returns ``dx`` of ``x_shape`` (zeros
        where ``x`` was sent nowhere), so ``<halo_exchange(x), y> == <x, adjoint(y)>``
        summed over ranks.
        """
        return self.ihalo_exchange_adjoint(y, sends, recvs, x_shape, kind).wait()

    def ihalo_exchange_adjoint(self, y, sends, recvs, x_shape, kind: str = "halo_adjoint"):
        """Nonblocking :meth:`halo_exchange_adjoint`: a :class:`HaloRequest` whose ``wait()``
        returns ``dx`` (recorded once, when it completes)."""
        xp = array_module(y)
        sends, recvs = halo_args(x_shape, y.shape, sends, recvs, self.size, self.rank)
        t0 = time.perf_counter()
        me = self.rank
        own = [(reg, box) for peer, reg, box in sends if peer == me]
        whole = bool(own) and own[0][1] == tuple(x_shape)
        if whole:  # the own box is all of dx: start from a copy of it, not from zeros
            src = next(reg for peer, reg, _ in recvs if peer == me)
            dx = xp.array(y[src], copy=True)
            sends = [e for e in sends if e[0] != me]
            recvs = [e for e in recvs if e[0] != me]
        else:
            dx = xp.zeros(tuple(x_shape), y.dtype)

        def add(reg, a):
            dx[reg] += a

        post = self._p2p(xp, y, recvs, sends, _HALO_ADJ_TAG, add)
        return HaloRequest(self, post, dx, kind,
                           halo_bytes(recvs, sends, self.rank, y.dtype.itemsize), t0)

    def exchange_p2p(self, sends: dict, recv_counts: dict, xp, dtype,
                     kind: str = "alltoall") -> dict:
        """Flat buffers to and from the peers that meet here only (Isend/Irecv, Waitall):
        ``sends`` ``{peer: flat array}``, ``recv_counts`` ``{peer: elements}``; returns
        ``{peer: flat array}``. A rank with no peers returns at once: it waits for nobody.
        Bytes are counted like an alltoallv (``kind``)."""
        t0 = time.perf_counter()
        reqs, got, keep = [], {}, []
        t = _comm._mpi_type(np.dtype(dtype))
        for q in sorted(recv_counts):
            rb, get = self._recv_buf(xp, (int(recv_counts[q]),), dtype)
            reqs.append(self.mpi.Irecv([rb, t], source=q, tag=_EXCHANGE_TAG))
            got[q] = get
        for q in sorted(sends):
            sb = self._send_buf(xp.ascontiguousarray(sends[q]))
            keep.append(sb)
            reqs.append(self.mpi.Isend([sb, t], dest=q, tag=_EXCHANGE_TAG))
        if reqs:
            _comm.MPI.Request.Waitall(reqs)
        del keep
        item = np.dtype(dtype).itemsize
        self._record(kind, sum(int(a.size) for a in sends.values()) * item,
                     sum(int(n) for n in recv_counts.values()) * item, t0)
        return {q: get() for q, get in got.items()}

    def _p2p(self, xp, src, sends, recvs, tag, put) -> "_P2P":
        """Post every receive, then every send, ``put`` the own box; the returned
        :class:`_P2P` waits and ``put``s each received box."""
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
        return _P2P(reqs, landed, keep, put)


class _P2P:
    """Point-to-point messages in flight: ``finish()`` waits for all of them, then
    ``put``s each received box (the send buffers in ``keep`` live until then)."""

    def __init__(self, reqs, landed, keep, put):
        self.reqs, self.landed, self.keep, self.put = reqs, landed, keep, put

    def test(self) -> bool:
        return not self.reqs or _comm.MPI.Request.Testall(self.reqs)

    def finish(self) -> None:
        if self.reqs:
            _comm.MPI.Request.Waitall(self.reqs)
        for reg, get in self.landed:
            self.put(reg, get())
        self.reqs, self.landed, self.keep = [], [], []


class HaloRequest:
    """A halo exchange or its adjoint in flight (:meth:`Communicator.ihalo_exchange`,
    :meth:`Communicator.ihalo_exchange_adjoint`): ``out`` is the result array (only the own
    box is in place until ``wait()`` lands the rest)."""

    def __init__(self, comm, post, out, kind, nbytes, t0):
        self._comm, self._post, self.out, self._kind = comm, post, out, kind
        self._bytes, self._elapsed, self._done = nbytes, time.perf_counter() - t0, False

    def test(self) -> bool:
        """True when every message has completed (does not block)."""
        return self._done or self._post.test()

    def wait(self):
        """Block until every box has landed; returns ``out``."""
        if not self._done:
            t0 = time.perf_counter()
            self._post.finish()
            self._done = True
            self._comm._stats.add(self._kind, *self._bytes,
                                  self._elapsed + time.perf_counter() - t0)
        return self.out
