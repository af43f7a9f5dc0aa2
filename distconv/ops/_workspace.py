"""A small cache of reusable scratch buffers for the local kernels.

Kernels such as im2col need large temporary arrays whose shape repeats from
one training step to the next. Allocating them on every call costs page
faults (NumPy) or allocator traffic (CuPy); this module keeps the most
recently used ones, keyed by (array module, tag, shape, dtype), up to a byte
budget. Buffers returned here are *scratch*: callers must never hand them
back to user code, and must not rely on their content except where they
asked for ``zero=True`` and only ever write regions they overwrite fully on
every call (the zero borders of a padded-input buffer stay zero). Such a
caller must put everything that decides *which* region it writes (image
size, padding, stride) into ``tag``: two layouts that share a buffer shape
would otherwise leave data in each other's borders.

Not thread-safe: one rank computes with one thread of Python.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_BYTES = 0
_LIMIT = 512 * 2 ** 20  # bytes kept alive at most


def clear() -> None:
    """Drop every cached buffer."""
    global _BYTES
    _CACHE.clear()
    _BYTES = 0


def _trim() -> None:
    global _BYTES
    while _CACHE and _BYTES > _LIMIT:
        _, buf = _CACHE.popitem(last=False)
        _BYTES -= buf.nbytes


def get(xp, tag: str, shape, dtype, zero: bool = False):
    """A scratch array of ``shape``/``dtype`` for ``tag``; zero-filled when made if ``zero``."""
    # the dtype object is hashed as given (far cheaper than str(dtype)); a miss retries
    # with the normalised key, so every spelling of a shape or dtype finds the same buffer
    key = (xp.__name__, tag, tuple(shape), dtype)
    if key not in _CACHE:
        shape = tuple(int(s) for s in shape)
        key = (xp.__name__, tag, shape, np.dtype(dtype))
        if key not in _CACHE:
            return _make(xp, key, shape, dtype, zero)
    _CACHE.move_to_end(key)
    return _CACHE[key]


def _make(xp, key, shape, dtype, zero):
    global _BYTES
    buf = xp.zeros(shape, dtype) if zero else xp.empty(shape, dtype)
    if buf.nbytes <= _LIMIT:
        _CACHE[key] = buf
        _BYTES += buf.nbytes
        _trim()
    return buf
