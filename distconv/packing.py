"""Channel blocks of an (N, C, ...) array laid one after another in a flat buffer, and back.

:mod:`distconv.comm` packs the blocks of a ``v``-collective this way when they are
not contiguous slices (``commargs._pack`` / ``commargs._assemble``); on the GPU it hands
the reordering to the CUDA kernels of ``kernels/pack.cu`` launched here. Each
GPU function has a NumPy twin ``<name>_numpy`` that transliterates the kernel's
index math with vectorised NumPy (the reference of the GPU tests); the GPU
functions accept NumPy arrays too, and then call their twin. Any dtype.

This module sits below both :mod:`distconv.comm` and :mod:`distconv.ops`
(which re-exports it as part of :mod:`distconv.ops.cuda`) and imports neither.
"""
from __future__ import annotations

import numpy as np

from . import cudakernels as _ck

__all__ = ["pack_channel_blocks", "unpack_channel_blocks", "pack_channel_blocks_numpy",
           "unpack_channel_blocks_numpy"]


def _block_starts(counts, C):
    counts = [int(c) for c in counts]
    if not counts or any(c < 0 for c in counts) or sum(counts) != C:
        raise ValueError(f"counts {counts} must be non-negative and sum to the {C} channels")
    starts = np.zeros(len(counts) + 1, np.int64)
    starts[1:] = np.cumsum(counts)
    return starts


def _npc(shape):
    if len(shape) < 2:
        raise ValueError(f"expected a shape (N, C, ...), got {tuple(shape)}")
    N, C = int(shape[0]), int(shape[1])
    P = int(np.prod(shape[2:], dtype=np.int64))
    return N, C, P


def pack_channel_blocks_numpy(x, counts):
    """NumPy twin of :func:`pack_channel_blocks` (the kernel's index math, vectorised)."""
    x = np.ascontiguousarray(x)
    N, C, P = _npc(x.shape)
    starts = _block_starts(counts, C)
    R = len(starts) - 1
    q = N * P
    if q * C == 0:
        return np.empty(0, x.dtype)
    idx = np.arange(q * C, dtype=np.int64)
    r = np.searchsorted(starts[:R], idx // q, side="right") - 1
    s = starts[r]
    cr = starts[r + 1] - s
    local = idx - q * s
    p = local % P
    t = local // P
    cl = t % cr
    n = t // cr
    return x.reshape(-1)[(n * C + s + cl) * P + p]


def unpack_channel_blocks_numpy(flat, shape, counts):
    """NumPy twin of :func:`unpack_channel_blocks`."""
    flat = np.ascontiguousarray(flat).reshape(-1)
    shape = tuple(int(s) for s in shape)
    N, C, P = _npc(shape)
    if flat.size != N * C * P:
        raise ValueError(f"flat buffer of {flat.size} elements does not fit shape {shape}")
    starts = _block_starts(counts, C)
    R = len(starts) - 1
    q = N * P
    if q * C == 0:
        return np.empty(shape, flat.dtype)
    idx = np.arange(q * C, dtype=np.int64)
    p = idx % P
    t = idx // P
    ch = t % C
    n = t // C
    r = np.searchsorted(starts[:R], ch, side="right") - 1
    s = starts[r]
    cr = starts[r + 1] - s
    return flat[q * s + (n * cr + (ch - s)) * P + p].reshape(shape)


_UNITS = ((8, np.uint64), (4, np.uint32), (2, np.uint16), (1, np.uint8))


def _as_units(itemsize, P):
    """Widest unsigned word dividing ``itemsize``: (bytes, dtype, words per channel row)."""
    for u, dt in _UNITS:
        if itemsize % u == 0:
            return u, dt, P * (itemsize // u)
    raise AssertionError("unreachable")


def pack_channel_blocks(x, counts):
    """Channel blocks of ``x`` one after another in a flat buffer (GPU twin of ``commargs._pack``).

    x: (N, C, ...) with channels on axis 1; counts: channels per block (>= 0,
    summing to C) -> flat (x.size,): block r, a contiguous (N, counts[r], ...)
    array, starts at N * (counts[0] + ... + counts[r-1]) * prod(x.shape[2:]).
    As ``commargs._pack``, N == 1 or a single block needs no reordering and gives
    ``ascontiguousarray(x).reshape(-1)`` (a view when x is contiguous). Any dtype.
    """
    if not _ck.is_gpu_array(x):
        return pack_channel_blocks_numpy(x, counts)
    cp = _ck.cupy()
    N, C, P = _npc(x.shape)
    starts = _block_starts(counts, C)
    if N == 1 or len(counts) == 1:
        return cp.ascontiguousarray(x).reshape(-1)
    x = cp.ascontiguousarray(x)
    flat = cp.empty(x.size, x.dtype)
    if x.size == 0:
        return flat
    u, udt, Pu = _as_units(x.dtype.itemsize, P)
    _ck.launch(f"pack_channel_blocks_b{u}", N * C * Pu,
               (x.reshape(-1).view(udt), flat.view(udt), cp.asarray(starts), len(counts), N, C,
                Pu))
    return flat


def unpack_channel_blocks(flat, shape, counts):
    """Inverse of :func:`pack_channel_blocks` (GPU twin of ``commargs._assemble`` for axis 1).

    flat: (prod(shape),) blocks one after another -> array of ``shape`` with
    the blocks concatenated on axis 1. N == 1 or a single block: ``flat.reshape(shape)``.
    """
    if not _ck.is_gpu_array(flat):
        return unpack_channel_blocks_numpy(flat, shape, counts)
    cp = _ck.cupy()
    shape = tuple(int(s) for s in shape)
    N, C, P = _npc(shape)
    if flat.size != N * C * P:
        raise ValueError(f"flat buffer of {flat.size} elements does not fit shape {shape}")
    starts = _block_starts(counts, C)
    flat = cp.ascontiguousarray(flat).reshape(-1)
    if N == 1 or len(counts) == 1:
        return flat.reshape(shape)
    out = cp.empty(shape, flat.dtype)
    if out.size == 0:
        return out
    u, udt, Pu = _as_units(flat.dtype.itemsize, P)
    _ck.launch(f"unpack_channel_blocks_b{u}", N * C * Pu,
               (flat.view(udt), out.reshape(-1).view(udt), cp.asarray(starts), len(counts), N,
                C, Pu))
    return out

