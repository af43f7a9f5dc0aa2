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
import os
import sys
import time

from distconv.atomic import write_json
from distconv.bench.comm_bench import TRANSITIONS
from distconv.envinfo import pin_threads

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)
QUICK_SIZES = (0.25, 1)


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


def document(args, bench, rows, load_start, wall_s):
    """The JSON document: settings, environment, every row and the ratios at >= 16 MiB."""
    from distconv.bench.comm_bench import environment
    return {
        "benchmark": "bench_comm",
        "description": "DistTensor.redistribute vs raw mpi4py collectives on the same "
                       "bytes; times are medians over repetitions of the max over ranks",
        "settings": {"ranks": bench.p, "sizes_mib": args.sizes, "repeats": args.repeats,
                     "warmup": args.warmup, "batch": bench.n, "hw": bench.hw,
                     "dtype": "float32", "quick": args.quick,
                     "diagnostics": args.diagnostics,
                     "grid": "ProcessGrid(None, (p,), ('x',))",
                     "bandwidth": "bus bandwidth: analytic min bytes sent per rank / "
                                  "time, GB/s (1e9)"},
        "environment": dict(environment(bench.p), loadavg_start=load_start,
                            loadavg_end=_loadavg()),
        "wall_s": wall_s,
        "results": rows,
        "ratios_ge_16mib": {f"{r['transition']} {r['mib']:g}MiB": r["ratio_raw_over_distconv"]
                            for r in rows if r["mib"] >= 16},
    }


def _loadavg():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def raw_ops(kind, numel):
    """The peer: raw mpi4py collectives of ``kind`` on flat preallocated float32 buffers of
    ``numel`` elements on COMM_WORLD: ``(raw, raw with a fresh receive buffer each call,
    v-variant)``, each a callable doing one collective."""
    import numpy as np
    from mpi4py import MPI
    mpi, p, f32 = MPI.COMM_WORLD, MPI.COMM_WORLD.Get_size(), np.float32
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
    raise ValueError(f"no raw collective for {kind!r}")


def main(argv=None):
    args = parse_args(argv)  # before MPI, so --help works anywhere
    from distconv.bench.comm_bench import CommBench, print_table
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=1)
    except ImportError:
        pass
    bench = CommBench(args.batch, args.hw, raw_ops)
    load_start = _loadavg()
    t_start = time.perf_counter()
    rows = bench.run(args)
    if bench.rank == 0:
        print_table(rows, bench.p, args)
        if args.json:
            write_json(args.json, document(args, bench, rows, load_start,
                                           time.perf_counter() - t_start))
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from distconv.comm import run_guarded  # a failing rank ends the whole job
    pin_threads(1)  # one BLAS/OpenMP thread per rank
    sys.exit(run_guarded(main))
