#!/usr/bin/env python
"""Time one wide convolution layer, forward + backward + gradient sync, per Strategy.

Run::

    mpiexec -n 2 python -m mpi4py scripts/bench_layers.py --json FILE
    mpiexec -n 2 python -m mpi4py scripts/bench_layers.py --quick        # CI-sized, seconds
    mpiexec -n 1 python -m mpi4py scripts/bench_layers.py --json B.json  # 1-rank time only

The layer is ``distconv.nn.Conv2d(C, F, k, padding=k//2, bias=False)`` on an
``N x C x S x S`` input (default N=8, C=F=256, S=28, k=3: a wide-ResNet 3x3
layer, 22 GFLOP per step in float32). One *step* is what a training step does
with the layer: ``y = layer(x)``, ``dx = layer.backward(dy)``,
``distconv.nn.sync_gradients(layer.parameters())``. Gradients are cleared
before each step (as ``zero_grad`` would) outside the timed region; ``x`` and
``dy`` are already in the layer's activation distribution when a step starts.

Strategies (``--strategies``): by default every ``Strategy(sample=s,
channel=c, filter=f)`` with ``s*c*f`` equal to the number of ranks: on 2
ranks ``sample=2`` (data parallel), ``channel=2`` and ``filter=2``; on 4
ranks also ``channel=2,filter=2`` and the mixes with ``sample=2``. Each rank
is limited to ONE BLAS/OpenMP thread (environment variables set before numpy
is imported, plus threadpoolctl): a rank stands for one device.

Timing. Strategies are interleaved repetition by repetition (after
``--warmup`` untimed steps each) so drifting background load hits all of them
alike. Every step starts after a barrier; a repetition's time is the max over
ranks; ``step`` is the median over repetitions. Phase times (forward,
backward, sync) and the communication time recorded by
``Communicator.stats()`` are medians per rank; ``compute = step - comm``
(comm time includes waiting for the slower rank inside a collective).

Shared machines. Each rank also measures its process CPU time per step. A
rank runs one thread that is busy for the whole step (MPICH busy-polls while
waiting), so ``wall - cpu`` is the time the OS took its core away for other
processes. A repetition is *clean* when that lost time is under
``--clean-frac`` (default 3%) of the step on every rank. ``clean`` is the
median over clean repetitions only; the script runs extra repetitions (up to
``--max-repeats``) until every strategy and the baseline have ``--repeats``
clean ones. Both the plain and the clean medians are reported.

1-rank baseline (the denominator of the speedup), measured in the SAME run on
the same machine: rank 0 starts this script as a child process with the MPI
launcher's environment removed, so the child is an MPI singleton (a 1-rank
world) running the same layer with ``Strategy()`` and the same step code.
After its warm-up the child runs one timed step whenever rank 0 asks, so its
steps are interleaved with the multi-rank ones: each repetition times every
strategy on all ranks, then one 1-rank step while the other ranks sleep (they
poll a nonblocking barrier every 20 ms and leave their core idle).
``--baseline-json FILE`` instead takes the 1-rank time from a JSON written
earlier by a 1-rank run of this script (same shape required; the output then
says the number comes from another run); ``--no-baseline`` skips it. Started
on 1 rank the script measures the 1-rank step itself.

Traffic: bytes one rank *sends* per step (``Communicator.stats()``, whose
byte model is a bandwidth-optimal algorithm, see ``distconv/comm.py``), split
into activation traffic (the collectives inside forward and backward: x, y,
dy, dx) and gradient traffic (everything inside ``sync_gradients``: the
segmented allreduce of the weight shards); max over ranks. Next to it,
``dp grad``: what data parallelism on the same ranks sends for the gradients,
an allreduce of all ``|w|`` elements (same byte model; the ``sample`` row
measures it).

Only rank 0 prints and writes JSON (figures + environment: ranks, threads,
CPU affinity and BLAS of every rank from threadpoolctl, numpy/mpi4py/MPI
versions, load average, git commit).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from distconv.bench.cli import bench_parser, fill_defaults, require_positive
from distconv.envinfo import pin_threads

DEFAULTS = dict(batch=8, channels=256, filters=256, size=28, kernel=3, repeats=20, warmup=3)
QUICK = dict(batch=4, channels=16, filters=16, size=8, kernel=3, repeats=2, warmup=1)
NOTES = [
    "step_s: median over repetitions of the max over ranks of forward+backward+"
    "sync_gradients wall time; each step starts after a barrier",
    "step_s_clean: the same over the repetitions in which every rank's wall minus "
    "process CPU time (time the OS gave its core to other processes) was under "
    "clean_frac of the step",
    "bytes: sent by one rank per step, Communicator.stats() byte model; "
    "act = forward+backward collectives, grad = sync_gradients",
    "dp_grad_bytes_sent: allreduce of all weight elements over all ranks "
    "(what data parallelism sends for gradients), same byte model",
    "compute_s = step - comm time recorded by Communicator.stats() (comm includes "
    "waiting for the slower rank)",
]


def parse_args(argv=None):
    ap = bench_parser("bench_layers.py", __doc__)
    ap.add_argument("--json", metavar="FILE",
                    help="rank 0 writes all figures and the environment as JSON to FILE")
    ap.add_argument("--batch", type=int, default=None, help="N, global batch (default 8)")
    ap.add_argument("--channels", type=int, default=None, help="C, input channels (default 256)")
    ap.add_argument("--filters", type=int, default=None, help="F, output channels (default 256)")
    ap.add_argument("--size", type=int, default=None, help="H = W of the input (default 28)")
    ap.add_argument("--kernel", type=int, default=None,
                    help="kernel size k (k x k, stride 1, padding k//2; default 3)")
    ap.add_argument("--bias", action="store_true",
                    help="give the conv a bias (default: none, as in ResNet)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repetitions (and clean ones wanted) per strategy "
                         "(default 20; --quick 2)")
    ap.add_argument("--max-repeats", type=int, default=None,
                    help="stop adding repetitions for clean ones after this many "
                         "(default 3 x --repeats)")
    ap.add_argument("--clean-frac", type=float, default=0.03,
                    help="a repetition is clean if every rank lost less than this fraction "
                         "of the step to other processes (default 0.03)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per strategy first (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true",
                    help="CI-sized run: N=4, C=F=16, 8x8, 2 repeats (seconds)")
    ap.add_argument("--strategies", default=None, metavar="LIST",
                    help="strategies separated by ';', e.g. 'sample;channel=2;filter=2' "
                         "(Strategy.parse syntax); default: every sample x channel x filter "
                         "split that fits the rank count")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads per rank (default 1: one rank = one device)")
    ap.add_argument("--baseline-json", metavar="FILE", default=None,
                    help="take the 1-rank time from this earlier 1-rank JSON instead of "
                         "measuring it in this run")
    ap.add_argument("--no-baseline", action="store_true",
                    help="do not measure or read a 1-rank baseline (no speedups)")
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="after timing, profile 3 more steps per strategy with cProfile on "
                         "rank 0 and print the K functions with most own time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    fill_defaults(a, DEFAULTS, QUICK)
    if a.max_repeats is None:
        a.max_repeats = a.repeats if a.quick else 3 * a.repeats
    require_positive(ap, a, ("batch", "channels", "filters", "size", "kernel", "repeats",
                             "threads"))
    if a.warmup < 0:
        ap.error("--warmup must be >= 0")
    if a.max_repeats < a.repeats:
        ap.error("--max-repeats must be >= --repeats")
    if not 0 < a.clean_frac < 1:
        ap.error("--clean-frac must be between 0 and 1")
    if a.baseline_json and a.no_baseline:
        ap.error("--baseline-json and --no-baseline exclude each other")
    return a


def strategies_of(args, p):
    """The strategies to time on ``p`` ranks (``ValueError`` for a bad --strategies); on
    1 rank ``Strategy()`` first, the 1-rank baseline."""
    from distconv.bench.layer_bench import all_strategies
    from distconv.strategy import Strategy
    if args.strategies:
        strategies = [Strategy.parse(t) for t in args.strategies.split(";") if t.strip()]
        if not strategies:
            raise ValueError("--strategies lists no strategy")
        for st in strategies:
            st.resolve(p)
    else:
        strategies = all_strategies(p)
    if p == 1 and not args.no_baseline:
        strategies = [Strategy()] + [s for s in strategies if s.resolve(1) != (1, 1, 1)]
    return strategies


def strategy_rows(cases, comm, args, dp_bytes):
    """Rank 0: one summary row per case (every rank takes part in the gathers)."""
    from distconv.bench.layer_bench import strategy_label, summarize
    p = comm.size
    rows = []
    for case in cases:
        allr = comm.allgather_obj(case.recs)
        if comm.rank == 0:
            s, c, f = case.strategy.resolve(p)
            row = summarize(allr, strategy_label(case.strategy, p),
                            {"sample": s, "channel": c, "filter": f}, args.clean_frac)
            row["dp_grad_bytes_sent"] = dp_bytes
            row["weight_elems_per_rank"] = int(case.layer.weight.data.local.size)
            rows.append(row)
    return rows


class BaselineMismatch(Exception):
    """--baseline-json was written for another shape or has no baseline."""


def baseline_of(args, p, shape, rows, child):
    """The 1-rank baseline's figures: this run's 1-rank row, --baseline-json, or the
    child's steps; None without one. :class:`BaselineMismatch` when --baseline-json does
    not fit this run."""
    from distconv.bench.layer_bench import summarize
    if p == 1 and not args.no_baseline:
        baseline = dict(rows[0], source="this run (1 rank)")
        baseline.pop("per_rank", None)
        return baseline
    if args.baseline_json:
        with open(args.baseline_json) as fh:
            b = json.load(fh)
        if b.get("shape") != shape or not b.get("baseline"):
            raise BaselineMismatch(f"--baseline-json {args.baseline_json} has shape "
                                   f"{b.get('shape')} (and baseline {bool(b.get('baseline'))})"
                                   f", this run {shape}")
        return dict(b["baseline"], source=f"--baseline-json {args.baseline_json}, another "
                    f"run ({b.get('environment', {}).get('date')})")
    if child is None:
        return None
    if child.error or not child.recs:
        print(f"bench_layers: no 1-rank baseline: {child.error}", file=sys.stderr)
        return None
    baseline = summarize([child.recs], "1 rank, Strategy()",
                         {"sample": 1, "channel": 1, "filter": 1}, args.clean_frac)
    baseline.pop("per_rank", None)
    baseline["source"] = ("this run: 1-rank MPI singleton child of rank 0, steps "
                          "interleaved with the multi-rank ones")
    baseline["child_environment"] = child.environment
    return baseline


def result_doc(args, shape, flops, wsize, dtype, rounds, wall, baseline, rows, env):
    return {
        "benchmark": "bench_layers",
        "shape": shape,
        "flop_per_step": flops,
        "weight_elems": wsize,
        "weight_bytes": wsize * dtype.itemsize,
        "repeats_wanted": args.repeats,
        "max_repeats": args.max_repeats,
        "rounds": rounds,
        "warmup": args.warmup,
        "clean_frac": args.clean_frac,
        "quick": bool(args.quick),
        "timed_wall_s": wall,
        "baseline": baseline,
        "strategies": rows,
        "environment": env,
        "notes": NOTES,
    }


def main(argv=None):
    args = parse_args(argv)
    from distconv.bench import layer_bench as lb
    from distconv.bench.layer_report import print_table, profile_cases
    if args.serve_baseline:
        return lb.serve_baseline(args)
    from distconv.comm import world

    threads_applied = lb.configure(args)
    comm = world()
    p = comm.size
    dtype = np.dtype(args.dtype)
    try:
        strategies = strategies_of(args, p)
    except ValueError as e:
        if comm.rank == 0:
            print(f"bench_layers: {e}", file=sys.stderr)
        return 2

    load_start = os.getloadavg()
    child = None
    do_child = p > 1 and not args.no_baseline and not args.baseline_json
    if do_child:
        # rank 0 starts the 1-rank child; the others sleep until it is warm
        if comm.rank == 0:
            child = lb.BaselineChild(args, os.path.abspath(__file__))
        comm.idle_barrier(0.02)

    cases = lb.make_cases(strategies, args)
    for case in cases:
        for _ in range(args.warmup):
            case.step(comm, record=False)
    rounds, wall = lb.time_rounds(cases, comm, args, child, do_child)
    if child is not None:
        child.close()

    wsize = args.filters * args.channels * args.kernel ** 2 + (args.filters if args.bias else 0)
    rows = strategy_rows(cases, comm, args, lb.allreduce_sent_bytes(wsize, p, dtype.itemsize))
    env = lb.environment(comm, args, threads_applied)
    env["loadavg_start"] = load_start
    env["loadavg_end"] = os.getloadavg()

    if args.profile:
        profile_cases(cases, comm, args.profile)
    if comm.rank != 0:
        return 0

    shape = lb.shape_of(args)
    flops = 3 * 2.0 * args.batch * args.channels * args.filters * args.size ** 2 \
        * args.kernel ** 2
    try:
        baseline = baseline_of(args, p, shape, rows, child if do_child else None)
    except BaselineMismatch as e:
        print(f"bench_layers: {e}", file=sys.stderr)
        return 2
    if baseline and baseline.get("step_s"):
        lb.add_speedups(rows, baseline, flops, p, do_child)
    result = result_doc(args, shape, flops, wsize, dtype, rounds, wall, baseline, rows, env)
    print_table(result)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    from distconv.comm import run_guarded  # a failing rank ends the whole job
    pin_threads(1)  # one BLAS/OpenMP thread per rank
    sys.exit(run_guarded(main))
