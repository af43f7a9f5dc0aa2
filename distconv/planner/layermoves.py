"""A layer's moves, learnt by running the layer itself once per strategy.

Conv2d, Linear and BatchNorm2d (and, on a layout that splits neither H nor W, the layers
without a strategy) communicate only through ``DistTensor.redistribute``: their own
moves, batch norm's statistics (a ``(2, C)`` tensor pending over its sample group) and
the gradient sync's pending sums. :func:`layer_moves` runs the real module shape-only on
a world whose :attr:`~distconv.comm.Communicator.move_hook` records each move (global
shape, item size, source and target distribution) instead of running it, through its
forward, its backward and :func:`distconv.nn.sync_gradients`. The planner prices each
recorded move on any rank with :func:`.commmodel.redistribute_events` (the real move,
shape-only), so a layer's event lists come from its own code, not from a copy of it.

One recording serves every layer of the same kind, attributes and strategy, whatever its
sizes: the layer runs on canonical sizes (distinct, above every integer attribute, and 1
where the real size is 1), and each dim of a moved tensor is named by the input or
output dim whose canonical size it equals (other values are constants, such as a kernel
size or the 2 of batch norm's statistics). The moves of the layer's input and of its
gradient (the entry moves, which depend on where the input arrives) are found by
recording with the input on a grid of its own (one axis named ``"input"`` over every
rank, replicated), which no layout of the layer's can equal: the moves from or to it are
the entry moves, with the input's layout left open. A layer that calls the communicator
itself (a halo exchange) cannot be recorded this way: :class:`NotMoves` is raised.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..distribution import Distribution
from .commmodel import VGrid, _dtype, on_world, redistribute_events

IN = "input"  # stands for the layout the layer's input arrives in
IN1 = "input1"  # and for a join's second input's

# attributes of a LayerSpec that hold the input's and the output's channel count
_SIZE_ATTRS = {"conv": ("in_channels", "out_channels"),
               "linear": ("in_features", "out_features")}


class NotMoves(ValueError):
    """The layer issues collectives other than ``DistTensor.redistribute``."""


@dataclass(frozen=True)
class Move:
    """One recorded move: ``shape`` (per dim ``("x", i)``/``("y", i)``: the layer's input
    or output dim ``i``, or a constant), ``item`` bytes per element, ``src``/``dst`` on
    :class:`.commmodel.VGrid` (or a placeholder for an input's layout: :data:`IN`,
    :data:`IN1`)."""

    shape: tuple
    item: int
    src: object
    dst: object

    def sized(self, in_shape, out_shape) -> tuple:
        """The moved tensor's shape for a layer of these input and output shapes."""
        return tuple(d if d.__class__ is int else in_shape[d[1]] if d[0] == "x"
                     else out_shape[d[1]] for d in self.shape)


class LayerMoves:
    """The moves of one layer kind under one strategy: ``entry`` (forward, backward) and
    ``inner`` (forward, backward, sync; ``None`` for a layer that also calls the
    communicator itself) tuples of :class:`Move`, and ``out_dist``, where the output
    lies."""

    def __init__(self, entry: tuple, inner: tuple, out_dist: Distribution):
        self.entry, self.inner, self.out_dist = entry, inner, out_dist
        self._sized: dict = {}

    def entry_events(self, layer, in_dist, rank):
        """``(forward, backward)`` event lists of the entry moves on ``rank``, the input
        arriving in ``in_dist``."""
        ins = {IN: in_dist}
        return tuple(_price(ms, ins, rank) for ms in self._resolve(layer)[0])

    def inner_events(self, layer, rank):
        """``(forward, backward, sync)`` event lists of the other moves on ``rank``.
        :class:`NotMoves` for a layer that also calls the communicator itself."""
        if self.inner is None:
            raise NotMoves("the layer calls the communicator itself: run it on each rank")
        return tuple(_price(ms, None, rank) for ms in self._resolve(layer)[1])

    def _resolve(self, layer):
        """The moves as ``(shape, item, src, dst)`` for ``layer``'s sizes, without those
        that move nothing whatever the input's layout (source = target)."""
        key = (layer.in_shape, layer.out_shape)
        got = self._sized.get(key)
        if got is None:
            got = self._sized[key] = tuple(
                tuple(tuple((m.sized(*key), m.item, m.src, m.dst) for m in ms
                            if m.src is not m.dst and m.src != m.dst) for ms in group)
                for group in (self.entry, self.inner or ()))
        return got


def _price(moves, ins, rank) -> list:
    """The events on ``rank`` of resolved ``moves`` (``ins``: the layout each placeholder,
    :data:`IN` or :data:`IN1`, stands for)."""
    out: list = []
    for shape, item, src, dst in moves:
        if src.__class__ is str:
            src = ins[src]
        if dst.__class__ is str:
            dst = ins[dst]
            dst = dst.replace(pending=()) if dst.pending else dst
        if src == dst:  # redistribute returns the tensor itself
            continue
        out += redistribute_events(shape, src, dst, rank, item)
    return out


def layer_moves(layer, st, item: int, in_dist: Distribution | None = None) -> LayerMoves:
    """The :class:`LayerMoves` of ``layer`` (a :class:`.graph.LayerSpec`) under strategy
    ``st`` (a planner strategy; ``None`` for a layer without one, whose moves are then
    all inner and recorded for input layout ``in_dist``) for elements of ``item`` bytes.
    Cached per kind, attributes, which sizes are 1, strategy (and ``in_dist``).
    Raises :class:`NotMoves` for a layer that calls the communicator itself."""
    key = (id(layer), st, item, in_dist)
    got = _BY_LAYER.get(key)
    if got is not None and got[0] is layer:
        return got[1]
    sizes = _SIZE_ATTRS.get(layer.kind, ())
    attrs = tuple(sorted((k, v) for k, v in layer.attrs.items() if k not in sizes))
    ones = tuple(s == 1 for s in layer.in_shape) + tuple(layer.attrs[k] == 1 for k in sizes)
    got = _moves(layer.kind, attrs, ones, st, in_dist, int(item))
    if len(_BY_LAYER) > 100000:
        _BY_LAYER.clear()
    _BY_LAYER[key] = (layer, got)
    return got


_BY_LAYER: dict = {}  # (id(layer), st, item, in_dist) -> (layer, LayerMoves)


def clear_cache() -> None:
    """Forget every recording (the next :func:`layer_moves` records again)."""
    _BY_LAYER.clear()
    _moves.cache_clear()


@lru_cache(maxsize=None)
def _moves(kind, attrs, ones, st, in_dist, item):
    if st is None:
        ops, out, raw = _record(kind, attrs, ones, None, in_dist, item)
        if raw:
            raise NotMoves(f"{kind}: calls the communicator itself on {in_dist}")
        return LayerMoves(((), ()), ops, out)
    from .events import grid_of
    from .strategies import as_strategy
    st = as_strategy(st)
    ndim = len(ones) - len(_SIZE_ATTRS.get(kind, ()))
    outside = Distribution(VGrid((grid_of(st).world,), (IN,)), [None] * ndim)
    ops, out, raw = _record(kind, attrs, ones, st, outside, item)

    def opened(d):
        return IN if d == outside else d

    entry, inner = ([], []), ([], [], [])
    for i, phase in enumerate(ops):
        for m in phase:
            src, dst = opened(m.src), opened(m.dst)
            if IN not in (src, dst):
                inner[i].append(m)
            elif i == 2:
                raise NotMoves(f"{kind} under {st}: its gradient sync moves its input")
            else:
                entry[i].append(Move(m.shape, m.item, src, dst))
    return LayerMoves(tuple(map(tuple, entry)), None if raw else tuple(map(tuple, inner)),
                      out)


def join_events(shape, body_dist, short_dist, rank: int, item: int = 4):
    """``(forward, backward)`` events on ``rank`` of a residual join ``body + shortcut``
    (:func:`distconv.functional.add`) of tensors of global ``shape`` in ``body_dist`` and
    ``short_dist``: its moves recorded from the real add and its backward (once per
    which dims are 1), priced on ``rank``."""
    shape = tuple(shape)
    moves = _join(tuple(s == 1 for s in shape), int(item), body_dist.grid.world)
    ins = {IN: body_dist, IN1: short_dist}
    return tuple(_price([(m.sized(shape, shape), m.item, m.src, m.dst) for m in ms], ins,
                        rank) for ms in moves)


@lru_cache(maxsize=None)
def _join(ones, item, world):
    import numpy as np

    from ..comm import use_world
    from ..functional import add
    from ..meta import MetaArray
    from ..tensor import DistTensor
    base = 16
    shape, _ = _canonical("join", ones, base)
    dtype = np.dtype(_dtype(item))
    rec = _recorder(world, 0)
    with use_world(rec.world):
        rec.ops = ops = []
        try:
            a, b = (rec.real(Distribution(VGrid((world,), (name,)), [None] * len(shape)))
                    for name in (IN, IN1))
            x, z = (DistTensor(MetaArray(d.local_shape(shape), dtype), d, shape)
                    for d in (a, b))
            x.requires_grad = z.requires_grad = True
            y = add(x, z)
            n_fwd = len(ops)
            y.backward(DistTensor(MetaArray(y.local.shape, dtype), y.distribution, shape))
        finally:
            rec.ops = None
    names = _dim_names(shape, shape, base)
    places = {rec.virtual(a): IN, rec.virtual(b): IN1}
    moves = [Move(tuple(names.get(s, s) for s in sh), it, places.get(src, src),
                  places.get(dst, dst)) for sh, it, src, dst in ops]
    return tuple(moves[:n_fwd]), tuple(moves[n_fwd:])


def _canonical(kind, ones, base):
    """Input shape and size attributes of the canonical layer: each size distinct and above
    ``base`` (1 where the real one is 1); H and W above ``5·base``, so that a window of
    stride up to 4 leaves them above ``base``. Channel counts stay small (the canonical
    module is built with real weights)."""
    nsize = len(_SIZE_ATTRS.get(kind, ()))
    ndim = len(ones) - nsize
    # N, C, H, W of the input (N, C for a 2-D one), then the input and output channels
    steps = ((1, 1), (1, 3), (5, 7), (6, 11))[:ndim] + ((1, 3), (1, 5))[:nsize]
    vals = [1 if one else base * m + k for one, (m, k) in zip(ones, steps)]
    in_shape = tuple(vals[:ndim])
    if nsize:  # the input channels are in_shape[1]
        vals[ndim] = in_shape[1]
    return in_shape, dict(zip(_SIZE_ATTRS.get(kind, ()), vals[ndim:]))


def _record(kind, attrs, ones, st, in_dist, item):
    """``((forward, backward, sync) tuples of Move, output distribution, raw)`` of the
    canonical layer with its input in ``in_dist`` (``raw``: it also called the
    communicator itself, e.g. for a halo exchange). Sizes start above every integer
    attribute (a kernel size, a pooled output size), so that they cannot be taken for
    one; a base whose output sizes meet another size is passed over."""
    ints = [v for _, a in attrs for v in (a if isinstance(a, tuple) else (a,))
            if isinstance(v, int) and not isinstance(v, bool)]
    base = max([16] + [v + 1 for v in ints])
    for base in range(base, base + 64, 7):
        try:
            return _record_at(kind, attrs, ones, st, in_dist, item, base)
        except _Ambiguous:
            continue
    raise NotMoves(f"{kind}: no canonical sizes name its dims apart")


class _Ambiguous(Exception):
    pass


def _record_at(kind, attrs, ones, st, in_dist, item, base):
    import numpy as np

    from ..comm import use_world
    from ..meta import MetaArray
    from ..nn import sync_gradients
    from ..tensor import DistTensor
    from .events import grid_of
    from .strategies import to_strategy
    grid = in_dist.grid if st is None else grid_of(st)
    in_shape, sizes = _canonical(kind, ones, base)
    dtype = np.dtype(_dtype(item))
    rec = _recorder(grid.world, grid.ranks[0] if grid.ranks else 0)
    mod = rec.module(kind, in_shape, tuple(sorted(dict(attrs, **sizes).items())), dtype.name)
    w = rec.world
    with use_world(w):
        if st is not None:
            mod.set_strategy(to_strategy(st))
        for p in mod.parameters():
            p.grad = None
        w.events.clear()
        rec.ops = ops = []
        try:
            d = rec.real(in_dist)
            x = DistTensor(MetaArray(d.local_shape(in_shape), dtype), d, in_shape)
            x.requires_grad = True
            y = mod(x)
            n_fwd = len(ops)
            yd = y.distribution
            y.backward(DistTensor(MetaArray(yd.local_shape(y.shape), dtype), yd, y.shape))
            n_bwd = len(ops)
            sync_gradients(list(mod.parameters()))
        finally:
            rec.ops = None
        raw = bool(w.events)
        w.events.clear()
    names = _dim_names(in_shape, tuple(y.shape), base)
    moves = [Move(tuple(names.get(s, s) for s in shape), it, src, dst)
             for shape, it, src, dst in ops]
    return ((tuple(moves[:n_fwd]), tuple(moves[n_fwd:n_bwd]), tuple(moves[n_bwd:])),
            rec.virtual(yd), raw)


def _dim_names(in_shape, out_shape, base):
    """``{canonical size: ("x", i) or ("y", i)}`` for the sizes that stand for a real one
    (those ≥ ``base``; smaller ones are constants of the layer)."""
    names: dict = {}
    for tag, shape in (("x", in_shape), ("y", out_shape)):
        for i, s in enumerate(shape):
            if s < base:
                continue
            if s in names and names[s] != ("x", i):
                raise _Ambiguous
            names.setdefault(s, (tag, i))
    return names


class _Recorder:
    """A shape-only world of ``nranks`` seen from ``rank`` whose move hook records each
    move into ``ops`` (while it is a list) and returns the tensor in its target layout,
    moving nothing; ``real``/``virtual`` turn a planner distribution into one on the
    world's grids and back."""

    def __init__(self, nranks, rank):
        from ..shapecomm import ShapeComm
        self.world = ShapeComm(nranks, rank)
        self.world.move_hook = self._hook
        self.ops = None
        self.real = on_world(self.world)
        self._virtual: dict = {}
        self._mods: dict = {}

    def module(self, kind, in_shape, attrs, dtype):
        """The module of a LayerSpec's kind and attributes (:func:`.realrun.build_module`)
        with shape-only parameters on this world, built once."""
        key = (kind, in_shape, attrs, dtype)
        mod = self._mods.get(key)
        if mod is None:
            from ..comm import use_world
            from ..trace import rebind
            from .realrun import build_module
            mod = build_module(kind, in_shape, attrs, dtype)
            with use_world(self.world):
                rebind(mod, None)
            self._mods[key] = mod
        return mod

    def _hook(self, t, target):
        from ..meta import MetaArray
        from ..tensor import DistTensor
        if self.ops is not None:
            self.ops.append((t.shape, t.dtype.itemsize, self.virtual(t.distribution),
                             self.virtual(target)))
        if target == t.distribution:
            return t
        return DistTensor(MetaArray(target.local_shape(t.shape), t.dtype), target, t.shape)

    def virtual(self, d):
        v = self._virtual.get(d)
        if v is None:
            g = d.grid
            ranks = None if g.spans_world else g.ranks
            vg = VGrid(g.shape, g.names, ranks, self.world.size)
            v = self._virtual[d] = Distribution(vg, d.split, d.pending)
        return v


@lru_cache(maxsize=64)
def _recorder(nranks, rank) -> _Recorder:
    return _Recorder(nranks, rank)
