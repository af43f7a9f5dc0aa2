"""Operator placement (``Strategy(ranks=...)``) against PyTorch float64.

* an Inception-style block whose branches run on disjoint rank pairs (4 ranks: ranks 0-1
  and 2-3, branches of different lengths), forked with ``dc.fork`` and joined by
  ``dc.cat``; also without the fork (same numbers);
* a classifier on one rank behind a stem on all ranks, trained one step with
  ``GradientSync`` and SGD;
* a checkpoint saved under one placement and loaded under another;
* negative controls: a perturbed shard on one placed rank is caught; without the fork
  a short branch waits for the long one (with it, it does not);
* bad input: tests/test_placement_errors.py.

Inputs: N=3 (uneven sample blocks) images 3x8x8, float64; tolerance 1e-10 (normwise).
"""
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import distconv as dc
from distconv import nn
from distconv.backend import set_default_dtype, to_numpy
from distconv.strategy import Strategy
from distconv.tensor import DistTensor
from tests.mpi_harness import mpi, mpi_tmp_path
from tests.torch_ref import Report, draw, labels_for, randomize, to_torch_state, torch_module

PAIRS = {"stem": "sample=2,channel=2", "a1": "sample=2,ranks=0-1",
         "a2": "sample=1,channel=2,ranks=0-1", "a3": "sample=1,filter=2,ranks=0-1",
         "b": "sample=1,filter=2,ranks=2-3", "p": "sample=2,ranks=2+3",
         "head": "sample=4", "fc": "sample=1,ranks=3"}
WORLD = {k: "sample=*" for k in PAIRS}


class Block(nn.Module):
    """stem conv -> fork -> a: 1x1-BN-ReLU-3x3-3x3 | b: 3x3 | p: avgpool-1x1 -> cat ->
    3x3 conv -> gap -> flatten -> linear. (N, 3, H, W) -> (N, 3) logits."""

    def __init__(self, st, fork=True):
        super().__init__()
        self.fork = fork
        self.stem = nn.Conv2d(3, 6, 3, padding=1, strategy=st["stem"])
        self.a = nn.Sequential(nn.Conv2d(6, 4, 1, bias=False, strategy=st["a1"]),
                               nn.BatchNorm2d(4, strategy=st["a1"]), nn.ReLU(),
                               nn.Conv2d(4, 5, 3, padding=1, strategy=st["a2"]),
                               nn.Conv2d(5, 5, 3, padding=1, strategy=st["a3"]))
        self.b = nn.Sequential(nn.Conv2d(6, 3, 3, padding=1, strategy=st["b"]))
        self.p = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1),
                               nn.Conv2d(6, 2, 1, strategy=st["p"]))
        self.head = nn.Sequential(nn.Conv2d(10, 4, 3, padding=1, strategy=st["head"]),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, 3, strategy=st["fc"]))

    def forward(self, x):
        h = self.stem(x)
        branches = [self.a, self.b, self.p]
        hs = dc.fork(h, branches) if self.fork else [h] * 3
        return self.head(dc.cat([m(t) for m, t in zip(branches, hs)], dim=1))


class TorchBlock(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        for name, child in m._modules.items():
            self.add_module(name, torch_module(child, 4))
        self.double()

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.cat([self.a(h), self.b(h), self.p(h)], dim=1))


def twin(model):
    t = TorchBlock(model)
    t.load_state_dict(to_torch_state(model.state_dict()), strict=True)
    return t


def check_step(model, tmodel, x, labels, rep, tag, x_dist, gsync=None):
    """Forward, loss, backward, gradient sync (``sync_gradients``, or ``gsync.wait()`` of a
    GradientSync); y, loss, dx, every grad and buffer vs torch."""
    model.zero_grad()
    xin = DistTensor.from_global(x, x_dist)
    xin.requires_grad = True
    y = model(xin)
    loss = nn.CrossEntropyLoss()(y, labels)
    loss.backward()
    if gsync is not None:
        gsync.wait()
    nn.sync_gradients(model.parameters())  # a no-op after gsync.wait()
    xt = torch.tensor(x, requires_grad=True)
    yt = tmodel(xt)
    lt = F.cross_entropy(yt, torch.tensor(labels))
    lt.backward()
    rep.check(f"{tag} y", to_numpy(y.to_global()), yt)
    rep.check(f"{tag} loss", np.float64(loss), lt, dtype=False)
    rep.check(f"{tag} dx", to_numpy(xin.grad.to_global()), xt.grad)
    tparams = dict(tmodel.named_parameters())
    for name, p in model.named_parameters():
        rep.check(f"{tag} grad {name}", to_numpy(p.grad.to_global()), tparams[name].grad)
    tbufs = dict(tmodel.named_buffers())
    for name, b in model.named_buffers():
        rep.check(f"{tag} buffer {name}", to_numpy(b.to_global()), tbufs[name], dtype=False)
    return float(loss)


# ------------------------------------------------------------------ the block
@pytest.mark.parametrize("fork", [True, False])
@mpi(ranks=(4,), timeout=180)
def test_inception_block_on_two_pairs(comm, fork):
    """Branches on ranks 0-1 and 2-3 (and a third on 2-3) match torch float64: logits,
    loss (the same on every rank), dx and every gradient, running statistics; then again
    after set_strategy moved the branches to other ranks (weights and running statistics
    move between rank sets), with GradientSync buckets reducing the gradients."""
    set_default_dtype(np.float64)
    rep = Report()
    nn.manual_seed(0)
    m = Block(PAIRS, fork)
    randomize(m, 1)
    x_dist = Strategy(sample=4).activation_distribution(4)
    for step, N in enumerate((3, 4)):
        x, labels = draw((N, 3, 8, 8), 10 + N), labels_for(N, 3, N)
        tm = twin(m)
        loss = check_step(m, tm, x, labels, rep, f"N={N}", x_dist)
        rep.expect("loss equal on every rank", len(set(comm.allgather(loss))) == 1)
    m.set_strategy({"a": "sample=2,ranks=2-3", "b": "sample=1,channel=2,ranks=0-1",
                    "p": "ranks=1", "head.4": "sample=1,ranks=0"})
    x, labels = draw((5, 3, 8, 8), 15), labels_for(5, 3, 5)
    check_step(m, twin(m), x, labels, rep, "moved", x_dist,
               dc.optim.GradientSync(m, bucket_bytes=256))
    # weights live on their layer's ranks only: a rank off a grid holds a MetaArray
    for name, p in m.named_parameters():
        g = p.data.grid
        rep.expect(f"{name} held only on its ranks",
                   (comm.rank in g.ranks) == (not dc.meta.is_meta(p.data.local)))
    rep.assert_ok(comm, "placed Inception-style block vs torch")


@mpi(ranks=(4,), timeout=120)
def test_placement_check_catches_a_bad_shard(comm):
    """Negative control: the same comparison fails when one placed rank's weight shard is
    off by 1e-6 (rank 3 holds branch b's filters)."""
    set_default_dtype(np.float64)
    nn.manual_seed(0)
    m = Block(PAIRS)
    randomize(m, 1)
    tm = twin(m)
    if comm.rank == 3:
        m.b[0].weight.data.local[...] += 1e-6
    rep = Report()
    x = draw((3, 3, 8, 8), 13)
    check_step(m, tm, x, labels_for(3, 3, 3), rep, "perturbed",
               Strategy(sample=4).activation_distribution(4))
    errs = rep.merged(comm)
    assert any(" y:" in e for e in errs), errs


# ------------------------------------------------------------------ overlap
def _timed_branches(comm, fork, delay, phase):
    """Ranks 0-1 run a long branch (three convs; in ``phase`` "forward" or "backward" its
    layers sleep ``delay`` s there), ranks 2-3 a short one (one conv). Returns the seconds
    from the start of that phase (all ranks leave a barrier) until the short branch's
    output exists (forward) or its backward is done, on this rank."""
    set_default_dtype(np.float64)
    nn.manual_seed(0)
    long_ = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1, strategy="sample=2,ranks=0-1")
                            for _ in range(3)])
    short = nn.Sequential(nn.Conv2d(4, 4, 1, strategy="sample=2,ranks=2-3"))

    def sleep(*_):
        if comm.rank in (0, 1):
            time.sleep(delay)

    if phase == "forward":
        long_[2].register_forward_hook(sleep)
    else:
        long_[0].register_full_backward_hook(sleep)
    stamps = {}

    def stamp(*_):
        stamps.setdefault("short", time.perf_counter())

    (short[0].register_forward_hook if phase == "forward"
     else short[0].register_full_backward_hook)(stamp)
    x = DistTensor.from_global(draw((4, 4, 6, 6), 3),
                               Strategy(sample=4).activation_distribution(4))
    x.requires_grad = True
    comm.Barrier()
    t0 = time.perf_counter()
    xs = dc.fork(x, [long_, short]) if fork else [x, x]
    y = dc.cat([long_(xs[0]), short(xs[1])], dim=1)
    comm.Barrier()
    t1 = time.perf_counter()
    y.backward(draw(y.shape, 4))
    assert x.grad is not None
    return stamps["short"] - (t0 if phase == "forward" else t1)


@pytest.mark.parametrize("phase", ["forward", "backward"])
@mpi(ranks=(4,), timeout=120)
def test_branches_on_disjoint_ranks_overlap(comm, phase):
    """Branches of different lengths do not deadlock, and with ``dc.fork`` the short branch
    (ranks 2-3) is done long before the long one (ranks 0-1, 2 s of sleep), forward and
    backward. Negative control: without the fork the short branch's input move waits for
    the long branch, so in forward it finishes only after the sleep."""
    delay = 2.0
    took = _timed_branches(comm, True, delay, phase)
    if comm.rank in (2, 3):
        assert took < delay / 2, took
    took = comm.allgather(_timed_branches(comm, False, delay, phase))
    if phase == "forward":  # rank 2's input block comes from ranks 0-1 (rank 3's does not)
        assert max(took[2:]) >= delay * 0.9, took


# ------------------------------------------------------------------ classifier, training
def stem_and_classifier(fc):
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False, strategy="sample=*"),
                         nn.BatchNorm2d(5, strategy="sample=*"), nn.ReLU(),
                         nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 4, strategy=fc))


@pytest.mark.parametrize("fc_rank", ["first", "last"])
@mpi(ranks=(2, 3, 4), timeout=180)
def test_classifier_on_one_rank(comm, fc_rank):
    """A classifier on one rank behind a data-parallel stem: loss, dx, grads vs torch, then
    one SGD step with GradientSync (the stem's gradients reduced over all ranks, the
    classifier's over its one rank) equals torch's SGD step."""
    set_default_dtype(np.float64)
    r = 0 if fc_rank == "first" else comm.size - 1
    nn.manual_seed(0)
    m = stem_and_classifier(f"sample=1,ranks={r}")
    randomize(m, 2)
    tm = torch_module(m, comm.size)
    tm.load_state_dict(to_torch_state(m.state_dict()))
    opt = dc.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(tm.parameters(), lr=0.1, momentum=0.9)
    dc.optim.GradientSync(m, opt, bucket_bytes=64)
    rep = Report()
    for N in (5, 2):
        x, labels = draw((N, 3, 6, 6), N), labels_for(N, 4, N)
        opt.zero_grad()
        topt.zero_grad()
        loss = nn.CrossEntropyLoss()(m(x), labels)
        loss.backward()
        lt = F.cross_entropy(tm(torch.tensor(x)), torch.tensor(labels))
        lt.backward()
        rep.check(f"N={N} loss", np.float64(loss), lt, dtype=False)
        opt.step()
        topt.step()
        tsd = tm.state_dict()
        for k, v in m.state_dict().items():
            rep.check(f"N={N} after step {k}", v, tsd[k], dtype=False)
    fc = m[6].weight
    rep.expect("classifier weight held by its rank only",
               dc.meta.is_meta(fc.data.local) == (comm.rank != r))
    rep.assert_ok(comm, "classifier on one rank vs torch")


@mpi(ranks=(4,), timeout=180)
def test_checkpoint_across_placements(comm):
    """Saved under the pairs placement (with SGD momentum state), loaded into the block
    under a world placement and under a swapped one: same state dict, same optimizer
    state, same logits."""
    from distconv import checkpoint
    set_default_dtype(np.float64)
    nn.manual_seed(0)
    a = Block(PAIRS)
    randomize(a, 3)
    opt = dc.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    x, labels = draw((3, 3, 8, 8), 5), labels_for(3, 3, 3)
    nn.CrossEntropyLoss()(a(x), labels).backward()
    opt.step()
    swapped = dict(PAIRS, a1="sample=2,ranks=2-3", a2="sample=1,channel=2,ranks=3+2",
                   a3="sample=1,filter=2,ranks=2-3", b="sample=2,ranks=0-1", p="ranks=1",
                   fc="sample=1,ranks=0")
    rep = Report()
    with mpi_tmp_path(comm) as d:
        path = str(d / "ck.h5")
        checkpoint.save_checkpoint(path, a, opt)
        sd, osd = a.state_dict(), {(i, k): to_numpy(t.to_global())
                                   for i, k, t in opt.state_tensors()}
        with dc.no_grad():
            ya = to_numpy(a.eval()(x).to_global())
        for plan in (WORLD, swapped):
            nn.manual_seed(9)
            b = Block(plan)
            bopt = dc.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
            checkpoint.load_checkpoint(path, b, bopt)
            for k, v in b.state_dict().items():
                rep.expect(f"{plan['fc']} {k}", np.array_equal(v, sd[k]))
            for i, k, t in bopt.state_tensors():
                rep.expect(f"{plan['fc']} opt {i} {k}",
                           np.array_equal(to_numpy(t.to_global()), osd[(i, k)]))
            with dc.no_grad():
                rep.check(f"{plan['fc']} y", to_numpy(b.eval()(x).to_global()), ya)
    rep.assert_ok(comm, "checkpoint across placements")


@pytest.mark.parametrize("bucket", [0, 64])
@mpi(ranks=(2, 3, 4), timeout=180)
def test_placed_bytes_equal_shape_only_model(comm, bucket):
    """The bytes and calls per collective kind of a real training step with placements
    (moves onto and off subsets, the loss broadcast, GradientSync buckets of placed
    gradients) equal what the planner's shape-only run of this rank predicts
    (:func:`distconv.trace.shape_only_step`)."""
    from distconv import optim
    from distconv.trace import shape_only_step
    from tests.test_trace import _counts, _real_step
    set_default_dtype(np.float64)
    p = comm.size
    nn.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, strategy="sample=*"),
                          nn.Conv2d(5, 6, 3, padding=1, strategy="sample=1,channel=2,ranks=0-1"),
                          nn.BatchNorm2d(6, strategy=f"sample=1,ranks={p - 1}"), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 3, strategy=f"sample=1,ranks={p // 2}"))
    sd = model.state_dict()
    real, labels = _real_step(comm, model, (5, 3, 6, 6), bucket)
    model.load_state_dict(sd)
    sync = (lambda m, o: optim.GradientSync(m, o, bucket_bytes=bucket)) if bucket else None
    tr = shape_only_step(model, (5, 3, 6, 6), p, comm.rank, labels=labels, sync=sync)
    assert _counts(tr.stats) == _counts(real), (_counts(tr.stats), _counts(real))
    # negative control: the classifier on another rank is predicted differently somewhere
    other = shape_only_step(model, (5, 3, 6, 6), p, comm.rank, labels=labels, sync=sync,
                            plan={"6": "sample=1,ranks=0"})
    assert any(comm.allgather(_counts(other.stats) != _counts(real)))


@mpi(ranks=(3, 4), timeout=180)
def test_spatial_pool_dropout_on_a_subset(comm):
    """A height-split conv on ranks 1-2 (halo exchange among them), pooling and dropout
    behind it, and a Linear on rank 0, vs torch float64 (compare_model: y, dx and every
    gradient for a random dy, two steps)."""
    from tests.torch_ref import compare_model
    set_default_dtype(np.float64)
    nn.manual_seed(4)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, strategy="sample=*"),
                      nn.Conv2d(4, 5, 3, padding=1, strategy="sample=1,height=2,ranks=1-2"),
                      nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                      nn.Linear(5 * 16, 3, strategy="sample=1,ranks=0"))
    randomize(m, 5)
    rep = Report()
    compare_model(m, [draw((3, 3, 8, 8), 6), draw((2, 3, 8, 8), 7)], rep, "spatial subset")
    rep.assert_ok(comm, "spatial conv, pooling, dropout on a subset vs torch")


_SAVE_OR_LOAD = """
import sys, numpy as np
import distconv as dc
from distconv import checkpoint, nn
from tests.test_placement import Block, PAIRS, WORLD
from tests.torch_ref import draw, randomize
dc.set_default_dtype(np.float64)
mode, path = sys.argv[1], sys.argv[2]
size = dc.comm.world().size
plan = PAIRS if mode == "save" else dict(WORLD, b="sample=1,ranks=1", a1="sample=1,ranks=0",
                                          a2="sample=1,ranks=0", a3="ranks=0", fc="ranks=1")
nn.manual_seed(1 if mode == "save" else 2)
m = Block(plan)
def logits(tag):
    with dc.no_grad():
        y = m.eval()(draw((3, 3, 8, 8), 8)).to_global()
    if dc.comm.world().rank == 0:
        np.save(path + "." + tag + ".npy", y)
if mode == "save":
    randomize(m, 7)
    checkpoint.save_checkpoint(path, m, meta={"ranks": size})
else:
    logits("fresh")  # the negative control: before loading
    checkpoint.load_checkpoint(path, m)
logits(mode)
"""


def test_checkpoint_saved_at_4_ranks_loads_at_2(tmp_path):
    """Saved by 4 ranks under the pairs placement, loaded by 2 ranks with branches on one
    rank each: the same logits to 1e-12 (relative); before loading they differ (negative
    control)."""
    from tests.mpi_harness import run_mpi_script
    from pathlib import Path
    root = str(Path(__file__).resolve().parent.parent)
    path = str(tmp_path / "ck.h5")
    for n, mode in ((4, "save"), (2, "load")):
        r = run_mpi_script(_SAVE_OR_LOAD, n, 120, args=[mode, path], cwd=root)
        assert r.returncode == 0, f"{mode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    a, b = np.load(path + ".save.npy"), np.load(path + ".load.npy")
    assert a.shape == (3, 3) and np.abs(a - b).max() <= 1e-12 * np.abs(a).max()
    assert np.abs(a - np.load(path + ".fresh.npy")).max() > 1e-3 * np.abs(a).max()


@mpi(ranks=(4,), timeout=300)
def test_inception_v3_towers_on_disjoint_ranks(comm):
    """Inception-v3 (small variant, 75x75, no aux logits; sample=2,filter=2 elsewhere) with
    the towers of three blocks on disjoint ranks (each block forks its input) and the
    classifier on one rank matches torchvision float64 (logits, loss, dx, every gradient,
    running statistics). The model seed is fixed (it draws the dropout mask): with other
    masks a few batch-norm weight gradients land at 1.1-2e-10, with or without the
    placements (the same net under sample=2,filter=2 alone, measured), i.e. roundoff
    of those small sums, at the edge of the 1e-10 tolerance."""
    from tests.model_ref import compare_step
    from tests.test_models_inception import K, _pair
    set_default_dtype(np.float64)
    nn.manual_seed(0)
    plan = {"": "sample=2,filter=2", "Mixed_5b.branch1x1": "sample=1,ranks=0",
            "Mixed_5b.branch5x5_1": "sample=1,ranks=1",
            "Mixed_5b.branch5x5_2": "sample=1,ranks=1",
            "Mixed_5b.branch3x3dbl_1": "sample=2,ranks=2-3",
            "Mixed_5b.branch3x3dbl_2": "sample=1,filter=2,ranks=2-3",
            "Mixed_5b.branch3x3dbl_3": "sample=2,ranks=2-3",
            "Mixed_5b.branch_pool": "sample=1,ranks=0",
            "Mixed_6a.branch3x3": "sample=2,ranks=0-1",
            "Mixed_6a.branch3x3dbl_1": "sample=1,ranks=3",
            "Mixed_6a.branch3x3dbl_2": "sample=1,ranks=3",
            "Mixed_6a.branch3x3dbl_3": "sample=1,ranks=2",
            "Mixed_7c.branch3x3_2a": "sample=1,channel=2,ranks=0-1",
            "Mixed_7c.branch3x3_2b": "sample=1,filter=2,ranks=2-3",
            "fc": "sample=1,ranks=3"}
    m, tm = _pair(False, 75, seed=6, strategy=plan)
    rng = np.random.default_rng(6)
    rep = Report()
    compare_step(m, tm, rng.standard_normal((2, 3, 75, 75)), rng.integers(0, K, 2), rep,
                 "placed towers", Strategy().activation_distribution(4))
    rep.assert_ok(comm, "Inception-v3 with placed towers vs torchvision")


@mpi(ranks=(3,), timeout=60)
def test_loader_into_a_placed_layout(comm):
    """DistLoader into ``sample=2,ranks=1-2``: the members read their blocks of the file,
    rank 0 (off the grid) reads nothing and holds a shape-only block."""
    from distconv.data import DistLoader, H5Dataset, write_h5_dataset
    set_default_dtype(np.float32)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 6)
    with mpi_tmp_path(comm) as d:
        path = str(d / "d.h5")
        if comm.rank == 0:
            write_h5_dataset(path, images, labels)
        comm.Barrier()
        with H5Dataset(path, comm=comm) as ds:
            loader = DistLoader(ds, 4, "sample=2,ranks=1-2", shuffle=False)
            x, lab = next(iter(loader))
            assert np.array_equal(lab, labels[:4])
            np.testing.assert_array_equal(to_numpy(x.to_global()), images[:4])
            assert dc.meta.is_meta(x.local) == (comm.rank == 0)
            assert (loader.bytes_read == 0) == (comm.rank == 0)
