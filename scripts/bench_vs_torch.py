#!/usr/bin/env python
"""Whole training steps of distconv vs PyTorch and PyTorch DDP, side by side in ONE job.

    mpiexec -n 2 python -m mpi4py scripts/bench_vs_torch.py --json benchmarks/results/x.json
    mpiexec -n 2 python -m mpi4py scripts/bench_vs_torch.py --quick --json /tmp/q.json

A step is what a user's training loop does, float32: zero the gradients, forward, loss,
backward, SGD-with-momentum update (distconv: ``opt.zero_grad(); loss = crit(model(x), y);
loss.backward(); opt.step()``, whose ``step`` includes the gradient sync).
Each round runs every configuration once, in the same order, so the slow drifts of the
shared machine hit all of them alike (the idea of ``scripts/bench_paired.py``):

* ``torch 1x1``: rank 0 alone, PyTorch with 1 thread (the other ranks sleep in a
  nonblocking barrier, so they leave the cores free);
* ``torch 1xP``: rank 0 alone, PyTorch with P threads (P = ranks of the job);
* ``DDP Px1``: PyTorch DistributedDataParallel with gloo on loopback, P processes (the MPI
  ranks) x 1 thread, each with batch/P samples; batch norm per process, as DDP users get;
* ``distconv 1``: rank 0 alone on a grid of itself (``comm.self_comm``), 1 thread;
* ``distconv P <strategy>``: all P ranks, 1 BLAS thread each, under ``sample``,
  ``channel`` (``sample=1,channel=P``), ``filter`` (``sample=1,filter=P``) and ``auto``
  (the planner's per-layer plan, :func:`distconv.planner.auto.plan_model`, machine
  calibrated in this job).

PyTorch runs as a user runs it (its default oneDNN convolutions; no tuning down). A step's
time on several ranks is the maximum over ranks after a barrier. Reported per
configuration: median step, quartiles, min/max, and the speed relative to each peer as
the median over rounds of ``t_peer / t_config`` of the SAME round (with quartiles).
Rank 0 prints a table and writes ``--json`` and ``--md`` (a markdown table).
Each step's CPU time (``time.process_time``, max over ranks) is recorded too: on a
shared machine it leaves out the time other processes took the core, so for the 1-thread
configurations (``torch 1x1``, ``distconv 1``) it is the steadier figure; for several
ranks it also counts MPI's busy-waiting, and for ``torch 1xP`` it sums P threads (not
comparable, left out of the table).
Models: ResNet-18 with the CIFAR stem at 32x32 (10 classes) and ResNet-50 at 224x224
(1000 classes); the PyTorch twins come from ``scripts/torch_resnet.py`` (torchvision's
definitions, which ``distconv.models`` follows).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from distconv.bench.cli import bench_parser, fill_defaults, positive_ints
from distconv.bench.runs import input_distribution, plan_and_predict, self_strategy
from distconv.envinfo import pin_threads

MODELS = {"resnet18": dict(size=32, classes=10, stem="cifar"),
          "resnet50": dict(size=224, classes=1000, stem="imagenet")}
DEFAULTS = dict(models="resnet18,resnet50", batches="2,32", rounds=5, warmup=1,
                strategies="sample,channel,filter,auto", width=64, size=None)
QUICK = dict(models="resnet18", batches="2,4", rounds=2, warmup=1,
             strategies="sample,channel,filter,auto", width=8, size=16)
STRATEGY_TEXT = {"sample": "sample={p}", "channel": "sample=1,channel={p}",
                 "filter": "sample=1,filter={p}"}


def parse_args(argv=None):
    ap = bench_parser("bench_vs_torch.py", __doc__)
    ap.add_argument("--models", default=None,
                    help="comma-separated: resnet18 (CIFAR stem, 32x32), resnet50 (224x224) "
                         f"(default {DEFAULTS['models']!r})")
    ap.add_argument("--batches", default=None, help="comma-separated global batches (2,32)")
    ap.add_argument("--strategies", default=None,
                    help="comma-separated distconv P-rank strategies among sample, channel, "
                         "filter, auto (default all four)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (1)")
    ap.add_argument("--width", type=int, default=None,
                    help="base width of the ResNets (64: the real models; --quick: 8)")
    ap.add_argument("--size", type=int, default=None,
                    help="input H = W (default per model: 32 for resnet18, 224 for resnet50)")
    ap.add_argument("--no-peers", action="store_true", help="distconv configurations only")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--quick", action="store_true",
                    help="CI size: ResNet-18 of width 8 on 16x16 inputs, batches 2,4, 2 rounds")
    ap.add_argument("--json", default=None, help="rank 0 writes every step time here")
    ap.add_argument("--md", default=None, help="rank 0 writes a markdown table here")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    fill_defaults(a, DEFAULTS, QUICK)
    a.model_list = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in a.model_list if m not in MODELS]
    if bad or not a.model_list:
        ap.error(f"--models: unknown {bad}; choose from {sorted(MODELS)}")
    a.batch_list = positive_ints(ap, a.batches, "--batches")
    a.strategy_list = [s.strip() for s in a.strategies.split(",") if s.strip()]
    bad = [s for s in a.strategy_list if s not in (*STRATEGY_TEXT, "auto")]
    if bad:
        ap.error(f"--strategies: unknown {bad}; choose from sample, channel, filter, auto")
    if a.rounds < 1 or a.warmup < 0 or a.width < 1 or (a.size is not None and a.size < 1):
        ap.error("--rounds and --width must be >= 1, --warmup >= 0")
    return a


# --------------------------------------------------------------------------- configs
class _Config:
    """One way to train the model; ``step()`` returns this rank's (wall, CPU) seconds."""
    name = ""
    one_rank = False  # runs on rank 0 only

    def step(self):
        raise NotImplementedError

    def timed(self):
        t0, c0 = time.perf_counter(), time.process_time()
        self.run()
        return time.perf_counter() - t0, time.process_time() - c0

    def run(self):
        """One training step: the same loop for PyTorch and distconv."""
        self.opt.zero_grad()
        loss = self.crit(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()


class _Torch(_Config):
    def __init__(self, args, spec, x, y, threads, ddp_group=None):
        import torch
        import torch_resnet as tr  # scripts/torch_resnet.py, beside this script
        self.torch, self.threads = torch, threads
        torch.manual_seed(args.seed)
        block, layers = ((tr.BasicBlock, [2, 2, 2, 2]) if spec["model"] == "resnet18"
                         else (tr.Bottleneck, [3, 4, 6, 3]))
        m = tr.ResNet(block, layers, spec["classes"], stem=spec["stem"], base_width=args.width)
        if ddp_group is not None:
            from torch.nn.parallel import DistributedDataParallel
            m = DistributedDataParallel(m, process_group=ddp_group)
        self.model = m
        self.opt = torch.optim.SGD(m.parameters(), lr=args.lr, momentum=args.momentum)
        self.crit = torch.nn.CrossEntropyLoss()
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(y)

    def step(self):
        self.torch.set_num_threads(self.threads)
        return self.timed()



class _Distconv(_Config):
    def __init__(self, args, spec, x, y, strategy, plan=None):
        import distconv as dc
        from distconv import DistTensor, models, optim
        dc.manual_seed(args.seed)
        fn = models.resnet18 if spec["model"] == "resnet18" else models.resnet50
        self.model = fn(num_classes=spec["classes"], stem=spec["stem"], base_width=args.width,
                        strategy=strategy)
        if plan is not None:
            self.model.set_strategy(plan)
        self.x = DistTensor.from_global(x, input_distribution(self.model))
        self.y = y
        self.opt = optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum)
        self.crit = dc.nn.CrossEntropyLoss()

    def step(self):
        return self.timed()



def _ddp_group(comm):
    """A gloo process group over the MPI ranks on loopback (a free port found by rank 0)."""
    import socket

    import torch.distributed as tdist
    port = None
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.allgather_obj(port)[0]
    if not tdist.is_initialized():
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                 rank=comm.rank, world_size=comm.size)
    return tdist.group.WORLD


def _auto_plan(comm, spec_model, x_shape):
    """The planner's per-layer plan for ``x_shape`` on this job's ranks (machine calibrated
    here, kernels measured/cached as ``scripts/scaling.py`` does)."""
    from distconv.planner.planfile import to_strategies
    plan, predicted, _ = plan_and_predict(comm, spec_model, x_shape, None, overlap=True)
    return to_strategies(plan), plan, predicted


def build_configs(args, comm, spec, x, y):
    """Every configuration of one (model, batch), in round order; rank 0 alone builds the
    one-rank ones. Returns (configs, notes)."""
    import distconv as dc
    p, me = comm.size, comm.rank
    n = x.shape[0]
    cfgs, notes = [], {}

    def add(name, one_rank, make):
        c = make() if (not one_rank or me == 0) else _Config()
        c.name, c.one_rank = name, one_rank
        cfgs.append(c)

    if not args.no_peers:
        add("torch 1x1", True, lambda: _Torch(args, spec, x, y, 1))
        if p > 1:
            add(f"torch 1x{p}", True, lambda: _Torch(args, spec, x, y, p))
            if n % p == 0:
                grp = _ddp_group(comm)
                lo, hi = me * n // p, (me + 1) * n // p
                add(f"DDP {p}x1", False, lambda: _Torch(args, spec, x[lo:hi], y[lo:hi], 1, grp))
            else:
                notes["ddp"] = f"batch {n} does not split over {p} processes"
    add("distconv 1", True, lambda: _Distconv(args, spec, x, y, self_strategy()))
    if p > 1:
        for s in args.strategy_list:
            if s == "auto":
                probe = _Distconv(args, spec, x, y, dc.Strategy(sample=p)).model
                plan, raw, pred = _auto_plan(comm, probe, x.shape)
                del probe
                notes["auto_plan"] = {k: list(v) for k, v in raw.items()}
                notes["auto_plan_summary"] = sorted({f"{v[0]}x{v[1]}x{v[2]}"
                                                     for v in raw.values()})
                notes["auto_predicted_step_s"] = pred["step_s"]
                add(f"distconv {p} auto", False,
                    lambda: _Distconv(args, spec, x, y, dc.Strategy(sample=p), plan))
            else:
                st = dc.Strategy.parse(STRATEGY_TEXT[s].format(p=p))
                add(f"distconv {p} {s}", False, lambda: _Distconv(args, spec, x, y, st))
    return cfgs, notes


def run_rounds(args, comm, cfgs, log):
    """warmup + rounds of every config in order; returns ({name: [max-over-ranks wall s]},
    {name: [max-over-ranks CPU s]})."""
    times = {c.name: [] for c in cfgs}
    cpu = {c.name: [] for c in cfgs}
    t_start = time.perf_counter()
    for r in range(args.warmup + args.rounds):
        for c in cfgs:
            if c.one_rank:
                comm.idle_barrier(0.002)
                t = c.step() if comm.rank == 0 else (0.0, 0.0)
                comm.idle_barrier(0.002)
            else:
                comm.barrier()
                t = c.step()
            ts = comm.allgather_obj(t)
            if r >= args.warmup:
                times[c.name].append(max(w for w, _ in ts))
                cpu[c.name].append(max(u for _, u in ts))
        log(f"[{time.perf_counter() - t_start:7.1f} s] round {r + 1}/{args.warmup + args.rounds}")
    return times, cpu


def _paired(ref, t):
    a, b, c = (float(v) for v in np.percentile(np.asarray(ref) / np.asarray(t), [25, 50, 75]))
    return {"median": b, "q1": a, "q3": c}


def summarize(times, cpu, p):
    """Per config: median, quartiles, min, max, and paired speed vs each peer (wall clock);
    the same from CPU time (``cpu_*``; meaningful for the 1-thread configs only, see
    ``--help``)."""
    peers = [k for k in ("torch 1x1", f"torch 1x{p}", f"DDP {p}x1", "distconv 1") if k in times]
    rows = []
    for name, ts in times.items():
        t = np.asarray(ts)
        q1, med, q3 = (float(v) for v in np.percentile(t, [25, 50, 75]))
        row = {"config": name, "median_s": med, "q1_s": q1, "q3_s": q3, "min_s": float(t.min()),
               "max_s": float(t.max()), "step_s": t.tolist(), "speed_vs": {},
               "cpu_median_s": float(np.median(cpu[name])), "cpu_step_s": list(cpu[name]),
               "cpu_speed_vs": {}}
        for peer in peers:
            row["speed_vs"][peer] = _paired(times[peer], t)
            row["cpu_speed_vs"][peer] = _paired(cpu[peer], cpu[name])
        rows.append(row)
    return rows


def _fmt_ratio(d):
    return f"{d['median']:.2f} ({d['q1']:.2f}-{d['q3']:.2f})"


def table(groups, p):
    peers = ["torch 1x1", f"torch 1x{p}", f"DDP {p}x1"]
    head = ("| model | batch | configuration | median step s (q1-q3) | "
            + " | ".join(f"speed vs {k} (q1-q3)" for k in peers)
            + " | CPU-time speed vs torch 1x1 |")
    lines = [head, "|" + "---|" * (5 + len(peers))]
    for g in groups:
        for r in g["results"]:
            cells = [_fmt_ratio(r["speed_vs"][k]) if k in r["speed_vs"] else "-" for k in peers]
            cpu = ("-" if r["config"] == f"torch 1x{p}" or "torch 1x1" not in r["cpu_speed_vs"]
                   else _fmt_ratio(r["cpu_speed_vs"]["torch 1x1"]))
            lines.append(f"| {g['model']} | {g['batch']} | {r['config']} | "
                         f"{r['median_s']:.3f} ({r['q1_s']:.3f}-{r['q3_s']:.3f}) | "
                         + " | ".join(cells) + f" | {cpu} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    pin_threads(1)  # one BLAS/OpenMP thread per rank
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # DDP's gloo group on loopback
    import torch
    torch.set_num_threads(1)
    import distconv as dc
    from distconv.comm import world
    from distconv.envinfo import run_facts
    comm = world()
    p, me = comm.size, comm.rank
    dc.set_default_dtype(np.float32)

    def log(msg):
        if me == 0:
            print(msg, flush=True)

    groups = []
    for mname in args.model_list:
        for n in args.batch_list:
            spec = dict(MODELS[mname], model=mname)
            size = args.size or spec["size"]
            rng = np.random.default_rng(args.seed)
            x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
            y = rng.integers(0, spec["classes"], n).astype(np.int64)
            log(f"== {mname} (width {args.width}) on {x.shape}, {p} ranks")
            cfgs, notes = build_configs(args, comm, spec, x, y)
            times, cpu = run_rounds(args, comm, cfgs, log)
            rows = summarize(times, cpu, p)
            groups.append({"model": mname, "batch": n, "size": size, "width": args.width,
                           "results": rows, "notes": notes})
            del cfgs
            if me == 0:
                print(table(groups[-1:], p), flush=True)
    if me == 0:
        md = table(groups, p)
        print("\n" + md)
        doc = {"benchmark": "bench_vs_torch", "ranks": p, "rounds": args.rounds,
               "warmup": args.warmup, "dtype": "float32", "optimizer":
               f"SGD lr={args.lr} momentum={args.momentum}", "groups": groups,
               "torch": torch.__version__, **run_facts()}
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(doc, fh, indent=1)
            print(f"wrote {args.json}")
        if args.md:
            with open(args.md, "w") as fh:
                fh.write(f"Training step, float32, {p} ranks/processes x 1 thread each unless "
                         f"noted; {args.rounds} interleaved rounds; speed = median over "
                         f"rounds of t_peer / t_config (q1-q3). git {doc['git'].get('commit')}, "
                         f"{doc['cpu']}, torch {torch.__version__}.\n\n{md}\n")
            print(f"wrote {args.md}")
    if dc_torch_dist_initialized():
        import torch.distributed as tdist
        tdist.destroy_process_group()
    return 0


def dc_torch_dist_initialized():
    try:
        import torch.distributed as tdist
        return tdist.is_available() and tdist.is_initialized()
    except ImportError:
        return False


if __name__ == "__main__":
    from distconv.comm import run_guarded
    sys.exit(run_guarded(main))
