"""Shared helpers of the layer tests: PyTorch float64 references and tolerant comparison.

* :func:`strategies` lists every ``Strategy(sample, channel, filter)`` that fits ``p`` ranks.
* :func:`to_torch` builds the PyTorch float64 twin of a distconv module tree (same class
  names, same sub-module names) and loads ``model.state_dict()`` into it, strictly, so the
  keys are checked against PyTorch's on the way.
* :class:`Report` collects mismatches instead of raising at the first one, so a case can
  check many things and a negative control can assert that a mismatch IS reported;
  :meth:`Report.assert_ok` agrees over all ranks before failing (no rank is left hanging).
* :func:`compare_model` runs forward, backward (``dy`` or a CrossEntropyLoss) and
  ``sync_gradients`` on a distconv model and its torch twin and checks y, dx, every
  parameter gradient and every buffer (running statistics).

Tolerances: normwise relative error ``max|a - e| / max|e|`` below 1e-10 in float64 and
1e-4 in float32 (the reference is always float64, fed the same float32-rounded data).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from distconv import nn
from distconv.backend import get_default_dtype, to_numpy
from distconv.distribution import block_range
from distconv.strategy import Strategy
from distconv.tensor import DistTensor

torch.set_num_threads(1)

RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}


# --------------------------------------------------------------------------- strategies
def strategies(p: int) -> list:
    """Every ``Strategy(sample=s, channel=c, filter=f)`` with ``s*c*f == p``."""
    out = []
    for s in range(1, p + 1):
        for c in range(1, p + 1):
            if p % (s * c) == 0:
                out.append(Strategy(sample=s, channel=c, filter=p // (s * c)))
    return out


def label(s: Strategy) -> str:
    return f"s{s.sample}c{s.channel}f{s.filter}"


def world_size() -> int:
    from mpi4py import MPI
    return MPI.COMM_WORLD.size


# --------------------------------------------------------------------------- comparison
def rel_err(actual, expected) -> float:
    """Normwise relative error ``max|a - e| / max|e|`` (absolute if ``e`` is all zero)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if e.size == 0:
        return 0.0
    diff = float(np.abs(a - e).max())
    if not np.isfinite(diff):
        return float("inf")
    scale = float(np.abs(e).max())
    return diff if scale == 0 else diff / scale


class Report:
    """Collects ``what: problem`` lines; ``assert_ok(comm)`` fails on every rank if any rank
    has one."""

    def __init__(self):
        self.errors: list[str] = []
        self.checked = 0
        self.worst = 0.0

    def fail(self, msg: str) -> None:
        self.errors.append(msg)

    def check(self, what, actual, expected, tol=None, dtype=None) -> bool:
        """Compare ``actual`` to ``expected``; ``dtype`` (default: the default dtype) is the
        dtype ``actual`` must have (``False``: do not check)."""
        self.checked += 1
        a = np.asarray(to_numpy(actual))
        e = np.asarray(expected.detach().numpy() if torch.is_tensor(expected) else expected)
        want = np.dtype(get_default_dtype()) if dtype is None else dtype
        tol = RTOL[np.dtype(get_default_dtype())] if tol is None else tol
        if a.shape != e.shape:
            self.fail(f"{what}: shape {a.shape} != expected {e.shape}")
            return False
        if want is not False and a.dtype != np.dtype(want):
            self.fail(f"{what}: dtype {a.dtype} != {np.dtype(want)}")
            return False
        err = rel_err(a, e)
        self.worst = max(self.worst, err)
        if not err <= tol:
            self.fail(f"{what}: relative error {err:.3e} > {tol:.0e}")
            return False
        return True

    def expect(self, what, cond, detail="") -> bool:
        self.checked += 1
        if not cond:
            self.fail(f"{what}{': ' + detail if detail else ''}")
        return bool(cond)

    def merged(self, comm) -> list:
        """Every rank's errors (rank-tagged when they differ), identical on every rank."""
        per = comm.allgather(self.errors)
        if all(p == per[0] for p in per):
            return list(per[0])
        return [f"rank {r}: {m}" for r, p in enumerate(per) for m in p]

    def assert_ok(self, comm, header="") -> None:
        errs = self.merged(comm)
        assert not errs, (header + "\n" if header else "") + f"{len(errs)} mismatch(es) of " \
            f"{self.checked} checks:\n  " + "\n  ".join(errs)


# --------------------------------------------------------------------------- torch twins
def _floor1_chunks(x, parts):
    """Cut ``x`` on dim 0 into ``parts`` floor+1 blocks (as distconv's sample groups)."""
    n = x.shape[0]
    return [x[slice(*block_range(n, parts, i))] for i in range(parts)]


class GroupBatchNorm2d(torch.nn.BatchNorm2d):
    """Reference of ``BatchNorm2d(global_stats=False)``: batch statistics per sample group
    (floor+1 blocks of N); the running statistics move by the average of the groups'
    mean and unbiased variance."""

    def __init__(self, groups, *args, **kw):
        super().__init__(*args, **kw)
        self.groups = groups

    def forward(self, x):
        if not (self.training or not self.track_running_stats):
            return super().forward(x)
        ys, means, vars_ = [], [], []
        for xg in _floor1_chunks(x, self.groups):
            ys.append(F.batch_norm(xg, None, None, self.weight, self.bias, True, 0.0, self.eps))
            means.append(xg.detach().mean(dim=(0, 2, 3)))
            vars_.append(xg.detach().var(dim=(0, 2, 3), unbiased=True))
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                mom = self.momentum if self.momentum is not None \
                    else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - mom).add_(mom * torch.stack(means).mean(0))
                self.running_var.mul_(1 - mom).add_(mom * torch.stack(vars_).mean(0))
        return torch.cat(ys)


class TorchResidual(torch.nn.Module):
    def __init__(self, body, shortcut=None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x):
        return self.body(x) + (x if self.shortcut is None else self.shortcut(x))


class TorchDropout(torch.nn.Module):
    """Reference of ``nn.Dropout``: torch's scaling with distconv's mask of the whole tensor
    (:func:`distconv.ops.dropout_mask` over the full index range), the same seed, and its
    own count of training calls starting at the distconv module's ``step`` when built."""

    def __init__(self, m):
        super().__init__()
        self.p, self.seed, self.step = m.p, m.seed, m.step

    def forward(self, x):
        from distconv.ops import dropout_mask
        if not self.training or self.p == 0.0:
            return x
        mask = dropout_mask(tuple(x.shape), [slice(0, n) for n in x.shape], self.p, self.seed,
                            self.step, np.float64)
        self.step += 1
        return x * torch.from_numpy(mask)


def torch_module(m, nranks=None):
    """The torch float64 module of the same structure as distconv module ``m`` (weights
    not loaded)."""
    if isinstance(m, nn.Conv2d):
        t = torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                            m.padding, m.dilation, bias=m.bias is not None)
    elif isinstance(m, nn.Linear):
        t = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    elif isinstance(m, nn.BatchNorm2d):
        kw = dict(eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats)
        if m.global_stats:
            t = torch.nn.BatchNorm2d(m.num_features, **kw)
        else:
            s = m.strategy.resolve(nranks or world_size())[0]
            t = GroupBatchNorm2d(s, m.num_features, **kw)
    elif isinstance(m, nn.ReLU):
        t = torch.nn.ReLU()
    elif isinstance(m, nn.MaxPool2d):
        t = torch.nn.MaxPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
    elif isinstance(m, nn.AvgPool2d):
        t = torch.nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode,
                               count_include_pad=m.count_include_pad)
    elif isinstance(m, nn.AdaptiveAvgPool2d):
        t = torch.nn.AdaptiveAvgPool2d(m.output_size)
    elif isinstance(m, nn.Dropout):
        t = TorchDropout(m)
    elif isinstance(m, nn.Flatten):
        t = torch.nn.Flatten()
    elif isinstance(m, nn.Sequential):
        t = torch.nn.Sequential(OrderedDict((k, torch_module(c, nranks))
                                            for k, c in m._modules.items()))
    elif isinstance(m, nn.Residual):
        t = TorchResidual(torch_module(m.body, nranks),
                          None if m.shortcut is None else torch_module(m.shortcut, nranks))
    else:
        raise TypeError(f"no torch twin for {type(m).__name__}")
    return t.double()


def to_torch_state(sd) -> "OrderedDict[str, torch.Tensor]":
    """Global numpy state dict -> torch tensors (floats as float64)."""
    out = OrderedDict()
    for k, v in sd.items():
        a = np.asarray(v)
        out[k] = torch.tensor(a.astype(np.float64) if a.dtype.kind == "f" else a)
    return out


def to_torch(model, state=None):
    """Torch float64 twin of ``model`` holding ``state`` (default ``model.state_dict()``);
    strict loading: the distconv keys must be exactly PyTorch's."""
    t = torch_module(model)
    t.load_state_dict(to_torch_state(model.state_dict() if state is None else state), strict=True)
    return t


def randomize(model, seed, scale=1.0):
    """Load random values into every float entry of ``model``'s state dict (same on all
    ranks; variances positive); returns the new state dict."""
    rng = np.random.default_rng(seed)
    sd = model.state_dict()
    for k, v in sd.items():
        if v.dtype.kind != "f":
            continue
        if k.endswith("running_var"):
            new = rng.uniform(0.5, 2.0, v.shape)
        elif k.endswith("running_mean"):
            new = rng.standard_normal(v.shape) * 0.5
        elif k.endswith("weight") and v.ndim == 1:  # batch-norm scale: away from zero
            new = rng.uniform(0.5, 1.5, v.shape) * rng.choice([-1, 1], v.shape)
        else:
            new = rng.standard_normal(v.shape) * scale / np.sqrt(max(1, v[0].size))
        sd[k] = new.astype(v.dtype)
    model.load_state_dict(sd)
    return model.state_dict()


def draw(shape, seed, dtype=None):
    """Standard normal array of the default dtype, the same on every rank."""
    dt = get_default_dtype() if dtype is None else dtype
    return np.random.default_rng(seed).standard_normal(shape).astype(dt)


def labels_for(n, k, seed):
    return np.random.default_rng(seed).integers(0, k, size=n).astype(np.int64)


# --------------------------------------------------------------------------- the check
def compare_model(model, xs, report, what, *, tmodel=None, x_dist=None, dy_seed=1000,
                  labels=None, dy_dist=None, grads=True, buffers=True, out_dist=None):
    """Run ``model`` and its torch twin on each input of ``xs`` (one step each, gradients
    zeroed before each) and record every mismatch in ``report``.

    ``x_dist``: pass the input as a DistTensor of that distribution (else the global array);
    ``labels``: end with CrossEntropyLoss(labels) instead of a random ``dy``; ``dy_dist``:
    pass ``dy`` as a DistTensor of that distribution; ``out_dist``: the distribution y must
    have. Returns ``(y, dx, {name: grad})`` of the last step (global numpy arrays).
    """
    if not isinstance(xs, (list, tuple)):
        xs = [xs]
    if tmodel is None:
        tmodel = to_torch(model)
    out = None
    for step, x in enumerate(xs):
        tag = f"{what} step{step}" if len(xs) > 1 else what
        model.zero_grad()
        tmodel.zero_grad(set_to_none=True)
        xin = x if x_dist is None else DistTensor.from_global(x, x_dist)
        y = model(xin)
        yg = np.asarray(to_numpy(y.to_global()))
        xt = torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
        yt = tmodel(xt)
        report.check(f"{tag} y", yg, yt)
        if out_dist is not None:
            report.expect(f"{tag} y distribution", y.distribution == out_dist,
                          f"{y.distribution} != {out_dist}")
        if labels is not None:
            crit = nn.CrossEntropyLoss()
            loss = crit(y, labels)
            lt = F.cross_entropy(yt, torch.tensor(labels))
            report.check(f"{tag} loss", np.float64(loss), lt, dtype=False)
            dy = crit.backward()
            report.check(f"{tag} dlogits", np.asarray(to_numpy(dy.to_global())),
                         torch.autograd.grad(lt, yt, retain_graph=True)[0])
            lt.backward()
        else:
            dyg = draw(yg.shape, dy_seed + step)
            dy = dyg if dy_dist is None else DistTensor.from_global(dyg, dy_dist)
            yt.backward(torch.tensor(dyg.astype(np.float64)))
        dx = model.backward(dy)
        dxg = np.asarray(to_numpy(dx.to_global()))
        report.check(f"{tag} dx", dxg, xt.grad)
        if x_dist is not None:
            report.expect(f"{tag} dx distribution", dx.distribution == x_dist,
                          f"{dx.distribution} != {x_dist}")
        gout = {}
        if grads:
            nn.sync_gradients(model.parameters())
            tparams = dict(tmodel.named_parameters())
            names = [n for n, _ in model.named_parameters()]
            report.expect(f"{tag} parameter names", names == list(tparams),
                          f"{names} != {list(tparams)}")
            for name, p in model.named_parameters():
                tp = tparams.get(name)
                if tp is None:
                    continue
                if p.grad is None:
                    report.fail(f"{tag} grad {name}: None after backward")
                    continue
                report.expect(f"{tag} grad {name} synced", not p.grad.distribution.pending,
                              f"still pending over {p.grad.distribution.pending}")
                g = np.asarray(to_numpy(p.grad.to_global()))
                ref = tp.grad if tp.grad is not None else torch.zeros_like(tp)
                report.check(f"{tag} grad {name}", g, ref)
                gout[name] = g
        if buffers:
            tsd = tmodel.state_dict()
            for k, v in model.state_dict().items():
                if k.endswith("num_batches_tracked"):
                    report.expect(f"{tag} {k}", int(v) == int(tsd[k]), f"{int(v)} != {int(tsd[k])}")
                elif k in dict(tmodel.named_buffers()):
                    report.check(f"{tag} {k}", v, tsd[k])
        out = (yg, dxg, gout)
    return out
