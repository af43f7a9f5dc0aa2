"""distconv.ops pooling, batch-norm, ReLU and loss helpers against PyTorch (float64 oracle)."""
import numpy as np
import pytest
import torch

from distconv.ops import activation as A
from distconv.ops import batchnorm as BN
from distconv.ops import loss as LS
from distconv.ops import pool as P
from tests.tolerance import RTOL, rel_err  # noqa: F401

torch.set_num_threads(1)





def assert_close(actual, expected, dtype, what="", rtol=None):
    dtype = np.dtype(dtype)
    assert np.asarray(actual).dtype == dtype, f"{what}: dtype {np.asarray(actual).dtype} != {dtype}"
    tol = RTOL[dtype] if rtol is None else rtol
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


DTYPES = [np.float64, np.float32]

# ---------------------------------------------------------------- pooling
POOL_CASES = [  # (N, C, H, W, kernel, stride, padding)
    (2, 3, 7, 9, (3, 3), (2, 2), (1, 1)),   # ResNet stem pool, odd sizes
    (2, 3, 8, 8, (2, 2), (2, 2), (0, 0)),
    (1, 2, 9, 7, (3, 2), (1, 2), (1, 0)),   # rectangular, not dividing evenly
    (2, 2, 5, 5, (5, 5), (1, 1), (2, 2)),
    (0, 3, 6, 6, (3, 3), (2, 2), (1, 1)),   # empty
    (2, 0, 6, 6, (2, 2), (2, 2), (0, 0)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool(case, dtype):
    N, C, H, W, k, s, p = case
    rng = np.random.default_rng(0)
    # small integers -> many ties, which must break as in PyTorch
    x = rng.integers(-3, 4, (N, C, H, W)).astype(dtype)
    if C == 0:  # torch refuses C == 0; the answer is empty anyway
        y, arg = P.max_pool2d_forward(x, k, s, p)
        assert y.shape[:2] == (N, 0) and y.dtype == np.dtype(dtype)
        assert P.max_pool2d_backward(y, arg, x.shape, k, s, p).shape == x.shape
        return
    xt = t64(x, True)
    yt = torch.nn.functional.max_pool2d(xt, k, s, p)
    dy = rng.standard_normal(tuple(yt.shape)).astype(dtype)
    if yt.numel():
        yt.backward(t64(dy))
    y, arg = P.max_pool2d_forward(x, k, s, p)
    dx = P.max_pool2d_backward(dy, arg, x.shape, k, s, p)
    assert_close(y, yt.detach().numpy(), dtype, "y")
    gref = xt.grad.numpy() if xt.grad is not None else np.zeros(x.shape)
    assert_close(dx, gref, dtype, "dx")


def test_max_pool_nan_and_all_negative():
    x = -np.arange(1.0, 26.0).reshape(1, 1, 5, 5)
    x[0, 0, 3, 3] = np.nan
    xt = t64(x, True)
    yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    yt.backward(torch.ones_like(yt))
    y, arg = P.max_pool2d_forward(x, (3, 3), (2, 2), (1, 1))
    dx = P.max_pool2d_backward(np.ones_like(y), arg, x.shape, (3, 3), (2, 2), (1, 1))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(yt.detach().numpy()))
    np.testing.assert_array_equal(np.nan_to_num(y), np.nan_to_num(yt.detach().numpy()))
    np.testing.assert_array_equal(dx, xt.grad.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_avg_pool(case, dtype):
    N, C, H, W, k, s, p = case
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    if C == 0:  # torch refuses C == 0; the answer is empty anyway
        y = P.avg_pool2d_forward(x, k, s, p)
        assert y.shape[:2] == (N, 0) and y.dtype == np.dtype(dtype)
        assert P.avg_pool2d_backward(y, x.shape, k, s, p).shape == x.shape
        return
    xt = t64(x, True)
    yt = torch.nn.functional.avg_pool2d(xt, k, s, p)  # count_include_pad=True, ceil_mode=False
    dy = rng.standard_normal(tuple(yt.shape)).astype(dtype)
    if yt.numel():
        yt.backward(t64(dy))
    y = P.avg_pool2d_forward(x, k, s, p)
    dx = P.avg_pool2d_backward(dy, x.shape, k, s, p)
    assert_close(y, yt.detach().numpy(), dtype, "y")
    gref = xt.grad.numpy() if xt.grad is not None else np.zeros(x.shape)
    assert_close(dx, gref, dtype, "dx")


def test_pool_stride_default_and_bad_padding():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    y, _ = P.max_pool2d_forward(x, (2, 2), None, (0, 0))
    np.testing.assert_array_equal(y[0, 0], [[5, 7], [13, 15]])
    with pytest.raises(ValueError, match="half of the kernel"):
        P.avg_pool2d_forward(x, (2, 2), (2, 2), (2, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (0, 4, 3, 3), (2, 0, 3, 3)])
def test_global_avg_pool(shape, dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(dtype)
    if shape[1] == 0:
        assert P.global_avg_pool_forward(x).shape == shape[:2] + (1, 1)
        assert P.global_avg_pool_backward(np.zeros(shape[:2] + (1, 1), dtype), shape).shape == shape
        return
    xt = t64(x, True)
    yt = torch.nn.functional.adaptive_avg_pool2d(xt, 1)
    dy = rng.standard_normal(tuple(yt.shape)).astype(dtype)
    if yt.numel():
        yt.backward(t64(dy))
    y = P.global_avg_pool_forward(x)
    dx = P.global_avg_pool_backward(dy, x.shape)
    assert y.shape == shape[:2] + (1, 1)
    assert_close(y, yt.detach().numpy(), dtype, "y")
    gref = xt.grad.numpy() if xt.grad is not None else np.zeros(x.shape)
    assert_close(dx, gref, dtype, "dx")


# ---------------------------------------------------------------- batch norm
def bn_distconv(x, weight, bias, dy, eps, splits=1):
    """The full SyncBN path, with the batch split into ``splits`` 'ranks' whose sums are added."""
    parts = np.array_split(x, splits, axis=0)
    dparts = np.array_split(dy, splits, axis=0)
    stats = [BN.bn_local_stats(p) for p in parts]
    s = sum(t[0] for t in stats)
    ss = sum(t[1] for t in stats)
    n = sum(t[2] for t in stats)
    mean, invstd, var_u = BN.bn_mean_invstd(s, ss, n, eps)
    y = np.concatenate([BN.bn_forward_apply(p, mean, invstd, weight, bias) for p in parts])
    red = [BN.bn_backward_reduce(d, p, mean) for d, p in zip(dparts, parts)]
    sdy = sum(r[0] for r in red)
    sdyx = sum(r[1] for r in red)
    dx = np.concatenate([BN.bn_backward_apply(d, p, mean, invstd, weight, sdy, sdyx, n)
                         for d, p in zip(dparts, parts)])
    dw, db = BN.bn_param_grads(sdy, sdyx, invstd)
    return y, dx, dw, db, mean, var_u


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,splits,offset", [((4, 5, 7, 9), 1, 0.0), ((5, 3, 4, 4), 3, 0.0),
                                                 ((4, 6, 8, 8), 2, 100.0),  # mean >> std
                                                 ((6, 2, 1, 1), 2, 0.0)])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_matches_torch(shape, splits, offset, affine, dtype):
    rng = np.random.default_rng(5)
    C = shape[1]
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 2, (1, C, 1, 1)) + offset).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, C).astype(dtype) if affine else None
    bias = rng.standard_normal(C).astype(dtype) if affine else None
    eps = 1e-5
    xt = t64(x, True)
    wt = t64(weight, True) if affine else None
    bt = t64(bias, True) if affine else None
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    yt = torch.nn.functional.batch_norm(xt, rm, rv, wt, bt, training=True, momentum=1.0, eps=eps)
    yt.backward(t64(dy))
    y, dx, dw, db, mean, var_u = bn_distconv(x, weight, bias, dy, eps, splits)
    assert_close(y, yt.detach().numpy(), dtype, "y")
    assert_close(dx, xt.grad.numpy(), dtype, "dx")
    # momentum=1 -> the running stats are exactly this batch's mean and unbiased variance
    np.testing.assert_allclose(mean, rm.numpy(), rtol=RTOL[np.dtype(dtype)], atol=1e-6)
    np.testing.assert_allclose(var_u, rv.numpy(), rtol=RTOL[np.dtype(dtype)])
    if affine:
        assert_close(dw.astype(dtype), wt.grad.numpy(), dtype, "dweight")
        assert_close(db.astype(dtype), bt.grad.numpy(), dtype, "dbias")


def test_batchnorm_empty_local_block():
    x = np.zeros((0, 3, 4, 4), np.float32)
    s, ss, n = BN.bn_local_stats(x)
    assert s.shape == (3,) and n == 0 and not s.any() and not ss.any()
    sdy, sdyx = BN.bn_backward_reduce(x, x, np.zeros(3))
    assert sdy.shape == (3,) and not sdy.any()
    y = BN.bn_forward_apply(x, np.zeros(3), np.ones(3), None, None)
    assert y.shape == x.shape and y.dtype == np.float32
    dx = BN.bn_backward_apply(x, x, np.zeros(3), np.ones(3), None, np.zeros(3), np.zeros(3), 10)
    assert dx.shape == x.shape
    with pytest.raises(ValueError, match="zero elements"):
        BN.bn_mean_invstd(s, ss, 0)


# ---------------------------------------------------------------- relu, loss
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu(dtype):
    x = np.array([[-2.0, -0.0, 0.0, 1e-30, 3.0, np.nan]], dtype)
    dy = np.arange(1.0, 7.0, dtype=dtype).reshape(1, 6)
    xt = t64(x, True)
    yt = torch.relu(xt)
    yt.backward(t64(dy))
    y = A.relu_forward(x)
    dx = A.relu_backward(dy, y)
    np.testing.assert_array_equal(y, yt.detach().numpy().astype(dtype))
    np.testing.assert_array_equal(dx, xt.grad.numpy().astype(dtype))
    assert y.dtype == dx.dtype == np.dtype(dtype)
    e = np.zeros((0, 3), dtype)
    assert A.relu_forward(e).shape == (0, 3) and A.relu_backward(e, e).shape == (0, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_and_cross_entropy(dtype):
    rng = np.random.default_rng(6)
    z = (rng.standard_normal((5, 7)) * 30).astype(dtype)
    z[0, :] = 1000.0  # would overflow a naive exp
    labels = rng.integers(0, 7, 5)
    zt = t64(z, True)
    assert_close(LS.logsumexp(z, axis=1), torch.logsumexp(zt, 1).detach().numpy(), dtype, "lse")
    assert_close(LS.log_softmax(z), torch.log_softmax(zt, 1).detach().numpy(), dtype, "lsm")
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(labels), reduction="sum")
    lt.backward()
    loss, probs = LS.cross_entropy_forward_local(z, labels)
    assert np.isfinite(loss)
    assert abs(loss - lt.item()) <= RTOL[np.dtype(dtype)] * max(1.0, abs(lt.item()))
    assert_close(LS.cross_entropy_backward_local(probs, labels), zt.grad.numpy(), dtype, "dz")
    assert LS.logsumexp(np.full((2, 3), -np.inf), axis=1).tolist() == [-np.inf, -np.inf]


def test_negative_control():
    """The comparison helper rejects a result that is off by a little (tests can fail)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 6, 6))
    ref = torch.nn.functional.avg_pool2d(t64(x), 2).numpy()
    y = P.avg_pool2d_forward(x, (2, 2), (2, 2), (0, 0))
    assert_close(y, ref, np.float64, "y")
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(y * (1 + 1e-9), ref, np.float64, "perturbed")
    # a max pool returning the wrong tie-breaking index would move gradient elsewhere
    x = np.ones((1, 1, 2, 2))
    y, arg = P.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0))
    dx = P.max_pool2d_backward(np.ones_like(y), arg + 1, x.shape, (2, 2), (2, 2), (0, 0))
    xt = t64(x, True)
    torch.nn.functional.max_pool2d(xt, 2).sum().backward()
    with pytest.raises(AssertionError):
        assert_close(dx, xt.grad.numpy(), np.float64, "wrong argmax")
