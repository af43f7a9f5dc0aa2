"""The Markdown tables of ``scripts/planner_study.py`` (records of :func:`distconv.bench.
study.run_case`)."""
from __future__ import annotations

from .models import default_shape
from .study import ADDITIVE, STAGES


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
            f"{fmt_ratio(r['sync_time_ratio'])}", f"{fmt_ratio(r['sync_bytes_ratio'])}",
            f"{pl['exposed_sync_s'] * 1e3:.2f} / {dp['exposed_sync_s'] * 1e3:.2f}",
            f"{pl['memory'] / 1e9:.2f} / {dp['memory'] / 1e9:.2f}"])
        t3.append((tuple(r.get("stages", STAGES)),
                   base + [r["dominant"].get(s, "") for s in r.get("stages", STAGES)]))
    out = ["Step time (predicted, ms) and speedup of the plan over pure data parallelism "
           "(DP, every layer (P,1,1), synchronised batch norm); DP-on-N: over DP on only N "
           "of the ranks (P > N); local-BN: over DP without the batch-norm statistics "
           "allreduces. chosen: the candidate plan_model returned (w1, w1/2, w0: its search with "
           "the gradient allreduce counted at that weight; DP: pure data parallelism). "
           "additive only: speedup over DP of the weight-1 search's plan alone (the "
           "additive optimum, before the candidates are simulated; = when it is the chosen "
           "plan; (= DP): "
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
    out += _placement_table(records)
    return "\n".join(out)


def _chosen(name: str) -> str:
    if name == "data parallel":
        return "DP"
    if name.startswith("uniform "):  # "uniform sample=s,channel=c,filter=f" -> "U s.c.f."
        v = [kv.split("=")[1] for kv in name.split(" ", 1)[1].split(",")]
        return f"U s{v[0]}c{v[1]}f{v[2]}"
    placed = name.endswith(", placement)")  # a search with operator placement: "+P"
    if placed:
        name = name[:-len(", placement)")] + ")"
    w = name.rsplit(" ", 1)[-1].rstrip(")")
    return {"1": "w1", "0.5": "w1/2", "0": "w0"}.get(w, name) + ("+P" if placed else "")


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


def fmt_ratio(x):
    return "n/a" if x is None else f"{x:.1f}x"


def _placement_table(records) -> list:
    """Markdown lines: what operator placement gains per case (``--placement``)."""
    out = []
    pl = [r for r in records if r.get("placement")]
    if pl:
        out += ["", "Operator placement (plan_model(placement=True): a cat's branches on "
                "disjoint contiguous halves and quarters of the ranks, running at the same "
                "time) against the plan without it: returned plans (step ms, gain), the "
                "fastest predicted candidates' gain, the blocks placed, search seconds "
                "(the three searches) without / with placement.", ""]
        out += _table(["model", "P", "N", "plan ms", "placed plan ms", "gain",
                       "fastest gain", "placed blocks", "search s"],
                      [[_name(r), str(r["ranks"]), str(r["global_batch"]),
                        f"{r['plan']['step_s'] * 1e3:.2f}",
                        f"{r['placement']['step_s'] * 1e3:.2f}",
                        f"**{r['placement']['gain_over_unplaced']:.3f}x**",
                        f"{r['placement']['fastest_gain_over_unplaced']:.3f}x",
                        ", ".join(b.replace(".(placed)", "")
                                  for b in r["placement"]["placed_blocks"]) or "none",
                        f"{r['search_s']:.1f} / {r['placement']['search_s']:.1f}"]
                       for r in pl])
    return out
