#!/usr/bin/env python
"""MCMC refinement (FlexFlow) vs the DP search, simulated: how often and by how much.

    python scripts/mcmc_study.py --json benchmarks/results/planner_mcmc.json

Part 1, paper scale: ResNet-18 and ResNet-50 (ImageNet shapes) on the shipped
``v100_ib`` machine file at 16-256 ranks; for each case the candidates of
:func:`distconv.planner.auto.plan_model` (the DP searched at allreduce weights 1, 1/2, 0,
data parallelism and every uniform plan) are simulated and
:func:`distconv.planner.mcmc.mcmc` runs ``--budget`` seconds from the fastest one, for
each ``--seeds``; recorded: the DP's step (fastest of its three searches), the start's,
MCMC's best, proposals, acceptances, when the last improvement came.

Part 2, small graphs (4-8 strategic layers, 2-4 ranks): every plan is simulated (brute
force over the simulator's step) and compared with the DP plan and MCMC (a fixed number
of proposals per seed, so the numbers do not depend on the machine's speed); the DP's
additive optimum is also checked against ``search.brute_force``.

Every number is the planner's cost model, nothing is run. CPU-bound: on a shared machine
run it under ``flock``.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time


WEIGHTS = (1.0, 0.5, 0.0)


def _git(*args):
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def candidates(cost, memory_limit):
    """``{name: (plan, step)}``: the DP at each weight, data parallelism, uniform plans
    (those that fit), as plan_model builds them."""
    from distconv.planner.search import search
    from distconv.planner.simulate import simulate
    out = {}
    for w in WEIGHTS:
        q = search(cost, memory_limit, sync_weight=w)["plan"]
        out[f"search (allreduce weight {w:g})"] = (q, simulate(cost, q)["step_s"])
    names = cost.graph.strategic_names()
    for st in cost.strategies:
        q = {n: st for n in names}
        sm = simulate(cost, q)
        if memory_limit is None or sm["memory"] <= memory_limit:
            out["data parallel" if st == (cost.p, 1, 1) else f"uniform {st}"] = (
                q, sm["step_s"])
    return out


def paper_case(model_name, P, N, machine, budget, seeds, restart_every):
    from distconv import models
    from distconv.planner.costs import CostModel
    from distconv.planner.graph import trace
    from distconv.planner.mcmc import mcmc
    model = models.MODELS[model_name](1000, in_channels=3, stem="imagenet")
    t0 = time.perf_counter()
    cost = CostModel(trace(model, (N, 3, 224, 224)), P, machine)
    lim = machine.memory_per_rank
    cands = candidates(cost, lim)
    plan_s = time.perf_counter() - t0
    dp_name = min((n for n in cands if n.startswith("search")), key=lambda n: cands[n][1])
    start_name = min(cands, key=lambda n: cands[n][1])
    runs = []
    for seed in seeds:
        r = mcmc(cost, cands[start_name][0], budget, seed=seed, memory_limit=lim,
                 restart_every=restart_every)
        runs.append({k: r[k] for k in ("step_s", "start_step_s", "gain", "proposals",
                                       "accepted", "improved", "rejected_memory",
                                       "restarts", "best_at", "seconds", "beta", "seed")})
        runs[-1]["changed_layers"] = sum(
            1 for n in r["plan"] if tuple(r["plan"][n]) != tuple(cands[start_name][0][n]))
    best = min(r["step_s"] for r in runs)
    # FlexFlow starts its chain from data parallelism: the same budget from there (first
    # seed) says how much the DP's start is worth
    dpar = None
    if "data parallel" in cands:
        r = mcmc(cost, cands["data parallel"][0], budget, seed=seeds[0], memory_limit=lim,
                 restart_every=restart_every)
        dpar = {k: r[k] for k in ("step_s", "start_step_s", "proposals", "accepted",
                                  "improved", "best_at", "seconds", "seed")}
    return {"model": model_name, "ranks": P, "batch": N, "layers": len(cands[dp_name][0]),
            "strategies": len(cost.strategies), "dp": dp_name, "dp_step_s": cands[dp_name][1],
            "start": start_name, "start_step_s": cands[start_name][1],
            "data_parallel_step_s": cands["data parallel"][1] if "data parallel" in cands
            else None,
            "mcmc_best_step_s": best, "mcmc_vs_dp": cands[dp_name][1] / best,
            "mcmc_vs_start": cands[start_name][1] / best, "runs": runs,
            "mcmc_from_data_parallel": dpar,
            "setup_s": plan_s}


def seed_sweep(cases, machine, seeds, proposals):
    """MCMC from the DP's plan with a fixed number of proposals (deterministic) for each
    seed: how reliably and how late a chain finds a faster plan."""
    from distconv import models
    from distconv.planner.costs import CostModel
    from distconv.planner.graph import trace
    from distconv.planner.mcmc import mcmc
    from distconv.planner.search import search
    from distconv.planner.simulate import simulate
    out = []
    lim = machine.memory_per_rank
    for name, P, N in cases:
        model = models.MODELS[name](1000, in_channels=3, stem="imagenet")
        cost = CostModel(trace(model, (N, 3, 224, 224)), P, machine)
        start = min((search(cost, lim, sync_weight=w)["plan"] for w in WEIGHTS),
                    key=lambda q: simulate(cost, q)["step_s"])
        for seed in seeds:
            r = mcmc(cost, start, math.inf, seed=seed, memory_limit=lim,
                     max_proposals=proposals)
            rec = {"model": name, "ranks": P, "batch": N, "seed": seed,
                   "start_step_s": r["start_step_s"], "step_s": r["step_s"],
                   "best_at": r["best_at"], "proposals": r["proposals"],
                   "accepted": r["accepted"], "seconds": r["seconds"]}
            out.append(rec)
            print(f"sweep {name} P={P} N={N} seed {seed}: {r['start_step_s'] * 1e3:.3f} -> "
                  f"{r['step_s'] * 1e3:.3f} ms (best at proposal {r['best_at']})", flush=True)
    return out


# ------------------------------------------------------------------ small graphs
def small_graphs():
    import distconv.nn as nn
    from distconv.models.resnet import BasicBlock, Bottleneck
    g = {}
    g["seq_uneven"] = lambda: (nn.Sequential(
        nn.Conv2d(5, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()), (3, 5, 7, 7))
    g["conv_linear"] = lambda: (nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 3, padding=1),
        nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * 36, 10)), (8, 3, 6, 6))
    g["mixed_seq"] = lambda: (nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 64, 3, stride=4, padding=1, bias=False), nn.BatchNorm2d(64),
        nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, bias=False)), (8, 3, 16, 16))
    g["basic_downsample"] = lambda: (BasicBlock(5, 6, stride=2, downsample=nn.Sequential(
        nn.Conv2d(5, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))), (3, 5, 7, 7))
    g["seq_then_block"] = lambda: (nn.Sequential(
        nn.Conv2d(5, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        BasicBlock(6, 6)), (3, 5, 7, 7))
    g["bottleneck"] = lambda: (Bottleneck(8, 2), (3, 8, 5, 5))
    return g


def small_machines():
    from distconv.planner.machine import KINDS, Machine, builtin

    def m(intra, inter, name):
        links = {link: {k: {"alpha": a * (1 + 0.25 * i), "beta": b * (1 + 0.5 * i)}
                        for i, k in enumerate(KINDS)}
                 for link, (a, b) in (("intra", intra), ("inter", inter))}
        return Machine.from_dict({"name": name, "ranks_per_node": 2, "links": links,
                                  "memory_per_rank": None, "notes": ""})
    return {"mid": m((1e-5, 1e-9), (1e-4, 1e-8), "mid"),
            "slow-net": m((1e-5, 1e-8), (1e-4, 1e-7), "slow-net"),
            "bw-bound": m((1e-5, 3e-8), (1e-4, 3e-7), "bw-bound"),
            "v100_ib": Machine.load(builtin("v100_ib"))}


def small_case(gname, build, p, mname, mach, seeds, proposals, max_plans):
    from distconv.planner.compute import ComputeModel
    from distconv.planner.costs import CostModel
    from distconv.planner.graph import trace
    from distconv.planner.mcmc import mcmc
    from distconv.planner.search import brute_force, search
    from distconv.planner.simulate import additive_time, simulate
    model, shape = build()
    rates = {"flops": {"t0": 20e-6, "rate": 50e9}, "memory": {"t0": 20e-6, "rate": 5e9}}
    comp = None if mname == "v100_ib" else ComputeModel(measure=False, rates=rates)
    cost = CostModel(trace(model, shape), p, mach, comp)
    names = cost.graph.strategic_names()
    n_plans = len(cost.strategies) ** len(names)
    if n_plans > max_plans:
        return None
    t0 = time.perf_counter()
    bf = (math.inf, None)
    for combo in itertools.product(cost.strategies, repeat=len(names)):
        q = dict(zip(names, combo))
        t = simulate(cost, q)["step_s"]
        if t < bf[0]:
            bf = (t, q)
    bf_s = time.perf_counter() - t0
    dps = {w: search(cost, sync_weight=w)["plan"] for w in WEIGHTS}
    dp_plan = min(dps.values(), key=lambda q: simulate(cost, q)["step_s"])
    dp_t = simulate(cost, dp_plan)["step_s"]
    uni = min(simulate(cost, {n: st for n in names})["step_s"] for st in cost.strategies)
    _, add_bf = brute_force(cost)
    add_dp = additive_time(cost, dps[1.0])
    runs = []
    for seed in seeds:
        r = mcmc(cost, dp_plan, math.inf, seed=seed, max_proposals=proposals)
        runs.append({"seed": seed, "step_s": r["step_s"], "best_at": r["best_at"],
                     "accepted": r["accepted"], "seconds": r["seconds"]})
    return {"graph": gname, "ranks": p, "machine": mname, "layers": len(names),
            "strategies": len(cost.strategies), "plans": n_plans,
            "brute_force_step_s": bf[0], "dp_step_s": dp_t, "best_uniform_step_s": uni,
            "dp_gap": dp_t / bf[0] - 1, "mcmc_gap": [r["step_s"] / bf[0] - 1 for r in runs],
            "mcmc_runs": runs, "additive_dp_equals_brute_force":
                abs(add_dp - add_bf) <= 1e-12 * add_bf,
            "brute_force_s": bf_s}


# ------------------------------------------------------------------ report
def markdown(res) -> str:
    lines = ["Paper scale (v100_ib, predicted; MCMC from the fastest candidate, "
             f"{res['config']['budget']:g} s per seed, seeds {res['config']['seeds']}):", "",
             "| model | P | N | layers | K | DP step ms | start | start ms | MCMC best ms | "
             "MCMC vs DP | proposals/run | accepted/run | data parallel ms | MCMC from data "
             "parallel ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in res["paper"]:
        props = "/".join(str(r["proposals"]) for r in c["runs"])
        acc = "/".join(str(r["accepted"]) for r in c["runs"])
        lines.append(f"| {c['model']} | {c['ranks']} | {c['batch']} | {c['layers']} | "
                     f"{c['strategies']} | {c['dp_step_s'] * 1e3:.3f} | {c['start']} | "
                     f"{c['start_step_s'] * 1e3:.3f} | {c['mcmc_best_step_s'] * 1e3:.3f} | "
                     f"{100 * (c['mcmc_vs_dp'] - 1):+.2f}% | {props} | {acc} | "
                     + (f"{c['data_parallel_step_s'] * 1e3:.3f} | "
                        f"{c['mcmc_from_data_parallel']['step_s'] * 1e3:.3f} |"
                        if c["mcmc_from_data_parallel"] else "- | - |"))
    lines += ["", "Small graphs vs brute force over the simulated step "
              f"({res['config']['small_proposals']} proposals per seed, seeds "
              f"{res['config']['seeds']}):", "",
              "| graph | P | machine | L | K^L | DP gap | MCMC gap (per seed) | "
              "best uniform gap | additive DP = BF |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in res["small"]:
        gaps = " / ".join(f"{100 * g:.3f}%" for g in c["mcmc_gap"])
        lines.append(f"| {c['graph']} | {c['ranks']} | {c['machine']} | {c['layers']} | "
                     f"{c['plans']} | {100 * c['dp_gap']:.3f}% | {gaps} | "
                     f"{100 * (c['best_uniform_step_s'] / c['brute_force_step_s'] - 1):.3f}%"
                     f" | {'yes' if c['additive_dp_equals_brute_force'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="mcmc_study.py", description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--budget", type=float, default=10.0, help="MCMC seconds per seed "
                    "(paper scale)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--small-proposals", type=int, default=2000)
    ap.add_argument("--max-plans", type=int, default=50000)
    ap.add_argument("--restart-every", type=int, default=None)
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--ranks", default="16,64,256")
    ap.add_argument("--skip-paper", action="store_true")
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--sweep", default="", metavar="MODEL:P:N,...",
                    help="also run MCMC from the DP's plan for each of these cases with "
                         "--sweep-proposals proposals per seed of --sweep-seeds")
    ap.add_argument("--sweep-seeds", default="0,1,2,3,4")
    ap.add_argument("--sweep-proposals", type=int, default=30000)
    args = ap.parse_args(argv)
    from distconv.planner.machine import Machine, builtin
    from distconv.planner.mcmc import RESTART_EVERY
    seeds = [int(s) for s in args.seeds.split(",")]
    restart = RESTART_EVERY if args.restart_every is None else args.restart_every
    machine = Machine.load(builtin("v100_ib"))
    res = {"config": {"budget": args.budget, "seeds": seeds, "restart_every": restart,
                      "small_proposals": args.small_proposals, "machine": "v100_ib"},
           "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds"),
           "host": platform.node(), "commit": _git("rev-parse", "HEAD"),
           "planner_dirty": bool(_git("status", "--porcelain", "distconv/planner")),
           "paper": [], "small": [], "seed_sweep": []}
    if not args.skip_paper:
        for name in args.models.split(","):
            for P in (int(x) for x in args.ranks.split(",")):
                for N in sorted({P, 4 * P, 64}):
                    c = paper_case(name, P, N, machine, args.budget, seeds, restart)
                    res["paper"].append(c)
                    print(f"{name} P={P} N={N}: DP {c['dp_step_s'] * 1e3:.3f} ms, start "
                          f"{c['start']} {c['start_step_s'] * 1e3:.3f}, MCMC "
                          f"{c['mcmc_best_step_s'] * 1e3:.3f} ({c['mcmc_vs_dp']:.4f}x DP),"
                          f" proposals {[r['proposals'] for r in c['runs']]}", flush=True)
    if args.sweep:
        cases = [(m, int(p), int(n)) for m, p, n in
                 (c.split(":") for c in args.sweep.split(",") if c)]
        res["config"]["sweep_proposals"] = args.sweep_proposals
        res["seed_sweep"] = seed_sweep(cases, machine,
                                       [int(x) for x in args.sweep_seeds.split(",")],
                                       args.sweep_proposals)
    if not args.skip_small:
        machines = small_machines()
        for gname, build in small_graphs().items():
            for p in (2, 3, 4):
                for mname, mach in machines.items():
                    c = small_case(gname, build, p, mname, mach, seeds,
                                   args.small_proposals, args.max_plans)
                    if c is None:
                        continue
                    res["small"].append(c)
                    print(f"{gname} P={p} {mname}: DP gap {100 * c['dp_gap']:.3f}%, MCMC "
                          f"gaps {[round(100 * g, 3) for g in c['mcmc_gap']]}%", flush=True)
    md = markdown(res)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
