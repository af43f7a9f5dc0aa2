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
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from distconv.bench.runs import input_distribution, plan_and_predict
from distconv.envinfo import THREAD_ENV_VARS, pin_threads

DEFAULTS = dict(ranks="1,2", strategies="sample;channel=2;filter=2;auto", batch=8, size=28,
                channels=256, steps=10, warmup=2)
QUICK = dict(ranks="1,2", strategies="sample", batch=4, size=6, channels=8, steps=3, warmup=1)
COLUMNS = ["ranks", "strategy", "grid", "mode", "model", "overlap", "global_batch", "channels",
           "size", "steps", "reps", "step_s", "step_iqr_s", "predicted_step_s", "images_per_s",
           "compute_s", "comm_s", "exposed_comm_s", "bytes_sent_per_rank",
           "model_bytes_sent_per_rank", "grad_bytes_per_rank", "model_grad_bytes_per_rank",
           "dp_grad_bytes_per_rank", "grad_bytes_ratio_vs_dp", "bytes_match", "peak_rss_mb",
           "speedup", "efficiency"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="scaling.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, QUICK[k] if a.quick else v)
    for k in ("batch", "size", "channels", "steps"):
        if getattr(a, k) < 1:
            ap.error(f"--{k} must be >= 1")
    if a.warmup < 0:
        ap.error("--warmup must be >= 0")
    if a.bucket_kb < 1:
        ap.error("--bucket-kb must be >= 1")
    if a.repeat < 1:
        ap.error("--repeat must be >= 1")
    try:
        a.rank_list = [int(r) for r in str(a.ranks).split(",") if r.strip()]
    except ValueError:
        ap.error(f"--ranks: expected comma-separated integers, got {a.ranks!r}")
    if not a.rank_list or min(a.rank_list) < 1:
        ap.error("--ranks must list positive integers")
    a.strategy_list = [s.strip() for s in str(a.strategies).split(";")]
    a.strategy_list = [s if s else "sample" for s in a.strategy_list]
    return a


# ----------------------------------------------------------------- worker
def build_model(args, st):
    """The model under strategy ``st`` on every layer (``set_strategy`` may change it later)."""
    from distconv import nn
    from distconv.models.resnet import BasicBlock
    C = args.channels
    if args.model == "block":
        return BasicBlock(C, C, strategy=st)
    layers = []
    for _ in range(2):
        layers += [nn.Conv2d(C, C, 3, padding=1, bias=False, strategy=st),
                   nn.BatchNorm2d(C, strategy=st), nn.ReLU()]
    return nn.Sequential(*layers)


def train_step(model, x, dy, sync):
    """One worker step: forward, backward from ``dy``, and the overlapped gradient sync."""
    model(x)
    model.backward(dy)
    sync.wait()


def model_bytes(model, x_shape, plan, nranks, rank, bucket_bytes=4 << 20,
                overlap=True) -> dict:
    """Bytes of one worker step on ``rank`` of ``nranks`` under ``plan`` (no MPI, no data):
    :func:`train_step` itself run shape-only (:class:`distconv.trace.shape_only`), so the
    layers, the joins and ``GradientSync``'s buckets are priced by the code that runs.
    ``{"sent", "recv", "grad_sent", "grad_recv"}`` (grad: the bucketed allreduces)."""
    import numpy as np
    from distconv import DistTensor
    from distconv.meta import MetaArray
    from distconv.optim import GradientSync
    from distconv.trace import shape_only
    ctx = shape_only(model, nranks, rank, {k: Strategy_of(v) for k, v in plan.items()})
    with ctx as w:
        x = DistTensor.from_global(ctx.input(x_shape, np.float32), input_distribution(model))
        y = model(x)
        dy = DistTensor(MetaArray(y.distribution.local_shape(y.shape), y.dtype),
                        y.distribution.replace(pending=()), y.shape)
        sync = GradientSync(model, bucket_bytes=bucket_bytes, overlap=overlap)
        w.reset_stats()
        try:
            train_step(model, x, dy, sync)
        finally:
            sync.remove()
        st = w.stats()
    grad = st.get("iallreduce", {"bytes_sent": 0, "bytes_recv": 0})
    return {"sent": st["total"]["bytes_sent"], "recv": st["total"]["bytes_recv"],
            "grad_sent": grad["bytes_sent"], "grad_recv": grad["bytes_recv"]}


def Strategy_of(v):
    """A plan entry ``(s, c, f)`` (or a Strategy / its text) as a Strategy."""
    from distconv import Strategy
    if isinstance(v, (tuple, list)):
        return Strategy(*v)
    return v


def grid_text(plan, names) -> str:
    """``"SxCxF"`` if every layer has the same strategy, else ``"layer:SxCxF ..."``."""
    txt = {n: "x".join(str(v) for v in plan[n]) for n in names}
    if len(set(txt.values())) == 1:
        return next(iter(txt.values()))
    return " ".join(f"{n}:{t}" for n, t in txt.items())


def worker(args):
    import resource

    import numpy as np
    from distconv import DistTensor, Strategy, manual_seed
    from distconv.comm import world
    from distconv.optim import GradientSync
    from distconv.planner.auto import data_parallel
    from distconv.planner.graph import trace
    from distconv.planner.planfile import plan_to_json, to_strategies
    from distconv.profile import Profiler
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass
    comm = world()
    p = comm.size
    auto = args.strategy.strip().lower() == "auto"
    st = Strategy() if auto else Strategy.parse(args.strategy)
    s = p if auto else st.resolve(p)[0]
    n = args.batch if args.mode == "strong" else args.batch * s
    x_shape = (n, args.channels, args.size, args.size)
    manual_seed(args.seed)
    model = build_model(args, st)
    graph = trace(model, x_shape)
    names = graph.strategic_names()
    fixed = None if auto else {k: st.resolve(p) for k in names}
    plan, predicted, machine_notes = plan_and_predict(comm, model, x_shape, fixed,
                                                       overlap=args.overlap == "on")
    if auto:
        model.set_strategy(to_strategies(plan))
    overlap = args.overlap == "on"
    bucket = args.bucket_kb << 10
    mb = model_bytes(model, x_shape, plan, p, comm.rank, bucket, overlap)
    dp = model_bytes(model, x_shape, data_parallel(graph, p), p, comm.rank, bucket, overlap)

    rng = np.random.default_rng(args.seed)
    dtype = np.float32
    x = DistTensor.from_global(rng.standard_normal(x_shape).astype(dtype),
                               input_distribution(model))
    y = model(x)
    dy = DistTensor.from_global(rng.standard_normal(y.shape).astype(dtype), y.distribution)
    params = model.parameters()
    sync = GradientSync(model, bucket_bytes=bucket, overlap=overlap)
    prof = Profiler(model, sync=sync)  # after GradientSync: its backward hooks are timed
    steps, sent, recv, gsent, grecv = [], [], [], [], []

    def kind_bytes(st0, st1, pred):
        return [sum(v[f] - st0.get(k, {}).get(f, 0) for k, v in st1.items()
                    if k != "total" and pred(k)) for f in ("bytes_sent", "bytes_recv")]

    for i in range(args.warmup + args.steps):
        for q in params:
            q.grad = None
        comm.barrier()
        st0 = comm.stats()
        prof.step_begin()
        t0 = time.perf_counter()
        train_step(model, x, dy, sync)
        t1 = time.perf_counter()
        prof.step_end()
        st1 = comm.stats()
        a, b = kind_bytes(st0, st1, lambda k: True)
        ga, gb = kind_bytes(st0, st1, lambda k: k == "iallreduce")
        sent.append(a)
        recv.append(b)
        gsent.append(ga)
        grecv.append(gb)
        if i >= args.warmup:
            steps.append(t1 - t0)
    summ = prof.summary(skip=args.warmup)
    bad = [f"step {i}: sent {a} recv {b} (gradient sync {c}/{d}); model sent {mb['sent']} "
           f"recv {mb['recv']} (gradient sync {mb['grad_sent']}/{mb['grad_recv']})"
           for i, (a, b, c, d) in enumerate(zip(sent, recv, gsent, grecv))
           if (a, b, c, d) != (mb["sent"], mb["recv"], mb["grad_sent"], mb["grad_recv"])]
    mine = {"steps": steps, "comm": [x["comm_s"] for x in summ["steps"]],
            "exposed": [x["exposed_comm_s"] for x in summ["steps"]],
            "bytes_sent": max(sent), "grad_sent": max(gsent), "model": mb, "dp": dp,
            "mismatch": bad[:3],
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    allr = comm.allgather_obj(mine)
    if comm.rank == 0:
        step_max = [max(r["steps"][i] for r in allr) for i in range(args.steps)]
        comm_max = [max(r["comm"][i] for r in allr) for i in range(args.steps)]
        exp_max = [max(r["exposed"][i] for r in allr) for i in range(args.steps)]
        q1, med, q3 = (float(v) for v in np.percentile(step_max, [25, 50, 75]))
        cmed = float(np.median(comm_max))
        grad = max(r["grad_sent"] for r in allr)
        dpg = max(r["dp"]["grad_sent"] for r in allr)
        mismatch = {str(rk): r["mismatch"] for rk, r in enumerate(allr) if r["mismatch"]}
        rec = {"ranks": p, "strategy": args.strategy, "grid": grid_text(plan, names),
               "plan": plan_to_json({k: plan[k] for k in names}), "mode": args.mode,
               "model": args.model, "overlap": args.overlap, "bucket_kb": args.bucket_kb,
               "global_batch": n, "channels": args.channels, "size": args.size,
               "steps": args.steps, "step_s": med, "step_iqr_s": q3 - q1,
               "predicted_step_s": predicted["step_s"] - predicted["update_s"],
               "predicted": predicted, "machine_notes": machine_notes,
               "images_per_s": n / med, "compute_s": med - cmed, "comm_s": cmed,
               "exposed_comm_s": float(np.median(exp_max)),
               "bytes_sent_per_rank": max(r["bytes_sent"] for r in allr),
               "model_bytes_sent_per_rank": max(r["model"]["sent"] for r in allr),
               "grad_bytes_per_rank": grad,
               "model_grad_bytes_per_rank": max(r["model"]["grad_sent"] for r in allr),
               "dp_grad_bytes_per_rank": dpg,
               "grad_bytes_ratio_vs_dp": grad / dpg if dpg else None,
               "bytes_match": not mismatch, "bytes_mismatch": mismatch,
               "bytes_per_rank": [{"measured_sent": r["bytes_sent"], "model": r["model"],
                                   "dp_model": r["dp"]} for r in allr],
               "peak_rss_mb": max(r["rss_mb"] for r in allr),
               "step_s_reps": step_max, "comm_s_reps": comm_max, "exposed_s_reps": exp_max,
               "profile_rank0": summ}
        with open(args.json, "w") as fh:
            json.dump(rec, fh, indent=1)
        print(prof.table(skip=args.warmup), flush=True)
    return 0


# ----------------------------------------------------------------- driver
def fits(strategy, p):
    """Whether ``strategy`` runs on ``p`` ranks (``auto`` always does)."""
    from distconv.strategy import Strategy
    if strategy.strip().lower() == "auto":
        return True
    try:
        Strategy.parse(strategy).resolve(p)
        return True
    except ValueError:
        return False


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


def add_speedups(rows):
    base = [r for r in rows if r["ranks"] == 1]
    if not base:
        pmin = min(r["ranks"] for r in rows)
        base = [r for r in rows if r["ranks"] == pmin]
    b = max(base, key=lambda r: r["images_per_s"])
    for r in rows:
        sp = r["images_per_s"] / b["images_per_s"] * b["ranks"]
        r["speedup"] = sp
        r["efficiency"] = sp / r["ranks"]


def bytes_warnings(rows) -> list:
    """One ``WARNING`` line per point whose measured bytes differ from the analytic model."""
    out = []
    for r in rows:
        if not r.get("bytes_match", False):
            detail = "; ".join(f"rank {k}: {' | '.join(v)}"
                               for k, v in (r.get("bytes_mismatch") or {}).items())
            out.append(f"WARNING: {r['ranks']} rank(s), {r['strategy']}: measured bytes per "
                       f"rank ({r.get('bytes_sent_per_rank')}) differ from the analytic "
                       f"model ({r.get('model_bytes_sent_per_rank')}): {detail}")
    return out


def plot(rows, out, mode):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    by = {}
    for r in rows:
        by.setdefault(r["strategy"], []).append(r)
    for key, ylabel in (("speedup", "speedup"), ("efficiency", "parallel efficiency")):
        fig, ax = plt.subplots(figsize=(5, 4))
        for st, rs in by.items():
            rs = sorted(rs, key=lambda r: r["ranks"])
            ax.plot([r["ranks"] for r in rs], [r[key] for r in rs], "o-", label=st)
        ps = sorted({r["ranks"] for r in rows})
        if key == "speedup":
            ax.plot(ps, ps, "k--", lw=0.8, label="ideal")
        else:
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xlabel("ranks")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{mode} scaling")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, f"{key}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(rows) + 2), 4))
    labels = [f"{r['ranks']}:{r['strategy']}" for r in rows]
    comp = [1e3 * r["compute_s"] for r in rows]
    exp = [1e3 * min(r["exposed_comm_s"], r["comm_s"]) for r in rows]
    other = [1e3 * max(r["comm_s"] - r["exposed_comm_s"], 0.0) for r in rows]
    xs = range(len(rows))
    ax.bar(xs, comp, label="compute")
    ax.bar(xs, exp, bottom=comp, label="exposed comm")
    ax.bar(xs, other, bottom=[a + b for a, b in zip(comp, exp)], label="other comm")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("step time (ms)")
    ax.set_title("step-time breakdown (ranks:strategy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "breakdown.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    files.append(path)
    return files


def merge_reps(recs) -> dict:
    """One record from repetitions of a point (``--repeat``): medians over the steps of all
    repetitions together, bytes checked in every one, grids joined if ``auto`` chose
    different plans."""
    import numpy as np
    if len(recs) == 1:
        return dict(recs[0], reps=1)
    step = [v for r in recs for v in r["step_s_reps"]]
    comm = [v for r in recs for v in r["comm_s_reps"]]
    exp = [v for r in recs for v in r["exposed_s_reps"]]
    q1, med, q3 = (float(v) for v in np.percentile(step, [25, 50, 75]))
    cmed = float(np.median(comm))
    out = dict(recs[0])
    out.update({
        "reps": len(recs), "grid": " / ".join(dict.fromkeys(r["grid"] for r in recs)),
        "plans": [r["plan"] for r in recs], "step_s": med, "step_iqr_s": q3 - q1,
        "images_per_s": out["global_batch"] / med, "compute_s": med - cmed, "comm_s": cmed,
        "exposed_comm_s": float(np.median(exp)),
        "predicted_step_s": float(np.median([r["predicted_step_s"] for r in recs])),
        "bytes_match": all(r["bytes_match"] for r in recs),
        "bytes_mismatch": {f"rep {i + 1}, {k}": v for i, r in enumerate(recs)
                           for k, v in r["bytes_mismatch"].items()},
        "peak_rss_mb": max(r["peak_rss_mb"] for r in recs),
        "step_s_reps": step, "comm_s_reps": comm, "exposed_s_reps": exp,
        "rep_step_s": [r["step_s"] for r in recs]})
    for k in ("bytes_sent_per_rank", "model_bytes_sent_per_rank", "grad_bytes_per_rank",
              "model_grad_bytes_per_rank", "dp_grad_bytes_per_rank"):
        out[k] = max(r[k] for r in recs)
    dpg = out["dp_grad_bytes_per_rank"]
    out["grad_bytes_ratio_vs_dp"] = out["grad_bytes_per_rank"] / dpg if dpg else None
    return out


def driver(args):
    out = os.path.abspath(args.out)
    pts = os.path.join(out, "points")
    plan = []
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
                plan.append((p, st, path, point_command(args, p, st, path)))
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
    nok = 0
    for p, st, path, cmd in plan:
        print(f"== {p} rank(s), {st}: {shlex.join(cmd)}", flush=True)
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                               timeout=args.timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            print(f"   timed out after {args.timeout}s; point skipped", flush=True)
            continue
        if r.returncode != 0 or not os.path.exists(path):
            print(f"   failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}",
                  flush=True)
            continue
        with open(path) as fh:
            rec = json.load(fh)
        got.setdefault((p, st), []).append(rec)
        nok += 1
        print(f"   step {1e3 * rec['step_s']:.3f} ms (IQR {1e3 * rec['step_iqr_s']:.3f}; "
              f"predicted {1e3 * rec['predicted_step_s']:.3f}), {rec['images_per_s']:.1f} "
              f"img/s, grid {rec['grid']}, bytes/rank {rec['bytes_sent_per_rank']} "
              f"(model {'equal' if rec['bytes_match'] else 'DIFFERS'})", flush=True)
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
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})
    for msg in bytes_warnings(rows):
        print(msg, flush=True)
        print(msg, file=sys.stderr, flush=True)
    files = plot(rows, out, args.mode)
    print(f"wrote {csv_path} and {', '.join(files)}", flush=True)
    return 0 if nok == len(plan) else 1


SUMMARY_COLUMNS = ["ranks", "strategy", "grid", "global_batch", "runs", "step_s_median",
                   "step_s_min", "step_s_max", "predicted_step_s_median", "speedup_median",
                   "speedup_min", "speedup_max", "exposed_comm_s_median",
                   "bytes_sent_per_rank", "grad_bytes_per_rank", "dp_grad_bytes_per_rank",
                   "grad_bytes_ratio_vs_dp", "bytes_match_all"]


def summarize(dirs, out) -> int:
    """Merge repeated runs of one sweep: per (ranks, strategy), the median, min and max over
    the runs of each run's median step and of its speedup (each run's speedup is against
    that run's own fastest 1-rank point, so it pairs points measured minutes apart)."""
    import statistics
    groups: dict = {}
    for d in dirs:
        path = os.path.join(d, "scaling.csv")
        if not os.path.exists(path):
            print(f"--summarize: {path} does not exist", file=sys.stderr)
            return 1
        with open(path) as fh:
            for r in csv.DictReader(fh):
                groups.setdefault((int(r["ranks"]), r["strategy"]), []).append(r)
    rows = []
    for (p, st), rs in groups.items():
        def col(k, rs=rs):
            return [float(r[k]) for r in rs if r.get(k) not in ("", None)]
        grids = sorted({r["grid"] for r in rs})
        first = rs[0]
        rows.append({
            "ranks": p, "strategy": st, "grid": " / ".join(grids),
            "global_batch": first["global_batch"], "runs": len(rs),
            "step_s_median": statistics.median(col("step_s")), "step_s_min": min(col("step_s")),
            "step_s_max": max(col("step_s")),
            "predicted_step_s_median": statistics.median(col("predicted_step_s")),
            "speedup_median": statistics.median(col("speedup")),
            "speedup_min": min(col("speedup")), "speedup_max": max(col("speedup")),
            "exposed_comm_s_median": statistics.median(col("exposed_comm_s")),
            "bytes_sent_per_rank": " / ".join(sorted({r["bytes_sent_per_rank"] for r in rs})),
            "grad_bytes_per_rank": " / ".join(sorted({r["grad_bytes_per_rank"] for r in rs})),
            "dp_grad_bytes_per_rank": first["dp_grad_bytes_per_rank"],
            "grad_bytes_ratio_vs_dp": first["grad_bytes_ratio_vs_dp"],
            "bytes_match_all": all(r["bytes_match"] == "True" for r in rs)})
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "summary.csv")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print("| ranks | strategy | grid | runs | step ms median [min, max] | predicted ms | "
          "speedup median [min, max] | bytes/rank = model | grad bytes / DP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["grad_bytes_ratio_vs_dp"]
        print(f"| {r['ranks']} | {r['strategy']} | {r['grid']} | {r['runs']} | "
              f"{1e3 * r['step_s_median']:.1f} [{1e3 * r['step_s_min']:.1f}, "
              f"{1e3 * r['step_s_max']:.1f}] | {1e3 * r['predicted_step_s_median']:.1f} | "
              f"{r['speedup_median']:.2f} [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] | "
              f"{r['bytes_sent_per_rank']} ({'yes' if r['bytes_match_all'] else 'NO'}) | "
              f"{r['grad_bytes_per_rank']} / {r['dp_grad_bytes_per_rank']}"
              f"{f' = {float(ratio):.3f}' if ratio else ''} |")
    print(f"wrote {path}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        from distconv.comm import run_guarded
        return run_guarded(worker, args)
    if args.summarize:
        return summarize(args.summarize, args.out)
    return driver(args)


if __name__ == "__main__":
    pin_threads(1)  # one BLAS/OpenMP thread per rank (the driver's children get it too)
    sys.exit(main())
