"""DistTensor.redistribute between every pair of a set of distributions, compared to NumPy.

Every case builds the source block itself (NumPy slice of a global integer-valued array at a
box computed by this file's own floor+1 code, or, for a pending source, a slice of one of
several addends that sum to the global array), redistributes, and checks:

* non-pending target: the local block equals the NumPy slice at this rank's target box;
* pending target: the sum over the pending group of the local blocks (gathered with mpi4py
  directly) equals the NumPy slice at the target box.

Values are small integers in float64, so every sum is exact and comparisons are exact.

Also here: from_global/to_global against the same slices, redistribution across grids (one
Strategy's grid to another's), an 8-rank job (run_mpi_script) for the layouts that need three
grid axes > 1, and the communication volume of each kind of transition against the
analytic minimum.
"""
import itertools
import re

import numpy as np
import pytest

from tests.mpi_harness import mpi

AXES = ("sample", "channel", "filter")

# name -> (split of (N, C, H, W), pending axes)
DISTS = {
    "N": ([("sample",), None, None, None], ()),
    "C": ([None, ("channel", "filter"), None, None], ()),
    "NC": ([("sample",), ("channel", "filter"), None, None], ()),
    "R": ([None, None, None, None], ()),
    "Cc": ([None, ("channel",), None, None], ()),
    "Ps": ([None, None, None, None], ("sample",)),
    "Pc": ([None, None, None, None], ("channel",)),
    "Pf": ([None, None, None, None], ("filter",)),
    "N_Pc": ([("sample",), None, None, None], ("channel",)),
    "Cf_Pc": ([None, ("filter",), None, None], ("channel",)),
    "Psc": ([None, None, None, None], ("sample", "channel")),
    "W": ([None, None, None, ("sample", "channel")], ()),
    "Cfc": ([None, ("filter", "channel"), None, None], ()),
    "H_W": ([None, None, ("filter",), ("channel", "sample")], ()),
}
# more layouts used by single cases below
ALL_DISTS = dict(
    DISTS,
    C_s=([None, ("sample",), None, None], ()),
    # a reordered nesting that keeps a pending axis (all three axes > 1 only on 8 ranks)
    Csc_Pf=([None, ("sample", "channel"), None, None], ("filter",)),
    Ccs_Pf=([None, ("channel", "sample"), None, None], ("filter",)),
)

# (N, C, H, W): nothing divides; N=1 leaves empty sample blocks on >= 2 sample ranks
SHAPES = [(3, 5, 7, 7), (1, 2, 3, 2)]


# ----------------------------------------------------------------- independent reference code

def ref_blocks(d, p):
    """(start, stop) of the p floor+1 blocks of d: the first d % p have one extra element."""
    sizes = [d // p + (1 if i < d % p else 0) for i in range(p)]
    starts = [sum(sizes[:i]) for i in range(p)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def ref_box(shape, split, names, gshape, coords):
    """Nested floor+1 box of the block at grid ``coords``."""
    box = []
    for n, axes in zip(shape, split):
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        lo, hi = 0, n
        for a in axes:
            k = names.index(a)
            s, e = ref_blocks(hi - lo, gshape[k])[coords[k]]
            lo, hi = lo + s, lo + e
        box.append((lo, hi))
    return tuple(box)


def ref_coords(rank, gshape):
    """Row-major coordinates, first axis outermost."""
    out = []
    for s in reversed(gshape):
        out.append(rank % s)
        rank //= s
    return tuple(reversed(out))


def cut(a, box):
    return a[tuple(slice(s, e) for s, e in box)]


def factorisations(p):
    return [(s, c, f) for s in range(1, p + 1) for c in range(1, p + 1) for f in range(1, p + 1)
            if s * c * f == p]


def global_array(shape, seed=0):
    return np.random.default_rng(seed).integers(-9, 10, size=shape).astype(np.float64)


def addends(shape, m, seed):
    """``m`` integer arrays whose sum is ``global_array(shape, seed)``."""
    a = global_array(shape, seed)
    parts = [np.random.default_rng(seed * 100 + 7 + k).integers(-9, 10, size=shape)
             .astype(np.float64) for k in range(m - 1)]
    return parts + [a - sum(parts, np.zeros(shape))], a


def pending_index(pending, names, gshape, coords):
    """Row-major index of ``coords`` over the pending axes of size > 1 and their count."""
    k, m = 0, 1
    for a in names:
        if a in pending:
            i = names.index(a)
            k, m = k * gshape[i] + coords[i], m * gshape[i]
    return k, m


# ----------------------------------------------------------------------------- helpers

def make_source(grid, name, shape, seed, dtype=np.float64):
    """DistTensor of ``ALL_DISTS[name]`` on ``grid`` built from NumPy slices; and the global
    array (float64)."""
    from distconv.distribution import Distribution
    from distconv.tensor import DistTensor

    split, pending = ALL_DISTS[name]
    names, gshape = grid.names, grid.shape
    coords = ref_coords(grid.comm.rank, gshape)
    assert tuple(grid.coords) == coords
    k, m = pending_index(pending, names, gshape, coords)
    parts, a = addends(shape, m, seed)
    local = np.ascontiguousarray(cut(parts[k], ref_box(shape, split, names, gshape, coords)),
                                 dtype=dtype)
    return DistTensor(local, Distribution(grid, split, pending), shape), a


class Checker:
    """Checks that a result holds a global array in a given layout. Pending results are
    kept and checked by :meth:`flush` with ONE mpi4py allgather of all their blocks."""

    def __init__(self, comm):
        self.comm = comm
        self.pending = []

    def __call__(self, t, grid, name, shape, a, what):
        """``t`` holds global array ``a`` laid out as ``ALL_DISTS[name]`` on ``grid``."""
        from distconv.distribution import Distribution

        split, pending = ALL_DISTS[name]
        names, gshape = grid.names, grid.shape
        assert t.distribution == Distribution(grid, split, pending), what
        assert t.shape == tuple(shape), what
        coords = ref_coords(self.comm.rank, gshape)
        want = cut(a, ref_box(shape, split, names, gshape, coords))
        pend = [x for x in pending if gshape[names.index(x)] > 1]
        if not pend:
            assert t.local.shape == want.shape, what
            np.testing.assert_array_equal(t.local, want, err_msg=what)
            return
        keep = [i for i, n in enumerate(names) if n not in pend]
        m = int(np.prod([gshape[names.index(x)] for x in pend]))
        self.pending.append((what, coords, keep, m, want, np.array(t.local)))

    def flush(self):
        """The sum over each pending group of the local blocks equals the NumPy slice."""
        mine = [(coords, local) for _, coords, _, _, _, local in self.pending]
        every = self.comm.allgather(mine)
        for k, (what, coords, keep, m, want, _) in enumerate(self.pending):
            group = [blocks[k][1] for blocks in every
                     if all(blocks[k][0][i] == coords[i] for i in keep)]
            assert len(group) == m, what
            assert all(b.shape == want.shape for b in group), what
            np.testing.assert_array_equal(sum(group, np.zeros(want.shape)), want,
                                          err_msg=what)
        self.pending = []


def check_target(comm, t, grid, name, shape, a, what):
    """``t`` holds global array ``a`` laid out as ``ALL_DISTS[name]`` on ``grid``."""
    check = Checker(comm)
    check(t, grid, name, shape, a, what)
    check.flush()


def strategy_grid(s, c, f):
    from distconv.strategy import Strategy

    return Strategy(sample=s, channel=c, filter=f).grid()


# ----------------------------------------------------------------------------- same grid

@pytest.mark.parametrize("src", list(DISTS))
@mpi(ranks=(1, 2, 3, 4), timeout=60)
def test_redistribute_all_pairs(comm, src):
    from distconv.distribution import Distribution

    p = comm.size
    check = Checker(comm)
    for gs in factorisations(p):
        grid = strategy_grid(*gs)
        assert grid.shape == gs and grid.names == AXES
        for si, shape in enumerate(SHAPES):
            t, a = make_source(grid, src, shape, seed=si + 1)
            before = t.local.copy()
            for dst in DISTS:
                what = f"{src} -> {dst} on grid {gs}, shape {shape}, rank {comm.rank}"
                u = t.redistribute(Distribution(grid, *DISTS[dst]))
                check(u, grid, dst, shape, a, what)
                # the source is left as it was
                np.testing.assert_array_equal(t.local, before, err_msg=what)
    check.flush()


@mpi(ranks=(1, 2, 3, 4), timeout=60)
def test_from_global_and_to_global(comm):
    """from_global cuts the NumPy slice at this rank's box (a pending layout: the value on
    pending coordinate 0, zeros elsewhere), copies it, and to_global gives the array back."""
    from distconv.distribution import Distribution
    from distconv.tensor import DistTensor

    check = Checker(comm)
    for gs in factorisations(comm.size):
        grid = strategy_grid(*gs)
        for si, shape in enumerate(SHAPES):
            a = global_array(shape, 20 + si)
            for name, (split, pending) in DISTS.items():
                what = f"from_global {name} on {gs}, shape {shape}, rank {comm.rank}"
                t = DistTensor.from_global(a, Distribution(grid, split, pending))
                check(t, grid, name, shape, a, what)
                assert not np.shares_memory(t.local, a), what
                k, _ = pending_index(pending, grid.names, grid.shape, grid.coords)
                if k:
                    assert not t.local.any(), what
                np.testing.assert_array_equal(t.to_global(), a, err_msg=what)
    check.flush()


# ----------------------------------------------------------------------------- across grids

CROSS_SRC = ["N", "NC", "R", "Pc", "N_Pc", "Cfc"]
CROSS_DST = ["C", "NC", "R", "Pf", "H_W"]
# (5, 3, 2, 2): with N split in 2, one sample group's block is (3, 3, 2, 2) and the other's
# (2, 3, 2, 2), so anything that picks a dimension from the *local* shape differs by rank
CROSS_SHAPES = [(5, 3, 2, 2), (1, 2, 3, 2)]


@pytest.mark.parametrize("src", CROSS_SRC)
@mpi(ranks=(2, 3, 4), timeout=60)
def test_redistribute_across_grids(comm, src):
    from distconv.distribution import Distribution

    check = Checker(comm)
    grids = [strategy_grid(*gs) for gs in factorisations(comm.size)]
    for g1, g2 in itertools.permutations(grids, 2):
        for si, shape in enumerate(CROSS_SHAPES):
            t, a = make_source(g1, src, shape, seed=10 + si)
            for dst in CROSS_DST:
                what = (f"{src} on {g1.shape} -> {dst} on {g2.shape}, shape {shape}, "
                        f"rank {comm.rank}")
                u = t.redistribute(Distribution(g2, *DISTS[dst]))
                check(u, g2, dst, shape, a, what)
    check.flush()


@mpi(ranks=(2, 4), timeout=30)
def test_sample_to_channel_grid_activation(comm):
    """Strategy(sample=p) -> Strategy(channel=p) with the between-layer activation layout."""
    from distconv.strategy import Strategy
    from distconv.tensor import DistTensor

    p = comm.size
    shape = (3, 5, 7, 7)
    a = global_array(shape, 3)
    d1 = Strategy(sample=p).activation_distribution()
    d2 = Strategy(channel=p).activation_distribution()
    t = DistTensor.from_global(a, d1)
    np.testing.assert_array_equal(
        t.local, cut(a, ref_box(shape, [("sample",)], AXES, (p, 1, 1),
                                ref_coords(comm.rank, (p, 1, 1))) + ((0, 5), (0, 7), (0, 7))))
    u = t.redistribute(d2)
    np.testing.assert_array_equal(
        u.local, cut(a, ((0, 3),) + ref_box((5,), [("channel",)], AXES, (1, p, 1),
                                            ref_coords(comm.rank, (1, p, 1)))
                     + ((0, 7), (0, 7))))
    np.testing.assert_array_equal(u.to_global(), a)
    back = u.redistribute(d1)
    np.testing.assert_array_equal(back.local, t.local)


# ------------------------------------------------------- a kept pending axis on 8 ranks

EIGHT_DISTS = ["Csc_Pf", "Ccs_Pf", "NC", "Cfc", "N_Pc", "Pf"]

EIGHT = """
from mpi4py import MPI
from distconv.distribution import Distribution
from tests.test_redistribute import (ALL_DISTS, EIGHT_DISTS, SHAPES, Checker, make_source,
                                     strategy_grid)

comm = MPI.COMM_WORLD
check = Checker(comm)
g = strategy_grid(2, 2, 2)
n = 0
for si, shape in enumerate(SHAPES):
    for src in EIGHT_DISTS:
        t, a = make_source(g, src, shape, seed=si + 1)
        for dst in EIGHT_DISTS:
            u = t.redistribute(Distribution(g, *ALL_DISTS[dst]))
            check(u, g, dst, shape, a, f"{src} -> {dst}, shape {shape}")
            n += 1
check.flush()
print(f"rank {comm.rank}: {n} pairs OK", flush=True)
"""


def test_redistribute_all_pairs_on_8_ranks():
    """On a 2x2x2 grid a block reordering can keep a pending axis (Csc_Pf <-> Ccs_Pf)."""
    from tests.mpi_harness import run_mpi_script

    res = run_mpi_script(EIGHT, 8, timeout=90)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    pairs = len(SHAPES) * len(EIGHT_DISTS) ** 2
    # lines of different ranks may interleave
    got = sorted(re.findall(r"rank (\d+): (\d+) pairs OK", res.stdout))
    assert got == sorted((str(r), str(pairs)) for r in range(8)), out[-6000:]


# ----------------------------------------------------------------- communication volume
#
# Each case resets the world communicator's statistics (the strategy grids are built on it
# and their sub-communicators share its counters), redistributes once and compares every
# rank's bytes sent and received, per collective kind, with the minimum computed here from
# the global shape and the floor+1 blocks.

VSHAPE = (3, 5, 4, 3)            # N, C, H, W: neither N nor C divides 2, 3 or 4
VDTYPE = np.float32              # itemsize 4, not the float64 default of the values


def nelem(box):
    return int(np.prod([max(0, e - s) for s, e in box]))


def inter(b1, b2):
    return tuple((max(x[0], y[0]), min(x[1], y[1])) for x, y in zip(b1, b2))


def stats_by_kind(world):
    return {k: (v["calls"], v["bytes_sent"], v["bytes_recv"])
            for k, v in world.stats().items() if k != "total"}


def expect_bytes(kinds):
    item = np.dtype(VDTYPE).itemsize
    return {k: (calls, sent * item, recv * item) for k, (calls, sent, recv) in kinds.items()}


def moved_volume(comm, g1, d1, g2, d2, shape):
    """(sent, recv) elements of one alltoallv that moves each missing element from one holder:
    rank q's element comes from the rank with q's coordinates on the source's replica axes."""
    me = comm.rank
    s1, s2 = ALL_DISTS[d1][0], ALL_DISTS[d2][0]
    used = {a for axes in s1 if axes for a in axes}
    rep = [i for i, a in enumerate(g1.names) if a not in used]
    c1 = [ref_coords(r, g1.shape) for r in range(comm.size)]
    src = [ref_box(shape, s1, g1.names, g1.shape, c) for c in c1]
    dst = [ref_box(shape, s2, g2.names, g2.shape, ref_coords(r, g2.shape))
           for r in range(comm.size)]
    recv = nelem(dst[me]) - nelem(inter(dst[me], src[me]))
    sent = sum(nelem(inter(src[me], dst[q])) for q in range(comm.size)
               if q != me and all(c1[q][i] == c1[me][i] for i in rep))
    return sent, recv


def run_volume(comm, g1, d1, g2, d2, shape=VSHAPE):
    """Redistribute ``d1`` on ``g1`` -> ``d2`` on ``g2``; check the values; return this rank's
    ``{kind: (calls, bytes_sent, bytes_recv)}`` and total of the world statistics."""
    from distconv.comm import world
    from distconv.distribution import Distribution

    t, a = make_source(g1, d1, shape, seed=5, dtype=VDTYPE)
    target = Distribution(g2, *ALL_DISTS[d2])
    w = world()
    w.reset_stats()
    u = t.redistribute(target)
    got, total = stats_by_kind(w), w.stats()["total"]
    check_target(comm, u, g2, d2, shape, a.astype(VDTYPE), f"{d1} -> {d2}")
    return got, total


@pytest.mark.parametrize("case", ["allgather_N", "allgather_C", "reduce_scatter", "allreduce",
                                  "allreduce_two_axes", "alltoall", "cross"])
@mpi(ranks=(2, 3, 4), timeout=30)
def test_volume_single_collective(comm, case):
    p, me = comm.size, comm.rank
    N, C, H, W = VSHAPE
    hw, total = H * W, N * C * H * W
    nb = ref_blocks(N, p)[me][1] - ref_blocks(N, p)[me][0]
    cb = ref_blocks(C, p)[me][1] - ref_blocks(C, p)[me][0]
    if case == "allgather_N":            # split N -> replicated
        g = strategy_grid(p, 1, 1)
        got, _ = run_volume(comm, g, "N", g, "R")
        mine = nb * C * hw
        want = {"allgather": (1, mine * (p - 1), total - mine)}
    elif case == "allgather_C":          # split C -> replicated
        g = strategy_grid(1, p, 1)
        got, _ = run_volume(comm, g, "Cc", g, "R")
        mine = N * cb * hw
        want = {"allgather": (1, mine * (p - 1), total - mine)}
    elif case == "reduce_scatter":       # pending -> split
        g = strategy_grid(1, p, 1)
        got, _ = run_volume(comm, g, "Pc", g, "Cc")
        mine = N * cb * hw
        want = {"reduce_scatter": (1, total - mine, mine * (p - 1))}
    elif case == "allreduce":            # pending -> replicated
        g = strategy_grid(1, 1, p)
        got, _ = run_volume(comm, g, "Pf", g, "R")
        b = ref_blocks(total, p)[me][1] - ref_blocks(total, p)[me][0]
        want = {"allreduce": (1, (total - b) + b * (p - 1), b * (p - 1) + (total - b))}
    elif case == "allreduce_two_axes":   # pending over sample and channel -> replicated:
        if p % 2:                        # ONE allreduce over all the ranks, not one per axis
            pytest.skip("needs an even rank count for a 2-axis grid")
        g = strategy_grid(2, p // 2, 1)
        got, _ = run_volume(comm, g, "Psc", g, "R")
        b = ref_blocks(total, p)[me][1] - ref_blocks(total, p)[me][0]
        want = {"allreduce": (1, (total - b) + b * (p - 1), b * (p - 1) + (total - b))}
    elif case == "alltoall":             # split N -> split C
        g = strategy_grid(p, 1, 1)
        got, _ = run_volume(comm, g, "N", g, "C_s")
        want = {"alltoall": (1, nb * (C - cb) * hw, cb * (N - nb) * hw)}
    elif case == "cross":                # Strategy(sample=p) -> Strategy(channel=p)
        g1, g2 = strategy_grid(p, 1, 1), strategy_grid(1, p, 1)
        got, _ = run_volume(comm, g1, "NC", g2, "NC")
        # no replicas: I send what others need of my N block, receive what I lack of my C block
        sent = nb * C * hw - nb * cb * hw
        recv = N * cb * hw - nb * cb * hw
        assert (sent, recv) == moved_volume(comm, g1, "NC", g2, "NC", VSHAPE)
        want = {"alltoall": (1, sent, recv)}
    assert got == expect_bytes(want), (case, me)


@mpi(ranks=(1, 2, 3, 4), timeout=30)
def test_volume_replicated_to_split_is_free(comm):
    """replicated -> any split on the same grid is a local slice: no collective at all; across
    grids every rank already holds its block: 0 bytes."""
    grids = [strategy_grid(*gs) for gs in factorisations(comm.size)]
    for g in grids:
        for dst in ("N", "C", "NC", "W", "H_W", "Cfc"):
            got, total = run_volume(comm, g, "R", g, dst)
            assert got == {} and total["calls"] == 0, (g.shape, dst, got)
    for g1, g2 in itertools.permutations(grids, 2):
        for dst in ("NC", "H_W"):
            got, total = run_volume(comm, g1, "R", g2, dst)
            assert total["bytes_sent"] == 0 and total["bytes_recv"] == 0, (g1.shape, g2.shape)


@mpi(ranks=(4,), timeout=30)
def test_volume_nested_and_reordered(comm):
    p, me = comm.size, comm.rank
    N, C, H, W = VSHAPE
    hw, total = H * W, N * C * H * W
    g = strategy_grid(1, 2, 2)
    c, f = ref_coords(me, g.shape)[1:]
    # nested split C over (channel, filter) -> replicated: allgather over filter inside the
    # channel block, then over channel; every rank receives exactly what it lacks
    got, _ = run_volume(comm, g, "C", g, "R")
    chan = ref_blocks(C, 2)[c]
    lo, hi = ref_blocks(chan[1] - chan[0], 2)[f]
    mine, cblk = N * (hi - lo) * hw, N * (chan[1] - chan[0]) * hw
    assert got == expect_bytes({"allgather": (2, mine * (2 - 1) + cblk * (2 - 1),
                                              total - mine)})
    # reordered nesting (channel, filter) -> (filter, channel): ONE alltoallv of exactly the
    # elements each rank lacks
    got, _ = run_volume(comm, g, "C", g, "Cfc")
    src = [ref_box(VSHAPE, DISTS["C"][0], g.names, g.shape, ref_coords(r, g.shape))
           for r in range(p)]
    dst = [ref_box(VSHAPE, DISTS["Cfc"][0], g.names, g.shape, ref_coords(r, g.shape))
           for r in range(p)]
    sent = sum(nelem(inter(src[me], dst[q])) for q in range(p) if q != me)
    recv = nelem(dst[me]) - nelem(inter(dst[me], src[me]))
    assert sum(comm.allgather(sent)) == sum(comm.allgather(recv)) > 0
    assert got == expect_bytes({"alltoall": (1, sent, recv)})
    # across grids with replicas on the source grid: each rank receives exactly what it
    # lacks, each element once, from the holder with its replica coordinates
    for (gs1, d1), (gs2, d2) in [(((2, 2, 1), "N"), ((1, 1, 4), "C")),
                                 (((1, 2, 2), "Cc"), ((4, 1, 1), "N")),
                                 (((2, 1, 2), "W"), ((1, 2, 2), "NC"))]:
        g1, g2 = strategy_grid(*gs1), strategy_grid(*gs2)
        got, _ = run_volume(comm, g1, d1, g2, d2)
        sent, recv = moved_volume(comm, g1, d1, g2, d2, VSHAPE)
        assert got == expect_bytes({"alltoall": (1, sent, recv)}), (gs1, d1, gs2, d2)
