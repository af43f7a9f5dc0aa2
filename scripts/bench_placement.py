#!/usr/bin/env python
"""Operator placement: two equal independent conv branches joined by ``dc.cat``, 2 ranks.

    mpiexec -n 2 python -m mpi4py scripts/bench_placement.py --json placement.json
    mpiexec -n 2 python -m mpi4py scripts/bench_placement.py --quick --json /tmp/p.json

The block: ``x`` (N, C, H, W) -> ``cat([conv_a(x), conv_b(x)], dim=1)``, each conv
C -> F with a k x k kernel, x replicated on both ranks (every rank has the batch, as a
data loader gives it), ``x.requires_grad`` (the block sits inside a network, so dx is
computed too). A step is forward, backward from a fixed dy (in the output's own
layout) and the gradient sync. The plans, all timed in ONE job, interleaved round by
round (each round runs every plan once, a sleeping barrier before each step, a step's time is the
maximum over ranks), so the shared machine's drift cancels in the per-round ratios:

* ``placed``: branch a on rank 0, branch b on rank 1 (``ranks=0`` / ``ranks=1``), forked
  with ``dc.fork``: the branches run at the same time;
* ``one_rank``: both branches on rank 0 (``ranks=0``); rank 1 holds nothing;
* ``channel=2``, ``filter=2``, ``sample=2`` (``--plans``): both convs split over both
  ranks (sample=2 needs N >= 2).

Every rank uses ONE BLAS thread (one rank stands for one device). Rank 0 prints a table
(median step, paired speedup over ``one_rank`` with its quartiles, and the same ratio of
CPU time -- the maximum over ranks of each process's CPU seconds, which leaves out the
time other processes of a loaded machine held the core but counts MPI's busy-waiting)
and writes ``--json``.

``--predict``: the planner's step of every plan too (``planner.simulate`` with ``x``
replicated as here, links calibrated on this job, kernels measured afresh on rank 0 with
one thread: times cached by earlier runs may come from a busier machine), and its
predicted speedup over ``one_rank`` beside the measured one.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from distconv.bench.stats import paired_ratio
from distconv.bench.cli import add_sized, bench_parser, parse_sized, split_list
from distconv.bench.paired import check_fits, paired_world, random_pair
from distconv.envinfo import write_results

DEFAULTS = dict(channels=128, filters=128, size=28, batch=2, kernel=3, rounds=30, warmup=3)
QUICK = dict(channels=4, filters=4, size=6, batch=2, kernel=3, rounds=3, warmup=1)
PLACED = {"placed": ("sample=1,ranks=0", "sample=1,ranks=1"),
          "one_rank": ("sample=1,ranks=0", "sample=1,ranks=0")}


def parse_args(argv=None):
    ap = bench_parser("bench_placement.py", __doc__)
    ap.add_argument("--plans", default="channel=2;filter=2;sample=2",
                    help="';'-separated Strategy texts of the unplaced plans, used by both "
                         "convs (default 'channel=2;filter=2;sample=2')")
    ap.add_argument("--predict", action="store_true",
                    help="also predict each plan's step with the planner (links calibrated "
                         "on this job, kernels measured on rank 0) and print the predicted "
                         "speedups over one_rank beside the measured ones")
    add_sized(ap, (("channels", "C of the input"), ("filters", "F of each branch"),
                   ("size", "H = W"), ("batch", "global batch N"), ("kernel", "k"),
                   ("rounds", "timed rounds"), ("warmup", "untimed rounds first")),
              DEFAULTS, QUICK)
    a = parse_sized(ap, argv, DEFAULTS, QUICK)
    a.plan_list = split_list(ap, a.plans, "--plans", required=False)
    return a


def build(args, sa, sb, fork):
    """The two-branch block (a Module) with branch strategies ``sa``/``sb``."""
    import distconv as dc
    from distconv import nn

    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            k = args.kernel
            self.a = nn.Conv2d(args.channels, args.filters, k, padding=k // 2, strategy=sa)
            self.b = nn.Conv2d(args.channels, args.filters, k, padding=k // 2, strategy=sb)

        def forward(self, x):
            xa, xb = dc.fork(x, [self.a, self.b]) if fork else (x, x)
            return dc.cat([self.a(xa), self.b(xb)], dim=1)

    dc.manual_seed(args.seed)
    return TwoBranch()


class _Case:
    """One plan: the block, its input, output gradient and gradient sync."""

    def __init__(self, args, sa, sb, fork, x_glob, dy_glob):
        from distconv import DistTensor, Distribution
        from distconv.optim import GradientSync
        from distconv.strategy import Strategy
        self.model = build(args, sa, sb, fork)
        grid = Strategy().grid()
        self.x = DistTensor.from_global(x_glob, Distribution.replicated(grid, 4))
        self.x.requires_grad = True
        y = self.model(self.x)
        self.dy = DistTensor.from_global(dy_glob, y.distribution)
        self.sync = GradientSync(self.model)

    def step(self):
        """(wall seconds, CPU seconds of this process) of one step."""
        self.model.zero_grad()
        self.x.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        self.model(self.x).backward(self.dy)
        self.sync.wait()
        return time.perf_counter() - t0, time.process_time() - c0


def predict(comm, args, shape, plans) -> dict:
    """``{plan: predicted step seconds}`` (on every rank): ``plans`` ``{name: (strategy
    text of a, of b)}`` simulated on this job's calibrated links with ``x`` replicated."""
    from distconv.distribution import Distribution
    from distconv.planner.auto import MEASURE_ROUNDS
    from distconv.planner.commmodel import VGrid
    from distconv.planner.compute import ComputeModel
    from distconv.planner.costs import CostModel
    from distconv.planner.graph import trace
    from distconv.planner.machine import calibrate
    from distconv.planner.simulate import simulate
    from distconv.planner.strategies import from_strategy
    from distconv.strategy import Strategy
    machine = calibrate(comm)
    out = None
    if comm.rank == 0:
        compute = ComputeModel(cache_path=None, threads=1, rounds=MEASURE_ROUNDS)
        cost = CostModel(trace(build(args, None, None, True), shape), comm.size, machine,
                         compute)
        rep = Distribution(VGrid((comm.size, 1, 1)), [None] * len(shape))
        out = {}
        for name, (sa, sb) in plans.items():
            plan = {"a": from_strategy(Strategy.parse(sa), comm.size),
                    "b": from_strategy(Strategy.parse(sb), comm.size)}
            out[name] = simulate(cost, plan, input_dist=rep)["step_s"]
    comm.idle_barrier()
    return comm.allgather_obj(out)[0]


def run_rounds(comm, cases, args):
    """``{plan: [(wall, CPU) per round]}``, each the maximum over ranks, plans interleaved
    per round."""
    times = {name: [] for name in cases}
    for r in range(args.warmup + args.rounds):
        got = {}
        for name, case in cases.items():
            comm.idle_barrier(0.001)  # sleeps: a rank left idle by a plan takes no core
            got[name] = case.step()
        if r >= args.warmup:
            for name, t in got.items():
                both = comm.allgather_obj(t)
                times[name].append((max(w for w, _ in both), max(c for _, c in both)))
    return times


def report(args, times, shape, p, predicted=None) -> dict:
    base = np.array(times["one_rank"])
    rows = []
    for name, t in times.items():
        t = np.array(t)
        cpu = {k.replace("speedup", "cpu_speedup"): v
               for k, v in paired_ratio(base[:, 1], t[:, 1]).items()}
        t = t[:, 0]
        rows.append({"plan": name, "median_ms": float(np.median(t)) * 1e3,
                     "q1_ms": float(np.percentile(t, 25)) * 1e3,
                     "q3_ms": float(np.percentile(t, 75)) * 1e3,
                     **paired_ratio(base[:, 0], t), **cpu, "step_s": t.tolist()})
        if predicted:
            rows[-1]["predicted_ms"] = predicted[name] * 1e3
            rows[-1]["predicted_speedup"] = predicted["one_rank"] / predicted[name]
    print(f"two {args.kernel}x{args.kernel} convs {args.channels}->{args.filters} on {shape}, "
          f"joined by cat; {p} ranks x 1 thread, {args.rounds} interleaved rounds")
    print(f"{'plan':<10} {'median ms':>10} {'(q1-q3)':>17} {'vs one_rank (q1-q3)':>22} "
          f"{'ratio of medians':>17} {'CPU-time ratio':>15}")
    for r in rows:
        print(f"{r['plan']:<10} {r['median_ms']:>10.1f} ({r['q1_ms']:7.1f}-{r['q3_ms']:7.1f}) "
              f"{r['speedup_paired_median']:>9.2f} ({r['speedup_paired_q1']:.2f}-"
              f"{r['speedup_paired_q3']:.2f}) {r['speedup_ratio_of_medians']:>17.2f} "
              f"{r['cpu_speedup_paired_median']:>15.2f}"
              + (f"   predicted {r['predicted_ms']:.1f} ms, {r['predicted_speedup']:.2f}x"
                 if predicted else ""))
    return {"benchmark": "bench_placement", "ranks": p, "shape": list(shape),
            "filters": args.filters, "kernel": args.kernel, "rounds": args.rounds,
            "warmup": args.warmup, "results": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = paired_world()
    comm.agree(comm.size == 2, f"bench_placement.py runs on 2 ranks, got {comm.size}")
    check_fits(comm, args.plan_list, "plan")
    shape = (args.batch, args.channels, args.size, args.size)
    x_glob, dy_glob = random_pair(args.seed, shape,
                                  (args.batch, 2 * args.filters, args.size, args.size))
    cases = {name: _Case(args, sa, sb, name == "placed", x_glob, dy_glob)
             for name, (sa, sb) in PLACED.items()}
    cases.update({s: _Case(args, s, s, False, x_glob, dy_glob) for s in args.plan_list})
    predicted = None
    if args.predict:
        plans = dict(PLACED)
        plans.update({s: (s, s) for s in args.plan_list})
        predicted = predict(comm, args, shape, plans)
    times = run_rounds(comm, cases, args)
    if comm.rank != 0:
        return 0
    doc = report(args, times, shape, comm.size, predicted)
    if args.json:
        write_results(args.json, doc)
    return 0


if __name__ == "__main__":
    from distconv.comm import run_guarded
    sys.exit(run_guarded(main))
