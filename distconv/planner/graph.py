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


def _traverse(items, dist, layer_fn, join_fn):
    for it in items:
        if isinstance(it, BlockSpec):
            outs = [None] * len(it.branches)
            for i in it.run_order():
                outs[i] = _traverse(it.branches[i], dist, layer_fn, join_fn)
            if it.op != "output":  # other outputs' branches join nothing
                join_fn(it, *outs)
            dist = outs[0]
            if it.op == "cat":
                from ..distribution import Distribution
                dist = Distribution(dist.grid, dist.split)  # dc.cat: first input's splits
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

    def traverse(self, dist, layer_fn, join_fn):
        """Run through the graph in execution order, threading the input distribution:
        ``layer_fn(layer, in_dist) -> out_dist`` for every layer and ``join_fn(block,
        *branch_dists)`` at each join (before the ReLU after an add) with the output
        distribution of every branch (``body_dist, shortcut_dist`` for a residual add);
        not for an ``"output"`` block, whose extra branches join nothing. Returns the
        distribution of the (first) output."""
        return _traverse(self.items, dist, layer_fn, join_fn)

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


_SKIP = ("redistribute",)  # recorded moves: the planner chooses every layout itself


def _node_graph(model, in_shape):
    """Forward nodes of a shape-only run: ``([(kind, module, name, input indices, output
    shape)], output node indices)`` (one index per output of the model, in its order)."""
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
    return out, tuple(-1 if i is None else i for i in tr.outputs)


def trace(model, in_shape) -> Graph:
    """The :class:`Graph` of ``model`` for a global input of shape ``in_shape``.

    The recorded nodes are read as a series-parallel graph: a chain of layers and blocks,
    a block being a fork whose branches (chains of layers and nested blocks, or the
    identity) all meet at one ``add`` (two operands) or ``cat`` (along dim 1) node -- the
    fork's immediate post-dominator. ``GraphError`` (a ValueError) names the node where
    the graph stops being one (e.g. a join fed by two forks, a value used after the join
    of its fork, a cat along another dim) or a module called twice (the planner gives
    each module one strategy).

    A model with several outputs (Inception-v3's ``(logits, aux_logits)`` in training
    mode) is read around its first output: the graph is what that output is computed
    from, and every value that also feeds another output forks there into a block of op
    ``"output"`` whose branch 0 continues to the first output and whose other branches
    (chains of layers and nested blocks) each end in one of the other outputs, joined by
    nothing (each output feeds its own loss)."""
    in_shape = tuple(int(s) for s in in_shape)
    nodes, outputs = _node_graph(model, in_shape)
    # a recorded move passes its input through: map it to what it moved
    alias = {}
    for i, (kind, _, _, ins, _) in enumerate(nodes):
        if kind in _SKIP:
            alias[i] = alias.get(ins[0], ins[0])
    keep = [i for i, n in enumerate(nodes) if n[0] not in _SKIP]
    inputs = {i: [alias.get(j, j) for j in nodes[i][3]] for i in keep}
    outputs = tuple(alias.get(o, o) for o in outputs) or ((keep[-1],) if keep else ())
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
    p = _Parser(nodes, keep, inputs, consumers, in_shape, outputs)
    items, tail = p.chain(-1, None)
    if outputs and tail != outputs[0]:
        raise GraphError(f"the planner cannot reduce the graph at {p.label(tail)}: the "
                         f"chain from the input ends there, not at the model's output")
    missing = [i for i in keep if i not in p.specs and i not in p.joins]
    if missing:
        raise GraphError(f"the planner cannot reduce the graph at {p.label(missing[0])}: it "
                         f"is not on the way from the input to the output")
    if not any(it.strategic for it in Graph(items, in_shape).layers()):
        raise ValueError("the model has no conv, linear or batch-norm layer to plan")
    return Graph(items, in_shape)


class _Parser:
    """Series-parallel decomposition of the recorded forward nodes (see :func:`trace`)."""

    def __init__(self, nodes, keep, inputs, consumers, in_shape, outputs=()):
        self.nodes, self.keep, self.inputs, self.consumers = nodes, keep, inputs, consumers
        self.shapes = {-1: in_shape}
        self.specs: dict = {}
        self.joins: set = set()
        self.outputs = tuple(outputs)
        # the main graph: every value the first output is computed from; a value of it
        # that also feeds nodes outside it forks side branches to the other outputs
        main = set()
        todo = [self.outputs[0]] if self.outputs else []
        while todo:
            v = todo.pop()
            if v in main:
                continue
            main.add(v)
            todo += self.inputs.get(v, [])
        self.main = main
        self.side = {v: [c for c in consumers.get(v, []) if c not in main] for v in main}
        self.sided: set = set()
        order = [-1] + list(keep)
        ip_main = self._post_dominators([v for v in order if v in main], self.succ)
        ip_all = self._post_dominators(order, lambda v: self.consumers.get(v, []))
        self.ipdom = {v: (ip_main[v] if v in main else ip_all[v]) for v in ip_all}

    def succ(self, v):
        """Consumers of ``v`` on the way to the first output (all of them off that way)."""
        c = self.consumers.get(v, [])
        return [x for x in c if x in self.main] if v in self.main else c

    def label(self, i):
        kind, m, name = self.nodes[i][:3]
        return f"the {kind!r} node (#{i})" if m is None else f"{name!r}"

    def _post_dominators(self, order, consumers):
        """Immediate post-dominator of every value of ``order`` over the edges
        ``consumers(v)`` (``None``: an output, or a value whose paths end elsewhere too).
        Recording order is a topological order."""
        pos = {v: k for k, v in enumerate(order)}
        END = len(order)  # a virtual exit after the outputs and after any dead end
        ip = {}
        for v in reversed(order):
            succ = consumers(v)
            if v in self.outputs or not succ:
                ip[v] = END
                continue
            cur = pos[succ[0]]
            for s in succ[1:]:
                b = pos[s]
                while cur != b:
                    if cur < b:
                        cur = ip[order[cur]]
                    else:
                        b = ip[order[b]]
            ip[v] = cur
        return {v: (None if k == END else order[k]) for v, k in ip.items()}

    def spec(self, i, src):
        kind, m, name = self.nodes[i][:3]
        if m is None or self.inputs[i] != [src]:
            raise GraphError(f"the planner cannot reduce the graph at {self.label(i)}: it is "
                             f"a join of values that do not come from one fork (only chains "
                             f"and forks whose branches all meet at one add or cat are "
                             f"supported by its search)")
        try:
            sp = _leaf(name, m, self.shapes[src])
        except ValueError as e:
            raise GraphError(str(e)) from None
        traced = tuple(self.nodes[i][4])
        if tuple(sp.out_shape) != traced:
            raise GraphError(f"the planner cannot price layer {name!r} ({m!r}) yet: it "
                             f"would assume output shape {sp.out_shape}, the layer gives "
                             f"{traced}")
        self.shapes[i] = sp.out_shape
        self.specs[i] = sp
        return sp

    def chain(self, v, stop):
        """Items computed from value ``v`` until the value that feeds ``stop`` (the join of
        the enclosing fork; None: the model's output). Returns ``(items, that value)``."""
        items = []
        while True:
            side = self.side.get(v)
            if side and v not in self.sided:
                # v also feeds other outputs: the rest of this chain and those branches
                self.sided.add(v)
                rest, tail = self.chain(v, stop)
                branches = [rest] + [self.side_branch(v, c) for c in side]
                first = [self.succ(v)[0] if self.succ(v) else None] + list(side)
                run = sorted(range(len(first)),
                             key=lambda k: (first[k] is None, first[k] or 0))
                blk = BlockSpec("", branches, None, tuple(self.shapes[v]),
                                tuple(self.shapes[tail]), "output",
                                tuple(run) if run != list(range(len(first))) else ())
                blk.name = _block_name(blk)
                items.append(blk)
                return items, tail
            succ = self.succ(v)
            if not succ:
                if stop is not None:
                    raise GraphError(f"the planner cannot reduce the graph at "
                                     f"{self.label(v)}: its output is never used")
                return items, v
            if len(succ) == 1:
                n = succ[0]
                if n == stop:
                    return items, v
                items.append(self.spec(n, v))
                v = n
                continue
            blk, v = self.block(v, stop)
            items.append(blk)

    def side_branch(self, v, c):
        """The branch from value ``v`` through its consumer ``c`` to another output."""
        first = self.spec(c, v)
        items, tail = self.chain(c, None)
        if tail not in self.outputs[1:]:
            raise GraphError(f"the planner cannot reduce the graph at {self.label(tail)}: "
                             f"its output is never used (it is not an output of the model)")
        return [first] + items

    def block(self, f, stop):
        """The block forking at value ``f``; returns ``(BlockSpec, its output value)``."""
        J = self.ipdom.get(f)
        fork = "the model's input" if f == -1 else self.label(f)
        if J is None or J == stop or (stop is not None and J > stop):
            raise GraphError(f"the planner cannot reduce the graph at {fork}: it feeds "
                             f"{len(self.succ(f))} consumers whose paths do not all "
                             f"meet at one join before its enclosing block ends")
        kind = self.nodes[J][0]
        ops = self.inputs[J]
        if kind not in ("add", "cat") or len(set(ops)) != len(ops):
            raise GraphError(f"the planner cannot reduce the graph at {self.label(J)}: the "
                             f"branches from {fork} meet there, but only an add or a cat of "
                             f"distinct branches can join a fork")
        if kind == "add" and len(ops) != 2:
            raise GraphError(f"{self.label(J)}: an add of {len(ops)} operands")
        branches, tails = [], []
        for c in self.succ(f):
            if c == J:
                branches.append([])
                tails.append(f)
                continue
            first = self.spec(c, f)
            items, tail = self.chain(c, J)
            branches.append([first] + items)
            tails.append(tail)
        if sorted(tails) != sorted(ops):
            raise GraphError(f"the planner cannot reduce the graph at {self.label(J)}: its "
                             f"operands are not the branches of the fork at {fork}")
        order = [tails.index(o) for o in ops]
        branches = [branches[k] for k in order]
        bshapes = [tuple(self.shapes[o]) for o in ops]
        in_shape = tuple(self.shapes[f])
        if kind == "add":
            if bshapes[0] != bshapes[1]:
                raise GraphError(f"{self.label(J)}: operand shapes {bshapes[0]} and "
                                 f"{bshapes[1]} differ")
            out_shape = bshapes[0]
        else:
            out_shape = _cat_shape(self, J, bshapes)
        self.shapes[J] = out_shape
        self.joins.add(J)
        join, out = None, J
        succ = self.succ(J)
        if kind == "add" and len(succ) == 1 and succ[0] != stop and not self.side.get(J):
            j = succ[0]
            m = self.nodes[j][1]
            if (m is not None and self.inputs[j] == [J]
                    and _leaf(self.nodes[j][2], m, out_shape).kind == "relu"):
                join, out = self.spec(j, J), j
        blk = BlockSpec("", branches, join, in_shape, tuple(out_shape), kind)
        blk.name = _block_name(blk)
        return blk, out


def _block_name(blk) -> str:
    """The module prefix the block's layers share (``""``: none)."""
    names = [x.name.split(".") for x in blk.layers()]
    common = []
    for parts in zip(*names):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common[:min(len(n) for n in names) - 1]) if names else ""


def _cat_shape(parser, J, shapes):
    """The output shape of the cat node ``J`` of inputs ``shapes``; only dim 1 is planned."""
    n = parser.nodes[J]
    want = n[4] if len(n) > 4 else None
    s0 = list(shapes[0])
    ok = len(s0) >= 2 and all(len(s) == len(s0) and s[:1] + s[2:] == tuple(s0[:1] + s0[2:])
                              for s in shapes)
    out = tuple(s0[:1] + [sum(s[1] for s in shapes)] + s0[2:]) if ok else None
    if not ok or (want is not None and tuple(want) != out):
        raise GraphError(f"the planner cannot reduce the graph at {parser.label(J)}: only a "
                         f"cat along dim 1 (channels) is supported")
    return out
