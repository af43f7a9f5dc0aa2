#!/usr/bin/env python
"""Paper-scale planner study: searched per-layer plans vs pure data parallelism, simulated.

    python scripts/planner_study.py --json benchmarks/results/planner_paper_scale.json

For each model, rank count P and global batch N (small per-GPU batches N = b*P, and fixed
small global batches N over growing P, strong-scaling style, where data parallelism runs
out of samples once P > N), this runs :func:`distconv.planner.auto.plan_model` on a
machine file (default the shipped ``v100_ib``: 4 V100 16 GB per node, InfiniBand; fitted
compute rates from the file, alpha-beta links, memory limit = the file's
``memory_per_rank``) and records the predicted step time of the plan it returns (the
fastest under :func:`distconv.planner.simulate.simulate` of the searches with the
gradient allreduce weighted 1, 1/2 and 0 and of pure data parallelism; which one is
``chosen``) and of pure data parallelism (every layer ``(P, 1, 1)``), the step of the
weight-1 (additive) search alone, the gradient-allreduce time and bytes, the exposed (not
overlapped) allreduce, memory per rank, search seconds (all three searches) and the wall
time of the whole ``plan_model`` call, and which strategies the plan uses in which stage.
When P > N it also simulates data parallelism on only N of the ranks (the rest idle), the
better data-parallel baseline there.

Models: the ResNets of ``distconv.models.MODELS`` and the OptCNN/FlexFlow networks of
``CNN_MODELS`` (``alexnet``, ``vgg16``, ``inception_v3`` -- with its auxiliary classifier,
torchvision's training-mode default -- ...; ImageNet shapes: 3x299x299 for Inception-v3,
3x224x224 for the others unless ``--image-shape`` is given). ``--mcmc-budget S`` also
runs :func:`distconv.planner.mcmc.mcmc` for S seconds from the fastest predicted
candidate of each case and records what it finds and the seconds it took.

Nothing here runs a network: every number is the planner's cost model. It is CPU-bound
(several seconds per case at 1024 ranks): run it under ``flock`` on a shared machine.
Prints a Markdown table (``--markdown`` also writes it to a file).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time


STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")
# the stages of the other families (by the first part of torchvision's module names)
FAMILY_STAGES = {
    "resnet": STAGES,
    "features": ("features", "classifier"),                      # AlexNet, VGG
    "inception": ("stem", "Mixed_5", "Mixed_6", "Mixed_7", "AuxLogits", "fc"),
}
DEFAULT_SHAPE = (3, 224, 224)
INCEPTION_SHAPE = (3, 299, 299)
# plan_model's name for the search with the gradient allreduce counted in full (the
# additive DP cost alone: what plan_model returned before commit 6bbccff)
ADDITIVE = "search (allreduce weight 1)"


def _ints(text):
    if text.strip().lower() in ("", "none"):
        return []
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def model_names() -> list:
    from distconv.models import CNN_MODELS, MODELS
    return sorted(MODELS) + sorted(CNN_MODELS)


def build_model(name, shape, classes):
    """The model of ``name`` for images of ``shape`` (C, H, W): a ResNet with train.py's
    stem choice, or an OptCNN/FlexFlow network at torchvision's widths (weights left
    uninitialised where the model allows it: the planner needs shapes only)."""
    from distconv import models
    if name in models.CNN_MODELS:
        kw = {} if name == "alexnet" else {"init_weights": False}
        return models.CNN_MODELS[name](classes, in_channels=shape[0], **kw)
    return models.MODELS[name](classes, in_channels=shape[0],
                               stem="cifar" if shape[2] <= 64 else "imagenet")


def default_shape(name) -> tuple:
    return INCEPTION_SHAPE if name == "inception_v3" else DEFAULT_SHAPE


def build_parser():
    p = argparse.ArgumentParser(
        prog="planner_study.py",
        description="Simulated paper-scale comparison of planner plans with pure data "
                    "parallelism (ResNet-50 / Wide-ResNet-50-2 on a V100/InfiniBand-class "
                    "machine file by default).",
        epilog="example: flock /tmp/bench.lock python scripts/planner_study.py --json "
               "benchmarks/results/planner_paper_scale.json --markdown /tmp/table.md",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="resnet50,wide_resnet50_2",
                   help=f"comma-separated models of {model_names()}")
    p.add_argument("--ranks", type=_ints, default=[16, 64, 256, 1024],
                   help="rank counts P")
    p.add_argument("--per-gpu", type=_ints, default=[1, 2, 4],
                   help="samples per GPU b (global batch N = b*P)")
    p.add_argument("--global-batch", type=_ints, default=[64, 256],
                   help="fixed global batches N run at every P (strong scaling; 'none': "
                        "no such cases)")
    p.add_argument("--extra", action="append", default=None, metavar="MODEL:P:N[:CxHxW]",
                   help="extra cases (repeatable), optionally with their own image shape. "
                        "Default: wide_resnet50_2 at 64 samples per GPU on 16 ranks (large "
                        "per-GPU batch), and on 64 ranks with 16 images of 3x3072x3072 and "
                        "32 of 3x2048x2048 (large images: data parallelism needs a whole "
                        "sample per GPU, 35 GB and 16 GB, against the 16 GB of a V100); "
                        "'none': no extra case")
    p.add_argument("--image-shape", default=None,
                   help="C,H,W (default 3,299,299 for inception_v3, else 3,224,224)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--machine", default="v100_ib", help="machine file or shipped name")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--mcmc-budget", type=float, default=0.0, metavar="S",
                   help="also run MCMC (FlexFlow's search) for S seconds from the fastest "
                        "predicted candidate of each case (0: no)")
    p.add_argument("--mcmc-seed", type=int, default=0)
    p.add_argument("--no-overlap", action="store_true",
                   help="gradient allreduces blocking after backward instead of overlapped "
                        "with it (plan_model(..., overlap=False); OptCNN's cost model adds "
                        "the parameter sync to the step)")
    p.add_argument("--source-commit", default=None, metavar="SHA",
                   help="the distconv commit these numbers come from, recorded in the JSON "
                        "(default: git rev-parse HEAD of the checkout this script is in, "
                        "and whether its distconv/planner has uncommitted changes)")
    p.add_argument("--json", required=True, metavar="FILE", help="results file to write")
    p.add_argument("--markdown", default=None, metavar="FILE",
                   help="also write the Markdown table here")
    return p


def family_of(model_name: str) -> str:
    if model_name.startswith(("alexnet", "vgg")):
        return "features"
    return "inception" if model_name.startswith("inception") else "resnet"


def stage_of(name: str, family: str = "resnet") -> str:
    head = name.split(".", 1)[0]
    if family == "inception":
        if head.startswith("Conv2d_"):
            return "stem"
        if head.startswith("Mixed_"):
            return head[:7]
        return head if head in FAMILY_STAGES[family] else "other"
    if family == "resnet" and head in ("conv1", "bn1"):
        return "stem"
    return head if head in FAMILY_STAGES[family] else "other"


def stage_usage(plan: dict, kinds: dict, family: str = "resnet") -> dict:
    """``{stage: {"s1 c2 f2": {"conv": n, "bn": m}, ...}}``."""
    out: dict = {}
    for name, (s, c, f) in plan.items():
        d = out.setdefault(stage_of(name, family), {}).setdefault(f"s{s} c{c} f{f}", {})
        d[kinds[name]] = d.get(kinds[name], 0) + 1
    return out


def dominant(usage: dict, stage: str) -> str:
    """The strategy most of a stage's conv layers use (``+k`` other strategies)."""
    st = usage.get(stage, {})
    if not st:
        return ""
    convs = {k: v.get("conv", 0) + v.get("linear", 0) for k, v in st.items()}
    if not any(convs.values()):
        convs = {k: sum(v.values()) for k, v in st.items()}
    best = max(convs, key=lambda k: (convs[k], k))
    others = sum(1 for k, v in convs.items() if v and k != best)
    return best.replace(" ", "") + (f"+{others}" if others else "")


def simulate_local_bn(cost, plan, overlap=True) -> float:
    """Step seconds of ``plan`` as :func:`distconv.planner.simulate.simulate` replays it,
    but with the batch-norm layers' own communication (the statistics allreduces over the
    sample group) left out: data parallelism with per-rank batch statistics, as most
    frameworks run it by default. distconv itself always reduces them (synchronised batch
    norm), so this is a lower bound used only to judge the data-parallel baseline."""
    from distconv.planner.simulate import walk
    rows = [(k, c) for _, k, c, _ in walk(cost, plan)]

    def comm(k, c, which):
        return 0.0 if k == "bn" else getattr(c, which)
    t = sum(c.compute_fwd + comm(k, c, "comm_fwd") for k, c in rows)
    stream = 0.0
    for k, c in reversed(rows):
        t += c.compute_bwd + comm(k, c, "comm_bwd")
        if c.sync > 0:
            if overlap:
                stream = max(stream, t) + c.sync
            else:
                t += c.sync
    t = max(t, stream)
    return t + sum(c.update for _, c in rows)


def run_case(model_name, n, p, shape, classes, machine, optimizer, mcmc_budget=0.0,
             mcmc_seed=0, overlap=True):
    from distconv.planner import auto
    from distconv.planner.costs import CostModel
    from distconv.planner.simulate import simulate

    model = build_model(model_name, shape, classes)
    family = family_of(model_name)
    t0 = time.perf_counter()
    res = auto.plan_model(model, (n,) + tuple(shape), p, machine, optimizer=optimizer,
                          overlap=overlap)
    wall = time.perf_counter() - t0
    pr, dp = res["predicted"], res["dp"]
    kinds = {layer.name: layer.kind for layer in res["graph"].layers()}
    usage = stage_usage(res["plan"], kinds, family)

    def block(d):
        return {"step_s": d["step_s"], "compute_s": d["compute_s"], "comm_s": d["comm_s"],
                "sync_s": d["sync_s"], "exposed_sync_s": d["exposed_sync_s"],
                "update_s": d["update_s"], "memory": d["memory"],
                "sync_bytes": int(sum(x["sync_bytes"] for x in d["layers"])),
                "comm_bytes": int(sum(x["bytes"] for x in d["layers"]))}

    rec = {"model": model_name, "global_batch": n, "ranks": p, "per_gpu": n / p,
           "input_shape": [n] + list(shape), "plan": block(pr), "dp": block(dp),
           "speedup_vs_dp": res["speedup_vs_dp"],
           "sync_time_ratio": dp["sync_s"] / pr["sync_s"] if pr["sync_s"] > 0 else None,
           "search_s": res["search_s"], "plan_model_s": wall,
           "memory_limit": res["memory_limit"],
           "fits": {"plan": res["memory_limit"] is None or pr["memory"] <= res["memory_limit"],
                    "dp": res["memory_limit"] is None or dp["memory"] <= res["memory_limit"]},
           "family": family, "stages": list(FAMILY_STAGES[family]),
           "stage_usage": usage,
           "dominant": {s: dominant(usage, s) for s in FAMILY_STAGES[family]},
           "plan_strategies": {k: list(v) for k, v in res["plan"].items()}}
    rec["sync_bytes_ratio"] = (rec["dp"]["sync_bytes"] / rec["plan"]["sync_bytes"]
                               if rec["plan"]["sync_bytes"] else None)
    cost = res["cost"]
    rec["dp_local_bn_step_s"] = simulate_local_bn(cost, auto.data_parallel(res["graph"], p),
                                                  overlap)
    rec["speedup_vs_dp_local_bn"] = rec["dp_local_bn_step_s"] / pr["step_s"]
    rec["chosen"] = res["chosen"]
    rec["fastest"] = res["fastest"]  # the fastest predicted candidate (min_gain 0)
    rec["fastest_speedup_vs_dp"] = dp["step_s"] / res["candidates"][res["fastest"]]
    rec["candidates_step_s"] = dict(res["candidates"])
    add = res["candidates"].get(ADDITIVE)
    rec["additive_only"] = None if add is None else {
        "step_s": add, "speedup_vs_dp": dp["step_s"] / add,
        "plan_speedup_over_it": add / pr["step_s"]}
    if p > n:  # data parallelism on only N ranks (the others idle): the better DP baseline
        cost_n = CostModel(res["graph"], n, machine, optimizer=optimizer)
        dpn = simulate(cost_n, auto.data_parallel(res["graph"], n), overlap=overlap)
        rec["dp_on_n_ranks"] = block(dpn)
        rec["speedup_vs_dp_on_n_ranks"] = dpn["step_s"] / pr["step_s"]
    if mcmc_budget and mcmc_budget > 0:
        from distconv.planner.mcmc import mcmc
        run = mcmc(cost, res["fastest_plan"], float(mcmc_budget), seed=mcmc_seed,
                   memory_limit=res["memory_limit"], overlap=overlap)
        rec["mcmc"] = {k: run[k] for k in ("start_step_s", "step_s", "gain", "proposals",
                                           "accepted", "improved", "seconds", "seed")}
        rec["mcmc"]["start"] = res["fastest"]
        rec["mcmc"]["speedup_vs_dp"] = dp["step_s"] / run["step_s"]
        rec["mcmc"]["search_plus_mcmc_s"] = res["search_s"] + run["seconds"]
    return rec


def source_info(commit=None) -> dict:
    """Which distconv the numbers come from: its path, commit and dirty flag."""
    import subprocess

    import distconv
    root = os.path.dirname(os.path.dirname(os.path.abspath(distconv.__file__)))
    info = {"distconv_path": root, "commit": commit, "planner_dirty": None}
    if commit is None:
        def git(*a):
            return subprocess.run(["git", "-C", root, *a], capture_output=True, text=True,
                                  timeout=30)
        try:
            r = git("rev-parse", "HEAD")
            if r.returncode == 0:
                info["commit"] = r.stdout.strip()
                d = git("status", "--porcelain", "--", "distconv")
                info["planner_dirty"] = bool(d.stdout.strip()) if d.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            pass
        marker = os.path.join(root, "COMMIT")  # a `git archive` copy with the id beside it
        if info["commit"] is None and os.path.exists(marker):
            with open(marker) as fh:
                info["commit"] = fh.read().strip()
            info["planner_dirty"] = False
    return info


def _name(r) -> str:
    shp = r["input_shape"][1:]
    return r["model"] + ("" if tuple(shp) == default_shape(r["model"])
                         else f" @{shp[1]}x{shp[2]}")


def _table(head, rows) -> list:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def markdown(records) -> str:
    """Three Markdown tables: step times and speedups (with the candidate plan_model chose
    and the weight-1 search alone), communication and memory, and the strategies per
    stage."""
    t1, t2, t3 = [], [], []
    for r in records:
        pl, dp = r["plan"], r["dp"]
        base = [_name(r), str(r["ranks"]), str(r["global_batch"]), f"{r['per_gpu']:g}"]
        dpn = r.get("speedup_vs_dp_on_n_ranks")
        t1.append(base + [
            f"{pl['step_s'] * 1e3:.2f}",
            f"{dp['step_s'] * 1e3:.2f}" + ("" if r["fits"]["dp"] else " (does not fit)"),
            f"**{r['speedup_vs_dp']:.2f}x**", "" if dpn is None else f"{dpn:.2f}x",
            f"{r['speedup_vs_dp_local_bn']:.2f}x",
            _chosen(r["chosen"]) + (" (= DP)" if r["chosen"] != "data parallel"
                                    and _is_dp(r) else ""), _additive(r), _fastest(r),
            f"{r['search_s']:.1f}", f"{r['plan_model_s']:.1f}"])
        t2.append(base + [
            f"{pl['compute_s'] * 1e3:.1f} / {dp['compute_s'] * 1e3:.1f}",
            f"{pl['comm_s'] * 1e3:.1f} / {dp['comm_s'] * 1e3:.1f}",
            f"{pl['sync_s'] * 1e3:.1f} / {dp['sync_s'] * 1e3:.1f}",
            f"{_ratio(r['sync_time_ratio'])}", f"{_ratio(r['sync_bytes_ratio'])}",
            f"{pl['exposed_sync_s'] * 1e3:.2f} / {dp['exposed_sync_s'] * 1e3:.2f}",
            f"{pl['memory'] / 1e9:.2f} / {dp['memory'] / 1e9:.2f}"])
        t3.append((tuple(r.get("stages", STAGES)),
                   base + [r["dominant"].get(s, "") for s in r.get("stages", STAGES)]))
    out = ["Step time (predicted, ms) and speedup of the plan over pure data parallelism "
           "(DP, every layer (P,1,1), synchronised batch norm); DP-on-N: over DP on only N "
           "of the ranks (P > N); local-BN: over DP without the batch-norm statistics "
           "allreduces. chosen: the candidate plan_model returned (w1, w1/2, w0: its search with "
           "the gradient allreduce counted at that weight; DP: pure data parallelism). "
           "additive only: speedup over DP of the weight-1 search's plan alone (what "
           "plan_model returned before commit 6bbccff; = when it is the chosen plan; (= DP): "
           "the chosen search plan is pure data parallelism, which ties DP; U sXcYfZ: the "
           "uniform plan (sample=X, channel=Y, filter=Z for every layer), returned because "
           "no mixed plan was predicted more than min_gain = 5% faster). fastest: speedup "
           "over DP of the fastest predicted candidate (plan_model with min_gain=0; = when "
           "it is the chosen plan). "
           "search s: the three searches; plan_model s: the whole call (trace, cost model, "
           "searches, simulations).", ""]
    out += _table(["model", "P", "N", "N/P", "plan ms", "DP ms", "speedup", "vs DP-on-N",
                   "vs local-BN DP", "chosen", "additive only", "fastest", "search s",
                   "plan_model s"], t1)
    out += ["", "Where the time goes, plan / DP (ms per step; sync = gradient allreduce, "
            "exposed = the part not hidden behind backward), allreduce time and bytes "
            "ratios DP / plan, memory per rank (GB, limit 16 GB).", ""]
    out += _table(["model", "P", "N", "N/P", "compute", "blocking comm", "allreduce",
                   "allreduce time ratio", "allreduce bytes ratio", "exposed allreduce",
                   "memory GB"], t2)
    out += ["", "Strategy of most conv layers per stage (sSAMPLE cCHANNEL fFILTER; +k: k "
            "other strategies in the stage, e.g. for a downsample conv or the bn layers).",
            ""]
    for stages in dict.fromkeys(st for st, _ in t3):  # one table per model family
        out += _table(["model", "P", "N", "N/P"] + list(stages),
                      [row for st, row in t3 if st == stages]) + [""]
    mc = [r for r in records if r.get("mcmc")]
    if mc:
        out += ["Search seconds: the DP (plan_model's three searches, which also build the "
                "cost tables) and MCMC from the fastest candidate for the given budget; "
                "speedups over DP of the fastest DP candidate and of MCMC's best plan.", ""]
        out += _table(["model", "P", "N", "DP search s", "MCMC s", "DP + MCMC s",
                       "proposals", "fastest DP cand.", "MCMC", "MCMC gain"],
                      [[_name(r), str(r["ranks"]), str(r["global_batch"]),
                        f"{r['search_s']:.2f}", f"{r['mcmc']['seconds']:.2f}",
                        f"{r['mcmc']['search_plus_mcmc_s']:.2f}", str(r["mcmc"]["proposals"]),
                        f"{r['fastest_speedup_vs_dp']:.3f}x",
                        f"{r['mcmc']['speedup_vs_dp']:.3f}x",
                        f"{100 * (r['mcmc']['gain'] - 1):.2f}%"] for r in mc])
    return "\n".join(out)


def _chosen(name: str) -> str:
    if name == "data parallel":
        return "DP"
    if name.startswith("uniform "):  # "uniform sample=s,channel=c,filter=f" -> "U s.c.f."
        v = [kv.split("=")[1] for kv in name.split(" ", 1)[1].split(",")]
        return f"U s{v[0]}c{v[1]}f{v[2]}"
    w = name.rsplit(" ", 1)[-1].rstrip(")")
    return {"1": "w1", "0.5": "w1/2", "0": "w0"}.get(w, name)


def _is_dp(r) -> bool:
    """Whether the recorded plan is pure data parallelism (every layer (P, 1, 1))."""
    return all(tuple(v) == (r["ranks"], 1, 1) for v in r["plan_strategies"].values())


def _additive(r) -> str:
    a = r.get("additive_only")
    if a is None:
        return "n/a"
    return "=" if r["chosen"] == ADDITIVE else f"{a['speedup_vs_dp']:.2f}x"


def _fastest(r) -> str:
    f = r.get("fastest")
    if f is None:
        return "n/a"
    return "=" if f == r["chosen"] else f"{r['fastest_speedup_vs_dp']:.2f}x"


def _ratio(x):
    return "n/a" if x is None else f"{x:.1f}x"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from distconv.planner.machine import Machine, available, builtin

    known = model_names()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in names if m not in known]
    if bad:
        print(f"planner_study.py: error: --models: unknown {bad}; expected names of "
              f"{known}", file=sys.stderr)
        return 2
    shape = None
    if args.image_shape is not None:
        try:
            shape = tuple(int(v) for v in args.image_shape.split(","))
            assert len(shape) == 3 and min(shape) >= 1
        except (ValueError, AssertionError):
            print(f"planner_study.py: error: --image-shape: expected C,H,W (three integers "
                  f">= 1), got {args.image_shape!r}", file=sys.stderr)
            return 2
    path = args.machine if os.path.exists(args.machine) or args.machine not in available() \
        else builtin(args.machine)
    try:
        machine = Machine.load(path)
    except (OSError, ValueError) as e:
        print(f"planner_study.py: error: --machine: {e}", file=sys.stderr)
        return 1
    cases = []
    for m in names:
        for p in args.ranks:
            batches = sorted({b * p for b in args.per_gpu} | set(args.global_batch))
            cases += [(m, n, p) for n in batches]
    cases = [(m, n, p, shape or default_shape(m)) for m, n, p in cases]
    extra = args.extra if args.extra is not None else [
        "wide_resnet50_2:16:1024", "wide_resnet50_2:64:16:3x3072x3072",
        "wide_resnet50_2:64:32:3x2048x2048"]
    for e in extra:
        if e.strip().lower() in ("", "none"):  # --extra none: no extra case
            continue
        try:
            parts = e.split(":")
            assert len(parts) in (3, 4) and parts[0] in known
            shp = (tuple(int(v) for v in parts[3].split("x")) if len(parts) == 4
                   else shape or default_shape(parts[0]))
            assert len(shp) == 3 and min(shp) >= 1
            cases.append((parts[0], int(parts[2]), int(parts[1]), shp))
        except (ValueError, AssertionError):
            print(f"planner_study.py: error: --extra: expected MODEL:P:N[:CxHxW] with MODEL "
                  f"in {known}, got {e!r}", file=sys.stderr)
            return 2
    records = []
    t_all = time.perf_counter()
    for i, (m, n, p, shp) in enumerate(cases):
        rec = run_case(m, n, p, shp, args.num_classes, machine, args.optimizer,
                       args.mcmc_budget, args.mcmc_seed, not args.no_overlap)
        records.append(rec)
        print(f"[{i + 1}/{len(cases)}] {m} {'x'.join(map(str, shp))} P={p} N={n}: plan "
              f"{rec['plan']['step_s'] * 1e3:.2f} ms, DP {rec['dp']['step_s'] * 1e3:.2f} ms, "
              f"speedup {rec['speedup_vs_dp']:.2f}x, sync {_ratio(rec['sync_time_ratio'])} less, "
              f"chosen {rec['chosen']}, search {rec['search_s']:.1f} s, plan_model "
              f"{rec['plan_model_s']:.1f} s"
              + (f", MCMC {rec['mcmc']['seconds']:.1f} s {rec['mcmc']['proposals']} "
                 f"proposals gain {100 * (rec['mcmc']['gain'] - 1):.2f}%"
                 if rec.get("mcmc") else ""), flush=True)
    doc = {
        "what": "simulated (cost model only, nothing run on GPUs): planner plan vs pure "
                "data parallelism",
        "machine": machine.to_dict(), "machine_file": os.path.abspath(path),
        "optimizer": args.optimizer, "overlap": not args.no_overlap, "dtype": "float32",
        "mcmc_budget_s": args.mcmc_budget, "mcmc_seed": args.mcmc_seed,
        "source": source_info(args.source_commit),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "python": platform.python_version(),
                 "cpus": os.cpu_count()},
        "total_s": time.perf_counter() - t_all,
        "records": records,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, args.json)
    table = markdown(records)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")
    print(f"wrote {args.json} ({len(records)} cases, {doc['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
