"""Define-by-run autograd over :class:`~distconv.tensor.DistTensor`.

Every differentiable call made while gradients are enabled records a :class:`Node`
that holds its own saved state (so a module may be called several times in one
step) and one edge per input: the node that produced the input, or the input
tensor itself when it is a leaf (data, or a tensor with ``requires_grad``).
The output tensor points back at the node through ``grad_fn``.

:func:`backward` walks the recorded graph from one or more outputs in reverse
topological order. Ties are broken by the order of recording, newest first, so
every rank runs the nodes -- and so issues the collectives inside them -- in
the same order. A node runs once the gradients of all its consumers have
arrived; where a tensor feeds several consumers their gradients are moved to
the tensor's own distribution (``DistTensor.redistribute``) and summed. A node
frees its saved state after it ran: a second backward through it raises.

Leaf layers add parameter gradients into ``Parameter.grad`` themselves. The
engine counts, per backward, how many nodes still have to add into each
parameter, and fires the parameter's post-accumulate-grad hooks
(:meth:`distconv.nn.Parameter.register_post_accumulate_grad_hook`, PyTorch's
name) right after the last one, so the gradient is complete when they run.
``GradientSync`` starts its bucketed allreduces from these hooks.

Nothing here communicates by itself: gradients are DistTensors and every move
between distributions goes through ``redistribute``.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools


_ENABLED = [True]
_SEQ = itertools.count()
_RECORDERS: list = []  # lists that collect every node recorded (distconv.trace)


# ------------------------------------------------------------------ grad mode
def is_grad_enabled() -> bool:
    """True unless inside :class:`no_grad` (or a recorded op's own forward/backward)."""
    return _ENABLED[0]


@contextlib.contextmanager
def set_grad_enabled(mode: bool):
    """Context manager: record (``True``) or not (``False``) inside the block."""
    prev = _ENABLED[0]
    _ENABLED[0] = bool(mode)
    try:
        yield
    finally:
        _ENABLED[0] = prev


class no_grad(contextlib.ContextDecorator):
    """``with dc.no_grad(): ...`` records nothing (evaluation); also a decorator."""

    def __enter__(self):
        self._prev = _ENABLED[0]
        _ENABLED[0] = False
        return self

    def __exit__(self, *exc):
        _ENABLED[0] = self._prev
        return False


# ------------------------------------------------------------------ graph
class Node:
    """One recorded call.

    ``backward_fn(dy, needs)`` gets the gradient of the call's output (a DistTensor, any
    distribution of the output's shape) and ``needs``, one bool per input, and returns
    one gradient per input (a DistTensor in that input's distribution, or ``None`` where
    ``needs`` is False). ``edges[i]`` is ``(producer Node, None)`` for a recorded input
    and ``(None, tensor)`` for a leaf input. ``params``: the Parameters whose ``grad``
    the call adds into. ``module``: the Module that made the call (hooks), or None.
    """

    __slots__ = ("seq", "name", "backward_fn", "edges", "params", "out_dist", "out_shape",
                 "module", "__weakref__")

    def __init__(self, name, backward_fn, inputs, out, params=(), module=None):
        self.seq = next(_SEQ)
        self.name = name
        self.backward_fn = backward_fn
        self.edges = tuple((t.grad_fn, None) if t.grad_fn is not None else (None, t)
                           for t in inputs)
        self.params = tuple(params)
        self.out_dist = out.distribution
        self.out_shape = tuple(out.shape)
        self.module = module

    @property
    def released(self) -> bool:
        return self.backward_fn is None

    def __repr__(self):
        return f"<Node {self.name} #{self.seq}{' (released)' if self.released else ''}>"


def record(name, backward_fn, inputs, out, params=(), module=None):
    """Attach a new :class:`Node` to ``out`` (``out.grad_fn``) if gradients are enabled.

    ``inputs``: the DistTensors the call read, in the order ``backward_fn`` returns their
    gradients. Returns the node, or None when nothing was recorded.
    """
    if not _ENABLED[0]:
        return None
    node = Node(name, backward_fn, inputs, out, params, module)
    out.grad_fn = node
    for r in _RECORDERS:
        r.append(node)
    return node


# ------------------------------------------------------------------ engine
def _add_grads(a, b, dist):
    """``a + b``, both moved to ``dist`` first (no pending sums)."""
    from .tensor import DistTensor
    a = a.redistribute(dist)
    b = b.redistribute(dist)
    return DistTensor(a.local + b.local, dist, a.shape)


def _collect(roots, stop):
    """Nodes reachable from ``roots`` (not through ``stop``), and each one's consumer count."""
    deps: dict = {}
    seen = set()
    todo = [n for n in roots if n is not None and n not in stop]
    for n in todo:
        seen.add(n)
    order = []
    while todo:
        n = todo.pop()
        order.append(n)
        for prod, _ in n.edges:
            if prod is None or prod in stop:
                continue
            deps[prod] = deps.get(prod, 0) + 1
            if prod not in seen:
                seen.add(prod)
                todo.append(prod)
    return order, deps


def backward(outputs, grads, inputs=None, accumulate=True):
    """Backpropagate ``grads`` from ``outputs`` through the recorded graph.

    outputs: recorded DistTensors (or objects with ``grad_fn``); grads: one gradient per
    output, a DistTensor of the output's shape. ``inputs`` (optional): tensors whose
    gradient to return instead of walking past them, as ``torch.autograd.grad`` does; a
    recorded one stops the walk at its producer. Leaves with ``requires_grad`` get their
    gradient added into ``.grad`` when ``accumulate``. Returns the list of gradients of
    ``inputs`` (``None`` where nothing arrived).

    Raises ``RuntimeError`` before anything runs when an output was not recorded or when
    the graph was already walked (freed).
    """
    inputs = list(inputs or ())
    stop = {t.grad_fn: i for i, t in enumerate(inputs) if t.grad_fn is not None}
    leaf_targets = {id(t): i for i, t in enumerate(inputs) if t.grad_fn is None}
    roots = _roots(outputs)
    order, deps = _collect(roots, stop)
    released = [n for n in order if n.released]
    if released:
        raise RuntimeError(
            f"backward: trying to backward through the graph a second time ({released[0].name} "
            f"already ran its backward and freed what it saved); run a new forward first")
    uses: dict = {}
    for n in order:
        for p in n.params:
            uses[p] = uses.get(p, 0) + 1
    pending: dict = {}
    for fn, g in zip(roots, grads):
        if fn in stop:
            pending[fn] = g if fn not in pending else _add_grads(pending[fn], g, g.distribution)
            continue
        pending[fn] = g if fn not in pending else _add_grads(pending[fn], g, _grad_dist(fn))
    leaf_grads: dict = {}
    results = [None] * len(inputs)
    ready = [(-n.seq, n) for n in set(roots) if n not in stop and deps.get(n, 0) == 0]
    heapq.heapify(ready)
    while ready:
        _, node = heapq.heappop(ready)
        dy = pending.pop(node)
        needs = tuple(_needed(edge, stop, leaf_targets) for edge in node.edges)
        fn, node.backward_fn = node.backward_fn, None
        with set_grad_enabled(False):
            ins = _run_node(node, fn, dy, needs)
        for p in node.params:
            uses[p] -= 1
            if uses[p] == 0:
                p._grad_complete()
        _run_post_hooks(node, ins, dy)
        for (prod, leaf), g in zip(node.edges, ins):
            if g is None:
                continue
            if prod is None:
                k = id(leaf)
                leaf_grads[k] = (leaf, g if k not in leaf_grads
                                 else _add_grads(leaf_grads[k][1], g, _plain(leaf.distribution)))
                continue
            pending[prod] = g if prod not in pending else _add_grads(pending[prod], g,
                                                                     _grad_dist(prod))
            if prod in stop:
                continue
            deps[prod] -= 1
            if deps[prod] == 0:
                heapq.heappush(ready, (-prod.seq, prod))
    for fn, i in stop.items():
        results[i] = pending.get(fn)
    _finish_leaves(leaf_grads, leaf_targets, results, accumulate)
    return results


def _roots(outputs) -> list:
    """The nodes that produced ``outputs``; ``RuntimeError`` if one was not recorded."""
    roots = []
    for out in outputs:
        fn = getattr(out, "grad_fn", None)
        if fn is None:
            raise RuntimeError(
                "backward: the output was not recorded (computed under dc.no_grad(), or not "
                "the result of a differentiable call); nothing to differentiate")
        roots.append(fn)
    return roots


def _finish_leaves(leaf_grads, leaf_targets, results, accumulate) -> None:
    """Gradients that reached leaves: into ``results`` for the requested inputs, else added
    into ``leaf.grad`` of leaves with ``requires_grad`` (as torch accumulates)."""
    from .tensor import DistTensor
    for k, (leaf, g) in leaf_grads.items():
        if k in leaf_targets:
            results[leaf_targets[k]] = g
        elif accumulate and leaf.requires_grad:
            g = g.redistribute(_plain(leaf.distribution))
            leaf.grad = g if leaf.grad is None else DistTensor(
                leaf.grad.redistribute(g.distribution).local + g.local, g.distribution, g.shape)


def _plain(dist):
    return dist.replace(pending=())


def _grad_dist(node):
    return _plain(node.out_dist)


def _needed(edge, stop, leaf_targets):
    prod, leaf = edge
    if prod is not None:
        return True
    return leaf.requires_grad or id(leaf) in leaf_targets


def _run_node(node, fn, dy, needs):
    m = node.module
    if m is not None and m._backward_pre_hooks:
        for h in list(m._backward_pre_hooks.values()):
            r = h(m, (dy,))
            if r is not None:
                dy = r[0] if isinstance(r, tuple) else r
    if tuple(dy.shape) != node.out_shape:
        raise ValueError(f"{node.name}.backward: the gradient has shape {tuple(dy.shape)}, "
                         f"expected the output shape {node.out_shape}")
    ins = fn(dy, needs)
    if not isinstance(ins, (tuple, list)):
        ins = (ins,)
    return tuple(g if need else None for g, need in zip(ins, needs))


def _run_post_hooks(node, ins, dy):
    m = node.module
    if m is not None and m._backward_hooks:
        for h in list(m._backward_hooks.values()):
            h(m, ins, (dy,))
