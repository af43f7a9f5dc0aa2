"""distconv.optim.SGD's and Adam's cache-chunked updates on arrays of several chunks against
torch.optim's functional ``sgd`` and ``adam`` (float64 and float32; SGD with every
combination of momentum, dampening, Nesterov and weight decay, Adam with and without
weight decay), and bit for bit against the whole-array updates they replace. The models'
optimizer tests (tests/test_models.py) use parameters of less than one chunk; these cover
the chunk loop and its tail."""
import numpy as np
import pytest

from distconv import optim

SETTINGS = [
    dict(lr=0.1),
    dict(lr=0.2, weight_decay=1e-3),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, weight_decay=1e-4),
    dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-2),
    dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
]
NUMEL = 2 * optim._CHUNK + 1234  # two whole chunks and a tail



def _whole_array(w, g, buf, s):
    """The whole-array rule (the path for non-contiguous or non-NumPy arrays)."""
    d = g if not s.get("weight_decay") else g + s["weight_decay"] * w
    m = s.get("momentum", 0.0)
    if m:
        buf *= m
        buf += (1 - s.get("dampening", 0.0)) * d
        d = d + m * buf if s.get("nesterov") else buf
    w -= w.dtype.type(s["lr"]) * d


def _run(settings, dtype, steps=3, seed=0):
    """``steps`` updates of one parameter of NUMEL elements fed the same gradients:
    distconv's weights and momentum, the whole-array rule's, and torch's."""
    import torch
    from torch.optim.sgd import sgd

    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(NUMEL).astype(dtype)
    grads = [rng.standard_normal(NUMEL).astype(dtype) for _ in range(steps)]
    fake = optim.SGD.__new__(optim.SGD)
    fake.lr = settings["lr"]
    fake.momentum = float(settings.get("momentum", 0.0))
    fake.weight_decay = float(settings.get("weight_decay", 0.0))
    fake.dampening = float(settings.get("dampening", 0.0))
    fake.nesterov = bool(settings.get("nesterov", False))
    w, state = w0.copy(), {}
    wr, bufr = w0.copy(), None
    tw, tbufs = torch.from_numpy(w0.copy()), [None]
    for k, g in enumerate(grads):
        optim.SGD._update(fake, 0, w, g, state)
        if fake.momentum:
            if bufr is None:  # torch's first step: buf = d
                d = g if not fake.weight_decay else g + fake.weight_decay * wr
                bufr = d.copy()
                wr -= wr.dtype.type(fake.lr) * (d + fake.momentum * bufr
                                                 if fake.nesterov else bufr)
            else:
                _whole_array(wr, g, bufr, settings)
        else:
            _whole_array(wr, g, None, settings)
        with torch.no_grad():
            sgd([tw], [torch.from_numpy(g)], tbufs, weight_decay=fake.weight_decay,
                momentum=fake.momentum, lr=fake.lr, dampening=fake.dampening,
                nesterov=fake.nesterov, maximize=False)
    return w, state.get("momentum_buffer"), wr, bufr, tw.numpy(), tbufs[0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in
                                                                      s.items()))
def test_chunked_sgd_matches_torch_and_whole_array(settings, dtype, torch1):
    w, buf, wr, bufr, tw, tbuf = _run(settings, dtype)
    np.testing.assert_array_equal(w, wr)  # bit for bit: the same operations in order
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w, tw, **tol)
    if settings.get("momentum"):
        np.testing.assert_array_equal(buf, bufr)
        np.testing.assert_allclose(buf, tbuf.numpy(), **tol)


def test_chunked_sgd_negative_control(torch1):
    """The comparison sees a wrong dampening in the chunk loop (the tail included)."""
    s = dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-2)
    w, _, _, _, tw, _ = _run(s, np.float64)
    wrong = dict(s, dampening=0.0)
    w2, _, _, _, _, _ = _run(wrong, np.float64)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(w2, tw, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(w, tw, rtol=1e-12, atol=1e-14)


ADAM = [dict(lr=1e-3), dict(lr=2e-2, betas=(0.8, 0.99), weight_decay=1e-2)]


def _adam_whole(w, g, m, v, s, t):
    """The whole-array Adam rule (the path for non-contiguous or non-NumPy arrays)."""
    import math
    b1, b2 = s.get("betas", (0.9, 0.999))
    if s.get("weight_decay"):
        g = g + s["weight_decay"] * w
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    w -= (s["lr"] / bc1) * (m / ((v ** 0.5) / math.sqrt(bc2) + 1e-8))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("settings", ADAM, ids=lambda s: ",".join(f"{k}={v}" for k, v in
                                                                  s.items()))
def test_chunked_adam_matches_torch_and_whole_array(settings, dtype, torch1):
    import torch
    from torch.optim.adam import adam

    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(NUMEL).astype(dtype)
    opt = optim.Adam.__new__(optim.Adam)
    opt.lr, opt.betas = settings["lr"], tuple(settings.get("betas", (0.9, 0.999)))
    opt.eps, opt.weight_decay = 1e-8, float(settings.get("weight_decay", 0.0))
    w, state = w0.copy(), {}
    wr, mr, vr = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
    tw = torch.from_numpy(w0.copy())
    tm, tv, ts = [torch.zeros_like(tw)], [torch.zeros_like(tw)], [torch.tensor(0.0)]
    for t in range(1, 4):
        g = rng.standard_normal(NUMEL).astype(dtype)
        optim.Adam._update(opt, 0, w, g, state)
        _adam_whole(wr, g, mr, vr, settings, t)
        with torch.no_grad():
            adam([tw], [torch.from_numpy(g)], tm, tv, [], ts, amsgrad=False,
                 beta1=opt.betas[0], beta2=opt.betas[1], lr=opt.lr,
                 weight_decay=opt.weight_decay, eps=1e-8, maximize=False)
    np.testing.assert_array_equal(w, wr)  # bit for bit
    np.testing.assert_array_equal(state["exp_avg"], mr)
    np.testing.assert_array_equal(state["exp_avg_sq"], vr)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w, tw.numpy(), **tol)
    np.testing.assert_allclose(state["exp_avg_sq"], tv[0].numpy(), **tol)
