"""The layer graph a planner works on: leaf layers with global shapes, in execution order,
with forks and their joins kept as blocks (a series-parallel graph).

:func:`trace` runs the model's own forward once, shapes only
(:func:`distconv.trace.shape_only_step`, no data, no MPI), and reads the graph from the
autograd nodes it recorded, so any Module can be planned -- a ResNet, an
``nn.Residual``, an Inception-style model, a model of the user's own -- as long as its
graph is series-parallel: a chain of layers and blocks, a block being a fork whose
branches (each a chain of layers and nested blocks, or the identity) all meet at one
join, ``a + b`` (two branches; optionally followed by an elementwise layer such as the
ReLU after a ResNet join) or ``dc.cat`` along the channels (any number of branches); a
model with several outputs (Inception-v3's auxiliary logits) adds ``"output"`` blocks
whose extra branches end in the other outputs (see :func:`trace`). The
result is a :class:`Graph`: a list of items, each a :class:`LayerSpec` or a
:class:`BlockSpec` (``branches`` in the join's operand order, ``op`` ``"add"``,
``"cat"`` or ``"output"``; for an add ``body`` is the first operand and ``shortcut``
the second, empty for the identity; ``join``: the layer after the add, or None).
Layer names are those of ``named_modules()``, so a plan ``{name: strategy}`` applies
with ``model.set_strategy(plan)``.

Kinds: ``conv``, ``linear``, ``bn`` (each takes a :class:`distconv.Strategy`: the
*strategic* layers) and ``relu`` (also ``Dropout``, priced as a ReLU: elementwise, one
saved array), ``maxpool``, ``avgpool`` (``AvgPool2d``, and ``AdaptiveAvgPool2d`` to an
output larger than 1x1, whose ``attrs`` then hold ``output_size`` instead of a kernel),
``gap`` (global average pool: ``AdaptiveAvgPool2d`` to 1x1), ``flatten`` (which run on
whatever split their input has).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import nn
from ..ops.geometry import conv2d_output_hw, pool_output_size
from ..ops.pool import adaptive_avg_pool2d_output_hw

STRATEGIC = ("conv", "linear", "bn")


@dataclass
class LayerSpec:
    """One leaf layer. ``in_shape``/``out_shape``: global shapes (N, C, H, W) or (N, F)."""

    name: str
    kind: str
    in_shape: tuple
    out_shape: tuple
    attrs: dict = field(default_factory=dict)
    # where the traced forward ran it (its autograd node's recording index; None: not
    # traced): the real backward runs the nodes newest first
    seq: int | None = field(default=None, compare=False, repr=False)

    @property
    def strategic(self) -> bool:
        return self.kind in STRATEGIC

    @property
    def weight_shape(self):
        a = self.attrs
        if self.kind == "conv":
            return (a["out_channels"], a["in_channels"]) + tuple(a["kernel_size"])
        if self.kind == "linear":
            return (a["out_features"], a["in_features"])
        if self.kind == "bn":
            return (self.in_shape[1],)
        return None

    @property
    def num_params(self) -> int:
        w = self.weight_shape
        if w is None:
            return 0
        n = 1
        for s in w:
            n *= s
        if self.kind == "bn":
            return 2 * n if self.attrs.get("affine", True) else 0
        if self.attrs.get("bias"):
            n += w[0]
        return n


@dataclass
class BlockSpec:
    """A fork and its join: ``n >= 2`` branches from one input, joined by ``op``.

    ``op`` ``"output"``: no join; branch 0 continues to the model's (first) output and
    the others each end in another output of the model (Inception's auxiliary
    classifier); the block's output is branch 0's. ``order``: the branches' indices in
    the order the model runs them (Inception-v3 runs its auxiliary classifier before
    Mixed_7a), empty for operand order.

    ``branches``: one list per operand of the join, in operand order, each a sequence of
    :class:`LayerSpec` and nested :class:`BlockSpec` (``[]``: the identity, the fork's
    input itself). ``op``: ``"add"`` (``a + b``, two branches: a residual block,
    ``join(body(x) + shortcut(x))``) or ``"cat"`` (``dc.cat(branches, dim=1)``: Inception's
    towers). ``join``: the elementwise layer right after an add (a ResNet's ReLU), or None.
    ``body`` and ``shortcut`` are the two branches of an add.
    """

    name: str
    branches: list
    join: LayerSpec
    in_shape: tuple
    out_shape: tuple
    op: str = "add"
    order: tuple = ()  # branch indices in execution order (empty: operand order)
    # recording indices of the traced forward (None: not traced): the fork's input value
    # (-1: the model's input) and the join node
    fork_seq: int | None = field(default=None, compare=False, repr=False)
    seq: int | None = field(default=None, compare=False, repr=False)

    @property
    def body(self) -> list:
        return self.branches[0]

    @property
    def shortcut(self) -> list:
        return self.branches[1] if self.op == "add" else []

    def run_order(self) -> list:
        """Branch indices in execution order."""
        return list(self.order) if self.order else list(range(len(self.branches)))

    def layers(self):
        """Every LayerSpec inside, in execution order (branch by branch, then the join)."""
        for i in self.run_order():
            yield from _layers(self.branches[i])
        if self.join is not None:
            yield self.join

    def offsets(self) -> list:
        """Where each branch's output starts on dim 1 of a cat's output (0s for an add)."""
        if self.op != "cat":
            return [0] * len(self.branches)
        out, acc = [], 0
        for c in self.branch_shapes():
            out.append(acc)
            acc += c[1]
        return out

    def branch_shapes(self) -> list:
        """The output shape of each branch (the fork's input shape for the identity)."""
        return [tuple(br[-1].out_shape) if br else tuple(self.in_shape)
                for br in self.branches]


def _layers(items):
    for it in items:
        if isinstance(it, BlockSpec):
            yield from it.layers()
        else:
            yield it


def _traverse(items, dist, layer_fn, join_fn, fork_fn=None):
    for it in items:
        if isinstance(it, BlockSpec):
            outs = [None] * len(it.branches)
            for i in it.run_order():
                d = dist if fork_fn is None else fork_fn(it, i, dist)
                outs[i] = _traverse(it.branches[i], d, layer_fn, join_fn, fork_fn)
            join_fn(it, *outs)  # for an "output" block: where each output lies
            dist = outs[0]
            if it.op == "cat":
                from ..functional import cat_output_layout
                dist = cat_output_layout(outs, 1)
            if it.join is not None:
                dist = layer_fn(it.join, dist)
        else:
            dist = layer_fn(it, dist)
    return dist


@dataclass
class Graph:
    items: list
    in_shape: tuple

    def layers(self):
        """Every LayerSpec in execution order (each block's branches in operand order --
        body, then shortcut -- then its join)."""
        yield from _layers(self.items)

    def blocks(self):
        """Every BlockSpec, nested ones included, outer before inner."""
        def rec(items):
            for it in items:
                if isinstance(it, BlockSpec):
                    yield it
                    for br in it.branches:
                        yield from rec(br)
        yield from rec(self.items)

    def traverse(self, dist, layer_fn, join_fn, fork_fn=None):
        """Run through the graph in execution order, threading the input distribution:
        ``layer_fn(layer, in_dist) -> out_dist`` for every layer and ``join_fn(block,
        *branch_dists)`` at each join (before the ReLU after an add) with the output
        distribution of every branch (``body_dist, shortcut_dist`` for a residual add;
        for an ``"output"`` block, whose extra branches join nothing, where each of the
        model's outputs lies, for its loss). A cat's output
        lies as ``dc.cat`` lays it (:func:`distconv.functional.cat_output_layout`).
        ``fork_fn(block, i, dist) -> dist``: where branch ``i`` of ``block`` starts when
        the block's input is in ``dist`` (``dc.fork`` moves it onto a placed branch's
        ranks; default: ``dist`` itself). Returns the distribution of the (first)
        output."""
        return _traverse(self.items, dist, layer_fn, join_fn, fork_fn)

    def strategic_names(self) -> list:
        return [layer.name for layer in self.layers() if layer.strategic]

    @property
    def out_shape(self):
        return self.items[-1].out_shape if self.items else self.in_shape


# ------------------------------------------------------------------------ tracing
def _leaf(name, m, shape):
    """LayerSpec of leaf module ``m`` for input ``shape``."""
    shape = tuple(int(s) for s in shape)
    if isinstance(m, nn.Conv2d):
        if len(shape) != 4 or shape[1] != m.in_channels:
            raise ValueError(f"{name}: Conv2d({m.in_channels}, ...) cannot take shape {shape}")
        ho, wo = conv2d_output_hw(shape[2], shape[3], m.kernel_size, m.stride, m.padding,
                                  m.dilation)
        return LayerSpec(name, "conv", shape, (shape[0], m.out_channels, ho, wo), {
            "in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": tuple(m.kernel_size), "stride": tuple(m.stride),
            "padding": tuple(m.padding), "dilation": tuple(m.dilation),
            "bias": m.bias is not None})
    if isinstance(m, nn.Linear):
        if len(shape) != 2 or shape[1] != m.in_features:
            raise ValueError(f"{name}: Linear({m.in_features}, ...) cannot take shape {shape}")
        return LayerSpec(name, "linear", shape, (shape[0], m.out_features), {
            "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None})
    if isinstance(m, nn.BatchNorm2d):
        if len(shape) != 4 or shape[1] != m.num_features:
            raise ValueError(f"{name}: BatchNorm2d({m.num_features}) cannot take shape {shape}")
        return LayerSpec(name, "bn", shape, shape, {"affine": m.weight is not None})
    if isinstance(m, nn.ReLU):
        return LayerSpec(name, "relu", shape, shape)
    if isinstance(m, nn.Dropout):
        # elementwise on any split, no communication, one saved array of x's size: priced
        # as a ReLU (its mask hash costs more compute than a ReLU; not measured separately)
        return LayerSpec(name, "relu", shape, shape, {"layer": "Dropout"})
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        if len(shape) != 4:
            raise ValueError(f"{name}: {type(m).__name__} cannot take shape {shape}")
        k, s, p = m.kernel_size, m.stride, m.padding
        ceil = bool(getattr(m, "ceil_mode", False))
        ho = pool_output_size(shape[2], k[0], s[0], p[0], ceil)
        wo = pool_output_size(shape[3], k[1], s[1], p[1], ceil)
        kind = "maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool"
        attrs = {"kernel_size": tuple(k), "stride": tuple(s), "padding": tuple(p)}
        if ceil:  # priced as the floor-mode kernel of the same arguments
            attrs["ceil_mode"] = True
        return LayerSpec(name, kind, shape, (shape[0], shape[1], ho, wo), attrs)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if len(shape) != 4:
            raise ValueError(f"{name}: AdaptiveAvgPool2d cannot take shape {shape}")
        ho, wo = adaptive_avg_pool2d_output_hw(shape[2], shape[3], m.output_size)
        if (ho, wo) == (1, 1):
            return LayerSpec(name, "gap", shape, (shape[0], shape[1], 1, 1))
        # any other output (AlexNet's 6x6, VGG's 7x7): an average pool whose bins are
        # PyTorch's adaptive ones, on any N/C split like the others
        return LayerSpec(name, "avgpool", shape, (shape[0], shape[1], ho, wo),
                         {"output_size": (ho, wo)})
    if isinstance(m, nn.Flatten):
        n = 1
        for s in shape[1:]:
            n *= s
        return LayerSpec(name, "flatten", shape, (shape[0], n))
    raise ValueError(f"the planner does not know layer {name!r} of type {type(m).__name__}")


class GraphError(ValueError):
    """The model's graph is not one the planner's search can reduce."""


# reading the traced nodes as a Graph lives in .tracegraph (it builds the specs above)
from .tracegraph import trace  # noqa: E402,F401
