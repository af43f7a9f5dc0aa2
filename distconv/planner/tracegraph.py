"""Reading a model's traced autograd nodes as a series-parallel :class:`.graph.Graph`.

:func:`trace` runs the model's forward shape-only (:func:`distconv.trace.shape_only_step`)
and parses the recorded nodes into chains of :class:`.graph.LayerSpec` and forks with
their joins (:class:`.graph.BlockSpec`); see :mod:`.graph` for what the graph holds.
"""
from __future__ import annotations

from .graph import BlockSpec, Graph, GraphError, _leaf

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
        sp.seq = i
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
                                tuple(run) if run != list(range(len(first))) else (),
                                fork_seq=v)
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
        blk = BlockSpec("", branches, join, in_shape, tuple(out_shape), kind,
                        fork_seq=f, seq=J)
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
