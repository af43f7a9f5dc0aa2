"""The overlapped spatial convolution: interior while the halos are in flight, then border.

``distconv.spatial.halo_overlap(True/False)`` (forward: interior first; backward: dw while
dx's halo parts travel back) must give the same y, dx, dw and db (normwise
relative error below 1e-10), both matching torch float64, with the same halo calls and
bytes, on every (sample, height, width) grid of 1-4 ranks; the interior really is computed
before the exchange completes on split grids. Negative control: skipping the border strips
must fail the comparison. ``Communicator.ihalo_exchange`` holds the padding and the own box
before ``wait()`` and equals the blocking exchange after.
"""
import numpy as np
import pytest

from tests.mpi_harness import mpi
from tests.test_spatial import CASES, build, grids, run_case
from tests.torch_ref import Report


def test_interior_and_border_tile_the_output():
    from distconv.spatial_overlap import border, interior

    for ho, wo in [(5, 4), (1, 1), (7, 3)]:
        for ready in [{2: (0, 9), 3: (0, 9)}, {2: (1, 8), 3: (0, 6)}, {2: (3, 3), 3: (0, 9)}]:
            inner = interior(ready, (ho, wo), (3, 3), (1, 1))
            boxes = ([inner] if inner else []) + border((ho, wo), inner)
            cover = np.zeros((ho, wo), int)
            for (i0, i1), (j0, j1) in boxes:
                cover[i0:i1, j0:j1] += 1
            assert (cover == 1).all(), (ho, wo, ready, boxes)
            if inner:   # every interior output reads ready positions only
                for d, (a, z) in zip((2, 3), inner):
                    assert ready[d][0] <= a and (z - 1) + 3 <= ready[d][1]
    assert interior({2: (1, 3), 3: (0, 9)}, (5, 5), (3, 3), (1, 1)) is None


def _grads(comm, name, gshape, overlap):
    from distconv import spatial

    case = CASES[name]
    c, g, _, (x, w, b) = build(comm, case, gshape)
    c.reset_stats()
    with spatial.halo_overlap(overlap):
        y = spatial.conv2d(x, w, b, *case[6:9])
    y.backward(np.random.default_rng(1).standard_normal(y.shape))
    st = {k: (v["calls"], v["bytes_sent"], v["bytes_recv"]) for k, v in c.stats().items()
          if k.startswith("halo")}
    out = {"y": y.to_global(), "dx": x.grad.to_global(), "dw": w.grad.to_global()}
    if b is not None:
        out["db"] = b.grad.to_global()
    return out, st


@pytest.mark.parametrize("name", list(CASES))
@mpi(ranks=(1, 2, 3, 4), timeout=90)
def test_overlap_on_and_off_agree_and_match_torch(comm, name):
    from distconv import spatial, spatial_overlap
    from distconv.backend import set_default_dtype

    set_default_dtype(np.float64)
    rep = Report()
    calls = []
    real = spatial_overlap.interior
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spatial_overlap, "interior", lambda *a: calls.append(real(*a)) or calls[-1])
        for gshape in grids(comm.size):
            for flag in (True, False):
                with spatial.halo_overlap(flag):
                    run_case(comm, name, gshape, rep)
            on, st_on = _grads(comm, name, gshape, True)
            off, st_off = _grads(comm, name, gshape, False)
            what = f"{name} {gshape}"
            for k in on:
                rep.check(f"{what} overlap vs not {k}", on[k], off[k])
            rep.expect(f"{what} same halo stats", st_on == st_off, f"{st_on} != {st_off}")
    if comm.size > 1 and name in ("same-3x3", "k7-s2-p3", "dilated-same"):
        # on a split grid some rank had an interior to compute before the halos landed
        assert any(box is not None for per_rank in comm.allgather(calls) for box in per_rank), name
    rep.assert_ok(comm)


@mpi(ranks=(2, 4), timeout=60)
def test_negative_control_border_skipped(comm):
    """Leaving out the border strips (computing the interior only) must fail against torch
    on a split grid; the real code passes."""
    from distconv import spatial, spatial_overlap
    from distconv.backend import set_default_dtype

    set_default_dtype(np.float64)
    gshape = (1, 2, comm.size // 2)
    bad = Report()
    with pytest.MonkeyPatch.context() as mp, spatial.halo_overlap(True):
        mp.setattr(spatial_overlap, "border", lambda out_hw, inner: [] if inner else
                   [((0, out_hw[0]), (0, out_hw[1]))])
        run_case(comm, "same-3x3", gshape, bad, check_bytes=False)
    errs = bad.merged(comm)
    assert any(" y:" in e for e in errs), errs
    good = Report()
    with spatial.halo_overlap(True):
        run_case(comm, "same-3x3", gshape, good)
    good.assert_ok(comm)


def test_halo_overlap_restores_the_setting():
    from distconv import spatial
    from distconv.spatial_overlap import enabled

    before = enabled()
    with spatial.halo_overlap(not before):
        assert enabled() is (not before)
        with pytest.raises(KeyError):
            with spatial.halo_overlap(before):
                raise KeyError
        assert enabled() is (not before)
    assert enabled() is before


@mpi(ranks=(2, 3), timeout=60)
def test_ihalo_exchange_own_box_first_then_halos(comm):
    """A ring: each rank sends its last row to the next and receives the previous rank's
    into row 0 of a (rows + 1)-row result. Before ``wait()`` the result holds the fill and
    the own rows; after, the blocking exchange's result; one ``halo`` call either way."""
    from distconv.comm import Communicator

    c = Communicator(comm)
    p, r = c.size, c.rank
    x = np.arange(6.0).reshape(3, 2) + 10 * r
    sends = [((r + 1) % p, (slice(2, 3), slice(0, 2))), (r, (slice(0, 3), slice(0, 2)))]
    recvs = [((r - 1) % p, (slice(0, 1), slice(0, 2))), (r, (slice(1, 4), slice(0, 2)))]
    c.reset_stats()
    req = c.ihalo_exchange(x, sends, recvs, (4, 2), fill=-1.0)
    early = req.out.copy()
    got = req.wait()
    assert (early[0] == -1).all() and (early[1:] == x).all()
    want = c.halo_exchange(x, sends, recvs, (4, 2), fill=-1.0)
    assert np.array_equal(got, want)
    assert np.array_equal(got[0], x[2] - 10 * r + 10 * ((r - 1) % p))
    st = c.stats()["halo"]
    assert st["calls"] == 2 and st["bytes_sent"] == 2 * 2 * 8 == st["bytes_recv"]
    assert req.test() and req.wait() is got
