"""Pooling modes, adaptive average pooling, dropout masks, Inception-style non-square
convolutions and batch norm with eps=1e-3, in distconv.ops, against PyTorch (float64 oracle).

Every oracle check comes with a negative control: the same comparison applied to a
plausible wrong answer (wrong divisor, floor instead of ceil, uniform bins, local instead
of global indices, ...) must fail, so a check that cannot fail would be noticed.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from distconv import ops
from distconv.ops import batchnorm as BN
from distconv.ops import conv as C
from distconv.ops import dropout as D
from distconv.ops import pool as P
from tests.tolerance import RTOL, rel_err

torch.set_num_threads(1)

DTYPES = [np.float64, np.float32]


def close(actual, expected, dtype):
    """True when dtype, shape and the normwise relative error are within RTOL[dtype]."""
    dtype = np.dtype(dtype)
    a = np.asarray(actual)
    e = np.asarray(expected)
    if a.dtype != dtype or a.shape != e.shape:
        return False
    return rel_err(a, e) <= RTOL[dtype]


def assert_close(actual, expected, dtype, what=""):
    dtype = np.dtype(dtype)
    a = np.asarray(actual)
    assert a.dtype == dtype, f"{what}: dtype {a.dtype} != {dtype}"
    assert a.shape == np.shape(expected), f"{what}: shape {a.shape} != {np.shape(expected)}"
    err = rel_err(a, expected)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3e} > {RTOL[dtype]:.0e}"


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def torch_pool(fn, x, dy_seed, **kw):
    """(y, dx, dy) from torch in float64 with a random upstream gradient of y's shape."""
    xt = t64(x, True)
    yt = fn(xt, **kw)
    dy = np.random.default_rng(dy_seed).standard_normal(tuple(yt.shape)).astype(x.dtype)
    yt.backward(t64(dy))
    return yt.detach().numpy(), xt.grad.numpy(), dy


# ------------------------------------------------------------------ output size
# (H, kernel, stride, padding): cases where ceil mode adds a window, where PyTorch's
# "last window must start inside the input or left padding" rule removes it again,
# and where ceil and floor agree.
SIZE_CASES = [(7, 3, 2, 0), (8, 3, 2, 0), (5, 2, 2, 1), (6, 2, 2, 1), (13, 3, 2, 0),
              (55, 3, 2, 0), (10, 4, 3, 2), (9, 3, 3, 1), (4, 3, 2, 1), (1, 1, 2, 0),
              (11, 5, 4, 2), (3, 3, 3, 0), (2, 2, 3, 1)]


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("H,k,s,p", SIZE_CASES)
def test_pool_output_size_matches_torch(H, k, s, p, ceil_mode):
    x = torch.zeros(1, 1, H, H + 1)
    ref = tuple(TF.max_pool2d(x, (k, k + 1), (s, s), (p, p), ceil_mode=ceil_mode).shape[2:])
    ref_avg = tuple(TF.avg_pool2d(x, (k, k + 1), (s, s), (p, p), ceil_mode=ceil_mode).shape[2:])
    assert ref == ref_avg
    assert P.pool2d_output_hw(H, H + 1, (k, k + 1), (s, s), (p, p), ceil_mode) == ref


def test_pool_output_size_rule_is_needed():
    """Negative control: plain ceil((H + 2p - k)/s) + 1 without PyTorch's last-window rule
    disagrees with torch in a case of SIZE_CASES, so the test above can fail."""
    H, k, s, p = 5, 2, 2, 1
    naive = math.ceil((H + 2 * p - k) / s) + 1
    ref = TF.max_pool2d(torch.zeros(1, 1, H, H), k, s, p, ceil_mode=True).shape[2]
    assert naive != ref == P.pool_output_size(H, k, s, p, True)


def test_pool_bad_geometry_raises():
    with pytest.raises(ValueError, match="half of the kernel"):
        P.pool2d_output_hw(8, 8, (3, 1), 1, (1, 1))
    with pytest.raises(ValueError, match="output would be empty"):
        P.pool2d_output_hw(2, 8, 3, 1, 0, ceil_mode=True)
    with pytest.raises(ValueError, match="stride >= 1"):
        P.pool2d_output_hw(8, 8, 3, 0, 0)


# -------------------------------------------------------------------- max pool
# (N, C, H, W, kernel, stride, padding)
MAX_CASES = [
    (2, 3, 8, 10, (3, 3), (2, 2), (0, 0)),  # ceil adds a column and a row
    (2, 2, 13, 13, (3, 3), (2, 2), (0, 0)),  # AlexNet/VGG-like 13 -> 6
    (1, 2, 5, 6, (2, 2), (2, 2), (1, 1)),   # last window dropped by the rule in H
    (2, 2, 9, 8, (3, 2), (2, 3), (1, 0)),   # non-square kernel, stride, padding
    (1, 3, 8, 11, (3, 4), (2, 3), (1, 2)),  # windows clipped by ceil beyond the padding
    (2, 1, 8, 8, (2, 2), (2, 2), (0, 0)),   # ceil == floor (GPU-kernel path)
    (1, 2, 6, 11, (1, 3), (1, 2), (0, 1)),  # 1xk
    (0, 2, 7, 7, (3, 3), (2, 2), (1, 1)),   # empty batch
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ceil_mode", [True, False])
@pytest.mark.parametrize("case", MAX_CASES)
def test_max_pool_ceil_mode(case, ceil_mode, dtype):
    N, Cc, H, W, k, s, p = case
    rng = np.random.default_rng(abs(hash((case, ceil_mode))) % 2 ** 32)
    # small integers -> many ties, which must break as in PyTorch; a few -inf too
    x = rng.integers(-3, 4, (N, Cc, H, W)).astype(dtype)
    if x.size:
        x.flat[rng.integers(0, x.size, 3)] = -np.inf
    y_ref, dx_ref, dy = torch_pool(TF.max_pool2d, x, 1, kernel_size=k, stride=s, padding=p,
                                   ceil_mode=ceil_mode)
    y, arg = P.max_pool2d_forward(x, k, s, p, ceil_mode=ceil_mode)
    assert arg.dtype == np.uint8 and arg.shape == y.shape
    dx = P.max_pool2d_backward(dy, arg, x.shape, k, s, p, ceil_mode=ceil_mode)
    np.testing.assert_array_equal(y, y_ref.astype(dtype))  # max is exact
    assert_close(dx, dx_ref, dtype, "dx")
    # also through the package namespace and with keyword stride/padding
    y2, _ = ops.max_pool2d_forward(x, k, stride=s, padding=p, ceil_mode=ceil_mode)
    np.testing.assert_array_equal(y2, y)


def test_max_pool_ceil_negative_controls():
    """The checks above fail on wrong answers: floor-mode output shape, and a gradient routed
    with a perturbed argmax."""
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 10))
    y_ref, dx_ref, dy = torch_pool(TF.max_pool2d, x, 1, kernel_size=3, stride=2, ceil_mode=True)
    y_floor, _ = P.max_pool2d_forward(x, 3, 2, 0)
    assert not close(y_floor, y_ref, np.float64)
    y, arg = P.max_pool2d_forward(x, 3, 2, 0, ceil_mode=True)
    assert close(y, y_ref, np.float64)
    bad = ((arg.astype(np.int64) + 1) % 9).astype(np.uint8)
    assert not close(P.max_pool2d_backward(dy, bad, x.shape, 3, 2, 0, ceil_mode=True), dx_ref,
                     np.float64)


def test_max_pool_large_kernel_int32_argmax():
    x = np.random.default_rng(4).standard_normal((1, 2, 20, 19))
    y_ref, dx_ref, dy = torch_pool(TF.max_pool2d, x, 2, kernel_size=(17, 16), stride=(2, 3),
                                   ceil_mode=True)
    y, arg = P.max_pool2d_forward(x, (17, 16), (2, 3), 0, ceil_mode=True)
    assert arg.dtype == np.int32
    assert_close(y, y_ref, np.float64, "y")
    assert_close(P.max_pool2d_backward(dy, arg, x.shape, (17, 16), (2, 3), 0, ceil_mode=True),
                 dx_ref, np.float64, "dx")


def test_max_pool_old_positional_signature():
    """The ceil_mode=False behaviour and positional calls are unchanged."""
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    y, arg = P.max_pool2d_forward(x, (2, 2), None, (0, 0))
    np.testing.assert_array_equal(y[0, 0], [[5, 7], [13, 15]])
    dx = P.max_pool2d_backward(np.ones_like(y), arg, x.shape, (2, 2), None, (0, 0))
    assert dx.sum() == 4 and dx[0, 0, 1, 1] == 1


# -------------------------------------------------------------------- avg pool
AVG_CASES = MAX_CASES[:-1] + [
    (2, 2, 6, 6, (3, 3), (3, 3), (1, 1)),  # every window touches the padding
    (1, 1, 2, 2, (2, 2), (3, 3), (1, 1)),  # stride > kernel
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("ceil_mode", [True, False])
@pytest.mark.parametrize("case", AVG_CASES)
def test_avg_pool_modes(case, ceil_mode, count_include_pad, dtype):
    N, Cc, H, W, k, s, p = case
    rng = np.random.default_rng(abs(hash((case, ceil_mode, count_include_pad))) % 2 ** 32)
    x = rng.standard_normal((N, Cc, H, W)).astype(dtype)
    kw = dict(ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    y_ref, dx_ref, dy = torch_pool(TF.avg_pool2d, x, 2, kernel_size=k, stride=s, padding=p, **kw)
    y = P.avg_pool2d_forward(x, k, s, p, **kw)
    dx = P.avg_pool2d_backward(dy, x.shape, k, s, p, **kw)
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")


def test_avg_pool_divisor_matches_torch():
    """The divisor table itself: torch's avg_pool2d of ones with divisor_override=1 is the
    in-bounds count of each window, and with torch's own divisor it is count/divisor."""
    H, W, k, s, p = 8, 11, (3, 4), (2, 3), (1, 2)
    for cip in (True, False):
        div = P.avg_pool2d_divisor((1, 1, H, W), k, s, p, True, cip)
        inb = TF.avg_pool2d(torch.ones(1, 1, H, W, dtype=torch.float64), k, s, p, ceil_mode=True,
                            divisor_override=1)[0, 0].numpy()
        ref = TF.avg_pool2d(torch.ones(1, 1, H, W, dtype=torch.float64), k, s, p, ceil_mode=True,
                            count_include_pad=cip)[0, 0].numpy()
        np.testing.assert_allclose(inb / div, ref, rtol=1e-15)
    # clipped by ceil mode with count_include_pad=True: neither kh*kw nor the in-bounds count
    div = P.avg_pool2d_divisor((1, 1, H, W), k, s, p, True, True)
    assert div.min() < k[0] * k[1] and (div != inb).any()


def test_avg_pool_negative_controls():
    """Wrong divisor rules fail the comparison: kh*kw everywhere, or the opposite
    count_include_pad, against torch's ceil-mode answers."""
    x = np.random.default_rng(6).standard_normal((2, 3, 8, 11))
    k, s, p = (3, 4), (2, 3), (1, 2)
    for cip in (True, False):
        y_ref, dx_ref, dy = torch_pool(TF.avg_pool2d, x, 2, kernel_size=k, stride=s, padding=p,
                                       ceil_mode=True, count_include_pad=cip)
        assert close(P.avg_pool2d_forward(x, k, s, p, ceil_mode=True, count_include_pad=cip),
                     y_ref, np.float64)
        wrong = P.avg_pool2d_forward(x, k, s, p, ceil_mode=True, count_include_pad=not cip)
        assert not close(wrong, y_ref, np.float64)
        assert not close(P.avg_pool2d_backward(dy, x.shape, k, s, p, ceil_mode=True,
                                               count_include_pad=not cip), dx_ref, np.float64)
        # a fixed divisor kh*kw on the ceil-mode windows
        acc = P.avg_pool2d_forward(x, k, s, p, ceil_mode=True, count_include_pad=cip) * \
            P.avg_pool2d_divisor(x.shape, k, s, p, True, cip)
        assert not close(acc / (k[0] * k[1]), y_ref, np.float64)


# --------------------------------------------------------------- adaptive avg pool
ADAPTIVE_CASES = [
    ((2, 3, 13, 13), (7, 7)),    # VGG's avgpool on a small image
    ((2, 3, 13, 13), (6, 6)),    # AlexNet's avgpool
    ((1, 2, 6, 6), (6, 6)),      # identity
    ((2, 2, 7, 7), 1),           # global
    ((1, 2, 3, 2), (7, 5)),      # larger than the input: overlapping bins
    ((1, 2, 1, 1), (6, 6)),      # 1x1 upsampled
    ((2, 1, 10, 7), (3, None)),  # None keeps the input's width
    ((1, 3, 9, 14), (4, 5)),     # non-square, uneven bins
    ((0, 3, 5, 5), (2, 2)),      # empty batch
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,out", ADAPTIVE_CASES)
def test_adaptive_avg_pool(shape, out, dtype):
    x = np.random.default_rng(7).standard_normal(shape).astype(dtype)
    y_ref, dx_ref, dy = torch_pool(TF.adaptive_avg_pool2d, x, 3, output_size=out)
    y = P.adaptive_avg_pool2d_forward(x, out)
    assert P.adaptive_avg_pool2d_output_hw(shape[2], shape[3], out) == y_ref.shape[2:]
    dx = P.adaptive_avg_pool2d_backward(dy, x.shape, out)
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(ops.adaptive_avg_pool2d_backward(dy, x.shape), dx_ref, dtype, "dx (no size)")


def test_adaptive_bins_and_negative_control():
    """Bins are PyTorch's floor/ceil ones (13 -> 6: overlapping, lengths 3 and 4); a uniform
    pooling (kernel = stride = H // out, what a fixed-window emulation would do) differs."""
    start, end = P.adaptive_pool_bins(13, 6)
    np.testing.assert_array_equal(start, [0, 2, 4, 6, 8, 10])
    np.testing.assert_array_equal(end, [3, 5, 7, 9, 11, 13])
    start, end = P.adaptive_pool_bins(3, 7)
    np.testing.assert_array_equal(start, [0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(end, [1, 1, 2, 2, 3, 3, 3])
    x = np.random.default_rng(8).standard_normal((2, 3, 13, 13))
    y_ref, dx_ref, dy = torch_pool(TF.adaptive_avg_pool2d, x, 3, output_size=(6, 6))
    wrong = P.avg_pool2d_forward(x, 2, 2, 0)[:, :, :6, :6]
    assert wrong.shape == y_ref.shape and not close(wrong, y_ref, np.float64)
    wrong_dx = P.adaptive_avg_pool2d_backward(dy, x.shape, (6, 6)) * 1.01
    assert not close(wrong_dx, dx_ref, np.float64)


def test_adaptive_bad_input():
    with pytest.raises(ValueError, match="empty image"):
        P.adaptive_avg_pool2d_forward(np.zeros((1, 1, 0, 3)), 2)
    with pytest.raises(ValueError, match=">= 1"):
        P.adaptive_avg_pool2d_forward(np.zeros((1, 1, 3, 3)), (0, 2))
    with pytest.raises(ValueError, match="expected"):
        P.adaptive_avg_pool2d_backward(np.zeros((1, 1, 2, 2)), (1, 1, 5, 5), (3, 3))


# ------------------------------------------------------------------------ dropout
def _cuts(n, k):
    """k floor+1 blocks of n: (start, stop) pairs, empty blocks when k > n."""
    q, r = divmod(n, k)
    b = [0]
    for i in range(k):
        b.append(b[-1] + q + (i < r))
    return list(zip(b[:-1], b[1:]))


@pytest.mark.parametrize("cuts", [(1, 1, 1, 1), (2, 1, 1, 1), (1, 3, 1, 1), (2, 2, 2, 1),
                                  (3, 4, 1, 2), (5, 7, 3, 3)])
def test_dropout_blocks_join_into_whole_mask(cuts):
    shape = (4, 6, 3, 5)
    p, seed, step = 0.4, 1234, 17
    whole = D.dropout_mask(shape, [slice(None)] * 4, p, seed, step, np.float64)
    joined = np.full(shape, np.nan)
    for b0 in _cuts(shape[0], cuts[0]):
        for b1 in _cuts(shape[1], cuts[1]):
            for b2 in _cuts(shape[2], cuts[2]):
                for b3 in _cuts(shape[3], cuts[3]):
                    bs = (b0, b1, b2, b3)
                    m = D.dropout_mask(shape, bs, p, seed, step, np.float64)
                    assert m.shape == tuple(b - a for a, b in bs)
                    joined[tuple(slice(a, b) for a, b in bs)] = m
    np.testing.assert_array_equal(joined, whole)
    # negative control: hashing local indices instead of global ones breaks the join
    if cuts[1] > 1:
        (a, b) = _cuts(shape[1], cuts[1])[1]
        local_idx = D.dropout_mask((shape[0], b - a) + shape[2:], [slice(None)] * 4, p, seed,
                                   step, np.float64)
        assert not np.array_equal(local_idx, whole[:, a:b])


def test_dropout_mask_values_and_scale_match_torch():
    """Kept elements carry exactly torch's scale 1/(1-p) in each dtype, dropped ones 0."""
    for dtype, tdt in ((np.float32, torch.float32), (np.float64, torch.float64)):
        for p in (0.1, 0.5, 0.3):
            m = D.dropout_mask((1000,), [slice(None)], p, 0, 0, dtype)
            assert m.dtype == np.dtype(dtype)
            t = TF.dropout(torch.ones(1000, dtype=tdt), p, training=True).numpy()
            assert set(np.unique(m)) == set(np.unique(t)) == {0, dtype(1.0 / (1.0 - p))}


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_keep_rate_binomial(p):
    n = 1 << 20
    keep = D.dropout_keep((4, 1 << 18), (slice(None), slice(None)), p, 7, 3)
    k = int(keep.sum())
    sd = math.sqrt(n * p * (1 - p))
    assert abs(k - n * (1 - p)) <= 5 * sd, (k, n * (1 - p), sd)
    # negative control: the same bound rejects a rate 1 % off
    assert abs(k - n * (1 - p - 0.01)) > 5 * sd
    # each half, and a strided sub-sample, are also within the bound (no index structure)
    for part in (keep[:2], keep[2:], keep[:, ::7]):
        m = part.size
        assert abs(int(part.sum()) - m * (1 - p)) <= 5 * math.sqrt(m * p * (1 - p))


def test_dropout_neighbours_uncorrelated():
    """Neighbouring flat indices (lag 1, a row apart, a channel apart) are independent:
    P(both kept) is within 5 sigma of (1-p)**2; a mask repeating with period 2 fails."""
    p, n = 0.5, 1 << 18
    keep = D.dropout_keep((n,), [slice(None)], p, 11, 4)
    for lag in (1, 7, 224, 224 * 224):
        both = float((keep[:-lag] & keep[lag:]).mean())
        m = n - lag
        q = (1 - p) ** 2
        assert abs(both - q) <= 5 * math.sqrt(q * (1 - q) / m), (lag, both)
    periodic = np.repeat(keep[::2], 2)
    both = float((periodic[:-1] & periodic[1:]).mean())
    assert abs(both - 0.25) > 5 * math.sqrt(0.25 * 0.75 / (n - 1))


def test_dropout_depends_on_seed_and_step_only():
    shape, bs, p = (8, 64, 9), (slice(2, 6), slice(10, 50), slice(None)), 0.5
    a = D.dropout_keep(shape, bs, p, 1, 0)
    np.testing.assert_array_equal(a, D.dropout_keep(shape, bs, p, 1, 0))  # deterministic
    # (start, stop) pairs and slices are the same block
    np.testing.assert_array_equal(a, D.dropout_keep(shape, ((2, 6), (10, 50), (0, 9)), p, 1, 0))
    for other in (D.dropout_keep(shape, bs, p, 1, 1), D.dropout_keep(shape, bs, p, 2, 0),
                  D.dropout_keep(shape, bs, p, 0, 1)):
        agree = float((other == a).mean())  # independent masks agree about half the time
        assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / a.size)
    # the flat index, not the shape, defines an element: a reshaped tensor has the same mask
    flat = D.dropout_keep((8 * 64 * 9,), (slice(None),), p, 1, 0).reshape(shape)
    np.testing.assert_array_equal(flat[2:6, 10:50], a)


def test_dropout_edge_cases():
    shape = (3, 5)
    one = D.dropout_mask(shape, [slice(None)] * 2, 0.0, 1, 2, np.float32)
    assert one.dtype == np.float32 and (one == 1).all()
    zero = D.dropout_mask(shape, [slice(None)] * 2, 1.0, 1, 2, np.float64)
    assert zero.dtype == np.float64 and (zero == 0).all()
    t = TF.dropout(torch.ones(shape, dtype=torch.float64), 1.0, training=True)
    assert (t == 0).all()
    empty = D.dropout_mask(shape, [slice(2, 2), slice(None)], 0.5, 1, 2, np.float32)
    assert empty.shape == (0, 5)
    tiny = D.dropout_keep((1 << 16,), [slice(None)], 1e-12, 0, 0)  # rounds to threshold 9e3
    assert tiny.all() or (~tiny).sum() <= 2
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            D.dropout_mask(shape, [slice(None)] * 2, bad, 0, 0, np.float32)
    with pytest.raises(ValueError, match="entries"):
        D.dropout_mask(shape, [slice(None)], 0.5, 0, 0, np.float32)
    with pytest.raises(ValueError, match="outside"):
        D.dropout_mask(shape, [(0, 4), (0, 5)], 0.5, 0, 0, np.float32)
    # huge seeds and negative seeds are taken mod 2**64
    np.testing.assert_array_equal(D.dropout_keep(shape, [slice(None)] * 2, 0.5, -1, 0),
                                  D.dropout_keep(shape, [slice(None)] * 2, 0.5, 2 ** 64 - 1, 0))


# ------------------------------------------------ non-square convolutions (Inception)
# (N, C, F, H, W, kernel, stride, padding)
INCEPTION_CONV = [
    (2, 4, 5, 9, 9, (1, 7), (1, 1), (0, 3)),
    (2, 4, 5, 9, 9, (7, 1), (1, 1), (3, 0)),
    (2, 3, 4, 8, 10, (1, 3), (1, 1), (0, 1)),
    (2, 3, 4, 8, 10, (3, 1), (1, 1), (1, 0)),
    (2, 3, 4, 17, 15, (3, 3), (2, 2), (0, 0)),   # stride-2 reduction, no padding
    (2, 3, 4, 9, 9, (5, 5), (1, 1), (2, 2)),
    (1, 2, 3, 12, 11, (1, 7), (2, 1), (0, 3)),   # non-square stride too
]


@pytest.fixture(params=["default", "phase", "classic", "nofold"])
def conv_layout(request, monkeypatch):
    """Force each im2col layout / sample folding choice of ops.conv."""
    if request.param == "phase":
        monkeypatch.setattr(C, "_EXT_MAX_WASTE", 1e9)
    elif request.param == "classic":
        monkeypatch.setattr(C, "_EXT_MAX_WASTE", -1.0)
    elif request.param == "nofold":
        monkeypatch.setattr(C, "_TARGET_COLS", 1)
    return request.param


def _torch_conv(x, w, dy, s, p):
    xt, wt = t64(x, True), t64(w, True)
    yt = TF.conv2d(xt, wt, None, s, p)
    yt.backward(t64(dy))
    return yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", INCEPTION_CONV)
def test_conv_non_square_inception(case, dtype, conv_layout):
    N, Cc, F, H, W, k, s, p = case
    rng = np.random.default_rng(abs(hash(case)) % 2 ** 32)
    x = rng.standard_normal((N, Cc, H, W)).astype(dtype)
    w = rng.standard_normal((F, Cc) + k).astype(dtype)
    Ho, Wo = C.conv2d_output_hw(H, W, k, s, p, (1, 1))
    dy = rng.standard_normal((N, F, Ho, Wo)).astype(dtype)
    y_ref, dx_ref, dw_ref = _torch_conv(x, w, dy, s, p)
    assert_close(C.conv2d_forward(x, w, s, p), y_ref, dtype, "y")
    assert_close(C.conv2d_backward_data(dy, w, (H, W), s, p), dx_ref, dtype, "dx")
    assert_close(C.conv2d_backward_filter(x, dy, k, s, p), dw_ref, dtype, "dw")


def test_conv_non_square_negative_control():
    """Swapping the padding of a 1x7 (0,3) conv for (3,0) changes the shape; transposing the
    kernel of a square-image 7x1 conv gives a wrong answer of the right shape."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 9, 9))
    w = rng.standard_normal((4, 3, 1, 7))
    dy = rng.standard_normal((2, 4, 9, 9))
    y_ref, dx_ref, dw_ref = _torch_conv(x, w, dy, (1, 1), (0, 3))
    assert close(C.conv2d_forward(x, w, (1, 1), (0, 3)), y_ref, np.float64)
    assert not close(C.conv2d_forward(x, w, (1, 1), (3, 0)), y_ref, np.float64)
    wt = np.ascontiguousarray(w.transpose(0, 1, 3, 2))
    y_t = C.conv2d_forward(x.transpose(0, 1, 3, 2).copy(), wt, (1, 1), (3, 0))
    assert close(y_t.transpose(0, 1, 3, 2), y_ref, np.float64)  # the transposed problem agrees
    assert not close(C.conv2d_forward(x, wt, (1, 1), (3, 0)), y_ref, np.float64)


# --------------------------------------------------------------- batch norm eps
def _bn(x, weight, bias, dy, eps):
    s, ss, n = BN.bn_local_stats(x)
    mean, invstd, var_u = BN.bn_mean_invstd(s, ss, n, eps=eps)
    y = BN.bn_forward_apply(x, mean, invstd, weight, bias)
    sdy, sdyx = BN.bn_backward_reduce(dy, x, mean)
    dx = BN.bn_backward_apply(dy, x, mean, invstd, weight, sdy, sdyx, n)
    dw, db = BN.bn_param_grads(sdy, sdyx, invstd)
    return y, dx, dw


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_eps_1e3(dtype):
    """Inception's BatchNorm2d(eps=0.001): channels with variance ~1e-3 where eps matters."""
    rng = np.random.default_rng(12)
    shape = (4, 3, 5, 5)
    x = (rng.standard_normal(shape) * np.array([0.03, 0.1, 1.0]).reshape(1, 3, 1, 1)
         + 2.0).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, 3).astype(dtype)
    bias = rng.standard_normal(3).astype(dtype)
    xt, wt, bt = t64(x, True), t64(weight, True), t64(bias, True)
    yt = TF.batch_norm(xt, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                       wt, bt, training=True, eps=1e-3)
    yt.backward(t64(dy))
    y, dx, dw = _bn(x, weight, bias, dy, 1e-3)
    assert_close(y, yt.detach().numpy(), dtype, "y")
    assert_close(dx, xt.grad.numpy(), dtype, "dx")
    assert_close(dw.astype(dtype), wt.grad.numpy(), dtype, "dweight")
    # negative control: PyTorch's default eps gives a different answer on these channels
    y5, dx5, _ = _bn(x, weight, bias, dy, 1e-5)
    assert not close(y5, yt.detach().numpy(), dtype)
    assert not close(dx5, xt.grad.numpy(), dtype)
