"""The layer graph a planner works on: leaf layers with global shapes, in execution order,
with residual blocks kept as units.

:func:`trace` runs the model's own forward once, shapes only
(:func:`distconv.trace.shape_only_step`, no data, no MPI), and reads the graph from the
autograd nodes it recorded, so any Module can be planned -- a ResNet, an
``nn.Residual``, a model of the user's own -- as long as its graph is a chain of layers
and residual blocks (``a + b`` of two branches from one fork, optionally followed by an
elementwise layer such as the ReLU after a ResNet join). The result is a :class:`Graph`:
a list of items, each a :class:`LayerSpec` or a :class:`BlockSpec` (``body`` layers:
the first operand of the add; ``shortcut`` layers: the second, empty for the identity;
``join``: the layer after the add, or None). Layer names are those of
``named_modules()``, so a plan ``{name: strategy}`` applies with
``model.set_strategy(plan)``.

Kinds: ``conv``, ``linear``, ``bn`` (each takes a :class:`distconv.Strategy`: the
*strategic* layers) and ``relu``, ``maxpool``, ``avgpool``, ``gap`` (global
average pool), ``flatten`` (which run on whatever split their input has).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import nn
from ..ops import conv2d_output_hw

STRATEGIC = ("conv", "linear", "bn")


@dataclass
class LayerSpec:
    """One leaf layer. ``in_shape``/``out_shape``: global shapes (N, C, H, W) or (N, F)."""

    name: str
    kind: str
    in_shape: tuple
    out_shape: tuple
    attrs: dict = field(default_factory=dict)

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
    """A residual block: ``join(body(x) + shortcut(x))``; ``shortcut == []`` is the identity."""

    name: str
    body: list
    shortcut: list
    join: LayerSpec
    in_shape: tuple
    out_shape: tuple


@dataclass
class Graph:
    items: list
    in_shape: tuple

    def layers(self):
        """Every LayerSpec in execution order (block bodies, then shortcuts, then joins)."""
        for it in self.items:
            if isinstance(it, BlockSpec):
                yield from it.body
                yield from it.shortcut
                if it.join is not None:
                    yield it.join
            else:
                yield it

    def traverse(self, dist, layer_fn, join_fn):
        """Run through the graph in execution order, threading the input distribution:
        ``layer_fn(layer, in_dist) -> out_dist`` for every layer and ``join_fn(block,
        body_dist, shortcut_dist)`` at each residual join (before the ReLU after it).
        Returns the distribution of the output."""
        for it in self.items:
            if isinstance(it, BlockSpec):
                x = dist
                for layer in it.body:
                    dist = layer_fn(layer, dist)
                sd = x
                for layer in it.shortcut:
                    sd = layer_fn(layer, sd)
                join_fn(it, dist, sd)
                if it.join is not None:
                    dist = layer_fn(it.join, dist)
            else:
                dist = layer_fn(it, dist)
        return dist

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
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k, s, p = m.kernel_size, m.stride, m.padding
        ho = (shape[2] + 2 * p[0] - k[0]) // s[0] + 1
        wo = (shape[3] + 2 * p[1] - k[1]) // s[1] + 1
        kind = "maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool"
        return LayerSpec(name, kind, shape, (shape[0], shape[1], ho, wo),
                         {"kernel_size": tuple(k), "stride": tuple(s), "padding": tuple(p)})
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return LayerSpec(name, "gap", shape, (shape[0], shape[1], 1, 1))
    if isinstance(m, nn.Flatten):
        n = 1
        for s in shape[1:]:
            n *= s
        return LayerSpec(name, "flatten", shape, (shape[0], n))
    raise ValueError(f"the planner does not know layer {name!r} of type {type(m).__name__}")


class GraphError(ValueError):
    """The model's graph is not one the planner's search can reduce."""


_SKIP = ("redistribute",)  # recorded moves: the planner chooses every layout itself


def _node_graph(model, in_shape):
    """Forward nodes of a shape-only run: ``[(kind, module, name, input indices)]``."""
    from ..strategy import Strategy
    from ..trace import graph_of, shape_only_step
    names = {}
    for n, m in model.named_modules():
        names.setdefault(id(m), n)
    try:
        tr = shape_only_step(model, in_shape, 1, 0, plan=Strategy(), forward_only=True)
    except RuntimeError as e:
        raise GraphError(f"the planner could not trace the model: {e}") from e
    out = []
    for kind, m, ins, shape in graph_of(tr.nodes):
        out.append((kind, m, names.get(id(m), type(m).__name__) if m is not None else kind,
                    [(-1 if i is None else i) for i in ins], tuple(shape)))
    return out


def trace(model, in_shape) -> Graph:
    """The :class:`Graph` of ``model`` for a global input of shape ``in_shape``.

    ``GraphError`` (a ValueError) names the node where the graph stops being a chain of
    layers and two-branch residual blocks (e.g. a ``dc.cat`` join or a module called
    twice, which the search does not handle yet)."""
    in_shape = tuple(int(s) for s in in_shape)
    nodes = _node_graph(model, in_shape)
    # a recorded move passes its input through: map it to what it moved
    alias = {}
    for i, (kind, _, _, ins, _) in enumerate(nodes):
        if kind in _SKIP:
            alias[i] = alias.get(ins[0], ins[0])
    keep = [i for i, n in enumerate(nodes) if n[0] not in _SKIP]
    inputs = {i: [alias.get(j, j) for j in nodes[i][3]] for i in keep}
    consumers: dict = {}
    for i in keep:
        for j in inputs[i]:
            consumers.setdefault(j, []).append(i)
    seen_modules = {}
    for i in keep:
        m = nodes[i][1]
        if m is not None and hasattr(m, "_apply_strategy"):
            if id(m) in seen_modules:
                raise GraphError(f"module {nodes[i][2]!r} is called more than once; the "
                                 f"planner gives each module one strategy and cannot plan a "
                                 f"shared module yet")
            seen_modules[id(m)] = i
    shapes = {-1: in_shape}
    specs = {}

    def spec(i):
        kind, m, name, ins, traced = nodes[i]
        if m is None:
            raise GraphError(f"the planner cannot reduce the graph at the {kind!r} node "
                             f"(#{i}) : only chains and two-branch residual adds are "
                             f"supported by its search")
        try:
            sp = _leaf(name, m, shapes[inputs[i][0]])
        except ValueError as e:
            raise GraphError(str(e)) from None
        if tuple(sp.out_shape) != traced:
            raise GraphError(f"the planner cannot price layer {name!r} ({m!r}) yet: it "
                             f"would assume output shape {sp.out_shape}, the layer gives "
                             f"{traced}")
        shapes[i] = sp.out_shape
        specs[i] = sp
        return sp

    items, cur, pos = [], -1, 0
    while pos < len(keep):
        i = keep[pos]
        cons = consumers.get(cur, [])
        if len(cons) == 1 and inputs[i] == [cur]:
            items.append(spec(i))
            cur, pos = i, pos + 1
            continue
        if len(cons) != 2:
            raise GraphError(f"the planner cannot reduce the graph at {nodes[i][2]!r}: its "
                             f"input feeds {len(cons)} consumers (only chains and "
                             f"two-branch residual adds are supported)")
        blk, cur, pos = _parse_block(nodes, keep, pos, cur, inputs, consumers, spec, shapes)
        items.append(blk)
    if not any(it.strategic for it in Graph(items, in_shape).layers()):
        raise ValueError("the model has no conv, linear or batch-norm layer to plan")
    return Graph(items, in_shape)


def _chain_back(start, fork, inputs, consumers):
    """Node indices from just after ``fork`` to ``start`` (a single-input, single-consumer
    chain), or None if the path is not such a chain."""
    out = []
    j = start
    while j != fork:
        if j == -1 or len(inputs[j]) != 1 or len(consumers.get(j, [])) != 1:
            return None
        out.append(j)
        j = inputs[j][0]
    return out[::-1]


def _parse_block(nodes, keep, pos, fork, inputs, consumers, spec, shapes):
    """The residual block that starts at ``keep[pos]`` from ``fork``; returns
    ``(BlockSpec, its output index, the next position)``."""
    add = next((k for k in keep[pos:] if nodes[k][0] == "add"), None)
    if add is None or len(inputs[add]) != 2:
        raise GraphError(f"the planner cannot reduce the graph at {nodes[keep[pos]][2]!r}: "
                         f"two branches start here but no residual add joins them")
    body = _chain_back(inputs[add][0], fork, inputs, consumers)
    short = _chain_back(inputs[add][1], fork, inputs, consumers)
    inner = keep[pos:keep.index(add)]
    if body is None or short is None or sorted(body + short) != sorted(inner):
        raise GraphError(f"the planner cannot reduce the graph at the add node (#{add}): its "
                         f"operands are not two chains from one fork")
    if not body:
        raise GraphError(f"the planner cannot reduce the graph at the add node (#{add}): the "
                         f"identity is its first operand; write f(x) + x")
    in_shape = shapes[fork]
    bspecs = [spec(i) for i in body]
    sspecs = [spec(i) for i in short]
    out_shape = bspecs[-1].out_shape
    if sspecs and tuple(sspecs[-1].out_shape) != tuple(out_shape):
        raise GraphError(f"{nodes[body[0]][2]}: shortcut shape {sspecs[-1].out_shape} "
                         f"differs from the body's {out_shape}")
    shapes[add] = out_shape
    nxt = keep.index(add) + 1
    join, out = None, add
    if nxt < len(keep):
        j = keep[nxt]
        m = nodes[j][1]
        if (m is not None and inputs[j] == [add] and len(consumers.get(add, [])) == 1
                and _leaf(nodes[j][2], m, out_shape).kind == "relu"):
            join, out, nxt = spec(j), j, nxt + 1
    names = [nodes[i][2].split(".") for i in body + short + ([out] if join else [])]
    common = []
    for parts in zip(*names):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    name = ".".join(common[:min(len(n) for n in names) - 1])
    return BlockSpec(name, bspecs, sspecs, join, tuple(in_shape), tuple(out_shape)), out, nxt
