"""Communicator.halo_exchange beside its adjoint, on 1-4 ranks; ShapeComm records the same bytes.

A global (2, n, 3) integer array is split on axis 1 in floor+1 blocks (some empty); every
rank asks for a window ``[a, b)`` of axis 1 that may reach past both ends (filled) and into
any owner, chosen from a seed every rank shares. The plan (who sends which rows to whom) is
built here with plain interval intersection, independently of distconv.halo. Values are
small integers in float64, so sums are exact and every comparison is exact.
"""
import numpy as np
import pytest

from tests.mpi_harness import mpi

SHAPE = (2, None, 3)      # axis 1 is split


def ref_blocks(n, p):
    sizes = [n // p + (1 if i < n % p else 0) for i in range(p)]
    starts = [sum(sizes[:i]) for i in range(p)]
    return [(s, s + z) for s, z in zip(starts, sizes)]


def rint(shape, seed):
    return np.random.default_rng(seed).integers(-9, 10, size=shape).astype(np.float64)


def make_windows(n, p, seed):
    rng = np.random.default_rng(seed)
    wins = []
    for r in range(p):
        a = int(rng.integers(-2, n + 1))
        b = a + int(rng.integers(0, n + 3))
        wins.append((a, b))
    if p > 1:
        wins[-1] = (0, 0)     # an empty window
    return wins


def make_plan(n, p, me, wins, drop=None):
    """(sends, recvs) of rank ``me``: x's rows [lo, hi) of each owner intersected with each
    window; ``drop``: a (owner, dest) pair left out on both sides (negative control)."""
    blocks = ref_blocks(n, p)
    sends, recvs = [], []
    for dest, (a, b) in enumerate(wins):
        for q, (lo, hi) in enumerate(blocks):
            s, e = max(a, lo), min(b, hi)
            if e <= s or (q, dest) == drop:
                continue
            if q == me:
                sends.append((dest, (slice(None), slice(s - lo, e - lo), slice(None))))
            if dest == me:
                recvs.append((q, (slice(None), slice(s - a, e - a), slice(None))))
    return sends, recvs


def expected_window(G, n, a, b, fill):
    out = np.full((2, b - a, 3), fill)
    s, e = max(a, 0), min(b, n)
    if e > s:
        out[:, s - a:e - a] = G[:, s:e]
    return out


def expected_adjoint(Ys, wins, n, lo, hi):
    D = np.zeros((2, n, 3))
    for (a, b), Y in zip(wins, Ys):
        s, e = max(a, 0), min(b, n)
        if e > s:
            D[:, s:e] += Y[:, s - a:e - a]
    return D[:, lo:hi]


def stats(c):
    return {k: (v["calls"], v["bytes_sent"], v["bytes_recv"])
            for k, v in c.stats().items() if k != "total"}


@pytest.mark.parametrize("n", [1, 3, 7, 12])
@mpi(ranks=(1, 2, 3, 4), timeout=30)
def test_halo_exchange_pair(comm, n):
    from distconv.comm import Communicator
    from distconv.meta import MetaArray
    from distconv.shapecomm import ShapeComm

    c = Communicator(comm)
    p, me = c.size, c.rank
    blocks = ref_blocks(n, p)
    lo, hi = blocks[me]
    for seed in range(4):
        G = rint((2, n, 3), seed)
        wins = make_windows(n, p, 100 + seed)
        a, b = wins[me]
        sends, recvs = make_plan(n, p, me, wins)
        x = np.ascontiguousarray(G[:, lo:hi])
        fill = 0.0 if seed % 2 else -np.inf
        c.reset_stats()
        out = c.halo_exchange(x, sends, recvs, (2, b - a, 3), fill=fill)
        np.testing.assert_array_equal(out, expected_window(G, n, a, b, fill))

        # bytes: rows to and from the other ranks, 6 values of 8 bytes per row
        row = 2 * 3 * 8
        want_sent = sum(max(0, min(wb, hi) - max(wa, lo)) for r, (wa, wb) in enumerate(wins)
                        if r != me) * row
        want_recv = sum(max(0, min(b, qh) - max(a, ql)) for q, (ql, qh) in enumerate(blocks)
                        if q != me) * row
        Ys = [rint((2, wb - wa, 3), 50 + seed * 10 + r) for r, (wa, wb) in enumerate(wins)]
        dx = c.halo_exchange_adjoint(Ys[me], sends, recvs, x.shape)
        np.testing.assert_array_equal(dx, expected_adjoint(Ys, wins, n, lo, hi))
        assert stats(c) == {"halo": (1, want_sent, want_recv),
                            "halo_adjoint": (1, want_recv, want_sent)}

        # adjoint identity summed over ranks (fill 0: the fill is not part of the linear map)
        out0 = c.halo_exchange(x, sends, recvs, (2, b - a, 3))
        lhs = comm.allreduce(float(np.vdot(out0, Ys[me])))
        rhs = comm.allreduce(float(np.vdot(x, dx)))
        assert lhs == rhs

        # the shape-only communicator records the same bytes for the same plan
        sc = ShapeComm(p, me)
        m = sc.halo_exchange(MetaArray(x.shape, x.dtype), sends, recvs, (2, b - a, 3))
        assert m.shape == (2, b - a, 3)
        sc.halo_exchange_adjoint(MetaArray(m.shape, x.dtype), sends, recvs, x.shape)
        assert stats(sc) == {"halo": (1, want_sent, want_recv),
                             "halo_adjoint": (1, want_recv, want_sent)}
        assert [(e.kind, e.sent, e.recv) for e in sc.events] == [
            ("halo", want_sent, want_recv), ("halo_adjoint", want_recv, want_sent)]
        # the event's group: this rank and every peer a non-empty box goes to or comes from
        peers = {r for r, (wa, wb) in enumerate(wins) if min(wb, hi) > max(wa, lo)}
        peers |= {q for q, (ql, qh) in enumerate(blocks) if min(b, qh) > max(a, ql)}
        assert sc.events[0].group == sc.events[1].group == tuple(sorted(peers | {me}))


@mpi(ranks=(2, 3, 4), timeout=30)
def test_halo_negative_controls(comm):
    """A plan missing one remote piece gives a wrong window (the value check sees it), and
    its adjoint breaks the identity against the full exchange."""
    from distconv.comm import Communicator

    c = Communicator(comm)
    p, me = c.size, c.rank
    n = 7
    lo, hi = ref_blocks(n, p)[me]
    G = rint((2, n, 3), 1)
    wins = [(-1, n + 1)] * p          # everyone wants everything: every pair has a piece
    drop = (0, 1)                     # rank 0's rows never reach rank 1
    a, b = wins[me]
    x = np.ascontiguousarray(G[:, lo:hi])
    out = c.halo_exchange(x, *make_plan(n, p, me, wins, drop), (2, b - a, 3))
    wrong = not np.array_equal(out, expected_window(G, n, a, b, 0.0))
    assert comm.allgather(wrong) == [r == 1 for r in range(p)]
    Y = rint((2, b - a, 3), 7 + me)
    full = c.halo_exchange(x, *make_plan(n, p, me, wins), (2, b - a, 3))
    dx = c.halo_exchange_adjoint(Y, *make_plan(n, p, me, wins, drop), x.shape)
    lhs = comm.allreduce(float(np.vdot(full, Y)))
    rhs = comm.allreduce(float(np.vdot(x, dx)))
    assert lhs != rhs


@mpi(ranks=(1, 2), timeout=30)
def test_halo_bad_arguments(comm):
    """Bad plans raise ValueError before any message is posted (same on every rank)."""
    from distconv.comm import Communicator

    c = Communicator(comm)
    p, me = c.size, c.rank
    x = np.zeros((2, 3, 3))
    own = (slice(None), slice(0, 3), slice(None))
    cases = [
        ([(p, own)], [(me, own)], "outside"),
        ([(me, own), (me, own)], [(me, own)], "listed twice"),
        ([(me, (slice(None), slice(0, 4), slice(None)))], [(me, own)], "not a box inside"),
        ([(me, own)], [(me, (slice(None), slice(0, 2), slice(None)))], "own box"),
        ([(me, (slice(0, 2),))], [(me, own)], "one slice per dim"),
        ([(me, (slice(None), slice(0, 3, 2), slice(None)))], [(me, own)], "not a box"),
    ]
    for sends, recvs, match in cases:
        with pytest.raises(ValueError, match=match):
            c.halo_exchange(x, sends, recvs, (2, 3, 3))
        with pytest.raises(ValueError, match=match):
            c.halo_exchange_adjoint(x, sends, recvs, (2, 3, 3))
    c.barrier()
