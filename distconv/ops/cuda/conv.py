"""CUDA convolution: im2col/col2im kernels (``kernels/im2col.cu``) plus one cuBLAS GEMM
(``cupy.matmul``) per block of samples; cuDNN instead under ``DISTCONV_CUDNN=1``."""
from __future__ import annotations

import importlib
import os
import warnings

from ... import cudakernels as _ck
from .. import _workspace
from ..geometry import ConvGeometry
from ._common import _bwd_data_geom, _bwd_filter_geom, _check_shape
from .twins import (col2im_numpy, conv2d_backward_data_numpy, conv2d_backward_filter_numpy,
                    conv2d_forward_numpy, im2col_numpy)

_COLS_BYTES = 256 * 2 ** 20  # column buffer of the im2col convolution, at most


def _kargs(g, n):
    """The 14 geometry arguments of the im2col/col2im kernels for a block of ``n`` samples
    of the :class:`~distconv.ops.geometry.ConvGeometry` ``g``."""
    return (n, g.C, g.H, g.W, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.Ho, g.Wo)


def _im2col_launch(x, cols, g, n, col_sn, col_sk):
    """im2col of the contiguous (n, C, H, W) CuPy array ``x`` into ``cols`` (any layout)."""
    if n * g.K * g.L:
        _ck.launch("im2col_" + _ck.float_suffix(x.dtype)[0], n * g.K * g.L,
                (x, cols) + _kargs(g, n) + (col_sn, col_sk))


def _col2im_launch(cols, x, g, n, col_sn, col_sk):
    if n * g.C * g.H * g.W:
        _ck.launch("col2im_" + _ck.float_suffix(x.dtype)[0], n * g.C * g.H * g.W,
                (cols, x) + _kargs(g, n) + (col_sn, col_sk))


def im2col(x, kernel_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Patch matrix of an NCHW image batch: x (N, C, H, W) -> cols (N, C*kh*kw, Ho*Wo).

    Rows are ordered (c, i, j) and columns (ho, wo), as ``torch.nn.functional.unfold``;
    padded positions read 0. CuPy input: CUDA kernel; NumPy input: :func:`im2col_numpy`.
    """
    if not _ck.is_gpu_array(x):
        return im2col_numpy(x, kernel_hw, stride, padding, dilation)
    cp = _ck.cupy()
    g = ConvGeometry(x.shape, kernel_hw, stride, padding, dilation)
    _ck.float_suffix(x.dtype)
    x = cp.ascontiguousarray(x)
    cols = cp.empty((g.N, g.K, g.L), x.dtype)
    _im2col_launch(x, cols, g, g.N, g.K * g.L, g.L)
    return cols


def col2im(cols, x_shape, kernel_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Adjoint of :func:`im2col`: cols (N, C*kh*kw, Ho*Wo) -> x (N, C, H, W), summing overlaps.

    Atomic-free on the GPU (each pixel gathers its contributions in (i, j) order).
    """
    if not _ck.is_gpu_array(cols):
        return col2im_numpy(cols, x_shape, kernel_hw, stride, padding, dilation)
    cp = _ck.cupy()
    g = ConvGeometry(x_shape, kernel_hw, stride, padding, dilation)
    _check_shape(cols, (g.N, g.K, g.L), "cols")
    _ck.float_suffix(cols.dtype)
    cols = cp.ascontiguousarray(cols)
    x = cp.empty((g.N, g.C, g.H, g.W), cols.dtype)
    _col2im_launch(cols, x, g, g.N, g.K * g.L, g.L)
    return x


_CUDNN = None
_CUDNN_WARNED = False


def cudnn_available() -> bool:
    """True when ``cupy.cudnn`` (or ``cupyx.cudnn``) imports with convolution support."""
    global _CUDNN
    if _CUDNN is None:
        _CUDNN = False
        for name in ("cupy.cudnn", "cupyx.cudnn"):
            try:
                m = importlib.import_module(name)
            except Exception:
                continue
            if all(hasattr(m, f) for f in ("convolution_forward", "convolution_backward_data",
                                            "convolution_backward_filter")):
                _CUDNN = m
                break
    return _CUDNN is not False


def _cudnn_requested() -> bool:
    return os.environ.get("DISTCONV_CUDNN", "0").strip().lower() in ("1", "true", "yes", "on")


def cudnn_enabled() -> bool:
    """True when ``DISTCONV_CUDNN=1`` asks for cuDNN convolutions and cuDNN is available."""
    if not _cudnn_requested():
        return False
    if cudnn_available():
        return True
    _warn_cudnn("DISTCONV_CUDNN=1 but cupy.cudnn is not available; using im2col + cuBLAS")
    return False


def _warn_cudnn(msg):
    global _CUDNN_WARNED
    if not _CUDNN_WARNED:
        _CUDNN_WARNED = True
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _try_cudnn(fn_name, *args, **kw):
    """Call cupy.cudnn.<fn_name>; False (after one warning) if it fails, so callers fall back."""
    try:
        getattr(_CUDNN, fn_name)(*args, **kw)
        return True
    except Exception as e:  # unsupported configuration, missing library, ...
        _warn_cudnn(f"cuDNN {fn_name} failed ({e!r}); using im2col + cuBLAS")
        return False


def _samples_per_block(g, itemsize):
    return max(1, min(g.N, _COLS_BYTES // max(1, g.K * g.L * itemsize)))


def cols_bytes(x_shape, w_shape, stride, padding, dilation, itemsize) -> int:
    """Bytes of the column buffer :func:`_im2col_blocks` (forward, backward-filter) and the
    backward-data loop use for x (N, C, H, W), w (F, C, kh, kw): (C*kh*kw, B*Ho*Wo) for
    ``B`` samples per block. No CuPy needed."""
    g = ConvGeometry.of_weight(tuple(x_shape), tuple(w_shape), stride, padding, dilation)
    if g.N * g.K * g.L == 0:
        return 0
    return g.K * _samples_per_block(g, int(itemsize)) * g.L * int(itemsize)


def _im2col_blocks(cp, g, xc, dt):
    """``(n0, n1, cols)`` for each block of samples of the contiguous input ``xc``: cols, the
    (K, b*L) patch matrix of ``xc[n0:n1]`` in a scratch buffer reused by the next block."""
    B = _samples_per_block(g, dt.itemsize)
    for n0 in range(0, g.N, B):
        n1 = min(g.N, n0 + B)
        cols = _cols_buffer(cp, g, B, n1 - n0, dt)
        _im2col_launch(xc[n0:n1], cols, g, n1 - n0, g.L, (n1 - n0) * g.L)
        yield n0, n1, cols


def _cols_buffer(cp, g, B, b, dtype):
    """A (K, b*L) scratch column buffer (contiguous) from a cached (K*B*L,) one."""
    buf = _workspace.get(cp, "cuda_cols", (g.K * B * g.L,), dtype)
    return buf[:g.K * b * g.L].reshape(g.K, b * g.L)


def _to_fl(cp, a, n0, n1, F, L):
    """a[n0:n1] of an (N, F, Ho, Wo) array as a contiguous (F, b*L) matrix."""
    b = n1 - n0
    if b == 1:
        return a[n0].reshape(F, L)
    return cp.ascontiguousarray(a[n0:n1].reshape(b, F, L).transpose(1, 0, 2)).reshape(F, b * L)


def conv2d_forward(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Convolution forward (cross-correlation, as PyTorch), without bias.

    x: (N, C, H, W); w: (F, C, kh, kw) -> y: (N, F, Ho, Wo), dtype of x.
    GPU: per block of samples, im2col into a (C*kh*kw, b*Ho*Wo) buffer and one
    cuBLAS GEMM; cuDNN instead under ``DISTCONV_CUDNN=1`` when available.
    """
    if not _ck.is_gpu_array(x):
        return conv2d_forward_numpy(x, w, stride, padding, dilation)
    cp = _ck.cupy()
    g = ConvGeometry.of_weight(x.shape, w.shape, stride, padding, dilation)
    F = g.F
    dt = x.dtype
    _ck.float_suffix(dt)
    y = cp.empty((g.N, F, g.Ho, g.Wo), dt)
    if y.size == 0:
        return y
    if g.K == 0:
        y.fill(0)
        return y
    xc = cp.ascontiguousarray(x)
    wc = cp.ascontiguousarray(cp.asarray(w).astype(dt, copy=False))
    if cudnn_enabled() and _try_cudnn(
            "convolution_forward", xc, wc, None, y, (g.ph, g.pw), (g.sh, g.sw),
            (g.dh, g.dw), 1, auto_tune=False, tensor_core="never"):
        return y
    w2 = wc.reshape(F, g.K)
    for n0, n1, cols in _im2col_blocks(cp, g, xc, dt):
        b = n1 - n0
        if b == 1:
            cp.matmul(w2, cols, out=y[n0].reshape(F, g.L))
        else:
            out = cp.matmul(w2, cols)
            y[n0:n1] = out.reshape(F, b, g.Ho, g.Wo).transpose(1, 0, 2, 3)
    return y


def conv2d_backward_data(dy, w, x_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Gradient of the convolution with respect to its input.

    dy: (N, F, Ho, Wo); w: (F, C, kh, kw); x_hw = (H, W) -> dx: (N, C, H, W), dtype of dy.
    GPU: per block of samples, cols = W^T @ dy (cuBLAS) then the atomic-free col2im.
    """
    if not _ck.is_gpu_array(dy):
        return conv2d_backward_data_numpy(dy, w, x_hw, stride, padding, dilation)
    cp = _ck.cupy()
    g = _bwd_data_geom(dy, w, x_hw, stride, padding, dilation)
    N, H, W, F = g.N, g.H, g.W, g.F
    dt = dy.dtype
    _ck.float_suffix(dt)
    if N * g.C * H * W == 0 or F == 0:
        return cp.zeros((N, g.C, H, W), dt)
    dx = cp.empty((N, g.C, H, W), dt)
    dyc = cp.ascontiguousarray(dy)
    wc = cp.ascontiguousarray(cp.asarray(w).astype(dt, copy=False))
    if cudnn_enabled() and _try_cudnn(
            "convolution_backward_data", wc, dyc, None, dx, (g.ph, g.pw), (g.sh, g.sw),
            (g.dh, g.dw), 1, deterministic=True, auto_tune=False, tensor_core="never"):
        return dx
    w2t = wc.reshape(F, g.K).T  # (K, F)
    B = _samples_per_block(g, dt.itemsize)
    for n0 in range(0, N, B):
        n1 = min(N, n0 + B)
        b = n1 - n0
        cols = _cols_buffer(cp, g, B, b, dt)
        cp.matmul(w2t, _to_fl(cp, dyc, n0, n1, F, g.L), out=cols)
        _col2im_launch(cols, dx[n0:n1], g, b, g.L, b * g.L)
    return dx


def conv2d_backward_filter(x, dy, kernel_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Gradient of the convolution with respect to its weight.

    x: (N, C, H, W); dy: (N, F, Ho, Wo); kernel_hw = (kh, kw) -> dw: (F, C, kh, kw), dtype of x.
    GPU: dw = sum over blocks of samples of dy (F, b*L) @ im2col(x)^T (cuBLAS).
    """
    if not _ck.is_gpu_array(x):
        return conv2d_backward_filter_numpy(x, dy, kernel_hw, stride, padding, dilation)
    cp = _ck.cupy()
    g = _bwd_filter_geom(x, dy, kernel_hw, stride, padding, dilation)
    F, kh, kw = g.F, g.kh, g.kw
    dt = x.dtype
    _ck.float_suffix(dt)
    dw = cp.zeros((F, g.C, kh, kw), dt)
    if dw.size == 0 or g.N == 0:
        return dw
    xc = cp.ascontiguousarray(x)
    dyc = cp.ascontiguousarray(cp.asarray(dy).astype(dt, copy=False))
    if cudnn_enabled() and _try_cudnn(
            "convolution_backward_filter", xc, dyc, dw, (g.ph, g.pw), (g.sh, g.sw),
            (g.dh, g.dw), 1, deterministic=True, auto_tune=False, tensor_core="never"):
        return dw
    dw2 = dw.reshape(F, g.K)
    for n0, n1, cols in _im2col_blocks(cp, g, xc, dt):
        part = cp.matmul(_to_fl(cp, dyc, n0, n1, F, g.L), cols.T)
        if n0 == 0:
            dw2[...] = part
        else:
            dw2 += part
    return dw
