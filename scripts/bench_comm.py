#!/usr/bin/env python
"""Benchmark ``DistTensor.redistribute`` against the raw MPI collective moving the same bytes.

Run::

    mpiexec -n 2 python -m mpi4py scripts/bench_comm.py --json FILE
    mpiexec -n 2 python -m mpi4py scripts/bench_comm.py --quick        # CI-sized, seconds

For each float32 tensor size (NCHW, N = --batch, H = W = --hw, C chosen to give the
size) and on a 1-axis grid ``ProcessGrid(None, (p,), ("x",))`` over all ranks, it
times these transitions of ``DistTensor.redistribute``:

* ``allgather N``       split on N (dim 0) -> replicated
* ``allgather C``       split on C (dim 1) -> replicated          (distconv unpacks)
* ``reduce_scatter N``  pending-sum -> split on N
* ``reduce_scatter C``  pending-sum -> split on C                 (distconv packs)
* ``alltoall N->C``     split on N -> split on C                  (distconv packs)

against the raw mpi4py collective on preallocated contiguous flat numpy buffers of
the same byte counts (``Allgather``, ``Reduce_scatter_block``, ``Alltoall``).

Every repetition starts after a barrier; a repetition's time is the max over ranks
(one ``Allreduce(MAX)`` of all repetitions at the end); the reported time is the
median over repetitions. Raw and distconv repetitions are interleaved so that
background load hits both alike. ``ratio = raw_time / distconv_time`` (1.0: as fast
as raw MPI). Bandwidth is the bus bandwidth: the analytic minimum of bytes one rank
must send ((p-1)/p of the tensor for allgather and reduce-scatter, (p-1)/p^2 for
alltoall) divided by the time, in GB/s (1e9 B/s). Bytes sent per rank as recorded
by ``Communicator.stats()`` are shown next to that minimum.

With diagnostics (default in full runs; ``--no-diagnostics``) it also times, to
explain any gap: the raw v-collective (``Allgatherv``, ``Reduce_scatter`` with
counts, ``Alltoallv``), the raw collective with a freshly allocated receive buffer
each time (as distconv does), and a local copy of the tensor's bytes (the cost of a
pack/unpack pass).

Only rank 0 prints and writes JSON. OpenMP/BLAS threads are set to 1 per rank.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

from distconv.envinfo import pin_threads

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)
QUICK_SIZES = (0.25, 1)
TRANSITIONS = ("allgather N", "allgather C", "reduce_scatter N", "reduce_scatter C",
               "alltoall N->C")
MIB = 1 << 20


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Time DistTensor.redistribute (allgather, reduce-scatter, alltoall) "
                    "against raw mpi4py collectives on the same bytes. Run under mpiexec: "
                    "mpiexec -n 2 python -m mpi4py scripts/bench_comm.py --json FILE",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=None, metavar="MIB",
                    help=f"tensor sizes in MiB (float32); default {list(DEFAULT_SIZES)}, "
                         f"with --quick {list(QUICK_SIZES)}")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repetitions per measurement (median reported); "
                         "default 25, with --quick 5")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed repetitions first; default 3, with --quick 1")
    ap.add_argument("--quick", action="store_true",
                    help="CI-sized run: small sizes, few repeats, no diagnostics")
    ap.add_argument("--batch", type=int, default=8,
                    help="N of the NCHW tensor (rounded up to a multiple of the ranks)")
    ap.add_argument("--hw", type=int, default=32, help="H = W of the NCHW tensor")
    ap.add_argument("--transitions", nargs="+", default=list(TRANSITIONS),
                    choices=TRANSITIONS, metavar="T",
                    help=f"subset of {list(TRANSITIONS)}")
    ap.add_argument("--diagnostics", action=argparse.BooleanOptionalAction, default=None,
                    help="also time raw v-collectives, raw with fresh receive buffers and a "
                         "local copy; default on, off with --quick")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the one-time correctness check of each redistribute")
    ap.add_argument("--json", metavar="FILE", default=None, help="write all results here")
    a = ap.parse_args(argv)
    if a.sizes is None:
        a.sizes = list(QUICK_SIZES if a.quick else DEFAULT_SIZES)
    if a.repeats is None:
        a.repeats = 5 if a.quick else 25
    if a.warmup is None:
        a.warmup = 1 if a.quick else 3
    if a.diagnostics is None:
        a.diagnostics = not a.quick
    if a.repeats < 1 or a.warmup < 0 or a.batch < 1 or a.hw < 1 or any(s <= 0 for s in a.sizes):
        ap.error("--repeats, --batch, --hw and --sizes must be positive, --warmup >= 0")
    return a


def main(argv=None):
    args = parse_args(argv)  # before MPI, so --help works anywhere

    import numpy as np
    from mpi4py import MPI

    from distconv.distribution import Distribution
    from distconv.grid import ProcessGrid
    from distconv.tensor import DistTensor

    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=1)
    except ImportError:
        pass

    grid = ProcessGrid(None, (MPI.COMM_WORLD.Get_size(),), ("x",))
    comm = grid.comm          # distconv Communicator (world); its stats() we read
    mpi = comm.mpi
    p, rank = grid.size, grid.rank
    f32 = np.float32
    item = np.dtype(f32).itemsize

    n = -(-max(args.batch, p) // p) * p
    hw = args.hw

    def shape_for(mib):
        c = max(1, round(mib * MIB / (item * n * hw * hw)))
        c = -(-c // p) * p     # equal blocks, so the raw non-v collective moves the same bytes
        return (n, c, hw, hw)

    def dist(split_dim=None, pending=False):
        sp = [None] * 4
        if split_dim is not None:
            sp[split_dim] = ("x",)
        return Distribution(grid, sp, pending=("x",) if pending else ())

    # transition -> (source dist, target dist, stats kind, raw kind)
    specs = {
        "allgather N": (dist(0), dist(), "allgather", "allgather"),
        "allgather C": (dist(1), dist(), "allgather", "allgather"),
        "reduce_scatter N": (dist(pending=True), dist(0), "reduce_scatter", "reduce_scatter"),
        "reduce_scatter C": (dist(pending=True), dist(1), "reduce_scatter", "reduce_scatter"),
        "alltoall N->C": (dist(0), dist(1), "alltoall", "alltoall"),
    }

    def min_sent(kind, nbytes):
        if kind == "alltoall":
            return nbytes * (p - 1) // (p * p)
        return nbytes * (p - 1) // p

    # raw collectives on flat preallocated buffers; returns (callable, fresh-alloc callable,
    # v-variant callable) each doing one collective
    def raw_ops(kind, numel):
        blk = numel // p
        if kind == "allgather":
            sb, rb = np.ones(blk, f32), np.empty(numel, f32)
            counts, displs = [blk] * p, [i * blk for i in range(p)]
            return (lambda: mpi.Allgather(sb, rb),
                    lambda: mpi.Allgather(sb, np.empty(numel, f32)),
                    lambda: mpi.Allgatherv(sb, [rb, counts, displs, MPI.FLOAT]))
        if kind == "reduce_scatter":
            sb, rb = np.ones(numel, f32), np.empty(blk, f32)
            return (lambda: mpi.Reduce_scatter_block(sb, rb, op=MPI.SUM),
                    lambda: mpi.Reduce_scatter_block(sb, np.empty(blk, f32), op=MPI.SUM),
                    lambda: mpi.Reduce_scatter(sb, rb, recvcounts=[blk] * p, op=MPI.SUM))
        if kind == "alltoall":
            sb, rb = np.ones(blk, f32), np.empty(blk, f32)
            b2 = blk // p
            counts, displs = [b2] * p, [i * b2 for i in range(p)]
            return (lambda: mpi.Alltoall(sb, rb),
                    lambda: mpi.Alltoall(sb, np.empty(blk, f32)),
                    lambda: mpi.Alltoallv([sb, counts, displs, MPI.FLOAT],
                                          [rb, counts, displs, MPI.FLOAT]))
        raise ValueError(kind)

    def timed(fn):
        mpi.Barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def reduce_max(times):
        a = np.asarray(times, np.float64)
        out = np.empty_like(a)
        mpi.Allreduce(a, out, op=MPI.MAX)
        return out

    def summary(times):
        t = [float(x) for x in times]
        return {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                "reps_s": t}

    rows = []
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    for mib in args.sizes:
        shape = shape_for(mib)
        numel = int(np.prod(shape))
        nbytes = numel * item
        rng = np.random.default_rng(1234)
        glob = rng.standard_normal(shape, dtype=f32)   # same on every rank
        for name in args.transitions:
            src, dst, stats_kind, raw_kind = specs[name]
            dc_op = functools.partial(DistTensor.from_global(glob, src).redistribute, dst)
            raw, raw_fresh, raw_v = raw_ops(raw_kind, numel)

            # correctness once (the same check result on every rank, agreed collectively)
            check_ok = None
            if args.check:
                y = dc_op()
                want = glob[dst.slices(shape)]
                # pending sources hold the value on rank 0 and zeros elsewhere: the sum is exact
                ok = bool(y.distribution == dst and y.local.shape == want.shape
                          and np.array_equal(y.local, want))
                check_ok = bool(mpi.allreduce(int(ok), op=MPI.MIN))
                del y

            variants = {"raw": raw, "distconv": dc_op}
            if args.diagnostics:
                buf = np.ones(numel, f32)
                dstbuf = np.empty(numel, f32)
                variants.update({"raw_v": raw_v, "raw_fresh_recv": raw_fresh,
                                 "local_copy_tensor": lambda: np.copyto(dstbuf, buf)})
            for _ in range(args.warmup):
                for fn in variants.values():
                    timed(fn)
            comm.reset_stats()
            local_times = {k: [] for k in variants}
            for _ in range(args.repeats):
                for k, fn in variants.items():
                    local_times[k].append(timed(fn))
            st = comm.stats()
            kinds = {k: v for k, v in st.items() if k != "total"}
            s = kinds.get(stats_kind, {"calls": 0, "bytes_sent": 0, "bytes_recv": 0, "time": 0.0})
            calls = max(1, s["calls"])
            res = {k: summary(reduce_max(v)) for k, v in local_times.items()}
            # time spent inside Communicator collectives, per call, max over ranks
            inside = reduce_max([s["time"] / calls])[0]
            raw_t, dc_t = res["raw"]["median_s"], res["distconv"]["median_s"]
            msent = min_sent(stats_kind, nbytes)
            row = {
                "transition": name, "mib": nbytes / MIB, "requested_mib": mib,
                "shape": list(shape), "bytes": nbytes,
                "source": repr(src), "target": repr(dst),
                "raw_collective": {"allgather": "Allgather",
                                   "reduce_scatter": "Reduce_scatter_block",
                                   "alltoall": "Alltoall"}[raw_kind],
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
            # distconv's own accounting must agree across ranks; rank 0's numbers are shown
            rows.append(row)
            del dc_op
        del glob

    if rank == 0:
        _print_table(rows, p, args)
        if args.json:
            doc = {
                "benchmark": "bench_comm",
                "description": "DistTensor.redistribute vs raw mpi4py collectives on the same "
                               "bytes; times are medians over repetitions of the max over ranks",
                "settings": {"ranks": p, "sizes_mib": args.sizes, "repeats": args.repeats,
                             "warmup": args.warmup, "batch": n, "hw": hw, "dtype": "float32",
                             "quick": args.quick, "diagnostics": args.diagnostics,
                             "grid": "ProcessGrid(None, (p,), ('x',))",
                             "bandwidth": "bus bandwidth: analytic min bytes sent per rank / "
                                          "time, GB/s (1e9)"},
                "environment": dict(_environment(np, MPI, p),
                                    loadavg_start=load_start,
                                    loadavg_end=os.getloadavg() if hasattr(os, "getloadavg")
                                    else None),
                "wall_s": time.perf_counter() - t_start,
                "results": rows,
                "ratios_ge_16mib": {f"{r['transition']} {r['mib']:g}MiB":
                                    r["ratio_raw_over_distconv"]
                                    for r in rows if r["mib"] >= 16},
            }
            tmp = args.json + ".tmp"
            d = os.path.dirname(os.path.abspath(args.json))
            os.makedirs(d, exist_ok=True)
            with open(tmp, "w") as fh:
                json.dump(doc, fh, indent=1)
                fh.write("\n")
            os.replace(tmp, args.json)
            print(f"wrote {args.json}")
    return 0


def _print_table(rows, p, args):
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
              f"{_fmt_bytes(r['bytes_sent_per_rank_stats']):>17} "
              f"{_fmt_bytes(r['bytes_sent_per_rank_min']):>10} {ok:>3}")
    if args.diagnostics:
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
    big = [r for r in rows if r["mib"] >= 16]
    if big:
        worst = min(big, key=lambda r: r["ratio_raw_over_distconv"])
        print(f"\nmin ratio at >= 16 MiB: {worst['ratio_raw_over_distconv']:.2f} "
              f"({worst['transition']}, {worst['mib']:g} MiB); target >= 0.8")
    sys.stdout.flush()


def _fmt_bytes(b):
    b = float(b)
    if b >= MIB:
        return f"{b / MIB:.3f} MiB"
    if b >= 1024:
        return f"{b / 1024:.1f} KiB"
    return f"{b:.0f} B"


def _environment(np, MPI, p):
    env = {
        "ranks": p,
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "mpi_library_version": MPI.Get_library_version().strip().splitlines()[0],
        "mpi_standard": "%d.%d" % MPI.Get_version(),
        "processor_name": MPI.Get_processor_name(),
        "cpu_count": os.cpu_count(),
        "threads_env": {v: os.environ.get(v) for v in
                        ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        "tuning_env": {k: v for k, v in sorted(os.environ.items())
                       if k.startswith(("MPIR_CVAR_", "MPICH_", "MALLOC_", "UCX_", "FI_"))},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import mpi4py
        env["mpi4py"] = mpi4py.__version__
    except Exception:
        pass
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
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["git_commit"] = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"],
                                           capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:
        pass
    return env


if __name__ == "__main__":
    from distconv.comm import run_guarded  # a failing rank ends the whole job
    pin_threads(1)  # one BLAS/OpenMP thread per rank
    sys.exit(run_guarded(main))
