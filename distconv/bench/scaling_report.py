"""The driver side of ``scripts/scaling.py``: merging a point's repetitions, speedups,
byte warnings, the CSV files and the plots (no MPI)."""
from __future__ import annotations

import csv
import os
import sys

COLUMNS = ["ranks", "strategy", "grid", "mode", "model", "overlap", "global_batch", "channels",
           "size", "steps", "reps", "step_s", "step_iqr_s", "predicted_step_s", "images_per_s",
           "compute_s", "comm_s", "exposed_comm_s", "bytes_sent_per_rank",
           "model_bytes_sent_per_rank", "grad_bytes_per_rank", "model_grad_bytes_per_rank",
           "dp_grad_bytes_per_rank", "grad_bytes_ratio_vs_dp", "bytes_match", "peak_rss_mb",
           "speedup", "efficiency"]


def add_speedups(rows):
    base = [r for r in rows if r["ranks"] == 1]
    if not base:
        pmin = min(r["ranks"] for r in rows)
        base = [r for r in rows if r["ranks"] == pmin]
    b = max(base, key=lambda r: r["images_per_s"])
    for r in rows:
        sp = r["images_per_s"] / b["images_per_s"] * b["ranks"]
        r["speedup"] = sp
        r["efficiency"] = sp / r["ranks"]


def bytes_warnings(rows) -> list:
    """One ``WARNING`` line per point whose measured bytes differ from the analytic model."""
    out = []
    for r in rows:
        if not r.get("bytes_match", False):
            detail = "; ".join(f"rank {k}: {' | '.join(v)}"
                               for k, v in (r.get("bytes_mismatch") or {}).items())
            out.append(f"WARNING: {r['ranks']} rank(s), {r['strategy']}: measured bytes per "
                       f"rank ({r.get('bytes_sent_per_rank')}) differ from the analytic "
                       f"model ({r.get('model_bytes_sent_per_rank')}): {detail}")
    return out


def plot(rows, out, mode):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    by = {}
    for r in rows:
        by.setdefault(r["strategy"], []).append(r)
    for key, ylabel in (("speedup", "speedup"), ("efficiency", "parallel efficiency")):
        fig, ax = plt.subplots(figsize=(5, 4))
        for st, rs in by.items():
            rs = sorted(rs, key=lambda r: r["ranks"])
            ax.plot([r["ranks"] for r in rs], [r[key] for r in rs], "o-", label=st)
        ps = sorted({r["ranks"] for r in rows})
        if key == "speedup":
            ax.plot(ps, ps, "k--", lw=0.8, label="ideal")
        else:
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xlabel("ranks")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{mode} scaling")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, f"{key}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(rows) + 2), 4))
    labels = [f"{r['ranks']}:{r['strategy']}" for r in rows]
    comp = [1e3 * r["compute_s"] for r in rows]
    exp = [1e3 * min(r["exposed_comm_s"], r["comm_s"]) for r in rows]
    other = [1e3 * max(r["comm_s"] - r["exposed_comm_s"], 0.0) for r in rows]
    xs = range(len(rows))
    ax.bar(xs, comp, label="compute")
    ax.bar(xs, exp, bottom=comp, label="exposed comm")
    ax.bar(xs, other, bottom=[a + b for a, b in zip(comp, exp)], label="other comm")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("step time (ms)")
    ax.set_title("step-time breakdown (ranks:strategy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "breakdown.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    files.append(path)
    return files


def merge_reps(recs) -> dict:
    """One record from repetitions of a point (``--repeat``): medians over the steps of all
    repetitions together, bytes checked in every one, grids joined if ``auto`` chose
    different plans."""
    import numpy as np
    if len(recs) == 1:
        return dict(recs[0], reps=1)
    step = [v for r in recs for v in r["step_s_reps"]]
    comm = [v for r in recs for v in r["comm_s_reps"]]
    exp = [v for r in recs for v in r["exposed_s_reps"]]
    q1, med, q3 = (float(v) for v in np.percentile(step, [25, 50, 75]))
    cmed = float(np.median(comm))
    out = dict(recs[0])
    out.update({
        "reps": len(recs), "grid": " / ".join(dict.fromkeys(r["grid"] for r in recs)),
        "plans": [r["plan"] for r in recs], "step_s": med, "step_iqr_s": q3 - q1,
        "images_per_s": out["global_batch"] / med, "compute_s": med - cmed, "comm_s": cmed,
        "exposed_comm_s": float(np.median(exp)),
        "predicted_step_s": float(np.median([r["predicted_step_s"] for r in recs])),
        "bytes_match": all(r["bytes_match"] for r in recs),
        "bytes_mismatch": {f"rep {i + 1}, {k}": v for i, r in enumerate(recs)
                           for k, v in r["bytes_mismatch"].items()},
        "peak_rss_mb": max(r["peak_rss_mb"] for r in recs),
        "step_s_reps": step, "comm_s_reps": comm, "exposed_s_reps": exp,
        "rep_step_s": [r["step_s"] for r in recs]})
    for k in ("bytes_sent_per_rank", "model_bytes_sent_per_rank", "grad_bytes_per_rank",
              "model_grad_bytes_per_rank", "dp_grad_bytes_per_rank"):
        out[k] = max(r[k] for r in recs)
    dpg = out["dp_grad_bytes_per_rank"]
    out["grad_bytes_ratio_vs_dp"] = out["grad_bytes_per_rank"] / dpg if dpg else None
    return out


def write_csv(path, rows, columns=None):
    """``rows`` as CSV with ``columns`` (default :data:`COLUMNS`; None values empty)."""
    columns = COLUMNS if columns is None else columns
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})


SUMMARY_COLUMNS = ["ranks", "strategy", "grid", "global_batch", "runs", "step_s_median",
                   "step_s_min", "step_s_max", "predicted_step_s_median", "speedup_median",
                   "speedup_min", "speedup_max", "exposed_comm_s_median",
                   "bytes_sent_per_rank", "grad_bytes_per_rank", "dp_grad_bytes_per_rank",
                   "grad_bytes_ratio_vs_dp", "bytes_match_all"]


def summarize(dirs, out) -> int:
    """Merge repeated runs of one sweep: per (ranks, strategy), the median, min and max over
    the runs of each run's median step and of its speedup (each run's speedup is against
    that run's own fastest 1-rank point, so it pairs points measured minutes apart)."""
    import statistics
    groups: dict = {}
    for d in dirs:
        path = os.path.join(d, "scaling.csv")
        if not os.path.exists(path):
            print(f"--summarize: {path} does not exist", file=sys.stderr)
            return 1
        with open(path) as fh:
            for r in csv.DictReader(fh):
                groups.setdefault((int(r["ranks"]), r["strategy"]), []).append(r)
    rows = []
    for (p, st), rs in groups.items():
        def col(k, rs=rs):
            return [float(r[k]) for r in rs if r.get(k) not in ("", None)]
        grids = sorted({r["grid"] for r in rs})
        first = rs[0]
        rows.append({
            "ranks": p, "strategy": st, "grid": " / ".join(grids),
            "global_batch": first["global_batch"], "runs": len(rs),
            "step_s_median": statistics.median(col("step_s")), "step_s_min": min(col("step_s")),
            "step_s_max": max(col("step_s")),
            "predicted_step_s_median": statistics.median(col("predicted_step_s")),
            "speedup_median": statistics.median(col("speedup")),
            "speedup_min": min(col("speedup")), "speedup_max": max(col("speedup")),
            "exposed_comm_s_median": statistics.median(col("exposed_comm_s")),
            "bytes_sent_per_rank": " / ".join(sorted({r["bytes_sent_per_rank"] for r in rs})),
            "grad_bytes_per_rank": " / ".join(sorted({r["grad_bytes_per_rank"] for r in rs})),
            "dp_grad_bytes_per_rank": first["dp_grad_bytes_per_rank"],
            "grad_bytes_ratio_vs_dp": first["grad_bytes_ratio_vs_dp"],
            "bytes_match_all": all(r["bytes_match"] == "True" for r in rs)})
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "summary.csv")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print("| ranks | strategy | grid | runs | step ms median [min, max] | predicted ms | "
          "speedup median [min, max] | bytes/rank = model | grad bytes / DP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["grad_bytes_ratio_vs_dp"]
        print(f"| {r['ranks']} | {r['strategy']} | {r['grid']} | {r['runs']} | "
              f"{1e3 * r['step_s_median']:.1f} [{1e3 * r['step_s_min']:.1f}, "
              f"{1e3 * r['step_s_max']:.1f}] | {1e3 * r['predicted_step_s_median']:.1f} | "
              f"{r['speedup_median']:.2f} [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] | "
              f"{r['bytes_sent_per_rank']} ({'yes' if r['bytes_match_all'] else 'NO'}) | "
              f"{r['grad_bytes_per_rank']} / {r['dp_grad_bytes_per_rank']}"
              f"{f' = {float(ratio):.3f}' if ratio else ''} |")
    print(f"wrote {path}")
    return 0
