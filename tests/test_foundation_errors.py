"""Bad input to the foundation raises the same clear error on EVERY rank, and never hangs.

Each MPI case checks the error with ``pytest.raises(match=...)`` on every rank (a rank that
does not raise fails the case; a rank left waiting in a collective trips the harness's
timeout), then does one more collective to show that all ranks are still in step.
"""
import time

import numpy as np
import pytest

from tests.mpi_harness import mpi, run_mpi_script

AXES = ("sample", "channel", "filter")


def in_step(comm):
    assert comm.allreduce(1) == comm.size


# ------------------------------------------------------------------ DistTensor.from_global

@pytest.mark.parametrize("odd", ["first", "last"])
@mpi(ranks=(2, 3, 4), timeout=20)
def test_from_global_shape_mismatch(comm, odd):
    from distconv.strategy import Strategy
    from distconv.tensor import DistTensor

    dist = Strategy().activation_distribution(ndim=2, comm=comm)
    bad = 0 if odd == "first" else comm.size - 1
    a = np.zeros((5 if comm.rank == bad else 4, 3))
    with pytest.raises(ValueError, match=r"ranks disagree on global \(shape, dtype\) in "
                                         r"from_global: rank 0: \(\((5|4), 3\)") as ei:
        DistTensor.from_global(a, dist)
    # the message lists every rank's value, the odd one included
    assert f"rank {bad}: ((5, 3), 'float64')" in str(ei.value)
    in_step(comm)


@mpi(ranks=(2, 4), timeout=20)
def test_from_global_ndim_mismatch(comm):
    from distconv.strategy import Strategy
    from distconv.tensor import DistTensor

    dist = Strategy().activation_distribution(ndim=2, comm=comm)
    a = np.zeros((4, 3) if comm.rank else (4, 3, 1))
    with pytest.raises(ValueError, match=r"ranks disagree on global \(shape, dtype\)"):
        DistTensor.from_global(a, dist)
    in_step(comm)


@mpi(ranks=(2, 3, 4), timeout=20)
def test_from_global_dtype_mismatch(comm):
    from distconv.strategy import Strategy
    from distconv.tensor import DistTensor

    dist = Strategy().activation_distribution(ndim=2, comm=comm)
    a = np.zeros((4, 3), dtype=np.float32 if comm.rank == 1 else np.float64)
    with pytest.raises(ValueError, match=r"ranks disagree on global \(shape, dtype\).*"
                                         r"rank 1: \(\(4, 3\), 'float32'\)"):
        DistTensor.from_global(a, dist)
    in_step(comm)


@mpi(ranks=(1, 2, 4), timeout=20)
def test_from_global_wrong_ndim_for_distribution(comm):
    from distconv.strategy import Strategy
    from distconv.tensor import DistTensor

    dist = Strategy().activation_distribution(ndim=4, comm=comm)
    with pytest.raises(ValueError, match=r"shape \(4, 3\) has 2 dims but .* has 4"):
        DistTensor.from_global(np.zeros((4, 3)), dist)
    in_step(comm)


# ---------------------------------------------------------------------- strategies, grids

@mpi(ranks=(2, 4), timeout=20)
def test_strategy_does_not_fit_rank_count(comm):
    from distconv.grid import ProcessGrid
    from distconv.strategy import Strategy

    p = comm.size
    with pytest.raises(ValueError, match=rf"sample=3,channel=1,filter=1 needs "
                                         rf"sample\*channel\*filter = 3\*1\*1 = 3 ranks, "
                                         rf"but there are {p}"):
        Strategy(sample=3).grid(comm)
    with pytest.raises(ValueError, match=rf"needs a multiple of channel\*filter = 3 ranks, "
                                         rf"but there are {p}"):
        Strategy(channel=3).grid(comm)
    with pytest.raises(ValueError, match=rf"= {2 * p} ranks, but there are {p}"):
        Strategy(sample=2, filter=p).grid(comm)
    with pytest.raises(ValueError, match=rf"has 3 ranks but the communicator has {p}"):
        ProcessGrid(comm, (3, 1, 1), AXES)
    in_step(comm)


@mpi(ranks=(1, 2), timeout=20)
def test_distribution_names_missing_axis(comm):
    from distconv.distribution import Distribution
    from distconv.strategy import Strategy

    g = Strategy().grid(comm)
    with pytest.raises(ValueError, match=r"grid axis 'batch', but the grid has axes "
                                         r"\('sample', 'channel', 'filter'\)"):
        Distribution(g, [("batch",), None])
    with pytest.raises(ValueError, match=r"pending over grid axis 'rows'"):
        Distribution(g, [None, None], pending=("rows",))
    with pytest.raises(ValueError, match=r"grid has no axis 'batch'"):
        g.sub("batch")
    in_step(comm)


@mpi(ranks=(1, 2, 3), timeout=20)
def test_redistribute_bad_targets(comm):
    from distconv.distribution import Distribution
    from distconv.grid import ProcessGrid
    from distconv.strategy import Strategy
    from distconv.tensor import DistTensor

    g = Strategy().grid(comm)
    t = DistTensor.from_global(np.arange(12.0).reshape(4, 3), Distribution(g, ["sample", None]))
    with pytest.raises(ValueError, match="cannot redistribute a 2-d tensor"):
        t.redistribute(Distribution(g, [None, None, None]))
    # a grid over another communicator (a Dup of the same ranks) is refused on every rank
    other = comm.Dup()
    try:
        g2 = ProcessGrid(other, (1, comm.size, 1), AXES)
        with pytest.raises(ValueError, match="grids on different communicators"):
            t.redistribute(Distribution(g2, [None, "channel"]))
    finally:
        other.Free()
    in_step(comm)


@pytest.mark.parametrize("text, match", [
    ("sample=two", r"sample='two' is not an integer"),
    ("filter=1.5", r"filter='1.5' is not an integer"),
    ("foo=2", r"unknown key 'foo' \(expected sample, channel, filter, height, width or "
              r"ranks\)"),
    ("height=0", r"Strategy height must be a positive integer, got 0"),
    ("h=2,height=2", r"'height' given twice"),
    ("sample=2,s=2", r"'sample' given twice"),
    ("channel", r"expected key=value pairs like 'sample=2,channel=2', got 'channel'"),
    ("sample=0", r"Strategy sample must be a positive integer, got 0"),
    ("c=-1", r"Strategy channel must be a positive integer, got -1"),
])
@mpi(ranks=(1, 2), timeout=20)
def test_strategy_parse_garbage(comm, text, match):
    from distconv.strategy import Strategy

    with pytest.raises(ValueError, match=match):
        Strategy.parse(text)
    in_step(comm)


def test_strategy_parse_good_and_constructor_checks():
    from distconv.strategy import Strategy

    assert Strategy.parse("sample=2,channel=2") == Strategy(sample=2, channel=2)
    assert Strategy.parse(" s=1, c=2, f=3 ") == Strategy(sample=1, channel=2, filter=3)
    assert Strategy.parse("") == Strategy() == Strategy.parse("sample")
    assert Strategy.parse("sample=*,filter=2") == Strategy(filter=2)
    assert Strategy.parse(str(Strategy(sample=2, filter=2))) == Strategy(sample=2, filter=2)
    # spatial fields: long and short names; shown only when > 1 (old text/plans unchanged)
    assert Strategy.parse("height=2,width=2") == Strategy(height=2, width=2)
    assert Strategy.parse("s=2,h=2") == Strategy(sample=2, height=2)
    assert str(Strategy(sample=2)) == "sample=2,channel=1,filter=1"
    assert Strategy(sample=2).to_dict() == {"sample": 2, "channel": 1, "filter": 1}
    sp = Strategy(sample=1, height=2, width=3)
    assert Strategy.parse(str(sp)) == sp and Strategy(**sp.to_dict()) == sp
    assert sp.to_dict() == {"sample": 1, "channel": 1, "filter": 1, "height": 2, "width": 3}
    assert Strategy(height=2).resolve(4) == (2, 1, 1, 2, 1)
    assert Strategy(channel=2).resolve(4) == (2, 2, 1)
    with pytest.raises(ValueError, match=r"sample\*channel\*filter\*height\*width = "
                                         r"1\*1\*1\*2\*2 = 4 ranks, but there are 2"):
        Strategy(sample=1, height=2, width=2).resolve(2)
    for bad in (dict(channel=True), dict(filter=0), dict(sample=2.0), dict(channel="2")):
        with pytest.raises(ValueError, match="must be a positive integer"):
            Strategy(**bad)
    with pytest.raises(ValueError, match=r"= 4 ranks, but there are 2"):
        Strategy(sample=2, channel=2).resolve(2)
    assert Strategy(channel=2).resolve(6) == (3, 2, 1)


# ------------------------------------------------- a rank that raises ends the whole job

RAISES = """
import numpy as np
from distconv.comm import world

c = world()
if c.rank == {bad}:
    raise RuntimeError("rank {bad} fails before the allreduce")
c.allreduce(np.ones(3))        # the other ranks wait here for rank {bad}
print("unreachable: allreduce returned on rank", c.rank, flush=True)
"""


@pytest.mark.parametrize("nranks, bad", [(2, 1), (4, 2)])
def test_rank_that_raises_ends_the_job(nranks, bad):
    t0 = time.monotonic()
    res = run_mpi_script(RAISES.format(bad=bad), nranks, timeout=15)
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert elapsed < 15
    assert f"rank {bad} fails before the allreduce" in out
    assert "unreachable" not in out
