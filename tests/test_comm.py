"""Communicator collectives, each beside its adjoint, on 1-4 ranks with uneven and empty counts.

Values are small integers in float64 so sums are exact. Every expected result is computed
here with NumPy from the global arrays (which every rank can rebuild from a seed); the byte
counters are checked against the definitions in the distconv.comm docstring.
"""
import numpy as np
import pytest

from tests.mpi_harness import mpi

# counts per rank count: uneven, with empty blocks, and all empty
COUNTS = {
    1: [[3], [0]],
    2: [[3, 1], [0, 2], [0, 0]],
    3: [[2, 0, 3], [1, 1, 1], [0, 0, 1]],
    4: [[3, 0, 1, 2], [0, 0, 0, 5], [1, 1, 1, 0]],
}


def rint(shape, seed):
    return np.random.default_rng(seed).integers(-9, 10, size=shape).astype(np.float64)


def offsets(counts):
    return np.concatenate(([0], np.cumsum(counts))).astype(int)


def wrap(comm):
    from distconv.comm import Communicator

    return Communicator(comm)


def kinds(c):
    return {k: (v["calls"], v["bytes_sent"], v["bytes_recv"])
            for k, v in c.stats().items() if k != "total"}


# ------------------------------------------------------------- allgather <-> reduce_scatter

@pytest.mark.parametrize("axis", [0, 1, -1])
@mpi(ranks=(1, 2, 3, 4), timeout=30)
def test_allgather_reduce_scatter_pair(comm, axis):
    c = wrap(comm)
    p, me = c.size, c.rank
    base = (2, 3, 4)                       # the other dims (the gathered one replaces one)
    ax = axis % 3
    for ci, counts in enumerate(COUNTS[p]):
        total = sum(counts)
        off = offsets(counts)
        gshape = list(base)
        gshape[ax] = total
        gshape = tuple(gshape)
        x_global = rint(gshape, 10 + ci)   # concatenation of every rank's block
        idx = [slice(None)] * 3
        idx[ax] = slice(off[me], off[me + 1])
        x = np.ascontiguousarray(x_global[tuple(idx)])

        # allgather: values vs NumPy; counts given and counts gathered
        c.reset_stats()
        g = c.allgather(x, axis=axis, counts=counts)
        np.testing.assert_array_equal(g, x_global)
        item = 8
        mine = x.size * item
        want_bytes = (0, 0) if p == 1 else (mine * (p - 1), x_global.size * item - mine)
        assert kinds(c) == {"allgather": (1,) + want_bytes}
        np.testing.assert_array_equal(c.allgather(x, axis=axis), x_global)

        # reduce_scatter: every rank passes a different full-extent addend
        ys = [rint(gshape, 100 * ci + r) for r in range(p)]
        c.reset_stats()
        rs = c.reduce_scatter(ys[me], axis=axis, counts=counts)
        np.testing.assert_array_equal(rs, sum(ys)[tuple(idx)])
        assert rs.shape == x.shape
        want_bytes = (0, 0) if p == 1 else (ys[me].size * item - mine, mine * (p - 1))
        assert kinds(c) == {"reduce_scatter": (1,) + want_bytes}

        # adjoint identity: sum_r <allgather(x), y_r> == sum_r <x_r, reduce_scatter(y)_r>
        lhs = comm.allreduce(float(np.vdot(g, ys[me])))
        rhs = comm.allreduce(float(np.vdot(x, rs)))
        assert lhs == rhs


@mpi(ranks=(1, 2, 3, 4), timeout=30)
def test_reduce_scatter_default_counts_are_floor_plus_one(comm):
    c = wrap(comm)
    p, me = c.size, c.rank
    for n in (0, 1, 5, 7):
        y = rint((3, n), 7 + me)
        full = sum(rint((3, n), 7 + r) for r in range(p))
        sizes = [n // p + (1 if i < n % p else 0) for i in range(p)]
        lo = sum(sizes[:me])
        np.testing.assert_array_equal(c.reduce_scatter(y, axis=1),
                                      full[:, lo:lo + sizes[me]])


@mpi(ranks=(2, 3, 4), timeout=30)
def test_reduce_scatter_max(comm):
    c = wrap(comm)
    p, me = c.size, c.rank
    counts = COUNTS[p][0]
    ys = [rint((sum(counts), 2), 40 + r) for r in range(p)]
    off = offsets(counts)
    np.testing.assert_array_equal(c.reduce_scatter(ys[me], counts=counts, op="max"),
                                  np.max(ys, axis=0)[off[me]:off[me + 1]])


# ------------------------------------------------------------------------- alltoall pair

@pytest.mark.parametrize("axes", [(0, 1), (1, 0), (2, 0), (1, 2)])
@mpi(ranks=(1, 2, 3, 4), timeout=30)
def test_alltoall_round_trip(comm, axes):
    """Global M of shape (.., R, .., K, ..): rank j holds the K-block j (all of R); alltoall
    gives rank j the R-block j (all of K); alltoall with swapped axes and counts undoes it."""
    c = wrap(comm)
    p, me = c.size, c.rank
    sa, ca = axes
    for ri, rcounts in enumerate(COUNTS[p]):
        kcounts = COUNTS[p][(ri + 1) % len(COUNTS[p])]
        gshape = [2, 3, 2]
        gshape[sa], gshape[ca] = sum(rcounts), sum(kcounts)
        m = rint(tuple(gshape), 70 + ri)
        roff, koff = offsets(rcounts), offsets(kcounts)

        def block(ax, off, j):
            idx = [slice(None)] * 3
            idx[ax] = slice(off[j], off[j + 1])
            return tuple(idx)

        x = np.ascontiguousarray(m[block(ca, koff, me)])
        c.reset_stats()
        y = c.alltoall(x, split_axis=sa, concat_axis=ca, send_counts=rcounts,
                       recv_counts=kcounts)
        np.testing.assert_array_equal(y, m[block(sa, roff, me)])
        # bytes: what goes to / comes from other ranks
        other = gshape[3 - sa - ca]  # the third axis
        sent = sum(rcounts[j] * kcounts[me] for j in range(p) if j != me) * other * 8
        recv = sum(kcounts[j] * rcounts[me] for j in range(p) if j != me) * other * 8
        assert kinds(c) == {"alltoall": (1, sent, recv)}
        back = c.alltoall(y, split_axis=ca, concat_axis=sa, send_counts=kcounts,
                          recv_counts=rcounts)
        np.testing.assert_array_equal(back, x)


@mpi(ranks=(1, 2, 3, 4), timeout=30)
def test_alltoallv_flat(comm):
    c = wrap(comm)
    p, me = c.size, c.rank
    # rank i sends (i + j) % 3 elements to rank j, all equal to 100 * i + j
    send_counts = [(me + j) % 3 for j in range(p)]
    recv_counts = [(i + me) % 3 for i in range(p)]
    send = np.concatenate([np.full(n, 100.0 * me + j) for j, n in enumerate(send_counts)]
                          + [np.zeros(0)])
    got = c.alltoallv_flat(send, send_counts, recv_counts)
    want = np.concatenate([np.full(n, 100.0 * i + me) for i, n in enumerate(recv_counts)]
                          + [np.zeros(0)])
    np.testing.assert_array_equal(got, want)


@mpi(ranks=(2, 3), timeout=30)
def test_alltoall_rejects_bad_counts(comm):
    c = wrap(comm)
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="must differ"):
        c.alltoall(x, 0, 0, [4] + [0] * (c.size - 1), [2] * c.size)
    with pytest.raises(ValueError, match="do not fit"):
        c.alltoall(x, 0, 1, [1] * c.size, [2] * c.size)  # sums to != 4


# ------------------------------------------------------------------ allreduce and bcast

@pytest.mark.parametrize("n", [0, 1, 7])
@mpi(ranks=(1, 2, 3, 4), timeout=30)
def test_allreduce_sum_max(comm, n):
    c = wrap(comm)
    p, me = c.size, c.rank
    xs = [rint((n, 3), 20 + r) for r in range(p)]
    c.reset_stats()
    s = c.allreduce(xs[me])
    np.testing.assert_array_equal(s, sum(xs))
    tot = 3 * n
    b = [tot // p + (1 if i < tot % p else 0) for i in range(p)][me]
    want = (0, 0) if p == 1 else (((tot - b) + b * (p - 1)) * 8, (b * (p - 1) + tot - b) * 8)
    assert kinds(c) == {"allreduce": (1,) + want}
    np.testing.assert_array_equal(c.allreduce(xs[me], op="max"), np.max(xs, axis=0))
    np.testing.assert_array_equal(c.allreduce(xs[me], op="min"), np.min(xs, axis=0))
    # the input is not modified
    np.testing.assert_array_equal(xs[me], rint((n, 3), 20 + me))
    # integer arrays too
    np.testing.assert_array_equal(c.allreduce(np.arange(4, dtype=np.int32) * (me + 1)),
                                  np.arange(4) * p * (p + 1) // 2)


@mpi(ranks=(1, 2, 3, 4), timeout=30)
def test_bcast(comm):
    c = wrap(comm)
    p, me = c.size, c.rank
    for root in sorted({0, p - 1}):
        x = rint((3, 2), 50 + me)
        c.reset_stats()
        y = c.bcast(x, root=root)
        np.testing.assert_array_equal(y, rint((3, 2), 50 + root))
        if p == 1:
            assert kinds(c) == {"bcast": (1, 0, 0)}
        elif me == root:
            assert kinds(c) == {"bcast": (1, x.nbytes * (p - 1), 0)}
        else:
            assert kinds(c) == {"bcast": (1, 0, x.nbytes)}


# ------------------------------------------------------------------------ nonblocking

@mpi(ranks=(1, 2, 3, 4), timeout=30)
def test_nonblocking_match_blocking(comm):
    c = wrap(comm)
    p, me = c.size, c.rank
    x = rint((5, 2), 60 + me)
    r1 = c.iallreduce(x)
    counts = COUNTS[p][0]
    off = offsets(counts)
    g_global = rint((2, sum(counts)), 61)
    xb = np.ascontiguousarray(g_global[:, off[me]:off[me + 1]])
    r2 = c.iallgather(xb, axis=1, counts=counts)
    # both in flight at once
    a2 = r2.wait()
    a1 = r1.wait()
    np.testing.assert_array_equal(a1, c.allreduce(x))
    np.testing.assert_array_equal(a1, sum(rint((5, 2), 60 + r) for r in range(p)))
    np.testing.assert_array_equal(a2, c.allgather(xb, axis=1, counts=counts))
    np.testing.assert_array_equal(a2, g_global)
    assert r1.test() and r2.test()
    assert r1.wait() is a1  # wait again: same result
    r3 = c.iallreduce(x, op="max")
    while not r3.test():
        pass
    np.testing.assert_array_equal(r3.wait(), np.max([rint((5, 2), 60 + r) for r in range(p)],
                                                    axis=0))


# ---------------------------------------------------------------------- agreement helpers

@mpi(ranks=(1, 2, 3, 4), timeout=30)
def test_agree_raises_everywhere(comm):
    c = wrap(comm)
    p, me = c.size, c.rank
    c.agree(True, "never shown")
    bad = p - 1
    with pytest.raises(ValueError, match="bad value here") as ei:
        c.agree(me != bad, "bad value here")
    if p > 1:
        assert f"[{bad}]" in str(ei.value)
    with pytest.raises(TypeError, match="wrong type"):
        c.agree(me != 0, "wrong type", exc=TypeError)
    if p > 1:
        # different messages: each failing rank named with its own
        with pytest.raises(ValueError, match="rank 0: zero.*rank 1: one"):
            c.agree(me > 1, {0: "zero", 1: "one"}.get(me, ""))
    # everyone still in step afterwards
    assert comm.allreduce(1) == p


@mpi(ranks=(1, 2, 3, 4), timeout=30)
def test_check_same(comm):
    c = wrap(comm)
    p, me = c.size, c.rank
    c.check_same(((3, 4), "float32"), "shape")
    if p > 1:
        with pytest.raises(ValueError, match=r"ranks disagree on the answer: rank 0: 0, "):
            c.check_same(me, "the answer")
        with pytest.raises(ValueError, match="disagree"):
            c.check_same((3, "float32" if me else "float64"), "dtype")
    else:
        c.check_same(me, "the answer")
    assert comm.allreduce(1) == p


@mpi(ranks=(2, 3), timeout=30)
def test_split_shares_stats(comm):
    c = wrap(comm)
    sub = c.split(c.rank % 2, c.rank)
    c.reset_stats()
    x = np.ones(6)
    sub.allreduce(x)
    k = kinds(c)
    assert k["allreduce"][0] == 1
    assert k == kinds(sub)


# ------------------------------------------------------------------------------ layering
def test_comm_and_its_kernels_do_not_import_ops():
    """comm.py and the modules it uses for GPU packing (packing.py, cudakernels.py) stand
    below distconv.ops: none of them imports it."""
    import ast
    import os

    import distconv
    root = os.path.dirname(os.path.abspath(distconv.__file__))
    for name in ("comm.py", "packing.py", "cudakernels.py"):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mods = [node.module or ""] + [f"{node.module or ''}.{a.name}"
                                              for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            assert not any(m.lstrip(".").split(".")[0] == "ops" or "distconv.ops" in m
                           for m in mods), f"{name} imports distconv.ops"


def _imported_roots(path):
    """The top-level names of every module ``path`` imports (absolute imports only)."""
    import ast
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_only_comm_imports_mpi4py_and_nothing_imports_torch():
    """mpi4py is reached through comm.py alone (layers, the planner and the benchmark
    helpers use the Communicator), and torch is an oracle and a benchmark peer only: no
    module of the package imports it."""
    import glob
    import os

    import distconv
    root = os.path.dirname(os.path.abspath(distconv.__file__))
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    assert len(files) > 50
    bad_mpi = [f for f in files if "mpi4py" in _imported_roots(f)
               and os.path.relpath(f, root) != "comm.py"]
    bad_torch = [f for f in files if {"torch", "torchvision"} & _imported_roots(f)]
    assert bad_mpi == [] and bad_torch == [], (bad_mpi, bad_torch)


def test_the_import_check_sees_an_import(tmp_path):
    """Negative control: the same reader finds mpi4py and torch where they are imported."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import mpi4py\n    from torch import nn\n")
    assert {"mpi4py", "torch"} <= _imported_roots(str(f))
