"""The planner on models with two outputs (Inception-v3's ``(logits, aux_logits)``).

* ``trace`` reads a second output as an ``"output"`` block at the value that also feeds
  it (also inside a cat's branch): branch 0 continues to the first output, the other
  branch ends in the second and joins nothing; branches keep the model's execution
  order; a value that is computed but is no output is still refused;
* the DP returns the brute-force optimum (the aux branch's exit state free), also under
  random penalties; a DP that ties the aux branch's exit to the main path's state is
  caught by the same check (negative control);
* at 2 ranks, the predicted bytes of a plan equal ``comm.stats()`` of a real step with
  backward from both outputs, layer by layer (one predicted aux byte more is caught);
* Inception-v3 with its auxiliary classifier (small width, 299x299) under the planner's
  own plan trains one step like torchvision (logits, aux logits, loss, every gradient).
"""
import numpy as np
import pytest

from tests.mpi_harness import mpi


def _models():
    import distconv as dc
    from distconv import nn

    class TwoOut(nn.Module):
        """stem-bn-relu = h -> aux: avgpool-1x1-gap-fc (run first, as Inception runs its
        auxiliary classifier) | main: cat(1x1(h), 3x3(h)) -> gap -> fc; returns (main,
        aux). h feeds two main consumers and the aux branch."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(6)
            self.relu = nn.ReLU()
            self.aux = nn.Sequential(nn.AvgPool2d(3, stride=2), nn.Conv2d(6, 4, 1),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
            self.b1 = nn.Conv2d(6, 3, 1)
            self.b2 = nn.Conv2d(6, 5, 3, padding=1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

        def forward(self, x):
            h = self.relu(self.bn(self.stem(x)))
            a = self.aux(h)
            return self.head(dc.cat([self.b1(h), self.b2(h)])), a

    class Late(nn.Module):
        """A chain whose middle value feeds a second output computed after the first:
        conv - conv = t - conv - gap - fc (main) and t - gap - fc2 (aux)."""

        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 6, 1)
            self.c3 = nn.Conv2d(6, 5, 1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))
            self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))

        def forward(self, x):
            t = self.c2(self.c1(x))
            y = self.head(self.c3(t))
            return y, self.aux(t)

    class Nested(nn.Module):
        """The second output forks inside a cat's branch: h -> cat(1x1(h), 3x3(t = 1x1(h)))
        with t also feeding gap-fc (aux)."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.b1 = nn.Conv2d(4, 2, 1)
            self.t = nn.Conv2d(4, 3, 1)
            self.b2 = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))
            self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))

        def forward(self, x):
            h = self.stem(x)
            t = self.t(h)
            return self.head(dc.cat([self.b1(h), self.b2(t)])), self.aux(t)

    return {"twoout": (TwoOut, (5, 3, 7, 6)), "late": (Late, (4, 3, 5, 5)),
            "nested": (Nested, (3, 3, 4, 4))}


def _model(which):
    cls, shape = _models()[which]
    return cls(), shape


def _graph(which):
    from distconv.planner.graph import trace
    m, shape = _model(which)
    return trace(m, shape)


def test_second_output_is_an_output_block():
    from distconv import nn
    from distconv.planner.graph import BlockSpec, GraphError, trace
    g = _graph("twoout")
    blk = [it for it in g.items if isinstance(it, BlockSpec)]
    assert len(blk) == 1 and blk[0].op == "output" and blk[0].join is None
    b = blk[0]
    assert [x.name for x in b.branches[1]] == ["aux.0", "aux.1", "aux.2", "aux.3", "aux.4"]
    assert isinstance(b.branches[0][0], BlockSpec) and b.branches[0][0].op == "cat"
    assert b.order == (1, 0) and b.out_shape == (5, 3) == g.out_shape
    # layers in the model's execution order: the aux branch first
    assert [x.name for x in g.layers()][3:6] == ["aux.0", "aux.1", "aux.2"]
    m, _ = _model("twoout")
    assert g.strategic_names() == [n for n, x in m.named_modules()
                                   if isinstance(x, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    nested = _graph("nested")  # the output block sits inside the cat's second branch
    cat = nested.items[1]
    assert cat.op == "cat" and [type(x).__name__ for x in cat.branches[1]] == [
        "LayerSpec", "BlockSpec"] and cat.branches[1][1].op == "output"
    late = _graph("late")
    assert [type(x).__name__ for x in late.items] == ["LayerSpec", "LayerSpec", "BlockSpec"]
    assert late.items[2].order == () and late.items[2].in_shape == (4, 6, 5, 5)

    class Dead(nn.Module):
        """Computes a value that is neither used nor returned: still refused."""

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 2, 1)
            self.dead = nn.Conv2d(2, 2, 1)
            self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))

        def forward(self, x):
            a = self.a(x)
            self.dead(a)
            return self.fc(a)

    with pytest.raises(GraphError, match=r"'dead'.*never used"):
        trace(Dead(), (2, 3, 4, 4))


def _pinned_exit(monkeypatch):
    """A wrong DP: the aux branch must end in the main path's state (its free exit
    matrix, each row the aux loss of that exit state whatever the column, keeps its
    diagonal and becomes inf elsewhere)."""
    from distconv.planner import search
    orig = search._Seq.then

    def then(self, M):
        if len(M) > 1 and np.all(M == M[:, :1]):
            M = np.where(np.eye(len(M), dtype=bool), M, np.inf)
        return orig(self, M)
    monkeypatch.setattr(search._Seq, "then", then)


@pytest.mark.parametrize("which,p", [("twoout", 3), ("late", 4), ("nested", 3)])
def test_dp_equals_brute_force(monkeypatch, which, p):
    from distconv.planner.search import Planner
    from tests.test_planner_dag import _check_plan, _cost, _perturb, assert_optimal
    g = _graph(which)
    cost = _cost(g, p)
    plan, value = Planner(cost).run()
    _check_plan(g, plan, p)
    assert_optimal(cost, plan, value)
    _perturb(monkeypatch, 3e-3, p)
    cost = _cost(g, p)
    plan, value = Planner(cost).run()
    assert_optimal(cost, plan, value)
    assert len(set(plan.values())) > 1


def test_dp_with_the_aux_exit_pinned_is_caught(monkeypatch):
    """Negative control: brute force rejects the plan of a DP that ties the aux branch's
    exit to the main path's state, for some penalties."""
    from distconv.planner.search import Planner
    from distconv.planner.simulate import additive_time
    from tests.test_planner_dag import _cost, _perturb, assert_optimal
    caught = []
    for which, p, seed in [("twoout", 2, 1), ("twoout", 3, 2), ("late", 4, 3),
                           ("late", 2, 4)]:
        with monkeypatch.context() as mp:
            _perturb(mp, 3e-3, seed)
            cost = _cost(_graph(which), p)
            with mp.context() as wrong:
                _pinned_exit(wrong)
                plan, _ = Planner(cost).run()
            try:
                assert_optimal(cost, plan, additive_time(cost, plan))
            except AssertionError:
                caught.append((which, p))
    assert caught, "the pinned DP matched brute force everywhere: the control proves nothing"


def _run_and_compare(comm, which, plan, perturb=None):
    """One real step (forward, backward from both outputs, sync_gradients) under the
    Profiler: per layer and kind the bytes ``comm.stats()`` recorded equal ``graph_events``
    (joins and gradient sync as the outside total)."""
    import distconv as dc
    from distconv import DistTensor, autograd, sync_gradients
    from distconv.planner.events import act_dist, graph_events
    from distconv.profile import OUTSIDE, Profiler
    from tests.test_planner_comm import kinds_of, measured_kinds, nonzero
    graph = _graph(which)
    dc.manual_seed(0)
    m, shape = _model(which)
    m.set_strategy({k: dc.Strategy(*v) for k, v in plan.items()})
    rng = np.random.default_rng(1)
    first = graph.strategic_names()[0]
    x = DistTensor.from_global(rng.standard_normal(shape),
                               dc.Strategy(*plan[first]).activation_distribution(4))
    assert act_dist(tuple(plan[first])).split == x.distribution.split
    x.requires_grad = True
    prof = Profiler(m)
    prof.step_begin()
    ys = m(x)
    autograd.backward(list(ys), [DistTensor.from_global(rng.standard_normal(y.shape),
                                                        y.distribution) for y in ys])
    sync_gradients(m.parameters())
    step = prof.step_end()
    prof.remove()
    pred = graph_events(graph, plan, comm.rank, item=8)
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


def _plans(which, p):
    from distconv.planner.costs import factorizations
    names = _graph(which).strategic_names()
    fs = factorizations(p)
    rng = np.random.default_rng(7)
    return [{n: fs[rng.integers(len(fs))] for n in names} for _ in range(2)]


@mpi(ranks=(2,), timeout=120)
def test_predicted_bytes_equal_measured(comm):
    import distconv as dc
    from distconv.shapecomm import Event
    dc.set_default_dtype(np.float64)
    for which in ("twoout", "late", "nested"):
        for plan in _plans(which, comm.size):
            _run_and_compare(comm, which, plan)
    # negative control: one aux layer predicted with one more allgather of 8 bytes
    plan = _plans("twoout", comm.size)[0]

    def perturb(pred):
        pred["aux.4"]["forward"].append(Event("allgather", (0, 1), 8, 8))
    with pytest.raises(AssertionError, match=r"aux\.4: measured"):
        _run_and_compare(comm, "twoout", plan, perturb)


@mpi(ranks=(2,), timeout=240)
def test_inception_with_aux_under_the_planners_plan_matches_torchvision(comm):
    """Inception-v3 with its auxiliary classifier (channels / 16, 299x299, training mode)
    under the planner's plan (fitted compute, so every rank finds the same plan) trains one
    step like torchvision: logits, aux logits, CE + 0.4 CE_aux, every gradient."""
    import distconv as dc
    from distconv.strategy import Strategy
    from tests.model_ref import compare_step
    from tests.test_models_inception import K, _pair
    from tests.torch_ref import Report

    dc.set_default_dtype(np.float64)
    m, tm = _pair(True, 299, seed=6)
    res = dc.planner.plan_model(m, (2, 3, 299, 299), comm.size, min_gain=0.0)
    aux = {k: v for k, v in res["plan"].items() if k.startswith("AuxLogits")}
    assert len(aux) == 5 and len(res["plan"]) > 95
    m.set_strategy({k: dc.Strategy(*v) for k, v in res["plan"].items()})
    rng = np.random.default_rng(5)
    rep = Report()
    out = compare_step(m, tm, rng.standard_normal((2, 3, 299, 299)), rng.integers(0, K, 2),
                       rep, f"planner plan ({res['chosen']})",
                       Strategy().activation_distribution(4))
    rep.expect("two outputs", type(out).__name__ == "InceptionOutputs")
    rep.assert_ok(comm)
