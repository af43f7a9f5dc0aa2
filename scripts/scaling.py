#!/usr/bin/env python
"""Strong and weak scaling of a small wide-ResNet block per Strategy, with a per-layer profile.

Run::

    python scripts/scaling.py --mode strong --ranks 1,2,4 --out scaling_out
    python scripts/scaling.py --quick --out tmp          # 2 tiny points, seconds
    python scripts/scaling.py --dry-run                  # print the child commands only

The driver launches each point (rank count x strategy) as its own job,
``mpiexec -n N python -m mpi4py scripts/scaling.py --worker ...`` (``srun -n N ...``
with ``--launcher srun``, the default when ``SLURM_JOB_ID`` is set). A strategy
that does not fit a rank count is skipped with a note. Each worker runs with ONE
BLAS/OpenMP thread per rank, runs ``--warmup`` untimed and ``--steps`` timed
training steps under :class:`distconv.profile.Profiler` and rank 0 writes
``OUT/points/*.json``. The driver writes ``OUT/scaling.csv`` (one row per point)
and PNG plots (matplotlib, Agg backend): ``speedup.png`` and ``efficiency.png``
(vs ranks, one line per strategy) and ``breakdown.png`` (stacked bar of the step
time: compute, exposed communication, other communication).

Model (``--model``):

* ``block`` (default): one ``distconv.models.resnet.BasicBlock(C, C)``
  (conv3x3-BN-ReLU-conv3x3-BN + identity, ReLU), C = ``--channels`` (256)
  on ``--size`` x ``--size`` (28) inputs: a wide-ResNet stage-2 block.
* ``convs``: ``Sequential(Conv2d(C,C,3,pad 1,no bias), BatchNorm2d, ReLU) x 2``.

Every layer uses the point's strategy. One step: ``y = model(x)``,
``model.backward(dy)``, ``sync_gradients(params)`` (the segmented gradient
allreduce), with a barrier before each step; a step's time is the max over ranks.

Batch (``--batch``): strong scaling keeps the global batch N fixed; weak
scaling gives every sample group ``--batch`` samples (global N = batch x s).

CSV columns: ranks, strategy, mode, global_batch, step_s (median), step_iqr_s,
images_per_s, compute_s, comm_s, exposed_comm_s (medians of max-over-ranks),
bytes_sent_per_rank (max over ranks, per step), grad_bytes_per_rank (bytes a rank
sends in ``sync_gradients``), dp_grad_bytes_per_rank (what pure data parallelism
sends for the same weights: an allreduce of all of them over all ranks, byte model
of ``distconv/comm.py``), peak_rss_mb (max over ranks of ``ru_maxrss``),
speedup and efficiency (images/s relative to the fastest 1-rank point; efficiency
= speedup / ranks).
"""
from __future__ import annotations

import os

_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
for _v in _THREAD_ENV:
    os.environ[_v] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

DEFAULTS = dict(ranks="1,2", strategies="sample;channel=2;filter=2", batch=8, size=28,
                channels=256, steps=10, warmup=2)
QUICK = dict(ranks="1,2", strategies="sample", batch=4, size=6, channels=8, steps=3, warmup=1)
COLUMNS = ["ranks", "strategy", "mode", "model", "global_batch", "channels", "size", "steps",
           "step_s", "step_iqr_s", "images_per_s", "compute_s", "comm_s", "exposed_comm_s",
           "bytes_sent_per_rank", "grad_bytes_per_rank", "dp_grad_bytes_per_rank",
           "peak_rss_mb", "speedup", "efficiency"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="scaling.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("strong", "weak"), default="strong")
    ap.add_argument("--ranks", default=None, help="rank counts, comma separated (default 1,2)")
    ap.add_argument("--strategies", default=None,
                    help="';'-separated Strategy.parse texts (default "
                         "'sample;channel=2;filter=2')")
    ap.add_argument("--model", choices=("block", "convs"), default="block",
                    help="block: one resnet BasicBlock(C, C); convs: (Conv2d+BN+ReLU) x 2")
    ap.add_argument("--batch", type=int, default=None,
                    help="strong: global batch; weak: batch per sample group (default 8)")
    ap.add_argument("--size", type=int, default=None, help="H = W (default 28)")
    ap.add_argument("--channels", type=int, default=None, help="C (default 256)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2)")
    ap.add_argument("--out", default="scaling_out", help="output folder")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes (N=4, C=8, 6x6), ranks 1,2, strategy sample: 2 points")
    ap.add_argument("--launcher", choices=("auto", "mpiexec", "srun"), default="auto")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per point")
    ap.add_argument("--seed", type=int, default=0)
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
    from distconv import nn
    from distconv.models.resnet import BasicBlock
    C = args.channels
    if args.model == "block":
        m = BasicBlock(C, C, strategy=st)
        return m, m.conv1.input_distribution
    layers = []
    for _ in range(2):
        layers += [nn.Conv2d(C, C, 3, padding=1, bias=False, strategy=st),
                   nn.BatchNorm2d(C, strategy=st), nn.ReLU()]
    m = nn.Sequential(*layers)
    return m, layers[0].input_distribution


def allreduce_sent_bytes(n, p, item):
    from distconv.distribution import block_sizes
    if p == 1:
        return 0
    b = block_sizes(n, p)
    return max((n - b[r] + b[r] * (p - 1)) * item for r in range(p))


def worker(args):
    import resource

    import numpy as np
    from distconv import DistTensor, Strategy, manual_seed, sync_gradients
    from distconv.comm import world
    from distconv.profile import Profiler
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass
    comm = world()
    p = comm.size
    st = Strategy.parse(args.strategy)
    s, c, f = st.resolve(p)
    n = args.batch if args.mode == "strong" else args.batch * s
    manual_seed(args.seed)
    model, dist = build_model(args, st)
    rng = np.random.default_rng(args.seed)
    dtype = np.float32
    x_glob = rng.standard_normal((n, args.channels, args.size, args.size)).astype(dtype)
    x = DistTensor.from_global(x_glob, dist)
    y = model(x)
    dy = DistTensor.from_global(rng.standard_normal(y.shape).astype(dtype), y.distribution)
    params = model.parameters()
    prof = Profiler(model)
    steps, grad_sent = [], []
    for i in range(args.warmup + args.steps):
        for q in params:
            q.grad = None
        comm.barrier()
        prof.step_begin()
        t0 = time.perf_counter()
        model(x)
        model.backward(dy)
        s0 = comm.stats()["total"]["bytes_sent"]
        sync_gradients(params)
        s1 = comm.stats()["total"]["bytes_sent"]
        t1 = time.perf_counter()
        prof.step_end()
        if i >= args.warmup:
            steps.append(t1 - t0)
            grad_sent.append(s1 - s0)
    summ = prof.summary(skip=args.warmup)
    nw = sum(int(np.prod(q.data.shape)) for q in params)
    mine = {"steps": steps, "comm": [x["comm_s"] for x in summ["steps"]],
            "exposed": [x["exposed_comm_s"] for x in summ["steps"]],
            "bytes_sent": summ["per_step"]["bytes_sent"],
            "grad_sent": float(np.median(grad_sent)),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    allr = comm.allgather_obj(mine)
    if comm.rank == 0:
        step_max = [max(r["steps"][i] for r in allr) for i in range(args.steps)]
        comm_max = [max(r["comm"][i] for r in allr) for i in range(args.steps)]
        exp_max = [max(r["exposed"][i] for r in allr) for i in range(args.steps)]
        q1, med, q3 = (float(v) for v in np.percentile(step_max, [25, 50, 75]))
        cmed = float(np.median(comm_max))
        rec = {"ranks": p, "strategy": args.strategy, "grid": [s, c, f], "mode": args.mode,
               "model": args.model, "global_batch": n, "channels": args.channels,
               "size": args.size, "steps": args.steps,
               "step_s": med, "step_iqr_s": q3 - q1, "images_per_s": n / med,
               "compute_s": med - cmed, "comm_s": cmed,
               "exposed_comm_s": float(np.median(exp_max)),
               "bytes_sent_per_rank": max(r["bytes_sent"] for r in allr),
               "grad_bytes_per_rank": max(r["grad_sent"] for r in allr),
               "dp_grad_bytes_per_rank": allreduce_sent_bytes(int(nw), p, 4),
               "peak_rss_mb": max(r["rss_mb"] for r in allr),
               "step_s_reps": step_max, "profile_rank0": summ}
        with open(args.json, "w") as fh:
            json.dump(rec, fh, indent=1)
        print(prof.table(skip=args.warmup), flush=True)
    return 0


# ----------------------------------------------------------------- driver
def fits(strategy, p):
    from distconv.strategy import Strategy
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
        "--warmup", str(args.warmup), "--seed", str(args.seed)]
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


def driver(args):
    out = os.path.abspath(args.out)
    pts = os.path.join(out, "points")
    plan = []
    for p in args.rank_list:
        for st in args.strategy_list:
            if not fits(st, p):
                print(f"note: strategy {st!r} does not fit {p} rank(s); skipped", flush=True)
                continue
            path = os.path.join(pts, f"p{p}_{slug(st)}.json")
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
    for v in _THREAD_ENV:
        env[v] = "1"
    env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                 else "")
    rows = []
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
        rows.append(rec)
        print(f"   step {1e3 * rec['step_s']:.3f} ms (IQR {1e3 * rec['step_iqr_s']:.3f}), "
              f"{rec['images_per_s']:.1f} img/s", flush=True)
    if not rows:
        print("every point failed", file=sys.stderr)
        return 1
    add_speedups(rows)
    csv_path = os.path.join(out, "scaling.csv")
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    files = plot(rows, out, args.mode)
    print(f"wrote {csv_path} and {', '.join(files)}", flush=True)
    return 0 if len(rows) == len(plan) else 1


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, _ROOT)
        from distconv.comm import run_guarded
        return run_guarded(worker, args)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
