"""Layers under spatial strategies (``height``/``width``), against PyTorch float64.

A ResNet-like stem, conv 7x7 s2 p3 -> BN -> ReLU -> MaxPool(3, 2, 1) -> conv 3x3 ->
AdaptiveAvgPool2d(1) -> Flatten -> Linear, with spatial strategies (height=2, width=2,
height=2 x width=2, height=4, sample=2 x height=2, height=3, width=3: every one that fits
the rank count) on some layers mixed with sample/channel/filter strategies on the others,
odd H and W, checked for y, dx, every parameter gradient (after sync_gradients) and the
running statistics (normwise relative error below 1e-10). Negative controls: weight
gradients not summed over the spatial groups, and batch-norm statistics reduced over the
sample group only, must both be reported. height/width on a Linear, or a strategy that
does not fit the ranks, raises the same ValueError everywhere.
"""
import numpy as np
import pytest
import torch

from distconv import nn
from distconv.backend import set_default_dtype
from distconv.strategy import Strategy
from tests.mpi_harness import mpi
from tests.torch_ref import Report, compare_model, draw, labels_for, randomize, strategies, \
    to_torch


def stem_net():
    """The stem of the brief; the first conv feeds a BN, so it has no bias (its exact
    gradient is 0: comparing roundoff relatively tests nothing); the 3x3 conv has one."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


def spatial_strategies(p):
    """Every spatial strategy of the brief that fits ``p`` ranks (sample takes the rest)."""
    cands = [Strategy(height=2), Strategy(width=2), Strategy(height=2, width=2),
             Strategy(height=4), Strategy(sample=2, height=2), Strategy(height=3),
             Strategy(width=3)]
    out = []
    for s in cands:
        try:
            s.resolve(p)
        except ValueError:
            continue
        out.append(s)
    return out


def plans(p):
    """(label, plan) pairs: each spatial strategy on the stem conv + BN (plan A) or on the
    3x3 conv and the BN (plan B), the other layers on a sample/channel/filter strategy
    (cycling through all of them)."""
    mixes = strategies(p)
    out = []
    for i, sp in enumerate(spatial_strategies(p)):
        ms = mixes[i % len(mixes)]
        ms2 = mixes[(i + 1) % len(mixes)]
        out.append((f"A {sp} | {ms}", {"0": sp, "1": sp, "4": ms, "7": ms}))
        out.append((f"B {ms2} | {sp}", {"0": ms2, "1": sp, "4": sp, "7": ms2}))
    if p == 4:  # BatchNorm2d may combine channel with height (its C split is independent)
        bn = Strategy(channel=2, height=2)
        out.append((f"C bn {bn}", {"0": Strategy(sample=1, height=2, width=2), "1": bn,
                                   "4": Strategy(width=2), "7": Strategy(filter=4)}))
    return out


# the last one leaves empty H/W blocks at height=4 / width=3 after the max pool
SHAPES = [(3, 3, 19, 17), (2, 3, 13, 11), (2, 3, 5, 5)]


@mpi(ranks=(1, 2, 3, 4), timeout=240)
def test_stem_spatial_vs_torch(comm):
    set_default_dtype(np.float64)
    torch.manual_seed(0)
    rep = Report()
    nn.manual_seed(0)
    m = stem_net()
    sd0 = randomize(m, 1)
    cases = plans(comm.size) or [("data parallel", {"": Strategy()})]
    if comm.size > 1:
        assert len(cases) >= 4
    seen = []
    m._modules["3"].register_forward_hook(
        lambda mod, args, y: seen.append(bool(y.distribution.split[2] or
                                              y.distribution.split[3])))
    for what, plan in cases:
        m.load_state_dict(sd0)
        m.set_strategy(plan)
        for shape in SHAPES:
            x = draw(shape, 10 + shape[2])
            tm = to_torch(m)
            compare_model(m, x, rep, f"{what} {shape}", tmodel=tm,
                          labels=labels_for(shape[0], 5, shape[3]))
    # the max pool ran on a spatially split input (halo exchange) whenever one was planned
    assert seen and all(seen) == (comm.size > 1), seen
    rep.assert_ok(comm)
    assert rep.checked > 0


def pool_net():
    """Spatial conv, then average pooling (ceil mode, padding excluded), max pooling (ceil
    mode) and global pooling on the spatially split activations."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.AvgPool2d(2, stride=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


@mpi(ranks=(2, 3, 4), timeout=180)
def test_pooling_on_spatial_activations_vs_torch(comm):
    set_default_dtype(np.float64)
    torch.manual_seed(0)
    rep = Report()
    nn.manual_seed(0)
    m = pool_net()
    sd0 = randomize(m, 2)
    mixes = strategies(comm.size)
    for i, sp in enumerate(spatial_strategies(comm.size)):
        m.load_state_dict(sd0)
        m.set_strategy({"0": sp, "7": mixes[i % len(mixes)]})
        for shape in [(2, 3, 15, 13), (3, 3, 9, 7)]:
            compare_model(m, draw(shape, shape[2]), rep, f"pool {sp} {shape}",
                          tmodel=to_torch(m), labels=labels_for(shape[0], 3, shape[3]))
    rep.assert_ok(comm)
    assert rep.checked > 0


@mpi(ranks=(2, 4), timeout=120)
def test_spatial_weight_gradient_is_pending_over_sample_height_width(comm):
    """Before sync_gradients the weight and bias gradients of a spatial Conv2d are pending
    over every axis the weight is replicated on (sample, height, width)."""
    set_default_dtype(np.float64)
    nn.manual_seed(0)
    checked = 0
    for st in [Strategy(width=2), Strategy(height=2, width=2), Strategy(sample=2, width=2)]:
        try:
            g = st.grid()
        except ValueError:
            continue
        conv = nn.Conv2d(3, 4, 3, padding=1, strategy=st)
        y = conv(draw((2, 3, 7, 5), 1))
        y.backward(draw(tuple(y.shape), 2))
        want = {a for a in ("sample", "height", "width") if g.axis_size(a) > 1}
        for prm in (conv.weight, conv.bias):
            assert set(prm.grad.distribution.pending) == want, (st, prm.grad.distribution)
        assert y.distribution == st.activation_distribution(4)
        checked += 1
    assert checked >= 1


@mpi(ranks=(4,), timeout=120)
def test_gradient_sync_buckets_spatial_gradients(comm):
    """optim.GradientSync (bucketed allreduce over each gradient's pending axes) gives the
    same gradients as sync_gradients under a spatial plan."""
    from distconv import optim
    from distconv.backend import to_numpy

    set_default_dtype(np.float64)
    nn.manual_seed(0)
    m = stem_net()
    randomize(m, 3)
    sp = Strategy(sample=2, height=2)
    m.set_strategy({"0": sp, "1": sp, "4": Strategy(height=2, width=2), "7": Strategy()})
    x, lab = draw((3, 3, 11, 9), 4), labels_for(3, 5, 5)

    def grads():
        return {k: np.asarray(to_numpy(p.grad.to_global())) for k, p in m.named_parameters()}

    m.zero_grad()
    nn.CrossEntropyLoss()(m(x), lab).backward()
    nn.sync_gradients(m.parameters())
    want = grads()
    m.zero_grad()
    sync = optim.GradientSync(m, bucket_bytes=1)
    nn.CrossEntropyLoss()(m(x), lab).backward()
    sync.wait()
    got = grads()
    sync.remove()
    for k in want:
        assert np.allclose(got[k], want[k], rtol=0, atol=1e-13 * np.abs(want[k]).max()), k


@mpi(ranks=(4,), timeout=180)
def test_negative_controls(comm):
    """The same comparison REPORTS (1) weight gradients left unsummed over the spatial
    groups and (2) batch-norm statistics reduced over the sample group only."""
    set_default_dtype(np.float64)
    torch.manual_seed(0)
    nn.manual_seed(0)
    m = stem_net()
    randomize(m, 1)
    sp = Strategy(sample=1, height=2, width=2)
    m.set_strategy({"0": sp, "1": sp, "4": sp, "7": Strategy()})
    x = draw((3, 3, 19, 17), 5)
    lab = labels_for(3, 5, 6)
    good = Report()
    compare_model(m, x, good, "good", tmodel=to_torch(m), labels=lab)
    good.assert_ok(comm)

    orig = nn.Parameter.accumulate
    bad = Report()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Parameter, "accumulate",
                   lambda self, g, pending: orig(self, g, tuple(
                       a for a in pending if a not in ("height", "width"))))
        compare_model(m, x, bad, "unsummed", tmodel=to_torch(m), labels=lab)
    errs = bad.merged(comm)
    assert any("0.weight" in e for e in errs) and any("4.weight" in e for e in errs), errs
    assert any("4.bias" in e for e in errs), errs

    bn = m._modules["1"]
    bad2 = Report()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(bn), "_group_axes", lambda self: self._act.split[0])
        compare_model(m, x, bad2, "bn-sample-only", tmodel=to_torch(m), labels=lab)
    errs = bad2.merged(comm)
    assert any(" y:" in e or " y " in e for e in errs), errs


@mpi(ranks=(1, 2, 4), timeout=60)
def test_bad_spatial_strategy_raises_everywhere(comm):
    """height/width on a Linear, or a spatial strategy that does not fit the ranks: the same
    clear ValueError on every rank, at construction and in set_strategy (which leaves the
    layer as it was). height/width with channel/filter on a Conv2d is accepted
    (tests/test_conv_spatial_mixed.py checks its values)."""
    set_default_dtype(np.float64)
    with pytest.raises(ValueError, match=r"Linear: strategy .* splits height/width, but "
                                         r"Linear has no spatial dims"):
        nn.Linear(3, 4, strategy=Strategy(height=2))
    lin = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="no spatial dims"):
        lin.set_strategy(Strategy(width=2))
    assert lin.strategy == Strategy()
    st = Strategy(sample=1, height=2, width=2, channel=2, filter=3)  # 24 ranks
    with pytest.raises(ValueError, match=r"needs sample\*channel\*filter\*height\*width"):
        nn.Conv2d(3, 4, 3, strategy=st)
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="ranks, but there are"):
        conv.set_strategy(st)
    assert conv.strategy == Strategy()
    if comm.size == 4:
        for text in ("channel=2,height=2", "filter=2,width=2"):
            assert nn.Conv2d(3, 4, 3, strategy=text).strategy == Strategy.parse(text)
    comm.Barrier()
