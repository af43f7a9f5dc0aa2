"""The planner's price of the loss against the real loss.

:func:`distconv.planner.realrun.run_loss` runs :class:`distconv.nn.CrossEntropyLoss`
shape-only; at 1-4 ranks, with a batch and a class count that do not divide evenly, under
every (sample, channel, filter) layout of the logits and with logits placed on some of the
ranks (the loss value is then broadcast), the bytes per collective kind it
predicts on each rank equal ``comm.stats()`` of the real loss and ``loss.backward()``.
The cost model and the search then count the loss: the simulator's ``(loss)`` row, and
the DP's optimum still equals brute force with it.
"""
import numpy as np

from tests.mpi_harness import mpi

N, K = 7, 5


def _by_kind(events):
    out = {}
    for e in events:
        s, r = out.get(e.kind, (0, 0))
        out[e.kind] = (s + e.sent, r + e.recv)
    return {k: v for k, v in out.items() if v[0] or v[1]}


@mpi(ranks=(1, 2, 3, 4), timeout=120)
def test_loss_bytes_equal_measured(comm):
    import distconv as dc
    from distconv import DistTensor
    from distconv.bench.stats import stats_delta
    from distconv.planner.events import act_dist
    from distconv.planner.realrun import run_loss
    from distconv.planner.strategies import Placed, factorizations, to_strategy
    dc.set_default_dtype(np.float64)
    rng = np.random.default_rng(0)
    z, labels = rng.standard_normal((N, K)), rng.integers(0, K, N)
    world = dc.comm.world()  # the Communicator (its stats) of the job
    p = comm.size
    # logits placed on some ranks: the loss value is broadcast to every rank
    placed = [Placed(1, 1, 1, 1, 1, (p - 1,), p)] if p > 1 else []
    placed += [Placed(1, 1, 2, 1, 1, (0, 1), p)] if p > 2 else []
    wants = set()
    for st in list(factorizations(p)) + placed:
        x = DistTensor.from_global(z, to_strategy(st).activation_distribution(2))
        x.requires_grad = True
        s0 = world.stats()
        loss = dc.nn.CrossEntropyLoss()(x, labels)
        loss.backward()
        got = {k: (v["bytes_sent"], v["bytes_recv"])
               for k, v in stats_delta(world.stats(), s0).items()
               if v["bytes_sent"] or v["bytes_recv"]}
        f, b = run_loss((N, K), act_dist(st, 2), comm.size, comm.rank, 8)
        want = _by_kind(f + b)
        assert got == want, (st, got, want)
        assert ("bcast" in want) == (st in placed), (st, want)
        wants.add(repr(want))
    # the control: layouts differ in what they send, so a wrong layout would be caught
    assert len(wants) > 1 or comm.size == 1


def test_simulator_and_search_count_the_loss():
    from distconv import nn
    from distconv.planner.costs import CostModel
    from distconv.planner.graph import trace
    from distconv.planner.search import Planner
    from distconv.planner.simulate import simulate, walk
    from tests.test_planner_search import MID, assert_optimal, compute
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 9))
    graph = trace(model, (6, 3, 6, 6))
    cost = CostModel(graph, 4, MID, compute())
    rows = walk(cost, {n: (1, 1, 4) for n in graph.strategic_names()})
    assert rows[-1][0] == "(loss)" and rows[-1][2].comm_fwd > 0  # classes split 4 ways
    dp = walk(cost, {n: (4, 1, 1) for n in graph.strategic_names()})[-1][2]
    assert 0 < dp.comm_fwd < rows[-1][2].comm_fwd  # one scalar allreduce over samples
    sim = simulate(cost, {n: (1, 1, 4) for n in graph.strategic_names()})
    assert sim["layers"][-1]["kind"] == "loss"
    plan, value = Planner(cost).run()
    assert_optimal(cost, plan, value)
    one = CostModel(graph, 1, MID, compute())
    assert walk(one, {n: (1, 1, 1) for n in graph.strategic_names()})[-1][2].time == 0
