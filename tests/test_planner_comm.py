"""The planner's byte model (distconv.planner.events / commmodel) against real runs.

For small ResNets and a Sequential with a spatial Flatten, at 1-4 ranks with shapes
that do not divide evenly, under every uniform strategy and several random per-layer
plans, one training step (forward, backward, ``sync_gradients``) is run under the
Profiler; per layer, per collective kind and per rank, the bytes sent and received that
``comm.stats()`` recorded must equal the model's prediction exactly. Joins and the
gradient sync run outside the layers and are compared as the ``"(outside)"`` total.
"""
import itertools

import numpy as np
import pytest

from tests.mpi_harness import mpi


def factorizations(p):
    return [(s, c, p // (s * c)) for s in range(1, p + 1) for c in range(1, p + 1)
            if p % (s * c) == 0]


def build(which, plan):
    import distconv as dc
    from distconv import nn
    from distconv.models.resnet import BasicBlock, Bottleneck, ResNet
    dc.manual_seed(0)
    if which == "basic":
        m = ResNet(BasicBlock, [1, 1], num_classes=7, in_channels=3, stem="cifar",
                   base_width=6)
        shape = (5, 3, 7, 7)
    elif which == "bottleneck":
        m = ResNet(Bottleneck, [1], num_classes=5, in_channels=3, stem="cifar", base_width=3)
        shape = (3, 3, 5, 5)
    elif which == "user":
        m = _UserNet()
        shape = (5, 3, 7, 5)
    elif which == "spatial":  # odd H and W, a strided conv, pools on split H/W
        m = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 6, 3, stride=2, padding=1),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
        shape = (3, 3, 13, 11)
    else:
        m = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 3 * 3, 6))
        shape = (7, 3, 6, 6)
    m.set_strategy({k: dc.Strategy(*v) for k, v in plan.items()})
    return m, shape


def _user_net_class():
    from distconv import nn

    class UserNet(nn.Module):
        """A model the planner knows nothing about: an nn.Residual with a conv shortcut, and
        a hand-written ``f(x) + x`` with no ReLU after the add."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(6)
            self.relu = nn.ReLU()
            self.res = nn.Residual(nn.Sequential(nn.Conv2d(6, 4, 3, stride=2, padding=1),
                                                 nn.ReLU(), nn.Conv2d(4, 4, 1)),
                                   nn.Sequential(nn.Conv2d(6, 4, 1, stride=2, bias=False),
                                                 nn.BatchNorm2d(4)))
            self.f = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flat = nn.Flatten()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            h = self.res(self.relu(self.bn1(self.conv1(x))))
            h = self.f(h) + h
            return self.fc(self.flat(self.pool(h)))

    return UserNet


def _UserNet():
    return _user_net_class()()


def kinds_of(events):
    out = {}
    for e in events:
        d = out.setdefault(e.kind, [0, 0])
        d[0] += e.sent
        d[1] += e.recv
    return out


def measured_kinds(rec):
    return {k: [v["bytes_sent"], v["bytes_recv"]] for k, v in rec.items()
            if v["bytes_sent"] or v["bytes_recv"]}


def nonzero(d):
    return {k: v for k, v in d.items() if v[0] or v[1]}


def spatial_factorizations(p):
    return [(s, 1, 1, h, w) for s in range(1, p + 1) for h in range(1, p + 1)
            for w in range(1, p + 1) if s * h * w == p and h * w > 1]


def plans_for(graph, p, nrandom=3, spatial=False):
    """Every uniform plan and ``nrandom`` random mixes; ``spatial``: the uniform plans
    split H and W (the linear layers, which cannot, take sample=p), and the mixes draw
    from both kinds of strategies."""
    names = graph.strategic_names()
    fs = factorizations(p)
    if spatial:
        kinds = {lay.name: lay.kind for lay in graph.layers()}
        sp = spatial_factorizations(p)
        plans = [{n: (f if kinds[n] != "linear" else (p, 1, 1)) for n in names} for f in sp]
        rng = np.random.default_rng(p)
        for _ in range(nrandom if sp else 0):
            plans.append({n: (fs + sp)[rng.integers(len(fs) + len(sp))]
                          if kinds[n] != "linear" else fs[rng.integers(len(fs))]
                          for n in names})
        return plans
    plans = [{n: f for n in names} for f in fs]
    rng = np.random.default_rng(p)
    for _ in range(nrandom if len(fs) > 1 else 0):
        plans.append({n: fs[rng.integers(len(fs))] for n in names})
    return plans


def run_and_compare(comm, which, plan_index, perturb=None):
    from distconv import DistTensor, sync_gradients
    from distconv.comm import world
    from distconv.planner.events import graph_events
    from distconv.planner.graph import trace
    from distconv.profile import OUTSIDE, Profiler
    p = comm.size
    m0, shape = build(which, {})
    graph = trace(m0, shape)
    plans = plans_for(graph, p, spatial=which == "spatial")
    if plan_index >= len(plans):
        return  # fewer plans at this rank count
    plan = plans[plan_index]
    m, shape = build(which, plan)
    rng = np.random.default_rng(1)
    first = m.conv1 if hasattr(m, "conv1") else m[0]
    x = DistTensor.from_global(rng.standard_normal(shape), first.input_distribution)
    prof = Profiler(m)
    prof.step_begin()
    y = m(x)
    dy = DistTensor.from_global(rng.standard_normal(y.shape), y.distribution)
    m.backward(dy)
    sync_gradients(m.parameters())
    step = prof.step_end()
    prof.remove()
    model = graph_events(graph, plan, world().rank, item=8)
    if perturb is not None:
        perturb(model)
    bad = []
    outside = {}
    for name, ev in model.items():
        if name == "(joins)":
            for e in ev["forward"] + ev["backward"]:
                outside.setdefault(e.kind, [0, 0])
                outside[e.kind][0] += e.sent
                outside[e.kind][1] += e.recv
            continue
        want = nonzero(kinds_of(ev["forward"] + ev["backward"]))
        for k, v in nonzero(kinds_of(ev["sync"])).items():
            outside.setdefault(k, [0, 0])
            outside[k][0] += v[0]
            outside[k][1] += v[1]
        got = measured_kinds(step["layers"].get(name, {"kinds": {}})["kinds"])
        if got != want:
            bad.append(f"{name}: measured {got}, model {want}")
    got_out = measured_kinds(step["outside"])
    if got_out != nonzero(outside):
        bad.append(f"{OUTSIDE}: measured {got_out}, model {nonzero(outside)}")
    assert not bad, f"rank {comm.rank}, plan {plan}:\n" + "\n".join(bad)


@pytest.mark.parametrize("plan_index", range(9))
@pytest.mark.parametrize("which", ["basic", "bottleneck", "flatten", "user"])
@mpi(ranks=(1, 2, 3, 4), timeout=120)
def test_model_bytes_equal_measured(comm, which, plan_index):
    import distconv as dc
    dc.set_default_dtype(np.float64)
    run_and_compare(comm, which, plan_index)


@pytest.mark.parametrize("plan_index", range(7))
@mpi(ranks=(2, 3, 4), timeout=180)
def test_spatial_plan_bytes_equal_measured(comm, plan_index):
    """Splits of H and W (halo exchanges and their adjoints, statistics over
    sample x height x width, the moves into and out of them): priced by running the layers
    shape-only, equal to what the real step sends."""
    import distconv as dc
    dc.set_default_dtype(np.float64)
    run_and_compare(comm, "spatial", plan_index)


@mpi(ranks=(2,), timeout=60)
def test_negative_control_a_missing_halo_is_caught(comm):
    import distconv as dc
    dc.set_default_dtype(np.float64)

    def perturb(model):  # drop the first conv's halo exchange from the model
        ev = model["0"]["forward"]
        ev[:] = [e for e in ev if e.kind != "halo"]

    with pytest.raises(AssertionError, match="0: measured"):
        run_and_compare(comm, "spatial", 0, perturb)  # plan 0: height=2 (or width=2)


@mpi(ranks=(2,), timeout=60)
def test_negative_control_detects_one_byte(comm):
    """The comparison fails when the model is off by one element on one layer."""
    import distconv as dc
    from distconv.planner.commmodel import Event
    dc.set_default_dtype(np.float64)

    def perturb(model):
        ev = model["layer1.0.conv1"]["backward"]
        ev.append(Event("allgather", (0, 1), 8, 8))

    with pytest.raises(AssertionError, match="layer1.0.conv1"):
        run_and_compare(comm, "basic", 2, perturb)  # plan 2: channel=2 everywhere


def test_vgrid_groups_match_process_grid_rule():
    from distconv.planner.commmodel import VGrid
    g = VGrid((2, 3, 2))
    # ranks sharing sample and filter coordinates, ordered by channel coordinate
    assert g.group(("channel",), 0) == (0, 2, 4)
    assert g.group(("sample",), 5) == (5, 11)
    assert g.group(("channel", "filter"), 7) == (6, 7, 8, 9, 10, 11)
    assert g.group((), 3) == (3,)
    for r in range(12):
        assert g.rank_of(g.coords_of(r)) == r


def test_factorizations():
    assert sorted(factorizations(4)) == sorted(
        [t for t in itertools.product(range(1, 5), repeat=3) if np.prod(t) == 4])
