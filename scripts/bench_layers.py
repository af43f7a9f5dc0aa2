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
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time

import numpy as np

from distconv.bench.stats import is_clean, stats_delta
from distconv.envinfo import THREAD_ENV_VARS, blas_info, cpu_model, git_state, pin_threads

MB = 1e6
DEFAULTS = dict(batch=8, channels=256, filters=256, size=28, kernel=3, repeats=20, warmup=3)
QUICK = dict(batch=4, channels=16, filters=16, size=8, kernel=3, repeats=2, warmup=1)
# a step counts as clean if the time the OS took away is below a fraction of the step or
# below CLEAN_FLOOR_S seconds (distconv.bench.stats.is_clean)
# environment variables of MPI launchers: removed for the 1-rank child (MPI singleton)
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "MPI_LOCAL", "MPIR_", "OMPI_", "PRTE_",
                      "SLURM_", "PALS_", "MV2_")
_PROTO = "BENCH_LAYERS:"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="bench_layers.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, QUICK[k] if a.quick else v)
    if a.max_repeats is None:
        a.max_repeats = a.repeats if a.quick else 3 * a.repeats
    for k in ("batch", "channels", "filters", "size", "kernel", "repeats", "threads"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        ap.error("--warmup must be >= 0")
    if a.max_repeats < a.repeats:
        ap.error("--max-repeats must be >= --repeats")
    if not 0 < a.clean_frac < 1:
        ap.error("--clean-frac must be between 0 and 1")
    if a.baseline_json and a.no_baseline:
        ap.error("--baseline-json and --no-baseline exclude each other")
    return a


# ----------------------------------------------------------------- helpers
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
    from distconv.distribution import block_sizes
    if p == 1:
        return 0
    b = block_sizes(n, p)
    return max((n - b[r] + b[r] * (p - 1)) * item for r in range(p))


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
    import mpi4py
    from mpi4py import MPI
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
        "mpi4py": mpi4py.__version__,
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
        "mpi_vendor": [str(v) for v in MPI.get_vendor()],
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
    per_rank = []
    for r in range(p):
        recs = [allr[r][i] for i in use]
        act_t = [sum_kinds(x["act"]) for x in recs]
        grad_t = [sum_kinds(x["grad"]) for x in recs]
        comm_t = [a["time"] + g["time"] for a, g in zip(act_t, grad_t)]
        steps = [x["step"] for x in recs]
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
        per_rank.append({
            "rank": r,
            "step_s_reps": [x["step"] for x in allr[r][:reps]],
            "comm_s_reps": [sum_kinds(x["act"])["time"] + sum_kinds(x["grad"])["time"]
                            for x in allr[r][:reps]],
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
            "collectives_per_step": kinds,
        })
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
    """The 1-rank baseline: this script as an MPI singleton child of rank 0, driven step by step.

    The child (``--serve-baseline``) builds the layer with ``Strategy()`` on its own 1-rank
    world and runs the warm-up steps; then, for each ``step`` line it reads on stdin, it runs
    one timed step and answers with that step's record as one JSON line.
    """

    def __init__(self, args):
        cmd = [sys.executable, os.path.abspath(__file__), "--serve-baseline",
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


# ----------------------------------------------------------------- output
def fmt_ms(t):
    return "-" if t is None else f"{t * 1e3:.1f}"


def fmt_x(v):
    return "-" if v is None else f"{v:.2f}x"


def print_table(result):
    sh = result["shape"]
    env = result["environment"]
    p = env["ranks"]
    base = result.get("baseline")
    print()
    print(f"Conv2d {sh['channels']}->{sh['filters']} {sh['kernel']}x{sh['kernel']} on "
          f"{sh['batch']}x{sh['channels']}x{sh['size']}x{sh['size']} {sh['dtype']}; "
          f"{p} rank(s) x {env['threads_per_rank']} BLAS thread; step = forward + backward "
          f"+ sync_gradients, time = max over ranks")
    if base and base.get("step_s"):
        print(f"1-rank baseline: {fmt_ms(base['step_s'])} ms median, "
              f"{fmt_ms(base.get('step_s_clean'))} ms clean "
              f"({base.get('clean_repeats', '?')}/{base.get('repeats', '?')} clean reps; "
              f"fwd {fmt_ms(base.get('fwd_s'))}, bwd {fmt_ms(base.get('bwd_s'))} ms) "
              f"[{base['source']}]")
    hdr = (f"{'strategy':<20}{'step ms':>9}{'speedup':>9}{'paired':>8}{'clean ms':>10}"
           f"{'clean sp':>10}{'clean/n':>9}{'fwd ms':>8}{'bwd ms':>8}{'sync ms':>8}"
           f"{'comp ms':>8}{'comm ms':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in result["strategies"]:
        print(f"{r['strategy']:<20}{fmt_ms(r['step_s']):>9}{fmt_x(r.get('speedup')):>9}"
              f"{fmt_x(r.get('speedup_paired')):>8}"
              f"{fmt_ms(r['step_s_clean']):>10}{fmt_x(r.get('speedup_clean')):>10}"
              f"{str(r['clean_repeats']) + '/' + str(r['repeats']):>9}"
              f"{fmt_ms(r['fwd_s']):>8}{fmt_ms(r['bwd_s']):>8}{fmt_ms(r['sync_s']):>8}"
              f"{fmt_ms(r['compute_s_mean']):>8}{fmt_ms(r['comm_s_mean']):>8}")
    print(f"step: median over repetitions; speedup = 1-rank median / step (ideal {p}.00x); "
          f"paired: median over rounds of 1-rank step / step of the same round; clean: "
          f"medians over the repetitions in which no rank lost over {result['clean_frac']:.0%} "
          f"of the step to other processes. fwd/bwd/sync: phase medians (max over ranks); "
          f"comp/comm: mean over ranks of step minus Communicator.stats() time, and that time "
          f"(includes waiting in collectives).")
    print()
    hdr = (f"{'strategy':<20}{'act MB':>9}{'grad MB':>9}{'total MB':>10}{'dp grad MB':>12}"
           f"{'grad/dp':>9}  collectives per step (calls x kind: MB sent)")
    print(hdr)
    print("-" * len(hdr))
    for r in result["strategies"]:
        dp = r["dp_grad_bytes_sent"]
        colls = []
        for part in ("act", "grad"):
            kinds = max(r["per_rank"], key=lambda x: x["act_bytes_sent"] + x["grad_bytes_sent"]) \
                ["collectives_per_step"][part]
            for k, v in kinds.items():
                colls.append(f"{v['calls']:g}x {k}{' (sync)' if part == 'grad' else ''}: "
                             f"{v['bytes_sent'] / MB:.2f}")
        print(f"{r['strategy']:<20}{r['act_bytes_sent'] / MB:9.2f}{r['grad_bytes_sent'] / MB:9.2f}"
              f"{(r['act_bytes_sent'] + r['grad_bytes_sent']) / MB:10.2f}{dp / MB:12.2f}"
              f"{(r['grad_bytes_sent'] / dp if dp else 0):9.2f}  {'; '.join(colls)}")
    print("MB: 1e6 bytes one rank sends per step (max over ranks): act = forward+backward "
          "collectives, grad = sync_gradients; dp grad = the gradient allreduce of data "
          "parallelism (all |w|) on the same ranks; grad/dp = grad MB / dp grad MB.")
    la, lb = env["loadavg_start"][0], env["loadavg_end"][0]
    print(f"load average (1 min) {la:.2f} at start, {lb:.2f} at end, {env['cpus_online']} CPUs"
          + ("  -- other processes were running: prefer the clean columns"
             if max(la, lb) > p + 0.5 else ""))


def profile_cases(cases, comm, top):
    import cProfile
    import io
    import pstats
    for case in cases:
        prof = cProfile.Profile() if comm.rank == 0 else None
        if prof:
            prof.enable()
        for _ in range(3):
            case.step(comm, record=False)
        if prof:
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
            print(f"\n=== cProfile rank 0, 3 steps of {strategy_label(case.strategy, comm.size)} "
                  f"(sorted by own time) ===")
            print(s.getvalue())


# ----------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.serve_baseline:
        return serve_baseline(args)
    from distconv.comm import world
    from distconv.strategy import Strategy

    threads_applied = configure(args)
    comm = world()
    p = comm.size
    dtype = np.dtype(args.dtype)

    if args.strategies:
        try:
            strategies = [Strategy.parse(t) for t in args.strategies.split(";") if t.strip()]
            if not strategies:
                raise ValueError("--strategies lists no strategy")
            for st in strategies:
                st.resolve(p)
        except ValueError as e:
            if comm.rank == 0:
                print(f"bench_layers: {e}", file=sys.stderr)
            return 2
    else:
        strategies = all_strategies(p)
    if p == 1 and not args.no_baseline:
        strategies = [Strategy()] + [s for s in strategies if s.resolve(1) != (1, 1, 1)]

    load_start = os.getloadavg()
    child = None
    do_child = p > 1 and not args.no_baseline and not args.baseline_json
    if do_child:
        # rank 0 starts the 1-rank child; the others sleep until it is warm
        if comm.rank == 0:
            child = BaselineChild(args)
        comm.idle_barrier(0.02)

    cases = make_cases(strategies, args)
    for case in cases:
        for _ in range(args.warmup):
            case.step(comm, record=False)

    clean_counts = [0] * (len(cases) + 1)
    rounds = 0
    t_start = time.perf_counter()
    while True:
        for case in cases:
            case.step(comm)
        if do_child:
            if child is not None:
                child.step()
            comm.idle_barrier(0.02)
        rounds += 1
        # which strategies had a clean repetition this round (decided on rank 0)
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
    wall = time.perf_counter() - t_start
    if child is not None:
        child.close()

    wsize = args.filters * args.channels * args.kernel ** 2 + (args.filters if args.bias else 0)
    dp_bytes = allreduce_sent_bytes(wsize, p, dtype.itemsize)
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
    env = environment(comm, args, threads_applied)
    env["loadavg_start"] = load_start
    env["loadavg_end"] = os.getloadavg()

    if args.profile:
        profile_cases(cases, comm, args.profile)
    if comm.rank != 0:
        return 0

    shape = shape_of(args)
    flops = 3 * 2.0 * args.batch * args.channels * args.filters * args.size ** 2 \
        * args.kernel ** 2
    baseline = None
    if p == 1 and not args.no_baseline:
        baseline = dict(rows[0], source="this run (1 rank)")
        baseline.pop("per_rank", None)
    elif args.baseline_json:
        with open(args.baseline_json) as fh:
            b = json.load(fh)
        if b.get("shape") != shape or not b.get("baseline"):
            print(f"bench_layers: --baseline-json {args.baseline_json} has shape "
                  f"{b.get('shape')} (and baseline {bool(b.get('baseline'))}), this run "
                  f"{shape}", file=sys.stderr)
            return 2
        baseline = dict(b["baseline"], source=f"--baseline-json {args.baseline_json}, another "
                        f"run ({b.get('environment', {}).get('date')})")
    elif do_child:
        if child.error or not child.recs:
            print(f"bench_layers: no 1-rank baseline: {child.error}", file=sys.stderr)
        else:
            baseline = summarize([child.recs], "1 rank, Strategy()",
                                 {"sample": 1, "channel": 1, "filter": 1}, args.clean_frac)
            baseline.pop("per_rank", None)
            baseline["source"] = ("this run: 1-rank MPI singleton child of rank 0, steps "
                                  "interleaved with the multi-rank ones")
            baseline["child_environment"] = child.environment
    if baseline and baseline.get("step_s"):
        baseline["gflops"] = flops / baseline["step_s"] / 1e9
        for r in rows:
            r["speedup"] = baseline["step_s"] / r["step_s"]
            r["efficiency"] = r["speedup"] / p
            r["gflops"] = flops / r["step_s"] / 1e9
            if baseline.get("step_s_clean") and r["step_s_clean"]:
                r["speedup_clean"] = baseline["step_s_clean"] / r["step_s_clean"]
            if baseline.get("step_s_min"):
                r["speedup_best"] = baseline["step_s_min"] / r["step_s_min"]
            if do_child:
                # the 1-rank step of round i runs right after the multi-rank steps of round i
                pairs = list(zip(baseline["step_s_reps"], r["step_s_reps"]))
                r["speedup_paired"] = med([b / t for b, t in pairs])
                r["speedup_paired_reps"] = [b / t for b, t in pairs]

    result = {
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
        "notes": [
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
        ],
    }
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
