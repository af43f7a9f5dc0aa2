"""Compute, optimizer update, memory and workspace of one layer's shard: what
:class:`.costs.CostModel` adds to a layer's collectives.

Kernel seconds come from the cost model's :class:`.compute.ComputeModel` on the largest
shard (rank 0's: floor+1 blocks put the extra elements first); a spatial conv or pooling
computes on rank 0's input window, halos included (:func:`distconv.halo.windows`).
Memory per rank: weight shards with their gradients and optimizer state, what backward
keeps (the gathered input of a conv, the input of a batch norm, the output of a ReLU, a
max-pool's argmax) and the transient workspace (a conv's column buffer for one block of
samples, :func:`distconv.ops.conv_workspace.conv2d_workspace_bytes`).
"""
from __future__ import annotations

from ..distribution import block_sizes
from ..ops.conv_workspace import conv2d_workspace_bytes
from ..ops.pool import max_pool_index_dtype
from .events import act_dist, spatial_dist
from .strategies import grid_shape, is_spatial

#: optimizer state slots per parameter
OPT_SLOTS = {"sgd": 1, "adam": 2}


def _prod(xs):
    n = 1
    for s in xs:
        n *= int(s)
    return n


def layer_compute(cost, layer, st, in_dist, c) -> None:
    """Fill ``c`` (a :class:`.costs.LayerCost`) with the compute, update, memory and
    workspace of ``layer`` under strategy ``st`` (``None`` for a non-strategic layer)
    with its input in ``in_dist``, on the largest shard (rank 0's), from ``cost``'s
    compute model, item size and optimizer; the layer's own Python from its measured
    overhead."""
    cm, it = cost.compute, cost.item
    zero = [0] * (3 if st is None else len(grid_shape(st)))
    xs, ys = layer.in_shape, layer.out_shape
    k, a = layer.kind, layer.attrs
    slots = 2 + OPT_SLOTS[cost.optimizer]
    if k == "conv" and is_spatial(st):
        _spatial_conv(cost, layer, st, c, slots)
    elif k in ("conv", "linear"):
        s, ch, f = st[:3]
        n = block_sizes(xs[0], s)[0]
        cl = block_sizes(xs[1], ch)[0]
        fl = block_sizes(ys[1], f)[0]
        if k == "conv":
            kh, kw = a["kernel_size"]
            fw, bd, bf = cm.conv(n, cl, xs[2], xs[3], fl, a["kernel_size"], a["stride"],
                                 a["padding"], a["dilation"])
            c.mem = n * cl * xs[2] * xs[3] * it
            c.work = conv2d_workspace_bytes((n, cl, xs[2], xs[3]), (fl, cl, kh, kw),
                                            a["stride"], a["padding"], a["dilation"], it,
                                            cm.backend)
            nparam = fl * cl * kh * kw
        else:
            fw, bd, bf = cm.linear(n, cl, fl)
            c.mem = n * cl * it
            nparam = fl * cl
        if a.get("bias"):
            nparam += block_sizes(ys[1], ch * f)[0]
        c.compute_fwd, c.compute_bwd = fw, bd + bf
        c.mem += nparam * slots * it
        c.update = cm.update(nparam, cost.optimizer)
    elif k == "bn":
        loc = act_dist(st, 4).local_shape(xs, zero)
        fw, bw = cm.bn(*loc)
        c.compute_fwd, c.compute_bwd = fw, bw
        c.mem = _prod(loc) * it + 2 * loc[1] * slots * it
        c.update = cm.update(2 * loc[1], cost.optimizer)
    else:
        loc = in_dist.local_shape(xs, [0] * len(in_dist.grid.names))
        if k == "relu":
            fw, bw = cm.relu(_prod(loc))
            c.mem = _prod(loc) * it
        elif k == "avgpool" and "output_size" in a:  # adaptive, output above 1x1
            fw, bw = cm.adaptive_avgpool(*loc, *a["output_size"])
        elif k in ("maxpool", "avgpool"):
            fn = cm.maxpool if k == "maxpool" else cm.avgpool
            pad = a["padding"]
            if spatial_dist(in_dist):  # rank 0's window, halos included, padding 0
                loc, pad = _window(in_dist, layer, (1, 1))[:4], 0
            fw, bw = fn(*loc, a["kernel_size"], a["stride"], pad)
            if k == "maxpool":
                oloc = c.out_dist.local_shape(ys, [0] * len(in_dist.grid.names))
                c.mem = _prod(oloc) * max_pool_index_dtype(a["kernel_size"]).itemsize
        elif k == "gap":
            fw, bw = cm.global_avgpool(*loc)
        else:
            fw = bw = 0.0
        c.compute_fwd, c.compute_bwd = fw, bw
    # the layer's own Python around its kernels (measured once per kind; an adaptive
    # average pool is an AdaptiveAvgPool2d, not an AvgPool2d)
    of, ob = cost._overhead("adaptive" if "output_size" in a else k, bool(a.get("bias")))
    c.compute_fwd += of
    c.compute_bwd += ob

def _spatial_conv(cost, layer, st, c, slots) -> None:
    """Compute and memory of a conv under spatial strategy ``st = (s, 1, 1, h, w)``:
    rank 0's kernels on its input window (its rows and columns plus the halos,
    :func:`distconv.halo.windows`, padding 0), the weight replicated."""
    xs, ys, a, it = layer.in_shape, layer.out_shape, layer.attrs, cost.item
    (kh, kw), d = a["kernel_size"], a["dilation"]
    n, _, hw, ww = _window(act_dist(st, 4), layer, d)[:4]
    fw, bd, bf = cost.compute.conv(n, xs[1], hw, ww, ys[1], (kh, kw), a["stride"], 0, d)
    c.compute_fwd, c.compute_bwd = fw, bd + bf
    nparam = ys[1] * xs[1] * kh * kw + (ys[1] if a.get("bias") else 0)
    c.mem = n * xs[1] * hw * ww * it + nparam * slots * it
    c.work = conv2d_workspace_bytes((n, xs[1], hw, ww), (ys[1], xs[1], kh, kw), a["stride"],
                                    0, d, it, cost.compute.backend)
    c.update = cost.compute.update(nparam, cost.optimizer)


def _window(d, layer, dilation) -> tuple:
    """``(n, c, window h, window w, out h, out w)`` of rank 0's block of a conv or pooling
    ``layer`` on an input in ``d``: its rows and columns and the halos it reads, padding
    included (:func:`distconv.halo.windows`), as the spatial code computes on them."""
    from ..halo import windows
    xs, ys, a = layer.in_shape, layer.out_shape, layer.attrs
    z = [0] * len(d.grid.names)
    n, c = d.local_shape(xs, z)[:2]
    out = []
    for i in (2, 3):
        axes = d.split[i]
        parts = 1
        for ax in axes:
            parts *= d.grid.axis_size(ax)
        out.append(windows(xs[i], parts, a["kernel_size"][i - 2], a["stride"][i - 2],
                           a["padding"][i - 2], dilation[i - 2], n_out=ys[i])[0])
    return (n, c, out[0].size, out[1].size, out[0].out[1] - out[0].out[0],
            out[1].out[1] - out[1].out[0])
