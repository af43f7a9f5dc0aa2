"""Optimizers whose state is sharded exactly like their parameters, learning-rate
schedules, and the overlapped, bucketed segmented allreduce of gradients.

Each rank updates only the parameter shards it holds; gradients still pending over
their replica group (the sample groups) are summed first, either by
:class:`GradientSync` (nonblocking, started while backward runs) or, at the latest,
inside :meth:`Optimizer.step`.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict

import numpy as np

from .backend import array_module
from .nn.module import Module, Parameter, sync_gradients
from .tensor import DistTensor


def _params(params):
    if isinstance(params, Module):
        return params.parameters()
    out = []
    for p in params:
        if isinstance(p, tuple):  # (name, Parameter) pairs
            p = p[1]
        if not isinstance(p, Parameter):
            raise TypeError(f"optimizer expects Parameters, got {type(p).__name__}")
        out.append(p)
    if not out:
        raise ValueError("optimizer got an empty parameter list")
    return out


class Optimizer:
    """Base: ``zero_grad()``, ``step()``, ``state_dict()``/``load_state_dict()``.

    ``state[i]`` holds the state arrays of parameter ``i``, local shards of the same
    shape as ``params[i].data.local``.
    """

    def __init__(self, params, defaults: dict):
        self.params = _params(params)
        self.defaults = dict(defaults)
        self.lr = float(defaults["lr"])
        self.state: list[dict] = [dict() for _ in self.params]
        self.sync: GradientSync | None = None
        self.step_count = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _synced_grads(self):
        if self.sync is not None:
            self.sync.wait()
        sync_gradients(self.params)

    def step(self) -> None:
        self._synced_grads()
        self.step_count += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            self._update(i, p.data.local, p.grad.local, self.state[i])

    def _update(self, i, w, g, state):  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- state: local shards; checkpoint.py turns them into global tensors
    def state_tensors(self):
        """``[(param index, key, DistTensor)]`` of the sharded state (same distribution as
        the parameter)."""
        out = []
        for i, (p, st) in enumerate(zip(self.params, self.state)):
            for k, v in st.items():
                out.append((i, k, DistTensor(v, p.data.distribution, p.data.shape)))
        return out

    def load_state_tensors(self, items, step_count: int, check: bool = True) -> None:
        """Replace the state by ``items`` (``[(param index, key, DistTensor)]``, each of the
        parameter's global shape, any distribution) and set ``step_count``. Collective.

        With ``check`` (default) the ranks agree first that ``step_count`` is the same and
        that every state shard holds the same values on all ranks that keep a replica of
        it (a checksum per shard, one small allreduce: :mod:`distconv.replicas`);
        otherwise ``RuntimeError`` on every rank, naming the tensors, and nothing changes.
        """
        from .replicas import replica_mismatches
        items = list(items)
        comm = self.params[0].data.grid.world
        # agreed before the redistributions below (collectives): a list that differs on
        # one rank raises the same ValueError everywhere instead of a hang
        comm.check_same([(int(i), str(k), tuple(t.shape)) for i, k, t in items],
                        "optimizer state items (param index, key, shape)")
        bad = [f"{k!r} of parameter {i}: shape {tuple(t.shape)}" +
               (f", parameter {tuple(self.params[int(i)].shape)}"
                if 0 <= int(i) < len(self.params) else " (no such parameter)")
               for i, k, t in items if not (0 <= int(i) < len(self.params))
               or tuple(t.shape) != tuple(self.params[int(i)].shape)]
        if bad:
            raise ValueError(f"{type(self).__name__}.load_state_tensors: state does not fit "
                             f"the parameters: {'; '.join(bad)}")
        moved = [(int(i), str(k), t.redistribute(self.params[int(i)].data.distribution))
                 for i, k, t in items]
        if check:
            comm.check_same(int(step_count), "optimizer step_count")
            bad = replica_mismatches(comm, [(f"{k!r} of parameter {i}", t)
                                            for i, k, t in moved])
            if bad:
                raise RuntimeError(f"{type(self).__name__}.load_state_tensors: the replicas of "
                                   f"optimizer state {', '.join(bad)} differ between ranks; "
                                   f"every rank must load the same state")
        self.state = [dict() for _ in self.params]
        for i, k, t in moved:
            self.state[i][k] = t.local.copy()
        self.step_count = int(step_count)


class SGD(Optimizer):
    """SGD with momentum, dampening, Nesterov and L2 weight decay — PyTorch's update rule."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False,
                 dampening=0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr, momentum and weight_decay must be >= 0, got "
                             f"{lr}, {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov, dampening=dampening))
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.nesterov, self.dampening = bool(nesterov), float(dampening)

    def _update(self, i, w, g, state):
        if (isinstance(w, np.ndarray) and w.flags.c_contiguous and g.flags.c_contiguous
                and (not self.momentum or "momentum_buffer" in state)):
            _sgd_chunked(w, g, state.get("momentum_buffer"), self.lr, self.momentum,
                         self.weight_decay, self.dampening, self.nesterov)
            return
        d = g if self.weight_decay == 0 else g + self.weight_decay * w
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d.copy()
                state["momentum_buffer"] = buf
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * d
            d = d + self.momentum * buf if self.nesterov else buf
        w -= w.dtype.type(self.lr) * d


_CHUNK = 1 << 15  # elements per cache-resident chunk of the fused SGD update


def _sgd_chunked(w, g, buf, lr, momentum, weight_decay, dampening, nesterov):
    """PyTorch's SGD step on contiguous NumPy arrays ``w``, ``g`` (and momentum ``buf``, all
    of one shape; ``buf`` None when ``momentum`` is 0), in place, in chunks of
    :data:`_CHUNK` elements that stay in cache, so each array is read and written once
    instead of once per numpy operation (the update of ResNet-18 took ~15 % of a batch-2
    step before)::

        d = g + weight_decay * w
        buf = momentum * buf + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf      (d stays g's sum if momentum is 0)
        w -= lr * d

    The same operations in the same order as the whole-array update (bit for bit).
    """
    dt = w.dtype.type
    wf, gf = w.reshape(-1), g.reshape(-1)
    bf = None if buf is None else buf.reshape(-1)
    n = min(_CHUNK, wf.size)
    tmp, tmp2 = np.empty(n, w.dtype), np.empty(n, w.dtype)
    m, a, wd, keep = dt(momentum), dt(lr), dt(weight_decay), dt(1 - dampening)
    for k in range(0, wf.size, _CHUNK):
        wk, gk = wf[k:k + _CHUNK], gf[k:k + _CHUNK]
        t, t2 = tmp[:wk.size], tmp2[:wk.size]
        if weight_decay:
            np.multiply(wk, wd, out=t)
            t += gk
            d = t
        else:
            d = gk
        if bf is not None:
            b = bf[k:k + _CHUNK]
            b *= m
            if dampening:
                np.multiply(d, keep, out=t2)
                b += t2
            else:
                b += d
            if nesterov:
                np.multiply(b, m, out=t2)
                np.add(d, t2, out=t)
                d = t
            else:
                d = b
        np.multiply(d, a, out=t2)
        wk -= t2


def _adam_chunked(w, g, m, v, lr, b1, b2, eps, weight_decay, t):
    """Adam's step ``t`` (as ``torch.optim.Adam``, L2 weight decay added to the gradient)
    on contiguous NumPy arrays of one shape, in place, in chunks of :data:`_CHUNK`
    elements that stay in cache: the same operations in the same order as the
    whole-array update, bit for bit, reading and writing each array once::

        d = g + weight_decay * w
        m = b1 * m + (1 - b1) * d;  v = b2 * v + (1 - b2) * d * d
        w -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)
    """
    dt = w.dtype.type
    wf, gf, mf, vf = (a.reshape(-1) for a in (w, g, m, v))
    n = min(_CHUNK, wf.size)
    t1, t2, t3 = (np.empty(n, w.dtype) for _ in range(3))
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    c1, c2, wd = dt(1 - b1), dt(1 - b2), dt(weight_decay)
    sb2, step, e = dt(math.sqrt(bc2)), dt(lr / bc1), dt(eps)
    fb1, fb2 = dt(b1), dt(b2)
    for k in range(0, wf.size, _CHUNK):
        wk, gk, mk, vk = (a[k:k + _CHUNK] for a in (wf, gf, mf, vf))
        a, b, c = t1[:wk.size], t2[:wk.size], t3[:wk.size]
        if weight_decay:
            np.multiply(wk, wd, out=c)
            c += gk
            gk = c
        mk *= fb1
        np.multiply(gk, c1, out=a)
        mk += a
        vk *= fb2
        np.multiply(gk, c2, out=a)
        a *= gk
        vk += a
        np.sqrt(vk, out=a)
        a /= sb2
        a += e
        np.divide(mk, a, out=b)
        b *= step
        wk -= b


class Adam(Optimizer):
    """Adam (L2 weight decay added to the gradient, as ``torch.optim.Adam``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if lr < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or eps < 0:
            raise ValueError(f"Adam: bad lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.betas, self.eps, self.weight_decay = tuple(betas), float(eps), float(weight_decay)

    def _update(self, i, w, g, state):
        b1, b2 = self.betas
        if "exp_avg" not in state:
            state["exp_avg"] = array_module(w).zeros_like(w)
            state["exp_avg_sq"] = array_module(w).zeros_like(w)
            state["step"] = 0
        m, v = state["exp_avg"], state["exp_avg_sq"]
        state["step"] = state["step"] + 1
        t = int(state["step"])
        if isinstance(w, np.ndarray) and all(a.flags.c_contiguous for a in (w, g, m, v)):
            _adam_chunked(w, g, m, v, self.lr, b1, b2, self.eps, self.weight_decay, t)
            return
        if self.weight_decay:
            g = g + self.weight_decay * w
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        denom = (v ** 0.5) / math.sqrt(bc2) + self.eps
        w -= (self.lr / bc1) * (m / denom)

    def state_tensors(self):
        out = []
        for i, (p, st) in enumerate(zip(self.params, self.state)):
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    out.append((i, k, DistTensor(st[k], p.data.distribution, p.data.shape)))
        return out

    def load_state_tensors(self, items, step_count, check: bool = True):
        super().load_state_tensors(items, step_count, check)
        for st in self.state:
            if "exp_avg" in st:
                st["step"] = self.step_count


# ------------------------------------------------------------------ schedules
class LRScheduler:
    """Sets ``optimizer.lr`` from the base lr and the number of ``step()`` calls."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        self.base_lr = optimizer.defaults["lr"]
        self.last_step = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self) -> None:
        self.last_step += 1
        self.optimizer.lr = self.lr_at(self.last_step)

    def state_dict(self):
        return {"last_step": self.last_step}

    def load_state_dict(self, d):
        """Restore ``{"last_step"}``; ``ValueError`` on every rank if the ranks pass
        different steps (their learning rates, hence their replicas, would differ)."""
        step = int(d["last_step"])
        self.optimizer.params[0].data.grid.world.check_same(step, "LR scheduler last_step")
        self.last_step = step
        self.optimizer.lr = self.lr_at(self.last_step)


class StepLR(LRScheduler):
    """lr = base * gamma ** (step // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        self.step_size, self.gamma = int(step_size), float(gamma)
        super().__init__(optimizer)

    def lr_at(self, step):
        return self.base_lr * self.gamma ** (step // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base - eta_min) * (1 + cos(pi * step / T_max)) / 2."""

    def __init__(self, optimizer, T_max, eta_min=0.0):
        self.T_max, self.eta_min = max(1, int(T_max)), float(eta_min)
        super().__init__(optimizer)

    def lr_at(self, step):
        s = min(step, self.T_max)
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * s /
                                                                            self.T_max)) / 2


class LinearWarmup(LRScheduler):
    """Linear ramp from ``start_factor*base`` to the ``after`` schedule (or base) over
    ``warmup_steps``."""

    def __init__(self, optimizer, warmup_steps, start_factor=0.1, after: LRScheduler = None):
        self.warmup_steps, self.start_factor, self.after = int(warmup_steps), start_factor, after
        super().__init__(optimizer)

    def lr_at(self, step):
        if step < self.warmup_steps:
            f = self.start_factor + (1 - self.start_factor) * step / self.warmup_steps
            return self.base_lr * f
        if self.after is not None:
            return self.after.lr_at(step - self.warmup_steps)
        return self.base_lr


# ------------------------------------------------------------------ overlap
#: bytes of a gradient bucket of :class:`GradientSync` (and of train.py's ``--bucket-kb``)
BUCKET_BYTES = 4 << 20


class BucketPolicy:
    """Which gradients :class:`GradientSync` sends together, as they become ready: one open
    bucket per key (a replica communicator and dtype), in arrival order; a bucket holding
    at least ``bucket_bytes`` is sent at once when ``overlap``, the rest when the step
    waits. The planner's simulator (:func:`distconv.planner.simulate.simulate`) replays
    its gradient allreduces through the same policy."""

    def __init__(self, bucket_bytes: int, overlap: bool = True):
        self.bucket_bytes = int(bucket_bytes)
        self.overlap = bool(overlap)
        self._open: "OrderedDict[object, list]" = OrderedDict()

    def add(self, key, item, nbytes: int):
        """Put ``item`` (``nbytes`` bytes) into ``key``'s bucket: the bucket's items, in
        order, when it is to be sent now, else None."""
        b = self._open.setdefault(key, [[], 0])
        b[0].append(item)
        b[1] += int(nbytes)
        if self.overlap and b[1] >= self.bucket_bytes:
            del self._open[key]
            return b[0]
        return None

    def rest(self) -> list:
        """``[(key, items), ...]`` of the buckets still open, in the order they were
        opened; they are closed."""
        out = [(k, v[0]) for k, v in self._open.items()]
        self._open.clear()
        return out


class GradientSync:
    """Overlap the segmented gradient allreduce with backward.

    Registers a post-accumulate-grad hook on every parameter of ``model``
    (:meth:`distconv.nn.Parameter.register_post_accumulate_grad_hook`): as soon as a
    backward pass has completed a parameter's gradient, a gradient still pending over its
    replica group joins a bucket (one per replica communicator and dtype); a bucket of at
    least ``bucket_bytes`` is sent with a nonblocking allreduce over that replica group
    while earlier layers compute. ``wait()`` (called by :meth:`Optimizer.step`) flushes the
    rest and stores the summed gradients. ``exposed_time`` is the time spent blocked in
    ``wait()``. With ``overlap=False`` the same buckets are sent only in ``wait()``, so their
    whole allreduce time is exposed: the hidden share is
    ``1 - exposed(overlap) / exposed(no overlap)``. ``remove()`` unregisters the hooks.
    """

    def __init__(self, model: Module, optimizer: Optimizer | None = None,
                 bucket_bytes: int = BUCKET_BYTES, overlap: bool = True):
        self.bucket_bytes = int(bucket_bytes)
        self.overlap = overlap
        self._policy = BucketPolicy(bucket_bytes, overlap)
        self._inflight: list = []
        self.exposed_time = 0.0
        self.bytes = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._grad_ready)
                         for p in model.parameters()]
        if optimizer is not None:
            optimizer.sync = self

    def remove(self) -> None:
        """Unregister the hooks (the model's backward no longer starts allreduces)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _grad_ready(self, p):
        g = p.grad
        if g is not None and g.distribution.pending:
            key = (id(g.grid), g.distribution.pending, str(g.dtype))
            full = self._policy.add(key, p, g.local.nbytes)
            if full:
                self._send(full)
        for r in self._inflight:  # let MPI progress the ones in flight
            r[0].test()

    def _send(self, params):
        """Start the allreduce of the gradients of ``params`` (one bucket) as one buffer."""
        g0 = params[0].grad
        parts = [p.grad.local.reshape(-1) for p in params]
        xp = array_module(parts[0])
        flat = xp.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        sub = g0.grid.sub(g0.distribution.pending)
        self.bytes += flat.nbytes
        self._inflight.append((sub.iallreduce(flat), params))

    def wait(self):
        """Finish every bucket; the parameters' ``grad`` become the summed gradients."""
        for _, params in self._policy.rest():
            self._send(params)
        t0 = time.perf_counter()
        for req, params in self._inflight:
            flat = req.wait()
            off = 0
            for p in params:
                n = p.grad.local.size
                p.grad = DistTensor(flat[off:off + n].reshape(p.grad.local.shape),
                                    p.data.distribution, p.data.shape)
                off += n
        self.exposed_time += time.perf_counter() - t0
        self._inflight = []
