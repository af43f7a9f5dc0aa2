#!/usr/bin/env python
"""Validate the planner: predicted vs measured training-step time and bytes, per plan.

Run::

    mpiexec -n 2 python -m mpi4py scripts/bench_planner.py --out planner_validation.json
    mpiexec -n 2 python -m mpi4py scripts/bench_planner.py --quick --out /tmp/q.json   # CI
    mpiexec -n 4 python -m mpi4py scripts/bench_planner.py --bytes-only --out b4.json

One MPI job does everything:

1. Each rank is limited to ONE BLAS/OpenMP thread (:func:`distconv.envinfo.pin_threads`:
   the environment variables and threadpoolctl): a rank stands for one device.
2. The machine's alpha-beta constants are measured on this job
   (:func:`distconv.planner.machine.calibrate`, message sizes from 4 KiB up to the
   model's largest message), or read with ``--machine FILE``.
3. The local kernel times come from a :class:`distconv.planner.compute.ComputeModel`
   measured with threads=1 on every rank at the same time (so the two cores are as busy
   as in training), each shape in ``--compute-rounds`` sweeps over all shapes (the median
   of the rounds: ``ComputeModel.refine``), cached in ``--cache`` (default: ``distconv.planner.auto.
   default_cache_path()``). After measuring, each entry keeps the largest of the ranks'
   medians (a step waits for the slowest rank at every collective) and every rank
   rebuilds the same cost model from them, so every rank plans alike.
4. The model (``--model``) is a wide ResNet with a CIFAR stem: ``ResNet(BasicBlock,
   --blocks, stem="cifar", base_width=--width)`` (default two stages of one basic block,
   256 and 512 channels, 8x8 inputs, global batch 4, 10 classes: 4.7 M parameters, 19 MB
   of weight gradients against 0.26 MB activations): wide enough that channel and filter
   splits beat data parallelism, whose gradient allreduce and replicated update dominate.
   ``--model inception``: a small Inception-style net whose blocks concatenate branches
   (:class:`IncNet`: a 3x3 stem with batch norm, then ``sum(--blocks)`` blocks of three
   towers -- 1x1 | 1x1-relu-3x3 | 3x3 avg pool-1x1, W/4 + W/2 + W/4 channels -- joined by
   ``dc.cat`` and followed by batch norm and ReLU, then global pooling and the fc; width
   W = --width, default 512: 1.7 M parameters at two blocks).
5. Plans: the hand plans (uniform sample, channel and filter splits; on 4 ranks the
   2x2 mixes too; and mixed per-layer plans, see ``hand_plans``) and the planner's own
   plan (``auto``: :func:`distconv.planner.auto.plan_model` with the same machine and
   compute model, ``overlap=False``, no memory limit); when ``plan_model`` kept a
   uniform plan within ``MIN_GAIN`` of its fastest predicted plan, that plan is timed
   too (``auto-fastest``; compared with the hand plans like ``auto``, never counted as
   one).
   ``predicted`` = :func:`distconv.planner.simulate.simulate` ``(cost, plan,
   overlap=False)``: the gradient allreduce is blocking and not overlapped, exactly as the
   measured step runs it.
6. Measured step (one model instance per plan, ``set_strategy`` of the plan): barrier,
   then ``loss = CrossEntropyLoss(model(x), labels)``, ``model.backward(dloss)``,
   ``sync_gradients`` (the segmented allreduce, blocking), ``SGD.step()`` (momentum 0.9,
   weight decay 1e-4: the update the cost model times). Plans are interleaved repetition
   by repetition after ``--warmup`` untimed steps each (the order rotated by one plan
   per repetition), so drifting background load hits all of them alike. A repetition's
   time is the max over ranks; a repetition is *clean* when no rank lost more than
   ``--clean-frac`` of it to other processes (wall - CPU time: MPICH busy-polls, so a
   rank's core is busy for the whole step). ``measured`` is the median over clean
   repetitions when there are at least 3, else over all; both are written.
7. Bytes: one more step per plan with ``comm.stats()`` snapshots around the model's
   forward, backward and gradient sync (the loss's own scalar allreduces are reported
   apart); on every rank the bytes sent and received per collective kind must equal
   :func:`distconv.planner.events.graph_events` of the plan.

Summary: per plan predicted ms, measured ms, error % and the ranks by predicted and by
measured time; the mean absolute relative error (MAE); pairwise ranking agreement over
the pairs whose measured times differ by more than ``--rank-margin`` (20%); the auto
plan's time over the best hand plan's, paired: for each hand plan the median over
repetitions of (auto step / hand step in the same repetition), and the largest of these
(the ratio of the two medians is reported too; it flips with the VM's speed modes, see
``distconv/bench/planner_report.py``). Targets (issue 7): MAE <= 20%, every such pair ordered
alike, auto <= 1.05x best hand (paired), bytes equal.

``--bytes-only`` (automatic when there are more ranks than CPU cores, e.g. 4 ranks on
2 cores): no timing and no kernel measuring (the cost model takes cached kernel times
where it has them, else the fitted ones; a shipped machine file instead of calibrating),
only the bytes check of every plan. ``--profile``: after timing, run ``--profile-steps``
more steps per plan under :class:`distconv.profile.Profiler` and write predicted vs
measured time per layer (max over ranks) to the JSON, for diagnosing mispredictions.

Only rank 0 prints and writes the JSON (``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import time

import numpy as np

from distconv.envinfo import blas_info, cpu_model, git_state, pin_threads

from distconv.bench.planner_report import (
    _json_default, compare, is_clean, markdown, print_table, rank_order, summarize)

DEFAULTS = dict(width=256, blocks="1,1", size=8, batch=4, classes=10, repeats=25, warmup=2,
                calib_reps=21, compute_reps=9, compute_rounds=3)
QUICK = dict(width=8, blocks="1,1", size=8, batch=2, classes=4, repeats=2, warmup=1,
             calib_reps=2, compute_reps=1, compute_rounds=2)
KINDS = ("allreduce", "allgather", "reduce_scatter", "alltoall")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="bench_planner.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", metavar="FILE", help="rank 0 writes every figure as JSON here")
    ap.add_argument("--quick", action="store_true",
                    help="CI-sized run: width 8, 8x8, batch 2, 2 repeats (seconds)")
    ap.add_argument("--model", choices=("resnet", "inception"), default="resnet",
                    help="the wide ResNet (default) or the Inception-style IncNet, whose "
                         "blocks join branches with dc.cat")
    ap.add_argument("--width", type=int, help="channels of the first stage (default 256; "
                                              "inception: 512, a multiple of 4)")
    ap.add_argument("--blocks", help="basic blocks per stage, comma-separated (default 1,1: "
                                     "two stages, width and 2*width channels)")
    ap.add_argument("--size", type=int, help="input height = width (default 8)")
    ap.add_argument("--batch", type=int, help="global batch N (default 4)")
    ap.add_argument("--classes", type=int, help="classes of the fc layer (default 10)")
    ap.add_argument("--repeats", type=int,
                    help="clean timed repetitions wanted per plan (default 25)")
    ap.add_argument("--max-repeats", type=int,
                    help="add repetitions until --repeats are clean, up to this many "
                         "(default 4 x --repeats); after a repetition that is not clean "
                         "the script waits for quiet (--wait-quiet) before the next")
    ap.add_argument("--warmup", type=int, help="untimed steps per plan first (default 2)")
    ap.add_argument("--clean-frac", type=float, default=0.05,
                    help="a repetition is clean if every rank lost less than this fraction "
                         "of it to other processes (default 0.05)")
    ap.add_argument("--machine", metavar="FILE_OR_NAME",
                    help="machine file (or built-in name, e.g. dev_2core) instead of "
                         "calibrating on this job")
    ap.add_argument("--calib-reps", type=int, help="calibrate(): timed calls per size "
                                                   "(default 21)")
    ap.add_argument("--cache", metavar="FILE",
                    help="compute-model cache (default: distconv.planner.auto."
                         "default_cache_path())")
    ap.add_argument("--no-cache", action="store_true",
                    help="measure every kernel afresh; do not read or write a cache")
    ap.add_argument("--compute-reps", type=int,
                    help="timed calls per kernel shape in the compute model (default 9)")
    ap.add_argument("--compute-rounds", type=int,
                    help="sweeps over all kernel shapes, each shape's time the median of "
                         "its rounds (ComputeModel.refine; default 3)")
    ap.add_argument("--bytes-only", action="store_true",
                    help="only the bytes check (default when ranks > CPU cores)")
    ap.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                    help="before calibrating, measuring kernels and timing, wait up to S "
                         "seconds until the CPUs are >= 85%% idle while this job sleeps "
                         "(other users' processes; default 600, --quick 0)")
    ap.add_argument("--profile", action="store_true",
                    help="per-layer predicted vs measured (Profiler) into the JSON")
    ap.add_argument("--profile-steps", type=int, default=5,
                    help="profiled steps per plan with --profile (default 5)")
    ap.add_argument("--rank-margin", type=float, default=0.20,
                    help="pairs of plans whose measured times differ by more than this "
                         "fraction must be ordered alike by the prediction (default 0.20)")
    ap.add_argument("--md", metavar="FILE", help="rank 0 also writes a Markdown report")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.model == "inception" and a.width is None and not a.quick:
        a.width = 512
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, QUICK[k] if a.quick else v)
    if a.wait_quiet is None:
        a.wait_quiet = 0.0 if a.quick else 600.0
    if a.max_repeats is None:
        a.max_repeats = a.repeats if a.quick else 4 * a.repeats
    try:
        a.blocks = [int(b) for b in str(a.blocks).split(",") if b.strip()]
    except ValueError:
        ap.error(f"--blocks must be integers separated by commas, got {a.blocks!r}")
    if not a.blocks or min(a.blocks) < 1:
        ap.error("--blocks needs at least one stage of at least one block")
    for k in ("width", "size", "batch", "classes", "repeats", "calib_reps", "compute_reps",
              "compute_rounds"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    if a.model == "inception" and a.width % 4:
        ap.error(f"--model inception needs --width divisible by 4, got {a.width}")
    if a.warmup < 0 or a.max_repeats < a.repeats:
        ap.error("need --warmup >= 0 and --max-repeats >= --repeats")
    if not 0 < a.clean_frac < 1 or not 0 < a.rank_margin < 10:
        ap.error("--clean-frac must be in (0, 1) and --rank-margin in (0, 10)")
    return a


# ------------------------------------------------------------------ model and plans
def inception_net(width, nblocks, classes, in_channels=3):
    """:class:`IncNet`: stem conv3x3-bn-relu, ``nblocks`` blocks of three towers joined by dc.cat."""
    import distconv as dc
    from distconv import nn

    class Block(nn.Module):
        def __init__(self, w):
            super().__init__()
            q, h = w // 4, w // 2
            self.b1 = nn.Conv2d(w, q, 1)
            self.b2 = nn.Sequential(nn.Conv2d(w, h, 1), nn.ReLU(), nn.Conv2d(h, h, 3, padding=1))
            self.b3 = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(w, q, 1))
            self.bn = nn.BatchNorm2d(2 * q + h)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(dc.cat([self.b1(x), self.b2(x), self.b3(x)])))

    class IncNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU())
            self.blocks = nn.Sequential(*[Block(width) for _ in range(nblocks)])
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(width, classes)

        def forward(self, x):
            return self.fc(self.head(self.blocks(self.stem(x))))
    return IncNet()


def build_model(args):
    from distconv.nn import manual_seed
    manual_seed(args.seed)
    if getattr(args, "model", "resnet") == "inception":
        return inception_net(args.width, sum(args.blocks), args.classes)
    from distconv.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, list(args.blocks), num_classes=args.classes, in_channels=3,
                  stem="cifar", base_width=args.width)


def _stage(name):
    """0 for the stem, i for layer<i>... (ResNet) or blocks.<i-1>... (IncNet), 99 for fc."""
    if name.startswith("layer"):
        return int(name[5:].split(".")[0])
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return 0 if name in ("conv1", "bn1") or name.startswith("stem.") else 99


def hand_plans(graph, p):
    """``[(label, {name: (s, c, f)})]``: uniform splits and per-layer mixes (see the doc)."""
    names = graph.strategic_names()
    S, C, F = (p, 1, 1), (1, p, 1), (1, 1, p)
    nst = max((_stage(n) for n in names if _stage(n) not in (0, 99)), default=1)

    def rule(fn):
        return {n: fn(n) for n in names}

    def late(n):  # the second half of the stages and the fc
        s = _stage(n)
        return s > max(1, nst // 2) or s == 99

    def block_part(n):  # "conv1"/"bn1" of a block -> 1, "conv2"/"bn2" -> 2, downsample -> 3
        last = n.split(".")
        if "downsample" in last:
            return 3
        if n.startswith("blocks."):  # IncNet: a tower's first conv -> 1, the 3x3 after -> 2
            return 2 if last[2:] == ["b2", "2"] or last[-1] == "bn" else 1
        return 1 if last[-1] in ("conv1", "bn1") else 2

    plans = [("sample", rule(lambda n: S)), ("channel", rule(lambda n: C)),
             ("filter", rule(lambda n: F))]
    if p == 4:
        for st in ((2, 2, 1), (2, 1, 2), (1, 2, 2)):
            plans.append((f"s{st[0]}c{st[1]}f{st[2]}", rule(lambda n, st=st: st)))
    plans += [
        ("stem-sample+filter", rule(lambda n: S if _stage(n) == 0 else F)),
        ("stem-sample+channel", rule(lambda n: S if _stage(n) == 0 else C)),
        ("sample-early+filter-late", rule(lambda n: F if late(n) else S)),
        ("filter-early+channel-late", rule(lambda n: C if late(n) else F)),
        # filter then channel within each block: the filter conv's output is split on C
        # exactly as the channel conv wants its input (the paper's pairing)
        ("alternate-filter/channel", rule(
            lambda n: F if _stage(n) == 0 else C if _stage(n) == 99 else
            (F if block_part(n) == 1 else C))),
    ]
    if any(n.startswith("blocks.") for n in names):  # IncNet: towers of one block differ
        def tower(n):
            t = n.split(".")[2] if n.count(".") >= 2 else ""
            return {"b1": C, "b2": F, "b3": C}.get(t, S)
        plans.append(("towers-channel/filter/channel", rule(tower)))
    return plans


def calib_sizes(graph, item=4):
    """Message sizes to calibrate with: 4 KiB, 64 KiB, ... (x16) up to the first power of
    two at least as large as the model's largest message (a weight gradient or a whole
    activation), and at least 4 MiB."""
    big = 0
    for layer in graph.layers():
        n = 1
        for d in layer.out_shape:
            n *= d
        big = max(big, n * item, layer.num_params * item)
    top = max(4 << 20, 1 << max(0, (big - 1).bit_length()))
    sizes, s = [], 4 << 10
    while s < top:
        sizes.append(s)
        s *= 16
    return tuple(sizes) + (top,)


def predicted_phases(cost, plan):
    """Predicted forward / backward / sync / update seconds of ``plan`` (blocking sync)."""
    from distconv.planner.simulate import walk
    rows = walk(cost, plan)
    return {"forward": sum(c.compute_fwd + c.comm_fwd for _, _, c, _ in rows),
            "backward": sum(c.compute_bwd + c.comm_bwd for _, _, c, _ in rows),
            "sync": sum(c.sync for _, _, c, _ in rows),
            "update": sum(c.update for _, _, c, _ in rows)}


def plan_text(plan):
    """Compact per-layer text: runs of equal strategies."""
    out, prev, start = [], None, None
    for n, st in plan.items():
        if st != prev:
            if prev is not None:
                out.append(f"{start}..: s{prev[0]}c{prev[1]}f{prev[2]}")
            prev, start = st, n
    if prev is not None:
        out.append(f"{start}..: s{prev[0]}c{prev[1]}f{prev[2]}")
    return "; ".join(out)


# ------------------------------------------------------------------ environment
def environment(comm):
    import mpi4py
    from mpi4py import MPI
    mine = {"host": socket.gethostname(), "blas": blas_info(),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None}
    try:
        import torch
        torch_v = torch.__version__
    except Exception:  # torch is not needed here
        torch_v = None
    return {"ranks": comm.size, "threads_per_rank": 1, "per_rank": comm.allgather_obj(mine),
            "python": sys.version.split()[0], "numpy": np.__version__,
            "mpi4py": mpi4py.__version__,
            "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
            "torch_installed": torch_v, "platform": platform.platform(), "cpu": cpu_model(),
            "cpus_online": os.cpu_count(), "loadavg": list(os.getloadavg()),
            "git": git_state(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m mpi4py"] + sys.argv)}


# ------------------------------------------------------------------ quiet machine
def _cpu_idle(seconds):
    """Idle fraction of all CPUs over ``seconds`` (/proc/stat; None where unavailable)."""
    def rd():
        with open("/proc/stat") as fh:
            v = [int(t) for t in fh.readline().split()[1:]]
        return v[3] + v[4], sum(v)
    try:
        a = rd()
        time.sleep(seconds)
        b = rd()
    except (OSError, ValueError, IndexError):
        return None
    return (b[0] - a[0]) / max(1, b[1] - a[1])


def wait_quiet(comm, max_s, need=0.85, probe_s=2.0):
    """Wait (at most ``max_s``) until the machine is idle while this job sleeps.

    Every rank sleeps (a nonblocking barrier polled every 20 ms, so no core is busy) while
    rank 0 samples the idle fraction of all CPUs over ``probe_s``; done once it is at
    least ``need``. Returns ``{"idle", "waited_s", "quiet"}`` (the same on every rank).
    """
    t0 = time.perf_counter()
    res = None
    while True:
        if comm.rank == 0:
            idle = _cpu_idle(probe_s)
            waited = time.perf_counter() - t0
            done = idle is None or idle >= need or waited >= max_s
            res = {"idle": idle, "waited_s": waited, "quiet": idle is None or idle >= need}
        else:
            done = None
        flag = np.array([1 if done else 0], np.int64)
        r = comm.mpi.Ibcast(flag, root=0)
        while not r.Test():
            time.sleep(0.02)
        if flag[0]:
            break
    return comm.mpi.bcast(res, root=0)


# ------------------------------------------------------------------ bytes
def stats_delta(after, before):
    out = {}
    for k, v in after.items():
        if k == "total":
            continue
        b = before.get(k, {"calls": 0, "bytes_sent": 0, "bytes_recv": 0, "time": 0.0})
        d = {f: v[f] - b[f] for f in ("calls", "bytes_sent", "bytes_recv", "time")}
        if d["calls"] or d["bytes_sent"] or d["bytes_recv"]:
            out[k] = d
    return out


def _kind(k):
    return "alltoall" if k == "alltoallv" else k


def kinds_bytes(delta):
    """``{kind: [sent, recv]}`` (nonzero only) of a stats delta; blocking and nonblocking
    variants of a kind are counted together."""
    out = {}
    for k, d in delta.items():
        k = _kind(k[1:] if k.startswith("i") and k[1:] in KINDS else k)
        e = out.setdefault(k, [0, 0])
        e[0] += d["bytes_sent"]
        e[1] += d["bytes_recv"]
    return {k: v for k, v in out.items() if v[0] or v[1]}


def predicted_bytes(graph, plan, rank, item):
    from distconv.planner.events import graph_events
    out = {}
    for ev in graph_events(graph, plan, rank, item).values():
        for e in ev["forward"] + ev["backward"] + ev["sync"]:
            d = out.setdefault(_kind(e.kind), [0, 0])
            d[0] += e.sent
            d[1] += e.recv
    return {k: v for k, v in out.items() if v[0] or v[1]}


# ------------------------------------------------------------------ one plan
class Case:
    """One plan: its model instance, optimizer, inputs and this rank's step records."""

    def __init__(self, label, plan, args, x_glob, labels):
        from distconv.optim import SGD
        from distconv.planner.compute import SGD_SETTINGS
        from distconv.planner.planfile import to_strategies
        from distconv.tensor import DistTensor
        import distconv as dc
        self.label, self.plan = label, plan
        self.model = build_model(args)
        self.model.set_strategy(to_strategies(plan))
        self.params = list(self.model.parameters())
        s = SGD_SETTINGS
        self.opt = SGD(self.params, lr=s["lr"], momentum=s["momentum"],
                       weight_decay=s["weight_decay"], nesterov=s["nesterov"])
        self.crit = dc.nn.CrossEntropyLoss()
        first = next(m for _, m in self.model.named_modules() if isinstance(m, dc.nn.Conv2d))
        self.x = DistTensor.from_global(x_glob, first.input_distribution)
        self.labels = labels
        self.recs = []

    def step(self, comm, record=True):
        from distconv.nn import sync_gradients
        self.opt.zero_grad()
        comm.barrier()
        c0 = time.process_time()
        t0 = time.perf_counter()
        y = self.model(self.x)
        t1 = time.perf_counter()
        loss = self.crit(y, self.labels)
        dy = self.crit.backward()
        t2 = time.perf_counter()
        self.model.backward(dy)
        t3 = time.perf_counter()
        sync_gradients(self.params)
        t4 = time.perf_counter()
        self.opt.step()
        t5 = time.perf_counter()
        c1 = time.process_time()
        if record:
            self.recs.append({"step": t5 - t0, "lost": max(0.0, (t5 - t0) - (c1 - c0)),
                              "phases": {"forward": t1 - t0, "loss": t2 - t1,
                                         "backward": t3 - t2, "sync": t4 - t3,
                                         "update": t5 - t4}})
        return loss

    def bytes_step(self, comm):
        """One step with stats snapshots: ``(model bytes, loss bytes)`` per kind."""
        from distconv.nn import sync_gradients
        self.opt.zero_grad()
        comm.barrier()
        s0 = comm.stats()
        y = self.model(self.x)
        s1 = comm.stats()
        self.crit(y, self.labels)
        dy = self.crit.backward()
        s2 = comm.stats()
        self.model.backward(dy)
        sync_gradients(self.params)
        s3 = comm.stats()
        self.opt.step()
        s4 = comm.stats()
        model = kinds_bytes(stats_delta(s1, s0))
        for k, v in kinds_bytes(stats_delta(s3, s2)).items():
            e = model.setdefault(k, [0, 0])
            e[0] += v[0]
            e[1] += v[1]
        loss = kinds_bytes(stats_delta(s2, s1))
        for k, v in kinds_bytes(stats_delta(s4, s3)).items():
            e = loss.setdefault(k, [0, 0])
            e[0] += v[0]
            e[1] += v[1]
        return model, loss


# ------------------------------------------------------------------ main
def main(argv=None):
    pin_threads(1)  # one BLAS/OpenMP thread per rank
    args = parse_args(argv)
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1)
    import distconv as dc
    from distconv.comm import world
    from distconv.planner import machine as mach
    from distconv.planner.auto import default_cache_path, plan_model
    from distconv.planner.compute import ComputeModel
    from distconv.planner.costs import CostModel
    from distconv.planner.graph import trace
    from distconv.planner.search import search
    from distconv.planner.simulate import simulate

    dc.set_default_dtype(np.float32)
    comm = world()
    p, me = comm.size, comm.rank
    T0 = time.perf_counter()

    def say(msg):
        if me == 0:
            print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)

    if p < 2:
        raise SystemExit("bench_planner.py needs at least 2 ranks (mpiexec -n 2 ...)")
    cores = os.cpu_count() or 1
    bytes_only = args.bytes_only or p > cores
    if bytes_only and not args.bytes_only:
        say(f"{p} ranks on {cores} CPU cores: oversubscribed, so bytes only (no timing)")
    env = environment(comm)
    quiet = {}

    def settle(what):
        if args.wait_quiet > 0:
            q = wait_quiet(comm, args.wait_quiet)
            quiet[what] = q
            idle = "n/a" if q["idle"] is None else f"{100 * q['idle']:.0f}%"
            say(f"machine {'quiet' if q['quiet'] else 'NOT quiet (gave up waiting)'} before "
                f"{what}: CPUs {idle} idle, waited {q['waited_s']:.0f} s")

    N, S = args.batch, args.size
    in_shape = (N, 3, S, S)
    graph = trace(build_model(args), in_shape)

    # ---- machine
    if args.machine:
        path = args.machine if os.path.exists(args.machine) else mach.builtin(args.machine)
        machine = mach.Machine.load(path)
        say(f"machine {machine.name!r} from {path}")
    elif bytes_only:
        machine = mach.Machine.load(mach.builtin("dev_2core"))
        say("machine: the shipped dev_2core file (bytes only: nothing is timed)")
    else:
        settle("calibration")
        say(f"calibrating the alpha-beta machine on {p} ranks ({args.calib_reps} reps)")
        machine = mach.calibrate(comm, sizes=calib_sizes(graph), reps=args.calib_reps,
                                 name=f"calibrated_{p}rank", verbose=True)

    # ---- model, graph, compute model
    cache = None if args.no_cache else (args.cache or default_cache_path())
    measure = not bytes_only

    def cost_with(compute):
        return CostModel(graph, p, machine, compute, item=4, optimizer="sgd")

    hands = hand_plans(graph, p)

    def kernel_pass(label, cache_path, more_plans):
        """Measure every kernel the search and the plans need, on every rank at once ->
        ``(entries, measured, hits)``. Every rank measures the same shapes (rank 0's
        shards) on its own core while the others do too, so the cores are as busy as in
        training (and the ComputeModel drops calls the OS interrupted). A step waits for
        the slowest rank at every collective, and the cores of a shared VM need not run
        at the same speed, so each entry keeps the largest of the ranks' medians; every
        rank then plans from the same numbers."""
        settle(label)
        cm = ComputeModel(cache_path=cache_path, measure=True, dtype="float32",
                          backend="numpy", threads=1, reps=args.compute_reps,
                          rounds=args.compute_rounds)
        n0 = len(cm.entries)
        say(f"{label}: measuring kernel times on every rank at once (threads=1, "
            f"{args.compute_reps} reps x {args.compute_rounds} rounds; cache "
            f"{cache_path or 'off'} with {n0} entries)")
        cost_m = cost_with(cm)
        search(cost_m)
        for _, plan in more_plans:
            simulate(cost_m, plan, overlap=False)
        cm.refine()  # every shape again, in --compute-rounds sweeps: the median of the rounds
        mine = {k: v for k, v in cm.entries.items() if k.endswith(cm.context)}
        allv = comm.allgather_obj(mine)
        merged = {k: float(max(d[k] for d in allv if k in d)) for k in set().union(*allv)}
        say(f"{label}: measured {cm.measured} kernel passes on rank 0 ({cm.hits} cache hits)")
        if me == 0 and cache_path:
            cm.entries.update(merged)
            cm.save()
        return merged, cm.measured, n0

    def model_of(entries):
        cm = ComputeModel(cache_path=None, measure=False, dtype="float32", backend="numpy",
                          threads=1)
        cm.entries.update(entries)
        cm.fit()
        return cm

    if measure:
        entries1, measured1, hits0 = kernel_pass("kernel pass 1", cache, hands)
        compute = model_of(entries1)
    else:
        compute = ComputeModel(cache_path=cache, measure=False, dtype="float32",
                               backend="numpy", threads=1)
        entries1, measured1, hits0 = dict(compute.entries), 0, len(compute.entries)
    # ---- auto plan: the planner's one call, on the same machine and compute model, the
    # gradient sync not overlapped as in the measured step, no memory limit (identical on
    # every rank: same numbers; rank 0's is used regardless)
    t = time.perf_counter()
    res = plan_model(build_model(args), in_shape, p, machine, compute,
                     memory_limit=float("inf"), item=4, optimizer="sgd", overlap=False)
    auto_plan = comm.mpi.bcast(res["plan"], root=0)
    auto_plan = {n: tuple(auto_plan[n]) for n in graph.strategic_names()}  # graph order
    auto_info = comm.mpi.bcast({"chosen": res.get("chosen"),
                                "fastest": res.get("fastest"), "min_gain": res.get("min_gain"),
                                "candidates": res.get("candidates"),
                                "search_s": res["search_s"]}, root=0)
    say(f"auto plan (plan_model, {auto_info['chosen']}) in {time.perf_counter() - t:.2f} s: "
        f"{plan_text(auto_plan)}")
    plans = list(hands) + [("auto", auto_plan)]
    fastest = comm.mpi.bcast(res.get("fastest_plan"), root=0)
    if fastest is not None:
        fastest = {n: tuple(fastest[n]) for n in graph.strategic_names()}
        if fastest != auto_plan:  # plan_model kept a uniform plan within min_gain of it
            plans.append(("auto-fastest", fastest))
            say(f"the fastest predicted plan ({auto_info['fastest']}, measured too as "
                f"auto-fastest): {plan_text(fastest)}")
    same_as = next((lab for lab, pl in hands if pl == auto_plan), None)

    def predictions(cm):
        cost_p = cost_with(cm)
        out = {lab: simulate(cost_p, pl, overlap=False) for lab, pl in plans}
        for lab, pl in plans:
            out[lab]["phases_s"] = predicted_phases(cost_p, pl)
        return comm.mpi.bcast(out, root=0)

    preds = preds1 = predictions(compute)
    preds2 = None

    # ---- measured
    rng = np.random.default_rng(args.seed)
    x_glob = rng.standard_normal(in_shape).astype(np.float32)
    labels = rng.integers(0, args.classes, N)
    cases = [Case(lab, pl, args, x_glob, labels) for lab, pl in plans]

    # bytes (first step of every case also warms it up)
    byte_rows = {}
    for c in cases:
        got, loss_b = c.bytes_step(comm)
        want = predicted_bytes(graph, c.plan, me, 4)
        allg = comm.allgather_obj((got, want, loss_b))
        byte_rows[c.label] = {
            "equal": all(g == w for g, w, _ in allg),
            "per_rank": [{"measured": g, "predicted": w, "loss_measured": lb}
                         for g, w, lb in allg],
            "sent_per_rank_measured": [sum(v[0] for v in g.values()) for g, _, _ in allg],
            "sent_per_rank_predicted": [sum(v[0] for v in w.values()) for _, w, _ in allg]}
    say("bytes per rank, model predicted == measured: " + ", ".join(
        f"{lab} {'yes' if r['equal'] else 'NO'}" for lab, r in byte_rows.items()))

    measured = {}
    timing_info = {}
    if not bytes_only:
        for c in cases:
            for _ in range(args.warmup):
                c.step(comm, record=False)
        settle("timing")
        say(f"timing {len(cases)} plans interleaved, {args.repeats} clean repetitions wanted "
            f"(at most {args.max_repeats})")
        rep, nclean, waits = 0, 0, 0
        while rep < args.max_repeats and nclean < args.repeats:
            k = rep % len(cases)  # rotate the order: no plan always runs first
            for c in cases[k:] + cases[:k]:
                c.step(comm)
            rep += 1
            # a repetition is kept clean only if every plan's step was clean on every rank
            last = comm.allgather_obj([(c.recs[-1]["step"], c.recs[-1]["lost"])
                                       for c in cases])
            ok = all(is_clean([r[i][0] for r in last], [r[i][1] for r in last],
                              args.clean_frac) for i in range(len(cases)))
            nclean += ok
            for c in cases:
                c.recs[-1]["rep_clean"] = ok
            if not ok and args.wait_quiet > 0 and rep < args.max_repeats:
                waits += 1  # other processes took our cores: wait for them to finish
                wait_quiet(comm, args.wait_quiet)
        timing_info.update({"repetitions": rep, "clean_repetitions": nclean,
                            "quiet_waits": waits})
        for c in cases:
            measured[c.label] = summarize(comm.allgather_obj(c.recs), args.clean_frac)
        say(f"timed {rep} repetitions, {nclean} clean (every plan, every rank); waited for "
            f"quiet {waits} times")

    kernel_info = {}
    if measure:
        # a second kernel pass after the timing: the VM's speed drifts by 10-25% over
        # minutes, so the kernel times are the mean of a pass before and one after
        entries2, measured2, _ = kernel_pass("kernel pass 2", None, plans)
        both = sorted(set(entries1) & set(entries2))
        final = dict(entries1)
        final.update(entries2)
        for k in both:
            final[k] = 0.5 * (entries1[k] + entries2[k])
        ratio = [entries2[k] / entries1[k] for k in both if entries1[k] > 0]
        kernel_info = {"pass1_measured": measured1, "pass2_measured": measured2,
                       "common_entries": len(both),
                       "pass2_over_pass1_median": float(np.median(ratio)) if ratio else None,
                       "pass2_over_pass1_p10_p90": [float(np.percentile(ratio, 10)),
                                                    float(np.percentile(ratio, 90))]
                       if ratio else None}
        compute = model_of(final)
        preds2 = predictions(model_of(entries2))
        preds = predictions(compute)
    compute_info = {"context": compute.context, "cache": cache, "cache_entries_before": hits0,
                    "entries_used": len(compute.entries), "measured": measure,
                    "reps": args.compute_reps, "rounds": args.compute_rounds,
                    "evict_bytes": compute.evict_bytes,
                    "passes": kernel_info, "rates": compute.rates}

    profile = {}
    if args.profile and not bytes_only:
        from distconv.profile import Profiler
        settle("profiling")
        profs = [Profiler(c.model) for c in cases]
        for _ in range(args.profile_steps):  # interleaved, like the timing
            for c, prof in zip(cases, profs):
                prof.step_begin()
                c.step(comm, record=False)
                prof.step_end()
        for c, prof in zip(cases, profs):
            prof.remove()
            # per layer: median over the profiled steps on each rank, then max over ranks
            mine = {}
            for st in prof.steps:
                for n, d in st["layers"].items():
                    ct = sum(k["time"] for k in d["kinds"].values())
                    mine.setdefault(n, []).append((d["forward_s"], d["backward_s"], ct))
                mine.setdefault("(outside)", []).append(
                    (0.0, 0.0, sum(k["time"] for k in st["outside"].values())))
            mine = {n: tuple(float(np.median([v[i] for v in vs])) for i in range(3))
                    for n, vs in mine.items()}
            allp = comm.allgather_obj(mine)
            allw = comm.allgather_obj(float(np.median([st["wall_s"] for st in prof.steps])))
            per = {}
            for n in allp[0]:
                vals = [a.get(n, (0.0, 0.0, 0.0)) for a in allp]
                per[n] = {"forward_s": max(v[0] for v in vals),
                          "backward_s": max(v[1] for v in vals),
                          "comm_s": max(v[2] for v in vals)}
            pl = {r["name"]: r for r in preds[c.label]["layers"]}
            rows = []
            for n, d in per.items():
                r = pl.get(n)
                rows.append({"name": n, "measured_fwd_bwd_s": d["forward_s"] + d["backward_s"],
                             "measured_comm_s": d["comm_s"],
                             "predicted_compute_s": r["compute_s"] if r else None,
                             "predicted_comm_s": r["comm_s"] if r else None,
                             "predicted_sync_s": r["sync_s"] if r else None})
            joins = sum(r["compute_s"] + r["comm_s"] for r in preds[c.label]["layers"]
                        if r["kind"] == "join")
            profile[c.label] = {"layers": rows, "profiled_step_wall_s": max(allw),
                                "predicted_joins_s": joins}

    # ---- report (rank 0)
    if me == 0:
        rows = []
        for lab, pl in plans:
            pr = preds[lab]
            row = {"label": lab, "plan": {k: list(v) for k, v in pl.items()},
                   "plan_text": plan_text(pl),
                   "predicted_s": pr["step_s"],
                   "predicted": {k: pr[k] for k in ("step_s", "compute_s", "comm_s", "sync_s",
                                                    "exposed_sync_s", "update_s", "memory",
                                                    "phases_s")},
                   "bytes": byte_rows[lab]}
            if lab == "auto":
                row["same_as"] = same_as
            if measured:
                row["measured_s"] = measured[lab]["step_s"]
                row["measured"] = measured[lab]
                row["error"] = (row["predicted_s"] - row["measured_s"]) / row["measured_s"]
            if preds2 is not None:  # each kernel pass alone
                row["predicted_pass1_s"] = preds1[lab]["step_s"]
                row["predicted_pass2_s"] = preds2[lab]["step_s"]
            rows.append(row)
        summary = {"bytes_all_equal": all(r["bytes"]["equal"] for r in rows)}
        if measured:
            for r, a, b in zip(rows, rank_order([r["predicted_s"] for r in rows]),
                               rank_order([r["measured_s"] for r in rows])):
                r["rank_predicted"], r["rank_measured"] = a, b
            summary.update(compare(rows, args.rank_margin))
            if same_as:
                a = next(r for r in rows if r["label"] == "auto")
                h = next(r for r in rows if r["label"] == same_as)
                summary["same_plan_control"] = {
                    "hand": same_as, "auto_s": a["measured_s"], "hand_s": h["measured_s"],
                    "diff": abs(a["measured_s"] - h["measured_s"])
                    / min(a["measured_s"], h["measured_s"]),
                    "paired": summary["auto_paired"].get(same_as)}
            if preds2 is not None:
                for k in ("pass1", "pass2"):
                    alt = [dict(r, predicted_s=r[f"predicted_{k}_s"]) for r in rows]
                    c = compare(alt, args.rank_margin)
                    summary[f"{k}_only"] = {x: c[x] for x in (
                        "mae", "max_abs_err", "signed_mean_err", "rank_pairs",
                        "rank_pairs_agree")}
            summary["targets"] = {
                "mae_le_20pct": summary["mae"] <= 0.20,
                "ranking_agrees": summary["rank_pairs_agree"] == summary["rank_pairs"],
                # paired: see planner_report (the medians flip with the VM's speed modes)
                "auto_le_1.05x_best_hand": (summary["auto_over_best_hand_paired"] is not None
                                            and summary["auto_over_best_hand_paired"] <= 1.05),
                "bytes_equal": summary["bytes_all_equal"]}
        print_table(rows, summary, measured)
        doc = {"benchmark": "bench_planner", "args": {k: v for k, v in vars(args).items()},
               "bytes_only": bytes_only,
               "model": {"name": ("IncNet (stem, blocks of 3 towers joined by dc.cat)"
                                  if args.model == "inception"
                                  else "ResNet(BasicBlock, stem=cifar)"),
                         "blocks": args.blocks,
                         "width": args.width, "input_shape": list(in_shape),
                         "classes": args.classes, "dtype": "float32",
                         "strategic_layers": len(graph.strategic_names())},
               "auto": auto_info,
               "simulate": {"overlap": False,
                            "why": "the measured step runs sync_gradients (blocking) "
                                   "after backward"},
               "machine": machine.to_dict(), "compute_model": compute_info,
               "environment": env, "quiet_waits": quiet, "timing": timing_info,
               "plans": rows, "summary": summary,
               "elapsed_s": time.perf_counter() - T0}
        if profile:
            doc["profile"] = profile
        if args.out:
            d = os.path.dirname(os.path.abspath(args.out))
            os.makedirs(d, exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump(doc, fh, indent=1, default=_json_default)
                fh.write("\n")
            say(f"wrote {args.out}")
        if args.md:
            with open(args.md, "w") as fh:
                fh.write(markdown(doc))
            say(f"wrote {args.md}")
    comm.barrier()
    return 0



if __name__ == "__main__":
    from distconv.comm import run_guarded
    sys.exit(run_guarded(main))
