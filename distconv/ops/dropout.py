"""Dropout masks that depend only on (seed, step, global element index).

The keep/drop decision of an element is a counter-based hash of its global
flat (row-major) index in the whole tensor, mixed with the seed and the step:

    key  = splitmix64(splitmix64(seed) ^ step)
    h    = splitmix64(key + index * GAMMA)     (all arithmetic mod 2**64)
    keep = (h >> 11) >= round(p * 2**53)       (53 uniform bits against p)

``splitmix64`` is Steele, Lea and Flood's SplitMix64 output function
(``GAMMA = 0x9E3779B97F4A7C15``), so ``h`` over consecutive indices is the
SplitMix64 stream seeded with ``key``. Nothing depends on which rank holds an
element or how the tensor is cut, so a rank's block of the mask is the same
under every plan and rank count, and blocks of one tensor join into the mask
of the whole tensor. The mask is scaled like PyTorch's: kept elements are
``1/(1-p)``, dropped ones 0 (all 0 for p = 1, all 1 for p = 0). The random
stream is not PyTorch's.

Vectorised in uint64 on NumPy or CuPy (``xp=``); no loops over elements.
"""
from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def _splitmix64_int(z: int) -> int:
    """SplitMix64 output function on a Python int (the scalar key derivation)."""
    z = (z + _GAMMA) & _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def _mix64(xp, z):
    """SplitMix64's finaliser on a uint64 array, in place (wraps mod 2**64)."""
    t = xp.empty_like(z)
    for shift, mult in ((30, _C1), (27, _C2), (31, None)):
        xp.right_shift(z, np.uint64(shift), out=t)
        z ^= t
        if mult is not None:
            z *= np.uint64(mult)
    return z


def dropout_key(seed: int, step: int) -> int:
    """The 64-bit stream key of (seed, step); any Python ints (taken mod 2**64)."""
    return _splitmix64_int(_splitmix64_int(int(seed) & _M64) ^ (int(step) & _M64))


def _block_bounds(global_shape, block_slices):
    shape = tuple(int(s) for s in global_shape)
    if len(block_slices) != len(shape):
        raise ValueError(f"block_slices has {len(block_slices)} entries for a "
                         f"{len(shape)}-D tensor of shape {shape}")
    bounds = []
    for d, (sl, n) in enumerate(zip(block_slices, shape)):
        if isinstance(sl, slice):
            if sl.step not in (None, 1):
                raise ValueError(f"block_slices[{d}] must have step 1, got {sl}")
            a, b, _ = sl.indices(n)
            b = max(a, b)
        else:
            try:
                a, b = (int(v) for v in sl)
            except (TypeError, ValueError):
                raise ValueError(f"block_slices[{d}] must be a slice or a (start, stop) pair, "
                                 f"got {sl!r}") from None
            if not 0 <= a <= b <= n:
                raise ValueError(f"block_slices[{d}] = {(a, b)} is outside 0..{n}")
        bounds.append((a, b))
    return shape, bounds


def dropout_keep(global_shape, block_slices, p, seed, step, *, xp=np):
    """Boolean keep mask (True = kept) of the block ``block_slices`` of a tensor of
    ``global_shape``; see the module docstring for the hash."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    shape, bounds = _block_bounds(global_shape, block_slices)
    local = tuple(b - a for a, b in bounds)
    if p == 0.0:
        return xp.ones(local, bool)
    if p == 1.0 or 0 in local:
        return xp.zeros(local, bool)
    # global flat index of each local element, built by broadcasting per-dim terms
    idx = xp.zeros(local, np.uint64)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        a, b = bounds[d]
        term = xp.arange(a, b, dtype=np.uint64) * np.uint64(stride)
        idx += term.reshape((-1,) + (1,) * (len(shape) - 1 - d))
        stride *= shape[d]
    idx *= np.uint64(_GAMMA)
    idx += np.uint64((dropout_key(seed, step) + _GAMMA) & _M64)
    h = _mix64(xp, idx)
    threshold = np.uint64(int(round(p * 2.0 ** 53)))
    xp.right_shift(h, np.uint64(11), out=h)
    return h >= threshold


def dropout_mask(global_shape, block_slices, p, seed, step, dtype=np.float32, *, xp=np):
    """The local block's scaled dropout mask.

    global_shape: the whole tensor's shape; block_slices: one ``slice`` (step 1)
    or ``(start, stop)`` pair per dimension, in global coordinates (empty blocks
    allowed); p: drop probability in [0, 1]; seed, step: ints. Returns an array
    of the block's shape and ``dtype`` (on ``xp``: numpy or cupy) holding
    ``1/(1-p)`` where the element is kept and 0 where it is dropped, so
    ``y = x * mask`` and ``dx = dy * mask``.
    """
    dtype = np.dtype(dtype)
    keep = dropout_keep(global_shape, block_slices, p, seed, step, xp=xp)
    p = float(p)
    if p == 1.0:
        return xp.zeros(keep.shape, dtype)
    mask = keep.astype(dtype)
    if p > 0.0:
        mask *= dtype.type(1.0 / (1.0 - p))
    return mask
