"""Spatial parallelism: H and W of NCHW activations split over grid axes, with halo exchange.

A tensor whose dim 2 (H) and/or 3 (W) is split in floor+1 blocks over one grid axis each
(any names, e.g. a ``("sample", "height", "width")`` grid from
:func:`distconv.grid.get_grid`) feeds a convolution or pooling window by window: each rank
computes its block of the output (split by the same floor+1 rule on ``Ho``/``Wo``) from
exactly the input rows and columns that block reads (:mod:`distconv.halo`).

* :func:`halo_gather` gives each rank its input window -- its own rows, the halo rows of
  any owners they reach into (several, when blocks are small), the corners when both H and
  W are split (sent straight by the diagonal owner, one message per pair of ranks) and the
  padding at the global borders -- by one :meth:`Communicator.halo_exchange` over the
  spatial axes. Recorded: its backward is the adjoint exchange (each owner adds the halo
  part of the window's gradient into its block).
* :func:`conv2d` is a convolution on such a tensor with a replicated weight: a halo gather,
  then the local conv kernels of :mod:`distconv.ops` with padding 0 on the window.
  Backward: ``dx`` through the local backward-data kernel and the adjoint exchange; ``dw``
  and ``db`` are pending sums over the axes that split the output (sample, height, width),
  resolved by the usual reduction (``DistTensor.redistribute``, a leaf's accumulation, or
  the optimizer's segmented allreduce).

* Pooling on such tensors is in :mod:`distconv.spatial_pool` (the same window gather).

The window tensor of :func:`halo_gather` is a :class:`WindowTensor`: its blocks overlap, so
it lives in a :class:`WindowDistribution` and is only computed on locally, never
redistributed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from . import autograd, halo, ops, spatial_overlap
from .backend import array_module
from .distribution import Distribution, block_range
from .spatial_overlap import halo_overlap  # noqa: F401  (re-exported)
from .tensor import DistTensor


class WindowDistribution(Distribution):
    """The layout of a halo window tensor: ``base`` (the source tensor's distribution) with
    each dim ``d`` of ``windows`` replaced by the overlapping windows ``windows[d]`` (one
    :class:`distconv.halo.Window` per block of ``d``). Along such a dim the global
    coordinate is the input row plus ``offsets[d]`` (the left padding), so every block's
    range is ``(start + offset, start + offset + size)``; other dims are as in ``base``."""

    __slots__ = ("windows", "offsets")

    def __init__(self, base: Distribution, windows: dict, offsets: dict):
        super().__init__(base.grid, base.split, base.pending)
        self.windows = {int(d): tuple(w) for d, w in windows.items()}
        self.offsets = {int(d): int(o) for d, o in offsets.items()}
        # its blocks are the windows: the block memo keys them too
        self._geom = ("windows", self._geom, tuple(sorted(self.windows.items())),
                      tuple(sorted(self.offsets.items())))

    def block_index(self, dim: int, coords=None) -> int:
        """The block of ``dim`` at grid ``coords`` (default: this rank)."""
        axes = self.split[dim]
        return self._coord_map(coords)[axes[0]] if axes else 0

    def window(self, dim: int, coords=None) -> halo.Window:
        return self.windows[dim][self.block_index(dim, coords)]

    def dim_range(self, dim, length, coords=None, upto=None):
        if dim not in self.windows:
            return super().dim_range(dim, length, coords, upto)
        w = self.window(dim, coords)
        if w.size == 0:
            return 0, 0
        s = w.start + self.offsets[dim]
        return s, s + w.size

    def replace(self, split=None, pending=None):
        if (split is None or tuple(split) == self.split) and not pending:
            return self
        raise ValueError("a halo window distribution cannot be changed (its blocks overlap)")

    def __eq__(self, other):
        return (isinstance(other, WindowDistribution) and super().__eq__(other)
                and self.windows == other.windows and self.offsets == other.offsets)

    def __hash__(self):
        return hash((super().__hash__(), tuple(sorted(self.windows.items()))))

    def __repr__(self):
        return "Window" + super().__repr__()[:-1] + f", windows on dims {sorted(self.windows)})"


class WindowTensor(DistTensor):
    """A DistTensor of overlapping halo windows (see :func:`halo_gather`): computed on
    locally; redistributing it to anything else raises ``ValueError``."""

    __slots__ = ()

    def _move(self, target):
        if target == self.distribution:
            return self
        raise ValueError("a halo window tensor cannot be redistributed (its blocks overlap); "
                         "compute on its local windows instead")


@dataclass
class Plan:
    """One rank's halo exchange: ``sends``/``recvs`` as :meth:`Communicator.halo_exchange`
    takes them, over ``comm`` (the sub-communicator of the spatial ``axes``);
    ``blocks[peer]``: the peer's block index on each windowed dim (in ``dims`` order);
    ``out_shape``: the local window's shape; ``mine``: this rank's block index on each
    windowed dim."""

    comm: object
    axes: tuple
    dims: tuple
    sends: list
    recvs: list
    blocks: dict
    out_shape: tuple
    mine: tuple = ()


def _check_windows(t: DistTensor, windows) -> dict:
    if not isinstance(t, DistTensor):
        raise TypeError(f"halo_gather: expected a DistTensor, got {type(t).__name__}")
    if isinstance(t, WindowTensor):
        raise ValueError("halo_gather: the input is already a halo window tensor")
    try:
        windows = {int(d): tuple(w) for d, w in dict(windows).items()}
    except (TypeError, ValueError):
        raise TypeError("halo_gather: windows must map a dim to its tuple of "
                        "distconv.halo.Window (one per block)") from None
    dist = t.distribution
    for d, wins in windows.items():
        if not 0 <= d < t.ndim:
            raise ValueError(f"halo_gather: dim {d} is out of range for a {t.ndim}-d tensor")
        if len(dist.split[d]) > 1:
            raise ValueError(f"halo_gather: dim {d} is split over {dist.split[d]}; a windowed "
                             f"dim may be split over one grid axis at most")
        p = dist.parts(d)
        n = t.shape[d]
        ok = len(wins) == p and all(isinstance(w, halo.Window) and w.block == i
                                    and w.owned == block_range(n, p, i)
                                    for i, w in enumerate(wins))
        if not ok:
            raise ValueError(f"halo_gather: the windows of dim {d} were not made for {p} "
                             f"floor+1 blocks of length {n} (use distconv.halo.windows({n}, "
                             f"{p}, ...))")
    return windows


def exchange_plan(dist: Distribution, shape, windows: dict) -> Plan:
    """The halo exchange of this rank for a tensor of global ``shape`` laid out as ``dist``
    and the per-dim ``windows`` (checked by the caller). Pure arithmetic except the first
    use of the spatial sub-communicator (a cached split over the grid)."""
    grid = dist.grid
    dims = tuple(sorted(windows))
    axes = tuple(dist.split[d][0] for d in dims if dist.split[d])
    comm = grid.sub(axes)
    sizes = {d: dist.parts(d) for d in dims}
    mine = {d: grid.coord(dist.split[d][0]) if dist.split[d] else 0 for d in dims}
    local = dist.local_shape(shape)

    def peer(blocks):
        r = 0
        for d, b in zip(dims, blocks):
            if dist.split[d]:
                r = r * sizes[d] + b
        return r

    wmine = {d: windows[d][mine[d]] for d in dims}
    out_shape = tuple(wmine[d].size if d in wmine else n for d, n in enumerate(local))
    recvs, sends, blocks = [], [], {}
    for combo in itertools.product(*(wmine[d].pieces for d in dims)):
        region = [slice(None)] * len(local)
        for d, (q, a, b) in zip(dims, combo):
            w = wmine[d]
            region[d] = slice(w.pad[0] + a - w.rows[0], w.pad[0] + b - w.rows[0])
        owners = tuple(q for q, _, _ in combo)
        recvs.append((peer(owners), tuple(region)))
        blocks[peer(owners)] = owners
    for combo in itertools.product(*(halo.sends(windows[d], mine[d]) for d in dims)):
        region = [slice(None)] * len(local)
        for d, (_, a, b) in zip(dims, combo):
            lo = windows[d][mine[d]].owned[0]
            region[d] = slice(a - lo, b - lo)
        dests = tuple(j for j, _, _ in combo)
        sends.append((peer(dests), tuple(region)))
        blocks[peer(dests)] = dests
    return Plan(comm, axes, dims, sends, recvs, blocks, out_shape,
                tuple(mine[d] for d in dims))


def halo_gather(t: DistTensor, windows, fill=0.0) -> WindowTensor:
    """Each rank's input window of ``t`` (differentiable).

    ``t``: a DistTensor whose windowed dims are each split over at most one grid axis
    (pending sums are resolved first). ``windows``: ``{dim: distconv.halo.windows(...)}``
    for that dim's global length and number of blocks. ``fill``: the value of the padding
    (0 for convolution and average pooling, ``-inf`` for max pooling).

    Returns a :class:`WindowTensor` whose local block is ``t.local`` with each windowed dim
    ``d`` replaced by this rank's window (``windows[d][block].size`` rows: padding, the
    rows of every owner its outputs read, corners included). Its global shape has
    ``offset + max(window stop)`` rows on a windowed dim (``offset``: the left padding).
    Backward: the adjoint exchange, the window gradient's halo parts added into their
    owners' blocks; the padding's gradient is dropped.
    """
    windows = _check_windows(t, windows)
    if t.distribution.pending:
        t = t.redistribute(t.distribution.replace(pending=()))
    out, adjoint = _gather(t, windows, fill)
    wdist = out.distribution

    def backward(dy, needs):
        if dy.distribution != wdist:
            raise ValueError(f"halo_gather.backward: the gradient is laid out as "
                             f"{dy.distribution}, expected the window layout {wdist}")
        return (adjoint(dy.local),)

    autograd.record("halo_gather", backward, [t], out)
    return out


def _gather(t: DistTensor, windows: dict, fill):
    """Unrecorded halo gather of ``t`` (no pending sums; checked ``windows``): the window
    tensor and ``adjoint(dwin_local) -> dx`` (a DistTensor in ``t``'s layout)."""
    h = Halo(t, windows, fill)
    return WindowTensor(h.start(t.local).wait(), h.wdist, h.gshape), h.adjoint


class Halo:
    """One rank's halo exchange of ``t`` (no pending sums) for checked ``windows``.

    ``start(x_local)``: the nonblocking exchange (its ``out`` holds the padding and the own
    box at once); ``adjoint(dwin)``: the window gradient's halo parts added into their
    owners' blocks (a DistTensor in ``t``'s layout); ``keep(win)``/``rebuild(x_local,
    kept)``: the received boxes alone, and the window made again from them and ``x_local``
    (so a saved window costs its halo, not a copy of the block); ``ready()``: the window
    rows and columns that hold padding or own data (usable before the exchange ends).
    """

    def __init__(self, t: DistTensor, windows: dict, fill):
        dist = t.distribution
        self.plan = plan = exchange_plan(dist, t.shape, windows)
        self.fill, self.dist, self.shape = fill, dist, t.shape
        self.x_local_shape = tuple(t.local.shape)
        offsets, gshape = {}, list(t.shape)
        for d, wins in windows.items():
            live = [w for w in wins if w.size]
            offsets[d] = max([0] + [-w.start for w in live])
            gshape[d] = offsets[d] + max([t.shape[d]] + [w.start + w.size for w in live])
        self.wdist, self.gshape = WindowDistribution(dist, windows, offsets), gshape
        me = plan.comm.rank
        self.foreign = [reg for peer, reg in plan.recvs if peer != me]
        self.own = ([reg for peer, reg in plan.recvs if peer == me],
                    [reg for peer, reg in plan.sends if peer == me])

    def start(self, x_local):
        p = self.plan
        return p.comm.ihalo_exchange(x_local, p.sends, p.recvs, p.out_shape, fill=self.fill)

    def adjoint(self, dwin) -> DistTensor:
        return self.start_adjoint(dwin)()

    def start_adjoint(self, dwin):
        """The adjoint exchange, started: a function that waits for it and returns dx."""
        p = self.plan
        req = p.comm.ihalo_exchange_adjoint(dwin, p.sends, p.recvs, self.x_local_shape)
        return lambda: DistTensor(req.wait(), self.dist, self.shape)

    def keep(self, win) -> list:
        return [win[reg].copy() for reg in self.foreign]

    def rebuild(self, x_local, kept):
        xp = array_module(x_local)
        out = xp.full(self.plan.out_shape, self.fill, x_local.dtype)
        for dst, src in zip(*self.own):
            out[dst] = x_local[src]
        for reg, box in zip(self.foreign, kept):
            out[reg] = box
        return out

    def ready(self) -> dict:
        """``{dim: (lo, hi)}``: window positions ``[lo, hi)`` on each windowed dim that no
        other rank's box reaches (padding and the own rows), beyond the last box from a
        lower block and before the first box from a higher one."""
        p = self.plan
        out = {}
        for k, d in enumerate(p.dims):
            lo, hi = 0, p.out_shape[d]
            for peer, reg in p.recvs:
                q = p.blocks[peer][k]
                if q < p.mine[k]:
                    lo = max(lo, reg[d].stop)
                elif q > p.mine[k]:
                    hi = min(hi, reg[d].start)
            out[d] = (lo, max(lo, hi))
        return out


# ----------------------------------------------------------------------------- conv2d
def _padding_pairs(padding, kernel, stride, dilation):
    """``((ph_lo, ph_hi), (pw_lo, pw_hi))`` from an int, a pair, ``'valid'`` or ``'same'``
    (PyTorch's rule: total ``d*(k-1)``, the left side gets half, rounded down)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise ValueError(f"conv2d: padding string must be 'same' or 'valid', got "
                             f"{padding!r}")
        if stride != (1, 1):
            raise ValueError(f"conv2d: padding='same' needs stride 1, got {stride}")
        out = []
        for k, d in zip(kernel, dilation):
            tot = d * (k - 1)
            out.append((tot // 2, tot - tot // 2))
        return tuple(out)
    ph, pw = halo.pair(padding, "padding")
    return (ph, ph), (pw, pw)


def _as_replicated(w, grid):
    """``w`` (a DistTensor on any grid over the same ranks, or an array every rank passes
    alike) replicated on ``grid``; a DistTensor move is recorded."""
    rep = Distribution.replicated(grid, len(w.shape))
    if isinstance(w, DistTensor):
        return w.redistribute(rep)
    return DistTensor.from_global(array_module(w).asarray(w), rep)


def conv2d(x: DistTensor, weight, bias=None, stride=1, padding=0, dilation=1) -> DistTensor:
    """2-D convolution (cross-correlation, PyTorch's ``F.conv2d``) of a spatially split ``x``.

    x: DistTensor (N, C, H, W); N may be split over any axes, C not at all, H and W over
    at most one grid axis each. weight: (F, C, kh, kw) and bias: (F,) or None, each a
    DistTensor (moved to replicated on ``x``'s grid, recorded) or an array every rank
    passes alike. stride, dilation: int or pair; padding: int, pair, ``'same'`` (stride 1)
    or ``'valid'``. Returns y: (N, F, Ho, Wo), split like ``x`` on N, on Ho and Wo over
    ``x``'s H and W axes in floor+1 blocks (blocks may be empty). Backward gives ``dx`` in
    ``x``'s layout and ``dw``/``db`` pending over the axes that split ``y``.
    """
    if not isinstance(x, DistTensor) or x.ndim != 4:
        raise ValueError(f"conv2d: x must be a 4-D (N, C, H, W) DistTensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    dist = x.distribution
    if dist.split[1]:
        raise ValueError(f"conv2d: x is split on channels over {dist.split[1]}; the spatial "
                         f"conv needs whole channels (redistribute first)")
    if tuple(getattr(weight, "shape", ())[1:2]) != (x.shape[1],) or len(weight.shape) != 4:
        raise ValueError(f"conv2d: weight must be (F, {x.shape[1]}, kh, kw) for x of shape "
                         f"{x.shape}, got {tuple(getattr(weight, 'shape', ()))}")
    F, _, kh, kw = (int(s) for s in weight.shape)
    if bias is not None and tuple(bias.shape) != (F,):
        raise ValueError(f"conv2d: bias must have shape ({F},), got {tuple(bias.shape)}")
    stride = halo.pair(stride, "stride")
    dilation = halo.pair(dilation, "dilation")
    if kh < 1 or kw < 1:
        raise ValueError(f"conv2d: kernel must be at least 1x1, got {(kh, kw)}")
    pads = _padding_pairs(padding, (kh, kw), stride, dilation)
    grid = dist.grid
    w = _as_replicated(weight, grid)
    if w.dtype != x.dtype:
        raise TypeError(f"conv2d: weight dtype {w.dtype} differs from x's {x.dtype}")
    b = None if bias is None else _as_replicated(bias, grid)
    if x.distribution.pending:
        x = x.redistribute(x.distribution.replace(pending=()))
    y, core_backward = conv2d_core(x, w.local, None if b is None else b.local, stride, pads,
                                   dilation)
    pend = y.distribution.split_axes

    def backward(dy, needs):
        dx, dw, db = core_backward(dy, needs[0], needs[1], b is not None and needs[2])
        out = [dx, None if dw is None else
               DistTensor(dw, Distribution(grid, [None] * 4, pending=pend), w.shape)]
        if b is not None:
            out.append(None if db is None else
                       DistTensor(db, Distribution(grid, [None], pending=pend), (F,)))
        return tuple(out)

    autograd.record("conv2d_spatial", backward, [x, w] + ([b] if b is not None else []), y)
    return y


def conv2d_core(x: DistTensor, w, b, stride, pads, dilation, filters=None, pending=()):
    """The unrecorded spatial convolution under :func:`conv2d` (and ``nn.Conv2d``).

    ``x``: (N, C, H, W), no pending sums, H and W split over at most one grid axis each;
    ``w``/``b``: this rank's weight (Fb, Cb, kh, kw) and bias (Fb,) arrays (``b`` may be
    None), where Cb is ``x``'s local block of channels; ``pads``: ``((lo, hi), (lo, hi))``.
    ``filters``: None when ``w`` holds every filter, else ``(F, axes)``: the global filter
    count, of which ``w`` holds this rank's floor+1 block over grid ``axes``; ``pending``:
    the axes ``y`` is a partial sum over (``x``'s channels split over them). Returns ``y``
    (N split like ``x``, F over ``axes``, Ho/Wo over ``x``'s H/W axes; pending over
    ``pending``) and ``backward(dy, need_dx, need_dw, need_db) -> (dx, dw, db)``: ``dx`` a
    DistTensor in ``x``'s layout (halo parts added back into their owners; pending over
    ``axes`` when the filters are split), ``dw``/``db`` this rank's local partial sums
    (pending over the axes that split ``y``), ``None`` where not needed.

    With :func:`halo_overlap` on (the default) at the forward call, the output rows and
    columns that read no other rank's data (the interior) are computed while the halo
    messages are in flight, then the border strips; in backward, ``dw`` is computed while
    the halo parts of ``dx`` travel back. Only the received halo boxes are kept for
    backward, next to ``x``'s own block (the window is made again there).
    """
    dist = x.distribution
    F, _, kh, kw = (int(v) for v in w.shape)
    geo = list(zip((kh, kw), stride, pads, dilation))
    wins = {2 + i: halo.windows(x.shape[2 + i], dist.parts(2 + i), k, s, p, d)
            for i, (k, s, p, d) in enumerate(geo)}
    F, f_axes = (F, None) if filters is None else filters
    y_dist = Distribution(dist.grid, [dist.split[0], f_axes, dist.split[2], dist.split[3]])
    y_shape = (x.shape[0], F, *(halo.out_size(x.shape[2 + i], k, s, p, d)
                                for i, (k, s, p, d) in enumerate(geo)))
    want = y_dist.local_shape(y_shape)
    h = Halo(x, _check_windows(x, wins), 0.0)
    xp, x_local = array_module(x.local), x.local
    req = h.start(x_local)
    win_hw = tuple(req.out.shape[2:])
    live = all(want) and all(win_hw)
    reach = tuple(d * (k - 1) + 1 for k, d in zip((kh, kw), dilation))
    ov = spatial_overlap
    overlap = ov.enabled()
    # with overlap the interior and border boxes fill every output (no zeros needed)
    y_local = (None if live and not overlap else
               xp.empty(want, x.dtype) if live else xp.zeros(want, x.dtype))
    inner = ov.interior(h.ready(), want[2:], reach, stride) if live and overlap else None
    if inner is not None:
        ov.conv_boxes(req.out, w, y_local, [inner], stride, dilation, reach)
    win = req.wait()
    if live and y_local is None:
        y_local = ops.conv2d_forward(win, w, stride, (0, 0), dilation)
    elif live:
        ov.conv_boxes(win, w, y_local, ov.border(want[2:], inner), stride, dilation, reach)
    if b is not None:
        y_local = y_local + b.reshape(1, -1, 1, 1)
    kept = h.keep(win)
    del win, req

    def backward(dy, need_dx, need_dw, need_db):
        dy = dy._move(y_dist)
        dx = dw = db = None
        win = h.rebuild(x_local, kept) if live and need_dw else None
        if need_dx:  # with overlap, dw is computed while dx's halo parts travel
            dxw = (ops.conv2d_backward_data(dy.local, w, win_hw, stride, (0, 0), dilation)
                   if live else xp.zeros(h.plan.out_shape, x.dtype))
            dx = h.start_adjoint(dxw)
            if not overlap:
                dx = dx()
        if need_dw:
            dw = (ops.conv2d_backward_filter(win, dy.local, (kh, kw), stride, (0, 0),
                                             dilation)
                  if live else xp.zeros(w.shape, x.dtype))
        if need_dx:
            dx = dx() if overlap else dx
            if f_axes:
                dx = DistTensor(dx.local, dist.replace(pending=f_axes), x.shape)
        if need_db:
            db = dy.local.sum(axis=(0, 2, 3))
        return dx, dw, db

    return DistTensor(y_local, y_dist.replace(pending=pending), y_shape), backward
