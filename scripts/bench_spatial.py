#!/usr/bin/env python
"""Spatial parallelism at batch 1: a 3x3 conv stack, 1 rank vs P ranks paired in ONE job.

    mpiexec -n 2 python -m mpi4py scripts/bench_spatial.py --json spatial.json
    mpiexec -n 2 python -m mpi4py scripts/bench_spatial.py --quick --json /tmp/s.json

The model is ``--layers`` x (Conv2d(C, C, 3, padding=1) + ReLU) on a (1, C, S, S) input
(defaults: 4 layers, C = 64, S = 256). A step is forward, backward and the gradient sync
(``GradientSync``, overlapped). Round after round the job runs one 1-rank step (rank 0
alone on a grid of itself, the other ranks sleeping in a nonblocking barrier) and one step
of each P-rank case (``distconv.bench.paired``): every ``--strategies`` entry, and for the
spatial ones (height/width) once with the halo exchange overlapped with the interior of
each conv and once without (``--overlap``). The speedup of a case is the median over
rounds of the same round's ``1-rank / P-rank`` ratio, with its quartiles; the same over
the *clean* rounds only (both steps lost at most ``--clean-frac`` of their time, on every
rank, to other processes: wall minus process CPU time, as ``bench_layers.py`` counts it),
since on a shared machine another job's process takes cores from the P-rank steps; and
the same ratio of process CPU times (the max over ranks), which leaves out the time other
processes held the cores but counts MPI's busy-waiting for a slower rank. Each rank also
records the time per step of every kind of message (``comm.stats()``): for the overlapped
halo exchange that is the posting plus the wait, the part the interior did not hide.

Memory, after the timed rounds, one untimed step per case with ``tracemalloc`` (NumPy
reports its buffers to it) and the kernels' scratch cache (``distconv.ops._workspace``)
emptied first, per rank (the maximum over ranks) and as ratios to 1 rank's:
``activations`` (the bytes alive after forward that are not scratch: what the layers keep
for backward, and the output), ``scratch`` (the cache after the step: im2col columns and
the like, kept between steps, one buffer per shape) and ``peak`` (the step's high-water
mark, scratch included). The halo bytes a rank sends per step are taken from
``comm.stats()``.

One BLAS thread per rank (``distconv.envinfo.pin_threads``). Rank 0 prints a table and
writes ``--json``.
"""
from __future__ import annotations

import gc
import os
import sys
import time
import tracemalloc

import numpy as np

from distconv.bench.paired import (check_fits, paired_row, paired_rounds, paired_world,
                                   random_pair)
from distconv.bench.runs import input_distribution, self_strategy
from distconv.bench.cli import add_sized, add_strategies, bench_parser, parse_sized, split_list
from distconv.envinfo import write_results

DEFAULTS = dict(channels=64, size=256, layers=4, rounds=15, warmup=2)
QUICK = dict(channels=4, size=12, layers=2, rounds=3, warmup=1)


def parse_args(argv=None):
    ap = bench_parser("bench_spatial.py", __doc__)
    add_strategies(ap, "height=2;channel=2;filter=2", "of the P-rank cases")
    ap.add_argument("--overlap", choices=("both", "on", "off"), default="both",
                    help="spatial cases with the halo exchange overlapped with the interior "
                         "of each conv, without, or both (default)")
    ap.add_argument("--clean-frac", type=float, default=0.03,
                    help="a step is clean when no rank lost more than this fraction of it "
                         "to other processes (wall minus CPU time; default 0.03)")
    add_sized(ap, (("channels", "C"), ("size", "H = W"), ("layers", "conv+ReLU layers"),
                   ("rounds", "timed rounds"), ("warmup", "untimed rounds first")),
              DEFAULTS, QUICK)
    a = parse_sized(ap, argv, DEFAULTS, QUICK)
    a.strategy_list = split_list(ap, a.strategies, "--strategies", required=True)
    return a


def conv_stack(channels, layers, strategy):
    """``layers`` x (Conv2d(C, C, 3, padding=1) + ReLU), every layer on ``strategy``."""
    from distconv import nn
    mods = []
    for _ in range(layers):
        mods += [nn.Conv2d(channels, channels, 3, padding=1, strategy=strategy), nn.ReLU()]
    return nn.Sequential(*mods)


class _Case:
    """One conv stack with its input, output gradient, gradient sync and overlap setting
    (None: not a spatial case)."""

    def __init__(self, args, strategy, x_glob, dy_glob, overlap=None):
        from distconv import DistTensor, manual_seed
        from distconv.optim import GradientSync
        manual_seed(args.seed)
        self.overlap = overlap
        self.model = conv_stack(args.channels, args.layers, strategy)
        self.x = DistTensor.from_global(x_glob, input_distribution(self.model))
        with self._overlap():
            y = self.model(self.x)
        self.dy = DistTensor.from_global(dy_glob, y.distribution)
        self.params = self.model.parameters()
        self.sync = GradientSync(self.model, overlap=True)
        self.comm_s = {}  # kind -> seconds of each timed step spent in it (this rank)

    def _overlap(self):
        from distconv import spatial
        return spatial.halo_overlap(bool(self.overlap))

    def step(self):
        """``(seconds, seconds lost)`` of one step (lost: wall minus process CPU time); the
        time of each kind of message (for an overlapped halo exchange: posting + waiting,
        the part not hidden) is added to ``comm_s``."""
        from distconv.bench.stats import stats_delta
        from distconv.comm import world
        for q in self.params:
            q.grad = None
        before = world().stats()
        with self._overlap():
            c0, t0 = time.process_time(), time.perf_counter()
            self.model(self.x)
            self.model.backward(self.dy)
            self.sync.wait()
            wall = time.perf_counter() - t0
            lost = max(0.0, wall - (time.process_time() - c0))
        for k, v in stats_delta(world().stats(), before).items():
            self.comm_s.setdefault(k, []).append(v["time"])
        return wall, lost

    def memory(self):
        """``(activations, scratch, peak)`` bytes of one step traced from an empty scratch
        cache (see the module docstring); the bytes this rank sent per kind of message."""
        from distconv.bench.stats import stats_delta
        from distconv.comm import world
        from distconv.ops import _workspace
        for q in self.params:
            q.grad = None
        _workspace.clear()
        gc.collect()
        before = world().stats()
        with self._overlap():
            tracemalloc.start()
            self.model(self.x)
            act = tracemalloc.get_traced_memory()[0] - _workspace._BYTES
            self.model.backward(self.dy)
            self.sync.wait()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        sent = {k: v["bytes_sent"] for k, v in stats_delta(world().stats(), before).items()}
        return {"activations": act, "scratch": _workspace._BYTES, "peak": peak, "sent": sent}


def _cases(args, dc, x_glob, dy_glob):
    """``{label: _Case}`` in the order of ``--strategies``; a spatial strategy gives an
    ``" overlap"`` and a ``" no overlap"`` case as ``--overlap`` asks."""
    flags = {"both": (True, False), "on": (True,), "off": (False,)}[args.overlap]
    out = {}
    for s in args.strategy_list:
        st = dc.Strategy.parse(s)
        if not st.spatial:
            out[s] = _Case(args, st, x_glob, dy_glob)
            continue
        for f in flags:
            out[f"{s} {'overlap' if f else 'no overlap'}"] = _Case(args, st, x_glob, dy_glob, f)
    return out


def _memory_rows(comm, single, cases):
    """Per case: the maximum over ranks of :meth:`_Case.memory` and its ratios to 1 rank's
    (measured on rank 0 alone while the others wait)."""
    one = single.memory() if comm.rank == 0 else None
    comm.idle_barrier()
    one = comm.allgather_obj(one)[0]
    rows = {"1 rank": one}
    keys = ("activations", "scratch", "peak")
    for name, case in cases.items():
        comm.barrier()
        got = comm.allgather_obj(case.memory())
        row = {k: max(g[k] for g in got) for k in keys}
        row.update({f"{k}_ratio": row[k] / one[k] for k in keys})
        row["sent_per_rank"] = [g["sent"] for g in got]
        rows[name] = row
    return rows


def _report(args, shape, p, t_a, rows, mem, comm_s):
    print(f"{args.layers} x (Conv2d({args.channels}, {args.channels}, 3, padding=1) + ReLU) "
          f"on {shape}, {p} ranks x 1 thread, {args.rounds} paired rounds; 1 rank (rank 0 "
          f"alone, same job): {np.median(t_a) * 1e3:.1f} ms median")
    print(f"{'case':<22} {'P-rank ms':>10} {'paired speedup (q1-q3)':>24} {'ratio of med':>13} "
          f"{'clean rounds: speedup':>22} {'CPU-time speedup':>17} {'activ.':>7} {'scratch':>8} "
          f"{'peak':>6}")
    for r in rows:
        m = mem[r["case"]]
        clean = (f"{r['clean_rounds']:>3}: {r['speedup_clean_median']:.2f}"
                 if r["clean_rounds"] else "  0: -")
        print(f"{r['case']:<22} {r['p_ranks_ms']:>10.1f} {r['speedup_paired_median']:>9.2f} "
              f"({r['speedup_paired_q1']:.2f}-{r['speedup_paired_q3']:.2f}) "
              f"{r['speedup_ratio_of_medians']:>13.2f} {clean:>22} "
              f"{r['speedup_cpu_median']:>17.2f} "
              f"{m['activations_ratio']:>6.2f}x {m['scratch_ratio']:>7.2f}x "
              f"{m['peak_ratio']:>5.2f}x")
    one = mem["1 rank"]
    print(f"1 rank: activations {one['activations'] / 2**20:.1f} MiB, scratch "
          f"{one['scratch'] / 2**20:.1f} MiB, peak {one['peak'] / 2**20:.1f} MiB (memory "
          f"columns: max over ranks / 1 rank)")
    for k, per_rank in comm_s.items():
        kinds = sorted({kind for r in per_rank for kind in r})
        print(f"{k}: median ms per step in " + ", ".join(
            f"{kind} {'/'.join(f'{r.get(kind, 0) * 1e3:.1f}' for r in per_rank)}"
            for kind in kinds) + " (per rank)")


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = paired_world()
    check_fits(comm, args.strategy_list)
    import distconv as dc
    p, me = comm.size, comm.rank
    shape = (1, args.channels, args.size, args.size)
    x_glob, dy_glob = random_pair(args.seed, shape)
    single = _Case(args, self_strategy(), x_glob, dy_glob) if me == 0 else None
    cases = _cases(args, dc, x_glob, dy_glob)
    load0 = os.getloadavg()
    res = paired_rounds(comm, single.step if single else None,
                        {k: c.step for k, c in cases.items()}, args.rounds, args.warmup,
                        clean_frac=args.clean_frac)
    load1 = os.getloadavg()
    # per case and kind: each rank's median seconds per timed step (warm-up left out)
    comm_s = {k: comm.allgather_obj({kind: float(np.median(v[args.warmup:] or v))
                                     for kind, v in c.comm_s.items()})
              for k, c in cases.items()}
    mem = _memory_rows(comm, single, cases)
    if me != 0:
        return 0
    t_a = res.a
    rows = [dict(case=k, **paired_row(t_a, res.b[k], threshold=1.8,
                                      clean=[x and y for x, y in zip(res.clean_a, res.clean_b[k])],
                                      cpu=(res.cpu_a, res.cpu_b[k])))
            for k in cases]
    _report(args, shape, p, t_a, rows, mem, comm_s)
    if args.json:
        doc = {"benchmark": "bench_spatial", "ranks": p, "shape": list(shape),
               "layers": args.layers, "rounds": args.rounds, "warmup": args.warmup,
               "one_rank_step_s": list(t_a), "one_rank_clean": res.clean_a,
               "clean_frac": args.clean_frac, "results": rows, "memory": mem,
               "comm_time_s_per_rank": comm_s,
               "loadavg_before": load0, "loadavg_after": load1}
        write_results(args.json, doc)
    return 0


if __name__ == "__main__":
    from distconv.comm import run_guarded
    sys.exit(run_guarded(main))
