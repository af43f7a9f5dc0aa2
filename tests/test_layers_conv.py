"""Conv2d and Linear under every Strategy that fits 1-4 ranks, against PyTorch float64.

Each case loops over all factorisations (sample, channel, filter) of the rank count and
checks y, dx and every parameter gradient (after sync_gradients) with tests/torch_ref.py.
Also: state_dict keys and round trips against torch modules, set_strategy, float32.
"""
import numpy as np
import pytest
import torch

from distconv import nn
from distconv.backend import set_default_dtype
from tests.mpi_harness import mpi
from tests.torch_ref import (Report, compare_model, draw, label, randomize, strategies,
                             to_torch)

RANKS = (1, 2, 3, 4)

# (N, C, F, H, W, kernel, stride, padding, dilation, bias)
CONV_CASES = {
    "uneven-3x3": (3, 5, 7, 7, 6, 3, 1, 1, 1, True),
    "rect-stride2": (4, 4, 6, 9, 8, (3, 2), 2, (1, 0), 1, False),
    "dilated": (2, 3, 5, 9, 7, (2, 3), (2, 1), (0, 2), (2, 1), True),
    "batch1-1x1": (1, 5, 7, 5, 4, 1, 1, 0, 1, True),
    "wide-5x5": (3, 8, 3, 6, 6, 5, 2, 2, 1, True),
}

# (N, in, out, bias)
LINEAR_CASES = {
    "uneven": (3, 5, 7, True),
    "nobias": (4, 8, 3, False),
    "batch1": (1, 6, 5, True),
}


def make_conv(case, strategy, seed):
    N, C, F, H, W, k, s, p, d, bias = case
    nn.manual_seed(seed)
    return nn.Conv2d(C, F, k, stride=s, padding=p, dilation=d, bias=bias, strategy=strategy)


@pytest.mark.parametrize("name, dtype", [(n, "float64") for n in CONV_CASES]
                         + [(n, "float32") for n in ("uneven-3x3", "rect-stride2")])
@mpi(ranks=RANKS, timeout=120)
def test_conv2d_all_strategies(comm, name, dtype):
    set_default_dtype(dtype)
    case = CONV_CASES[name]
    N, C, F, H, W = case[:5]
    x = draw((N, C, H, W), 1)
    rep = Report()
    for st in strategies(comm.size):
        m = make_conv(case, st, 7)
        randomize(m, 3)
        act = st.activation_distribution(4)
        compare_model(m, x, rep, f"{name} {label(st)}", out_dist=act, x_dist=None)
        # input and dy as DistTensors in the layer's own activation layout
        compare_model(m, x, rep, f"{name} {label(st)} dist-in", x_dist=act, dy_dist=act,
                      out_dist=act)
    rep.assert_ok(comm)


@pytest.mark.parametrize("name, dtype", [(n, "float64") for n in LINEAR_CASES]
                         + [("uneven", "float32")])
@mpi(ranks=RANKS, timeout=120)
def test_linear_all_strategies(comm, name, dtype):
    set_default_dtype(dtype)
    N, fin, fout, bias = LINEAR_CASES[name]
    x = draw((N, fin), 2)
    rep = Report()
    for st in strategies(comm.size):
        nn.manual_seed(5)
        m = nn.Linear(fin, fout, bias=bias, strategy=st)
        compare_model(m, x, rep, f"{name} {label(st)}", out_dist=st.activation_distribution(2))
    rep.assert_ok(comm)


@mpi(ranks=RANKS, timeout=120)
def test_state_dict_keys_and_round_trip(comm):
    """Keys equal torch's; a torch-initialised state dict loads under every strategy, the
    outputs match torch and state_dict() gives the same arrays back."""
    set_default_dtype(np.float64)
    rep = Report()
    torch.manual_seed(0)
    tconv = {b: torch.nn.Conv2d(5, 7, (3, 2), stride=2, padding=1, bias=b).double()
             for b in (True, False)}
    tlin = {b: torch.nn.Linear(6, 5, bias=b).double() for b in (True, False)}
    x4 = draw((3, 5, 7, 6), 11)
    x2 = draw((3, 6), 12)
    for st in strategies(comm.size):
        for b in (True, False):
            for dc_mod, tmod, x in (
                    (nn.Conv2d(5, 7, (3, 2), stride=2, padding=1, bias=b, strategy=st),
                     tconv[b], x4),
                    (nn.Linear(6, 5, bias=b, strategy=st), tlin[b], x2)):
                what = f"{type(dc_mod).__name__} bias={b} {label(st)}"
                tkeys = list(tmod.state_dict().keys())
                rep.expect(f"{what} keys", list(dc_mod.state_dict().keys()) == tkeys,
                           f"{list(dc_mod.state_dict().keys())} != {tkeys}")
                rep.expect(f"{what} parameter names",
                           [n for n, _ in dc_mod.named_parameters()]
                           == [n for n, _ in tmod.named_parameters()])
                tsd = {k: v.detach().numpy().copy() for k, v in tmod.state_dict().items()}
                dc_mod.load_state_dict(tsd)
                back = dc_mod.state_dict()
                for k, v in tsd.items():
                    rep.expect(f"{what} round trip {k}",
                               back[k].shape == v.shape and np.array_equal(back[k], v))
                y = dc_mod(x).to_global()
                rep.check(f"{what} y after load", y, tmod(torch.tensor(x)))
    rep.assert_ok(comm)


@mpi(ranks=RANKS, timeout=60)
def test_load_state_dict_errors(comm):
    """Missing/unexpected keys and a wrong shape raise torch's RuntimeError on every rank."""
    set_default_dtype(np.float64)
    m = nn.Conv2d(3, 4, 3, strategy=strategies(comm.size)[-1])
    sd = m.state_dict()
    bad = dict(sd)
    del bad["bias"]
    with pytest.raises(RuntimeError, match='Missing key.*"bias"'):
        m.load_state_dict(bad)
    with pytest.raises(RuntimeError, match='Unexpected key.*"extra"'):
        m.load_state_dict(dict(sd, extra=np.zeros(1)))
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        m.load_state_dict(dict(sd, weight=np.zeros((4, 3, 2, 3))))
    m.load_state_dict(bad, strict=False)  # non-strict: loads what is there
    assert all(np.array_equal(m.state_dict()[k], sd[k]) for k in sd)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@mpi(ranks=RANKS, timeout=120)
def test_set_strategy(comm, kind):
    """Moving one layer through every strategy keeps its global weights bit-identical and
    its results equal to torch's and to those of the first strategy."""
    set_default_dtype(np.float64)
    sts = strategies(comm.size)
    nn.manual_seed(2)
    if kind == "conv":
        m = nn.Conv2d(5, 7, 3, stride=2, padding=1, strategy=sts[0])
        x = draw((3, 5, 7, 7), 4)
    else:
        m = nn.Linear(5, 7, strategy=sts[0])
        x = draw((3, 5), 4)
    sd0 = m.state_dict()
    tm = to_torch(m)
    rep = Report()
    first = compare_model(m, x, rep, f"{kind} {label(sts[0])}", tmodel=tm)
    # through every strategy and back, as Strategy objects and as strings
    for st in sts[1:] + sts[:1]:
        arg = st if st.channel == 1 else str(st)
        assert m.set_strategy(arg) is m
        rep.expect(f"{kind} -> {label(st)} strategy", m.strategy == st, f"{m.strategy}")
        rep.expect(f"{kind} -> {label(st)} grads cleared",
                   all(p.grad is None for p in m.parameters()))
        sd = m.state_dict()
        for k in sd0:
            rep.expect(f"{kind} -> {label(st)} {k} identical", np.array_equal(sd[k], sd0[k]))
        got = compare_model(m, x, rep, f"{kind} {label(st)}", tmodel=to_torch(m, sd0),
                            out_dist=st.activation_distribution(4 if kind == "conv" else 2))
        for a, b, what in ((got[0], first[0], "y"), (got[1], first[1], "dx")):
            rep.check(f"{kind} {label(st)} {what} vs {label(sts[0])}", a, b, tol=1e-12)
        for k in first[2]:
            rep.check(f"{kind} {label(st)} grad {k} vs {label(sts[0])}", got[2][k],
                      first[2][k], tol=1e-12)
    rep.assert_ok(comm)


@mpi(ranks=RANKS, timeout=60)
def test_conv_gradients_accumulate(comm):
    """Two backward passes without zero_grad sum their gradients, as in torch."""
    set_default_dtype(np.float64)
    rep = Report()
    for st in strategies(comm.size):
        nn.manual_seed(1)
        m = nn.Conv2d(3, 5, 3, padding=1, strategy=st)
        tm = to_torch(m)
        for i in range(2):
            x = draw((3, 3, 5, 5), 20 + i)
            y = m(x)
            dy = draw(y.shape, 30 + i)
            m.backward(dy)
            xt = torch.tensor(x)
            tm(xt).backward(torch.tensor(dy))
        nn.sync_gradients(m.parameters())
        for name, p in m.named_parameters():
            rep.check(f"{label(st)} accumulated grad {name}", p.grad.to_global(),
                      dict(tm.named_parameters())[name].grad)
    rep.assert_ok(comm)


@mpi(ranks=RANKS, timeout=60)
def test_conv_empty_and_bad_inputs(comm):
    """A batch of 0 runs (empty blocks everywhere); a wrong channel count raises on every
    rank; float64 input into a float32 layer raises TypeError."""
    set_default_dtype(np.float64)
    st = strategies(comm.size)[-1]
    m = nn.Conv2d(4, 6, 3, padding=1, strategy=st)
    y = m(np.zeros((0, 4, 5, 5)))
    assert y.shape == (0, 6, 5, 5)
    dx = m.backward(np.zeros((0, 6, 5, 5)))
    assert dx.shape == (0, 4, 5, 5)
    nn.sync_gradients(m.parameters())
    assert np.all(m.weight.grad.to_global() == 0)
    with pytest.raises(ValueError, match="channels"):
        m(np.zeros((2, 3, 5, 5)))
    set_default_dtype(np.float32)
    m32 = nn.Conv2d(4, 6, 3, strategy=st)
    with pytest.raises(TypeError, match="dtype"):
        m32(np.zeros((2, 4, 5, 5)))
