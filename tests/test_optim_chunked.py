"""distconv.optim.SGD's cache-chunked update on arrays of several chunks against
torch.optim's functional SGD (float64 and float32, every combination of momentum,
dampening, Nesterov and weight decay), and bit for bit against the whole-array update
it replaces. The models' optimizer tests (tests/test_models.py) use parameters of less
than one chunk; these cover the chunk loop and its tail."""
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


@pytest.fixture
def torch1():
    """torch on one thread, restored after the test."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(n)


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
