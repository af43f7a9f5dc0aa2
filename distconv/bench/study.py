"""The cases of ``scripts/planner_study.py``: one planner run per (model, P, N), simulated.

:func:`run_case` plans one case with :func:`distconv.planner.auto.plan_model` and
records the plan's predicted step next to pure data parallelism's (and, when P > N, data
parallelism on N ranks; with local batch norm; MCMC from the fastest candidate), with
which strategies each stage of the model uses. Nothing here runs a network.
"""
from __future__ import annotations

import os
import time

from ..optim import BUCKET_BYTES
from .models import build_model

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")
# the stages of the other families (by the first part of torchvision's module names)
FAMILY_STAGES = {
    "resnet": STAGES,
    "features": ("features", "classifier"),                      # AlexNet, VGG
    "inception": ("stem", "Mixed_5", "Mixed_6", "Mixed_7", "AuxLogits", "fc"),
}
# plan_model's name for the search with the gradient allreduce counted in full (the
# additive DP cost alone)
ADDITIVE = "search (allreduce weight 1)"


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
    from distconv.planner.simulate import simulate
    return simulate(cost, plan, overlap=overlap, local_bn=True)["step_s"]


def run_case(model_name, n, p, shape, classes, machine, optimizer, mcmc_budget=0.0,
             mcmc_seed=0, overlap=True, placement=False, bucket_bytes=BUCKET_BYTES):
    from distconv.planner import auto
    from distconv.planner.costs import CostModel
    from distconv.planner.simulate import simulate

    model = build_model(model_name, shape, classes)
    family = family_of(model_name)
    t0 = time.perf_counter()
    res = auto.plan_model(model, (n,) + tuple(shape), p, machine, optimizer=optimizer,
                          overlap=overlap, bucket_bytes=bucket_bytes)
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
        cost_n = CostModel(res["graph"], n, machine, optimizer=optimizer,
                           bucket_bytes=bucket_bytes)
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
    if placement:
        rec["placement"] = placement_record(model_name, n, p, shape, classes, machine,
                                            optimizer, overlap, res)
    return rec


def placement_record(model_name, n, p, shape, classes, machine, optimizer, overlap,
                     plain) -> dict:
    """``plan_model(placement=True)`` of the case against ``plain``, its result without
    placement: the returned and the fastest predicted plans of each, the blocks whose
    branches run on disjoint rank sets, and the search time."""
    from distconv.planner import auto
    from distconv.planner.strategies import Placed, strategy_text
    model = build_model(model_name, shape, classes)
    t0 = time.perf_counter()
    res = auto.plan_model(model, (n,) + tuple(shape), p, machine, optimizer=optimizer,
                          overlap=overlap, placement=True,
                          bucket_bytes=plain["cost"].bucket_bytes)
    wall = time.perf_counter() - t0
    step, base = res["predicted"]["step_s"], plain["predicted"]["step_s"]
    fast = res["candidates"][res["fastest"]]
    fast0 = plain["candidates"][plain["fastest"]]
    return {"step_s": step, "speedup_vs_dp": res["speedup_vs_dp"], "chosen": res["chosen"],
            "gain_over_unplaced": base / step,
            "fastest_step_s": fast, "fastest_gain_over_unplaced": fast0 / fast,
            "placed_blocks": [x["name"] for x in res["predicted"]["layers"]
                              if x["kind"] == "placed"],
            "placed_layers": sum(isinstance(st, Placed) for st in res["plan"].values()),
            "search_s": res["search_s"], "plan_model_s": wall,
            "plan_strategies": {k: (strategy_text(v) if isinstance(v, Placed)
                                    else list(v)) for k, v in res["plan"].items()}}


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
