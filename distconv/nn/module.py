"""Module and Parameter: the PyTorch-like base of every distributed layer.

A :class:`Module` runs ``forward(x)`` on a :class:`DistTensor` (or a global
array that every rank passes alike) and ``backward(dy)`` returning ``dx`` in
the distribution its forward input had. Layers never call MPI: they state the
distribution they need and :meth:`DistTensor.redistribute` moves the data.

A :class:`Parameter` holds ``data`` and ``grad`` as DistTensors. After a
backward pass ``grad`` is a *pending sum* over the grid axes on which the
weight shard is replicated (the sample groups); :func:`sync_gradients` is the
segmented allreduce that sums each shard only over its replica group.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..backend import get_default_dtype, get_xp, to_numpy
from ..distribution import Distribution
from ..strategy import Strategy
from ..tensor import DistTensor

_SEED = [0]
_COUNTER = [0]


def manual_seed(seed: int) -> None:
    """Seed parameter initialisation (every rank must use the same seed)."""
    _SEED[0] = int(seed)
    _COUNTER[0] = 0


def _init_rng() -> np.random.Generator:
    """Generator for the next layer's initial weights; identical on every rank."""
    _COUNTER[0] += 1
    return np.random.default_rng([_SEED[0], _COUNTER[0]])


class Parameter:
    """A trainable tensor: ``data`` and ``grad`` are DistTensors of the same distribution.

    ``grad`` is ``None`` until a backward pass; while it still holds per-sample-group
    partial sums its distribution is ``data.distribution`` with ``pending`` replica axes.
    """

    def __init__(self, data: DistTensor):
        self.data = data
        self.grad: DistTensor | None = None

    @property
    def shape(self):
        return self.data.shape

    @property
    def distribution(self) -> Distribution:
        return self.data.distribution

    def accumulate(self, local_grad, pending_axes) -> None:
        """Add a local gradient block (pending over ``pending_axes``) to ``grad``."""
        dist = self.data.distribution.replace(pending=tuple(pending_axes))
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


def start_gradient_sync(param):
    """Nonblocking segmented allreduce of one parameter's gradient.

    Returns a request whose ``wait()`` stores the summed gradient in ``param.grad``
    (``None`` if nothing is pending).
    """
    g = param.grad
    if g is None or not g.distribution.pending:
        return None
    sub = g.grid.sub(g.distribution.pending)
    req = sub.iallreduce(g.local)
    target = param.data.distribution

    class _Sync:
        def wait(self):
            param.grad = DistTensor(req.wait(), target, g.shape)

    return _Sync()


class Module:
    """Base class: PyTorch-style registration of parameters, buffers and sub-modules."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

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
    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def backward(self, dy):
        raise NotImplementedError(f"{type(self).__name__} does not define backward")

    def _saved_state(self):
        """What forward saved for backward; ``RuntimeError`` if forward has not run."""
        saved = getattr(self, "_saved", None)
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return saved

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
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Global NumPy arrays under PyTorch key names (parameters, then buffers per module)."""
        out = OrderedDict()
        for mname, m in self.named_modules():
            pre = f"{mname}." if mname else ""
            for pname, p in m._parameters.items():
                out[pre + pname] = np.array(to_numpy(p.data.to_global()), copy=True)
            for bname, b in m._buffers.items():
                out[pre + bname] = np.array(to_numpy(b.to_global()), copy=True)
        return out

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Load global arrays (PyTorch names and layouts); each rank keeps only its shard.

        ``KeyError`` lists missing/unexpected keys when ``strict``; ``ValueError`` names a key
        whose shape differs.
        """
        own = OrderedDict()
        for mname, m in self.named_modules():
            pre = f"{mname}." if mname else ""
            for pname in m._parameters:
                own[pre + pname] = (m, pname, "p")
            for bname in m._buffers:
                own[pre + bname] = (m, bname, "b")
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        tensors = [m._parameters[n].data if kd == "p" else m._buffers[n]
                   for m, n, kd in own.values()]
        # every rank checks, then all agree before any collective: a state dict that is bad
        # on one rank only raises everywhere instead of leaving the others in from_global
        agree = tensors[0].grid.comm.agree if tensors else _agree_local
        bad_keys = strict and bool(missing or unexpected)
        agree(not bad_keys, f"load_state_dict: missing keys {missing}, unexpected keys "
                            f"{unexpected}", KeyError)
        bad = [f"{k!r} has shape {tuple(np.shape(state[k]))}, expected {tuple(t.shape)}"
               for k, t in zip(own, tensors)
               if k in state and tuple(np.shape(state[k])) != tuple(t.shape)]
        agree(not bad, "load_state_dict: " + "; ".join(bad), ValueError)
        xp = get_xp()
        for k, (m, name, kind) in own.items():
            if k not in state:
                continue
            cur = m._parameters[name].data if kind == "p" else m._buffers[name]
            arr = np.asarray(to_numpy(state[k]))
            arr = xp.asarray(arr.astype(cur.dtype, copy=False))
            new = DistTensor.from_global(arr, cur.distribution)
            if kind == "p":
                m._parameters[name].data = new
            else:
                m._buffers[name] = new
                object.__setattr__(m, name, new)

    # ------------------------------------------------------------ strategies
    def set_strategy(self, strategy_or_plan) -> "Module":
        """Re-shard every layer to a :class:`Strategy`, or a plan ``{module name: Strategy}``
        (names as in :meth:`named_modules`; ``""`` is the default for unnamed layers)."""
        if isinstance(strategy_or_plan, (Strategy, str)) or strategy_or_plan is None:
            plan = {"": _as_strategy(strategy_or_plan)}
        else:
            plan = {k: _as_strategy(v) for k, v in dict(strategy_or_plan).items()}
        known = {n for n, _ in self.named_modules()}
        unknown = [k for k in plan if k not in known]
        if unknown:
            raise ValueError(f"plan names layers that do not exist: {unknown}")
        default = plan.get("")
        for name, m in self.named_modules():
            s = _lookup(plan, name, default)
            if s is not None and hasattr(m, "_apply_strategy"):
                m._apply_strategy(s)
        return self


def _agree_local(ok, message, exc):
    if not ok:
        raise exc(message)


def _as_strategy(s):
    if s is None or isinstance(s, Strategy):
        return s if s is not None else Strategy()
    return Strategy.parse(s)


def _lookup(plan, name, default):
    """The plan entry of ``name`` or of its closest named ancestor, else ``default``."""
    while True:
        if name in plan:
            return plan[name]
        if not name:
            return default
        name = name.rpartition(".")[0]


# ------------------------------------------------------------------ helpers
def as_dist(x, dist: Distribution) -> DistTensor:
    """``x`` as a DistTensor: a DistTensor passes through; a global array is cut with ``dist``."""
    if isinstance(x, DistTensor):
        return x
    xp = get_xp()
    arr = x if hasattr(x, "__array_interface__") or hasattr(x, "__cuda_array_interface__") \
        else np.asarray(x)
    return DistTensor.from_global(xp.asarray(arr), dist)


def check_dtype(x: DistTensor, dtype, what: str) -> None:
    if x.dtype != dtype:
        raise TypeError(f"{what}: input dtype {x.dtype} does not match parameter dtype {dtype}; "
                        f"convert the input or call dc.set_default_dtype before building layers")


def new_param(global_array: np.ndarray, dist: Distribution) -> Parameter:
    """A Parameter holding this rank's shard of ``global_array`` (same on every rank)."""
    xp = get_xp()
    # np.array, not np.ascontiguousarray: that one turns a 0-d block (e.g. BN's
    # num_batches_tracked) into shape (1,)
    local = xp.asarray(np.array(global_array[dist.slices(global_array.shape)], order="C"))
    return Parameter(DistTensor(local, dist, global_array.shape))


def default_dtype():
    return get_default_dtype()
