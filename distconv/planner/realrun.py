"""Events of one layer learnt by running the layer itself, shape-only.

:func:`run_layer` builds the real :mod:`distconv.nn` module of a
:class:`~distconv.planner.graph.LayerSpec`, runs its forward, its backward and the
gradient sync (:func:`distconv.nn.sync_gradients`) on MetaArray blocks over a
:class:`~distconv.shapecomm.ShapeComm` world of ``nranks`` ranks seen from ``rank``
(:func:`distconv.trace.shape_only`), with its input in a given distribution, and returns
the collectives that rank issued in each phase and where the output lies. No MPI, no
data, no copy of the layer's algorithm: the spatial layers (halo exchanges, statistics
over sample×height×width) are priced this way.
"""
from __future__ import annotations

from functools import lru_cache

from ..distribution import Distribution
from ..shapecomm import Event
from .commmodel import VGrid, _dtype
from .strategies import as_strategy


@lru_cache(maxsize=None)
def _module(kind, in_shape, attrs, dtype):
    """:func:`build_module`, built once (its parameters are rebound to each run's world by
    ``shape_only``)."""
    return build_module(kind, in_shape, attrs, dtype)


def build_module(kind, in_shape, attrs, dtype):
    """The :mod:`distconv.nn` module of a LayerSpec's kind and attributes (``attrs``: its
    ``(name, value)`` pairs) for input shape ``in_shape``, with parameters of ``dtype``,
    built on a 1-rank shape-only world."""
    from ..backend import get_default_dtype, set_default_dtype
    old = get_default_dtype()
    set_default_dtype(dtype)
    try:
        return _build(kind, in_shape, dict(attrs))
    finally:
        set_default_dtype(old)


def _build(kind, in_shape, a):
    from .. import nn
    from ..comm import use_world
    from ..shapecomm import ShapeComm
    with use_world(ShapeComm(1, 0)):
        if kind == "conv":
            return nn.Conv2d(a["in_channels"], a["out_channels"], a["kernel_size"],
                             a["stride"], a["padding"], a["dilation"], bias=a["bias"])
        if kind == "linear":
            return nn.Linear(a["in_features"], a["out_features"], bias=a["bias"])
        if kind == "bn":
            return nn.BatchNorm2d(in_shape[1], affine=a.get("affine", True))
        if kind == "relu":
            return nn.Dropout() if a.get("layer") == "Dropout" else nn.ReLU()
        if kind in ("maxpool", "avgpool") and "output_size" not in a:
            cls = nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d
            return cls(a["kernel_size"], a["stride"], a["padding"],
                       ceil_mode=a.get("ceil_mode", False))
        if kind == "avgpool":
            return nn.AdaptiveAvgPool2d(a["output_size"])
        if kind == "gap":
            return nn.AdaptiveAvgPool2d(1)
        if kind == "flatten":
            return nn.Flatten()
    raise ValueError(f"run_layer: unknown layer kind {kind!r}")


def run_layer(layer, st, in_dist: Distribution, nranks: int, rank: int, item: int = 4):
    """``(forward, backward, sync, out_dist)`` of ``layer`` under strategy tuple ``st``
    (None for a layer without one) with its input (global ``layer.in_shape``) in
    ``in_dist`` (on any grid-like object with ``names`` and ``shape``), on ``rank`` of
    ``nranks``: :class:`~distconv.shapecomm.Event` lists of each phase (the input's
    gradient flows back into ``in_dist``) and the output's distribution on a
    :class:`.commmodel.VGrid` of the same shape. Cached per arguments (the lists returned
    are fresh copies)."""
    f, b, s, out = _run(layer.kind, tuple(layer.in_shape), tuple(sorted(layer.attrs.items())),
                        None if st is None else as_strategy(st), in_dist, int(nranks), int(rank),
                        int(item))
    return list(f), list(b), list(s), out


@lru_cache(maxsize=100000)
def _run(kind, in_shape, attrs, st, in_dist, nranks, rank, item):
    import numpy as np

    from ..grid import ProcessGrid
    from ..meta import MetaArray
    from ..nn import sync_gradients
    from ..tensor import DistTensor
    from ..trace import shape_only
    from .strategies import to_strategy
    dtype = np.dtype(_dtype(item))
    mod = _module(kind, in_shape, attrs, dtype.name)
    with shape_only(mod, nranks, rank, plan=None if st is None else to_strategy(st)) as world:
        g = ProcessGrid(world, in_dist.grid.shape, in_dist.grid.names)
        d = Distribution(g, in_dist.split, in_dist.pending)
        x = DistTensor(MetaArray(d.local_shape(in_shape), dtype), d, in_shape)
        x.requires_grad = True
        y = mod(x)
        n_fwd = len(world.events)
        yd = y.distribution
        y.backward(DistTensor(MetaArray(yd.local_shape(y.shape), dtype), yd, y.shape))
        n_bwd = len(world.events)
        sync_gradients(list(mod.parameters()))
        ev = [Event(e.kind, e.group, e.sent, e.recv) for e in world.events]
        out = Distribution(VGrid(yd.grid.shape, yd.grid.names), yd.split, yd.pending)
    return tuple(ev[:n_fwd]), tuple(ev[n_fwd:n_bwd]), tuple(ev[n_bwd:]), out


def run_loss(shape, dist: Distribution, nranks: int, rank: int, item: int = 4):
    """``(forward, backward)`` :class:`~distconv.shapecomm.Event` lists of
    :class:`distconv.nn.CrossEntropyLoss` on logits of global ``shape`` ``(N, K)`` in
    ``dist`` (on any grid-like object), on ``rank`` of ``nranks``: the real loss run
    shape-only (its max and sums over split classes, its total over split samples), then
    ``loss.backward()`` into the logits. Cached per arguments (fresh lists returned)."""
    f, b = _loss(tuple(int(s) for s in shape), dist, int(nranks), int(rank), int(item))
    return list(f), list(b)


@lru_cache(maxsize=10000)
def _loss(shape, dist, nranks, rank, item):
    import numpy as np

    from ..comm import use_world
    from ..meta import MetaArray
    from ..nn import CrossEntropyLoss
    from ..tensor import DistTensor
    from .commmodel import shape_world
    world, real = shape_world(nranks, rank)
    start = len(world.events)
    try:
        with use_world(world):
            d = real(dist)
            x = DistTensor(MetaArray(d.local_shape(shape), _dtype(item)), d, shape)
            x.requires_grad = True
            loss = CrossEntropyLoss()(x, np.zeros(shape[0], np.int64))
            mid = len(world.events)
            loss.backward()
        ev = [Event(e.kind, e.group, e.sent, e.recv) for e in world.events[start:]]
    finally:
        del world.events[start:]
    return tuple(ev[:mid - start]), tuple(ev[mid - start:])
