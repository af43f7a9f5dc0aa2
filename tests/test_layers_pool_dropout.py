"""The layers issue 16's networks need, under every Strategy that fits 1-4 ranks, against
PyTorch float64 (tests/torch_ref.py: y, dx and every gradient to 1e-10):

* MaxPool2d(ceil_mode=True), AvgPool2d(ceil_mode, count_include_pad), AdaptiveAvgPool2d
  of any output size (pairs, None entries, larger than the input);
* Dropout: the mask depends only on (seed, step, global index), so the output is the
  same bytes at 1-4 ranks and under every strategy; eval mode and p=0 are the identity;
  backward uses the forward's mask;
* Inception's non-square convolutions (1x7, 7x1, strided 3x1) and BatchNorm2d(eps=0.001);

with negative controls showing that the same comparison catches a wrong divisor rule and
a rank-local dropout mask, and the errors of bad arguments (the same on every rank).
"""
import numpy as np
import pytest

from distconv import nn
from distconv.backend import set_default_dtype
from distconv.ops import dropout_mask
from distconv.strategy import Strategy
from distconv.tensor import DistTensor
from tests.mpi_harness import mpi
from tests.torch_ref import (Report, compare_model, draw, label, randomize, strategies,
                             to_torch)

RANKS = (1, 2, 3, 4)

POOLS = {
    "max-3s2-ceil": lambda: nn.MaxPool2d(3, stride=2, ceil_mode=True),
    "max-rect-ceil": lambda: nn.MaxPool2d((2, 3), stride=(2, 2), padding=(1, 1),
                                          ceil_mode=True),
    "avg-3s2p1-ceil-nopad": lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True,
                                                 count_include_pad=False),
    "avg-rect-ceil-pad": lambda: nn.AvgPool2d((3, 2), stride=(2, 3), padding=(1, 0),
                                              ceil_mode=True, count_include_pad=True),
    "avg-3s1p1-nopad": lambda: nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
    "avg-5s3": lambda: nn.AvgPool2d(5, stride=3),
    "adaptive-7x7": lambda: nn.AdaptiveAvgPool2d((7, 7)),
    "adaptive-2x3": lambda: nn.AdaptiveAvgPool2d((2, 3)),
    "adaptive-None-2": lambda: nn.AdaptiveAvgPool2d((None, 2)),
    "adaptive-4-larger": lambda: nn.AdaptiveAvgPool2d(4),
    "adaptive-1": lambda: nn.AdaptiveAvgPool2d((1, 1)),
}
# uneven N and C for every split; H x W with ceil-mode windows that pass the padding
SHAPES = [(3, 5, 8, 7), (1, 3, 5, 6)]


@mpi(ranks=RANKS, timeout=120)
def test_pools_all_strategies(comm):
    set_default_dtype(np.float64)
    rep = Report()
    xi = np.random.default_rng(0).integers(-3, 4, SHAPES[0]).astype(np.float64)  # ties
    for name, make in POOLS.items():
        for shape in SHAPES:
            x = xi if name.startswith("max") and shape == SHAPES[0] else draw(shape, 7)
            if name == "adaptive-7x7" and shape[2] < 7:
                x = draw((2, 3, 9, 10), 8)  # overlapping bins
            compare_model(make(), x, rep, f"{name} {x.shape} global")
            for st in strategies(comm.size):
                act = st.activation_distribution(4)
                compare_model(make(), x, rep, f"{name} {x.shape} {label(st)}", x_dist=act,
                              out_dist=act, dy_dist=act)
    rep.assert_ok(comm)


@mpi(ranks=(1, 2), timeout=60)
def test_pool_negative_control_divisor_rule(comm):
    """A reference with the other count_include_pad is reported."""
    import torch

    set_default_dtype(np.float64)
    x = draw((2, 3, 6, 5), 1)
    rep = Report()
    m = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
    compare_model(m, x, rep, "avg", tmodel=torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True,
                                                              count_include_pad=True))
    errs = rep.merged(comm)
    assert any("avg y: relative error" in e for e in errs), errs
    assert any("avg dx: relative error" in e for e in errs), errs


def test_pool_bad_arguments():
    set_default_dtype(np.float64)
    with pytest.raises(ValueError, match="pad should be at most half"):
        nn.MaxPool2d(3, padding=2)
    with pytest.raises(ValueError, match="pad should be at most half"):
        nn.AvgPool2d((3, 1), padding=(1, 1))
    with pytest.raises(ValueError, match="dilation"):
        nn.MaxPool2d(3, 1, 0, 2)
    with pytest.raises(ValueError, match="divisor_override"):
        nn.AvgPool2d(3, divisor_override=4)
    with pytest.raises(ValueError, match="output_size"):
        nn.AdaptiveAvgPool2d((0, 2))
    with pytest.raises(ValueError, match="output_size"):
        nn.AdaptiveAvgPool2d((1, 2, 3))
    # a kernel larger than the (padded) input: PyTorch's words, both raise
    import torch
    for dc_m, t_m, hw in ((nn.MaxPool2d(3), torch.nn.MaxPool2d(3), 2),
                          (nn.AvgPool2d(4, padding=1), torch.nn.AvgPool2d(4, padding=1), 1),
                          (nn.MaxPool2d(3, 2, ceil_mode=True),
                           torch.nn.MaxPool2d(3, 2, ceil_mode=True), 1)):
        with pytest.raises(RuntimeError, match="Output size is too small"):
            t_m(torch.zeros(1, 2, hw, hw))
        with pytest.raises(ValueError, match="Output size is too small"):
            dc_m(np.zeros((1, 2, hw, hw)))
    # the smallest input that works in torch works here
    nn.MaxPool2d(3, 2, ceil_mode=True)(np.zeros((1, 2, 3, 3)))


# ------------------------------------------------------------------ dropout
def _full_mask(m, shape, step):
    return dropout_mask(shape, [slice(0, n) for n in shape], m.p, m.seed, step, np.float64)


@mpi(ranks=RANKS, timeout=120)
def test_dropout_all_strategies(comm):
    """Against torch with the same mask, and byte-identical outputs under every strategy
    and rank count (the expected value is the 1-process formula x * mask(global index))."""
    set_default_dtype(np.float64)
    rep = Report()
    for shape, p in (((5, 7, 3, 2), 0.5), ((3, 10), 0.2), ((1, 3, 2, 2), 0.9)):
        x = draw(shape, 11)
        nn.manual_seed(4)
        ref = nn.Dropout(p)
        seed = ref.seed
        want = [x * _full_mask(ref, shape, s) for s in range(2)]
        cases = [(None, "global")] + [(st, label(st)) for st in strategies(comm.size)]
        for st, lab in cases:
            m = nn.Dropout(p, seed=seed)
            dist = None if st is None else st.activation_distribution(len(shape))
            rep.expect(f"{shape} seed from manual_seed", nn.Dropout(p).seed != seed)
            compare_model(m, [x, x], rep, f"dropout {shape} p={p} {lab}", x_dist=dist,
                          dy_dist=dist, out_dist=dist)
            rep.expect(f"{shape} {lab} step counted", m.step == 2, str(m.step))
            for s in range(2):  # the exact bytes, replayed step by step
                m.step = s
                xin = x if dist is None else DistTensor.from_global(x, dist)
                y = m(xin).to_global()
                rep.expect(f"{shape} {lab} step {s} exact", np.array_equal(y, want[s]))
        # same seed through manual_seed: the same module seed on every rank and run
        nn.manual_seed(4)
        rep.expect("manual_seed reproduces the seed", nn.Dropout(p).seed == seed)
        kept = (_full_mask(ref, shape, 0) != 0).mean()
        rep.expect(f"{shape} keep rate {kept:.2f} near {1 - p}",
                   abs(kept - (1 - p)) < 0.25 or np.prod(shape) < 20)
    rep.assert_ok(comm)


@mpi(ranks=(1, 3), timeout=60)
def test_dropout_identity_eval_and_p0(comm):
    set_default_dtype(np.float64)
    x = draw((4, 6, 3, 3), 2)
    dy = draw((4, 6, 3, 3), 3)
    for st in strategies(comm.size):
        act = st.activation_distribution(4)
        for m in (nn.Dropout(0.0), nn.Dropout(0.5).eval(), nn.Dropout(1.0).eval()):
            xin = DistTensor.from_global(x, act)
            y = m(xin)
            assert np.array_equal(y.to_global(), x) and y.distribution == act
            dx = m.backward(DistTensor.from_global(dy, act))
            assert np.array_equal(dx.to_global(), dy)
            assert m.step == 0
        m = nn.Dropout(1.0)  # training, p=1: everything dropped, gradient zero
        y = m(DistTensor.from_global(x, act))
        assert not y.to_global().any()
        assert not m.backward(dy).to_global().any()


@mpi(ranks=(2, 4), timeout=60)
def test_dropout_negative_control_rank_local_mask(comm):
    """A mask drawn from each rank's local indices (not the global ones) is reported."""
    from distconv import ops

    set_default_dtype(np.float64)
    orig = ops.dropout.dropout_mask

    def local(shape, slices, *a, **k):
        loc = [s.stop - s.start for s in slices]
        return orig(loc, [slice(0, n) for n in loc], *a, **k)

    x = draw((4, 6, 3, 3), 5)
    st = Strategy(sample=comm.size)
    rep = Report()
    compare_model(nn.Dropout(0.5, seed=3), x, rep, "good")
    assert rep.merged(comm) == []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops.dropout, "dropout_mask", local)
        compare_model(nn.Dropout(0.5, seed=3), x, rep, "local",
                      x_dist=st.activation_distribution(4))
    errs = rep.merged(comm)
    assert any("local y: relative error" in e for e in errs), errs
    assert any("local dx: relative error" in e for e in errs), errs


def test_dropout_bad_p():
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            nn.Dropout(p)


# ------------------------------------------------------------------ Inception's convs
@mpi(ranks=RANKS, timeout=120)
def test_nonsquare_convs_and_bn_eps(comm):
    """1x7 / 7x1 convolutions (padding (0,3) / (3,0)), a strided 3x1 one and
    BatchNorm2d(eps=0.001) as in torchvision's BasicConv2d, two training steps and eval,
    every strategy."""
    set_default_dtype(np.float64)
    rep = Report()
    for st in strategies(comm.size):
        nn.manual_seed(2)
        m = nn.Sequential(
            nn.Conv2d(5, 6, (1, 7), padding=(0, 3), bias=False, strategy=st),
            nn.BatchNorm2d(6, eps=0.001, strategy=st),
            nn.ReLU(),
            nn.Conv2d(6, 7, (7, 1), padding=(3, 0), strategy=st),
            nn.Conv2d(7, 3, (3, 1), stride=(2, 1), padding=(1, 0), bias=False, strategy=st),
            nn.BatchNorm2d(3, eps=0.001, momentum=0.3, strategy=st),
        )
        assert m[1].eps == 0.001
        randomize(m, 5)
        # small batch variance: eps=1e-3 vs torch's default 1e-5 would show at 1e-10
        xs = [draw((3, 5, 9, 8), 6) * 0.05, draw((3, 5, 9, 8), 7) * 0.05]
        tm = to_torch(m)
        assert tm[1].eps == 0.001
        compare_model(m, xs, rep, f"inception convs {label(st)}", tmodel=tm)
        m.eval()
        tm.eval()
        compare_model(m, xs[0], rep, f"inception convs eval {label(st)}", tmodel=tm)
    rep.assert_ok(comm)


@mpi(ranks=(1, 2), timeout=60)
def test_bn_eps_negative_control(comm):
    """The same model against a reference with eps=1e-5 is reported."""
    set_default_dtype(np.float64)
    nn.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(3, 4, (1, 3), padding=(0, 1), bias=False),
                      nn.BatchNorm2d(4, eps=0.001))
    randomize(m, 1)
    tm = to_torch(m)
    tm[1].eps = 1e-5
    rep = Report()
    compare_model(m, draw((3, 3, 4, 5), 2) * 0.05, rep, "eps")
    assert rep.merged(comm) == []
    compare_model(m, draw((3, 3, 4, 5), 2) * 0.05, rep, "bad", tmodel=tm)
    assert any("bad y: relative error" in e for e in rep.merged(comm))
