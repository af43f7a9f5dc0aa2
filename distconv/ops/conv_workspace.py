"""Bytes of the scratch buffers the convolution kernels of :mod:`distconv.ops.conv` (and
:mod:`distconv.ops.cuda.conv`) build, from their own geometry: the planner's memory
model reads them here (:mod:`distconv.planner.layercompute`)."""
from __future__ import annotations

from . import conv as _conv
from .geometry import pair


def conv2d_workspace_bytes(x_shape, w_shape, stride=(1, 1), padding=(0, 0),
                           dilation=(1, 1), itemsize=4, backend="numpy") -> int:
    """Bytes of the largest scratch buffer the kernels of one convolution build, for the
    planner's memory model: x (N, C, H, W), w (F, C, kh, kw), ``backend`` ``"numpy"`` or
    ``"cupy"`` (the im2col path; cuDNN's own workspace is not counted).

    NumPy: the im2col columns (C*kh*kw, B*Lc) of a block of ``B`` samples (``_Geom.B``,
    at least ``_TARGET_COLS`` columns, or all N), which forward, backward-data and
    backward-filter each fill one block at a time, or, where backward-data runs as the
    forward convolution of dy with the flipped kernel, that convolution's columns
    (F*kh*kw rows) if larger; a 1x1 unpadded convolution builds no columns, only its
    sample-folding buffers (C + F, B, Ho*Wo) when it folds samples.
    CuPy: the column buffer (C*kh*kw, B*Ho*Wo) of its blocks
    (:func:`distconv.ops.cuda.conv.cols_bytes`). The buffers stay cached in
    :mod:`._workspace`, one per tag shared by every layer, so a model holds its largest
    layer's.
    """
    if backend == "cupy":
        from .cuda.conv import cols_bytes
        return cols_bytes(x_shape, w_shape, stride, padding, dilation, itemsize)
    g = _conv._geom(tuple(int(v) for v in x_shape), tuple(int(v) for v in w_shape),
                    pair(stride), pair(padding), pair(dilation))
    if g.N * g.K * g.F * g.L == 0:
        return 0
    if g.pointwise:
        b = _conv._block_size(g.N, g.L)
        return (g.C + g.F) * b * g.L * int(itemsize) if b > 1 else 0
    cols = g.K * g.B * g.Lc * int(itemsize)  # forward and backward-filter (and col2im)
    q = _conv._flip_padding(g)
    if q is None:
        return cols
    # backward-data as the forward convolution of dy with the flipped kernel (kh > 1)
    f = _conv._geom((g.N, g.F, g.Ho, g.Wo), (g.C, g.F, g.kh, g.kw), (1, 1), q, (g.dh, g.dw))
    return max(cols, f.K * f.B * f.Lc * int(itemsize))
