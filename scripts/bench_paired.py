#!/usr/bin/env python
"""1 rank vs P ranks on a wide-ResNet block, paired step by step inside ONE job.

    mpiexec -n 2 python -m mpi4py scripts/bench_paired.py --json paired.json
    mpiexec -n 2 python -m mpi4py scripts/bench_paired.py --quick --json /tmp/p.json

The shared 2-core dev VM changes speed by up to ~1.6x over seconds, so a 1-rank job and
a 2-rank job run a minute apart (what ``scripts/scaling.py`` does, one job per point)
time two different machines. Here one ``mpiexec -n P`` job alternates, round after round:

* **A**: rank 0 alone trains the block on a grid of itself (``distconv.comm.self_comm``:
  the same layers and kernels as a 1-rank job, no collective) while the other ranks wait
  in a nonblocking barrier, sleeping, so they do not take a core;
* **B** (one per strategy): all P ranks train the same block under that strategy.

Every rank uses ONE BLAS thread (one rank stands for one device). A step is forward,
backward and the gradient sync (``GradientSync``, ``--bucket-kb`` buckets, overlapped);
a barrier precedes each step and a B step's time is the maximum over ranks. The
speedup of a strategy is the median over rounds of ``A / B`` of the same round (rounds
last well under a second, so drift cancels), reported with the quartiles and next to
the ratio of the medians. Rank 0 prints a table and writes ``--json``.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from distconv.bench.paired import (check_fits, paired_row, paired_rounds, paired_world,
                                   random_pair)
from distconv.bench.runs import self_strategy
from distconv.bench.cli import add_sized, add_strategies, bench_parser, parse_sized, split_list
from distconv.envinfo import write_results

DEFAULTS = dict(channels=256, size=28, batch=1, rounds=40, warmup=3)
QUICK = dict(channels=8, size=6, batch=1, rounds=3, warmup=1)


def parse_args(argv=None):
    ap = bench_parser("bench_paired.py", __doc__)
    add_strategies(ap, "channel=2;filter=2;sample", "for the B steps")
    ap.add_argument("--bucket-kb", type=int, default=1024,
                    help="GradientSync bucket size (1024: the block's two conv gradients "
                         "go into separate buckets, so the first overlaps)")
    add_sized(ap, (("channels", "C of BasicBlock(C, C)"), ("size", "H = W"),
                   ("batch", "global batch N"), ("rounds", "timed rounds"),
                   ("warmup", "untimed rounds first")), DEFAULTS, QUICK)
    a = parse_sized(ap, argv, DEFAULTS, QUICK)
    a.strategy_list = split_list(ap, a.strategies, "--strategies", required=True)
    return a


class _Case:
    """One model with its input, output gradient and gradient sync."""

    def __init__(self, args, strategy, x_glob, dy_glob):
        from distconv import DistTensor, manual_seed
        from distconv.models.resnet import BasicBlock
        from distconv.optim import GradientSync
        manual_seed(args.seed)
        self.model = BasicBlock(args.channels, args.channels, strategy=strategy)
        self.x = DistTensor.from_global(x_glob, self.model.conv1.input_distribution)
        y = self.model(self.x)
        self.dy = DistTensor.from_global(dy_glob, y.distribution)
        self.params = self.model.parameters()
        self.sync = GradientSync(self.model, bucket_bytes=args.bucket_kb << 10, overlap=True)

    def step(self):
        for q in self.params:
            q.grad = None
        t0 = time.perf_counter()
        self.model(self.x)
        self.model.backward(self.dy)
        self.sync.wait()
        return time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = paired_world()
    check_fits(comm, args.strategy_list)
    import distconv as dc
    p, me = comm.size, comm.rank
    shape = (args.batch, args.channels, args.size, args.size)
    x_glob, dy_glob = random_pair(args.seed, shape)
    single = _Case(args, self_strategy(), x_glob, dy_glob) if me == 0 else None
    cases = {s: _Case(args, dc.Strategy.parse(s), x_glob, dy_glob) for s in args.strategy_list}
    t_a, t_b = paired_rounds(comm, single.step if single else None,
                             {s: c.step for s, c in cases.items()}, args.rounds, args.warmup)[:2]
    if me != 0:
        return 0
    a = np.array(t_a)
    rows = [dict(strategy=s, **paired_row(t_a, t_b[s])) for s in args.strategy_list]
    print(f"BasicBlock({args.channels}, {args.channels}) on {shape}, {p} ranks x 1 thread, "
          f"{args.rounds} paired rounds; 1 rank (rank 0 alone, same job): "
          f"{np.median(a) * 1e3:.1f} ms median")
    print(f"{'strategy':<12} {'P-rank ms':>10} {'paired speedup (q1-q3)':>24} "
          f"{'ratio of medians':>17} {'rounds >= 1.6x':>15}")
    for r in rows:
        print(f"{r['strategy']:<12} {r['p_ranks_ms']:>10.1f} "
              f"{r['speedup_paired_median']:>9.2f} ({r['speedup_paired_q1']:.2f}-"
              f"{r['speedup_paired_q3']:.2f}) {r['speedup_ratio_of_medians']:>17.2f} "
              f"{r['rounds_above_1_6']:>9}/{args.rounds}")
    if args.json:
        doc = {"benchmark": "bench_paired", "ranks": p, "shape": list(shape),
               "channels": args.channels, "rounds": args.rounds, "warmup": args.warmup,
               "bucket_kb": args.bucket_kb, "one_rank_step_s": a.tolist(), "results": rows}
        write_results(args.json, doc)
    return 0


if __name__ == "__main__":
    from distconv.comm import run_guarded
    sys.exit(run_guarded(main))
