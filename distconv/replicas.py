"""Replica consistency: cheap checksums compared across ranks.

A tensor that is *replicated* over some grid axes (a weight shard over the sample
groups, a batch-norm buffer, a replicated activation) must hold the same bits on
every rank of its replica group; if it does not, training goes on with diverged
models and no error. distconv keeps replicas identical by refusing inputs that
would break them, and lets a job check them later:

* :func:`digest` -- a 64-bit checksum (the first 8 bytes of SHA-256) of an array's
  dtype, shape and bytes (a CuPy array is copied to the host first).
* :func:`differing` -- which of K per-rank digests are not the same on every rank of a
  communicator: ONE allreduce of 2K uint64 (max of d and of ~d), so its cost does not
  grow with the number of ranks. The answer is identical on every rank, so the
  callers raise on every rank alike.
* :func:`replica_mismatches` -- for named DistTensors (parameters, buffers, optimizer
  state), the names whose local blocks differ between the ranks that hold the same
  block (the replica group of each block), with one allreduce of ``sum(blocks) x 2``
  uint64 over the world communicator.
* :func:`check_replicas` -- that check on a model (and optimizer), raising
  :class:`ReplicaMismatchError` naming the first differing tensor.

Chosen over broadcasting rank 0's values because it costs a local hash and a few bytes
of communication instead of a broadcast of every tensor, and because a caller that
passes different values on different ranks has a bug the error points at
(measurements: ``benchmarks/replicas.md``).
"""
from __future__ import annotations

import hashlib

import numpy as np

from .backend import to_numpy

__all__ = ["digest", "differing", "replica_mismatches", "check_replicas",
           "ReplicaMismatchError"]


class ReplicaMismatchError(RuntimeError):
    """Replicas of a tensor hold different values on different ranks."""


def digest(array) -> int:
    """64-bit checksum of ``array`` (any shape; numpy or cupy): dtype, shape and bytes.

    Bitwise: ``0.0`` and ``-0.0`` differ, equal NaN bit patterns match.
    """
    a = np.ascontiguousarray(to_numpy(array))
    h = hashlib.sha256(f"{a.dtype.str}{tuple(a.shape)}".encode())
    h.update(memoryview(a.reshape(-1)).cast("B"))
    return int.from_bytes(h.digest()[:8], "little")


def differing(comm, digests) -> np.ndarray:
    """Boolean mask (K,): True where ``digests[k]`` is not the same on every rank.

    ``comm``: a :class:`distconv.comm.Communicator`; every rank passes K digests (same K;
    checked). One allreduce of ``2K`` uint64, not recorded in ``comm.stats()`` (a check,
    not the model's traffic). Same result on every rank.
    """
    d = np.asarray(digests, dtype=np.uint64).reshape(-1)
    if comm.size == 1:
        return np.zeros(d.shape, bool)
    comm.check_same(int(d.size), "number of checksums")
    hi = comm.allreduce_untracked(np.concatenate([d, ~d]), "max")
    return (hi[:d.size] != ~hi[d.size:])   # max(d) != min(d)


def _block_index(t) -> tuple[int, int]:
    """(index of this rank's block among the tensor's distinct blocks, number of blocks).

    Ranks whose coordinates agree on every axis that splits ``t`` (or over which it is a
    pending sum) hold the same block; the other axes replicate it.
    """
    dist, grid = t.distribution, t.grid
    axes = [a for s in dist.split for a in s] + list(dist.pending)
    idx, n = 0, 1
    for a in axes:
        size = grid.axis_size(a)
        idx = idx * size + grid.coord(a)
        n *= size
    return idx, n


def replica_mismatches(comm, named_tensors) -> list[str]:
    """Names (in the given order) whose replicas differ; the same list on every rank.

    ``named_tensors``: ``[(name, DistTensor)]``, the same names in the same order on every
    rank (checked), all on grids over ``comm``'s ranks. Pending-sum tensors are compared
    per addend (each rank of a pending axis is its own block). Cost: a SHA-256 of each
    local block and one allreduce of ``2 * sum(blocks)`` uint64.
    """
    names = [n for n, _ in named_tensors]
    if comm.size == 1:
        return []
    comm.check_same((len(names), digest(np.frombuffer("\0".join(names).encode(), np.uint8))),
                    "(number, checksum of the names) of the tensors to compare")
    starts, total = [], 0
    for _, t in named_tensors:
        i, n = _block_index(t)
        if t.grid.size == n:  # every block on one rank only: no replicas to compare
            starts.append(None)
            continue
        starts.append((total, i, n))
        total += n
    if total == 0:
        return []
    buf = np.zeros(2 * total, np.uint64)
    for slot, (_, t) in zip(starts, named_tensors):
        if slot is None or not t.grid.member:  # off a placed grid: holds nothing
            continue
        start, i, _ = slot
        d = np.uint64(digest(t.local))
        buf[start + i], buf[total + start + i] = d, ~d
    # slots this rank does not hold stay 0, which never changes a max of ~d (>= 0)
    hi = comm.allreduce_untracked(buf, "max")
    bad = hi[:total] != ~hi[total:]     # max(d) != min(d) over the block's holders
    return [name for slot, name in zip(starts, names)
            if slot is not None and bad[slot[0]:slot[0] + slot[2]].any()]


def check_replicas(model, optimizer=None, what: str = "model") -> None:
    """Raise :class:`ReplicaMismatchError` on every rank if any parameter, buffer or
    optimizer-state shard differs between its replicas; the message names the first
    (in ``named_parameters`` / ``named_buffers`` order) and counts the others."""
    items = [(n, p.data) for n, p in model.named_parameters()]
    items += [(n, b) for n, b in model.named_buffers()]
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for i, k, t in optimizer.state_tensors():
            items.append((f"optimizer state {k!r} of {names.get(id(optimizer.params[i]), i)}",
                          t))
    if not items:
        return
    comm = items[0][1].grid.world
    bad = replica_mismatches(comm, items)
    if bad:
        more = f" (and {len(bad) - 1} more: {bad[1:6]}{' ...' if len(bad) > 6 else ''})" \
            if len(bad) > 1 else ""
        raise ReplicaMismatchError(f"{what}: the replicas of {bad[0]!r} differ between ranks"
                                   f"{more}")
