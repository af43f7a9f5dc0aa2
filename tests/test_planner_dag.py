"""The planner on series-parallel graphs: Inception-style forks joined by ``dc.cat``.

* ``trace`` reads forks of 2-4 branches (uneven channels, a nested fork, the identity, a
  pool branch) and leaves the Graph of every ResNet exactly as the code before it traced
  it (``tests/data/planner_graph_resnets.json``, written by that code);
* the DP (node and edge elimination) returns the brute-force optimum of the additive
  cost and its value, also under random penalties on every layer, join and cat share; a
  DP that ignores the moves into the cat is caught by the same check (negative control);
* a cat's per-branch shares, priced by running ``tensor.exchange`` shape-only, add up to
  the bytes of the real ``dc.cat`` (forward and backward, run shape-only) on every rank;
* ``plan_model`` plans such a model; at 2 ranks the predicted bytes of a plan equal
  ``comm.stats()`` of a real step, layer by layer and rank by rank.
"""
import dataclasses
import json
import os
import random

import numpy as np
import pytest

from tests.mpi_harness import mpi

REL = 1e-12


# ------------------------------------------------------------------------ models
def _models():
    import distconv as dc
    from distconv import nn

    class Inc(nn.Module):
        """stem-bn-relu -> 4 towers (1x1 | 1x1-relu-3x3 | 1x1 -> (1x3 | 3x1) -> cat |
        3x3 avgpool) -> cat (3 + 5 + 5 + 6 = 19 channels) -> gap -> flatten -> fc."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(6)
            self.relu = nn.ReLU()
            self.b1 = nn.Conv2d(6, 3, 1)
            self.b2 = nn.Sequential(nn.Conv2d(6, 4, 1), nn.ReLU(),
                                    nn.Conv2d(4, 5, 3, padding=1))
            self.b3 = nn.Conv2d(6, 4, 1)
            self.b3a = nn.Conv2d(4, 3, (1, 3), padding=(0, 1))
            self.b3b = nn.Conv2d(4, 2, (3, 1), padding=(1, 0))
            self.pool = nn.AvgPool2d(3, stride=1, padding=1)
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.flat = nn.Flatten()
            self.fc = nn.Linear(19, 5)

        def forward(self, x):
            h = self.relu(self.bn(self.stem(x)))
            t = self.b3(h)
            y = dc.cat([self.b1(h), self.b2(h), dc.cat([self.b3a(t), self.b3b(t)]),
                        self.pool(h)])
            return self.fc(self.flat(self.gap(y)))

    class Small(nn.Module):
        """stem -> 3 towers (1x1 | 3x3 -> cat(identity, 1x1) | maxpool) -> cat (2 + 6 + 5)
        -> gap -> flatten -> fc: 5 strategic layers, a nested fork with the identity."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 5, 3, padding=1)
            self.b1 = nn.Conv2d(5, 2, 1)
            self.b2 = nn.Conv2d(5, 3, 3, padding=1, bias=False)
            self.b2a = nn.Conv2d(3, 3, 1)
            self.pool = nn.MaxPool2d(3, stride=1, padding=1)
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.flat = nn.Flatten()
            self.fc = nn.Linear(13, 4)

        def forward(self, x):
            h = self.stem(x)
            t = self.b2(h)
            y = dc.cat([self.b1(h), dc.cat([t, self.b2a(t)]), self.pool(h)])
            return self.fc(self.flat(self.gap(y)))

    class IdFirst(nn.Module):
        """stem -> cat([x, 1x1(x), 3x3(x)]) (the identity is the first input: the output
        lies as the fork's input) -> 1x1 -> gap -> flatten -> fc."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 5, 3, padding=1)
            self.a = nn.Conv2d(5, 2, 1)
            self.b = nn.Conv2d(5, 3, 3, padding=1, bias=False)
            self.mix = nn.Conv2d(10, 4, 1)
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.flat = nn.Flatten()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.stem(x)
            return self.fc(self.flat(self.gap(self.mix(dc.cat([h, self.a(h), self.b(h)])))))

    class CatFirst(nn.Module):
        """The graph starts with a fork: cat([maxpool(x), 1x1(x), 3x3(x)]) -> gap -> fc. The
        input is placed where the first strategic layer (in branch 1) computes."""

        def __init__(self):
            super().__init__()
            self.p = nn.MaxPool2d(3, stride=1, padding=1)
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 2, 3, padding=1)
            self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(9, 2))

        def forward(self, x):
            return self.fc(dc.cat([self.p(x), self.a(x), self.b(x)]))

    class IncFork(Inc):
        """Inc with its input forked to the towers (``dc.fork``), as placed towers need."""

        def forward(self, x):
            h = self.relu(self.bn(self.stem(x)))
            x1, x2, x3, xp = dc.fork(h, [self.b1, self.b2, self.b3, h.distribution])
            t = self.b3(x3)
            y = dc.cat([self.b1(x1), self.b2(x2), dc.cat([self.b3a(t), self.b3b(t)]),
                        self.pool(xp)])
            return self.fc(self.flat(self.gap(y)))

    return {"inc": (Inc, (5, 3, 7, 6)), "incfork": (IncFork, (5, 3, 7, 6)),
            "small": (Small, (5, 3, 5, 7)),
            "idfirst": (IdFirst, (4, 3, 5, 5)), "catfirst": (CatFirst, (5, 3, 5, 5))}


def model(which):
    cls, shape = _models()[which]
    return cls(), shape


def graph_of(which):
    from distconv.planner.graph import trace
    m, shape = model(which)
    return trace(m, shape)


# ------------------------------------------------------------------------ the graph
def test_inception_graph_is_read_as_nested_forks():
    from distconv.planner.graph import BlockSpec
    g = graph_of("inc")
    assert [type(x).__name__ for x in g.items] == ["LayerSpec"] * 3 + ["BlockSpec"] + \
        ["LayerSpec"] * 3
    blk = g.items[3]
    assert blk.op == "cat" and blk.join is None and len(blk.branches) == 4
    assert [[x.name if not isinstance(x, BlockSpec) else "block" for x in br]
            for br in blk.branches] == [
        ["b1"], ["b2.0", "b2.1", "b2.2"], ["b3", "block"], ["pool"]]
    inner = blk.branches[2][1]
    assert isinstance(inner, BlockSpec) and inner.op == "cat"
    assert [[x.name for x in br] for br in inner.branches] == [["b3a"], ["b3b"]]
    assert inner.out_shape == (5, 5, 7, 6) and inner.offsets() == [0, 3]
    assert blk.out_shape == (5, 19, 7, 6) and blk.offsets() == [0, 3, 8, 13]
    assert g.strategic_names() == ["stem", "bn", "b1", "b2.0", "b2.2", "b3", "b3a", "b3b",
                                   "fc"]
    idf = graph_of("idfirst").items[1]
    assert idf.branches[0] == [] and idf.branch_shapes()[0] == idf.in_shape
    assert idf.offsets() == [0, 5, 7] and idf.out_shape == (4, 10, 5, 5)


def _lay(x):
    return {"name": x.name, "kind": x.kind, "in": list(x.in_shape), "out": list(x.out_shape),
            "attrs": {k: (list(v) if isinstance(v, tuple) else v)
                      for k, v in sorted(x.attrs.items())}}


def _item(it):
    from distconv.planner.graph import BlockSpec
    if isinstance(it, BlockSpec):
        assert it.op == "add" and len(it.branches) == 2
        return {"block": it.name, "body": [_lay(x) for x in it.body],
                "shortcut": [_lay(x) for x in it.shortcut],
                "join": None if it.join is None else _lay(it.join),
                "in": list(it.in_shape), "out": list(it.out_shape)}
    return _lay(it)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "small_resnet"])
def test_resnet_graphs_are_unchanged(name):
    """Names, kinds, shapes, attributes and block structure equal what ``trace`` returned
    before forks of n branches existed (the snapshot was written by that code)."""
    import distconv as dc
    from distconv import models
    from distconv.planner.graph import trace
    dc.set_default_dtype(np.float32)
    with open(os.path.join(os.path.dirname(__file__), "data",
                           "planner_graph_resnets.json")) as f:
        want = json.load(f)[name]
    g = trace(getattr(models, name)(), want["in"])
    got = {"in": list(g.in_shape), "items": [_item(x) for x in g.items]}
    assert got == want


# ------------------------------------------------------------------------ DP vs brute force
def _cost(graph, p, mach=None):
    from tests.test_planner_search import MID, compute
    from distconv.planner.costs import CostModel
    return CostModel(graph, p, mach or MID, compute())


def assert_optimal(cost, plan, value):
    from distconv.planner.search import brute_force
    from distconv.planner.simulate import additive_time
    bplan, best = brute_force(cost)
    assert abs(additive_time(cost, plan) - value) <= REL * abs(value), \
        (additive_time(cost, plan), value)
    assert abs(value - best) <= REL * best, (value, best, (value - best) / best)
    return bplan


def _check_plan(graph, plan, p):
    from distconv.planner.costs import factorizations
    assert set(plan) == set(graph.strategic_names())
    assert all(tuple(st) in set(factorizations(p)) for st in plan.values())


DP_CASES = [("inc", 2), ("inc", 3), ("small", 2), ("small", 3), ("small", 4),
            ("idfirst", 2), ("idfirst", 3), ("idfirst", 4), ("catfirst", 2), ("catfirst", 4)]


@pytest.mark.parametrize("which,p", DP_CASES)
def test_dp_equals_brute_force(which, p):
    from distconv.planner.search import Planner, search
    from tests.test_planner_search import SLOW_INTER
    g = graph_of(which)
    for mach in (None, SLOW_INTER):
        cost = _cost(g, p, mach)
        plan, value = Planner(cost).run()
        _check_plan(g, plan, p)
        assert_optimal(cost, plan, value)
        res = search(cost)
        assert res["plan"] == plan and abs(res["time"] - value) <= REL * value


def _perturb(monkeypatch, scale, seed):
    """Random penalties (of the order of a layer's cost) on every strategic layer under
    every (strategy, input layout), every residual join and every cat share: arbitrary
    matrices for the DP, the same numbers for brute force."""
    from distconv.planner.costs import CostModel
    rng = random.Random(seed)
    pen = {}
    orig_layer, orig_cat = CostModel.layer, CostModel.cat_part

    def bump(c, key):
        if key not in pen:
            pen[key] = rng.random() * scale
        return dataclasses.replace(c, compute_fwd=c.compute_fwd + pen[key])

    # keyed as the planner's matrix cache keys them: layers (and cat shares) of equal
    # signature are one entry there
    def layer(self, lay, st, in_dist):
        c = orig_layer(self, lay, st, in_dist)
        sig = (lay.kind, lay.in_shape, lay.out_shape, tuple(sorted(lay.attrs.items())))
        return bump(c, (sig, st, in_dist)) if lay.strategic else c

    def cat_part(self, block, i, src, first):
        key = ("cat", block.branch_shapes()[i], block.offsets()[i], block.out_shape, i == 0,
               src, first)
        return bump(orig_cat(self, block, i, src, first), key)

    monkeypatch.setattr(CostModel, "layer", layer)
    monkeypatch.delattr(CostModel, "layer_table", raising=False)
    monkeypatch.setattr(CostModel, "cat_part", cat_part)


@pytest.mark.parametrize("which,p,seed", [("inc", 2, 1), ("inc", 3, 2), ("small", 4, 3),
                                          ("small", 3, 4), ("idfirst", 4, 5),
                                          ("catfirst", 4, 6)])
def test_random_penalties_dp_still_equals_brute_force(monkeypatch, which, p, seed):
    from distconv.planner.search import Planner
    g = graph_of(which)
    plan0, _ = Planner(_cost(g, p)).run()
    _perturb(monkeypatch, 3e-3, seed)
    cost = _cost(g, p)
    plan, value = Planner(cost).run()
    _check_plan(g, plan, p)
    assert_optimal(cost, plan, value)
    assert plan != plan0 and len(set(plan.values())) > 1  # a mixed plan, moved


def test_dp_blind_to_the_cat_moves_is_caught(monkeypatch):
    """Negative control: a DP that prices no move into a cat (each branch ends where it is
    cheapest for itself) returns plans that the brute-force check rejects."""
    from distconv.planner.search import Planner
    from distconv.planner.simulate import additive_time
    caught = []
    for which, p, seed in [("inc", 2, 1), ("small", 3, 4), ("small", 4, 3),
                           ("idfirst", 4, 5)]:
        with monkeypatch.context() as mp:
            _perturb(mp, 3e-3, seed)
            g = graph_of(which)
            cost = _cost(g, p)
            with mp.context() as blind:
                orig = Planner._cat_matrix

                def no_moves(self, block, i, idists, fdists):
                    M = orig(self, block, i, idists, fdists)
                    return np.where(np.isfinite(M), 0.0, M) if i else M

                blind.setattr(Planner, "_cat_matrix", no_moves)
                plan, _ = Planner(cost).run()
            value = additive_time(cost, plan)
            try:
                assert_optimal(cost, plan, value)
            except AssertionError:
                caught.append((which, p))
    assert caught, "the blind DP matched brute force everywhere: the control proves nothing"


# ------------------------------------------------------------------------ cat pricing
def _act(st, grid, ndim=4):
    from distconv.distribution import Distribution
    return Distribution(grid, [("sample",), ("channel", "filter")] + [None] * (ndim - 2))


@pytest.mark.parametrize("p", [2, 3, 4, 6])
def test_cat_shares_add_up_to_the_real_cat(p):
    """Per rank and per kind, the bytes of the branches' shares (cat_events) equal those
    of ``dc.cat`` of all branches and of its backward, run shape-only."""
    from distconv.comm import use_world
    from distconv.distribution import Distribution
    from distconv.functional import cat
    from distconv.grid import ProcessGrid
    from distconv.meta import MetaArray
    from distconv.planner.commmodel import VGrid, cat_events
    from distconv.planner.costs import factorizations
    from distconv.shapecomm import ShapeComm
    from distconv.tensor import DistTensor
    rng = random.Random(p)
    fs = factorizations(p)
    for trial in range(4):
        chans = [rng.randint(1, 7) for _ in range(rng.randint(2, 4))]
        n, h, w = rng.randint(1, 6), rng.randint(1, 4), rng.randint(1, 3)
        sts = [fs[rng.randrange(len(fs))] for _ in chans]
        shapes = [(n, c, h, w) for c in chans]
        out_shape = (n, sum(chans), h, w)
        offs = list(np.cumsum([0] + chans[:-1]))
        vd = [_act(st, VGrid(st)) for st in sts]
        for r in range(p):
            want_f, want_b = {}, {}
            for i, (sh, off, d) in enumerate(zip(shapes, offs, vd)):
                f, b = cat_events(sh, off, out_shape, d, Distribution(vd[0].grid,
                                                                      vd[0].split), p, r, 8)
                for evs, acc in ((f, want_f), (b, want_b)):
                    for e in evs:
                        s, v = acc.get(e.kind, (0, 0))
                        acc[e.kind] = (s + e.sent, v + e.recv)
            world = ShapeComm(p, r)
            with use_world(world):
                ts = []
                for st, sh in zip(sts, shapes):
                    d = _act(st, ProcessGrid(world, st, ("sample", "channel", "filter")))
                    t = DistTensor(MetaArray(d.local_shape(sh), "float64"), d, sh)
                    t.requires_grad = True
                    ts.append(t)
                y = cat(ts)
                k = len(world.events)
                y.backward(DistTensor(MetaArray(y.distribution.local_shape(y.shape),
                                                "float64"), y.distribution, y.shape))
            got_f, got_b = {}, {}
            for evs, acc in ((world.events[:k], got_f), (world.events[k:], got_b)):
                for e in evs:
                    s, v = acc.get(e.kind, (0, 0))
                    acc[e.kind] = (s + e.sent, v + e.recv)
            assert (got_f, got_b) == (want_f, want_b), (p, trial, r, sts, chans)


@pytest.mark.parametrize("p", [4, 32])
def test_cat_share_cost_depends_only_on_layouts(p):
    """The cache (by physical layout; beyond 16 ranks, where rank 0 alone is evaluated, by
    rank 0's blocks) returns what a fresh cost model computes for that very pair."""
    from distconv.planner.events import act_dist
    g = graph_of("inc")
    blk = g.items[3]
    shared = _cost(g, p)
    for i in range(4):
        for a in shared.strategies:
            for b in shared.strategies:
                got = shared.cat_part(blk, i, act_dist(a), act_dist(b))
                want = _cost(g, p).cat_part(blk, i, act_dist(a), act_dist(b))
                assert (got.time, got.bytes, got.compute_fwd) == \
                    (want.time, want.bytes, want.compute_fwd)


# ------------------------------------------------------------------------ plan_model
def test_plan_model_plans_an_inception_model():
    import distconv as dc
    from tests.test_planner_search import MID
    m, shape = model("inc")
    out = dc.planner.plan_model(m, shape, 4, machine=MID)
    g = out["graph"]
    assert set(out["plan"]) == set(g.strategic_names())
    rows = out["predicted"]["layers"]
    assert [r["name"] for r in rows if r["kind"] == "cat"] == [
        "(cat 0)", "(cat 1)", "(cat 0)", "(cat 1)", "(cat 2)", "(cat 3)"]
    assert out["predicted"]["step_s"] > 0 and out["predicted"]["memory"] > 0
    assert set(out["fastest_plan"]) == set(g.strategic_names())


# ------------------------------------------------------------------------ real bytes (MPI)
def _plans(graph, p):
    from distconv.planner.costs import factorizations
    names = graph.strategic_names()
    fs = factorizations(p)
    rng = np.random.default_rng(p)
    return [{n: f for n in names} for f in fs] + [
        {n: fs[rng.integers(len(fs))] for n in names} for _ in range(4)]


def run_and_compare(comm, which, plan_index, perturb=None, plan=None):
    """One real training step (forward, backward, sync_gradients) under the Profiler:
    per layer, kind and rank, the bytes ``comm.stats()`` recorded equal the planner's
    (``graph_events``); the joins (a fork's moves, cat shares) and gradient sync are
    compared as the outside total. ``plan``: this plan instead of ``_plans``'s."""
    import distconv as dc
    from distconv import DistTensor, sync_gradients
    from distconv.comm import world
    from distconv.planner.events import act_dist, graph_events
    from distconv.planner.strategies import to_strategy
    from distconv.profile import OUTSIDE, Profiler
    from tests.test_planner_comm import kinds_of, measured_kinds, nonzero
    graph = graph_of(which)
    if plan is None:
        plan = _plans(graph, comm.size)[plan_index]
    dc.manual_seed(0)
    m, shape = model(which)
    m.set_strategy({k: to_strategy(v) for k, v in plan.items()})
    rng = np.random.default_rng(1)
    first = graph.strategic_names()[0]
    x = DistTensor.from_global(rng.standard_normal(shape),
                               to_strategy(plan[first]).activation_distribution(4))
    assert act_dist(plan[first]).split == x.distribution.split
    x.requires_grad = True  # the planner prices the input gradient of the first layer
    prof = Profiler(m)
    prof.step_begin()
    y = m(x)
    y.backward(DistTensor.from_global(rng.standard_normal(y.shape), y.distribution))
    sync_gradients(m.parameters())
    step = prof.step_end()
    prof.remove()
    pred = graph_events(graph, plan, world().rank, item=8)
    if perturb is not None:
        perturb(pred)
    bad, outside = [], {}
    for name, ev in pred.items():
        if name == "(joins)":
            for e in ev["forward"] + ev["backward"]:
                o = outside.setdefault(e.kind, [0, 0])
                o[0] += e.sent
                o[1] += e.recv
            continue
        for k, v in nonzero(kinds_of(ev["sync"])).items():
            o = outside.setdefault(k, [0, 0])
            o[0] += v[0]
            o[1] += v[1]
        want = nonzero(kinds_of(ev["forward"] + ev["backward"]))
        got = measured_kinds(step["layers"].get(name, {"kinds": {}})["kinds"])
        if got != want:
            bad.append(f"{name}: measured {got}, model {want}")
    got_out = measured_kinds(step["outside"])
    if got_out != nonzero(outside):
        bad.append(f"{OUTSIDE}: measured {got_out}, model {nonzero(outside)}")
    assert not bad, f"rank {comm.rank}, plan {plan}:\n" + "\n".join(bad)


@pytest.mark.parametrize("plan_index", range(7))
@pytest.mark.parametrize("which", ["inc", "small", "idfirst", "catfirst"])
@mpi(ranks=(2, 3, 4), timeout=180)
def test_predicted_bytes_equal_measured(comm, which, plan_index):
    import distconv as dc
    dc.set_default_dtype(np.float64)
    run_and_compare(comm, which, plan_index)


@mpi(ranks=(2,), timeout=60)
def test_negative_control_one_cat_byte(comm):
    """The comparison fails when one cat share is off by one element."""
    import distconv as dc
    from distconv.shapecomm import Event
    dc.set_default_dtype(np.float64)

    def perturb(pred):
        pred["(joins)"]["forward"].append(Event("alltoall", (0, 1), 8, 8))

    with pytest.raises(AssertionError, match="outside"):
        run_and_compare(comm, "inc", 3, perturb)  # plan 3: a mixed plan
