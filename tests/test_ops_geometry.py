"""distconv.ops.geometry: the one copy of the conv/pool argument and output-size rules."""
import numpy as np
import pytest
import torch

from distconv.ops import geometry as G


def test_pair():
    assert G.pair(3, "k") == (3, 3)
    assert G.pair(np.int64(2), "k") == (2, 2)
    assert G.pair([1, 2], "k") == (1, 2)
    for bad in ((1, 2, 3), "ab", None, 1.5j):
        with pytest.raises(ValueError, match="MaxPool2d: k must be an int or a pair of ints"):
            G.pair(bad, "k", "MaxPool2d")


@pytest.mark.parametrize("n,k,s,p,d", [(7, 3, 1, 1, 1), (9, 3, 2, 0, 2), (5, 5, 3, 2, 1),
                                       (1, 1, 1, 0, 1), (8, 4, 4, 0, 1)])
def test_conv_output_size_matches_torch(n, k, s, p, d):
    y = torch.nn.functional.conv1d(torch.zeros(1, 1, n), torch.zeros(1, 1, k), stride=s,
                                   padding=p, dilation=d)
    assert G.conv_output_size(n, k, s, p, d) == y.shape[-1]


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("n,k,s,p", [(7, 3, 2, 1), (8, 2, 2, 0), (6, 3, 2, 1), (5, 3, 3, 0)])
def test_pool_output_size_matches_torch(n, k, s, p, ceil_mode):
    y = torch.nn.functional.max_pool1d(torch.zeros(1, 1, n), k, s, p, ceil_mode=ceil_mode)
    assert G.pool_output_size(n, k, s, p, ceil_mode) == y.shape[-1]


def test_conv_geometry():
    g = G.ConvGeometry.of_weight((2, 3, 9, 7), (4, 3, 3, 2), stride=(2, 1), padding=1,
                                 dilation=(1, 2))
    assert (g.N, g.C, g.H, g.W, g.F) == (2, 3, 9, 7, 4)
    assert (g.Ho, g.Wo) == G.conv2d_output_hw(9, 7, (3, 2), (2, 1), 1, (1, 2))
    assert (g.K, g.L) == (3 * 3 * 2, g.Ho * g.Wo)
    assert G.ConvGeometry((2, 3, 9, 7), 3).F is None
    with pytest.raises(ValueError, match="channels"):
        G.ConvGeometry.of_weight((2, 3, 9, 7), (4, 2, 3, 3))
    with pytest.raises(ValueError, match="NCHW"):
        G.ConvGeometry((3, 9, 7), 3)


def test_pool_geometry_unpacks():
    g = G.pool2d_geometry((2, 3, 7, 8), 3, 2, 1, ceil_mode=True)
    N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo = g
    assert (Ho, Wo) == (g.Ho, g.Wo) == G.pool2d_output_hw(7, 8, 3, 2, 1, True)
    with pytest.raises(ValueError, match="half of the kernel"):
        G.pool2d_geometry((1, 1, 8, 8), 2, 2, 2)
