"""Shape-only execution of a whole training step of any Module, as one rank of any job.

:func:`shape_only_step` runs the model's real code -- its forward, ``loss.backward()``
through the recorded graph, the gradient sync (``GradientSync`` buckets or
``sync_gradients``) and the optimizer update -- on :class:`~distconv.meta.MetaArray`
blocks (shape and dtype, no data) over a :class:`~distconv.shapecomm.ShapeComm` world
of ``nranks`` ranks seen from ``rank``. Nothing is computed or sent, and no mpi4py is
needed. The result holds every collective this rank would issue (kind, group, bytes,
and the layer that issued it), the per-kind totals in ``comm.stats()`` form, and the
recorded autograd graph (:func:`graph_of`): what a planner needs to price a plan,
learnt from the code that will run rather than from a copy of it.

The model is borrowed: its strategies, parameters and buffers are moved onto the
shape-only world for the step and put back afterwards, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import autograd
from .backend import get_default_dtype
from .comm import use_world
from .meta import MetaArray
from .shapecomm import ShapeComm
from .tensor import DistTensor


@dataclass
class StepTrace:
    """What one rank's shape-only step did.

    ``stats``: ``{kind: {calls, bytes_sent, bytes_recv, time}}`` (time 0) as
    ``Communicator.stats()``; ``events``: :class:`~distconv.shapecomm.Event` list in issue
    order, tagged ``(phase, module name)`` with phase ``forward``, ``backward``, ``sync``,
    ``step`` or ``loss``; ``nodes``: the recorded autograd nodes of the step, in
    recording order (see :func:`graph_of`); ``logits_shape``: the output's global shape
    (the first output's for a model with several, such as Inception-v3's ``(logits,
    aux_logits)``); ``outputs``: the index in ``nodes`` of the node that produced each
    output, in the model's order (None: an output no node produced).
    """

    nranks: int
    rank: int
    stats: dict
    events: list
    nodes: list = field(default_factory=list)
    logits_shape: tuple = ()
    outputs: tuple = ()

    def bytes_by_tag(self) -> dict:
        """``{(phase, module): (sent, recv)}`` summed over the events."""
        out: dict = {}
        for e in self.events:
            s, r = out.get(e.tag, (0, 0))
            out[e.tag] = (s + e.sent, r + e.recv)
        return out


def _snapshot(model):
    """Everything the step may rebind: module dicts, parameter data/grad, buffers."""
    mods = []
    for _, m in model.named_modules():
        mods.append((m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)))
    params = [(p, p.data, p.grad) for p in model.parameters()]
    return mods, params


def _restore(snap):
    mods, params = snap
    for m, d, ps, bs in mods:
        m.__dict__.clear()
        m.__dict__.update(d)
        m._parameters.clear()
        m._parameters.update(ps)
        m._buffers.clear()
        m._buffers.update(bs)
    for p, data, grad in params:
        p.data, p.grad = data, grad


def _meta_like(t: DistTensor, grid) -> DistTensor:
    """``t``'s layout on ``grid`` (same axis names), with a shape-only block."""
    d = t.distribution.__class__(grid, t.distribution.split, t.distribution.pending)
    return DistTensor(MetaArray(d.local_shape(t.shape), t.dtype), d, t.shape)


def rebind(model, plan):
    """Move every strategic module onto the current (shape-only) world under ``plan`` (or
    its own strategy): its parameters and buffers become shape-only blocks laid out as
    before (the same split axes) on the grid of its new strategy there, then
    ``set_strategy`` applies the plan with the layers' own code."""
    full = {name: m.strategy for name, m in model.named_modules()
            if getattr(m, "strategy", None) is not None and hasattr(m, "_apply_strategy")}
    if plan is not None:
        from .nn.module import as_strategy, plan_entry
        from .strategy import Strategy
        if isinstance(plan, (str, Strategy)):
            plan = {"": plan}
        given = {k: as_strategy(v) for k, v in dict(plan).items()}
        known = {n for n, _ in model.named_modules()}
        unknown = [k for k in given if k not in known]
        if unknown:
            raise ValueError(f"plan names layers that do not exist: {unknown}")
        full = {n: (plan_entry(given, n, given.get("")) or st) for n, st in full.items()}
    mods = dict(model.named_modules())
    for name, st in full.items():
        m = mods[name]
        grid = st.grid()
        for p in m._parameters.values():
            p.data, p.grad = _meta_like(p.data, grid), None
        for bname, b in list(m._buffers.items()):
            m.register_buffer(bname, _meta_like(b, grid))
    model.set_strategy(full)


def _tagging(model, world):
    """Hooks that tag the world's events with (phase, module name) for every leaf."""
    handles = []
    for name, m in model.named_modules():
        if any(True for _ in m.children()):
            continue

        def pre(phase, name=name):
            def hook(*args):
                world.tag = (phase, name)
            return hook

        def post(*args, phase="forward"):
            world.tag = None

        handles += [m.register_forward_pre_hook(pre("forward")), m.register_forward_hook(post),
                    m.register_full_backward_pre_hook(pre("backward")),
                    m.register_full_backward_hook(post)]
    return handles


class shape_only:
    """``with shape_only(model, nranks, rank, plan) as world:`` -- inside, ``model`` lives
    on a :class:`~distconv.shapecomm.ShapeComm` world of ``nranks`` ranks seen from
    ``rank`` (its parameters and buffers shape-only, ``plan`` applied; default: the
    model's own strategies), so any code run there -- a training step of the caller's own
    -- moves no data and records its collectives in ``world.stats()`` / ``world.events``
    (tagged ``(phase, module name)`` inside leaf layers). Everything is put back on exit.
    ``world``: a :class:`~distconv.shapecomm.ShapeComm` of ``nranks`` ranks seen from
    ``rank`` to use (and keep, with its grids) instead of a new one.
    """

    def __init__(self, model, nranks: int, rank: int = 0, plan=None, world=None):
        self.model, self.plan = model, plan
        if world is not None and (world.size, world.rank) != (nranks, rank):
            raise ValueError(f"shape_only: the world given is rank {world.rank} of "
                             f"{world.size}, not rank {rank} of {nranks}")
        self.world = ShapeComm(nranks, rank) if world is None else world
        self._use = use_world(self.world)

    def __enter__(self) -> ShapeComm:
        self._snap = _snapshot(self.model)
        self._handles = []
        self._use.__enter__()
        try:
            rebind(self.model, self.plan)
            self._handles = _tagging(self.model, self.world)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.world.reset_stats()
        self.world.events.clear()
        return self.world

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._use.__exit__(*exc)
        _restore(self._snap)
        return False

    def input(self, shape, dtype=None) -> MetaArray:
        """A shape-only global input (the default dtype unless given)."""
        return MetaArray(tuple(shape), dtype or get_default_dtype())


def shape_only_step(model, in_shape, nranks: int, rank: int = 0, plan=None, labels=None,
                    optimizer=None, sync=None, forward_only: bool = False) -> StepTrace:
    """One training step of ``model`` as rank ``rank`` of ``nranks``, shapes only:
    ``opt.zero_grad(); loss = CrossEntropyLoss()(model(x), labels); loss.backward();
    opt.step()`` inside :class:`shape_only`. A model that returns a tuple of tensors
    (Inception-v3's ``(logits, aux_logits)`` in training mode) gets the sum of their
    cross-entropy losses (the weights of such a sum change no shape and no byte).

    in_shape: the global input shape ``(N, C, H, W)``; plan: a Strategy, its text, or a
    per-layer plan (default: the strategies the model has); labels: ``(N,)`` integer
    classes (default zeros; only their shape matters); optimizer: a callable
    ``params -> Optimizer`` (default SGD with momentum 0.9); sync: a callable
    ``(model, opt) -> GradientSync`` (default: the optimizer's own ``sync_gradients``);
    ``forward_only``: stop after the model's forward (its graph and shapes).

    Raises ``RuntimeError`` naming the layer when the model's code does something that
    needs data (e.g. reads a value) or fails under shape-only execution.
    """
    from .nn import CrossEntropyLoss
    from .optim import SGD

    ctx = shape_only(model, nranks, rank, plan)
    sync_obj = None
    with ctx as world:
        try:
            opt = None
            if not forward_only:
                opt = (optimizer or (lambda ps: SGD(ps, lr=0.1, momentum=0.9)))(
                    model.parameters())
                if sync is not None:
                    sync_obj = sync(model, opt)
                opt.zero_grad()
            x = ctx.input(in_shape)
            with _NodeLog() as log:
                y = _run("forward", lambda: model(x), world)
            outs = tuple(y) if isinstance(y, tuple) else (y,)
            if not outs or not all(isinstance(o, DistTensor) for o in outs):
                raise RuntimeError(f"shape-only execution: the model returned "
                                   f"{type(y).__name__}; the step needs one logits tensor "
                                   f"or a tuple of them")
            index = {id(n): i for i, n in enumerate(log.nodes)}
            out_nodes = tuple(index.get(id(o.grad_fn)) for o in outs)
            y = outs[0]
            if not forward_only:
                lab = np.zeros(in_shape[0], np.int64) if labels is None else labels
                world.tag = ("loss", "")
                loss = CrossEntropyLoss()(y, lab)
                for o in outs[1:]:
                    loss = loss + CrossEntropyLoss()(o, lab)
                _run("backward", loss.backward, world)
                _run("sync", opt._synced_grads, world, tag=("sync", ""))
                _run("step", opt.step, world, tag=("step", ""))
            stats = world.stats()
            for v in stats.values():
                v["time"] = 0.0
            return StepTrace(nranks, rank, stats, list(world.events), log.nodes,
                             tuple(y.shape), out_nodes)
        finally:
            if sync_obj is not None:
                sync_obj.remove()


def _run(phase, fn, world, tag=None):
    if tag is not None:
        world.tag = tag
    try:
        return fn()
    except Exception as e:
        where = world.tag[1] if isinstance(world.tag, tuple) and world.tag[1] else phase
        raise RuntimeError(f"shape-only execution failed in {phase} at {where!r}: "
                           f"{type(e).__name__}: {e}") from e


class _NodeLog:
    """Collects the autograd nodes recorded inside the block."""

    def __enter__(self):
        self.nodes = []
        autograd._RECORDERS.append(self.nodes)
        return self

    def __exit__(self, *exc):
        autograd._RECORDERS.remove(self.nodes)
        return False


def graph_of(nodes) -> list:
    """The recorded DAG as ``[(node name, module, input node indices, out shape)]`` in
    recording order (an input index of ``None``: a graph input)."""
    index = {id(n): i for i, n in enumerate(nodes)}
    out = []
    for n in nodes:
        ins = [index.get(id(p)) if p is not None else None for p, _ in n.edges]
        out.append((n.name, n.module, ins, n.out_shape))
    return out
