"""One conv layer per Strategy, step by step: the measurements of ``scripts/bench_layers.py``
(its docstring says what is timed and how).

* :class:`Case`: one strategy's layer, inputs (``x``: N x C x S x S, ``dy``: N x F x S x S,
  both in the layer's activation distribution) and this rank's step records;
* :func:`summarize`: every rank's records of one strategy -> the reported figures;
* :class:`BaselineChild` and :func:`serve_baseline`: the 1-rank baseline as an MPI
  singleton child process, one step whenever rank 0 asks.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time

import numpy as np

from ..comm import allreduce_bytes
from ..envinfo import THREAD_ENV_VARS, blas_info, cpu_model, git_state
from .stats import is_clean, stats_delta

# environment variables of MPI launchers: removed for the 1-rank child (MPI singleton)
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "MPI_LOCAL", "MPIR_", "OMPI_", "PRTE_",
                      "SLURM_", "PALS_", "MV2_")
_PROTO = "BENCH_LAYERS:"


def all_strategies(p):
    """Every (s, c, f) with s*c*f == p: pure sample, channel, filter first, then the mixes."""
    from distconv.strategy import Strategy
    out = []
    for c in range(1, p + 1):
        for f in range(1, p + 1):
            if p % (c * f) == 0:
                out.append(Strategy(sample=p // (c * f), channel=c, filter=f))

    def key(st):
        s, c, f = st.sample, st.channel, st.filter
        kind = 0 if s == p else 1 if c == p else 2 if f == p else 3
        return (kind, -s, -c)
    return sorted(out, key=key)


def strategy_label(st, p):
    s, c, f = st.resolve(p)
    if p == 1:
        return "1 rank, Strategy()"
    parts = [f"{n}={v}" for n, v in (("sample", s), ("channel", c), ("filter", f)) if v > 1]
    return ",".join(parts)


def allreduce_sent_bytes(n, p, item):
    """Max over ranks of the bytes one rank sends in an allreduce of n elements (comm.py model)."""
    return max(allreduce_bytes(n, p, r, item)[0] for r in range(p))


def sum_kinds(kinds):
    tot = {"calls": 0, "bytes_sent": 0, "bytes_recv": 0, "time": 0.0}
    for d in kinds.values():
        for f in tot:
            tot[f] += d[f]
    return tot


def med(vals):
    return float(np.median(vals)) if len(vals) else None


def configure(args):
    from distconv import set_default_dtype
    from distconv.backend import configure_threads
    set_default_dtype(np.dtype(args.dtype))
    return configure_threads(args.threads)


def shape_of(args):
    return {"batch": args.batch, "channels": args.channels, "filters": args.filters,
            "size": args.size, "kernel": args.kernel, "padding": args.kernel // 2,
            "stride": 1, "bias": bool(args.bias), "dtype": args.dtype}


def environment(comm, args, threads_applied):
    from ..comm import mpi_info
    mpi = mpi_info()
    try:
        aff = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        aff = None
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "affinity": aff,
            "threads_applied": threads_applied, "blas": blas_info(),
            "thread_env": {v: os.environ.get(v) for v in THREAD_ENV_VARS}}
    ranks = comm.allgather_obj(mine)
    return {
        "ranks": comm.size,
        "threads_per_rank": args.threads,
        "per_rank": ranks,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "mpi4py": mpi["mpi4py"],
        "mpi_library": mpi["mpi_library"],
        "mpi_vendor": mpi["mpi_vendor"],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus_online": os.cpu_count(),
        "git": git_state(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


# ----------------------------------------------------------------- measuring
class Case:
    """One strategy: its layer, inputs and this rank's record of every timed step."""

    def __init__(self, st, args, x_glob, dy_glob):
        from distconv.nn import Conv2d
        from distconv.tensor import DistTensor
        self.strategy = st
        k = args.kernel
        self.layer = Conv2d(args.channels, args.filters, k, padding=k // 2, bias=args.bias,
                            strategy=st)
        dist = self.layer.input_distribution
        self.x = DistTensor.from_global(x_glob, dist)
        self.dy = DistTensor.from_global(dy_glob, dist)
        self.params = list(self.layer.parameters())
        self.recs = []

    def step(self, comm, record=True):
        from distconv.nn import sync_gradients
        for p in self.params:
            p.grad = None
        comm.barrier()
        s0 = comm.stats()
        c0 = time.process_time()
        t0 = time.perf_counter()
        self.layer(self.x)
        t1 = time.perf_counter()
        self.layer.backward(self.dy)
        t2 = time.perf_counter()
        c2 = time.process_time()
        s1 = comm.stats()
        c2b = time.process_time()
        t2b = time.perf_counter()
        sync_gradients(self.params)
        t3 = time.perf_counter()
        c3 = time.process_time()
        s2 = comm.stats()
        if record:
            # the stats() snapshot between backward and sync is not part of the step
            wall = (t3 - t0) - (t2b - t2)
            cpu = (c3 - c0) - (c2b - c2)
            self.recs.append({"step": wall, "fwd": t1 - t0, "bwd": t2 - t1, "sync": t3 - t2b,
                              "lost": max(0.0, wall - cpu),
                              "act": stats_delta(s1, s0), "grad": stats_delta(s2, s1)})


def make_cases(strategies, args):
    from distconv.nn import manual_seed
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    x_glob = rng.standard_normal((args.batch, args.channels, args.size, args.size)).astype(dtype)
    dy_glob = rng.standard_normal((args.batch, args.filters, args.size, args.size)) \
        .astype(dtype)
    manual_seed(args.seed)
    return [Case(st, args, x_glob, dy_glob) for st in strategies]


def _kinds_per_step(recs):
    """``{"act"|"grad": {kind: {calls, bytes_sent, bytes_recv, time}}}``: each kind's mean
    per step over the records ``recs``."""
    kinds = {}
    for part in ("act", "grad"):
        agg = {}
        for x in recs:
            for k, d in x[part].items():
                e = agg.setdefault(k, {"calls": 0, "bytes_sent": 0, "bytes_recv": 0,
                                       "time": 0.0})
                for f in e:
                    e[f] += d[f]
        kinds[part] = {k: {f: v[f] / len(recs) for f in v} for k, v in agg.items()}
    return kinds


def _rank_figures(r, mine, use, reps):
    """One rank's figures from its step records ``mine``: medians over the repetitions
    ``use``; the step and communication time of each of the first ``reps``."""
    recs = [mine[i] for i in use]
    act_t = [sum_kinds(x["act"]) for x in recs]
    grad_t = [sum_kinds(x["grad"]) for x in recs]
    comm_t = [a["time"] + g["time"] for a, g in zip(act_t, grad_t)]
    steps = [x["step"] for x in recs]
    return {
        "rank": r,
        "step_s_reps": [x["step"] for x in mine[:reps]],
        "comm_s_reps": [sum_kinds(x["act"])["time"] + sum_kinds(x["grad"])["time"]
                        for x in mine[:reps]],
        "step_s": med(steps),
        "fwd_s": med([x["fwd"] for x in recs]),
        "bwd_s": med([x["bwd"] for x in recs]),
        "sync_s": med([x["sync"] for x in recs]),
        "comm_s": med(comm_t),
        "compute_s": med([s - c for s, c in zip(steps, comm_t)]),
        "lost_s": med([x["lost"] for x in recs]),
        "act_bytes_sent": med([a["bytes_sent"] for a in act_t]),
        "act_bytes_recv": med([a["bytes_recv"] for a in act_t]),
        "grad_bytes_sent": med([g["bytes_sent"] for g in grad_t]),
        "grad_bytes_recv": med([g["bytes_recv"] for g in grad_t]),
        "collectives_per_step": _kinds_per_step(recs),
    }


def summarize(allr, label, grid, frac):
    """Reduce ``allr[rank][rep]`` step records (of one strategy) to the reported figures."""
    p = len(allr)
    reps = min(len(r) for r in allr)
    step_max = [max(allr[r][i]["step"] for r in range(p)) for i in range(reps)]
    lost_max = [max(allr[r][i]["lost"] for r in range(p)) for i in range(reps)]
    clean = [is_clean([allr[r][i]["step"] for r in range(p)],
                      [allr[r][i]["lost"] for r in range(p)], frac) for i in range(reps)]
    step_clean = [t for t, ok in zip(step_max, clean) if ok]
    # phases, comm and bytes from the clean repetitions if there are enough of them
    use = [i for i in range(reps) if clean[i]]
    use_clean = len(use) >= min(3, reps)
    if not use_clean:
        use = list(range(reps))
    per_rank = [_rank_figures(r, allr[r], use, reps) for r in range(p)]
    return {
        "strategy": label,
        "grid": grid,
        "step_s": med(step_max),
        "step_s_clean": med(step_clean),
        "step_s_min": float(min(step_max)) if step_max else None,
        "repeats": reps,
        "clean_repeats": len(step_clean),
        "phases_from": "clean repetitions" if use_clean else "all repetitions",
        "step_s_reps": step_max,
        "lost_s_reps": lost_max,
        "clean_reps": clean,
        "fwd_s": max(x["fwd_s"] for x in per_rank),
        "bwd_s": max(x["bwd_s"] for x in per_rank),
        "sync_s": max(x["sync_s"] for x in per_rank),
        "compute_s_mean": float(np.mean([x["compute_s"] for x in per_rank])),
        "compute_s_max": max(x["compute_s"] for x in per_rank),
        "comm_s_mean": float(np.mean([x["comm_s"] for x in per_rank])),
        "comm_s_max": max(x["comm_s"] for x in per_rank),
        "act_bytes_sent": max(x["act_bytes_sent"] for x in per_rank),
        "grad_bytes_sent": max(x["grad_bytes_sent"] for x in per_rank),
        "per_rank": per_rank,
    }


class BaselineChild:
    """The 1-rank baseline: ``script`` (bench_layers.py) as an MPI singleton child of rank
    0, driven step by step.

    The child (``--serve-baseline``) builds the layer with ``Strategy()`` on its own 1-rank
    world and runs the warm-up steps; then, for each ``step`` line it reads on stdin, it runs
    one timed step and answers with that step's record as one JSON line.
    """

    def __init__(self, args, script):
        cmd = [sys.executable, script, "--serve-baseline",
               "--batch", str(args.batch), "--channels", str(args.channels),
               "--filters", str(args.filters), "--size", str(args.size),
               "--kernel", str(args.kernel), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats), "--dtype", args.dtype,
               "--threads", str(args.threads), "--seed", str(args.seed)]
        if args.bias:
            cmd.append("--bias")
        env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
        self.error = None
        self.recs = []
        self.environment = None
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, bufsize=1)
        except OSError as e:
            self.proc, self.error = None, f"cannot start the 1-rank child: {e!r}"
            return
        if self._read() != "ready":
            self.error = self.error or "1-rank child did not get ready"

    def _read(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.error = f"1-rank child ended early (exit code {self.proc.wait()})"
                return None
            if line.startswith(_PROTO):
                return json.loads(line[len(_PROTO):])

    def _send(self, cmd):
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError) as e:
            self.error = f"1-rank child: {e!r}"
            return False

    def step(self):
        if self.error is None and self._send("step"):
            rec = self._read()
            if rec is not None:
                self.recs.append(rec)

    def close(self):
        if self.proc is None:
            return
        if self.error is None and self._send("done"):
            self.environment = self._read()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()


def serve_baseline(args):
    """Child side of :class:`BaselineChild` (a 1-rank world)."""
    from distconv.comm import world
    from distconv.strategy import Strategy
    comm = world()
    if comm.size != 1:
        raise SystemExit("--serve-baseline must run as a single process (MPI singleton)")
    threads = configure(args)
    case = make_cases([Strategy()], args)[0]
    for _ in range(args.warmup):
        case.step(comm, record=False)
    print(_PROTO + json.dumps("ready"), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            case.step(comm)
            print(_PROTO + json.dumps(case.recs[-1]), flush=True)
        elif cmd == "done":
            print(_PROTO + json.dumps(environment(comm, args, threads)), flush=True)
            break
    return 0


# ----------------------------------------------------------------- the timed rounds
def time_rounds(cases, comm, args, child=None, with_child=False):
    """Interleaved rounds: one step of every case, then (``with_child``) one step of the
    1-rank child while the other ranks sleep; until every case and the child have
    ``args.repeats`` clean repetitions (at least ``args.repeats`` rounds, at most
    ``args.max_repeats``; decided on rank 0) -> ``(rounds, wall seconds)``."""
    p = comm.size
    clean_counts = [0] * (len(cases) + 1)
    rounds = 0
    t_start = time.perf_counter()
    while True:
        for case in cases:
            case.step(comm)
        if with_child:
            if child is not None:
                child.step()
            comm.idle_barrier(0.02)
        rounds += 1
        last = comm.allgather_obj([(c.recs[-1]["step"], c.recs[-1]["lost"]) for c in cases])
        go_on = False
        if comm.rank == 0:
            for i in range(len(cases)):
                clean_counts[i] += is_clean([last[r][i][0] for r in range(p)],
                                            [last[r][i][1] for r in range(p)], args.clean_frac)
            if child is not None and child.error is None and child.recs:
                clean_counts[-1] += is_clean([child.recs[-1]["step"]],
                                             [child.recs[-1]["lost"]], args.clean_frac)
            else:
                clean_counts[-1] = args.repeats
            go_on = rounds < args.repeats or (rounds < args.max_repeats
                                              and min(clean_counts) < args.repeats)
        if not comm.mpi.bcast(go_on, root=0):
            break
    return rounds, time.perf_counter() - t_start


def add_speedups(rows, baseline, flops, p, paired):
    """Speedup, efficiency and GFLOP/s of every row against the 1-rank ``baseline`` (with
    ``paired``: also per round, the 1-rank step of round i over the multi-rank step of the
    same round)."""
    baseline["gflops"] = flops / baseline["step_s"] / 1e9
    for r in rows:
        r["speedup"] = baseline["step_s"] / r["step_s"]
        r["efficiency"] = r["speedup"] / p
        r["gflops"] = flops / r["step_s"] / 1e9
        if baseline.get("step_s_clean") and r["step_s_clean"]:
            r["speedup_clean"] = baseline["step_s_clean"] / r["step_s_clean"]
        if baseline.get("step_s_min"):
            r["speedup_best"] = baseline["step_s_min"] / r["step_s_min"]
        if paired:
            pairs = list(zip(baseline["step_s_reps"], r["step_s_reps"]))
            r["speedup_paired"] = med([b / t for b, t in pairs])
            r["speedup_paired_reps"] = [b / t for b, t in pairs]
