"""Local 2-D convolution: forward, backward-data and backward-filter as large GEMMs.

All arrays are NCHW, weights OIHW (PyTorch layout): ``x`` is (N, C, H, W),
``w`` is (F, C, kh, kw), ``y``/``dy`` is (N, F, Ho, Wo). No bias (layers add
it). ``stride``, ``padding`` and ``dilation`` are 2-tuples of ints. Every
function accepts NumPy or CuPy arrays (the array module is taken from the
input), any dimension may be zero, and results have the input's dtype.

How the work is laid out (B = a block of samples, K = C*kh*kw, L = Ho*Wo):

* 1x1, no padding: no im2col at all. Forward is ``W(F,C) @ x[n](C,H*W)``
  per sample (a batched GEMM writing straight into NCHW ``y``); stride > 1
  takes one strided copy of the input first.
* stride 1 ("extended-row" im2col): the zero-padded input of one sample is
  flattened to (C, Hp*Wp); the patch matrix row for (c, i, j) is then the
  *contiguous* run ``xpad[c].flat[i*dh*Wp + j*dw : ... + Ho*Wp]``, so building
  the (K, Ho*Wp) column buffer is K long memcpy-like copies rather than
  K*Ho short ones. The GEMM computes Wp - Wo wasted columns per output row,
  which are cropped. Used when that waste is small.
* otherwise: classic im2col through an ``as_strided`` view and one copy into
  a cached (K, B*L) buffer.
* small images (L below ~``_TARGET_COLS``) fold several samples into the GEMM's
  column dimension so the BLAS gets a wide matrix.
* backward-data, stride 1, when the batch is large enough for the weight copy
  to pay (``_flip_pays``): a forward convolution of ``dy`` with the flipped,
  transposed kernel (no col2im). Otherwise: ``W^T @ dy`` (W^T a transposed
  view, no copy) then col2im by kh*kw strided slice additions (a loop over
  kernel offsets only).
* backward-filter: ``dy(F, B*L) @ cols(K, B*L)^T`` accumulated over sample
  blocks, using the same column buffers as forward; with few filters
  (``_BWF_SWAP_MAX_F``) as ``dw^T = cols @ dy^T``, the orientation OpenBLAS
  runs faster when F is the short side.

Scratch buffers come from :mod:`distconv.ops._workspace` and are reused
between calls with the same shapes.
"""
from __future__ import annotations

import functools

import numpy as np

from ..backend import array_module
from . import _workspace
from ._gpu import gpu_impl
from .geometry import ConvGeometry, conv2d_output_hw, pair  # noqa: F401  (re-exported)

# Fold samples into one GEMM until it has at least this many columns.
_TARGET_COLS = 4096
# Use the phase (extended-row) im2col when its wasted width (Wq - Wo) / Wo is at most this.
_EXT_MAX_WASTE = 0.05
# Backward-filter computes dw^T = cols @ dy^T when F is at most _BWF_SWAP_MAX_F and the
# columns (N * L) are at least _BWF_SWAP_MIN_RATIO times F: F is the GEMM's short side.
_BWF_SWAP_MAX_F = 128
_BWF_SWAP_MIN_RATIO = 8
# Relative per-element costs of the two backward-data forms of a stride-1 conv (_flip_pays),
# fitted to ResNet-18 layers at batch 2 and 32 on one thread of the 2-core dev VM: copying
# the flipped weight, an im2col run copy of dy, one col2im addition
_FLIP_WEIGHT_COPY = 1.7
_FLIP_COLS_COPY = 0.3
_COL2IM_ADD = 1.0


def _as_strided(xp, a, shape, strides):
    if xp is np:
        return np.lib.stride_tricks.as_strided(a, shape=shape, strides=strides, writeable=False)
    return xp.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)


def _block_size(n, cols_per_sample):
    return max(1, min(n, -(-_TARGET_COLS // max(1, cols_per_sample))))


class _Geom(ConvGeometry):
    """Shapes (:class:`~distconv.ops.geometry.ConvGeometry`) and the chosen im2col layout
    of one convolution.

    In the "phase" layout (``ext``) the zero-padded input is split into
    sh*sw phase images ``P[a, b][c, r, q] = xpad[c, a + sh*r, b + sw*q]``
    of size (Hq, Wq); kernel offset (i, j) then reads phase
    ((i*dh) % sh, (j*dw) % sw) at the flat offset
    ``((i*dh)//sh) * Wq + (j*dw)//sw``, a contiguous run of Lc = Ho*Wq values
    per channel (columns ow >= Wo of each output row are wasted work).
    With stride 1 there is one phase: the padded image itself.
    """

    def __init__(self, x_shape, kernel_hw, stride, padding, dilation, *, out_channels=None):
        super().__init__(x_shape, kernel_hw, stride, padding, dilation,
                         out_channels=out_channels)
        self.pointwise = (self.kh == 1 and self.kw == 1 and self.ph == 0 and self.pw == 0)
        self.Hp = self.H + 2 * self.ph
        self.Wp = self.W + 2 * self.pw
        sh, sw, dh, dw = self.sh, self.sw, self.dh, self.dw
        r0max = (dh * (self.kh - 1)) // sh
        q0max = (dw * (self.kw - 1)) // sw
        self.Wq = max(-(-self.Wp // sw), q0max + self.Wo)
        self.ext = (not self.pointwise
                    and (self.Wq - self.Wo) <= _EXT_MAX_WASTE * self.Wo)
        if self.ext:
            # one extra zero row so the last run of the widest offset stays in the buffer
            self.Hq = max(-(-self.Hp // sh), r0max + self.Ho) + (1 if q0max > 0 else 0)
            self.Lc = self.Ho * self.Wq  # columns per sample
            self.nph = sh * sw
        else:
            self.Lc = self.L
        self.B = _block_size(self.N, self.Lc)

    @functools.cached_property
    def phases(self):
        """Where each phase's valid data sits (phase layout only): ``(a, b, r_start,
        q_start, h_start, w_start, nr, nq)`` per phase."""
        sh, sw = self.sh, self.sw
        out = []
        for a in range(sh):
            r_start = max(0, -(-(self.ph - a) // sh))
            h_start = a + sh * r_start - self.ph
            nr = min(len(range(h_start, self.H, sh)), self.Hq - r_start)
            for b in range(sw):
                q_start = max(0, -(-(self.pw - b) // sw))
                w_start = b + sw * q_start - self.pw
                nq = min(len(range(w_start, self.W, sw)), self.Wq - q_start)
                out.append((a, b, r_start, q_start, h_start, w_start, nr, nq))
        return out

    @functools.cached_property
    def offsets(self):
        """Kernel offset ``(i, j)`` -> ``(phase index, flat offset inside the phase image)``
        (phase layout only)."""
        sh, sw, dh, dw = self.sh, self.sw, self.dh, self.dw
        out = {}
        for i in range(self.kh):
            for j in range(self.kw):
                a, r0 = divmod(i * dh, sh)[::-1]
                b, q0 = divmod(j * dw, sw)[::-1]
                out[i, j] = (a * sw + b, r0 * self.Wq + q0)
        return out


_GEOMS: dict = {}  # (shapes, arguments, layout constants) -> _Geom


def _geom(x_shape, w_shape, stride, padding, dilation):
    """``_Geom.of_weight`` of these arguments, cached: a training step asks for the same few
    geometries three times each, and building one costs more than a small layer's
    im2col. The layout constants are part of the key (tests change them)."""
    try:
        key = (tuple(x_shape), tuple(w_shape), stride, padding, dilation,
               _TARGET_COLS, _EXT_MAX_WASTE)
        g = _GEOMS.get(key)
    except TypeError:  # an unhashable argument (a list): no caching
        return _Geom.of_weight(x_shape, w_shape, stride, padding, dilation)
    if g is None:
        g = _Geom.of_weight(x_shape, w_shape, stride, padding, dilation)
        if len(_GEOMS) >= 1024:
            _GEOMS.clear()
        _GEOMS[key] = g
    return g


def _phase_images(xp, g, x, n0, n1, tag):
    """x[n0:n1] split into zero-bordered phase images: a cached (b, nph, C, Hq, Wq) buffer."""
    b = n1 - n0
    # the zero borders depend on the whole layout, not only the buffer shape
    key = f"{tag}:{g.H}x{g.W}/s{g.sh},{g.sw}/p{g.ph},{g.pw}"
    buf = _workspace.get(xp, key, (b, g.nph, g.C, g.Hq, g.Wq), x.dtype, zero=True)
    for k, (_, _, rs, qs, hs, ws, nr, nq) in enumerate(g.phases):
        if nr > 0 and nq > 0:
            buf[:, k, :, rs:rs + nr, qs:qs + nq] = \
                x[n0:n1, :, hs:hs + g.sh * (nr - 1) + 1:g.sh, ws:ws + g.sw * (nq - 1) + 1:g.sw]
    return buf


def _im2col(xp, g, x, n0, n1, tag="cols"):
    """Column buffer (K, b*Lc) of samples n0..n1, rows ordered (c, i, j)."""
    b = n1 - n0
    cols = _workspace.get(xp, tag, (g.K, b * g.Lc), x.dtype)
    if g.ext:
        ph = _phase_images(xp, g, x, n0, n1, tag + "_ph")
        it = ph.itemsize
        flat = ph.reshape(b, g.nph, g.C, g.Hq * g.Wq)
        c5 = cols.reshape(g.C, g.kh, g.kw, b, g.Lc)
        sN, sP, sC, _ = flat.strides
        for (i, j), (p, off) in g.offsets.items():
            view = _as_strided(xp, flat[:, p, :, off:], (g.C, b, g.Lc), (sC, sN, it))
            xp.copyto(c5[:, i, j], view)
        return cols
    if g.ph or g.pw:
        xpad = _workspace.get(xp, f"{tag}_pad:p{g.ph},{g.pw}", (b, g.C, g.Hp, g.Wp), x.dtype,
                              zero=True)
        xpad[:, :, g.ph:g.ph + g.H, g.pw:g.pw + g.W] = x[n0:n1]
    else:
        xpad = x[n0:n1]
    it = xpad.itemsize
    sN, sC, sH, sW = (s // it for s in xpad.strides)
    view = _as_strided(xp, xpad, (g.C, g.kh, g.kw, b, g.Ho, g.Wo),
                       tuple(s * it for s in (sC, g.dh * sH, g.dw * sW, sN,
                                              g.sh * sH, g.sw * sW)))
    xp.copyto(cols.reshape(g.C, g.kh, g.kw, b, g.Ho, g.Wo), view)
    return cols


def _dy_ext(xp, g, dy, n0, n1, tag):
    """dy[n0:n1] as (F, b*Lc) with the phase layout's extra columns zero (a cached buffer)."""
    b = n1 - n0
    db = _workspace.get(xp, f"{tag}:Wo{g.Wo}", (g.F, b, g.Ho, g.Wq), dy.dtype, zero=True)
    db[:, :, :, :g.Wo] = dy[n0:n1].transpose(1, 0, 2, 3)
    return db.reshape(g.F, b * g.Lc)


def _weight2d(xp, w, dtype, F, K):
    w = xp.asarray(w)
    if w.dtype != dtype:
        w = w.astype(dtype)
    return xp.ascontiguousarray(w).reshape(F, K)


def _pointwise_input(xp, g, x):
    """(N, C, Ho*Wo) view/copy of x for a 1x1 unpadded convolution."""
    if g.sh == 1 and g.sw == 1:
        return xp.ascontiguousarray(x).reshape(g.N, g.C, g.L)
    xs = x[:, :, :g.sh * (g.Ho - 1) + 1:g.sh, :g.sw * (g.Wo - 1) + 1:g.sw]
    return xp.ascontiguousarray(xs).reshape(g.N, g.C, g.L)


def _gemm_batched(xp, A, X, Y, tag):
    """Y[n] = A @ X[n] for X (N, K, L), Y (N, M, L); folds samples when L is small."""
    N, K, L = X.shape
    M = A.shape[0]
    B = _block_size(N, L)
    if B == 1:
        xp.matmul(A, X, out=Y)
        return
    for n0 in range(0, N, B):
        n1 = min(N, n0 + B)
        b = n1 - n0
        xf = _workspace.get(xp, tag + "_in", (K, b, L), X.dtype)
        xp.copyto(xf, X[n0:n1].transpose(1, 0, 2))
        yf = _workspace.get(xp, tag + "_out", (M, b, L), X.dtype)
        xp.matmul(A, xf.reshape(K, b * L), out=yf.reshape(M, b * L))
        xp.copyto(Y[n0:n1], yf.transpose(1, 0, 2))


def conv2d_forward(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Convolution forward (cross-correlation, as PyTorch), without bias.

    x: (N, C, H, W); w: (F, C, kh, kw) -> y: (N, F, Ho, Wo), dtype of x.
    """
    _g = gpu_impl("conv2d_forward", x)
    if _g is not None:
        return _g(x, w, stride, padding, dilation)
    xp = array_module(x)
    g = _geom(x.shape, w.shape, stride, padding, dilation)
    dt = x.dtype
    y = xp.empty((g.N, g.F, g.Ho, g.Wo), dt)
    if y.size == 0:
        return y
    if g.K == 0:
        y.fill(0)
        return y
    w2 = _weight2d(xp, w, dt, g.F, g.K)
    if g.pointwise:
        _gemm_batched(xp, w2, _pointwise_input(xp, g, x), y.reshape(g.N, g.F, g.L), "fwd1x1")
        return y
    for n0 in range(0, g.N, g.B):
        n1 = min(g.N, n0 + g.B)
        b = n1 - n0
        cols = _im2col(xp, g, x, n0, n1)
        if g.ext:
            out = _workspace.get(xp, "fwd_out", (g.F, b, g.Ho, g.Wq), dt)
            xp.matmul(w2, cols, out=out.reshape(g.F, b * g.Lc))
            xp.copyto(y[n0:n1], out[:, :, :, :g.Wo].transpose(1, 0, 2, 3))
        elif b == 1:
            xp.matmul(w2, cols, out=y[n0].reshape(g.F, g.L))
        else:
            out = _workspace.get(xp, "fwd_out", (g.F, b, g.L), dt)
            xp.matmul(w2, cols, out=out.reshape(g.F, b * g.L))
            xp.copyto(y[n0:n1].reshape(b, g.F, g.L), out.transpose(1, 0, 2))
    return y


def conv2d_backward_data(dy, w, x_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Gradient of the convolution with respect to its input.

    dy: (N, F, Ho, Wo); w: (F, C, kh, kw); x_hw = (H, W) -> dx: (N, C, H, W), dtype of dy.
    """
    _g = gpu_impl("conv2d_backward_data", dy)
    if _g is not None:
        return _g(dy, w, x_hw, stride, padding, dilation)
    xp = array_module(dy)
    H, W = (int(v) for v in x_hw)
    N, F = int(dy.shape[0]), int(dy.shape[1])
    C = int(w.shape[1])
    g = _geom((N, C, H, W), w.shape, stride, padding, dilation)
    if tuple(dy.shape) != (N, g.F, g.Ho, g.Wo):
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected {(N, g.F, g.Ho, g.Wo)} "
                         f"for input {H}x{W} and weight {tuple(w.shape)}")
    dt = dy.dtype
    if N * C * H * W == 0:
        return xp.zeros((N, C, H, W), dt)
    if F == 0:
        return xp.zeros((N, C, H, W), dt)
    w2 = _weight2d(xp, w, dt, F, g.K)
    if g.pointwise and g.sh == 1 and g.sw == 1:
        dx = xp.empty((N, C, H, W), dt)
        _gemm_batched(xp, w2.T, xp.ascontiguousarray(dy).reshape(N, F, g.L),
                      dx.reshape(N, C, H * W), "bwd1x1")
        return dx
    if g.pointwise:
        dx = xp.zeros((N, C, H, W), dt)
        tmp = _workspace.get(xp, "bwd1x1s", (N, C, g.Ho, g.Wo), dt)
        _gemm_batched(xp, w2.T, xp.ascontiguousarray(dy).reshape(N, F, g.L),
                      tmp.reshape(N, C, g.L), "bwd1x1")
        dx[:, :, :g.sh * (g.Ho - 1) + 1:g.sh, :g.sw * (g.Wo - 1) + 1:g.sw] = tmp
        return dx
    q = _flip_padding(g)
    if q is not None:
        # full correlation of dy with the flipped kernel, channels swapped
        wt = xp.ascontiguousarray(xp.asarray(w, dtype=dt).transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
        return conv2d_forward(dy, wt, (1, 1), q, (g.dh, g.dw))
    if g.ext:
        return _backward_data_phase(xp, g, dy, w2)
    return _backward_data_col2im(xp, g, dy, w2)


def _flip_padding(g):
    """The padding ``(qh, qw)`` of the forward convolution that backward-data of ``g`` runs
    as (stride 1, flipped kernel, where :func:`_flip_pays`), else None."""
    qh = g.dh * (g.kh - 1) - g.ph
    qw = g.dw * (g.kw - 1) - g.pw
    if g.sh == 1 and g.sw == 1 and qh >= 0 and qw >= 0 and _flip_pays(g):
        return (qh, qw)
    return None


def _flip_pays(g):
    """Whether backward-data of a stride-1 conv should run as a forward conv of dy with the
    flipped, transposed kernel (an im2col of dy, but a strided F*C*kh*kw weight copy every
    call) rather than ``W^T @ dy`` + col2im (no weight copy, kh*kw run additions).
    Per-element costs (:data:`_FLIP_WEIGHT_COPY`, :data:`_FLIP_COLS_COPY`,
    :data:`_COL2IM_ADD`); the weight copy dominates when the batch is small (ResNet's late
    stages at batch 2 spent ~15 % of the step on it)."""
    cols = g.N * g.Lc
    return (_FLIP_WEIGHT_COPY * g.F * g.C + _FLIP_COLS_COPY * g.F * cols
            < _COL2IM_ADD * g.C * cols)


def _backward_data_phase(xp, g, dy, w2):
    """col2im in the phase layout: W^T @ dy, then kh*kw contiguous-run additions."""
    dt = dy.dtype
    dx = xp.empty((g.N, g.C, g.H, g.W), dt)
    w2t = w2.T  # (K, F), a transposed view: the BLAS reads it as is, no copy
    for n0 in range(0, g.N, g.B):
        n1 = min(g.N, n0 + g.B)
        b = n1 - n0
        db = _dy_ext(xp, g, dy, n0, n1, "bwd_dyext")
        cols = _workspace.get(xp, "bwd_cols", (g.K, b * g.Lc), dt)
        xp.matmul(w2t, db, out=cols)
        c5 = cols.reshape(g.C, g.kh, g.kw, b, g.Lc)
        acc = _workspace.get(xp, "bwd_phacc", (b, g.nph, g.C, g.Hq * g.Wq), dt)
        acc.fill(0)
        for (i, j), (p, off) in g.offsets.items():
            # extra columns of dy are zero, so the wasted columns add zeros
            acc[:, p, :, off:off + g.Lc] += c5[:, i, j].transpose(1, 0, 2)
        acc5 = acc.reshape(b, g.nph, g.C, g.Hq, g.Wq)
        for k, (_, _, rs, qs, hs, ws, nr, nq) in enumerate(g.phases):
            if nr > 0 and nq > 0:
                dx[n0:n1, :, hs:hs + g.sh * (nr - 1) + 1:g.sh, ws:ws + g.sw * (nq - 1) + 1:g.sw] = \
                    acc5[:, k, :, rs:rs + nr, qs:qs + nq]
    return dx


def _backward_data_col2im(xp, g, dy, w2):
    dt = dy.dtype
    dx = xp.empty((g.N, g.C, g.H, g.W), dt)
    w2t = w2.T  # (K, F), a transposed view: the BLAS reads it as is, no copy
    B = _block_size(g.N, g.L)
    dyc = xp.ascontiguousarray(dy)
    for n0 in range(0, g.N, B):
        n1 = min(g.N, n0 + B)
        b = n1 - n0
        if b == 1:
            dyb = dyc[n0].reshape(g.F, g.L)
        else:
            dyb = _workspace.get(xp, "bwd_dy", (g.F, b, g.L), dt)
            xp.copyto(dyb, dyc[n0:n1].reshape(b, g.F, g.L).transpose(1, 0, 2))
            dyb = dyb.reshape(g.F, b * g.L)
        cols = _workspace.get(xp, "bwd_cols", (g.K, b * g.L), dt)
        xp.matmul(w2t, dyb, out=cols)
        cols6 = cols.reshape(g.C, g.kh, g.kw, b, g.Ho, g.Wo)
        pad = g.ph > 0 or g.pw > 0
        if pad:
            acc = _workspace.get(xp, "bwd_acc", (b, g.C, g.Hp, g.Wp), dt)
        else:
            acc = dx[n0:n1]
        acc.fill(0)
        hs = g.sh * (g.Ho - 1) + 1
        ws = g.sw * (g.Wo - 1) + 1
        for i in range(g.kh):
            for j in range(g.kw):
                a, c = i * g.dh, j * g.dw
                acc[:, :, a:a + hs:g.sh, c:c + ws:g.sw] += cols6[:, i, j].transpose(1, 0, 2, 3)
        if pad:
            xp.copyto(dx[n0:n1], acc[:, :, g.ph:g.ph + g.H, g.pw:g.pw + g.W])
    return dx


def conv2d_backward_filter(x, dy, kernel_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """Gradient of the convolution with respect to its weight.

    x: (N, C, H, W); dy: (N, F, Ho, Wo); kernel_hw = (kh, kw) -> dw: (F, C, kh, kw), dtype of x.
    """
    _g = gpu_impl("conv2d_backward_filter", x)
    if _g is not None:
        return _g(x, dy, kernel_hw, stride, padding, dilation)
    xp = array_module(x)
    kh, kw = pair(kernel_hw, "kernel_hw")
    F = int(dy.shape[1])
    g = _geom(x.shape, (F, x.shape[1], kh, kw), stride, padding, dilation)
    if tuple(dy.shape) != (g.N, F, g.Ho, g.Wo):
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected {(g.N, F, g.Ho, g.Wo)} "
                         f"for x {tuple(x.shape)} and kernel {(kh, kw)}")
    dt = x.dtype
    if F * g.K == 0 or g.N == 0 or g.L == 0:
        return xp.zeros((F, g.C, kh, kw), dt)
    # every path below writes all of dw with its first GEMM (or the final transpose)
    dw = xp.empty((F, g.C, kh, kw), dt)
    dw2 = dw.reshape(F, g.K)
    dyc = xp.ascontiguousarray(dy)
    if dyc.dtype != dt:
        dyc = dyc.astype(dt)
    first = True

    def acc(a, bmat):
        nonlocal first
        if first:
            xp.matmul(a, bmat, out=dw2)
            first = False
        else:
            dw2[...] += xp.matmul(a, bmat)

    if g.pointwise:
        xs = _pointwise_input(xp, g, x)  # (N, C, L)
        B = _block_size(g.N, g.L)
        for n0 in range(0, g.N, B):
            n1 = min(g.N, n0 + B)
            b = n1 - n0
            if b == 1:
                acc(dyc[n0].reshape(F, g.L), xs[n0].T)
            else:
                db = _workspace.get(xp, "bwf_dy", (F, b, g.L), dt)
                xp.copyto(db, dyc[n0:n1].reshape(b, F, g.L).transpose(1, 0, 2))
                xb = _workspace.get(xp, "bwf_x", (g.C, b, g.L), dt)
                xp.copyto(xb, xs[n0:n1].transpose(1, 0, 2))
                acc(db.reshape(F, b * g.L), xb.reshape(g.C, b * g.L).T)
        return dw
    # Few filters: dw^T (K, F) = cols @ dy^T, the orientation OpenBLAS runs faster when F is
    # the short side (64 filters: ~1.3x on the dev VM), then one weight-sized transpose.
    swap = F <= _BWF_SWAP_MAX_F and g.N * g.Lc >= _BWF_SWAP_MIN_RATIO * F
    if swap:
        dwt = _workspace.get(xp, "bwf_dwt", (g.K, F), dt)
        first_t = True
    for n0 in range(0, g.N, g.B):
        n1 = min(g.N, n0 + g.B)
        b = n1 - n0
        cols = _im2col(xp, g, x, n0, n1)
        if g.ext:
            # dy laid out with the extended rows; the extra columns stay zero
            db = _dy_ext(xp, g, dyc, n0, n1, "bwf_dyext")
        elif b == 1:
            db = dyc[n0].reshape(F, g.L)
        else:
            db = _workspace.get(xp, "bwf_dy", (F, b, g.L), dt)
            xp.copyto(db, dyc[n0:n1].reshape(b, F, g.L).transpose(1, 0, 2))
            db = db.reshape(F, b * g.L)
        if not swap:
            acc(db, cols.T)
        elif first_t:
            xp.matmul(cols, db.T, out=dwt)
            first_t = False
        else:
            dwt += xp.matmul(cols, db.T)
    if swap:
        xp.copyto(dw2, dwt.T)
    return dw
