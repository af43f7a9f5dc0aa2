"""Overlap of a spatial convolution's halo exchange with its interior (used by
:func:`distconv.spatial.conv2d_core`).

A rank's output block splits into the *interior* -- the rows and columns whose inputs are
padding or the rank's own data -- and the *border* strips, which read halo rows or columns
from other ranks. :func:`interior` finds the interior from the window positions that no
other rank's box reaches, :func:`border` cuts the rest into at most four boxes, and
:func:`conv_boxes` convolves each box from its part of the window. :func:`halo_overlap`
switches the overlap on (the default) or off for a block of code.
"""
from __future__ import annotations

import contextlib

from . import ops


def enabled() -> bool:
    """Whether spatial convolutions overlap their halo exchange now."""
    return _OVERLAP[0]


#: whether :func:`conv2d_core` computes its interior while the halos are in flight
_OVERLAP = [True]


@contextlib.contextmanager
def halo_overlap(enabled: bool = True):
    """Within the block, spatial convolutions overlap (``True``) or do not overlap
    (``False``) their halo exchange with the interior; the setting before is restored
    after. Both give the same values up to the order of the sums (tested to 1e-10)."""
    before = _OVERLAP[0]
    _OVERLAP[0] = bool(enabled)
    try:
        yield
    finally:
        _OVERLAP[0] = before


def interior(ready: dict, out_hw, reach, stride):
    """``((i0, i1), (j0, j1))``: the local output rows and columns whose windows lie in the
    ``ready`` window positions (``{2: (lo, hi), 3: (lo, hi)}``), or None when empty."""
    box = []
    for d, n, r, s in zip((2, 3), out_hw, reach, stride):
        lo, hi = ready[d]
        a, z = -(-lo // s), min(n, (hi - r) // s + 1) if hi >= r else 0
        if a >= z:
            return None
        box.append((a, z))
    return tuple(box)


def border(out_hw, inner):
    """The output boxes outside ``inner`` (all of ``(Ho, Wo)`` when ``inner`` is None): the
    rows above and below it, then its rows left and right of it; empty boxes left out."""
    (ho, wo) = out_hw
    if inner is None:
        return [((0, ho), (0, wo))]
    (i0, i1), (j0, j1) = inner
    boxes = [((0, i0), (0, wo)), ((i1, ho), (0, wo)), ((i0, i1), (0, j0)),
             ((i0, i1), (j1, wo))]
    return [bx for bx in boxes if bx[0][0] < bx[0][1] and bx[1][0] < bx[1][1]]


def conv_boxes(win, w, y, boxes, stride, dilation, reach):
    """``y[:, :, i0:i1, j0:j1]`` = the convolution (padding 0) of the part of the window
    ``win`` (N, C, Hw, Ww) those outputs read, for each box ``((i0, i1), (j0, j1))``."""
    (sh, sw), (rh, rw) = stride, reach
    for (i0, i1), (j0, j1) in boxes:
        part = win[:, :, i0 * sh:(i1 - 1) * sh + rh, j0 * sw:(j1 - 1) * sw + rw]
        y[:, :, i0:i1, j0:j1] = ops.conv2d_forward(part, w, stride, (0, 0), dilation)
