"""One call from a model to a searched plan, and the table ``scripts/plan.py`` prints.

:func:`plan_model` traces the model, builds a :class:`.costs.CostModel` for the ranks
and machine, runs the DP search (:func:`.search.search`) under the memory limit,
and simulates the searched plans, pure data parallelism (every layer ``(p, 1, 1)``) and
the other uniform plans with overlapped gradient allreduces
(:func:`.simulate.simulate`); a mixed plan must beat every uniform plan by
:data:`MIN_GAIN` to be returned.
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager

from ..optim import BUCKET_BYTES
from .costs import CostModel
from .strategies import strategy_short, strategy_text
from .graph import trace
from .search import search
from .simulate import simulate


def default_cache_path() -> str:
    """Where measured kernel times are cached: ``$DISTCONV_CACHE_DIR/compute_profile.json``
    (default ``~/.cache/distconv``)."""
    d = os.environ.get("DISTCONV_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "distconv")
    return os.path.join(d, "compute_profile.json")


# The DP minimises an additive cost, but an overlapped allreduce costs only what backward
# does not hide: search with the allreduce counted in full, half and not at all, and keep
# whichever plan (or pure data parallelism) the simulator finds fastest.
SYNC_WEIGHTS = (1.0, 0.5, 0.0)

#: A mixed plan (strategies differ between layers) is returned only if it is predicted
#: faster than every uniform plan (one strategy for all layers, data parallelism
#: included) by more than this fraction. On the dev VM the predicted difference between
#: two plans a few % apart was off by up to ~5% (paired measurements in
#: benchmarks/results/planner_validation.md), so a smaller predicted gain is not one the
#: model resolves, and the uniform plan is the one users can reason about.
MIN_GAIN = 0.05


def data_parallel(graph, p: int) -> dict:
    """The pure data-parallel plan: every strategic layer ``(p, 1, 1)``."""
    return {n: (p, 1, 1) for n in graph.strategic_names()}


#: ``rounds`` of the ComputeModels that ``train.py``, ``scaling.py`` and ``plan.py``
#: measure with (see :meth:`.compute.ComputeModel.refine`)
MEASURE_ROUNDS = 3


@contextmanager
def gc_paused():
    """Python's cyclic garbage collector paused inside the block and left as it was found
    after it (also on an exception). A search allocates millions of short-lived objects
    (cache keys, event lists), and the full collections their count triggers each walk
    every object the cost model's caches hold: about a tenth of ResNet-50's search at
    1024 ranks. A search leaves little cyclic garbage (the autograd graphs of its
    shape-only layer runs; peak memory unchanged), which the collector frees once it
    runs again."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@gc_paused()
def plan_model(model, in_shape, nranks, machine=None, compute=None, memory_limit=None,
               item=4, optimizer="sgd", overlap=True, min_gain=MIN_GAIN, mcmc_budget=0.0,
               mcmc_seed=0, spatial=False, placement=False,
               bucket_bytes=BUCKET_BYTES) -> dict:
    """Search the best per-layer plan of ``model`` for a global input ``in_shape``
    ``(N, C, H, W)`` on ``nranks`` ranks.

    ``machine``: :class:`.machine.Machine` (default: free communication);
    ``compute``: :class:`.compute.ComputeModel` (default: fitted, nothing measured);
    ``memory_limit``: bytes per rank (default: the machine's ``memory_per_rank``);
    ``spatial``: also consider splits of H and W (``(s, 1, 1, h, w)``, see
    :func:`.costs.factorizations`);
    ``placement``: the search may also run the branches of a fork joined by ``dc.cat`` at
    the same time on disjoint contiguous halves and quarters of the ranks
    (:func:`.placement.placed_block`; the model must fork them with :func:`distconv.fork`).
    A measuring ``compute`` with ``rounds > 1`` is refined (:meth:`.compute.ComputeModel.
    refine`) after a first search has measured every kernel shape.
    ``bucket_bytes``: the step's gradient buckets (:class:`.costs.CostModel`; default
    GradientSync's, ``None``: one allreduce per parameter, as ``sync_gradients``).

    The DP (:func:`.search.search`) runs with the gradient allreduce counted at each
    weight of :data:`SYNC_WEIGHTS` (the simulator overlaps it with backward, which an
    additive cost cannot express). Those plans, pure data parallelism and every other
    uniform plan (one factorization ``(s, c, f)`` for all layers) are simulated
    (:func:`.simulate.simulate`; those over the memory limit dropped); the fastest uniform
    plan is returned unless the fastest plan of all is predicted faster by more than
    ``min_gain`` (default :data:`MIN_GAIN`; 0 returns the fastest predicted; data
    parallelism wins ties). ``memory_limit=float("inf")`` means no limit even where the
    machine has one.

    ``mcmc_budget`` > 0: seconds of MCMC refinement (:func:`.mcmc.mcmc`, FlexFlow's
    search, seed ``mcmc_seed``) started from the fastest candidate; the plan it finds
    joins the candidates as ``"mcmc"`` (returned if it is the fastest of all and, when
    a uniform plan is within ``min_gain`` of it, only if it beats that by more), and
    ``"mcmc"`` in the result holds the run: ``{"start": the start candidate's name,
    "start_step_s", "step_s", "gain", "proposals", "accepted", "improved", "seconds",
    "beta", "seed", "plan", "returned": whether the result is its plan}``.

    Returns ``{"plan": {name: (s, c, f)}, "predicted": simulate(plan), "dp":
    simulate(data parallel), "chosen": which candidate won ("data parallel", "search
    (allreduce weight w)" or "uniform sample=s,channel=c,filter=f"), "candidates":
    {candidate: predicted step seconds} (data parallelism, the searches and the fastest
    other uniform plan), "fastest" and "fastest_plan": the fastest candidate's name and
    plan (the result with ``min_gain=0``), "min_gain",
    "speedup_vs_dp": dp step / plan step, "search_s": seconds of all searches,
    "memory_limit", "cost": the CostModel, "graph": the traced Graph, "mcmc": the MCMC
    run or None}``. Python's cyclic garbage collector is paused while it plans
    (:func:`gc_paused`).
    """
    graph = trace(model, tuple(int(s) for s in in_shape))

    def cost_model():
        return CostModel(graph, nranks, machine, compute, item=item, optimizer=optimizer,
                         spatial=spatial, bucket_bytes=bucket_bytes)
    cost = cost_model()
    memory_limit = _limit(memory_limit, cost.machine)
    dp_plan = data_parallel(graph, cost.p)
    if compute is not None and compute.measure and getattr(compute, "rounds", 1) > 1:
        # one search measures every kernel shape a plan can use; time them all again in
        # sweeps (ComputeModel.refine) and plan from a cost model built on the result
        search(cost, memory_limit, placement=placement)
        simulate(cost, dp_plan, overlap=overlap)
        cost = cost_model() if compute.refine() else cost
    dp = simulate(cost, dp_plan, overlap=overlap)
    sims, uniform, seconds = _candidates(cost, graph, dp, dp_plan, memory_limit, overlap,
                                         placement)
    best = min(sims + uniform, key=_step)
    run, best = (_refine(cost, best, sims, mcmc_budget, mcmc_seed, memory_limit, overlap,
                         placement) if mcmc_budget and mcmc_budget > 0 else (None, best))
    name, plan, pred = _pick(best, uniform, min_gain)
    others = [x for x in uniform if x[0] != "data parallel"]
    shown = list(sims) + ([min(others, key=_step)] if others else [])
    if run is not None:
        run["returned"] = name == "mcmc"
    return {"plan": plan, "predicted": pred, "dp": dp, "chosen": name, "mcmc": run,
            "candidates": {n: sm["step_s"] for n, _, sm in shown},
            "fastest": best[0], "fastest_plan": best[1], "min_gain": float(min_gain),
            "speedup_vs_dp": dp["step_s"] / pred["step_s"] if pred["step_s"] > 0 else 1.0,
            "search_s": seconds, "memory_limit": memory_limit,
            "cost": cost, "graph": graph}


def _pick(best, uniform, min_gain):
    """The fastest uniform candidate if within ``min_gain`` of ``best``, else ``best``."""
    if uniform:
        u = min(uniform, key=_step)
        if _step(u) <= _step(best) * (1.0 + max(0.0, float(min_gain))):
            return u
    return best


def _refine(cost, best, sims, budget, seed, memory_limit, overlap, placement=False):
    """MCMC from candidate ``best``: ``(the run, the new best candidate)``; a better plan
    joins ``sims`` as ``"mcmc"``. With ``placement`` the layers of forked branches may
    also move to the halves and quarters of the ranks (:func:`.placement.
    placement_choices`), and whole forks to the DP's partitions (:func:`.placement.
    placement_moves`)."""
    from .mcmc import mcmc
    from .placement import placement_choices, placement_moves
    run = mcmc(cost, best[1], float(budget), seed=seed, memory_limit=memory_limit,
               overlap=overlap, choices=placement_choices(cost) if placement else None,
               group_moves=placement_moves(cost) if placement else None)
    run["start"] = best[0]
    if run["step_s"] < _step(best):
        best = ("mcmc", run["plan"], simulate(cost, run["plan"], overlap=overlap))
        sims.append(best)
    return run, best


def _limit(memory_limit, machine):
    """Bytes per rank the plan must fit: the machine's when None, no limit for ``inf``."""
    if memory_limit is None:
        return getattr(machine, "memory_per_rank", None)
    return None if memory_limit == float("inf") else memory_limit


def _step(candidate) -> float:
    return candidate[2]["step_s"]


def _candidates(cost, graph, dp, dp_plan, memory_limit, overlap, placement=False):
    """``(searched, uniform, search seconds)``: ``[(name, plan, simulate(plan))]`` of the
    DP's plans (data parallelism first: a tie keeps the plainer plan) and of every
    uniform plan within the memory limit (data parallelism among them)."""
    cands, seconds = [], 0.0
    if memory_limit is None or dp["memory"] <= memory_limit:
        cands.append(("data parallel", dp_plan))
    for w in (SYNC_WEIGHTS if overlap else (1.0,)):
        # with placement the plans without it stay candidates: the search minimises an
        # additive cost, and a placed plan that wins there may lose in the simulator
        for placed in ((False, True) if placement else (False,)):
            res = search(cost, memory_limit, sync_weight=w, placement=placed)
            seconds += res["seconds"]
            cands.append((f"search (allreduce weight {w:g}{', placement' if placed else ''})",
                          res["plan"]))
    sims = [(n, q, simulate(cost, q, overlap=overlap)) for n, q in cands]
    uniform = [sm for sm in sims if sm[0] == "data parallel"]
    for st in cost.strategies:  # cheap: every layer's costs are cached by the searches
        if st == (cost.p, 1, 1):
            continue
        q = {n: st for n in graph.strategic_names()}
        sm = simulate(cost, q, overlap=overlap)
        if memory_limit is None or sm["memory"] <= memory_limit:
            uniform.append((f"uniform {strategy_text(st)}", q, sm))
    return sims, uniform, seconds


def predicted_summary(result: dict) -> dict:
    """The JSON-able ``"predicted"`` block of a plan file."""
    pr, dp = result["predicted"], result["dp"]
    keys = ("step_s", "compute_s", "comm_s", "sync_s", "exposed_sync_s", "update_s", "memory")
    out = {k: pr[k] for k in keys}
    out.update({"dp_" + k: dp[k] for k in keys})
    out["speedup_vs_dp"] = result["speedup_vs_dp"]
    out["search_s"] = result["search_s"]
    out["chosen"] = result.get("chosen")
    out["fastest"] = result.get("fastest")
    out["min_gain"] = result.get("min_gain")
    out["candidates"] = result.get("candidates")
    out["memory_limit"] = result["memory_limit"]
    run = result.get("mcmc")
    if run is not None:
        out["mcmc"] = {k: run.get(k) for k in MCMC_KEYS}
    return out


#: the fields of an MCMC run (:func:`.mcmc.mcmc`) kept in a plan file
MCMC_KEYS = ("start", "start_step_s", "step_s", "gain", "returned", "proposals", "accepted",
             "improved", "rejected_memory", "restarts", "best_at", "seconds", "beta", "seed")


def mcmc_text(run) -> str:
    """One line: what MCMC found against the plan it started from."""
    head = (f"MCMC ({run['seconds']:.2f} s, {run['proposals']} proposals, "
            f"{run['accepted']} accepted, seed {run['seed']}) from {run['start']} "
            f"({run['start_step_s'] * 1e3:.3f} ms): ")
    if run["step_s"] < run["start_step_s"]:
        return head + (f"found {run['step_s'] * 1e3:.3f} ms, "
                       f"{100 * (1 - run['step_s'] / run['start_step_s']):.2f}% faster; "
                       + ("returned" if run.get("returned") else
                          "not returned (a uniform plan is within min_gain of it)"))
    return head + "found nothing faster"


def _shape(s):
    return "x".join(str(int(v)) for v in s)


def format_table(result: dict) -> str:
    """Per-layer table of a plan: layer, kind, input -> output shape, strategy, predicted
    compute / communication / gradient-allreduce milliseconds and memory MiB per rank,
    then the totals and the data-parallel comparison."""
    graph = result["graph"]
    shapes = {layer.name: (layer.in_shape, layer.out_shape) for layer in graph.layers()}
    pr, dp = result["predicted"], result["dp"]
    rows = []
    for r in pr["layers"]:
        ins, outs = shapes.get(r["name"], ((), ()))
        st = "" if r["strategy"] is None else strategy_short(r["strategy"])
        rows.append((r["name"] or "(model)", r["kind"],
                     f"{_shape(ins)} -> {_shape(outs)}" if ins else "", st,
                     f"{r['compute_s'] * 1e3:.3f}", f"{r['comm_s'] * 1e3:.3f}",
                     f"{r['sync_s'] * 1e3:.3f}", f"{r['memory'] / 2**20:.1f}"))
    head = ("layer", "kind", "shape (global)", "strategy", "compute ms", "comm ms", "sync ms",
            "mem MiB")
    w = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(head))]
    lines.append("  ".join("-" * x for x in w))
    for r in rows:
        lines.append("  ".join(v.ljust(w[i]) if i < 4 else v.rjust(w[i])
                               for i, v in enumerate(r)))

    def tot(d, label):
        return (f"{label}: step {d['step_s'] * 1e3:.3f} ms = compute {d['compute_s'] * 1e3:.3f}"
                f" + comm {d['comm_s'] * 1e3:.3f} + exposed allreduce "
                f"{d['exposed_sync_s'] * 1e3:.3f} (of {d['sync_s'] * 1e3:.3f}) + update "
                f"{d['update_s'] * 1e3:.3f}; memory {d['memory'] / 2**20:.1f} MiB per rank")
    lines.append("")
    lines.append(tot(pr, "plan         "))
    lines.append(tot(dp, "data parallel"))
    sync = (f"allreduce time {dp['sync_s'] / pr['sync_s']:.2f}x less" if pr["sync_s"] > 0
            else "no gradient allreduce" if dp["sync_s"] > 0 else "no gradient allreduce in either")
    lines.append(f"predicted speedup over pure data parallelism: {result['speedup_vs_dp']:.2f}x"
                 f"; {sync}; search {result['search_s']:.2f} s")
    ch, fa, cands = result.get("chosen"), result.get("fastest"), result.get("candidates") or {}
    if ch and fa and ch != fa and ch in cands and fa in cands:
        lines.append(f"chosen: {ch}; the fastest predicted ({fa}) is only "
                     f"{100 * (cands[ch] / cands[fa] - 1):.1f}% faster, within min_gain "
                     f"{100 * result.get('min_gain', 0):.0f}% (what the model resolves)")
    elif ch:
        lines.append(f"chosen: {ch}")
    if result.get("mcmc") is not None:
        lines.append(mcmc_text(result["mcmc"]))
    return "\n".join(lines)
