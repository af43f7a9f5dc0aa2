"""NumPy twins of the CUDA launchers of :mod:`distconv.ops.cuda`: ``<name>_numpy`` transliterates
the index math of the kernel behind ``<name>`` with vectorised NumPy. They are the
references the GPU tests compare against, run on any machine, and are what the launchers
call for NumPy input. Shapes and semantics: see the launcher of the same name."""
from __future__ import annotations

import numpy as np

from ..pool import avg_pool2d_divisor, max_pool_index_dtype
from ..geometry import ConvGeometry, pool2d_geometry
from ._common import (_bn_bwd_vectors, _bn_fwd_vectors, _bwd_data_geom, _bwd_filter_geom,
                      _check4, _check_shape, _vec)


def _fwd_pairs(n_out, n_in, s, p, d, i):
    """Output/input index pairs (o, h) with h = o*s - p + i*d inside [0, n_in)."""
    o = np.arange(n_out, dtype=np.int64)
    h = o * s - p + i * d
    ok = (h >= 0) & (h < n_in)
    return o[ok], h[ok]


def _adj_pairs(n_in, n_out, s, p, d, i):
    """Input/output index pairs (h, o): h + p - i*d == o*s with 0 <= o < n_out (the gather of
    the adjoint kernels: col2im, pooling backward)."""
    h = np.arange(n_in, dtype=np.int64)
    t = h + p - i * d
    ok = (t >= 0) & (t % s == 0) & (t // s < n_out)
    return h[ok], t[ok] // s


# ------------------------------------------------------------- im2col / col2im
def im2col_numpy(x, kernel_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """NumPy twin of :func:`im2col`: x (N, C, H, W) -> cols (N, C*kh*kw, Ho*Wo).

    cols[n, (c*kh + i)*kw + j, ho*Wo + wo] = x[n, c, ho*sh - ph + i*dh, wo*sw - pw + j*dw]
    (0 outside the image); rows ordered like ``torch.nn.functional.unfold``.
    """
    x = np.asarray(x)
    g = ConvGeometry(x.shape, kernel_hw, stride, padding, dilation)
    cols = np.zeros((g.N, g.C, g.kh, g.kw, g.Ho, g.Wo), x.dtype)
    if cols.size:
        for i in range(g.kh):
            ho, h = _fwd_pairs(g.Ho, g.H, g.sh, g.ph, g.dh, i)
            for j in range(g.kw):
                wo, w = _fwd_pairs(g.Wo, g.W, g.sw, g.pw, g.dw, j)
                cols[:, :, i, j][:, :, ho[:, None], wo[None, :]] = x[:, :, h[:, None], w[None, :]]
    return cols.reshape(g.N, g.K, g.L)


def col2im_numpy(cols, x_shape, kernel_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """NumPy twin of :func:`col2im`, the adjoint of :func:`im2col_numpy`.

    cols (N, C*kh*kw, Ho*Wo) -> x (N, C, H, W): each pixel gathers its
    contributions in kernel-offset order (i, j), like the CUDA kernel.
    """
    cols = np.asarray(cols)
    g = ConvGeometry(x_shape, kernel_hw, stride, padding, dilation)
    _check_shape(cols, (g.N, g.K, g.L), "cols")
    x = np.zeros((g.N, g.C, g.H, g.W), cols.dtype)
    if x.size == 0:
        return x
    c6 = cols.reshape(g.N, g.C, g.kh, g.kw, g.Ho, g.Wo)
    for i in range(g.kh):
        h, ho = _adj_pairs(g.H, g.Ho, g.sh, g.ph, g.dh, i)
        if h.size == 0:
            continue
        for j in range(g.kw):
            w, wo = _adj_pairs(g.W, g.Wo, g.sw, g.pw, g.dw, j)
            if w.size:
                x[:, :, h[:, None], w[None, :]] += c6[:, :, i, j][:, :, ho[:, None], wo[None, :]]
    return x


# ------------------------------------------------------------------ convolution
def conv2d_forward_numpy(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """NumPy twin of :func:`conv2d_forward`: W (F, K) @ im2col_numpy(x) per sample."""
    x = np.asarray(x)
    g = ConvGeometry.of_weight(x.shape, w.shape, stride, padding, dilation)
    F = g.F
    dt = x.dtype
    if g.N * F * g.L == 0:
        return np.zeros((g.N, F, g.Ho, g.Wo), dt)
    w2 = np.asarray(w).astype(dt, copy=False).reshape(F, g.K)
    return np.matmul(w2, im2col_numpy(x, (g.kh, g.kw), stride, padding, dilation)).reshape(
        g.N, F, g.Ho, g.Wo)


def conv2d_backward_data_numpy(dy, w, x_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """NumPy twin of :func:`conv2d_backward_data`: col2im_numpy(W^T @ dy)."""
    dy = np.asarray(dy)
    g = _bwd_data_geom(dy, w, x_hw, stride, padding, dilation)
    N, H, W, F = g.N, g.H, g.W, g.F
    dt = dy.dtype
    if N * g.C * H * W == 0 or F == 0:
        return np.zeros((N, g.C, H, W), dt)
    w2 = np.asarray(w).astype(dt, copy=False).reshape(F, g.K)
    cols = np.matmul(w2.T, dy.reshape(N, F, g.L))
    return col2im_numpy(cols, (N, g.C, H, W), (g.kh, g.kw), stride, padding, dilation)


def conv2d_backward_filter_numpy(x, dy, kernel_hw, stride=(1, 1), padding=(0, 0),
                                 dilation=(1, 1)):
    """NumPy twin of :func:`conv2d_backward_filter`: sum_n dy[n] (F, L) @ im2col(x)[n]^T."""
    x = np.asarray(x)
    dy = np.asarray(dy)
    g = _bwd_filter_geom(x, dy, kernel_hw, stride, padding, dilation)
    F, kh, kw = g.F, g.kh, g.kw
    dt = x.dtype
    if F * g.K == 0 or g.N == 0:
        return np.zeros((F, g.C, kh, kw), dt)
    cols = im2col_numpy(x, (kh, kw), stride, padding, dilation)  # (N, K, L)
    d = dy.astype(dt, copy=False).reshape(g.N, F, g.L)
    return np.matmul(d, cols.transpose(0, 2, 1)).sum(axis=0).reshape(F, g.C, kh, kw)


# ------------------------------------------------------------------ batch norm
def bn_local_stats_numpy(x):
    """NumPy twin of :func:`bn_local_stats`: (sum (C,) f64, sumsq (C,) f64, count N*H*W)."""
    x = np.asarray(x)
    _check4(x)
    N, C, H, W = (int(s) for s in x.shape)
    s = np.zeros(C, np.float64)
    ss = np.zeros(C, np.float64)
    if x.size:
        v = x.reshape(N, C, H * W).astype(np.float64)
        s = v.sum(axis=(0, 2))
        ss = (v * v).sum(axis=(0, 2))
    return s, ss, N * H * W


def bn_backward_reduce_numpy(dy, x, mean):
    """NumPy twin of :func:`bn_backward_reduce`: (sum dy, sum dy*(x - mean)), (C,) f64 each."""
    x, dy = np.asarray(x), np.asarray(dy)
    _check4(x)
    _check_shape(dy, x.shape, "dy")
    N, C, H, W = (int(s) for s in x.shape)
    m = _vec(np, mean, C, np.float64, "mean")
    if x.size == 0:
        return np.zeros(C), np.zeros(C)
    d = dy.reshape(N, C, H * W).astype(np.float64)
    xm = x.reshape(N, C, H * W).astype(np.float64) - m.reshape(1, C, 1)
    return d.sum(axis=(0, 2)), (d * xm).sum(axis=(0, 2))


def bn_forward_apply_numpy(x, mean, invstd, weight=None, bias=None):
    """NumPy twin of :func:`bn_forward_apply`: y = (x - mean) * (invstd*weight) + bias."""
    x = np.asarray(x)
    _check4(x)
    C = int(x.shape[1])
    m, sc, b = _bn_fwd_vectors(np, C, x.dtype, mean, invstd, weight, bias)
    r = (1, C, 1, 1)
    return (x - m.reshape(r)) * sc.reshape(r) + b.reshape(r)


def bn_backward_apply_numpy(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """NumPy twin of :func:`bn_backward_apply`:
    dx = ((x - mean) * negk + dy - mdy) * scale in dy's dtype."""
    dy = np.asarray(dy)
    _check4(dy, "dy")
    dt = dy.dtype
    x = np.asarray(x).astype(dt, copy=False)
    _check_shape(x, dy.shape, "x")
    C = int(dy.shape[1])
    m, nk, mdy, sc = _bn_bwd_vectors(np, C, dt, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
    r = (1, C, 1, 1)
    return ((x - m.reshape(r)) * nk.reshape(r) + dy - mdy.reshape(r)) * sc.reshape(r)


# --------------------------------------------------------------------- pooling
def max_pool2d_forward_numpy(x, kernel, stride=None, padding=(0, 0), *, ceil_mode=False):
    """NumPy twin of :func:`max_pool2d_forward` -> (y, argmax)."""
    x = np.asarray(x)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = pool2d_geometry(
        x.shape, kernel, stride, padding, ceil_mode)
    y = np.empty((N, C, Ho, Wo), x.dtype)
    arg = np.zeros((N, C, Ho, Wo), max_pool_index_dtype((kh, kw)))
    if y.size == 0:
        return y, arg
    ninf = x.dtype.type(-np.inf)
    ho = np.arange(Ho)
    wo = np.arange(Wo)
    best = np.full(y.shape, ninf, x.dtype)
    # first in-bounds offset of each window (PyTorch's initial index)
    barg = np.broadcast_to(np.maximum(ph - ho * sh, 0)[:, None] * kw
                           + np.maximum(pw - wo * sw, 0)[None, :], y.shape).astype(np.int64)
    for i in range(kh):
        h = ho * sh - ph + i
        hin = (h >= 0) & (h < H)
        hc = np.clip(h, 0, H - 1)
        for j in range(kw):
            w = wo * sw - pw + j
            win = (w >= 0) & (w < W)
            wc = np.clip(w, 0, W - 1)
            v = np.where(hin[:, None] & win[None, :], x[:, :, hc[:, None], wc[None, :]], ninf)
            k = i * kw + j
            take = (v > best) | (v != v)
            best = np.where(take, v, best)
            barg = np.where(take, k, barg)
    y[...] = best
    arg[...] = barg
    return y, arg


def max_pool2d_backward_numpy(dy, argmax, x_shape, kernel, stride=None, padding=(0, 0), *,
                              ceil_mode=False):
    """NumPy twin of :func:`max_pool2d_backward` (gather per input pixel, (i, j) order)."""
    dy = np.asarray(dy)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = pool2d_geometry(
        x_shape, kernel, stride, padding, ceil_mode)
    _check_shape(dy, (N, C, Ho, Wo), "dy")
    _check_shape(argmax, (N, C, Ho, Wo), "argmax")
    dx = np.zeros((N, C, H, W), dy.dtype)
    if dx.size == 0:
        return dx
    arg = np.asarray(argmax).astype(np.int64)
    zero = dy.dtype.type(0)
    for i in range(kh):
        h, ho = _adj_pairs(H, Ho, sh, ph, 1, i)
        if h.size == 0:
            continue
        for j in range(kw):
            w, wo = _adj_pairs(W, Wo, sw, pw, 1, j)
            if w.size == 0:
                continue
            sel = (slice(None), slice(None), ho[:, None], wo[None, :])
            dx[:, :, h[:, None], w[None, :]] += np.where(arg[sel] == i * kw + j, dy[sel], zero)
    return dx


def avg_pool2d_forward_numpy(x, kernel, stride=None, padding=(0, 0), *, ceil_mode=False,
                             count_include_pad=True):
    """NumPy twin of :func:`avg_pool2d_forward`: (sum of the in-bounds window) / divisor
    (:func:`distconv.ops.pool.avg_pool2d_divisor`)."""
    x = np.asarray(x)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = pool2d_geometry(
        x.shape, kernel, stride, padding, ceil_mode)
    acc = np.zeros((N, C, Ho, Wo), x.dtype)
    if acc.size == 0:
        return acc
    for i in range(kh):
        ho, h = _fwd_pairs(Ho, H, sh, ph, 1, i)
        for j in range(kw):
            wo, w = _fwd_pairs(Wo, W, sw, pw, 1, j)
            acc[:, :, ho[:, None], wo[None, :]] += x[:, :, h[:, None], w[None, :]]
    div = avg_pool2d_divisor(x.shape, kernel, stride, padding, ceil_mode,
                             count_include_pad).astype(x.dtype)
    return acc / div


def avg_pool2d_backward_numpy(dy, x_shape, kernel, stride=None, padding=(0, 0), *,
                              ceil_mode=False, count_include_pad=True):
    """NumPy twin of :func:`avg_pool2d_backward`: pixels gather dy/divisor of their windows."""
    dy = np.asarray(dy)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = pool2d_geometry(
        x_shape, kernel, stride, padding, ceil_mode)
    _check_shape(dy, (N, C, Ho, Wo), "dy")
    dx = np.zeros((N, C, H, W), dy.dtype)
    if dx.size == 0:
        return dx
    g = dy / avg_pool2d_divisor(x_shape, kernel, stride, padding, ceil_mode,
                                count_include_pad).astype(dy.dtype)
    for i in range(kh):
        h, ho = _adj_pairs(H, Ho, sh, ph, 1, i)
        for j in range(kw):
            w, wo = _adj_pairs(W, Wo, sw, pw, 1, j)
            if h.size and w.size:
                dx[:, :, h[:, None], w[None, :]] += g[:, :, ho[:, None], wo[None, :]]
    return dx


# ------------------------------------------------------------------------ ReLU
def relu_forward_numpy(x, out=None):
    """NumPy twin of :func:`relu_forward`: x where x > 0 or x is NaN, else 0."""
    x = np.asarray(x)
    r = np.where((x > 0) | (x != x), x, x.dtype.type(0))
    if out is None:
        return r
    out[...] = r
    return out


def relu_backward_numpy(dy, y, out=None):
    """NumPy twin of :func:`relu_backward`: dy * (0 where y <= 0 else 1)."""
    dy = np.asarray(dy)
    y = np.asarray(y)
    _check_shape(y, dy.shape, "y")
    one, zero = dy.dtype.type(1), dy.dtype.type(0)
    r = dy * np.where(y.astype(dy.dtype, copy=False) <= 0, zero, one)
    if out is None:
        return r
    out[...] = r
    return out
