#!/usr/bin/env python
"""Strong and weak scaling of a small wide-ResNet block per Strategy, with a per-layer profile.

Run::

    python scripts/scaling.py --mode strong --ranks 1,2,4 --out scaling_out
    python scripts/scaling.py --quick --out tmp          # 2 tiny points, seconds
    python scripts/scaling.py --dry-run                  # print the child commands only
    python scripts/scaling.py --summarize run1 run2 run3 --out summary   # merge repeated runs

The driver launches each point (rank count x strategy) as its own job,
``mpiexec -n N python -m mpi4py scripts/scaling.py --worker ...`` (``srun -n N ...``
with ``--launcher srun``, the default when ``SLURM_JOB_ID`` is set). A strategy
that does not fit a rank count is skipped with a note. Each worker runs with ONE
BLAS/OpenMP thread per rank, runs ``--warmup`` untimed and ``--steps`` timed
training steps under :class:`distconv.profile.Profiler` and rank 0 writes
``OUT/points/*.json``. The driver writes ``OUT/scaling.csv`` (one row per point)
and PNG plots (matplotlib, Agg backend: no display needed): ``speedup.png`` and
``efficiency.png`` (vs ranks, one line per strategy) and ``breakdown.png`` (stacked
bar of the step time: compute, exposed communication, other communication = time in
MPI calls that is not exposed, e.g. starting and testing the nonblocking allreduces).

Strategies (``--strategies``, ';'-separated): :meth:`distconv.Strategy.parse` texts
(``sample``, ``channel=2``, ``sample=1,channel=2,filter=2``, ...), used by every layer,
or ``auto``, which fits any rank count: every rank runs
:func:`distconv.planner.machine.calibrate`, rank 0 runs
:func:`distconv.planner.auto.plan_model` with a ``ComputeModel`` that times kernels with
one BLAS thread and caches them in :func:`distconv.planner.auto.default_cache_path`
(``$DISTCONV_CACHE_DIR``; the other ranks wait without spinning), and the per-layer plan
is broadcast and applied with ``model.set_strategy``. For hand strategies the same
calibration and compute model predict the step of their uniform plan
(:func:`distconv.planner.simulate.simulate`), so every point has ``predicted_step_s``.

Model (``--model``):

* ``block`` (default): one ``distconv.models.resnet.BasicBlock(C, C)``
  (conv3x3-BN-ReLU-conv3x3-BN + identity, ReLU), C = ``--channels`` (256)
  on ``--size`` x ``--size`` (28) inputs: a wide-ResNet stage-2 block.
* ``convs``: ``Sequential(Conv2d(C,C,3,pad 1,no bias), BatchNorm2d, ReLU) x 2``.

The input arrives in the first conv's input distribution (the activation layout of its
strategy). One step: ``y = model(x)``, ``model.backward(dy)``, ``GradientSync.wait()``
(:class:`distconv.optim.GradientSync`, the bucketed segmented gradient allreduce,
``--bucket-kb`` buckets; ``--overlap on`` starts each full bucket while backward runs,
``off`` sends every bucket in ``wait()``, so all of it is exposed), with a barrier before
each step and no optimizer update; a step's time is the max over ranks.

Batch (``--batch``): strong scaling keeps the global batch N fixed; weak
scaling gives every sample group ``--batch`` samples (global N = batch x s;
for ``auto``, batch x ranks as data parallelism would).

Bytes: every rank compares, for every step (warm-up included), the bytes it sent and
received (``comm.stats()``: forward, backward and gradient sync) with
:func:`model_bytes`: the same step function run shape-only on a world of the same size
(:class:`distconv.trace.shape_only`; no MPI, no data), so layers, joins and
``GradientSync``'s buckets are priced by their own code. BatchNorm gradients are never
allreduced (their sums are global after the batch-norm backward). The driver prints a
``WARNING`` line for any point where they differ.

Repetitions (``--repeat K``): the whole list of points runs K times, round robin, so
that each point's steps are spread over the sweep and a slow phase of a shared machine
does not land on one point only; a point's row then gives medians over the steps of
all K runs (``OUT/points/p{ranks}_{strategy}_rep{k}.json`` per run, and the merged
``p{ranks}_{strategy}.json``).

CSV columns: ranks, strategy (as given), grid (``SxCxF`` of the uniform plan, or
``layer:SxCxF ...`` per layer for a mixed ``auto`` plan; " / "-joined if repetitions
chose different plans), mode, model, overlap, global_batch, channels, size, steps,
reps, step_s (median of the per-step max over ranks), step_iqr_s, predicted_step_s
(simulated step of the point's plan on the calibrated machine, without the optimizer
update, which the worker does not run), images_per_s, comm_s and
exposed_comm_s (medians of the per-step max over ranks; time inside collectives, so it
includes waiting for a slower rank), compute_s (step_s - comm_s), bytes_sent_per_rank
(measured, max over ranks and steps), model_bytes_sent_per_rank (analytic, max over ranks),
grad_bytes_per_rank (bytes a rank sends in the gradient allreduces, measured: the
``iallreduce`` kind), model_grad_bytes_per_rank (analytic), dp_grad_bytes_per_rank
(what pure data parallelism, every layer ``(p, 1, 1)``, sends for the same model with
the same buckets: analytic), grad_bytes_ratio_vs_dp (grad / dp; empty on 1 rank),
bytes_match (True when, on every rank and step, sent and received bytes, total and
gradient sync, equal the model), peak_rss_mb (max over ranks of ``ru_maxrss``),
speedup and efficiency (images/s relative to the fastest 1-rank point; without a 1-rank
point, relative to the fastest point at the smallest rank count q, times q; efficiency =
speedup / ranks). A point JSON holds the per-layer plan (strategy texts), the predicted
breakdown, per-rank model and measured bytes, the per-step times and rank 0's per-layer
profile (with ``--repeat``, the merged JSON keeps all but the profile, which stays in
the ``_rep{k}`` files).

``--summarize DIR ...`` merges repetitions of one sweep (on a shared, noisy machine one
run is not enough): ``OUT/summary.csv`` has, per (ranks, strategy), the number of runs,
the median/min/max over runs of step_s and of speedup (each run's speedup is relative to
that run's own fastest 1-rank point), the median predicted step and exposed
communication, the bytes (per-run values joined by " / " if they differ, which they
should not), the DP comparison and whether bytes matched in every run; a markdown table
of the same is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys

from distconv.bench.scaling_report import (
    add_speedups, bytes_warnings, merge_reps, plot, summarize, write_csv)
from distconv.bench.cli import bench_parser, fill_defaults, positive_ints, require_positive
from distconv.envinfo import THREAD_ENV_VARS, pin_threads

DEFAULTS = dict(ranks="1,2", strategies="sample;channel=2;filter=2;auto", batch=8, size=28,
                channels=256, steps=10, warmup=2)
QUICK = dict(ranks="1,2", strategies="sample", batch=4, size=6, channels=8, steps=3, warmup=1)


def parse_args(argv=None):
    ap = bench_parser("scaling.py", __doc__)
    ap.add_argument("--mode", choices=("strong", "weak"), default="strong")
    ap.add_argument("--ranks", default=None, help="rank counts, comma separated (default 1,2)")
    ap.add_argument("--strategies", default=None,
                    help="';'-separated Strategy.parse texts or 'auto' (planner's "
                         "per-layer plan; default 'sample;channel=2;filter=2;auto')")
    ap.add_argument("--model", choices=("block", "convs"), default="block",
                    help="block: one resnet BasicBlock(C, C); convs: (Conv2d+BN+ReLU) x 2")
    ap.add_argument("--batch", type=int, default=None,
                    help="strong: global batch; weak: batch per sample group (default 8)")
    ap.add_argument("--size", type=int, default=None, help="H = W (default 28)")
    ap.add_argument("--channels", type=int, default=None, help="C (default 256)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the whole list of points this many times, round robin, and "
                         "report medians over the steps of all repetitions (default 1)")
    ap.add_argument("--overlap", choices=("on", "off"), default="on",
                    help="GradientSync overlap: on = bucketed allreduces start during "
                         "backward; off = all sent in wait() (default on)")
    ap.add_argument("--bucket-kb", type=int, default=4096,
                    help="GradientSync bucket size in KiB (default 4096)")
    ap.add_argument("--out", default="scaling_out", help="output folder")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes (N=4, C=8, 6x6), ranks 1,2, strategy sample: 2 points")
    ap.add_argument("--launcher", choices=("auto", "mpiexec", "srun"), default="auto")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--summarize", nargs="+", metavar="DIR", default=None,
                    help="merge the scaling.csv of several runs (repetitions of one sweep) "
                         "into OUT/summary.csv and print a markdown table; runs nothing")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    fill_defaults(a, DEFAULTS, QUICK)
    require_positive(ap, a, ("batch", "size", "channels", "steps", "bucket_kb", "repeat"),
                     nonnegative=("warmup",))
    a.rank_list = positive_ints(ap, a.ranks, "--ranks")
    a.strategy_list = [s.strip() for s in str(a.strategies).split(";")]
    a.strategy_list = [s if s else "sample" for s in a.strategy_list]
    return a


# ----------------------------------------------------------------- driver
def fits(strategy, p):
    """Whether ``strategy`` runs on ``p`` ranks (``auto`` always does)."""
    from distconv.bench.paired import strategy_fits
    return strategy.strip().lower() == "auto" or strategy_fits(strategy, p)


def slug(strategy):
    return "".join(ch if ch.isalnum() else "_" for ch in strategy)


def launcher_prefix(kind, n):
    if kind == "auto":
        kind = "srun" if os.environ.get("SLURM_JOB_ID") else "mpiexec"
    if kind == "srun":
        return ["srun", "-n", str(n)]
    custom = os.environ.get("DISTCONV_MPIEXEC")
    if custom:
        return shlex.split(custom) + ["-n", str(n)]
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = beside if os.path.exists(beside) else (shutil.which("mpiexec") or "mpiexec")
    return [exe, "-n", str(n)]


def point_command(args, p, strategy, json_path):
    cmd = launcher_prefix(args.launcher, p) + [
        sys.executable, "-m", "mpi4py", os.path.abspath(__file__), "--worker",
        "--strategy", strategy, "--json", json_path, "--mode", args.mode,
        "--model", args.model, "--batch", str(args.batch), "--size", str(args.size),
        "--channels", str(args.channels), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--seed", str(args.seed), "--overlap", args.overlap,
        "--bucket-kb", str(args.bucket_kb)]
    return cmd


def points(args, pts) -> list:
    """``[(ranks, strategy, json path, command)]`` of every point and repetition, round
    robin; a strategy that does not fit a rank count is skipped with a note."""
    out = []
    for rep in range(args.repeat):
        for p in args.rank_list:
            for st in args.strategy_list:
                if not fits(st, p):
                    if rep == 0:
                        print(f"note: strategy {st!r} does not fit {p} rank(s); skipped",
                              flush=True)
                    continue
                tag = f"_rep{rep + 1}" if args.repeat > 1 else ""
                path = os.path.join(pts, f"p{p}_{slug(st)}{tag}.json")
                out.append((p, st, path, point_command(args, p, st, path)))
    return out


def run_point(cmd, path, timeout, env):
    """Run one point's job -> its record, or None (printed why) if it failed."""
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print(f"   timed out after {timeout}s; point skipped", flush=True)
        return None
    if r.returncode != 0 or not os.path.exists(path):
        print(f"   failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}",
              flush=True)
        return None
    with open(path) as fh:
        rec = json.load(fh)
    print(f"   step {1e3 * rec['step_s']:.3f} ms (IQR {1e3 * rec['step_iqr_s']:.3f}; "
          f"predicted {1e3 * rec['predicted_step_s']:.3f}), {rec['images_per_s']:.1f} "
          f"img/s, grid {rec['grid']}, bytes/rank {rec['bytes_sent_per_rank']} "
          f"(model {'equal' if rec['bytes_match'] else 'DIFFERS'})", flush=True)
    return rec


def driver(args):
    out = os.path.abspath(args.out)
    pts = os.path.join(out, "points")
    plan = points(args, pts)
    if args.dry_run:
        for *_, cmd in plan:
            print(shlex.join(cmd))
        return 0
    if not plan:
        print("nothing to run", file=sys.stderr)
        return 1
    os.makedirs(pts, exist_ok=True)
    env = dict(os.environ)
    for v in THREAD_ENV_VARS:
        env[v] = "1"
    got: dict = {}
    for p, st, path, cmd in plan:
        print(f"== {p} rank(s), {st}: {shlex.join(cmd)}", flush=True)
        rec = run_point(cmd, path, args.timeout, env)
        if rec is not None:
            got.setdefault((p, st), []).append(rec)
    if not got:
        print("every point failed", file=sys.stderr)
        return 1
    rows = [merge_reps(recs) for recs in got.values()]
    if args.repeat > 1:
        for (p, st), r in zip(got, rows):
            with open(os.path.join(pts, f"p{p}_{slug(st)}.json"), "w") as fh:
                json.dump({k: v for k, v in r.items() if k != "profile_rank0"}, fh, indent=1)
    add_speedups(rows)
    csv_path = os.path.join(out, "scaling.csv")
    write_csv(csv_path, rows)
    for msg in bytes_warnings(rows):
        print(msg, flush=True)
        print(msg, file=sys.stderr, flush=True)
    files = plot(rows, out, args.mode)
    print(f"wrote {csv_path} and {', '.join(files)}", flush=True)
    nok = sum(len(v) for v in got.values())
    return 0 if nok == len(plan) else 1


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        from distconv.bench.scaling import worker
        from distconv.comm import run_guarded
        return run_guarded(worker, args)
    if args.summarize:
        return summarize(args.summarize, args.out)
    return driver(args)


if __name__ == "__main__":
    pin_threads(1)  # one BLAS/OpenMP thread per rank (the driver's children get it too)
    sys.exit(main())
