#!/usr/bin/env python
"""Cost of keeping replicas identical: checksums compared across ranks vs broadcasting.

    mpiexec -n 2 python -m mpi4py scripts/bench_replicas.py --model resnet50 --json f.json

For a model's state dict (full-width torchvision ResNet, float32, data parallel: every
rank holds every weight, the worst case) each rank times, median of ``--repeats``:

* ``digest_s``: SHA-256 (first 8 bytes) of every global array, what ``load_state_dict``
  and ``from_global`` compute locally;
* ``compare_s``: the one allreduce of 2 x keys uint64 that compares the digests;
* ``load_checked_s`` / ``load_unchecked_s``: ``load_state_dict`` with the comparison and
  with it skipped (``check_values=False``, as checkpoint loading does after comparing the
  file's checksum), so their difference is the check's whole cost;
* ``bcast_s``: the alternative, broadcasting every global array from rank 0;
* ``check_replicas_s``: ``replicas.check_replicas(model, optimizer)`` (parameters, buffers
  and SGD momentum), what ``train.py --check-replicas-every N`` runs every N steps;
* ``grad_allreduce_s``: one allreduce of every parameter shard over its replica group
  (the segmented gradient allreduce every training step sends), the yardstick for the
  periodic check.

Rank 0 prints a table and writes ``--json`` (max over ranks of each median).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="resnet50", help="resnet18, resnet50, ...")
    ap.add_argument("--strategy", default="sample", help="e.g. sample, sample=1,channel=2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, metavar="FILE")
    return ap


def _replica_group(t):
    """Communicator of the ranks holding the same block of ``t`` (its gradient's group)."""
    used = {a for axes in t.distribution.split for a in axes}
    return t.grid.sub(tuple(a for a in t.grid.names if a not in used))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import distconv as dc
    from distconv import envinfo, models, optim
    from distconv.comm import world
    from distconv.replicas import check_replicas, differing, digest

    comm = world()
    dc.set_default_dtype(np.float32)
    dc.manual_seed(0)
    model = models.MODELS[args.model](1000, strategy=dc.Strategy.parse(args.strategy))
    opt = optim.SGD(model.parameters(), 0.1, momentum=0.9)
    for p in opt.params:                           # momentum buffers exist, as in training
        opt.state[opt.params.index(p)]["momentum_buffer"] = np.zeros_like(p.data.local)
    sd = model.state_dict()
    nbytes = sum(v.nbytes for v in sd.values())

    def timed(fn):
        out = []
        for _ in range(args.repeats):
            comm.barrier()
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    digs = [digest(v) for v in sd.values()]
    res = {
        "digest_s": timed(lambda: [digest(v) for v in sd.values()]),
        "compare_s": timed(lambda: differing(comm, digs)),
        "load_checked_s": timed(lambda: model.load_state_dict(sd)),
        "load_unchecked_s": timed(lambda: model.load_state_dict(sd, check_values=False)),
        "bcast_s": timed(lambda: [comm.bcast(np.ascontiguousarray(v)) for v in sd.values()]),
        "check_replicas_s": timed(lambda: check_replicas(model, opt)),
        "grad_allreduce_s": timed(lambda: [_replica_group(p.data).allreduce(p.data.local)
                                           for p in model.parameters()]),
    }
    worst = {k: max(v) for k, v in zip(res, zip(*comm.allgather_obj(list(res.values()))))}
    if comm.rank == 0:
        rec = {"model": args.model, "strategy": args.strategy, "ranks": comm.size,
               "keys": len(sd), "state_bytes": nbytes, "repeats": args.repeats,
               "max_over_ranks_median_s": worst, "cpu": envinfo.cpu_model(),
               "git": envinfo.git_state()}
        print(f"{args.model} ({len(sd)} keys, {nbytes / 2**20:.1f} MiB float32), "
              f"strategy {args.strategy}, {comm.size} rank(s); max over ranks of the median "
              f"of {args.repeats}:")
        for k, v in worst.items():
            print(f"  {k:18s} {1e3 * v:9.1f} ms")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    from distconv.comm import run_guarded
    sys.exit(run_guarded(main))
