"""The planner with operator placement: forks whose branches run at the same time on
disjoint contiguous halves and quarters of the ranks.

* the DP with placement returns the brute-force optimum over every plan and every
  placement of each cat block's branches (``brute_force(placement=True)``), and its value
  is the additive time ``walk`` gives its plan (parallel branches cost their slowest);
  a DP that adds the parallel branches instead is caught (negative control);
* the bytes the planner predicts for a placed plan (``dc.fork``'s moves onto the branches'
  ranks, each placed layer's collectives on its own ranks, the cat off them) equal
  ``comm.stats()`` of a real training step, layer by layer and rank by rank, at 2 and 4
  ranks; a plan placed one rank off is caught;
* ``plan_model(placement=True)`` and plan files carry placed strategies.
"""
import numpy as np
import pytest

from tests.mpi_harness import mpi
from tests.test_planner_dag import _cost, graph_of, run_and_compare

REL = 1e-12


def _placed_models():
    import distconv as dc
    from distconv import nn

    class Two(nn.Module):
        """stem -> fork -> (3x3 | 1x1) -> cat -> gap -> fc: two towers."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1)
            self.a = nn.Conv2d(6, 7, 3, padding=1)
            self.b = nn.Conv2d(6, 5, 1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 3))

        def forward(self, x):
            h = self.stem(x)
            xa, xb = dc.fork(h, [self.a, self.b])
            return self.head(dc.cat([self.a(xa), self.b(xb)]))

    return {"two": (Two, (6, 3, 9, 8))}


def _graph(which):
    from distconv.planner.graph import trace
    cls, shape = _placed_models()[which]
    return trace(cls(), shape)


def _dp_vs_brute(cost):
    from distconv.planner.search import Planner, brute_force
    from distconv.planner.simulate import additive_time
    plan, value = Planner(cost, placement=True).run()
    assert abs(additive_time(cost, plan) - value) <= REL * abs(value)
    bplan, best = brute_force(cost, placement=True)
    assert abs(value - best) <= REL * best, (value, best, plan, bplan)
    return plan, value


@pytest.mark.parametrize("which,p", [("two", 2), ("two", 4), ("small", 2), ("small", 4)])
def test_dp_with_placement_equals_brute_force(which, p):
    from distconv.planner.search import Planner
    from distconv.planner.strategies import Placed
    from tests.test_planner_search import SLOW_INTER
    g = _graph(which) if which in _placed_models() else graph_of(which)
    placed_somewhere = False
    for mach in (None, SLOW_INTER):
        cost = _cost(g, p, mach)
        plan, value = _dp_vs_brute(cost)
        _, plain = Planner(cost).run()
        assert value <= plain * (1 + REL)
        placed_somewhere |= any(isinstance(st, Placed) for st in plan.values())
    assert placed_somewhere or p == 4  # at 2 ranks placing the towers wins here


def test_adding_parallel_branches_is_caught(monkeypatch):
    """Negative control: a DP that adds the placed branches' costs instead of taking the
    slowest disagrees with the brute force (whose walk takes the slowest)."""
    from distconv.planner import placement as P
    orig = P.placed_branch

    def added(planner, it, i, dists, S_i, U, vmax):
        got, info = orig(planner, it, i, dists, S_i, U, np.full_like(vmax, -np.inf))
        return (got if np.isneginf(vmax).all() else vmax + got), info

    monkeypatch.setattr(P, "placed_branch", added)
    with pytest.raises(AssertionError):
        _dp_vs_brute(_cost(_graph("two"), 2))


def _placed_plan(p):
    """A plan of the Inception-style net with its towers placed: at 4 ranks tower 1 on
    rank 0, tower 2 on rank 1, tower 3 (with its nested fork) on ranks 2-3 split on the
    batch (disjoint: they run at the same time), the classifier on ranks 2-3 split on its
    outputs; at 2 ranks towers 1 and 3 on rank 0 and tower 2 on rank 1, the classifier on
    both. The stem on all ranks."""
    from distconv.planner.strategies import Placed

    def one(r):
        return Placed(1, 1, 1, 1, 1, (r,), p)
    t3 = Placed(2, 1, 1, 1, 1, (2, 3), p) if p == 4 else one(0)
    fc = Placed(1, 1, 2, 1, 1, (2, 3), p) if p == 4 else (1, p, 1)
    plan = {"stem": (1, 1, p), "bn": (p, 1, 1), "b1": one(0), "b2.0": one(1),
            "b2.2": one(1), "b3": t3, "b3a": t3, "b3b": t3, "fc": fc}
    assert set(plan) == set(graph_of("incfork").strategic_names())
    return plan


@pytest.mark.parametrize("shift", [0, 1])
@mpi(ranks=(2, 4), timeout=240)
def test_placed_plan_bytes_equal_measured(comm, shift):
    """A placed plan of the Inception-style net with forked towers: predicted
    bytes per layer, kind and rank equal a real step's. ``shift`` 1 (negative control):
    the real run places every tower one rank further (mod p) than the prediction."""
    import distconv as dc
    from distconv.planner.strategies import Placed
    dc.set_default_dtype(np.float64)
    plan = _placed_plan(comm.size)
    if not shift:
        run_and_compare(comm, "incfork", None, plan=plan)
        return
    p = comm.size
    moved = {k: (st._replace(ranks=tuple((r + 1) % p for r in st.ranks))
                 if isinstance(st, Placed) else st) for k, st in plan.items()}

    def perturb(pred):  # predict the real plan's bytes from the unshifted plan
        from distconv.comm import world
        from distconv.planner.events import graph_events
        pred.clear()
        pred.update(graph_events(graph_of("incfork"), plan, world().rank, item=8))
    with pytest.raises(AssertionError):
        run_and_compare(comm, "incfork", None, perturb=perturb, plan=moved)


def test_plan_model_places_towers_and_plan_files_keep_them(tmp_path):
    """``plan_model(placement=True)`` on the forked Inception-style net returns placed
    towers predicted faster than the best plan without placement; a plan file written with
    ``meta.ranks`` reads back the same placed strategies (``ranks=`` texts)."""
    from distconv.planner.auto import plan_model
    from distconv.planner.planfile import load_plan, plan_to_json, save_plan
    from distconv.planner.strategies import Placed
    from tests.test_planner_dag import model
    from tests.test_planner_search import MID, compute
    m, shape = model("incfork")
    # blocking per-parameter allreduces (sync_gradients): placement wins here
    kw = dict(min_gain=0.0, overlap=False, bucket_bytes=None)
    res = plan_model(m, shape, 4, MID, compute(), placement=True, **kw)
    plain = plan_model(m, shape, 4, MID, compute(), **kw)
    placed = {k: st for k, st in res["plan"].items() if isinstance(st, Placed)}
    assert placed, res["plan"]
    assert res["predicted"]["step_s"] < plain["predicted"]["step_s"]
    assert any(r["kind"] == "placed" for r in res["predicted"]["layers"])
    assert all("ranks=" in plan_to_json(placed)[k] for k in placed)
    path = tmp_path / "plan.json"
    save_plan(path, res["plan"], meta={"ranks": 4})
    assert load_plan(path) == res["plan"]
    assert all(isinstance(load_plan(path)[k], Placed) for k in placed)


def test_plan_cli_placement_flag(tmp_path):
    """``plan.py --placement`` writes placed strategies (``ranks=``) into the plan file."""
    import json
    import subprocess
    import sys
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "scripts/plan.py", "--model", "inception_v3",
                        "--batch", "4", "--ranks", "4", "--machine", "v100_ib", "--placement",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())["plan"]
    assert any("ranks=" in v for v in plan.values())
    assert "@" in r.stdout  # placed strategies in the usage line, e.g. "s1 c1 f1 @0"


def test_mcmc_with_placement_finds_placed_towers():
    """MCMC with the placed configurations and group moves (``placement_choices``,
    ``placement_moves``) from data parallelism reaches a plan with placed towers that the
    simulator rates faster than where it started; without them it places nothing."""
    from distconv.planner.auto import data_parallel
    from distconv.planner.mcmc import mcmc
    from distconv.planner.placement import placement_choices, placement_moves
    from distconv.planner.simulate import simulate
    from distconv.planner.strategies import Placed
    cost = _cost(graph_of("incfork"), 4)
    cost.bucket_bytes = None  # blocking per-parameter allreduces, as sync_gradients
    start = data_parallel(cost.graph, 4)
    beta = 30.0 / simulate(cost, start, overlap=False)["step_s"]  # a warmer chain
    run = mcmc(cost, start, float("inf"), beta=beta, seed=0, max_proposals=2000,
               overlap=False, choices=placement_choices(cost),
               group_moves=placement_moves(cost))
    assert run["step_s"] < run["start_step_s"]
    assert any(isinstance(st, Placed) for st in run["plan"].values())
    plain = mcmc(cost, start, float("inf"), beta=beta, seed=0, max_proposals=200,
                 overlap=False)
    assert not any(isinstance(st, Placed) for st in plain["plan"].values())
