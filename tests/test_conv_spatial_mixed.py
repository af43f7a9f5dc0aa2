"""Conv2d with a spatial split combined with channel, filter or sample, against PyTorch float64.

At 4 ranks every strategy with one of channel/filter/sample at 2 and one of height/width
at 2 (channel=2 x height=2, filter=2 x width=2, sample=2 x height=2, ...), and at 2 ranks
the spatial ones, on a conv stack (7x7 stride 2 padding 3 with no bias, 3x3 dilation 2
with bias, 3x3 stride 2) whose layers take different strategies, odd H and W, and H or W
smaller than the blocks after the strided convs: y, dx and every weight and bias
gradient (after sync_gradients) match torch to 1e-10 (normwise relative). The weight of a
channel x height layer is stored split on C and replicated over height, its gradient
pending over sample x height x width before the sync. The halo exchange runs among the
ranks that hold the same samples and channels. Negative control: gradients not summed over
height and width must be reported.
"""
import numpy as np
import pytest

from distconv import nn
from distconv.backend import set_default_dtype
from distconv.strategy import Strategy
from tests.mpi_harness import mpi
from tests.torch_ref import Report, compare_model, draw, randomize, to_torch

MIXED = [dict(channel=2, height=2), dict(filter=2, height=2), dict(channel=2, width=2),
         dict(filter=2, width=2), dict(sample=2, height=2), dict(sample=2, width=2),
         dict(sample=1, height=2, width=2), dict(sample=1, height=2), dict(sample=1, width=2)]
SHAPES = [(2, 4, 13, 11), (3, 4, 7, 9)]


def fitting(p):
    out = []
    for kw in MIXED:
        st = Strategy(**kw)
        try:
            st.resolve(p)
        except ValueError:
            continue
        out.append(st)
    return out


def stack():
    return nn.Sequential(
        nn.Conv2d(4, 6, 7, stride=2, padding=3, bias=False),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2),
        nn.Conv2d(6, 5, 3, stride=2, padding=1),
    )


def plans(p):
    """Each mixed strategy on every conv, and rotated so neighbours differ."""
    sts = fitting(p)
    out = [(str(st), {"": st}) for st in sts]
    for i in range(len(sts)):
        a, b, c = sts[i], sts[(i + 1) % len(sts)], sts[(i + 2) % len(sts)]
        out.append((f"{a} | {b} | {c}", {"0": a, "2": b, "3": c}))
    return out


@mpi(ranks=(2, 4), timeout=240)
def test_mixed_spatial_conv_stack_vs_torch(comm):
    set_default_dtype(np.float64)
    rep = Report()
    nn.manual_seed(0)
    m = stack()
    sd0 = randomize(m, 4)
    cases = plans(comm.size)
    assert cases
    for what, plan in cases:
        m.load_state_dict(sd0)
        m.set_strategy(plan)
        for shape in SHAPES:
            compare_model(m, draw(shape, shape[2]), rep, f"{what} {shape}", tmodel=to_torch(m))
    rep.assert_ok(comm)
    assert rep.checked > 0


@mpi(ranks=(4,), timeout=120)
def test_channel_height_layouts_and_pending_gradients(comm):
    """channel=2 x height=2: weight split on C over channel, replicated over height; before
    the sync its gradient is pending over height (and width/sample of size 1 are absent);
    the output is in the activation layout (C over channel x filter, H over height)."""
    set_default_dtype(np.float64)
    nn.manual_seed(0)
    st = Strategy(channel=2, height=2)
    conv = nn.Conv2d(4, 6, 3, padding=1, strategy=st)
    g = st.grid()
    assert conv.weight.data.distribution.split[1] == ("channel",)  # filter=1: F whole
    assert conv.weight.data.local.shape == (6, 2, 3, 3)
    comm_ = g.comm
    comm_.reset_stats()
    y = conv(draw((2, 4, 9, 7), 1))
    assert y.distribution == st.activation_distribution(4)
    kinds = set(comm_.stats())
    assert {"halo", "reduce_scatter"} <= kinds, kinds  # halo over height, sum over channel
    y.backward(draw(tuple(y.shape), 2))
    want = {a for a in ("sample", "height", "width") if g.axis_size(a) > 1}
    for prm in (conv.weight, conv.bias):
        assert set(prm.grad.distribution.pending) == want, prm.grad.distribution


@mpi(ranks=(4,), timeout=120)
def test_negative_control_unsummed_spatial_gradients(comm):
    set_default_dtype(np.float64)
    nn.manual_seed(0)
    m = stack()
    randomize(m, 5)
    m.set_strategy({"": Strategy(channel=2, height=2)})
    x = draw((2, 4, 13, 11), 3)
    good = Report()
    compare_model(m, x, good, "good", tmodel=to_torch(m))
    good.assert_ok(comm)
    orig = nn.Parameter.accumulate
    bad = Report()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Parameter, "accumulate",
                   lambda self, g, pending: orig(self, g, tuple(
                       a for a in pending if a not in ("height", "width"))))
        compare_model(m, x, bad, "unsummed", tmodel=to_torch(m))
    errs = bad.merged(comm)
    assert any("0.weight" in e for e in errs) and any("2.bias" in e for e in errs), errs


@pytest.mark.parametrize("overlap", [True, False])
@mpi(ranks=(4,), timeout=120)
def test_shape_only_step_records_the_real_bytes(comm, overlap):
    """One source of truth: a shape-only training step (distconv.trace, ShapeComm) of a net
    with channel x height and filter x width convs records, per kind, the calls and bytes
    of the real step on this rank (halo and its adjoint included), overlap on or off."""
    from distconv import spatial
    from distconv.trace import shape_only_step
    from tests.test_trace import _counts, _real_step

    set_default_dtype(np.float64)
    nn.manual_seed(3)
    m = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, strategy="channel=2,height=2"),
        nn.BatchNorm2d(6, strategy="channel=2,height=2"), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, stride=2, padding=1, strategy="filter=2,width=2"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    sd = m.state_dict()
    with spatial.halo_overlap(overlap):
        real, labels = _real_step(comm, m, (2, 4, 11, 9), 0)
        m.load_state_dict(sd)
        tr = shape_only_step(m, (2, 4, 11, 9), comm.size, comm.rank, labels=labels)
    assert {"halo", "halo_adjoint"} <= set(real), set(real)
    assert _counts(tr.stats) == _counts(real), (_counts(tr.stats), _counts(real))


@mpi(ranks=(4,), timeout=120)
def test_halo_bytes_equal_the_analytic_count(comm):
    """channel=2 x height=2 and filter=2 x width=2: the forward halo bytes of each rank are
    the count of tests/test_spatial.py for its block of channels (C/2 under channel, all C
    under filter, whose input is gathered over the filter group first), the adjoint's the
    reverse."""
    from tests.test_spatial import expected_halo_bytes
    from tests.test_data import my_block

    set_default_dtype(np.float64)
    N, C, H, W = 2, 5, 9, 7
    for text, cdiv in (("channel=2,height=2", 2), ("filter=2,width=2", 1)):
        st = Strategy.parse(text)
        nn.manual_seed(0)
        conv = nn.Conv2d(C, 3, 3, padding=1, strategy=st)
        g = st.grid()
        c0, c1 = my_block(C, cdiv, g.coord("channel")) if cdiv > 1 else (0, C)
        x = draw((N, C, H, W), 1)
        g.comm.reset_stats()
        y = conv(x)
        fwd = g.comm.stats()["halo"]
        x_dt = dc_tensor(x, conv.input_distribution)
        y = conv(x_dt)
        g.comm.reset_stats()
        y.backward(draw(tuple(y.shape), 2))
        back = g.comm.stats()["halo_adjoint"]
        case = (N, c1 - c0, 3, H, W, 3, 1, 1, 1, True)
        gshape = (1, st.height, st.width)
        want = expected_halo_bytes(case, gshape, (0, g.coord("height"), g.coord("width")))
        assert (fwd["bytes_sent"], fwd["bytes_recv"]) == want, (text, fwd, want)
        assert (back["bytes_sent"], back["bytes_recv"]) == want[::-1], (text, back, want)


def dc_tensor(x, dist):
    from distconv import DistTensor
    t = DistTensor.from_global(x, dist)
    t.requires_grad = True
    return t
