"""DistLoader under spatial strategies: each rank reads its H/W block of the images.

For every spatial strategy that fits the rank count (height=2, width=2, height=2 x width=2,
height=4, sample=2 x height=2, height=3, width=3), on odd H and W and on images smaller than
the number of blocks (empty blocks), each rank's batch equals the global NumPy slice of its
box (computed here without distconv), it read exactly that hyperslab (sorted sample rows x
its rows x its columns, one h5py selection, spied on), its bytes read are the box's, not
whole images, and the union over ranks is the whole batch exactly once. A spatial Conv2d
fed the loader's batch gives the same output as fed the global batch. Negative control: a
loader built with the data-parallel layout reads whole images, which the same check
rejects.
"""
import numpy as np
import pytest

import distconv as dc
from distconv.data import DistLoader, H5Dataset
from distconv.strategy import Strategy
from tests.mpi_harness import mpi, mpi_tmp_path
from tests.test_data import Spy, check_batch, data, nested, write

SPATIAL = [dict(height=2), dict(width=2), dict(height=2, width=2), dict(height=4),
           dict(sample=2, height=2), dict(height=3), dict(width=3)]


def fitting(p):
    out = []
    for kw in SPATIAL:
        h, w = kw.get("height", 1), kw.get("width", 1)
        s = kw.get("sample", p // (h * w))
        if s * h * w == p:
            out.append((s, h, w))
    return out


def spatial_box(rank, shw, shape):
    """This rank's box on an s x h x w grid (row-major: sample outermost), without
    distconv: N over sample, C whole, H over height, W over width, floor+1 blocks."""
    s, h, w = shw
    cs, chh, cw = rank // (h * w), (rank // w) % h, rank % w
    n, C, H, W = shape
    return (nested(n, [(s, cs)]), (0, C), nested(H, [(h, chh)]), nested(W, [(w, cw)]))


@pytest.mark.parametrize("img", [(3, 7, 5), (2, 3, 2)])
@mpi(ranks=(2, 3, 4), timeout=90)
def test_spatial_loader_reads_only_its_block(comm, img):
    n = 5
    images, lab = data(n, shape=img)
    with mpi_tmp_path(comm) as d:
        path = str(d / "s.h5")
        write(comm, path, images, lab)
        with H5Dataset(path, comm=comm) as ds:
            spy = Spy(ds.images)
            ds.images = spy
            checked = 0
            for shw in fitting(comm.size):
                st = Strategy(sample=shw[0], height=shw[1], width=shw[2])
                for bs in (2, n):
                    loader = DistLoader(ds, bs, st, shuffle=True, seed=3)
                    order = np.random.default_rng(3).permutation(n)
                    for k, (x, y) in enumerate(loader):
                        idx = order[k * bs:(k + 1) * bs]
                        box = spatial_box(comm.rank, shw, (len(idx),) + img)
                        assert x.distribution == st.activation_distribution(4)
                        check_batch(comm, x, y, idx, images, lab, box, spy, loader,
                                    f"{shw} bs={bs} batch={k}")
                        whole = len(idx[slice(*box[0])]) * int(np.prod(img)) * 4
                        if shw[1] * shw[2] > 1 and whole:
                            assert loader.last_read.nbytes < whole
                        checked += 1
            assert checked > 0


@mpi(ranks=(2, 4), timeout=90)
def test_spatial_conv_on_loader_batch_equals_global_batch(comm):
    """A height/width-split Conv2d fed the loader's block gives what it gives when fed the
    global batch (every rank passing the same array)."""
    from distconv import nn

    dc.set_default_dtype(np.float64)
    images, lab = data(4, shape=(3, 9, 7), dtype="float64")
    with mpi_tmp_path(comm) as d:
        path = str(d / "c.h5")
        write(comm, path, images, lab)
        with H5Dataset(path, comm=comm) as ds:
            for shw in fitting(comm.size):
                nn.manual_seed(0)
                conv = nn.Conv2d(3, 4, 3, padding=1,
                                 strategy=Strategy(sample=shw[0], height=shw[1], width=shw[2]))
                loader = DistLoader(ds, 3, conv.input_distribution, shuffle=False)
                for k, (x, _) in enumerate(loader):
                    full = images[k * 3:(k + 1) * 3]
                    got = conv(x).to_global()
                    want = conv(full).to_global()
                    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@mpi(ranks=(2,), timeout=60)
def test_negative_control_whole_images_fail_the_block_check(comm):
    """A loader with a channel layout reads every row and column of its channels; checked
    against the height=2 box it must fail (the check looks at what was read)."""
    images, lab = data(4, shape=(2, 6, 4))
    with mpi_tmp_path(comm) as d:
        path = str(d / "n.h5")
        write(comm, path, images, lab)
        with H5Dataset(path, comm=comm) as ds:
            spy = Spy(ds.images)
            ds.images = spy
            loader = DistLoader(ds, 4, Strategy(sample=1, channel=2), shuffle=False)
            x, y = next(iter(loader))
            box = spatial_box(comm.rank, (1, 2, 1), (4, 2, 6, 4))
            with pytest.raises(AssertionError):
                check_batch(comm, x, y, np.arange(4), images, lab, box, spy, loader, "neg")
