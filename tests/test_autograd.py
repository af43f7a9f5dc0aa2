"""Define-by-run autograd against torch autograd (float64, 1-4 ranks, mixed strategies).

The model is a user-defined DAG the library has never seen: a stem, two branches joined
by ``dc.cat`` (uneven channel counts, so the output's blocks differ from the inputs'), a
residual ``a + b`` across strategies, and one conv called twice (shared weights). Its
logits, loss, the input gradient (``x.requires_grad``) and every parameter gradient must
equal torch's to 1e-10, through ``loss.backward()`` and through ``y.backward(dy)``. A
negative control breaks the summation of gradients at a tensor with two consumers and
checks that the comparison fails. Also: ``dc.cat`` values, adjoint and exact bytes,
post-accumulate-grad hooks, ``no_grad``, and the bad-input errors.
"""
import numpy as np
import pytest

from tests.mpi_harness import mpi

RANKS = (1, 2, 3, 4)
T = 120


def _f64():
    from distconv.backend import set_default_dtype
    set_default_dtype(np.float64)


def _plan(p, k):
    """The k-th strategy of every (s, c, f) with s*c*f == p (rotates through them)."""
    from tests.torch_ref import strategies
    sts = strategies(p)
    return sts[k % len(sts)]


def _dag_model(p, shift=0):
    import distconv as dc
    from distconv import nn

    class Dag(nn.Module):
        """stem -> [1x1 conv | 3x3 conv-BN-ReLU] -> cat -> shared conv twice (+ residual)
        -> gap -> flatten -> linear. x: (N, 3, H, W) -> logits (N, 5)."""

        def __init__(self):
            super().__init__()
            st = [_plan(p, shift + i) for i in range(6)]
            self.stem = nn.Conv2d(3, 6, 3, padding=1, strategy=st[0])
            self.b1 = nn.Conv2d(6, 3, 1, strategy=st[1])
            self.b2 = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1, bias=False, strategy=st[2]),
                                    nn.BatchNorm2d(4, strategy=st[2]), nn.ReLU())
            self.shared = nn.Conv2d(7, 7, 3, padding=1, strategy=st[3])
            self.relu = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flat = nn.Flatten()
            self.fc = nn.Linear(7, 5, strategy=st[4])

        def forward(self, x):
            h = self.relu(self.stem(x))
            c = dc.cat([self.b1(h), self.b2(h)], dim=1)
            z = self.shared(self.relu(self.shared(c)))   # one module, two calls
            z = self.relu(z + c)                           # residual across strategies
            return self.fc(self.flat(self.pool(z)))

    return Dag()


def _torch_dag():
    import torch

    class TDag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            tn = torch.nn
            self.stem = tn.Conv2d(3, 6, 3, padding=1)
            self.b1 = tn.Conv2d(6, 3, 1)
            self.b2 = tn.Sequential(tn.Conv2d(6, 4, 3, padding=1, bias=False),
                                    tn.BatchNorm2d(4), tn.ReLU())
            self.shared = tn.Conv2d(7, 7, 3, padding=1)
            self.fc = tn.Linear(7, 5)

        def forward(self, x):
            r = torch.relu
            h = r(self.stem(x))
            c = torch.cat([self.b1(h), self.b2(h)], dim=1)
            z = self.shared(r(self.shared(c)))
            z = r(z + c)
            return self.fc(z.mean(dim=(2, 3)))

    return TDag().double()


def _compare_dag(comm, shift, use_loss, report):
    import torch
    import torch.nn.functional as F
    import distconv as dc
    from distconv import nn
    from distconv.backend import to_numpy
    from tests.torch_ref import draw, labels_for, randomize, to_torch_state

    model = _dag_model(comm.size, shift)
    sd = randomize(model, 7 + shift)
    torch.manual_seed(0)
    tmodel = _torch_dag()
    tmodel.load_state_dict(to_torch_state(sd), strict=True)
    x = draw((5, 3, 6, 5), 11 + shift)  # N=5 and odd H, W: uneven blocks everywhere
    xd = dc.DistTensor.from_global(x, _plan(comm.size, shift).activation_distribution(4))
    xd.requires_grad = True
    xt = torch.tensor(x, requires_grad=True)
    y = model(xd)
    yt = tmodel(xt)
    report.check("logits", to_numpy(y.to_global()), yt)
    if use_loss:
        labels = labels_for(5, 5, 3)
        loss = nn.CrossEntropyLoss()(y, labels)
        lt = F.cross_entropy(yt, torch.tensor(labels))
        report.check("loss", np.float64(loss.item()), lt, dtype=False)
        loss.backward()
        lt.backward()
    else:
        dy = draw(tuple(y.shape), 99)
        y.backward(dy)
        yt.backward(torch.tensor(dy))
    report.check("dx", to_numpy(xd.grad.to_global()), xt.grad)
    report.expect("dx distribution", xd.grad.distribution == xd.distribution)
    nn.sync_gradients(model.parameters())
    tp = dict(tmodel.named_parameters())
    for name, p in model.named_parameters():
        report.check(f"grad {name}", to_numpy(p.grad.to_global()), tp[name].grad)


@pytest.mark.parametrize("use_loss", [True, False])
@pytest.mark.parametrize("shift", [0, 1, 2])
@mpi(ranks=RANKS, timeout=T)
def test_dag_matches_torch(comm, shift, use_loss):
    from tests.torch_ref import Report
    _f64()
    rep = Report()
    _compare_dag(comm, shift, use_loss, rep)
    assert rep.checked >= 14
    rep.assert_ok(comm)


@mpi(ranks=(1, 2, 4), timeout=T)
def test_dag_negative_control_missing_gradient_sum(comm):
    """Dropping the second gradient where a tensor has two consumers must be caught."""
    from distconv import autograd
    from tests.torch_ref import Report
    _f64()
    orig = autograd._add_grads
    autograd._add_grads = lambda a, b, dist: a.redistribute(dist)
    try:
        rep = Report()
        _compare_dag(comm, 0, True, rep)
    finally:
        autograd._add_grads = orig
    errs = rep.merged(comm)
    assert any("grad" in e or "dx" in e for e in errs), "the broken sum went unnoticed"


# ------------------------------------------------------------------ dc.cat
def _cat_cases(p):
    """(input channel counts, the index of each input's strategy in _plan)."""
    return [((3, 4), (0, 1)), ((5, 2, 1), (1, 2, 0)), ((1, 6), (2, 2)), ((7,), (3,))]


@mpi(ranks=RANKS, timeout=T)
def test_cat_values_adjoint_and_exact_bytes(comm):
    import distconv as dc
    from distconv.backend import to_numpy
    from distconv.comm import wrap
    _f64()
    world = wrap(None)
    for chans, sts in _cat_cases(comm.size):
        xs = [np.random.default_rng(c * 10 + i).standard_normal((5, c, 3, 2))
              for i, c in enumerate(chans)]
        ts = []
        for x, k in zip(xs, sts):
            t = dc.DistTensor.from_global(x, _plan(comm.size, k).activation_distribution(4))
            t.requires_grad = True
            ts.append(t)
        s0 = world.stats()
        y = dc.cat(ts, dim=1)
        s1 = world.stats()
        assert y.shape == (5, sum(chans), 3, 2)
        np.testing.assert_array_equal(to_numpy(y.to_global()), np.concatenate(xs, axis=1))
        # exactly the elements of my output block that I do not hold myself
        dist = y.distribution
        mine = dist.box(y.shape, dist.grid.coords)
        have, off = 0, 0
        for t in ts:
            b = t.distribution.box(t.shape, t.grid.coords)
            lo = max(mine[1][0], b[1][0] + off)
            hi = min(mine[1][1], b[1][1] + off)
            rows = [max(0, min(m[1], s[1]) - max(m[0], s[0])) for m, s in
                    zip([mine[0], mine[2], mine[3]], [b[0], b[2], b[3]])]
            have += max(0, hi - lo) * rows[0] * rows[1] * rows[2]
            off += t.shape[1]
        need = int(np.prod([e - s for s, e in mine]))
        got = s1.get("alltoall", {}).get("bytes_recv", 0) - s0.get("alltoall", {}).get(
            "bytes_recv", 0)
        assert got == (need - have) * 8, (got, need, have)
        # adjoint: dy cut back into each input's own distribution
        dy = np.random.default_rng(5).standard_normal(y.shape)
        y.backward(dy)
        off = 0
        for t, c in zip(ts, chans):
            assert t.grad.distribution == t.distribution
            np.testing.assert_array_equal(to_numpy(t.grad.to_global()), dy[:, off:off + c])
            off += c


@mpi(ranks=(2, 3), timeout=T)
def test_cat_negative_control_wrong_offset(comm):
    """The value check above catches a misplaced input (offsets swapped)."""
    import distconv as dc
    from distconv.backend import to_numpy
    _f64()
    xs = [np.full((2, 3, 2, 2), 1.0), np.full((2, 4, 2, 2), 2.0)]
    ts = [dc.DistTensor.from_global(x, _plan(comm.size, 1).activation_distribution(4))
          for x in xs]
    y = dc.cat(ts[::-1], dim=1)  # the wrong order
    assert not np.array_equal(to_numpy(y.to_global()), np.concatenate(xs, axis=1))


# ------------------------------------------------------------------ hooks, no_grad
@mpi(ranks=(1, 2), timeout=T)
def test_post_accumulate_grad_hook_fires_once_complete(comm):
    import distconv as dc
    from distconv.backend import to_numpy
    _f64()
    model = _dag_model(comm.size)
    seen = {}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda q, name=name: seen.setdefault(name, []).append(
                np.array(to_numpy(q.grad.local), copy=True)))
    x = np.random.default_rng(1).standard_normal((3, 3, 4, 4))
    loss = dc.nn.CrossEntropyLoss()(model(x), np.array([0, 1, 2]))
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(seen) == sorted(names)
    for name, p in model.named_parameters():
        assert len(seen[name]) == 1, (name, len(seen[name]))
        # the shared conv's hook sees both calls' contributions already summed
        np.testing.assert_array_equal(seen[name][0], to_numpy(p.grad.local))


@mpi(ranks=(1, 2), timeout=T)
def test_no_grad_records_nothing_and_eval_matches(comm):
    import distconv as dc
    from distconv.backend import to_numpy
    _f64()
    model = _dag_model(comm.size)
    x = np.random.default_rng(1).standard_normal((3, 3, 4, 4))
    model.eval()
    y1 = model(x)
    with dc.no_grad():
        y2 = model(x)
        loss = dc.nn.CrossEntropyLoss()(y2, np.array([0, 1, 2]))
    assert y1.grad_fn is not None and y2.grad_fn is None
    np.testing.assert_array_equal(to_numpy(y1.to_global()), to_numpy(y2.to_global()))
    with pytest.raises(RuntimeError, match="nothing was recorded for this loss"):
        loss.backward()
    assert dc.is_grad_enabled()


# ------------------------------------------------------------------ bad input
@mpi(ranks=(1, 2, 3), timeout=T)
def test_bad_input_errors_on_every_rank(comm):
    import distconv as dc
    from distconv import nn
    _f64()
    model = _dag_model(comm.size)
    x = np.random.default_rng(1).standard_normal((3, 3, 4, 4))
    crit = nn.CrossEntropyLoss()
    loss = crit(model(x), np.array([0, 1, 2]))
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    with pytest.raises(RuntimeError, match="CrossEntropyLoss.backward called twice"):
        crit.backward()
    a = dc.DistTensor.from_global(np.ones((2, 3, 4, 4)), _plan(comm.size, 0)
                                  .activation_distribution(4))
    b = dc.DistTensor.from_global(np.ones((2, 3, 5, 4)), _plan(comm.size, 1)
                                  .activation_distribution(4))
    with pytest.raises(ValueError, match=r"cat: tensor 1 has shape \(2, 3, 5, 4\), but every "
                                         r"dimension except 1 must match"):
        dc.cat([a, b], dim=1)
    with pytest.raises(TypeError, match="cat: every input must be a DistTensor"):
        dc.cat([a, np.ones((2, 3, 4, 4))])

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x).to_global()

    with pytest.raises(TypeError, match=r"Bad.forward returned ndarray; a module must return "
                                        r"a DistTensor"):
        Bad()(x)
    # still usable afterwards: a fresh step runs on every rank
    loss = crit(model(x), np.array([0, 1, 2]))
    loss.backward()
    comm.Barrier()
