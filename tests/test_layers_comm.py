"""Communication volume and weight memory of Conv2d/Linear under every strategy.

The byte counts recorded by ``distconv.comm`` (``world().stats()``) must equal, per
rank and per collective kind, what the algorithms of DESIGN.md move:

* channel (c>1, f=1): forward reduce-scatter of the partial y over the channel group;
  backward allgather of dy over the channel group; nothing for dx.
* filter (c=1, f>1): forward allgather of x over the filter group; backward
  reduce-scatter of the partial dx over the filter group.
* channel x filter: forward allgather of x within the filter group, reduce-scatter of
  the partial y within the channel group, one alltoallv into activation order;
  backward one alltoallv of dy to the F-split over ``filter``, reduce-scatter of dx.
* sample: no activation traffic; ``sync_gradients`` allreduces |w| + |b| (of the shard)
  over the sample group.

Every expected number is computed here from our own floor+1 block math and the byte
formulas of comm.py's docstring (per-rank block sizes b_j, bytes):

* allgather       sent = b_me*(p-1),       recv = sum_{j!=me} b_j
* reduce_scatter  sent = sum_{j!=me} b_j,  recv = b_me*(p-1)
* allreduce       reduce_scatter + allgather of the n elements cut in p floor+1 blocks
* alltoallv       recv = elements of my target block that I do not hold,
                  sent = elements I hold that other ranks' target blocks need
"""
import numpy as np
import pytest

from tests.mpi_harness import mpi

N, C, F, H, W = 3, 5, 7, 6, 6      # uneven on 2, 3 and 4 ranks
K, PAD = 3, 1                      # 3x3 conv, padding 1: H' = H, W' = W
ITEM = 8                           # float64


# ----------------------------------------------------------------- our own block math
def blocks(d, p):
    """floor+1 rule: the first d % p blocks get d // p + 1 elements."""
    return [d // p + (1 if i < d % p else 0) for i in range(p)]


def brange(d, p, i):
    b = blocks(d, p)
    s = sum(b[:i])
    return (s, s + b[i])


def nested(d, parts):
    """(start, stop) of a nested split: parts = [(p_outer, i_outer), (p_inner, i_inner), ...]."""
    s, e = 0, d
    for p, i in parts:
        a, b = brange(e - s, p, i)
        s, e = s + a, s + b
    return (s, e)


def n_of(r):
    return r[1] - r[0]


def ov(a, b):
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def box_ov(a, b):
    out = 1
    for x, y in zip(a, b):
        out *= ov(x, y)
    return out


def box_size(a):
    out = 1
    for x in a:
        out *= n_of(x)
    return out


def coords(rank, s, c, f):
    """(sample, channel, filter) coordinates: sample outermost, row-major."""
    return rank // (c * f), (rank // f) % c, rank % f


def ag(bs, me):
    return bs[me] * (len(bs) - 1), sum(bs) - bs[me]


def rs(bs, me):
    return sum(bs) - bs[me], bs[me] * (len(bs) - 1)


def ar(n, p, me):
    b = blocks(n, p)
    v = (n - b[me] + b[me] * (p - 1)) * ITEM
    return v, v


def add(exp, kind, sent_recv, calls=1):
    c0, s0, r0 = exp.get(kind, (0, 0, 0))
    exp[kind] = (c0 + calls, s0 + sent_recv[0], r0 + sent_recv[1])


def measured(comm_world):
    """{kind: (calls, bytes_sent, bytes_recv)} of this rank since the last reset."""
    return {k: (v["calls"], v["bytes_sent"], v["bytes_recv"])
            for k, v in comm_world.stats().items() if k != "total"}


# ------------------------------------------------------------- expected per algorithm
def expected_layer(rank, s, c, f, hw, hwo):
    """Expected (forward, backward, sync) stats of one Conv2d(C->F)/Linear(C->F) layer on
    an s x c x f grid, for a (N, C, *spatial) input with hw = H*W and hwo = H'*W'."""
    sc, cc, fc = coords(rank, s, c, f)
    ns = n_of(brange(N, s, sc))              # this sample group's samples
    fwd, bwd, sync = {}, {}, {}
    # forward
    if f > 1:   # x: C over (channel, filter) -> C over channel: allgather over filter
        cb = [n_of(nested(C, [(c, cc), (f, j)])) for j in range(f)]
        add(fwd, "allgather", ag([ns * b * hw * ITEM for b in cb], fc))
    if c > 1:   # partial y (ns x F_f x H'W'), reduce-scatter over channel
        ff = n_of(brange(F, f, fc))
        add(fwd, "reduce_scatter", rs([ns * b * hwo * ITEM for b in blocks(ff, c)], cc))
    if c > 1 and f > 1:  # F split (filter, channel) -> activation order (channel, filter)
        held = nested(F, [(f, fc), (c, cc)])
        want = nested(F, [(c, cc), (f, fc)])
        add(fwd, "alltoall", ((n_of(held) - ov(held, want)) * ns * hwo * ITEM,
                              (n_of(want) - ov(want, held)) * ns * hwo * ITEM))
    # backward
    if c > 1 and f == 1:  # dy: F over channel -> whole F: allgather over channel
        add(bwd, "allgather", ag([ns * b * hwo * ITEM for b in blocks(F, c)], cc))
    if c > 1 and f > 1:   # dy: F over (channel, filter) -> F over filter: one alltoallv
        held = nested(F, [(c, cc), (f, fc)])
        want = brange(F, f, fc)
        sent = sum(ov(held, brange(F, f, coords(q, s, c, f)[2]))
                   for q in range(s * c * f)
                   if q != rank and coords(q, s, c, f)[0] == sc)
        add(bwd, "alltoall", (sent * ns * hwo * ITEM,
                              (n_of(want) - ov(want, held)) * ns * hwo * ITEM))
    if f > 1:   # partial dx (ns x C_c x HW), reduce-scatter over filter
        cc_len = n_of(brange(C, c, cc))
        add(bwd, "reduce_scatter", rs([ns * b * hw * ITEM for b in blocks(cc_len, f)], fc))
    # gradient sync: shard of w (F_f x C_c x k) and of b (F over (channel, filter))
    if s > 1:
        ksz = K * K if hw > 1 else 1
        nw = n_of(brange(F, f, fc)) * n_of(brange(C, c, cc)) * ksz
        nb = n_of(nested(F, [(c, cc), (f, fc)]))
        add(sync, "allreduce", ar(nw, s, sc))
        add(sync, "allreduce", ar(nb, s, sc))
    return fwd, bwd, sync


def make_layer(kind, s, c, f):
    from distconv import nn
    from distconv.strategy import Strategy

    st = Strategy(sample=s, channel=c, filter=f)
    nn.manual_seed(0)
    if kind == "conv":
        return nn.Conv2d(C, F, K, padding=PAD, strategy=st)
    return nn.Linear(C, F, strategy=st)


def check_layer_volume(comm, kind, g):
    """Forward, backward and gradient sync of one layer on grid g: exact bytes per kind."""
    from distconv import nn
    from distconv.backend import set_default_dtype
    from distconv.comm import world

    s, c, f = g
    set_default_dtype(np.float64)
    layer = make_layer(kind, s, c, f)
    rng = np.random.default_rng(1)
    if kind == "conv":
        x = rng.standard_normal((N, C, H, W))
        dy = rng.standard_normal((N, F, H, W))
        hw = hwo = H * W
    else:
        x = rng.standard_normal((N, C))
        dy = rng.standard_normal((N, F))
        hw = hwo = 1
    fwd, bwd, sync = expected_layer(comm.rank, s, c, f, hw, hwo)
    wc = world()

    wc.reset_stats()
    y = layer(x)
    assert y.shape == dy.shape
    assert measured(wc) == fwd, f"forward on rank {comm.rank}, grid {g}"

    wc.reset_stats()
    layer.backward(dy)
    assert measured(wc) == bwd, f"backward on rank {comm.rank}, grid {g}"

    wc.reset_stats()
    nn.sync_gradients(layer.parameters())
    assert measured(wc) == sync, f"gradient sync on rank {comm.rank}, grid {g}"
    assert layer.weight.grad.distribution.pending == ()
    assert layer.bias.grad.distribution.pending == ()


# -------------------------------------------------------------------- 1. per algorithm
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("algo", ["channel", "filter", "sample"])
@mpi(ranks=(1, 2, 3, 4), timeout=60)
def test_comm_volume_1d(comm, algo, kind):
    """channel=p, filter=p, sample=p: one algorithm over all ranks (p=1: nothing moves)."""
    p = comm.size
    g = {"channel": (1, p, 1), "filter": (1, 1, p), "sample": (p, 1, 1)}[algo]
    check_layer_volume(comm, kind, g)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("g", [(1, 2, 2), (2, 2, 1), (2, 1, 2)],
                         ids=["channel2xfilter2", "sample2xchannel2", "sample2xfilter2"])
@mpi(ranks=(4,), timeout=60)
def test_comm_volume_2d(comm, g, kind):
    """channel x filter (stationary w) and the sample-mixed grids on 4 ranks."""
    check_layer_volume(comm, kind, g)


def test_expected_formulas_by_hand():
    """Spot-check the model above against numbers worked out by hand (no MPI)."""
    hw = H * W * ITEM
    # channel on 2 ranks: y partial 3x7x36, F blocks [4, 3] over the channel group
    fwd, bwd, _ = expected_layer(0, 1, 2, 1, H * W, H * W)
    assert fwd == {"reduce_scatter": (1, 3 * 3 * hw, 3 * 4 * hw)}
    assert bwd == {"allgather": (1, 3 * 4 * hw, 3 * 3 * hw)}
    # filter on 3 ranks, rank 2: C blocks [2, 2, 1]
    fwd, bwd, _ = expected_layer(2, 1, 1, 3, H * W, H * W)
    assert fwd == {"allgather": (1, 3 * 1 * hw * 2, 3 * 4 * hw)}
    assert bwd == {"reduce_scatter": (1, 3 * 4 * hw, 3 * 1 * hw * 2)}
    # channel x filter 2x2, rank 1 (channel 0, filter 1): F=7 -> filter [0,4) [4,7),
    # held after the reduce-scatter [4,6), activation order wants [2,4): all 2 move
    fwd, bwd, _ = expected_layer(1, 1, 2, 2, H * W, H * W)
    assert fwd["alltoall"] == (1, 3 * 2 * hw, 3 * 2 * hw)
    # backward: holds F [2,4), wants its filter block [4,7) (3 to receive); both ranks
    # of filter coordinate 0 (ranks 0 and 2) want [0,4) and get its [2,4): 2 x 2 sent
    assert bwd["alltoall"] == (1, 2 * 2 * 3 * hw, 3 * 3 * hw)
    # sample on 4 ranks: |w| = 7*5*9 = 315 in blocks [79, 79, 79, 78]
    _, _, sync = expected_layer(3, 4, 1, 1, H * W, H * W)
    v = (315 - 78 + 78 * 3 + 7 - 1 + 1 * 3) * ITEM
    assert sync == {"allreduce": (2, v, v)}


# ------------------------------------------------------------- 1b. segmented allreduce
@mpi(ranks=(4,), timeout=60)
def test_segmented_allreduce_vs_data_parallel(comm):
    from distconv import nn
    from distconv.backend import set_default_dtype
    from distconv.comm import world

    set_default_dtype(np.float64)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, C, H, W))
    dy = rng.standard_normal((N, F, H, W))
    wc = world()
    sent = {}
    shard = {}
    for name, (s, c, f) in {"dp": (4, 1, 1), "seg": (2, 2, 1)}.items():
        layer = make_layer("conv", s, c, f)
        layer(x)
        layer.backward(dy)
        shard[name] = layer.weight.grad.local.size
        wc.reset_stats()
        nn.sync_gradients([layer.weight])
        st = measured(wc)
        assert set(st) == {"allreduce"} and st["allreduce"][0] == 1
        assert st["allreduce"][1] == st["allreduce"][2]
        sent[name] = st["allreduce"][1]
        np.testing.assert_array_equal(layer.weight.grad.to_global().shape, (F, C, K, K))

    r = comm.rank
    sc, cc, _ = coords(r, 2, 2, 1)
    wsize = F * C * K * K  # 315
    # data parallel: the full |w| over all 4 ranks
    assert shard["dp"] == wsize
    assert sent["dp"] == ar(wsize, 4, r)[0] == [3784, 3784, 3784, 3768][r]
    # segmented: this rank's shard F x C_c x 3 x 3 (C=5 over channel=2: [3, 2]) over the
    # 2 ranks of its sample group; |w|/(c*f) +- one C-block of F*1*9
    assert shard["seg"] == F * blocks(C, 2)[cc] * K * K == [189, 126][cc]
    assert abs(shard["seg"] - wsize / 2) <= F * K * K
    assert sent["seg"] == ar(shard["seg"], 2, sc)[0] == [1512, 1008][cc]
    # on 2 ranks an allreduce moves exactly its message each way: the message is the shard
    assert sent["seg"] == shard["seg"] * ITEM
    # the shards over the channel group tile |w|: c*f-fold less to allreduce per group
    assert comm.allreduce(shard["seg"] if sc == 0 else 0) == wsize
    assert sent["seg"] < sent["dp"]


# ------------------------------------------------------- 1c. transitions between layers
def _act_box(rank, s, c, f, shape):
    """Activation layout: N over sample, C over (channel, filter), the rest whole."""
    sc, cc, fc = coords(rank, s, c, f)
    return (brange(shape[0], s, sc), nested(shape[1], [(c, cc), (f, fc)])) + \
        tuple((0, n) for n in shape[2:])


def _xc_box(rank, s, c, f, shape):
    """Conv input layout: N over sample, C over channel (replicated over filter)."""
    sc, cc, _ = coords(rank, s, c, f)
    return (brange(shape[0], s, sc), brange(shape[1], c, cc)) + tuple((0, n) for n in shape[2:])


def min_move(rank, p, src_box, dst_box):
    """Minimum (sent, recv) bytes of a re-layout where every element has one holder and
    one destination per target block: receive what my target block lacks, send what the
    other ranks' target blocks need from my block."""
    mine, want = src_box(rank), dst_box(rank)
    recv = box_size(want) - box_ov(want, mine)
    sent = sum(box_ov(mine, dst_box(q)) for q in range(p) if q != rank)
    return sent * ITEM, recv * ITEM


TRANSITIONS = {
    # name: (grid of layer 1, grid of layer 2)
    "s4_to_s2c2": ((4, 1, 1), (2, 2, 1)),
    "s2c2_to_s4": ((2, 2, 1), (4, 1, 1)),
    "s2_to_f2": ((2, 1, 1), (1, 1, 2)),
    "f2_to_s2": ((1, 1, 2), (2, 1, 1)),
    "c2_to_s2": ((1, 2, 1), (2, 1, 1)),
}


def merge(*dicts):
    """Sum {kind: (sent, recv)} byte dicts; kinds that move nothing are dropped."""
    out = {}
    for d in dicts:
        for k, (s_, r_) in d.items():
            a, b = out.get(k, (0, 0))
            out[k] = (a + s_, b + r_)
    return {k: v for k, v in out.items() if v[0] or v[1]}


@pytest.mark.parametrize("name", ["s2_to_f2", "f2_to_s2", "c2_to_s2"])
@mpi(ranks=(2,), timeout=60)
def test_transition_moves_minimum_2ranks(comm, name):
    check_transition(comm, name)


@pytest.mark.parametrize("name", ["s4_to_s2c2", "s2c2_to_s4"])
@mpi(ranks=(4,), timeout=60)
def test_transition_moves_minimum_4ranks(comm, name):
    check_transition(comm, name)


def check_transition(comm, name):
    """Sequential(Conv2d(grid 1), Conv2d(grid 2)): exact bytes of forward and backward,
    the transition's share being the minimum computed from block intersections."""
    from distconv import nn
    from distconv.backend import set_default_dtype
    from distconv.comm import world
    from distconv.strategy import Strategy

    g1, g2 = TRANSITIONS[name]
    p = comm.size
    set_default_dtype(np.float64)
    F2 = 6
    nn.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(C, F, K, padding=PAD, strategy=Strategy(*g1)),
                        nn.Conv2d(F, F2, K, padding=PAD, strategy=Strategy(*g2)))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, C, H, W))
    dy = rng.standard_normal((N, F2, H, W))
    r, wc = comm.rank, world()
    mid = (N, F, H, W)
    hw = H * W

    # layer 1's own traffic is that of a lone layer (C -> F on grid 1)
    f1, b1, _ = expected_layer(r, *g1, hw, hw)
    # layer 2's own traffic (F -> F2 on grid 2; these cases have c2 = 1 or f2 = 1). Its
    # input arrives straight in the layout its local math needs, so no allgather of x.
    s2, c2, f2 = g2
    assert c2 == 1 or f2 == 1
    sc, cc, fc = coords(r, s2, c2, f2)
    ns = n_of(brange(N, s2, sc))
    f2_own, b2_own = {}, {}
    if c2 > 1:
        f2_own["reduce_scatter"] = rs([ns * b * hw * ITEM for b in blocks(F2, c2)], cc)
        b2_own["allgather"] = ag([ns * b * hw * ITEM for b in blocks(F2, c2)], cc)

    # forward transition: layer 1's output (activation layout of grid 1) -> layer 2's
    # conv input layout (N over sample, C over channel of grid 2): one minimal re-layout
    fwd_move = {"alltoall": min_move(r, p, lambda q: _act_box(q, *g1, mid),
                                     lambda q: _xc_box(q, *g2, mid))}
    # backward transition: layer 2's dx -> layer 1's output layout. With f2 > 1, dx is a
    # partial sum over the filter group (here: every rank holds an addend of all of it):
    # the minimum is a reduce-scatter straight onto the target blocks, nothing more.
    if f2 == 1:
        bwd_move = {"alltoall": min_move(r, p, lambda q: _xc_box(q, *g2, mid),
                                         lambda q: _act_box(q, *g1, mid))}
    else:
        assert g1 == (p, 1, 1) and g2 == (1, 1, p)
        tb = [box_size(_act_box(q, *g1, mid)) * ITEM for q in range(p)]
        bwd_move = {"reduce_scatter": rs(tb, r)}

    def bytes_of(d):
        return {k: v[1:] for k, v in d.items()}

    wc.reset_stats()
    net(x)
    got = merge(bytes_of(measured(wc)))
    assert got == merge(bytes_of(f1), f2_own, fwd_move), f"forward of {name} on rank {r}"

    wc.reset_stats()
    net.backward(dy)
    got = merge(bytes_of(measured(wc)))
    assert got == merge(bytes_of(b1), b2_own, bwd_move), f"backward of {name} on rank {r}"


# ------------------------------------------------------------------ 2. weight memory
def _factorizations(p):
    return [(s, c, p // (s * c)) for s in range(1, p + 1) for c in range(1, p + 1)
            if p % (s * c) == 0]


@mpi(ranks=(1, 2, 3, 4), timeout=60)
def test_weight_memory_per_strategy(comm):
    from distconv import nn
    from distconv.backend import set_default_dtype
    from distconv.strategy import Strategy

    set_default_dtype(np.float64)
    p, r = comm.size, comm.rank
    for s, c, f in _factorizations(p):
        st = Strategy(sample=s, channel=c, filter=f)
        sc, cc, fc = coords(r, s, c, f)
        conv = nn.Conv2d(C, F, K, padding=PAD, strategy=st)
        lin = nn.Linear(C, F, strategy=st)
        bn = nn.BatchNorm2d(F, strategy=st)
        nf, nc = n_of(brange(F, f, fc)), n_of(brange(C, c, cc))
        nbias = n_of(nested(F, [(c, cc), (f, fc)]))
        for m, ksz in ((conv, K * K), (lin, 1)):
            full = F * C * ksz
            assert m.weight.data.local.size == nf * nc * ksz, (s, c, f, m)
            assert m.weight.data.local.shape[:2] == (nf, nc)
            # |w|/(c*f) up to one row per split dimension: F/f and C/c rounded by floor+1
            assert nf in (F // f, F // f + 1) and nc in (C // c, C // c + 1)
            assert (F // f) * (C // c) * ksz <= m.weight.data.local.size \
                <= -(-F // f) * -(-C // c) * ksz
            assert m.bias.data.local.size == nbias
            # the shards tile w once per sample group
            assert comm.allreduce(m.weight.data.local.size) == s * full
            assert comm.allreduce(m.bias.data.local.size) == s * F
        for t in (bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var):
            assert t.local.size == nbias, (s, c, f)
            assert comm.allreduce(t.local.size) == s * F
        assert bn.num_batches_tracked.local.size == 1
