"""distconv.ops.conv against PyTorch (float64 oracle), incl. empty blocks."""
import numpy as np
import pytest
import torch

from distconv.ops import conv as C
from tests.tolerance import RTOL, rel_err  # noqa: F401

torch.set_num_threads(1)





def assert_close(actual, expected, dtype, what=""):
    """Shape, dtype and normwise relative error within RTOL[dtype]."""
    dtype = np.dtype(dtype)
    assert np.asarray(actual).dtype == dtype, f"{what}: dtype {np.asarray(actual).dtype} != {dtype}"
    err = rel_err(actual, expected)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3e} > {RTOL[dtype]:.0e}"


def torch_conv(x, w, dy, stride, padding, dilation):
    """y, dx, dw from torch in float64 (inputs converted exactly)."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, None, stride, padding, dilation)
    if dy is None:
        return yt.detach().numpy(), None, None
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    return yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy()


# (N, C, F, H, W, kernel, stride, padding, dilation)
CASES = [
    (2, 5, 7, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1)),      # odd sizes, same padding
    (2, 5, 7, 7, 9, (3, 2), (2, 2), (1, 0), (1, 1)),      # rectangular kernel, stride 2
    (3, 4, 6, 11, 9, (3, 3), (1, 1), (2, 2), (2, 2)),     # dilation
    (2, 3, 4, 10, 13, (2, 3), (1, 2), (0, 1), (2, 1)),    # everything mixed
    (2, 5, 7, 7, 9, (1, 1), (1, 1), (0, 0), (1, 1)),      # 1x1 pure GEMM
    (2, 5, 7, 7, 9, (1, 1), (2, 2), (0, 0), (1, 1)),      # 1x1 stride 2 (downsample)
    (2, 5, 7, 8, 9, (1, 1), (2, 1), (1, 0), (1, 1)),      # 1x1 with padding
    (40, 4, 6, 5, 6, (3, 3), (1, 1), (0, 0), (1, 1)),     # many samples folded into one GEMM
    (3, 4, 6, 30, 30, (3, 3), (1, 1), (1, 1), (1, 1)),    # extended-row im2col
    (3, 4, 6, 31, 29, (3, 3), (2, 2), (1, 1), (1, 1)),    # stride 2, not dividing evenly
    (2, 3, 4, 20, 20, (7, 7), (2, 2), (3, 3), (1, 1)),    # ResNet stem-like
    (2, 3, 4, 9, 9, (3, 3), (1, 1), (3, 3), (1, 1)),      # padding > kernel//2
    (2, 3, 4, 9, 9, (3, 3), (3, 3), (0, 0), (1, 1)),      # stride == kernel
    (1, 2, 3, 4, 4, (4, 4), (1, 1), (0, 0), (1, 1)),      # kernel == image -> 1x1 output
    (2, 3, 4, 8, 1, (3, 1), (1, 1), (1, 0), (1, 1)),      # width-1 images
    (2, 3, 4, 10, 11, (3, 3), (3, 2), (2, 1), (2, 1)),    # stride 3 with dilation
    (2, 3, 4, 5, 5, (1, 1), (3, 3), (1, 1), (1, 1)),      # 1x1 padded, stride 3 (empty phases)
    (2, 3, 4, 4, 4, (2, 2), (4, 4), (2, 2), (1, 1)),      # stride > kernel
]

ids = ["N{}C{}F{}_{}x{}_k{}_s{}_p{}_d{}".format(*c[:5], *("{}{}".format(*t) for t in c[5:]))
       for c in CASES]


@pytest.fixture(params=["default", "phase", "classic", "nofold", "flip", "noflip",
                                        "noswap"])
def layout(request, monkeypatch):
    """Force each im2col layout / sample folding / backward-data choice so every code path
    is checked."""
    if request.param in ("flip", "noflip"):
        monkeypatch.setattr(C, "_flip_pays", lambda g: request.param == "flip")
    elif request.param == "noswap":
        monkeypatch.setattr(C, "_BWF_SWAP_MAX_F", 0)
    elif request.param == "phase":
        monkeypatch.setattr(C, "_EXT_MAX_WASTE", 1e9)
    elif request.param == "classic":
        monkeypatch.setattr(C, "_EXT_MAX_WASTE", -1.0)
    elif request.param == "nofold":
        monkeypatch.setattr(C, "_TARGET_COLS", 1)
    return request.param


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_conv_matches_torch(case, dtype, layout):
    N, Cin, F, H, W, k, s, p, d = case
    rng = np.random.default_rng(hash(case) % 2 ** 32)
    x = rng.standard_normal((N, Cin, H, W)).astype(dtype)
    w = rng.standard_normal((F, Cin) + k).astype(dtype)
    Ho, Wo = C.conv2d_output_hw(H, W, k, s, p, d)
    dy = rng.standard_normal((N, F, Ho, Wo)).astype(dtype)
    y_ref, dx_ref, dw_ref = torch_conv(x, w, dy, s, p, d)
    y = C.conv2d_forward(x, w, s, p, d)
    dx = C.conv2d_backward_data(dy, w, (H, W), s, p, d)
    dw = C.conv2d_backward_filter(x, dy, k, s, p, d)
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dw, dw_ref, dtype, "dw")
    # twice: cached workspaces must not leak state between calls
    assert_close(C.conv2d_forward(x, w, s, p, d), y_ref, dtype, "y again")
    assert_close(C.conv2d_backward_filter(x, dy, k, s, p, d), dw_ref, dtype, "dw again")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_resnet_like_shapes(dtype, layout):
    """A few larger layers that take the production code paths (blocking, 1x1 folding)."""
    rng = np.random.default_rng(1)
    for (N, Cin, F, H, k, s, p) in [(3, 16, 8, 34, 3, 1, 1), (4, 8, 16, 12, 1, 2, 0),
                                    (5, 16, 8, 7, 3, 2, 1), (4, 8, 16, 7, 1, 1, 0)]:
        x = rng.standard_normal((N, Cin, H, H)).astype(dtype)
        w = rng.standard_normal((F, Cin, k, k)).astype(dtype)
        Ho, Wo = C.conv2d_output_hw(H, H, (k, k), (s, s), (p, p), (1, 1))
        dy = rng.standard_normal((N, F, Ho, Wo)).astype(dtype)
        y_ref, dx_ref, dw_ref = torch_conv(x, w, dy, (s, s), (p, p), (1, 1))
        assert_close(C.conv2d_forward(x, w, (s, s), (p, p)), y_ref, dtype, "y")
        assert_close(C.conv2d_backward_data(dy, w, (H, H), (s, s), (p, p)), dx_ref, dtype, "dx")
        assert_close(C.conv2d_backward_filter(x, dy, (k, k), (s, s), (p, p)), dw_ref, dtype, "dw")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), (1, 1), (1, 1)),
                                                   ((1, 1), (1, 1), (0, 0)),
                                                   ((1, 1), (2, 2), (0, 0)),
                                                   ((3, 3), (2, 2), (1, 1))])
@pytest.mark.parametrize("N,Cin,F", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0, 0)])
def test_empty_blocks(N, Cin, F, kernel, stride, padding, dtype):
    H, W = 7, 6
    x = np.ones((N, Cin, H, W), dtype)
    w = np.ones((F, Cin) + kernel, dtype)
    Ho, Wo = C.conv2d_output_hw(H, W, kernel, stride, padding, (1, 1))
    dy = np.ones((N, F, Ho, Wo), dtype)
    y = C.conv2d_forward(x, w, stride, padding)
    dx = C.conv2d_backward_data(dy, w, (H, W), stride, padding)
    dw = C.conv2d_backward_filter(x, dy, kernel, stride, padding)
    for a, shape in ((y, (N, F, Ho, Wo)), (dx, (N, Cin, H, W)), (dw, (F, Cin) + kernel)):
        assert a.shape == shape and a.dtype == np.dtype(dtype)
        assert not np.any(a)  # all zeros (sums over an empty set)


@pytest.mark.parametrize("layout_", ["phase", "classic"])
def test_workspace_reuse_across_layouts(layout_, monkeypatch):
    """Convs whose scratch buffers have equal shapes but different zero borders, back to back."""
    monkeypatch.setattr(C, "_EXT_MAX_WASTE", 1e9 if layout_ == "phase" else -1.0)
    rng = np.random.default_rng(9)
    w = rng.standard_normal((4, 3, 3, 3))
    for _ in range(2):
        for H, p in [(5, 1), (3, 2), (7, 0), (5, 1)]:  # padded size 7 every time
            x = rng.standard_normal((2, 3, H, H))
            Ho, Wo = C.conv2d_output_hw(H, H, (3, 3), (1, 1), (p, p), (1, 1))
            dy = rng.standard_normal((2, 4, Ho, Wo))
            y_ref, dx_ref, dw_ref = torch_conv(x, w, dy, (1, 1), (p, p), (1, 1))
            assert_close(C.conv2d_forward(x, w, (1, 1), (p, p)), y_ref, np.float64, "y")
            assert_close(C.conv2d_backward_data(dy, w, (H, H), (1, 1), (p, p)), dx_ref,
                         np.float64, "dx")
            assert_close(C.conv2d_backward_filter(x, dy, (3, 3), (1, 1), (p, p)), dw_ref,
                         np.float64, "dw")


def test_workspace_shares_unzeroed_buffers_by_tag():
    """Without ``zero`` one flat buffer per tag serves every shape (grown when too small);
    zero-filled buffers stay one per exact shape. Convs of different image sizes back to
    back (sharing the column buffers) still match torch."""
    from distconv.ops import _workspace as ws

    ws.clear()
    a = ws.get(np, "t", (4, 5), np.float32)
    b = ws.get(np, "t", (3, 2), np.float32)
    assert b.shape == (3, 2) and np.shares_memory(a, b)
    c = ws.get(np, "t", (6, 5), np.float32)  # larger: a new buffer replaces the old one
    assert c.shape == (6, 5) and not np.shares_memory(a, c)
    assert np.shares_memory(c, ws.get(np, "t", (2, 2), np.float32))
    assert ws._BYTES == 30 * 4
    z1, z2 = ws.get(np, "z", (2, 3), np.float32, zero=True), ws.get(np, "z", (3, 2), np.float32,
                                                                      zero=True)
    assert not np.shares_memory(z1, z2) and not z1.any() and not z2.any()
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3))
    for H in (9, 5, 12, 5):
        x = rng.standard_normal((1, 3, H, H + 1))
        dy = rng.standard_normal((1, 4, H, H + 1))
        y_ref, dx_ref, dw_ref = torch_conv(x, w, dy, (1, 1), (1, 1), (1, 1))
        assert_close(C.conv2d_forward(x, w, (1, 1), (1, 1)), y_ref, np.float64, "y")
        assert_close(C.conv2d_backward_data(dy, w, (H, H + 1), (1, 1), (1, 1)), dx_ref,
                     np.float64, "dx")
        assert_close(C.conv2d_backward_filter(x, dy, (3, 3), (1, 1), (1, 1)), dw_ref,
                     np.float64, "dw")
    ws.clear()


def test_output_hw_formula_and_error():
    assert C.conv2d_output_hw(224, 224, (7, 7), (2, 2), (3, 3), (1, 1)) == (112, 112)
    assert C.conv2d_output_hw(56, 56, (3, 3), (2, 2), (1, 1), (1, 1)) == (28, 28)
    assert C.conv2d_output_hw(7, 9, (3, 3), (1, 1), (0, 0), (2, 2)) == (3, 5)
    with pytest.raises(ValueError, match=r"2x2.*kernel 5x5"):
        C.conv2d_output_hw(2, 2, (5, 5), (1, 1), (0, 0), (1, 1))


def test_bad_arguments():
    x = np.zeros((1, 3, 5, 5))
    with pytest.raises(ValueError, match="channels"):
        C.conv2d_forward(x, np.zeros((2, 4, 3, 3)))
    with pytest.raises(ValueError, match="dy has shape"):
        C.conv2d_backward_data(np.zeros((1, 2, 4, 4)), np.zeros((2, 3, 3, 3)), (5, 5))
    with pytest.raises(ValueError, match="stride"):
        C.conv2d_forward(x, np.zeros((2, 3, 3, 3)), stride=(0, 1))


def test_dtype_preserved_and_non_contiguous_input():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 10, 12)).astype(np.float32)[:, :, ::2, ::2]  # strided view
    w = rng.standard_normal((5, 4, 3, 3)).astype(np.float64)                   # other dtype
    y = C.conv2d_forward(x, w, (1, 1), (1, 1))
    assert y.dtype == np.float32
    y_ref, _, _ = torch_conv(x, w.astype(np.float32), None, (1, 1), (1, 1), (1, 1))
    assert_close(y, y_ref, np.float32, "y")


def test_negative_control():
    """The comparison helper must reject a slightly wrong result (the tests can fail)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 6, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    y_ref, _, _ = torch_conv(x, w, None, (1, 1), (1, 1), (1, 1))
    y = C.conv2d_forward(x, w, (1, 1), (1, 1))
    assert_close(y, y_ref, np.float64, "y")
    bad = y.copy()
    bad[1, 2, 3, 4] *= 1 + 1e-8
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(bad, y_ref, np.float64, "perturbed y")
    # a wrong padding is a different convolution and must fail too
    with pytest.raises(AssertionError):
        assert_close(C.conv2d_forward(x, w, (1, 1), (0, 0)), y_ref, np.float64, "wrong padding")
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(y.astype(np.float32) * np.float32(1 + 1e-3), y_ref, np.float32, "f32")
