"""BatchNorm2d, ReLU, pooling, Flatten and CrossEntropyLoss under every Strategy that fits
1-4 ranks, against PyTorch float64 (tests/torch_ref.py); plus negative controls proving
that the comparison does catch a wrong reduction.
"""
import numpy as np
import pytest
import torch

from distconv import nn
from distconv.backend import set_default_dtype
from distconv.strategy import Strategy
from distconv.tensor import DistTensor
from tests.mpi_harness import mpi
from tests.torch_ref import (Report, compare_model, draw, label, labels_for, randomize,
                             strategies, to_torch)

RANKS = (1, 2, 3, 4)

# ------------------------------------------------------------------ batch norm
# (N, C, H, W, kwargs)
BN_CASES = {
    "uneven": (3, 5, 4, 3, {}),
    "cma-noaffine": (4, 7, 3, 3, dict(momentum=None, affine=False)),
    "batch1": (1, 5, 3, 4, dict(momentum=0.3)),
    "no-running-stats": (3, 6, 3, 2, dict(track_running_stats=False)),
}


def _bn_train_eval(m, shape, rep, what, seed):
    """Two training steps (y, dx, grads, running stats after each), then eval."""
    randomize(m, seed)
    tm = to_torch(m)
    xs = [draw(shape, seed + 1) * 2 + 0.5, draw(shape, seed + 2)]
    act = m.strategy.activation_distribution(4)
    compare_model(m, xs, rep, f"{what} train", tmodel=tm, out_dist=act)
    m.eval()
    tm.eval()
    compare_model(m, draw(shape, seed + 3), rep, f"{what} eval", tmodel=tm, x_dist=act,
                  dy_dist=act)
    m.train()


@pytest.mark.parametrize("name, dtype", [(n, "float64") for n in BN_CASES]
                         + [("uneven", "float32")])
@mpi(ranks=RANKS, timeout=120)
def test_batchnorm_all_strategies(comm, name, dtype):
    set_default_dtype(dtype)
    N, C, H, W, kw = BN_CASES[name]
    rep = Report()
    for st in strategies(comm.size):
        m = nn.BatchNorm2d(C, strategy=st, **kw)
        _bn_train_eval(m, (N, C, H, W), rep, f"{name} {label(st)}", 40)
    rep.assert_ok(comm)


@mpi(ranks=RANKS, timeout=120)
def test_batchnorm_local_stats(comm):
    """global_stats=False: statistics per sample group, as torch run on each group's
    block of samples; running statistics averaged over the groups."""
    set_default_dtype(np.float64)
    rep = Report()
    for st in strategies(comm.size):
        for shape in ((4, 5, 3, 3), (6, 7, 2, 3)):
            m = nn.BatchNorm2d(shape[1], strategy=st, global_stats=False)
            _bn_train_eval(m, shape, rep, f"local {shape} {label(st)}", 50)
    rep.assert_ok(comm)


@mpi(ranks=(2, 3, 4), timeout=60)
def test_batchnorm_local_stats_empty_group_raises_everywhere(comm):
    """global_stats=False with fewer samples than sample groups: the same ValueError on
    every rank (not a hang of the ranks that do have samples)."""
    set_default_dtype(np.float64)
    m = nn.BatchNorm2d(3, strategy=Strategy(sample=comm.size), global_stats=False)
    with pytest.raises(ValueError, match="more than 1 value"):
        m(draw((1, 3, 2, 2), 1))
    # the layer still works afterwards
    m(draw((comm.size, 3, 2, 2), 2))


@mpi(ranks=(1, 2), timeout=60)
def test_batchnorm_state_dict_keys(comm):
    set_default_dtype(np.float64)
    for kw in ({}, dict(affine=False), dict(track_running_stats=False)):
        st = strategies(comm.size)[-1]
        m = nn.BatchNorm2d(5, strategy=st, **kw)
        t = torch.nn.BatchNorm2d(5, **kw)
        assert list(m.state_dict().keys()) == list(t.state_dict().keys()), kw
        assert [n for n, _ in m.named_parameters()] == [n for n, _ in t.named_parameters()]
        # torch's initial state loads and comes back unchanged, incl. num_batches_tracked
        tsd = {k: v.numpy().copy() for k, v in t.double().state_dict().items()}
        if "num_batches_tracked" in tsd:
            tsd["num_batches_tracked"] = np.array(7, np.int64)
            tsd["running_var"] = np.linspace(0.5, 1.5, 5)
        m.load_state_dict(tsd)
        back = m.state_dict()
        for k in tsd:
            assert back[k].dtype == tsd[k].dtype and np.array_equal(back[k], tsd[k]), k


@mpi(ranks=RANKS, timeout=60)
def test_batchnorm_rejects_one_value_per_channel(comm):
    """PyTorch refuses to train with one value per channel; so does distconv, everywhere."""
    set_default_dtype(np.float64)
    m = nn.BatchNorm2d(4, strategy=strategies(comm.size)[-1])
    with pytest.raises(ValueError, match="more than 1 value"):
        m(draw((1, 4, 1, 1), 3))


# ------------------------------------------------------------------ activations and pooling
LAYERS = {
    "relu": lambda: nn.ReLU(),
    "maxpool-3s2p1": lambda: nn.MaxPool2d(3, stride=2, padding=1),
    "maxpool-rect": lambda: nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 0)),
    "maxpool-2": lambda: nn.MaxPool2d(2),
    "avgpool-3s2p1": lambda: nn.AvgPool2d(3, stride=2, padding=1),
    "avgpool-rect": lambda: nn.AvgPool2d((3, 2), stride=(2, 1), padding=(1, 1)),
    "adaptive": lambda: nn.AdaptiveAvgPool2d(1),
    "flatten": lambda: nn.Flatten(),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@mpi(ranks=RANKS, timeout=120)
def test_parameterless_layers_all_strategies(comm, dtype):
    """Each layer on inputs in every strategy's activation layout (and as a global array):
    y and dx match torch and keep the input's N and C split. Integer-valued inputs make
    ties (ReLU at 0, equal maxima) that must break as in torch."""
    set_default_dtype(dtype)
    rep = Report()
    for N, C, H, W in ((3, 5, 7, 6), (1, 7, 5, 5))[:2 if dtype == "float64" else 1]:
        xi = np.random.default_rng(N).integers(-3, 4, (N, C, H, W)).astype(dtype)
        xf = draw((N, C, H, W), 60 + N)
        x1 = draw((N, C, 1, 1), 70 + N)
        for name, make in LAYERS.items():
            xs = [xi] if name.startswith(("relu", "max")) else [xf]
            if name == "flatten":
                xs.append(x1)   # H*W == 1: the C split carries over to the features
            for x in xs:
                what = f"{name} {x.shape}"
                compare_model(make(), x, rep, f"{what} global",
                              out_dist=None if name == "flatten"
                              else Strategy().activation_distribution(4))
                for st in strategies(comm.size):
                    act = st.activation_distribution(4)
                    keep = None if name == "flatten" else act
                    if name == "flatten" and x.shape[2] * x.shape[3] == 1:
                        keep = st.activation_distribution(2)
                    compare_model(make(), x, rep, f"{what} {label(st)}", x_dist=act,
                                  out_dist=keep, dy_dist=keep)
    rep.assert_ok(comm)


# ------------------------------------------------------------------ cross entropy
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@mpi(ranks=RANKS, timeout=120)
def test_cross_entropy_all_strategies(comm, dtype):
    """Loss, dlogits, dx and gradients of Linear -> CrossEntropyLoss, the classes split
    whenever channel*filter > 1; also logits given directly (global or DistTensor)."""
    set_default_dtype(dtype)
    rep = Report()
    K = 7
    for N in (3, 1, 4) if dtype == "float64" else (3,):
        x = draw((N, 6), 80 + N)
        lab = labels_for(N, K, 90 + N)
        for st in strategies(comm.size):
            nn.manual_seed(9)
            m = nn.Linear(6, K, strategy=st)
            compare_model(m, x, rep, f"linear+CE N={N} {label(st)}", labels=lab)
            # logits straight into the loss, split like the activations of st
            z = draw((N, K), 100 + N) * 3
            zt = torch.tensor(z.astype(np.float64), requires_grad=True)
            lt = torch.nn.functional.cross_entropy(zt, torch.tensor(lab))
            lt.backward()
            for zin in (z, DistTensor.from_global(z, st.activation_distribution(2))):
                crit = nn.CrossEntropyLoss()
                loss = crit(zin, lab)
                g = crit.backward()
                kind = "global" if isinstance(zin, np.ndarray) else "dist"
                rep.check(f"CE {kind} N={N} {label(st)} loss", np.float64(loss), lt, dtype=False)
                rep.check(f"CE {kind} N={N} {label(st)} dlogits", g.to_global(), zt.grad)
                if kind == "dist":
                    rep.expect(f"CE N={N} {label(st)} dlogits distribution",
                               g.distribution == zin.distribution)
    rep.assert_ok(comm)


@mpi(ranks=(1, 2), timeout=60)
def test_cross_entropy_bad_labels_raise_everywhere(comm):
    set_default_dtype(np.float64)
    crit = nn.CrossEntropyLoss()
    z = draw((3, 4), 1)
    with pytest.raises(ValueError, match="labels"):
        crit(z, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="labels"):
        crit(z, np.array([0.0, 1.0, 1.0]))


# ------------------------------------------------------------------ negative controls
@mpi(ranks=(2, 3, 4), timeout=60)
def test_negative_control_wrong_bn_reduction(comm):
    """Batch-norm statistics reduced over the wrong communicator (each rank alone instead
    of its sample group) must be REPORTED as a mismatch by the same comparison that
    passes for the real layer."""
    set_default_dtype(np.float64)
    st = Strategy(sample=comm.size)
    shape = (4, 5, 3, 3)

    def run():
        rep = Report()
        m = nn.BatchNorm2d(5, strategy=st)
        randomize(m, 3)
        compare_model(m, draw(shape, 4), rep, "bn")
        return rep.merged(comm)

    assert run() == []  # positive control
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.BatchNorm2d, "_group_axes", lambda self: ())
        errs = run()
    assert any("bn y: relative error" in e for e in errs), errs
    assert any("bn dx: relative error" in e for e in errs), errs
    assert any("running_mean" in e for e in errs), errs


@mpi(ranks=(2, 4), timeout=60)
def test_negative_control_skipped_gradient_sum(comm):
    """Weight gradients not summed over the sample groups (pending axes dropped, so
    sync_gradients has nothing to do) must be reported."""
    set_default_dtype(np.float64)
    st = Strategy(sample=2, channel=comm.size // 2)
    orig = nn.Parameter.accumulate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Parameter, "accumulate",
                   lambda self, g, pending: orig(self, g, ()))
        rep = Report()
        nn.manual_seed(1)
        m = nn.Conv2d(3, 4, 3, padding=1, strategy=st)
        compare_model(m, draw((4, 3, 5, 5), 1), rep, "conv")
        errs = rep.merged(comm)
    assert not any(("conv y" in e or "conv dx" in e) for e in errs), errs
    assert any("conv grad weight: relative error" in e for e in errs), errs
    assert any("conv grad bias: relative error" in e for e in errs), errs


@mpi(ranks=RANKS, timeout=60)
def test_negative_control_tolerance_is_tight(comm):
    """A reference whose weights differ by 1e-8 (relative) is caught at float64's 1e-10;
    a dtype mismatch or a shape mismatch is caught too."""
    set_default_dtype(np.float64)
    st = strategies(comm.size)[-1]
    nn.manual_seed(3)
    m = nn.Conv2d(3, 4, 3, strategy=st)
    sd = m.state_dict()
    off = dict(sd, weight=sd["weight"] * (1 + 1e-8))
    rep = Report()
    compare_model(m, draw((2, 3, 5, 5), 1), rep, "conv", tmodel=to_torch(m, off))
    errs = rep.merged(comm)
    assert any("conv y: relative error" in e for e in errs), errs
    rep = Report()
    rep.check("f32", np.zeros(3, np.float32), np.zeros(3))
    rep.check("shape", np.zeros(3), np.zeros(4))
    rep.check("nan", np.full(3, np.nan), np.zeros(3))
    assert len(rep.merged(comm)) == 3
