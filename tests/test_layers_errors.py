"""Bad input to layers and losses raises a clear error on EVERY rank, and never hangs.

Each case runs the same body on all ranks under ``pytest.raises(type, match=...)``: the
MPI harness fails the case if any rank does not raise (or raises something else), and
its per-case timeout turns a hang (one rank raising while the others wait in a
collective) into a failure. Several cases give the ranks *different* input (only one
rank's labels or state dict are bad): the check must still raise on all of them.
"""
import numpy as np
import pytest

from tests.mpi_harness import mpi

RANKS = (1, 2, 3, 4)
T = 30  # per-case timeout (s): everything here takes milliseconds unless it hangs


def strategy(name, p):
    from distconv.strategy import Strategy

    return {"sample": Strategy(), "channel": Strategy(channel=p),
            "filter": Strategy(filter=p)}[name]


STRATS = ["sample", "channel", "filter"]


def f64():
    from distconv.backend import set_default_dtype

    set_default_dtype(np.float64)


def still_works(comm):
    """After the error every rank is still in step: a collective completes."""
    assert comm.allreduce(1) == comm.size


# ------------------------------------------------------------------ shapes and sizes
@pytest.mark.parametrize("strat", STRATS)
@mpi(ranks=RANKS, timeout=T)
def test_conv_in_channels_mismatch(comm, strat):
    from distconv import nn

    f64()
    conv = nn.Conv2d(5, 4, 3, padding=1, strategy=strategy(strat, comm.size))
    x = np.ones((2, 3, 6, 6))
    with pytest.raises(ValueError, match=r"Conv2d\(in_channels=5\) got an input with 3 channels"):
        conv(x)
    # also as a DistTensor already laid out for the layer
    from distconv.tensor import DistTensor

    xd = DistTensor.from_global(x, conv.input_distribution)
    with pytest.raises(ValueError, match=r"in_channels=5.*3 channels"):
        conv(xd)
    with pytest.raises(ValueError, match=r"array of shape \(2, 5, 6\) has 3 dims"):
        conv(np.ones((2, 5, 6)))
    still_works(comm)


@pytest.mark.parametrize("strat", STRATS)
@mpi(ranks=RANKS, timeout=T)
def test_kernel_larger_than_padded_input(comm, strat):
    from distconv import nn

    f64()
    conv = nn.Conv2d(2, 3, kernel_size=7, padding=1, strategy=strategy(strat, comm.size))
    with pytest.raises(ValueError, match=r"convolution output would be empty: input 4x4, "
                                         r"kernel 7x7"):
        conv(np.ones((2, 2, 4, 4)))
    pool = nn.MaxPool2d(5, stride=1, padding=0)
    with pytest.raises(ValueError, match=r"kernel \(5, 5\) is larger than the padded input 4x4"):
        pool(np.ones((2, 2, 4, 4)))
    still_works(comm)


@pytest.mark.parametrize("strat", STRATS)
@mpi(ranks=RANKS, timeout=T)
def test_linear_wrong_in_features(comm, strat):
    from distconv import nn

    f64()
    lin = nn.Linear(5, 3, strategy=strategy(strat, comm.size))
    with pytest.raises(ValueError, match=r"Linear\(in_features=5\) expects input shape "
                                         r"\(N, 5\), got \(4, 6\)"):
        lin(np.ones((4, 6)))
    with pytest.raises(ValueError, match=r"array of shape \(4, 5, 1, 1\) has 4 dims"):
        lin(np.ones((4, 5, 1, 1)))
    still_works(comm)


@pytest.mark.parametrize("strat", STRATS)
@mpi(ranks=RANKS, timeout=T)
def test_backward_dy_wrong_shape(comm, strat):
    from distconv import nn

    f64()
    conv = nn.Conv2d(3, 4, 3, padding=1, strategy=strategy(strat, comm.size))
    conv(np.ones((2, 3, 5, 5)))
    with pytest.raises(ValueError, match=r"Conv2d.backward: dy has shape \(2, 4, 4, 4\), "
                                         r"expected the output shape \(2, 4, 5, 5\)"):
        conv.backward(np.ones((2, 4, 4, 4)))
    still_works(comm)


# ------------------------------------------------------------------ strategies
@pytest.mark.parametrize("layer", ["conv", "linear", "bn"])
@mpi(ranks=RANKS, timeout=T)
def test_strategy_does_not_fit_ranks(comm, layer):
    from distconv import nn
    from distconv.strategy import Strategy

    f64()
    p = comm.size
    make = {"conv": lambda st: nn.Conv2d(4, 4, 3, strategy=st),
            "linear": lambda st: nn.Linear(4, 4, strategy=st),
            "bn": lambda st: nn.BatchNorm2d(4, strategy=st)}[layer]
    s = 3 if p != 3 else 2  # Strategy(sample=3) on 2 ranks, and so on
    with pytest.raises(ValueError, match=rf"strategy sample={s},channel=1,filter=1 needs "
                                         rf"sample\*channel\*filter = {s}\*1\*1 = {s} ranks, "
                                         rf"but there are {p}"):
        make(Strategy(sample=s))
    c = 3 if p != 3 else 2  # channel*filter does not divide the ranks
    with pytest.raises(ValueError, match=rf"needs a multiple of channel\*filter = {c} ranks, "
                                         rf"but there are {p}"):
        make(Strategy(channel=c))
    # set_strategy re-shards an existing layer: the same check, before any data moves
    m = make(Strategy())
    with pytest.raises(ValueError, match=rf"= {s} ranks, but there are {p}"):
        m.set_strategy(Strategy(sample=s))
    still_works(comm)


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("layer", ["conv", "linear", "bn"])
@mpi(ranks=RANKS, timeout=T)
def test_dtype_mismatch(comm, layer):
    from distconv import nn

    f64()
    m, x = {"conv": (lambda: nn.Conv2d(3, 4, 3, strategy=strategy("channel", comm.size)),
                     np.ones((2, 3, 5, 5), np.float32)),
            "linear": (lambda: nn.Linear(3, 4, strategy=strategy("filter", comm.size)),
                       np.ones((2, 3), np.float32)),
            "bn": (lambda: nn.BatchNorm2d(3), np.ones((2, 3, 5, 5), np.float32))}[layer]
    m = m()
    with pytest.raises(TypeError, match=r"input dtype float32 does not match parameter "
                                        r"dtype float64"):
        m(x)
    still_works(comm)


@mpi(ranks=(2, 3, 4), timeout=T)
def test_ranks_pass_different_inputs(comm):
    """A global input that differs between ranks (shape or dtype) is caught on all ranks."""
    from distconv import nn

    f64()
    conv = nn.Conv2d(3, 4, 3, padding=1, strategy=strategy("channel", comm.size))
    last = comm.rank == comm.size - 1
    x = np.ones((3 if last else 2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"ranks disagree on global \(shape, dtype\)"):
        conv(x)
    x = np.ones((2, 3, 5, 5), np.float32 if last else np.float64)
    with pytest.raises(ValueError, match=r"ranks disagree on global \(shape, dtype\)"):
        conv(x)
    still_works(comm)


# ------------------------------------------------------------------ loss labels
def _logits(comm, split_classes):
    """(N=4, K=3) logits: a global array, or a DistTensor split on classes (filter)."""
    from distconv import nn

    z = np.random.default_rng(0).standard_normal((4, 3))
    if not split_classes:
        return z
    lin = nn.Linear(2, 3, strategy=strategy("filter", comm.size))
    return lin(np.ones((4, 2)))


@pytest.mark.parametrize("split_classes", [False, True], ids=["global", "class_split"])
@pytest.mark.parametrize("labels, pattern", [
    ([0, 1, 3, 2], r"labels must be in \[0, 3\), got \[3\]"),
    ([0, -1, 2, 2], r"labels must be in \[0, 3\), got \[-1\]"),
    ([0, 1, 2], r"labels must be integers of shape \(4,\), got int64 of shape \(3,\)"),
    ([[0], [1], [2], [0]], r"labels must be integers of shape \(4,\), got int64 of shape "
                           r"\(4, 1\)"),
    ([0.0, 1.0, 2.0, 0.0], r"labels must be integers of shape \(4,\), got float64"),
], ids=["too_big", "negative", "too_short", "2d", "float"])
@mpi(ranks=RANKS, timeout=T)
def test_cross_entropy_bad_labels(comm, labels, pattern, split_classes):
    from distconv import nn

    f64()
    loss = nn.CrossEntropyLoss()
    z = _logits(comm, split_classes)
    with pytest.raises(ValueError, match=pattern):
        loss(z, np.asarray(labels))
    # a good call afterwards still works on every rank
    assert np.isfinite(loss(z, np.array([0, 1, 2, 0])))
    still_works(comm)


@pytest.mark.parametrize("split_classes", [False, True], ids=["global", "class_split"])
@pytest.mark.parametrize("bad", ["range", "shape"])
@mpi(ranks=RANKS, timeout=T)
def test_cross_entropy_bad_labels_on_one_rank_only(comm, bad, split_classes):
    """Only the last rank passes bad labels: every rank raises (comm.agree), naming it."""
    from distconv import nn

    f64()
    loss = nn.CrossEntropyLoss()
    z = _logits(comm, split_classes)
    last = comm.size - 1
    labels = np.array([0, 1, 2, 0])
    if comm.rank == last:
        labels = np.array([0, 1, 7, 0]) if bad == "range" else np.array([0, 1, 2])
    msg = (r"labels must be in \[0, 3\), got \[7\]" if bad == "range"
           else r"labels must be integers of shape \(4,\)")
    if comm.size > 1:
        msg += rf".* \(on rank\(s\) \[{last}\]\)"
    with pytest.raises(ValueError, match=msg):
        loss(z, labels)
    still_works(comm)


# ------------------------------------------------------------------ state dicts
def _net(comm):
    from distconv import nn

    nn.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, strategy=strategy("channel", comm.size)),
                         nn.BatchNorm2d(5), nn.ReLU(),
                         nn.Conv2d(5, 2, 1, strategy=strategy("filter", comm.size)))


@mpi(ranks=RANKS, timeout=T)
def test_load_state_dict_bad(comm):
    f64()
    net = _net(comm)
    good = net.state_dict()
    assert list(good) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                          "1.running_var", "1.num_batches_tracked", "3.weight", "3.bias"]

    sd = dict(good)
    del sd["0.bias"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "0.bias"\. '):
        net.load_state_dict(sd)
    r = net.load_state_dict(sd, strict=False)  # allowed when not strict
    assert r.missing_keys == ["0.bias"] and r.unexpected_keys == []

    sd = dict(good, extra=np.zeros(2))
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "extra"\. '):
        net.load_state_dict(sd)

    sd = dict(good)
    sd["3.weight"] = np.zeros((2, 5, 3, 3))
    with pytest.raises(RuntimeError, match=r"size mismatch for 3.weight: copying a param with "
                                           r"shape torch.Size\(\[2, 5, 3, 3\]\) from "
                                           r"checkpoint, the shape in current model is "
                                           r"torch.Size\(\[2, 5, 1, 1\]\)"):
        net.load_state_dict(sd)
    # nothing was half-loaded by the failed calls: the state is still the good one
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, good[k])
    still_works(comm)


@pytest.mark.parametrize("bad", ["missing", "shape"])
@mpi(ranks=(2, 3, 4), timeout=T)
def test_load_state_dict_bad_on_one_rank_only(comm, bad):
    """Only rank 0's state dict is bad: every rank raises instead of the others hanging in
    the collectives that load the shards."""
    f64()
    net = _net(comm)
    sd = dict(net.state_dict())
    if comm.rank == 0:
        if bad == "missing":
            del sd["1.running_var"]
        else:
            sd["0.bias"] = np.zeros(6)
    exc, msg = ((RuntimeError, r'Missing key\(s\) in state_dict: "1.running_var".*'
                               r"\(on rank\(s\) \[0\]\)")
                if bad == "missing" else
                (RuntimeError, r"size mismatch for 0.bias: copying a param with shape "
                               r"torch.Size\(\[6\]\).*\(on rank\(s\) \[0\]\)"))
    with pytest.raises(exc, match=msg):
        net.load_state_dict(sd)
    still_works(comm)


# ------------------------------------------------------------------ backward before forward
LAYERS = ["conv", "linear", "bn", "relu", "maxpool", "avgpool", "adaptive", "flatten",
          "sequential", "residual"]


def _layer(name, p):
    from distconv import nn

    return {"conv": lambda: nn.Conv2d(3, 3, 3, padding=1, strategy=strategy("channel", p)),
            "linear": lambda: nn.Linear(3, 3, strategy=strategy("filter", p)),
            "bn": lambda: nn.BatchNorm2d(3),
            "relu": nn.ReLU,
            "maxpool": lambda: nn.MaxPool2d(2),
            "avgpool": lambda: nn.AvgPool2d(2),
            "adaptive": lambda: nn.AdaptiveAvgPool2d(1),
            "flatten": nn.Flatten,
            "sequential": lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()),
            "residual": lambda: nn.Residual(nn.Conv2d(3, 3, 1)),
            }[name]()


@pytest.mark.parametrize("name", LAYERS)
@mpi(ranks=RANKS, timeout=T)
def test_backward_before_forward(comm, name):
    f64()
    m = _layer(name, comm.size)
    dy = np.ones((2, 3) if name == "linear" else (2, 3, 4, 4))
    with pytest.raises(RuntimeError, match=r"\.backward called before forward"):
        m.backward(dy)
    still_works(comm)


@mpi(ranks=RANKS, timeout=T)
def test_backward_needs_recorded_forward_and_loss_first(comm):
    import distconv as dc
    from distconv import nn

    f64()
    conv = _layer("conv", comm.size)
    with dc.no_grad():
        conv(np.ones((2, 3, 4, 4)))
    with pytest.raises(RuntimeError, match=r"Conv2d.backward called before forward \(or its "
                                           r"forward ran under dc.no_grad\(\)\)"):
        conv.backward(np.ones((2, 3, 4, 4)))
    with pytest.raises(RuntimeError, match=r"CrossEntropyLoss.backward called before the "
                                           r"loss was computed"):
        nn.CrossEntropyLoss().backward()
    # eval mode still records (as torch): backward works and gives a gradient
    conv.eval()
    conv(np.ones((2, 3, 4, 4)))
    assert conv.backward(np.ones((2, 3, 4, 4))).shape == (2, 3, 4, 4)
    still_works(comm)
