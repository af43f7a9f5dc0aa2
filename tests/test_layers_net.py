"""Whole networks against PyTorch float64: Sequential and Residual under uniform and mixed
(per-layer) strategies, every strategy-to-strategy transition, set_strategy with plans,
and a central finite-difference gradient check under mixed strategies (with a negative
control that the check catches a missing gradient reduction).
"""
import numpy as np
import pytest

from distconv import nn
from distconv.backend import set_default_dtype, to_numpy
from distconv.strategy import Strategy
from tests.mpi_harness import mpi
from tests.torch_ref import (Report, compare_model, draw, label, labels_for, randomize,
                             strategies, to_torch)

RANKS = (1, 2, 3, 4)


def small_net(st=None):
    """conv-BN-ReLU-maxpool-conv-BN-ReLU-avgpool-gap-flatten-linear, 3x9x9 -> 4 classes.

    Convolutions before a BN have no bias: its exact gradient is 0, and comparing two
    roundoff-sized numbers relatively tests nothing."""
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1, bias=False, strategy=st),
        nn.BatchNorm2d(5, strategy=st),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(5, 7, (3, 2), padding=(1, 0), bias=False, strategy=st),
        nn.BatchNorm2d(7, strategy=st),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(7, 4, strategy=st),
    )


def residual_net(body_st=None, short_st=None, head_st=None, conv_shortcut=True):
    """stem conv -> Residual(body, shortcut) -> gap -> flatten -> linear."""
    if conv_shortcut:
        body = nn.Sequential(nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=False, strategy=body_st),
                             nn.BatchNorm2d(7, strategy=body_st), nn.ReLU(),
                             nn.Conv2d(7, 7, 3, padding=1, strategy=body_st))
        short = nn.Sequential(nn.Conv2d(5, 7, 1, stride=2, bias=False, strategy=short_st),
                              nn.BatchNorm2d(7, strategy=short_st))
        cout = 7
    else:
        body = nn.Sequential(nn.Conv2d(5, 5, 3, padding=1, bias=False, strategy=body_st),
                             nn.BatchNorm2d(5, strategy=body_st), nn.ReLU(),
                             nn.Conv2d(5, 5, 3, padding=1, strategy=body_st))
        short = None
        cout = 5
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, strategy=head_st),
                         nn.Residual(body, short), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(cout, 3, strategy=head_st))


# ------------------------------------------------------------------ Sequential
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@mpi(ranks=RANKS, timeout=180)
def test_sequential_all_strategies(comm, dtype):
    """The small net under each strategy (set with set_strategy), ending in the loss;
    N=3 (uneven) and N=1 (empty sample blocks)."""
    set_default_dtype(dtype)
    rep = Report()
    nn.manual_seed(0)
    m = small_net()
    randomize(m, 1)
    tm = to_torch(m)
    rep.expect("state_dict keys", list(m.state_dict()) == list(tm.state_dict()),
               f"{list(m.state_dict())} != {list(tm.state_dict())}")
    sts = strategies(comm.size) if dtype == "float64" else strategies(comm.size)[-2:]
    for st in sts:
        m.set_strategy(st)
        for N in (3, 1):
            x = draw((N, 3, 9, 9), 10 + N)
            compare_model(m, x, rep, f"net N={N} {label(st)}", tmodel=to_torch(m),
                          labels=labels_for(N, 4, N))
    rep.assert_ok(comm)


def _plan(model, sts, shift):
    """Plan {layer name: strategy} cycling through ``sts`` over the layers that have one."""
    names = [n for n, mod in model.named_modules() if hasattr(mod, "_apply_strategy")]
    return {n: sts[(i + shift) % len(sts)] for i, n in enumerate(names)}


@mpi(ranks=RANKS, timeout=180)
def test_sequential_mixed_plans(comm):
    """Per-layer plans (every layer a different strategy, shifted each round): global
    weights bit-identical, results equal torch's and the first round's; a parent name in
    a plan applies to its children; an unknown name raises."""
    set_default_dtype(np.float64)
    sts = strategies(comm.size)
    rep = Report()
    nn.manual_seed(0)
    m = small_net()
    sd0 = randomize(m, 2)
    x = draw((3, 3, 9, 9), 3)
    lab = labels_for(3, 4, 4)
    first = None
    for shift in range(len(sts)):
        plan = _plan(m, sts, shift)
        before = m.state_dict()  # running statistics move with every training forward
        m.set_strategy(plan)
        for name, mod in m.named_modules():
            if name in plan:
                rep.expect(f"plan {shift} {name}", mod.strategy == plan[name])
        sd = m.state_dict()
        rep.expect(f"plan {shift} state identical", list(sd) == list(before) and all(
            sd[k].dtype == before[k].dtype and np.array_equal(sd[k], before[k]) for k in sd))
        got = compare_model(m, x, rep, f"plan {shift}", tmodel=to_torch(m, sd0), labels=lab,
                            buffers=False)
        if first is None:
            first = got
        else:
            rep.check(f"plan {shift} dx vs plan 0", got[1], first[1], tol=1e-12)
            for k in first[2]:
                rep.check(f"plan {shift} grad {k} vs plan 0", got[2][k], first[2][k], tol=1e-12)
    # a nested model: the plan entry of a parent covers its children
    nn.manual_seed(1)
    r = residual_net()
    randomize(r, 3)
    plan = {"": sts[0], "1": sts[-1], "1.shortcut": sts[len(sts) // 2]}
    r.set_strategy(plan)
    for name, mod in r.named_modules():
        if hasattr(mod, "_apply_strategy"):
            want = plan["1.shortcut"] if name.startswith("1.shortcut") else \
                plan["1"] if name.startswith("1.") else plan[""]
            rep.expect(f"nested plan {name}", mod.strategy == want, f"{mod.strategy} != {want}")
    compare_model(r, draw((3, 3, 6, 6), 5), rep, "nested plan", labels=labels_for(3, 3, 6))
    with pytest.raises(ValueError, match="nope"):
        r.set_strategy({"nope": sts[0]})
    rep.assert_ok(comm)


# ------------------------------------------------------------------ transitions
def _euler_circuit(n):
    """Vertex sequence using every ordered pair (i, j) of ``range(n)`` exactly once."""
    out_edges = {i: list(range(n)) for i in range(n)}
    stack, path = [0], []
    while stack:
        v = stack[-1]
        if out_edges[v]:
            stack.append(out_edges[v].pop())
        else:
            path.append(stack.pop())
    return path[::-1]


@mpi(ranks=RANKS, timeout=180)
def test_every_strategy_transition(comm):
    """Chains of convolutions whose consecutive layers use every ordered pair of strategies
    (e.g. sample=p -> sample=p/2,channel=2); channel counts alternate 5/7 so no split is
    even. y, dx and all gradients match torch."""
    set_default_dtype(np.float64)
    sts = strategies(comm.size)
    seq = _euler_circuit(len(sts))
    pairs = {(a, b) for a, b in zip(seq, seq[1:])}
    assert len(pairs) == len(sts) ** 2
    rep = Report()
    L = 7
    for c0 in range(0, max(1, len(seq) - 1), L - 1):
        chain = seq[c0:c0 + L]
        chans = [5 if i % 2 == 0 else 7 for i in range(len(chain) + 1)]
        nn.manual_seed(c0)
        m = nn.Sequential(*[nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, strategy=sts[k])
                            for i, k in enumerate(chain)])
        what = "->".join(label(sts[k]) for k in chain)
        compare_model(m, draw((3, 5, 5, 5), c0), rep, what)
    # the explicit case: sample=p then sample=p/2, channel=2, and back
    p = comm.size
    if p % 2 == 0:
        a, b = Strategy(sample=p), Strategy(sample=p // 2, channel=2)
        m = nn.Sequential(nn.Conv2d(5, 7, 3, strategy=a), nn.Conv2d(7, 5, 1, strategy=b),
                          nn.Conv2d(5, 3, 3, padding=1, strategy=a))
        compare_model(m, draw((1, 5, 6, 6), 9), rep, "sample->sample/2,channel=2 N=1")
    rep.assert_ok(comm)


LAYERS = {
    "conv": lambda st: nn.Conv2d(5, 7, 3, padding=1, strategy=st),
    "bn": lambda st: nn.BatchNorm2d(5, strategy=st),
    "relu": lambda st: nn.ReLU(),
    "maxpool": lambda st: nn.MaxPool2d(2),
    "gap": lambda st: nn.AdaptiveAvgPool2d(1),
    "flatten": lambda st: nn.Flatten(),
}


@mpi(ranks=RANKS, timeout=120)
def test_dx_in_the_input_distribution(comm):
    """Each layer fed an input laid out by ANOTHER strategy returns dx in that same layout
    (the Module contract), with values matching torch."""
    set_default_dtype(np.float64)
    sts = strategies(comm.size)
    rep = Report()
    x = draw((3, 5, 6, 6), 1)
    for i, st in enumerate(sts):
        src = sts[(i + 1) % len(sts)].activation_distribution(4)
        for name, make in LAYERS.items():
            m = make(st)
            randomize(m, 2)
            compare_model(m, x, rep, f"{name} {label(st)} fed {src}", x_dist=src)
    rep.assert_ok(comm)


# ------------------------------------------------------------------ Residual
@mpi(ranks=RANKS, timeout=180)
def test_residual(comm):
    """Identity and conv shortcuts; body and shortcut under different strategies so the
    branches end in different distributions; the input in a third layout."""
    set_default_dtype(np.float64)
    sts = strategies(comm.size)
    n = len(sts)
    rep = Report()
    x = draw((3, 3, 6, 6), 7)
    lab = labels_for(3, 3, 8)
    for i in range(n):
        body, short, head = sts[i], sts[(i + 1) % n], sts[(n - 1 - i) % n]
        for conv_sc in ((True, False) if i == 0 else (i % 2 == 1,)):
            nn.manual_seed(i)
            m = residual_net(body, short, head, conv_shortcut=conv_sc)
            randomize(m, 10 + i)
            what = (f"residual {'conv' if conv_sc else 'identity'} body={label(body)} "
                    f"short={label(short)} head={label(head)}")
            compare_model(m, x, rep, what, labels=lab)
        if 0 < i < n - 1:
            continue
        # a bare Residual block: global input, and an input in another strategy's layout
        nn.manual_seed(i)
        blk = residual_net(body, short, head, conv_shortcut=True)[1]
        randomize(blk, 20 + i)
        xb = draw((3, 5, 5, 5), 9)
        compare_model(blk, xb, rep, f"block body={label(body)} global in")
        compare_model(blk, xb, rep, f"block body={label(body)} in={label(head)}",
                      x_dist=head.activation_distribution(4))
        ident = nn.Residual(nn.Sequential(nn.Conv2d(5, 5, 3, padding=1, strategy=body),
                                          nn.ReLU()))
        compare_model(ident, xb, rep, f"identity block body={label(body)} in={label(head)}",
                      x_dist=head.activation_distribution(4))
    rep.assert_ok(comm)


# ------------------------------------------------------------------ finite differences
def mixed_plans(p):
    """A different strategy per layer for p ranks (conv, bn, conv, linear)."""
    S = Strategy
    return {
        1: [S(1), S(1), S(1), S(1)],
        2: [S(sample=2), S(sample=1, channel=2), S(sample=1, filter=2),
            S(sample=1, filter=2)],
        3: [S(sample=3), S(sample=1, channel=3), S(sample=1, filter=3),
            S(sample=1, channel=3)],
        4: [S(sample=2, channel=2), S(sample=2, filter=2), S(sample=1, filter=4),
            S(sample=1, channel=2, filter=2)],
    }[p]


def fd_net(plan):
    a, b, c, d = plan
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False, strategy=a),
                         nn.BatchNorm2d(4, strategy=b), nn.ReLU(),
                         nn.Conv2d(4, 5, 3, stride=2, strategy=c),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 3, strategy=d))


def fd_check(model, x, lab, rep, what, h=1e-6, per_param=2, n_input=3, seed=0):
    """Central differences (L(w+h) - L(w-h)) / 2h of the loss against the analytic
    gradient, for a few entries of every parameter and of the input."""
    crit = nn.CrossEntropyLoss()

    def loss_of(xx):
        return crit(model(xx), lab)

    sd = model.state_dict()
    model.zero_grad()
    loss_of(x)
    dx = to_numpy(model.backward(crit.backward()).to_global())
    nn.sync_gradients(model.parameters())
    grads = {k: to_numpy(p.grad.to_global()) for k, p in model.named_parameters()}
    rng = np.random.default_rng(seed)

    def compare(tag, fd, an):
        rep.checked += 1
        if not abs(fd - an) <= 1e-7 + 1e-6 * abs(an):
            rep.fail(f"{what} {tag}: finite difference {fd:.10e} vs analytic {an:.10e}")

    for k, g in grads.items():
        for _ in range(per_param):
            idx = tuple(int(rng.integers(s)) for s in g.shape)
            vals = []
            for sign in (1, -1):
                w = sd[k].copy()
                w[idx] += sign * h
                model.load_state_dict(dict(sd, **{k: w}))
                vals.append(loss_of(x))
            compare(f"{k}{list(idx)}", (vals[0] - vals[1]) / (2 * h), float(g[idx]))
    model.load_state_dict(sd)
    for _ in range(n_input):
        idx = tuple(int(rng.integers(s)) for s in x.shape)
        vals = []
        for sign in (1, -1):
            xx = x.copy()
            xx[idx] += sign * h
            vals.append(loss_of(xx))
        compare(f"x{list(idx)}", (vals[0] - vals[1]) / (2 * h), float(dx[idx]))


@mpi(ranks=RANKS, timeout=180)
def test_finite_differences_mixed_strategy(comm):
    """conv -> BN -> ReLU -> conv -> gap -> linear -> loss with a different Strategy per
    layer: finite differences agree with the analytic gradients (and torch agrees too)."""
    set_default_dtype(np.float64)
    plan = mixed_plans(comm.size)
    nn.manual_seed(4)
    m = fd_net(plan)
    randomize(m, 5)
    x = draw((3, 3, 6, 6), 6)
    lab = labels_for(3, 3, 7)
    rep = Report()
    compare_model(m, x, rep, "mixed vs torch", labels=lab)
    fd_check(m, x, lab, rep, "mixed")
    rep.assert_ok(comm)


@mpi(ranks=(2, 4), timeout=120)
def test_finite_differences_negative_control(comm):
    """The same check REPORTS a mismatch when the weight gradients are not summed over the
    sample groups (pending axes dropped: sync_gradients has nothing to reduce)."""
    set_default_dtype(np.float64)
    plan = [Strategy(sample=comm.size)] * 4
    nn.manual_seed(4)
    m = fd_net(plan)
    randomize(m, 5)
    x = draw((4, 3, 6, 6), 6)
    lab = labels_for(4, 3, 7)
    ok = Report()
    fd_check(m, x, lab, ok, "control", per_param=1, n_input=0)
    assert ok.merged(comm) == []
    orig = nn.Parameter.accumulate
    bad = Report()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Parameter, "accumulate", lambda self, g, pending: orig(self, g, ()))
        fd_check(m, x, lab, bad, "broken", per_param=1, n_input=0)
    errs = bad.merged(comm)
    assert any("finite difference" in e and "0.weight" in e for e in errs), errs
    assert any("finite difference" in e and "6.weight" in e for e in errs), errs

