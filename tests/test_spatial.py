"""distconv.spatial and distconv.spatial_pool on (sample, height, width) grids of 1-4 ranks,
against PyTorch float64.

Every case runs over every grid with sample <= 2 that fits the rank count (height=2,
width=2, height=2 x width=2, height=4, width=4, sample=2 x height=2, ...) and checks y,
dx, dw and db of ``spatial.conv2d`` against ``torch.nn.functional.conv2d`` (normwise
relative error below 1e-10), the halo bytes against an independent count, and that a
shape-only run (ShapeComm) records the same bytes. Negative controls: dropping the corner
pieces of the exchange must make the comparison fail; bad input raises on every rank.
"""
import numpy as np
import pytest

from tests.mpi_harness import mpi
from tests.torch_ref import Report

NAMES = ("sample", "height", "width")

# (N, C, F, H, W, kernel, stride, padding, dilation, bias)
CASES = {
    "same-3x3": (2, 3, 4, 7, 6, 3, 1, 1, 1, True),
    "valid-stride2": (2, 2, 3, 9, 8, 3, 2, 0, 1, False),
    "dilated-same": (2, 2, 3, 9, 7, 3, 1, "same", 2, True),
    "k7-s2-p3": (2, 2, 3, 11, 9, 7, 2, 3, 1, True),
    "tiny-H<ranks": (3, 2, 2, 3, 2, 3, 1, 1, 1, True),
    "rect-mixed": (1, 2, 3, 8, 7, (3, 2), (2, 1), (1, 0), (1, 2), True),
    "1x1-stride2": (2, 3, 2, 7, 5, 1, 2, 0, 1, False),
    "same-even-kernel": (2, 2, 2, 6, 5, (2, 4), 1, "same", 1, True),
}


def grids(p):
    return [(s, h, p // (s * h)) for s in (1, 2) for h in range(1, p + 1)
            if p % (s * h) == 0]


def ref_blocks(n, p):
    sizes = [n // p + (1 if i < n % p else 0) for i in range(p)]
    starts = [sum(sizes[:i]) for i in range(p)]
    return [(s, s + z) for s, z in zip(starts, sizes)]


def pads(padding, k, d):
    if padding == "same":
        return d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2
    return padding, padding


def pair(v):
    return (v, v) if isinstance(v, (int, str)) else tuple(v)


def read_in(n, parts, k, s, p, d):
    """Per block: the set of input rows inside [0, n) its output rows read (brute force)."""
    lo, hi = p
    n_out = (n + lo + hi - d * (k - 1) - 1) // s + 1
    return [sorted({o * s - lo + j * d for o in range(a, b) for j in range(k)}
                   & set(range(n))) for a, b in ref_blocks(n_out, parts)]


def expected_halo_bytes(case, grid_shape, coords):
    """(sent, recv) bytes of the forward exchange of rank ``coords``, counted independently."""
    N, C, F, H, W, k, s, p, d, _ = case
    (kh, kw), (sh, sw), (dh, dw) = pair(k), pair(s), pair(d)
    ph, pw = pair(p)
    S, PH, PW = grid_shape
    rows = read_in(H, PH, kh, sh, pads(ph, kh, dh), dh)
    cols = read_in(W, PW, kw, sw, pads(pw, kw, dw), dw)
    own_r, own_c = ref_blocks(H, PH), ref_blocks(W, PW)
    n_l = ref_blocks(N, S)[coords[0]]
    per = (n_l[1] - n_l[0]) * C * 8

    def hull(read, own):
        """Rows of an owner block sent: first to last row read there."""
        r = [x for x in read if own[0] <= x < own[1]]
        return r[-1] - r[0] + 1 if r else 0

    def box(i, j, a, b):          # block (i, j) receives from owner (a, b)
        return hull(rows[i], own_r[a]) * hull(cols[j], own_c[b])

    i, j = coords[1], coords[2]
    others = [(a, b) for a in range(PH) for b in range(PW) if (a, b) != (i, j)]
    recv = sum(box(i, j, a, b) for a, b in others)
    sent = sum(box(a, b, i, j) for a, b in others)
    return sent * per, recv * per


def build(comm, case, gshape, seed=0):
    from distconv.comm import Communicator
    from distconv.distribution import Distribution
    from distconv.grid import ProcessGrid
    from distconv.tensor import DistTensor

    N, C, F, H, W, k, s, p, d, bias = case
    kh, kw = pair(k)
    c = comm if isinstance(comm, Communicator) else Communicator(comm)
    g = ProcessGrid(c, gshape, NAMES)
    rng = np.random.default_rng(seed)
    xg = rng.standard_normal((N, C, H, W))
    wg = rng.standard_normal((F, C, kh, kw))
    bg = rng.standard_normal(F) if bias else None
    x = DistTensor.from_global(xg, Distribution(g, [("sample",), None, ("height",), ("width",)]))
    w = DistTensor.from_global(wg, Distribution.replicated(g, 4))
    b = None if bg is None else DistTensor.from_global(bg, Distribution.replicated(g, 1))
    for t in (x, w, b):
        if t is not None:
            t.requires_grad = True
    return c, g, (xg, wg, bg), (x, w, b)


def torch_ref(case, xg, wg, bg, dyg=None, seed=1):
    import torch

    N, C, F, H, W, k, s, p, d, bias = case
    xt = torch.tensor(xg, requires_grad=True)
    wt = torch.tensor(wg, requires_grad=True)
    bt = None if bg is None else torch.tensor(bg, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, bt, pair(s), p if isinstance(p, str) else pair(p),
                                    pair(d))
    if dyg is None:
        dyg = np.random.default_rng(seed).standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dyg))
    return yt, dyg, xt.grad, wt.grad, None if bt is None else bt.grad


def run_case(comm, name, gshape, rep, check_bytes=True):
    from distconv import spatial

    case = CASES[name]
    c, g, (xg, wg, bg), (x, w, b) = build(comm, case, gshape)
    yt, dyg, dxt, dwt, dbt = torch_ref(case, xg, wg, bg)
    what = f"{name} grid={dict(zip(NAMES, gshape))}"
    c.reset_stats()
    _, _, _, _, _, k, s, p, d, _ = case
    y = spatial.conv2d(x, w, b, s, p, d)
    fwd = c.stats().get("halo", {})
    y.backward(dyg)
    st = c.stats()
    rep.check(f"{what} y", y.to_global(), yt)
    rep.check(f"{what} dx", x.grad.to_global(), dxt)
    rep.check(f"{what} dw", w.grad.to_global(), dwt)
    if b is not None:
        rep.check(f"{what} db", b.grad.to_global(), dbt)
    if check_bytes:
        want = expected_halo_bytes(case, gshape, g.coords)
        got = (fwd.get("bytes_sent"), fwd.get("bytes_recv"))
        rep.expect(f"{what} halo bytes", got == want, f"{got} != {want}")
        back = st.get("halo_adjoint", {})
        got = (back.get("bytes_sent"), back.get("bytes_recv"))
        rep.expect(f"{what} adjoint bytes", got == want[::-1], f"{got} != {want[::-1]}")
    return st, y, x


@pytest.mark.parametrize("name", list(CASES))
@mpi(ranks=(1, 2, 3, 4), timeout=60)
def test_conv2d_vs_torch(comm, name):
    from distconv.backend import set_default_dtype

    set_default_dtype(np.float64)
    rep = Report()
    for gshape in grids(comm.size):
        run_case(comm, name, gshape, rep)
    rep.assert_ok(comm)


@mpi(ranks=(2, 4), timeout=60)
def test_shape_only_run_records_the_same_bytes(comm):
    """The same forward and backward on MetaArrays under ShapeComm(p, rank) records the
    real run's calls and bytes for every kind (halo, halo_adjoint, the dw/db allreduce)."""
    from distconv import autograd, spatial
    from distconv.comm import use_world
    from distconv.distribution import Distribution
    from distconv.grid import ProcessGrid
    from distconv.meta import MetaArray
    from distconv.shapecomm import ShapeComm
    from distconv.tensor import DistTensor

    rep = Report()
    for name in ("k7-s2-p3", "tiny-H<ranks"):
        case = CASES[name]
        N, C, F, H, W, k, s, p, d, bias = case
        for gshape in grids(comm.size):
            real, _, _ = run_case(comm, name, gshape, Report(), check_bytes=False)
            sc = ShapeComm(comm.size, comm.rank)
            with use_world(sc):
                g = ProcessGrid(sc, gshape, NAMES)
                xd = Distribution(g, [("sample",), None, ("height",), ("width",)])
                x = DistTensor(MetaArray(xd.local_shape((N, C, H, W)), np.float64), xd,
                               (N, C, H, W))
                kh, kw = pair(k)
                ws = (F, C, kh, kw)
                w = DistTensor(MetaArray(ws, np.float64), Distribution.replicated(g, 4), ws)
                b = (DistTensor(MetaArray((F,), np.float64), Distribution.replicated(g, 1),
                                (F,)) if bias else None)
                for t in (x, w, b):
                    if t is not None:
                        t.requires_grad = True
                y = spatial.conv2d(x, w, b, s, p, d)
                dy = DistTensor(MetaArray(y.local.shape, np.float64), y.distribution, y.shape)
                autograd.backward([y], [dy])
            shape_only = {kd: (v["calls"], v["bytes_sent"], v["bytes_recv"])
                          for kd, v in sc.stats().items() if kd != "total"}
            want = {kd: (v["calls"], v["bytes_sent"], v["bytes_recv"])
                    for kd, v in real.items() if kd != "total"}
            rep.expect(f"{name} {gshape} shape-only stats", shape_only == want,
                       f"{shape_only} != {want}")
            rep.expect(f"{name} {gshape} has halo traffic", "halo" in shape_only)
    rep.assert_ok(comm)


@mpi(ranks=(4,), timeout=60)
def test_negative_control_corners_dropped(comm):
    """With the diagonal (corner) pieces left out of the plan on every rank, the same
    comparison must fail on a height=2 x width=2 grid; the real plan passes."""
    from distconv import spatial
    from distconv.backend import set_default_dtype

    set_default_dtype(np.float64)
    real = spatial.exchange_plan

    def no_corners(dist, shape, windows):
        plan = real(dist, shape, windows)
        me = plan.blocks[plan.comm.rank]

        def keep(peer):
            return sum(a != b for a, b in zip(plan.blocks[peer], me)) < 2

        plan.sends = [e for e in plan.sends if keep(e[0])]
        plan.recvs = [e for e in plan.recvs if keep(e[0])]
        return plan

    spatial.exchange_plan = no_corners
    try:
        bad = Report()
        run_case(comm, "same-3x3", (1, 2, 2), bad, check_bytes=False)
    finally:
        spatial.exchange_plan = real
    errs = bad.merged(comm)
    assert any(" y:" in e for e in errs) and any(" dx:" in e for e in errs), errs
    good = Report()
    run_case(comm, "same-3x3", (1, 2, 2), good)
    good.assert_ok(comm)


@mpi(ranks=(1, 4), timeout=60)
def test_halo_gather_values(comm):
    """Each rank's window equals the slice of the padded global array (fill -inf), corners
    and multi-owner halos included; the window tensor refuses redistribution."""
    from distconv import halo, spatial
    from distconv.comm import Communicator
    from distconv.distribution import Distribution
    from distconv.grid import ProcessGrid
    from distconv.tensor import DistTensor

    c = Communicator(comm)
    N, C, H, W = 2, 2, 7, 5
    xg = np.random.default_rng(3).integers(-9, 10, (N, C, H, W)).astype(np.float64)
    for gshape in grids(comm.size):
        g = ProcessGrid(c, gshape, NAMES)
        dist = Distribution(g, [("sample",), None, ("height",), ("width",)])
        x = DistTensor.from_global(xg, dist)
        wins = {2: halo.windows(H, gshape[1], 7, 1, 3), 3: halo.windows(W, gshape[2], 3, 2, 1)}
        xw = spatial.halo_gather(x, wins, fill=-np.inf)
        padded = np.full((N, C, H + 6, W + 2), -np.inf)
        padded[:, :, 3:3 + H, 1:1 + W] = xg
        wh, ww = wins[2][g.coord("height")], wins[3][g.coord("width")]
        n0, n1 = dist.dim_range(0, N)
        want = padded[n0:n1, :, wh.start + 3:wh.start + 3 + wh.size,
                      ww.start + 1:ww.start + 1 + ww.size]
        np.testing.assert_array_equal(xw.local, want)
        with pytest.raises(ValueError, match="cannot be redistributed"):
            xw.redistribute(dist)


@mpi(ranks=(1, 4), timeout=60)
def test_bad_input_raises_everywhere(comm):
    from distconv import halo, spatial
    from distconv.comm import Communicator
    from distconv.distribution import Distribution
    from distconv.grid import ProcessGrid
    from distconv.tensor import DistTensor

    c = Communicator(comm)
    p = comm.size
    g = ProcessGrid(c, (1, p, 1), NAMES)
    xg = np.zeros((2, 3, 5, 4))
    x = DistTensor.from_global(xg, Distribution(g, [None, None, ("height",), ("width",)]))
    w = np.zeros((2, 3, 3, 3))
    cases = [
        (lambda: spatial.conv2d(x, np.zeros((2, 4, 3, 3))), "weight must be"),
        (lambda: spatial.conv2d(x, w, np.zeros(3)), "bias must have shape"),
        (lambda: spatial.conv2d(x, w, stride=2, padding="same"), "needs stride 1"),
        (lambda: spatial.conv2d(x, w, padding="full"), "'same' or 'valid'"),
        (lambda: spatial.conv2d(x, np.zeros((2, 3, 7, 3))), "output would be empty"),
        (lambda: spatial.conv2d(x, w, stride=0), "stride must be"),
        (lambda: spatial.halo_gather(x, {2: halo.windows(6, p, 3)}), "were not made for"),
        (lambda: spatial.halo_gather(x, {5: halo.windows(5, p, 3)}), "out of range"),
    ]
    if p == 4:
        cases.append((lambda: spatial.conv2d(DistTensor.from_global(
            xg, Distribution(g, [None, ("height",), None, None])), w), "whole channels"))
        g2 = ProcessGrid(c, (1, 2, 2), NAMES)
        x2 = DistTensor.from_global(
            xg, Distribution(g2, [None, None, ("height", "width"), None]))
        cases.append((lambda: spatial.conv2d(x2, w), "one grid axis at most"))
    for fn, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            fn()
    assert len(cases) == (8 if p == 1 else 10)
    c.barrier()


# ---------------------------------------------------------------------------- pooling
# (kind, N, C, H, W, kernel, stride, padding, ceil_mode, count_include_pad)
POOL_CASES = {
    "max-3s2p1": ("max", 2, 2, 9, 8, 3, 2, 1, False, True),
    "max-ceil": ("max", 1, 3, 8, 7, 3, 2, 1, True, True),
    "max-2x2-odd": ("max", 2, 2, 7, 5, 2, None, 0, False, True),
    "max-rect-tiny": ("max", 3, 2, 3, 5, (3, 2), (1, 2), (1, 0), False, True),
    "avg-3s1p1-exclude-pad": ("avg", 2, 2, 7, 6, 3, 1, 1, False, False),
    "avg-ceil-include-pad": ("avg", 1, 2, 8, 9, 3, 2, 1, True, True),
    "avg-ceil-exclude-pad": ("avg", 2, 1, 9, 6, (3, 2), 2, (1, 1), True, False),
}


@pytest.mark.parametrize("name", list(POOL_CASES))
@mpi(ranks=(1, 2, 3, 4), timeout=60)
def test_pool2d_vs_torch(comm, name):
    """max/avg pooling on every grid, N split over sample (even grids) or C split over
    sample (odd ones: pooling keeps any channel split), against torch float64."""
    import torch

    from distconv import spatial_pool
    from distconv.backend import set_default_dtype
    from distconv.comm import Communicator
    from distconv.distribution import Distribution
    from distconv.grid import ProcessGrid
    from distconv.tensor import DistTensor

    set_default_dtype(np.float64)
    kind, N, C, H, W, k, s, p, ceil, cip = POOL_CASES[name]
    c = Communicator(comm)
    rng = np.random.default_rng(5)
    xg = rng.standard_normal((N, C, H, W))
    xt = torch.tensor(xg, requires_grad=True)
    if kind == "max":
        yt = torch.nn.functional.max_pool2d(xt, k, s, p, ceil_mode=ceil)
    else:
        yt = torch.nn.functional.avg_pool2d(xt, k, s, p, ceil_mode=ceil, count_include_pad=cip)
    dyg = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dyg))
    rep = Report()
    for n, gshape in enumerate(grids(comm.size)):
        g = ProcessGrid(c, gshape, NAMES)
        split = ([("sample",), None] if n % 2 == 0 else [None, ("sample",)])
        x = DistTensor.from_global(xg, Distribution(g, split + [("height",), ("width",)]))
        x.requires_grad = True
        if kind == "max":
            y = spatial_pool.max_pool2d(x, k, s, p, ceil_mode=ceil)
        else:
            y = spatial_pool.avg_pool2d(x, k, s, p, ceil_mode=ceil, count_include_pad=cip)
        y.backward(dyg)
        what = f"{name} grid={dict(zip(NAMES, gshape))} split={split}"
        rep.check(f"{what} y", y.to_global(), yt)
        rep.check(f"{what} dx", x.grad.to_global(), xt.grad)
    rep.assert_ok(comm)


@mpi(ranks=(4,), timeout=60)
def test_pool_negative_control_global_divisor(comm):
    """Dividing by kh*kw instead of the global divisor (what a purely local average would do)
    must fail the ceil-mode, count_include_pad=False comparison."""
    from distconv import halo, ops, spatial_pool

    real = ops.avg_pool2d_divisor

    def uniform(x_shape, kernel, stride=None, padding=0, ceil_mode=False,
                count_include_pad=True):
        d = real(x_shape, kernel, stride, padding, ceil_mode, count_include_pad)
        return np.full_like(d, float(np.prod(halo.pair(kernel, "k"))))

    spatial_pool.ops.avg_pool2d_divisor = uniform
    try:
        with pytest.raises(AssertionError, match="relative error"):
            test_pool2d_vs_torch(comm, "avg-ceil-exclude-pad")
    finally:
        spatial_pool.ops.avg_pool2d_divisor = real
