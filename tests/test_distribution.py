"""Partition math and Distribution validation (pure, no MPI).

The reference blocks are computed here independently: a dimension of ``d`` split in ``p``
gives the first ``d mod p`` blocks ``d//p + 1`` elements and the rest ``d//p``, laid out
one after another from 0.
"""
import itertools

import numpy as np
import pytest

from distconv.distribution import Distribution, block_offsets, block_range, block_sizes

DS = range(0, 13)
PS = range(1, 6)


def ref_sizes(d, p):
    return [d // p + 1] * (d % p) + [d // p] * (p - d % p)


def ref_ranges(d, p):
    out, start = [], 0
    for n in ref_sizes(d, p):
        out.append((start, start + n))
        start += n
    return out


class FakeGrid:
    """Just what a Distribution reads: names, shape, coords."""

    def __init__(self, shape, names, coords=None):
        self.shape = tuple(shape)
        self.names = tuple(names)
        self.coords = tuple(coords) if coords is not None else (0,) * len(shape)


# ----------------------------------------------------------------------- block functions

@pytest.mark.parametrize("d", DS)
def test_blocks_cover_exactly_once_floor_plus_one(d):
    for p in PS:
        check_blocks(d, p)


def check_blocks(d, p):
    sizes = block_sizes(d, p)
    assert sizes == ref_sizes(d, p)
    assert len(sizes) == p and sum(sizes) == d
    # floor+1: the first d mod p blocks have d//p + 1, the rest d//p
    assert all(s == d // p + 1 for s in sizes[:d % p])
    assert all(s == d // p for s in sizes[d % p:])
    # non-increasing, differ by at most one
    assert all(a >= b for a, b in zip(sizes, sizes[1:])) and max(sizes) - min(sizes) <= 1
    # empty blocks exactly when d < p (the last p - d)
    assert sizes.count(0) == max(0, p - d)
    ranges = [block_range(d, p, i) for i in range(p)]
    assert ranges == ref_ranges(d, p)
    assert block_offsets(d, p) == [s for s, _ in ref_ranges(d, p)]
    hits = np.zeros(d, int)
    for s, e in ranges:
        assert 0 <= s <= e <= d
        hits[s:e] += 1
    assert (hits == 1).all()
    # contiguous and in order
    assert ranges[0][0] == 0 and ranges[-1][1] == d
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_block_function_errors():
    with pytest.raises(ValueError, match="must be >= 1"):
        block_sizes(5, 0)
    with pytest.raises(ValueError, match=">= 0"):
        block_sizes(-1, 2)
    with pytest.raises(ValueError, match="out of range"):
        block_range(5, 2, 2)
    with pytest.raises(ValueError, match="out of range"):
        block_range(5, 2, -1)


# ------------------------------------------------------------------------- nested splits

@pytest.mark.parametrize("d", DS)
def test_nested_split_two_axes(d):
    for pa, pb in itertools.product(PS, PS):
        check_nested(d, pa, pb)


def check_nested(d, pa, pb):
    """A dim split over (a, b): outer block i of a, split again over b; and over (b, a)."""
    names = ("a", "b")
    hits_ab = np.zeros(d, int)
    hits_ba = np.zeros(d, int)
    inner_union = {i: np.zeros(d, int) for i in range(pa)}
    for i, j in itertools.product(range(pa), range(pb)):
        g = FakeGrid((pa, pb), names, (i, j))
        dist = Distribution(g, [("a", "b"), None])
        rev = Distribution(g, [None, ("b", "a")])
        assert dist.parts(0) == pa * pb and rev.parts(1) == pa * pb and dist.parts(1) == 1
        (s, e), whole = dist.box((d, d))
        assert whole == (0, d)
        _, (s2, e2) = rev.box((d, d))
        # reference: outer floor+1 block of a, then floor+1 block j of b within it
        os_, oe = ref_ranges(d, pa)[i]
        is_, ie = ref_ranges(oe - os_, pb)[j]
        assert (s, e) == (os_ + is_, os_ + ie)
        assert dist.local_shape((d, 3)) == (e - s, 3)
        assert dist.slices((d, 3)) == (slice(s, e), slice(0, 3))
        assert rev.local_size((d, d)) == d * (e2 - s2)
        # explicit coords give the same as the grid's own
        assert dist.box((d, d), coords={"a": i, "b": j}) == ((s, e), (0, d))
        assert rev.box((d, d), coords=(i, j)) == ((0, d), (s2, e2))
        # the reordered nesting splits over b first
        bs, be = ref_ranges(d, pb)[j]
        as_, ae = ref_ranges(be - bs, pa)[i]
        assert (s2, e2) == (bs + as_, bs + ae)
        # only the outer level: dim_range(upto=1) is the outer block (upto counts the
        # axes left after dropping size-1 ones)
        if pa > 1:
            assert dist.dim_range(0, d, upto=1) == (os_, oe)
        assert dist.dim_range(0, d, upto=0) == (0, d)
        # the counts of a v-collective over b inside my outer block
        # (a size-1 axis is dropped from the split, so only axes of size > 1 are asked for)
        if pb > 1:
            assert dist.split_counts(0, d, "b") == ref_sizes(oe - os_, pb)
        if pa > 1:
            assert dist.split_counts(0, d, "a") == ref_sizes(d, pa)
        hits_ab[s:e] += 1
        hits_ba[s2:e2] += 1
        inner_union[i][s:e] += 1
    assert (hits_ab == 1).all() and (hits_ba == 1).all()
    # nested rule: the union of the inner blocks of outer block i is outer block i
    for i in range(pa):
        os_, oe = ref_ranges(d, pa)[i]
        want = np.zeros(d, int)
        want[os_:oe] = 1
        np.testing.assert_array_equal(inner_union[i], want)


def test_split_counts_rejects_other_axis():
    g = FakeGrid((2, 3), ("a", "b"))
    with pytest.raises(ValueError, match="not split over axis 'b'"):
        Distribution(g, [("a",), None]).split_counts(0, 7, "b")


def test_box_checks_rank_of_shape():
    g = FakeGrid((2, 3), ("a", "b"))
    with pytest.raises(ValueError, match="2 dims but the tensor shape"):
        Distribution(g, [("a",), None]).box((4, 5, 6))


# --------------------------------------------------------------------------- validation

GRID = FakeGrid((2, 3, 1), ("sample", "channel", "filter"))


@pytest.mark.parametrize("split, pending, axis", [
    ([("batch",), None], (), "batch"),                    # split axis not on the grid
    ([None, ("channel", "width")], (), "width"),
    ([None, None], ("rows",), "rows"),                    # pending axis not on the grid
    ([("sample",), ("sample",)], (), "sample"),           # used twice on two dims
    ([("channel", "channel"), None], (), "channel"),      # used twice on one dim
    ([("sample",), None], ("sample",), "sample"),         # both pending and split
    ([None, ("filter",)], ("filter",), "filter"),         # ... even a size-1 axis
])
def test_distribution_rejects_bad_axes(split, pending, axis):
    with pytest.raises(ValueError, match=f"'{axis}'"):
        Distribution(GRID, split, pending)


def test_distribution_messages_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"grid axis 'batch'.*grid has axes"):
        Distribution(GRID, [("batch",), None])
    with pytest.raises(ValueError, match=r"'sample' used twice"):
        Distribution(GRID, [("sample",), ("sample",)])
    with pytest.raises(ValueError, match=r"'sample' is both pending and splitting dim 0"):
        Distribution(GRID, [("sample",), None], ("sample",))
    with pytest.raises(ValueError, match=r"pending over grid axis 'rows'"):
        Distribution(GRID, [None], ("rows",))


# ------------------------------------------------------------------------ canonical form

def test_size_one_axes_are_dropped_and_compare_equal():
    g = FakeGrid((2, 1, 3), ("a", "one", "b"))
    d1 = Distribution(g, [("a", "one"), None])
    d2 = Distribution(g, [("a",), None])
    d3 = Distribution(g, ["a", ()])
    assert d1.split == (("a",), ()) and d1 == d2 == d3 and hash(d1) == hash(d2) == hash(d3)
    # a split over only a size-1 axis is replicated
    assert Distribution(g, [("one",), None]) == Distribution.replicated(g, 2)
    # pending over a size-1 axis is no pending at all
    assert Distribution(g, [None, None], ("one",)) == Distribution(g, [None, None])
    assert Distribution(g, [None, None], ("one",)).pending == ()
    # pending axes in any order compare equal (kept in grid order)
    pa = Distribution(g, [None, None], ("b", "a"))
    pb = Distribution(g, [None, None], ["a", "b"])
    assert pa.pending == ("a", "b") and pa == pb and hash(pa) == hash(pb)
    # the size-1 axis counts as a replica axis, split axes not
    assert set(d1.replica_axes) == {"one", "b"}
    assert d1.dim_of("a") == 0 and d1.dim_of("b") is None and d1.dim_of("one") is None


def test_inequality():
    g = FakeGrid((2, 3), ("a", "b"))
    base = Distribution(g, [("a", "b"), None])
    assert base != Distribution(g, [("b", "a"), None])          # nesting order matters
    assert base != Distribution(g, [None, ("a", "b")])          # which dim
    assert base != Distribution(g, [("a",), ("b",)])
    assert Distribution(g, [("a",), None], ("b",)) != Distribution(g, [("a",), None])
    assert Distribution(g, [None, None], ("a",)) != Distribution(g, [None, None], ("b",))
    # same layout on a grid of another shape
    assert base != Distribution(FakeGrid((3, 2), ("a", "b")), [("a", "b"), None])
    assert base != "not a distribution"


def test_replace_and_with_dim_revalidate():
    g = FakeGrid((2, 3), ("a", "b"))
    d = Distribution(g, [("a",), None])
    assert d.with_dim(1, "b") == Distribution(g, [("a",), ("b",)])
    assert d.replace(pending=("b",)).pending == ("b",)
    with pytest.raises(ValueError, match="'a'"):
        d.with_dim(1, ("a",))
    with pytest.raises(ValueError, match="'a'"):
        d.replace(pending=("a",))


def test_replicated_box_is_everything():
    g = FakeGrid((2, 2), ("a", "b"), (1, 1))
    d = Distribution.replicated(g, 3)
    assert d.box((4, 0, 5)) == ((0, 4), (0, 0), (0, 5))
    assert d.parts(0) == 1 and d.split_axes == ()


def test_blocks_meeting_matches_brute_force():
    """Every grid position whose block meets a box (which may reach past the tensor, as a
    cat input's box does), with some non-split axes pinned, against a scan of all
    positions; a block-order mistake (reversed nesting) would fail the comparison."""
    rng = np.random.default_rng(0)
    names = ("a", "b", "c")
    checked = 0
    for _ in range(400):
        gshape = tuple(int(v) for v in rng.integers(1, 4, 3))
        g = FakeGrid(gshape, names)
        split = [[], [], []]
        for a in rng.permutation(names):
            if rng.random() < 0.6:
                split[int(rng.integers(3))].append(str(a))
        d = Distribution(g, [tuple(s) or None for s in split])
        shape = tuple(int(v) for v in rng.integers(0, 8, 3))
        box = tuple(tuple(sorted(int(v) for v in rng.integers(-2, n + 3, 2))) for n in shape)
        fixed = {a: int(rng.integers(g.shape[i])) for i, a in enumerate(names)
                 if a not in d.split_axes and rng.random() < 0.4}
        want = []
        for coords in itertools.product(*(range(s) for s in gshape)):
            if any(coords[names.index(a)] != v for a, v in fixed.items()):
                continue
            b = d.box(shape, coords)
            if all(max(s1, s2) < min(e1, e2) for (s1, e1), (s2, e2) in zip(b, box)):
                want.append((coords, b))
        assert sorted(d.blocks_meeting(shape, box, fixed)) == sorted(want), (d, shape, box)
        checked += bool(want)
    assert checked > 100  # most cases meet something: the comparison is not vacuous
