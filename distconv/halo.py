"""Halo windows of a sliding-window op (convolution, pooling) on a split dimension.

Pure math, no MPI, no arrays. Along one dimension of length ``n`` split in ``parts``
floor+1 blocks (the first ``n mod parts`` blocks hold ``n // parts + 1`` rows, the rest
``n // parts``; blocks may be empty), an op with kernel ``k``, stride ``s``, padding
``(p_lo, p_hi)`` and dilation ``d`` produces ``n_out`` output rows, split the same way.
Output row ``o`` reads the input rows ``o*s - p_lo + j*d`` for ``j = 0 .. k-1`` (negative
rows and rows ``>= n`` are padding). The block of output rows ``[o0, o1)`` therefore reads
the contiguous span ``[o0*s - p_lo, (o1-1)*s - p_lo + d*(k-1) + 1)`` of the padded input:
its *window*. :func:`windows` gives, for every block, that span split into

* ``pad``: the padding rows before and after (zeros for a conv, -inf for max pooling),
* ``rows``: the input rows inside ``[0, n)``,
* ``pieces``: which block owns which of those rows, possibly several blocks beyond the
  nearest neighbour when blocks are small (``n = 7`` on 4 blocks with a 7-wide kernel),
  the block's own rows included; each trimmed to the rows some output reads, so an owner
  whose rows fall wholly in the gaps of a dilated or strided kernel sends nothing.

Running the op with padding 0 on the window (pad rows, then rows) gives exactly the
block's ``o1 - o0`` output rows. Rows the block owns but does not read are simply not in
its window (a "negative halo" is trimmed). A block whose output block is empty has an
empty window and no pieces.

``windows`` works with any ``n_out`` (pooling's ``ceil_mode`` gives one more output row
whose window may reach past the right padding; those positions count as padding).
"""
from __future__ import annotations

from dataclasses import dataclass

from .ops.geometry import pair


def block_range(n: int, parts: int, i: int) -> tuple[int, int]:
    """``(start, stop)`` of block ``i`` of ``parts`` floor+1 blocks of ``n`` rows."""
    q, r = divmod(n, parts)
    start = i * q + min(i, r)
    return start, start + q + (1 if i < r else 0)


def owner_of(n: int, parts: int, row: int) -> int:
    """The block that holds input row ``row`` (``0 <= row < n``) under the floor+1 rule."""
    q, r = divmod(n, parts)
    if row < r * (q + 1):
        return row // (q + 1)
    return r + (row - r * (q + 1)) // q


def out_size(n: int, kernel: int, stride: int = 1, padding=0, dilation: int = 1) -> int:
    """Output length of a window sweep over ``n`` rows (PyTorch's conv formula):
    ``(n + p_lo + p_hi - d*(k-1) - 1) // s + 1``; ``padding`` an int (both sides) or
    ``(p_lo, p_hi)``. ``ValueError`` when it would be < 1 or an argument is out of range."""
    p_lo, p_hi = pair(padding, "padding")
    _check(n, 1, kernel, stride, p_lo, p_hi, dilation)
    span = n + p_lo + p_hi - dilation * (kernel - 1) - 1
    if span < 0:
        raise ValueError(f"window sweep output would be empty: length {n}, kernel {kernel}, "
                         f"stride {stride}, padding {(p_lo, p_hi)}, dilation {dilation}")
    return span // stride + 1


def _check(n, parts, kernel, stride, p_lo, p_hi, dilation):
    for name, v, lo in (("length", n, 0), ("parts", parts, 1), ("kernel", kernel, 1),
                        ("stride", stride, 1), ("padding", p_lo, 0), ("padding", p_hi, 0),
                        ("dilation", dilation, 1)):
        if int(v) != v or v < lo:
            raise ValueError(f"halo windows: {name} must be an int >= {lo}, got {v!r}")


@dataclass(frozen=True)
class Window:
    """Block ``block``'s window along one dimension (all ranges ``(start, stop)``).

    ``owned``: the input rows the block holds. ``out``: the output rows it computes.
    ``rows``: the input rows its outputs read, clipped to ``[0, n)``. ``pad``: ``(lo, hi)``
    padding rows before and after ``rows``. ``pieces``: ``((owner, start, stop), ...)``,
    ascending, non-empty, covering ``rows``: the rows to take from each owner block (the
    block itself included). ``start``: the input row of the window's first row (negative
    inside the left padding; ``rows[0] - pad[0]`` unless the window lies wholly in the
    padding). The window has ``size = pad[0] + len(rows) + pad[1]`` rows.
    """

    block: int
    owned: tuple
    out: tuple
    start: int
    rows: tuple
    pad: tuple
    pieces: tuple

    @property
    def size(self) -> int:
        """Number of rows of the window (padding included); 0 for an empty output block."""
        return self.pad[0] + self.rows[1] - self.rows[0] + self.pad[1]

    @property
    def halo(self) -> tuple[int, int]:
        """Rows received from other blocks ``(below, above)`` the owned block."""
        lo = sum(b - a for o, a, b in self.pieces if o < self.block)
        hi = sum(b - a for o, a, b in self.pieces if o > self.block)
        return lo, hi


def windows(n: int, parts: int, kernel: int, stride: int = 1, padding=0, dilation: int = 1,
            n_out: int | None = None) -> tuple[Window, ...]:
    """The :class:`Window` of each of the ``parts`` blocks (index = block).

    ``n``: input length; ``padding``: an int or ``(p_lo, p_hi)``; ``n_out``: the output
    length (default :func:`out_size`; pooling's ceil mode passes its own). The output rows
    are split in ``parts`` floor+1 blocks like the input rows.
    """
    p_lo, p_hi = pair(padding, "padding")
    _check(n, parts, kernel, stride, p_lo, p_hi, dilation)
    if n_out is None:
        n_out = out_size(n, kernel, stride, (p_lo, p_hi), dilation)
    if int(n_out) != n_out or n_out < 0:
        raise ValueError(f"halo windows: n_out must be an int >= 0, got {n_out!r}")
    reach = dilation * (kernel - 1) + 1
    out = []
    for i in range(parts):
        owned = block_range(n, parts, i)
        o0, o1 = block_range(n_out, parts, i)
        if o1 == o0:
            out.append(Window(i, owned, (o0, o1), 0, (0, 0), (0, 0), ()))
            continue
        a = o0 * stride - p_lo
        b = (o1 - 1) * stride - p_lo + reach
        lo_pad = min(max(0, -a), b - a)
        hi_pad = min(max(0, b - n), b - a)
        r0 = min(max(a, 0), n)
        r1 = max(r0, min(b, n))
        pieces = []
        row = r0
        while row < r1:
            q = owner_of(n, parts, row)
            stop = min(r1, block_range(n, parts, q)[1])
            hull = _read_hull(row, stop, o0, o1, stride, p_lo, dilation, kernel)
            if hull is not None:
                pieces.append((q,) + hull)
            row = stop
        out.append(Window(i, owned, (o0, o1), a, (r0, r1), (lo_pad, hi_pad), tuple(pieces)))
    return tuple(out)


def _read_hull(lo, hi, o0, o1, stride, p_lo, dilation, kernel):
    """``(first, last + 1)`` of the rows in ``[lo, hi)`` that output rows ``[o0, o1)`` read
    (``o*stride - p_lo + j*dilation``), or None when they read none of them."""
    first = last = None
    for j in range(kernel):
        off = j * dilation - p_lo
        # outputs o with lo <= o*stride + off < hi
        oa = max(o0, -(-(lo - off) // stride))
        ob = min(o1 - 1, (hi - 1 - off) // stride)
        if oa > ob:
            continue
        a, b = oa * stride + off, ob * stride + off
        first = a if first is None else min(first, a)
        last = b if last is None else max(last, b)
    return None if first is None else (first, last + 1)


def sends(wins, owner: int) -> tuple[tuple[int, int, int], ...]:
    """What block ``owner`` sends: ``((dest block, start, stop), ...)`` in dest order, its own
    block included (the rows it keeps for its own window)."""
    return tuple((w.block, a, b) for w in wins for q, a, b in w.pieces if q == owner)
