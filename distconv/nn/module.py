"""Module and Parameter: the PyTorch-like base of every distributed layer.

A :class:`Module` runs ``forward(x)`` on a :class:`DistTensor` (or a global
array that every rank passes alike). Containers and models write ``forward``
only: every leaf layer (a :class:`Layer`) records one autograd node per call
(:mod:`distconv.autograd`), and ``loss.backward()`` / ``y.backward(dy)`` derive
the backward pass from what was recorded. ``module.backward(dy)`` returns the
input gradient of the module's last call through the same graph. Layers never
call MPI: they state the distribution they need and
:meth:`DistTensor.redistribute` moves the data.

A :class:`Parameter` holds ``data`` and ``grad`` as DistTensors. After a
backward pass ``grad`` is a *pending sum* over the grid axes on which the
weight shard is replicated (the sample groups); :func:`sync_gradients` is the
segmented allreduce that sums each shard only over its replica group.
"""
from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict

import numpy as np

from .. import autograd
from .. import comm as _comm
from ..backend import get_default_dtype, get_xp, to_numpy
from ..distribution import Distribution
from ..meta import is_meta
from ..strategy import Strategy
from ..tensor import DistTensor, local_block, recorded_move

_SEED = [0]
_COUNTER = [0]


def manual_seed(seed: int) -> None:
    """Seed parameter initialisation (every rank must use the same seed)."""
    _SEED[0] = int(seed)
    _COUNTER[0] = 0


def init_rng() -> np.random.Generator:
    """Generator for the next layer's initial weights; identical on every rank."""
    _COUNTER[0] += 1
    return np.random.default_rng([_SEED[0], _COUNTER[0]])


@contextlib.contextmanager
def kept_init_seed():
    """``with kept_init_seed():`` layers built inside do not move the initial weights of
    the layers built after it (the seed and the count of :func:`init_rng` are restored)."""
    saved = (_SEED[0], _COUNTER[0])
    try:
        yield
    finally:
        _SEED[0], _COUNTER[0] = saved


class Parameter:
    """A trainable tensor: ``data`` and ``grad`` are DistTensors of the same distribution.

    ``grad`` is ``None`` until a backward pass; while it still holds per-sample-group
    partial sums its distribution is ``data.distribution`` with ``pending`` replica axes.
    """

    def __init__(self, data: DistTensor):
        self.data = data
        self.grad: DistTensor | None = None
        self._post_accumulate_grad_hooks: "OrderedDict[int, object]" = OrderedDict()

    def register_post_accumulate_grad_hook(self, hook) -> "RemovableHandle":
        """``hook(param)`` runs when a backward pass has added this parameter's last
        gradient contribution (PyTorch's hook of the same name). Returns a handle whose
        ``remove()`` unregisters it."""
        return RemovableHandle(self._post_accumulate_grad_hooks, hook)

    def _grad_complete(self) -> None:
        for h in list(self._post_accumulate_grad_hooks.values()):
            h(self)

    @property
    def shape(self):
        return self.data.shape

    @property
    def distribution(self) -> Distribution:
        return self.data.distribution

    def accumulate(self, local_grad, pending_axes) -> None:
        """Add a local gradient block (pending over ``pending_axes``) to ``grad``."""
        dist = self.data.distribution.replace(pending=pending_axes)
        if self.grad is None or self.grad.distribution != dist:
            if self.grad is not None:
                local_grad = local_grad + self.grad.redistribute(dist).local
            self.grad = DistTensor(local_grad, dist, self.data.shape)
        else:
            self.grad.local += local_grad

    def __repr__(self):
        return f"Parameter(shape={self.shape}, {self.data.distribution})"


def sync_gradients(params) -> None:
    """Segmented allreduce: sum each parameter's pending gradient over its replica group.

    Each shard is summed only over the ranks holding the same shard (``|w|/(c*f)`` elements
    over ``s`` ranks), never over the whole world.
    """
    for p in params:
        if p.grad is not None and p.grad.distribution.pending:
            p.grad = p.grad.redistribute(p.data.distribution)


class RemovableHandle:
    """What a ``register_*_hook`` returns: ``handle.remove()`` unregisters the hook."""

    _ids = itertools.count()

    def __init__(self, hooks: "OrderedDict", hook):
        self.hooks = hooks
        self.id = next(RemovableHandle._ids)
        hooks[self.id] = hook

    def remove(self) -> None:
        self.hooks.pop(self.id, None)


# global inputs converted during the module calls in progress: [raw array, DistTensor]
_CALL_FRAMES: list = []


class Module:
    """Base class: PyTorch-style registration of parameters, buffers and sub-modules."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)
        for name in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks",
                     "_backward_hooks"):
            object.__setattr__(self, name, OrderedDict())
        object.__setattr__(self, "_last_call", None)

    def __setattr__(self, name, value):
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, value: DistTensor) -> None:
        """A non-trainable state tensor saved in the state dict (e.g. running stats)."""
        self._buffers[name] = value
        object.__setattr__(self, name, value)

    def add_module(self, name: str, module: "Module") -> None:
        self._modules[name] = module
        object.__setattr__(self, name, module)

    # ------------------------------------------------------------ running
    def __call__(self, *args, **kwargs):
        for h in list(self._forward_pre_hooks.values()):
            r = h(self, args)
            if r is not None:
                args = r if isinstance(r, tuple) else (r,)
        x = args[0] if args else None
        frame = None
        if x is not None and not isinstance(x, DistTensor):
            frame = [x, None]
            _CALL_FRAMES.append(frame)
        try:
            y = self.forward(*args, **kwargs)
        finally:
            if frame is not None:
                _CALL_FRAMES.pop()
        _check_output(self, y)
        if autograd.is_grad_enabled():
            inp = x if isinstance(x, DistTensor) else (frame[1] if frame else None)
            object.__setattr__(self, "_last_call", (inp, y))
        for h in list(self._forward_hooks.values()):
            r = h(self, args, y)
            if r is not None:
                y = r
        return y

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def backward(self, dy):
        """The input gradient of this module's last call: ``dy`` (the output's gradient, a
        DistTensor or the same global array on every rank) backpropagated through the
        nodes that call recorded. Parameter gradients accumulate as in ``loss.backward()``.
        Returns dx in the input's distribution (``None`` if the input was not a tensor)."""
        last = self._last_call
        if last is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward (or "
                               f"its forward ran under dc.no_grad())")
        x, y = last
        if not isinstance(y, DistTensor):
            raise RuntimeError(f"{type(self).__name__}.backward: the last call returned "
                               f"{type(y).__name__}; use y.backward(dy) on its outputs")
        dy = as_dist(dy, y.distribution.replace(pending=()))
        if tuple(dy.shape) != tuple(y.shape):
            raise ValueError(f"{type(self).__name__}.backward: dy has shape {dy.shape}, "
                             f"expected the output shape {tuple(y.shape)}")
        if y is x:
            return dy.redistribute(x.distribution.replace(pending=()))
        if y.grad_fn is None:
            raise RuntimeError(f"{type(self).__name__}.backward: the output of the last call "
                               f"was not recorded (forward under dc.no_grad()?)")
        grads = autograd.backward([y], [dy], inputs=[x] if x is not None else None)
        dx = grads[0] if x is not None else None
        if dx is not None:
            dx = dx._move(x.distribution.replace(pending=()))
        return dx

    # ------------------------------------------------------------ hooks
    def register_forward_pre_hook(self, hook) -> RemovableHandle:
        """``hook(module, args)`` before every call; may return replacement args."""
        return RemovableHandle(self._forward_pre_hooks, hook)

    def register_forward_hook(self, hook) -> RemovableHandle:
        """``hook(module, args, output)`` after every call; may return a new output."""
        return RemovableHandle(self._forward_hooks, hook)

    def register_full_backward_pre_hook(self, hook) -> RemovableHandle:
        """``hook(module, grad_output)`` before the backward of each recorded call of this
        module; may return a replacement ``grad_output``. Leaf layers only (the modules
        that record autograd nodes); on a container it never fires."""
        return RemovableHandle(self._backward_pre_hooks, hook)

    def register_full_backward_hook(self, hook) -> RemovableHandle:
        """``hook(module, grad_input, grad_output)`` after the backward of each recorded call
        of this module (leaf layers only), once its parameter gradients are complete."""
        return RemovableHandle(self._backward_hooks, hook)

    def train(self, mode: bool = True) -> "Module":
        object.__setattr__(self, "training", bool(mode))
        for m in self._modules.values():
            m.train(mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # ------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def children(self):
        return iter(self._modules.values())

    def named_parameters(self, prefix: str = ""):
        """``(name, Parameter)`` pairs with PyTorch's dotted names."""
        for mname, m in self.named_modules(prefix):
            for pname, p in m._parameters.items():
                yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = ""):
        for mname, m in self.named_modules(prefix):
            for bname, b in m._buffers.items():
                yield (f"{mname}.{bname}" if mname else bname), b

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # ------------------------------------------------------------ state
    _version = 1  # state-dict format version of this module type (torch's ``_version``)

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Global NumPy arrays under PyTorch key names (parameters, then buffers per module).

        Like torch, the dict carries ``_metadata`` (``{module name: {"version": v}}``), so
        :meth:`load_state_dict` can tell an older format from a missing key.
        """
        out = OrderedDict()
        out._metadata = OrderedDict()
        for mname, m in self.named_modules():
            out._metadata[mname] = {"version": type(m)._version}
            pre = f"{mname}." if mname else ""
            for pname, p in m._parameters.items():
                out[pre + pname] = np.array(to_numpy(p.data.to_global()), copy=True)
            for bname, b in m._buffers.items():
                out[pre + bname] = np.array(to_numpy(b.to_global()), copy=True)
        return out

    def load_state_dict(self, state_dict, strict: bool = True, *, check_values: bool = True):
        """Load global arrays (PyTorch names and layouts); each rank keeps only its shard.

        ``state_dict``: a mapping ``{key: array}``, each array of the GLOBAL shape of that
        parameter or buffer (e.g. conv weight ``(F, C, kh, kw)``), the same on every rank.

        PyTorch's semantics: returns ``_IncompatibleKeys(missing_keys, unexpected_keys)``;
        with ``strict`` (default) missing or unexpected keys raise ``RuntimeError`` with
        torch's wording ("Error(s) in loading state_dict for <Class>: Missing key(s) in
        state_dict: ...", one line per problem); a wrong shape raises whatever ``strict``
        is ("size mismatch for k: copying a param with shape torch.Size([...]) from
        checkpoint, the shape in current model is torch.Size([...])"). Older formats
        torch loads are accepted: a 0-d tensor given as shape (1,), and a BatchNorm2d
        dict without
        ``num_batches_tracked`` when its ``_metadata`` version is absent or < 2 (the
        current count is kept). Values may be NumPy, CuPy or (CPU) torch arrays, in any
        dtype (cast to the parameter's).

        Unlike torch, loading is all-or-nothing and collective: every rank checks its
        dict, then the ranks agree, so a bad dict on any rank raises the same error on
        every rank and changes nothing. Every rank must pass the same values: a 64-bit
        checksum of each array is compared across ranks (one allreduce of 16 bytes per
        key), and keys whose values (or presence) differ raise ``RuntimeError`` naming
        them, so replicas never diverge (``benchmarks/replicas.md`` has the cost).
        ``check_values=False`` skips that comparison, for a caller that has already shown
        the dict to be identical on every rank (checkpoint loading compares the file's
        checksum).
        """
        from .state import load_state
        return load_state(self, state_dict, strict, check_values)

    def _upgrade_state(self, state, prefix, version) -> None:
        """Rewrite this module's entries of an older state-dict format in ``state`` in
        place (torch's ``_load_from_state_dict`` compatibility code); ``version``: the
        module's ``_metadata`` version or ``None``. The base class has nothing to do."""

    # ------------------------------------------------------------ strategies
    def set_strategy(self, strategy_or_plan) -> "Module":
        """Re-shard every layer to a :class:`Strategy`, or a plan ``{module name: Strategy}``
        (names as in :meth:`named_modules`; ``""`` is the default for unnamed layers)."""
        if isinstance(strategy_or_plan, (Strategy, str)) or strategy_or_plan is None:
            plan = {"": as_strategy(strategy_or_plan)}
        else:
            plan = {k: as_strategy(v) for k, v in dict(strategy_or_plan).items()}
        known = {n for n, _ in self.named_modules()}
        unknown = [k for k in plan if k not in known]
        if unknown:
            raise ValueError(f"plan names layers that do not exist: {unknown}")
        # up front, before any layer moves its weights: every placement fits the job and
        # every rank was given the same plan (a placement seen differently by two ranks
        # would leave one waiting in a collective the other never joins)
        world = _comm.world()
        for s in plan.values():
            if s is not None and s.ranks is not None:
                s.check(world.size)
        world.check_same(sorted((k, str(v)) for k, v in plan.items()),
                         "the plan given to set_strategy (name, strategy)")
        default = plan.get("")
        for name, m in self.named_modules():
            s = plan_entry(plan, name, default)
            if s is not None and hasattr(m, "_apply_strategy"):
                m._apply_strategy(s)
        return self


def _check_output(module, y) -> None:
    """A module returns a DistTensor (or a tuple/list of them); anything else is an error."""
    items = y if isinstance(y, (tuple, list)) else (y,)
    bad = [type(v).__name__ for v in items if not isinstance(v, DistTensor)]
    if bad or not items:
        raise TypeError(f"{type(module).__name__}.forward returned {type(y).__name__}"
                        f"{' holding ' + ', '.join(bad) if bad and items is y else ''}; a module "
                        f"must return a DistTensor (or a tuple of DistTensors) so that its "
                        f"backward can be derived")


class Layer(Module):
    """A leaf layer: each call records one autograd node with its own saved state.

    Subclasses define ``_input(x)`` (the input as a DistTensor; a global array is cut
    with the layer's input distribution), ``_forward(x, save) -> (y, ctx)`` (``save``:
    whether ``ctx`` must hold what backward needs) and ``_backward(ctx, dy, need_dx)``,
    which adds the parameter gradients and returns dx in ``x``'s distribution (or None
    when not ``need_dx``). The forward and backward bodies run with recording off.
    """

    def forward(self, x):
        x = self._input(x)
        rec = autograd.is_grad_enabled()
        with autograd.set_grad_enabled(False):
            y, ctx = self._forward(x, rec)
        if rec:
            autograd.record(type(self).__name__, _LayerBackward(self, ctx), [x], y,
                            [p for p in self._parameters.values() if p is not None], self)
        return y

    def _input(self, x) -> DistTensor:
        return as_dist(x, self.input_distribution)


class _LayerBackward:
    __slots__ = ("layer", "ctx")

    def __init__(self, layer, ctx):
        self.layer, self.ctx = layer, ctx

    def __call__(self, dy, needs):
        ctx, self.ctx = self.ctx, None
        return (self.layer._backward(ctx, dy, needs[0]),)


def _agree_local(ok, message, exc):
    if not ok:
        raise exc(message)


def as_strategy(s):
    """A :class:`Strategy` from a Strategy, its text, or None (the default ``Strategy()``)."""
    if s is None or isinstance(s, Strategy):
        return s if s is not None else Strategy()
    return Strategy.parse(s)


def plan_entry(plan, name, default):
    """The plan entry of ``name`` or of its closest named ancestor, else ``default``."""
    while True:
        if name in plan:
            return plan[name]
        if not name:
            return default
        name = name.rpartition(".")[0]


# ------------------------------------------------------------------ helpers
def as_dist(x, dist: Distribution) -> DistTensor:
    """``x`` as a DistTensor: a DistTensor passes through; a global array is cut with ``dist``.

    Inside a module call, the same global array is turned into one tensor only: a second
    conversion (e.g. a residual block's shortcut) reuses it, moved to ``dist``, so the
    input gradient of the call collects both paths."""
    if isinstance(x, DistTensor):
        return x
    for frame in _CALL_FRAMES:
        if frame[0] is x and frame[1] is not None:
            return recorded_move(frame[1], dist)
    if is_meta(x):  # a shape-only global input (distconv.trace)
        t = DistTensor.from_global(x, dist)
    else:
        arr = x if hasattr(x, "__array_interface__") or hasattr(x, "__cuda_array_interface__") \
            else np.asarray(x)
        t = DistTensor.from_global(get_xp().asarray(arr), dist)
    for frame in _CALL_FRAMES:
        if frame[0] is x:
            frame[1] = t
    return t


def call_input(x) -> DistTensor:
    """The DistTensor that the global array ``x`` became inside the module call in progress
    (the first layer that read it cut it); ``x`` itself if it is a DistTensor. A container
    whose second path reads the same input (a residual shortcut) takes it from here."""
    if isinstance(x, DistTensor):
        return x
    for frame in _CALL_FRAMES:
        if frame[0] is x and frame[1] is not None:
            return frame[1]
    raise RuntimeError("call_input: the global input was not converted by any layer yet; "
                       "convert it with DistTensor.from_global first")


def check_dtype(x: DistTensor, dtype, what: str) -> None:
    if x.dtype != dtype:
        raise TypeError(f"{what}: input dtype {x.dtype} does not match parameter dtype {dtype}; "
                        f"convert the input or call dc.set_default_dtype before building layers")


def new_param(global_array: np.ndarray, dist: Distribution) -> Parameter:
    """A Parameter holding this rank's shard of ``global_array`` (same on every rank)."""
    local = local_block(np.asarray(global_array), dist)  # a MetaArray off a placed grid
    if not is_meta(local):
        local = get_xp().asarray(local)
    return Parameter(DistTensor(local, dist, global_array.shape))


def default_dtype():
    return get_default_dtype()
