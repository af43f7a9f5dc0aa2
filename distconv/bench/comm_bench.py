"""``DistTensor.redistribute`` against the raw mpi4py collective moving the same bytes
(the measurements of ``scripts/bench_comm.py``; its docstring says what is timed).

:class:`CommBench` holds the 1-axis grid over all ranks; :meth:`CommBench.measure` times
one transition on one tensor size and returns its row. :func:`print_table` and
:func:`environment` are rank 0's report.
"""
from __future__ import annotations

import datetime
import functools
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

TRANSITIONS = ("allgather N", "allgather C", "reduce_scatter N", "reduce_scatter C",
               "alltoall N->C")
MIB = 1 << 20
#: the raw collective each kind is compared with
RAW_NAMES = {"allgather": "Allgather", "reduce_scatter": "Reduce_scatter_block",
             "alltoall": "Alltoall"}
F32 = np.float32


def timing_summary(times):
    """Seconds of every repetition -> median, min, max and all of them."""
    t = [float(x) for x in times]
    return {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
            "reps_s": t}


class CommBench:
    """The grid ``ProcessGrid(None, (p,), ("x",))`` over all ranks and the tensor shapes:
    N = ``batch`` rounded up to a multiple of p, H = W = ``hw``, C chosen per size.

    ``raw_ops(kind, numel)``: the peer, the raw mpi4py collectives of ``kind`` on flat
    preallocated float32 buffers of ``numel`` elements, ``(raw, raw with a fresh receive
    buffer, v-variant)`` (``scripts/bench_comm.py`` supplies them: mpi4py stays out of
    the package)."""

    def __init__(self, batch, hw, raw_ops):
        from distconv.comm import world
        from distconv.grid import ProcessGrid
        self.grid = ProcessGrid(None, (world().size,), ("x",))
        self.comm = self.grid.comm    # distconv Communicator (world); its stats() we read
        self.raw_ops = raw_ops
        self.p, self.rank = self.grid.size, self.grid.rank
        self.item = np.dtype(F32).itemsize
        self.n = -(-max(batch, self.p) // self.p) * self.p
        self.hw = hw
        d = self.dist
        # transition -> (source dist, target dist, stats kind, raw kind)
        self.specs = {
            "allgather N": (d(0), d(), "allgather", "allgather"),
            "allgather C": (d(1), d(), "allgather", "allgather"),
            "reduce_scatter N": (d(pending=True), d(0), "reduce_scatter", "reduce_scatter"),
            "reduce_scatter C": (d(pending=True), d(1), "reduce_scatter", "reduce_scatter"),
            "alltoall N->C": (d(0), d(1), "alltoall", "alltoall"),
        }

    def shape_for(self, mib):
        """The N x C x H x W shape of about ``mib`` MiB, C a multiple of p."""
        n, hw, p = self.n, self.hw, self.p
        c = max(1, round(mib * MIB / (self.item * n * hw * hw)))
        c = -(-c // p) * p     # equal blocks, so the raw non-v collective moves the same bytes
        return (n, c, hw, hw)

    def dist(self, split_dim=None, pending=False):
        from distconv.distribution import Distribution
        sp = [None] * 4
        if split_dim is not None:
            sp[split_dim] = ("x",)
        return Distribution(self.grid, sp, pending=("x",) if pending else ())

    def min_sent(self, kind, nbytes):
        """The analytic minimum of bytes one rank sends in collective ``kind``."""
        p = self.p
        if kind == "alltoall":
            return nbytes * (p - 1) // (p * p)
        return nbytes * (p - 1) // p

    def timed(self, fn):
        """Seconds of one call of ``fn`` after a barrier."""
        self.comm.barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def reduce_max(self, times):
        """Elementwise max over ranks of a list of seconds."""
        return self.comm.allreduce_untracked(np.asarray(times, np.float64), "max")

    def check(self, dc_op, glob, dst, shape):
        """Whether one redistribute gives every rank its block of ``glob`` (agreed by all
        ranks). Pending sources hold the value on rank 0 and zeros elsewhere, so the sum
        is exact."""
        y = dc_op()
        want = glob[dst.slices(shape)]
        ok = bool(y.distribution == dst and y.local.shape == want.shape
                  and np.array_equal(y.local, want))
        return bool(self.comm.allreduce_untracked(np.asarray([int(ok)]), "min")[0])

    def _time_variants(self, variants, warmup, repeats):
        """Warm-up, then ``repeats`` interleaved rounds of every variant -> seconds of each
        (max over ranks per repetition)."""
        for _ in range(warmup):
            for fn in variants.values():
                self.timed(fn)
        self.comm.reset_stats()
        local = {k: [] for k in variants}
        for _ in range(repeats):
            for k, fn in variants.items():
                local[k].append(self.timed(fn))
        return local

    def measure(self, name, glob, mib, args):
        """One transition on the global tensor ``glob`` (the same on every rank) -> its row:
        times, bus bandwidths, their ratio, the bytes ``stats()`` recorded and the check."""
        from distconv.tensor import DistTensor
        shape = glob.shape
        numel = int(np.prod(shape))
        nbytes = numel * self.item
        src, dst, stats_kind, raw_kind = self.specs[name]
        dc_op = functools.partial(DistTensor.from_global(glob, src).redistribute, dst)
        raw, raw_fresh, raw_v = self.raw_ops(raw_kind, numel)
        check_ok = self.check(dc_op, glob, dst, shape) if args.check else None
        variants = {"raw": raw, "distconv": dc_op}
        if args.diagnostics:
            buf = np.ones(numel, F32)
            dstbuf = np.empty(numel, F32)
            variants.update({"raw_v": raw_v, "raw_fresh_recv": raw_fresh,
                             "local_copy_tensor": lambda: np.copyto(dstbuf, buf)})
        local_times = self._time_variants(variants, args.warmup, args.repeats)
        kinds = {k: v for k, v in self.comm.stats().items() if k != "total"}
        s = kinds.get(stats_kind, {"calls": 0, "bytes_sent": 0, "bytes_recv": 0, "time": 0.0})
        calls = max(1, s["calls"])
        res = {k: timing_summary(self.reduce_max(v)) for k, v in local_times.items()}
        # time spent inside Communicator collectives, per call, max over ranks
        inside = self.reduce_max([s["time"] / calls])[0]
        raw_t, dc_t = res["raw"]["median_s"], res["distconv"]["median_s"]
        msent = self.min_sent(stats_kind, nbytes)
        return {
            "transition": name, "mib": nbytes / MIB, "requested_mib": mib,
            "shape": list(shape), "bytes": nbytes,
            "source": repr(src), "target": repr(dst),
            "raw_collective": RAW_NAMES[raw_kind],
            "raw_time_s": raw_t, "distconv_time_s": dc_t,
            "raw_busbw_GBps": msent / raw_t / 1e9 if raw_t > 0 else None,
            "distconv_busbw_GBps": msent / dc_t / 1e9 if dc_t > 0 else None,
            "ratio_raw_over_distconv": raw_t / dc_t if dc_t > 0 else None,
            "stats_kind": stats_kind,
            "stats_calls_per_redistribute": s["calls"] / args.repeats,
            "stats_kinds_seen": sorted(kinds),
            "bytes_sent_per_rank_stats": s["bytes_sent"] / calls,
            "bytes_recv_per_rank_stats": s["bytes_recv"] / calls,
            "bytes_sent_per_rank_min": msent,
            "comm_time_inside_collective_s_mean": float(inside),
            "correct": check_ok,
            "timings": res,
        }

    def run(self, args):
        """Every size of ``args.sizes`` x transition of ``args.transitions`` -> rows
        (distconv's own accounting agrees across ranks; rank 0's numbers are kept)."""
        rows = []
        for mib in args.sizes:
            shape = self.shape_for(mib)
            rng = np.random.default_rng(1234)
            glob = rng.standard_normal(shape, dtype=F32)   # same on every rank
            for name in args.transitions:
                rows.append(self.measure(name, glob, mib, args))
            del glob
        return rows


# ------------------------------------------------------------------ report (rank 0)
def fmt_bytes(b):
    b = float(b)
    if b >= MIB:
        return f"{b / MIB:.3f} MiB"
    if b >= 1024:
        return f"{b / 1024:.1f} KiB"
    return f"{b:.0f} B"


def _print_diagnostics(rows):
    print()
    print("diagnostics (ms, medians): raw = preallocated non-v collective; raw_v = v-variant; "
          "fresh = raw with np.empty receive buffer each call; copy = local copy of the "
          "whole tensor; inside = mean (not median) time per call inside the Communicator "
          "collective, from stats()")
    hdr = (f"{'transition':<17} {'MiB':>6} {'raw':>8} {'raw_v':>8} {'fresh':>8} "
           f"{'copy':>8} {'inside':>8} {'dc':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        t = r["timings"]
        print(f"{r['transition']:<17} {r['mib']:>6.4g} {t['raw']['median_s'] * 1e3:>8.3f} "
              f"{t['raw_v']['median_s'] * 1e3:>8.3f} "
              f"{t['raw_fresh_recv']['median_s'] * 1e3:>8.3f} "
              f"{t['local_copy_tensor']['median_s'] * 1e3:>8.3f} "
              f"{r['comm_time_inside_collective_s_mean'] * 1e3:>8.3f} "
              f"{t['distconv']['median_s'] * 1e3:>8.3f}")


def print_table(rows, p, args):
    print(f"bench_comm: {p} ranks, float32, median of {args.repeats} reps "
          f"(max over ranks), busbw = min bytes sent per rank / time")
    hdr = (f"{'transition':<17} {'MiB':>6} {'raw ms':>8} {'dc ms':>8} {'raw GB/s':>8} "
           f"{'dc GB/s':>8} {'ratio':>6} {'sent/rank (stats)':>17} {'min sent':>10} {'ok':>3}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ok = {True: "y", False: "NO", None: "-"}[r["correct"]]
        print(f"{r['transition']:<17} {r['mib']:>6.4g} {r['raw_time_s'] * 1e3:>8.3f} "
              f"{r['distconv_time_s'] * 1e3:>8.3f} {r['raw_busbw_GBps']:>8.2f} "
              f"{r['distconv_busbw_GBps']:>8.2f} {r['ratio_raw_over_distconv']:>6.2f} "
              f"{fmt_bytes(r['bytes_sent_per_rank_stats']):>17} "
              f"{fmt_bytes(r['bytes_sent_per_rank_min']):>10} {ok:>3}")
    if args.diagnostics:
        _print_diagnostics(rows)
    big = [r for r in rows if r["mib"] >= 16]
    if big:
        worst = min(big, key=lambda r: r["ratio_raw_over_distconv"])
        print(f"\nmin ratio at >= 16 MiB: {worst['ratio_raw_over_distconv']:.2f} "
              f"({worst['transition']}, {worst['mib']:g} MiB); target >= 0.8")
    sys.stdout.flush()


def environment(p):
    """Machine facts for the JSON (this rank's view)."""
    from distconv.comm import mpi_info
    mpi = mpi_info()
    env = {
        "ranks": p,
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "mpi_library_version": mpi["mpi_library"],
        "mpi_standard": mpi["mpi_standard"],
        "processor_name": mpi["processor_name"],
        "cpu_count": os.cpu_count(),
        "threads_env": {v: os.environ.get(v) for v in
                        ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        "tuning_env": {k: v for k, v in sorted(os.environ.items())
                       if k.startswith(("MPIR_CVAR_", "MPICH_", "MALLOC_", "UCX_", "FI_"))},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    env["mpi4py"] = mpi["mpi4py"]
    try:
        env["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        from threadpoolctl import threadpool_info
        env["threadpools"] = [{k: i.get(k) for k in ("internal_api", "num_threads", "version")}
                              for i in threadpool_info()]
    except Exception:
        pass
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["git_commit"] = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"],
                                           capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:
        pass
    return env
