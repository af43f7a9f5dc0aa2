"""The planner's memory model against the buffers the kernels and layers really hold.

* :func:`distconv.ops.conv_workspace.conv2d_workspace_bytes` equals the im2col column buffer the
  NumPy kernels leave in :mod:`distconv.ops._workspace` after forward, backward-data and
  backward-filter (one block of samples, not the whole batch: the old all-N formula is
  the negative control), and the folding buffers of a 1x1 convolution;
* :meth:`CostModel.layer` prices a conv's workspace that way and a max pool's kept argmax
  at the index dtype the op returns (uint8 for a kernel of <= 256 elements; the 8 bytes
  per element it used to price are the negative control).
"""
import numpy as np
import pytest

from distconv import models, nn, ops
from distconv.ops import _workspace
from distconv.ops.conv_workspace import conv2d_workspace_bytes

SHAPES = [  # x shape, w shape, stride, padding
    ((8, 16, 32, 32), (16, 16, 3, 3), 1, 1),    # blocks of 4 samples (phase layout)
    ((4, 8, 15, 15), (8, 8, 3, 3), 2, 1),       # stride 2, odd size
    ((2, 3, 33, 33), (8, 3, 7, 7), 2, 3),       # a stem: 7x7/2
    ((2, 4, 16, 16), (32, 4, 3, 3), 1, 1),      # F > C: backward-data by col2im
    ((16, 8, 8, 8), (12, 8, 1, 1), 1, 0),       # 1x1, samples folded into the GEMM
]


def _run_kernels(xs, ws, s, p):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    _workspace.clear()
    y = ops.conv2d_forward(x, w, (s, s), (p, p), (1, 1))
    dy = np.ones_like(y)
    ops.conv2d_backward_data(dy, w, xs[2:], (s, s), (p, p), (1, 1))
    ops.conv2d_backward_filter(x, dy, ws[2:], (s, s), (p, p), (1, 1))
    return {k[1]: b.nbytes for k, b in _workspace._CACHE.items()}, y.shape


@pytest.mark.parametrize("xs,ws,s,p", SHAPES)
def test_workspace_bytes_are_the_kernels_buffers(xs, ws, s, p):
    held, ys = _run_kernels(xs, ws, s, p)
    got = conv2d_workspace_bytes(xs, ws, s, p, 1, 4)
    if ws[2:] == (1, 1):
        assert got == held["fwd1x1_in"] + held["fwd1x1_out"] > 0
        return
    assert got == max(held.get("cols", 0), held.get("bwd_cols", 0))
    if xs == SHAPES[0][0]:  # negative control: the whole batch's columns
        k = ws[1] * ws[2] * ws[3]
        assert k * xs[0] * ys[2] * ys[3] * 4 > 1.5 * got


def test_workspace_bytes_cupy_blocks_without_cupy():
    from distconv.ops.cuda.conv import _COLS_BYTES
    # (N, C*9, L) = (64, 576, 3136) float32: 462 MB for all N, 256 MiB blocks of 37 samples
    got = conv2d_workspace_bytes((64, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1, 4, "cupy")
    per = 576 * 3136 * 4
    assert got == (_COLS_BYTES // per) * per
    assert conv2d_workspace_bytes((0, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1, 4, "cupy") == 0


def test_cost_model_prices_the_layers_buffers():
    from distconv.planner.costs import CostModel
    from distconv.planner.events import act_dist
    from distconv.planner.graph import trace
    from distconv.planner.machine import Machine, zero_links
    from distconv.planner.strategies import Split

    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.MaxPool2d(3, 2, 1),
                        nn.Flatten(), nn.Linear(16 * 16 * 16, 5))
    xs = (8, 16, 32, 32)
    g = trace(net, xs)
    cost = CostModel(g, 1, Machine(name="one", ranks_per_node=1, links=zero_links()))
    layers = {x.kind: x for x in g.layers()}
    st = Split(1, 1, 1)
    conv = cost.layer(layers["conv"], st, act_dist(st, 4))
    held, _ = _run_kernels(xs, (16, 16, 3, 3), 1, 1)
    assert conv.work == max(held.get("cols", 0), held.get("bwd_cols", 0)) > 0
    pool = layers["maxpool"]
    c = cost.layer(pool, None, act_dist(st, 4))
    x = np.zeros(pool.in_shape, np.float32)
    _, arg = ops.max_pool2d_forward(x, 3, 2, (1, 1))
    assert arg.dtype == np.uint8
    assert c.mem == arg.nbytes
    assert c.mem != arg.size * 8  # negative control: the int64 argmax priced before


def test_plan_memory_of_resnet50_counts_one_block_of_columns():
    """ResNet-50's stem at batch 32 on one rank: the 7x7/2 columns of one block of
    samples, far below the whole batch's."""
    from distconv.planner.costs import CostModel
    from distconv.planner.events import act_dist
    from distconv.planner.graph import trace
    from distconv.planner.machine import Machine, zero_links
    from distconv.planner.strategies import Split

    g = trace(models.resnet50(10, stem="imagenet"), (32, 3, 224, 224))
    stem = next(x for x in g.layers() if x.kind == "conv")
    cost = CostModel(g, 1, Machine(name="one", ranks_per_node=1, links=zero_links()))
    c = cost.layer(stem, Split(1, 1, 1), act_dist(Split(1, 1, 1), 4))
    whole = 3 * 7 * 7 * 32 * 112 * 112 * 4
    assert c.work == conv2d_workspace_bytes((32, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1, 4)
    assert 0 < c.work < whole / 8
