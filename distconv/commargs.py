"""What the collectives of :mod:`distconv.comm` count and check, without MPI.

:class:`CommStats`: the per-kind counters of a communicator and its sub-communicators.

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

The shape-only communicator (:mod:`distconv.shapecomm`) records the same numbers. Also
here: the checks of an alltoall's and a halo exchange's arguments, and the packing of
uneven blocks along an axis into one flat buffer and back.
"""
from __future__ import annotations

import numpy as np

from .distribution import block_sizes
from .packing import pack_channel_blocks, unpack_channel_blocks


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



def _displs(sizes):
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += n
    return out


def scatter_args(shape, axis, counts, size):
    """``(axis, counts)`` of a reduce-scatter of an array of ``shape`` along ``axis`` (taken
    modulo the number of dims) over ``size`` ranks: ``counts`` the block sizes (floor+1
    when ``None``); ``ValueError`` unless they are ``size`` entries summing to the extent."""
    axis = axis % max(len(shape), 1)
    n = shape[axis]
    counts = block_sizes(n, size) if counts is None else [int(c) for c in counts]
    if len(counts) != size or sum(counts) != n:
        raise ValueError(f"reduce_scatter: counts {counts} must have {size} entries "
                         f"summing to the extent {n} of axis {axis}")
    return axis, counts


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
