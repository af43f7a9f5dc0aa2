"""The steps of ``scripts/bench_planner.py``, one method each, run by every rank in order.

:class:`PlannerBench` holds one job's state: the machine (:meth:`~PlannerBench.
load_machine`), the kernel times (:meth:`~PlannerBench.first_kernel_pass`), the
planner's own plan next to the hand plans (:meth:`~PlannerBench.auto_plan`), the bytes
check (:meth:`~PlannerBench.check_bytes`), the interleaved timing
(:meth:`~PlannerBench.time_plans`), the second kernel pass after it
(:meth:`~PlannerBench.second_kernel_pass`), the optional per-layer profile
(:meth:`~PlannerBench.profile_plans`) and rank 0's report (:meth:`~PlannerBench.report`).
The script's docstring describes what each step measures.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import sys
import time

import numpy as np

from ..envinfo import blas_info, cpu_model, git_state
from .planner_bench import (
    Case, build_model, calib_sizes, hand_plans, plan_text, predicted_bytes, predicted_phases)
from .planner_report import _json_default, markdown, plan_rows, plan_summary, print_table, \
    summarize
from .quiet import wait_quiet
from .stats import is_clean

#: the element type of every tensor and message here (float32)
ITEM = 4


def environment(comm):
    """Machine facts for the JSON (every rank takes part: each rank's host, BLAS, affinity)."""
    from importlib import metadata

    from ..comm import mpi_info
    mine = {"host": socket.gethostname(), "blas": blas_info(),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None}
    try:  # the installed version, without importing torch
        torch_v = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_v = None
    mpi = mpi_info()
    return {"ranks": comm.size, "threads_per_rank": 1, "per_rank": comm.allgather_obj(mine),
            "python": sys.version.split()[0], "numpy": np.__version__,
            "mpi4py": mpi["mpi4py"], "mpi_library": mpi["mpi_library"],
            "torch_installed": torch_v, "platform": platform.platform(), "cpu": cpu_model(),
            "cpus_online": os.cpu_count(), "loadavg": list(os.getloadavg()),
            "git": git_state(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m mpi4py"] + sys.argv)}


def _merge_max(allv):
    """``[{key: seconds}]`` of every rank -> each key's largest value."""
    return {k: float(max(d[k] for d in allv if k in d)) for k in set().union(*allv)}


def _mean_entries(first, second):
    """Kernel times of two passes -> ``(merged, info)``: the mean where both measured a
    key, else the one that did, and the ratio statistics of the second over the first."""
    both = sorted(set(first) & set(second))
    final = dict(first)
    final.update(second)
    for k in both:
        final[k] = 0.5 * (first[k] + second[k])
    ratio = [second[k] / first[k] for k in both if first[k] > 0]
    info = {"common_entries": len(both),
            "pass2_over_pass1_median": float(np.median(ratio)) if ratio else None,
            "pass2_over_pass1_p10_p90": [float(np.percentile(ratio, 10)),
                                         float(np.percentile(ratio, 90))] if ratio else None}
    return final, info


def _profile_medians(steps):
    """A Profiler's steps -> ``{layer: (forward_s, backward_s, comm_s)}``, the median of
    each over the steps (``"(outside)"``: communication outside every layer)."""
    mine = {}
    for st in steps:
        for n, d in st["layers"].items():
            ct = sum(k["time"] for k in d["kinds"].values())
            mine.setdefault(n, []).append((d["forward_s"], d["backward_s"], ct))
        mine.setdefault("(outside)", []).append(
            (0.0, 0.0, sum(k["time"] for k in st["outside"].values())))
    return {n: tuple(float(np.median([v[i] for v in vs])) for i in range(3))
            for n, vs in mine.items()}


def _profile_rows(allp, pred_layers):
    """Every rank's :func:`_profile_medians` and one plan's predicted layer rows -> rows of
    measured (max over ranks) next to predicted seconds per layer."""
    rows = []
    pl = {r["name"]: r for r in pred_layers}
    for n in allp[0]:
        vals = [a.get(n, (0.0, 0.0, 0.0)) for a in allp]
        r = pl.get(n)
        rows.append({"name": n,
                     "measured_fwd_bwd_s": max(v[0] for v in vals) + max(v[1] for v in vals),
                     "measured_comm_s": max(v[2] for v in vals),
                     "predicted_compute_s": r["compute_s"] if r else None,
                     "predicted_comm_s": r["comm_s"] if r else None,
                     "predicted_sync_s": r["sync_s"] if r else None})
    return rows


class PlannerBench:
    """One bench_planner job on ``comm`` (at least 2 ranks) with the script's ``args``."""

    def __init__(self, args, comm, t0=None):
        from distconv.planner.graph import trace
        self.args, self.comm = args, comm
        self.p, self.me = comm.size, comm.rank
        self.T0 = time.perf_counter() if t0 is None else t0
        cores = os.cpu_count() or 1
        self.bytes_only = args.bytes_only or self.p > cores
        if self.bytes_only and not args.bytes_only:
            self.say(f"{self.p} ranks on {cores} CPU cores: oversubscribed, so bytes only "
                     f"(no timing)")
        self.env = environment(comm)
        self.quiet = {}
        self.in_shape = (args.batch, 3, args.size, args.size)
        self.graph = trace(build_model(args), self.in_shape)
        self.cache = None if args.no_cache else (args.cache or _default_cache())
        self.measure = not self.bytes_only
        self.measured, self.timing_info, self.kernel_info, self.profile = {}, {}, {}, {}
        self.preds2 = None

    # ---------------------------------------------------------------- helpers
    def say(self, msg):
        if self.me == 0:
            print(f"[{time.perf_counter() - self.T0:7.1f} s] {msg}", flush=True)

    def settle(self, what):
        """With ``--wait-quiet``, wait for a quiet machine before ``what``."""
        if self.args.wait_quiet > 0:
            q = wait_quiet(self.comm, self.args.wait_quiet)
            self.quiet[what] = q
            idle = "n/a" if q["idle"] is None else f"{100 * q['idle']:.0f}%"
            self.say(f"machine {'quiet' if q['quiet'] else 'NOT quiet (gave up waiting)'} "
                     f"before {what}: CPUs {idle} idle, waited {q['waited_s']:.0f} s")

    def cost_with(self, compute):
        from distconv.planner.costs import CostModel
        # the measured step reduces with sync_gradients: one allreduce per parameter
        return CostModel(self.graph, self.p, self.machine, compute, item=ITEM, optimizer="sgd",
                         bucket_bytes=None)

    @staticmethod
    def model_of(entries):
        """A fitted, non-measuring ComputeModel holding ``entries``."""
        from distconv.planner.compute import ComputeModel
        cm = ComputeModel(cache_path=None, measure=False, dtype="float32", backend="numpy",
                          threads=1)
        cm.entries.update(entries)
        cm.fit()
        return cm

    def predictions(self, cm):
        """Rank 0's ``simulate`` of every plan (with its predicted phases) on every rank."""
        from distconv.planner.simulate import simulate
        cost_p = self.cost_with(cm)
        out = {lab: simulate(cost_p, pl, overlap=False) for lab, pl in self.plans}
        for lab, pl in self.plans:
            out[lab]["phases_s"] = predicted_phases(cost_p, pl)
        return self.comm.mpi.bcast(out, root=0)

    # ---------------------------------------------------------------- steps
    def load_machine(self):
        """``--machine``, the shipped dev_2core file (bytes only), or calibrate on this job."""
        from distconv.planner import machine as mach
        a = self.args
        if a.machine:
            path = a.machine if os.path.exists(a.machine) else mach.builtin(a.machine)
            self.machine = mach.Machine.load(path)
            self.say(f"machine {self.machine.name!r} from {path}")
        elif self.bytes_only:
            self.machine = mach.Machine.load(mach.builtin("dev_2core"))
            self.say("machine: the shipped dev_2core file (bytes only: nothing is timed)")
        else:
            self.settle("calibration")
            self.say(f"calibrating the alpha-beta machine on {self.p} ranks "
                     f"({a.calib_reps} reps)")
            self.machine = mach.calibrate(self.comm, sizes=calib_sizes(self.graph),
                                          reps=a.calib_reps, name=f"calibrated_{self.p}rank",
                                          verbose=True)

    def kernel_pass(self, label, cache_path, more_plans):
        """Measure every kernel the search and the plans need, on every rank at once ->
        ``(entries, measured, hits)``. Every rank measures the same shapes (rank 0's
        shards) on its own core while the others do too, so the cores are as busy as in
        training (and the ComputeModel drops calls the OS interrupted). A step waits for
        the slowest rank at every collective, and the cores of a shared VM need not run
        at the same speed, so each entry keeps the largest of the ranks' medians; every
        rank then plans from the same numbers."""
        from distconv.planner.compute import ComputeModel
        from distconv.planner.search import search
        from distconv.planner.simulate import simulate
        a = self.args
        self.settle(label)
        cm = ComputeModel(cache_path=cache_path, measure=True, dtype="float32",
                          backend="numpy", threads=1, reps=a.compute_reps,
                          rounds=a.compute_rounds)
        n0 = len(cm.entries)
        self.say(f"{label}: measuring kernel times on every rank at once (threads=1, "
                 f"{a.compute_reps} reps x {a.compute_rounds} rounds; cache "
                 f"{cache_path or 'off'} with {n0} entries)")
        cost_m = self.cost_with(cm)
        search(cost_m)
        for _, plan in more_plans:
            simulate(cost_m, plan, overlap=False)
        cm.refine()  # every shape again, in --compute-rounds sweeps: the median of the rounds
        mine = {k: v for k, v in cm.entries.items() if k.endswith(cm.context)}
        merged = _merge_max(self.comm.allgather_obj(mine))
        self.say(f"{label}: measured {cm.measured} kernel passes on rank 0 ({cm.hits} cache "
                 f"hits)")
        if self.me == 0 and cache_path:
            cm.entries.update(merged)
            cm.save()
        return merged, cm.measured, n0

    def first_kernel_pass(self):
        """The compute model the auto plan is searched with: measured now (timing runs) or
        the cache's entries and fitted rates (bytes only)."""
        from distconv.planner.compute import ComputeModel
        self.hands = hand_plans(self.graph, self.p)
        if self.measure:
            self.entries1, self.measured1, self.hits0 = self.kernel_pass(
                "kernel pass 1", self.cache, self.hands)
            self.compute = self.model_of(self.entries1)
        else:
            self.compute = ComputeModel(cache_path=self.cache, measure=False, dtype="float32",
                                        backend="numpy", threads=1)
            self.entries1, self.measured1 = dict(self.compute.entries), 0
            self.hits0 = len(self.compute.entries)

    def auto_plan(self):
        """The planner's one call, on the same machine and compute model, the gradient sync
        not overlapped as in the measured step, no memory limit (identical on every rank:
        same numbers; rank 0's is used regardless). Sets ``self.plans``: the hand plans,
        ``auto`` and, when plan_model kept a uniform plan within min_gain of its fastest
        predicted plan, ``auto-fastest``."""
        from distconv.planner.auto import plan_model
        bcast = self.comm.mpi.bcast
        names = self.graph.strategic_names()
        t = time.perf_counter()
        res = plan_model(build_model(self.args), self.in_shape, self.p, self.machine,
                         self.compute, memory_limit=float("inf"), item=ITEM, optimizer="sgd",
                         overlap=False)
        auto = bcast(res["plan"], root=0)
        auto = {n: tuple(auto[n]) for n in names}  # graph order
        self.auto_info = bcast({"chosen": res.get("chosen"), "fastest": res.get("fastest"),
                                "min_gain": res.get("min_gain"),
                                "candidates": res.get("candidates"),
                                "search_s": res["search_s"]}, root=0)
        self.say(f"auto plan (plan_model, {self.auto_info['chosen']}) in "
                 f"{time.perf_counter() - t:.2f} s: {plan_text(auto)}")
        self.plans = list(self.hands) + [("auto", auto)]
        fastest = bcast(res.get("fastest_plan"), root=0)
        if fastest is not None:
            fastest = {n: tuple(fastest[n]) for n in names}
            if fastest != auto:
                self.plans.append(("auto-fastest", fastest))
                self.say(f"the fastest predicted plan ({self.auto_info['fastest']}, measured "
                         f"too as auto-fastest): {plan_text(fastest)}")
        self.same_as = next((lab for lab, pl in self.hands if pl == auto), None)
        self.preds = self.preds1 = self.predictions(self.compute)

    def make_cases(self):
        """One :class:`Case` per plan, on the same seeded input and labels."""
        a = self.args
        rng = np.random.default_rng(a.seed)
        x_glob = rng.standard_normal(self.in_shape).astype(np.float32)
        labels = rng.integers(0, a.classes, a.batch)
        self.cases = [Case(lab, pl, a, x_glob, labels) for lab, pl in self.plans]

    def check_bytes(self):
        """One step per plan with stats snapshots (it also warms the plan up): the bytes
        per kind on every rank against ``graph_events``."""
        self.byte_rows = {}
        for c in self.cases:
            got, loss_b = c.bytes_step(self.comm)
            want, want_loss = predicted_bytes(self.graph, c.plan, self.me, ITEM)
            allg = self.comm.allgather_obj((got, want, loss_b, want_loss))
            self.byte_rows[c.label] = {
                "equal": all(g == w for g, w, _, _ in allg),
                "loss_equal": all(lb == wl for _, _, lb, wl in allg),
                "per_rank": [{"measured": g, "predicted": w, "loss_measured": lb,
                              "loss_predicted": wl} for g, w, lb, wl in allg],
                "sent_per_rank_measured": [sum(v[0] for v in x[0].values()) for x in allg],
                "sent_per_rank_predicted": [sum(v[0] for v in x[1].values()) for x in allg]}
        self.say("bytes per rank, predicted == measured (model, loss): " + ", ".join(
            f"{lab} {'yes' if r['equal'] else 'NO'}, {'yes' if r['loss_equal'] else 'NO'}"
            for lab, r in self.byte_rows.items()))

    def _repetition(self, rep):
        """``--steps-per-plan`` consecutive steps of every plan, the last one timed (the order
        of the plans rotated by ``rep``) -> whether it was clean on every rank for every
        plan."""
        cases = self.cases
        k = rep % len(cases)  # rotate the order: no plan always runs first
        for c in cases[k:] + cases[:k]:
            for _ in range(self.args.steps_per_plan - 1):
                c.step(self.comm, record=False)  # the timed step follows one of its own
            c.step(self.comm)
        last = self.comm.allgather_obj([(c.recs[-1]["step"], c.recs[-1]["lost"])
                                        for c in cases])
        ok = all(is_clean([r[i][0] for r in last], [r[i][1] for r in last],
                          self.args.clean_frac) for i in range(len(cases)))
        for c in cases:
            c.recs[-1]["rep_clean"] = ok
        return ok

    def time_plans(self):
        """Warm-up, then interleaved repetitions until ``--repeats`` are clean (at most
        ``--max-repeats``), waiting for quiet after one that is not."""
        a = self.args
        for c in self.cases:
            for _ in range(a.warmup):
                c.step(self.comm, record=False)
        self.settle("timing")
        self.say(f"timing {len(self.cases)} plans interleaved, {a.repeats} clean repetitions "
                 f"wanted (at most {a.max_repeats})")
        rep, nclean, waits = 0, 0, 0
        while rep < a.max_repeats and nclean < a.repeats:
            ok = self._repetition(rep)
            rep += 1
            nclean += ok
            if not ok and a.wait_quiet > 0 and rep < a.max_repeats:
                waits += 1  # other processes took our cores: wait for them to finish
                wait_quiet(self.comm, a.wait_quiet)
        self.timing_info.update({"repetitions": rep, "clean_repetitions": nclean,
                                 "quiet_waits": waits})
        for c in self.cases:
            self.measured[c.label] = summarize(self.comm.allgather_obj(c.recs), a.clean_frac)
        self.say(f"timed {rep} repetitions, {nclean} clean (every plan, every rank); waited "
                 f"for quiet {waits} times")

    def second_kernel_pass(self):
        """A second kernel pass after the timing (the VM's speed drifts over minutes): the
        predictions take the mean of both passes; each pass alone is predicted too."""
        entries2, measured2, _ = self.kernel_pass("kernel pass 2", None, self.plans)
        final, info = _mean_entries(self.entries1, entries2)
        self.kernel_info = {"pass1_measured": self.measured1, "pass2_measured": measured2,
                            **info}
        self.compute = self.model_of(final)
        self.preds2 = self.predictions(self.model_of(entries2))
        self.preds = self.predictions(self.compute)

    def compute_info(self):
        c = self.compute
        a = self.args
        return {"context": c.context, "cache": self.cache, "cache_entries_before": self.hits0,
                "entries_used": len(c.entries), "measured": self.measure,
                "reps": a.compute_reps, "rounds": a.compute_rounds,
                "evict_bytes": c.evict_bytes, "passes": self.kernel_info, "rates": c.rates}

    def profile_plans(self):
        """``--profile-steps`` more steps per plan under the Profiler, interleaved like the
        timing: per layer the median over steps on each rank, then the max over ranks."""
        from distconv.profile import Profiler
        self.settle("profiling")
        profs = [Profiler(c.model) for c in self.cases]
        for _ in range(self.args.profile_steps):
            for c, prof in zip(self.cases, profs):
                prof.step_begin()
                c.step(self.comm, record=False)
                prof.step_end()
        for c, prof in zip(self.cases, profs):
            prof.remove()
            allp = self.comm.allgather_obj(_profile_medians(prof.steps))
            allw = self.comm.allgather_obj(
                float(np.median([st["wall_s"] for st in prof.steps])))
            layers = self.preds[c.label]["layers"]
            joins = sum(r["compute_s"] + r["comm_s"] for r in layers if r["kind"] == "join")
            self.profile[c.label] = {"layers": _profile_rows(allp, layers),
                                     "profiled_step_wall_s": max(allw),
                                     "predicted_joins_s": joins}

    def run(self):
        """Every step in order; rank 0 reports."""
        self.load_machine()
        self.first_kernel_pass()
        self.auto_plan()
        self.make_cases()
        self.check_bytes()
        if not self.bytes_only:
            self.time_plans()
        if self.measure:
            self.second_kernel_pass()
        if self.args.profile and not self.bytes_only:
            self.profile_plans()
        if self.me == 0:
            self.report()
        self.comm.barrier()

    # ---------------------------------------------------------------- report (rank 0)
    def document(self, rows, summary):
        """The JSON document: arguments, model, machine, compute model, environment, plans,
        summary (and the profile)."""
        a = self.args
        doc = {"benchmark": "bench_planner", "args": {k: v for k, v in vars(a).items()},
               "bytes_only": self.bytes_only,
               "model": {"name": ("IncNet (stem, blocks of 3 towers joined by dc.cat)"
                                  if a.model == "inception"
                                  else "ResNet(BasicBlock, stem=cifar)"),
                         "blocks": a.blocks,
                         "width": a.width, "input_shape": list(self.in_shape),
                         "classes": a.classes, "dtype": "float32",
                         "strategic_layers": len(self.graph.strategic_names())},
               "auto": self.auto_info,
               "simulate": {"overlap": False,
                            "why": "the measured step runs sync_gradients (blocking) "
                                   "after backward"},
               "machine": self.machine.to_dict(), "compute_model": self.compute_info(),
               "environment": self.env, "quiet_waits": self.quiet, "timing": self.timing_info,
               "plans": rows, "summary": summary,
               "elapsed_s": time.perf_counter() - self.T0}
        if self.profile:
            doc["profile"] = self.profile
        return doc

    def report(self):
        """Print the table and summary; write ``--out`` (JSON) and ``--md``."""
        a = self.args
        rows = plan_rows(self.plans, self.preds, self.byte_rows, self.measured, self.same_as,
                         self.preds1, self.preds2)
        summary = plan_summary(rows, self.measured, self.same_as, self.preds2, a.rank_margin)
        print_table(rows, summary, self.measured)
        doc = self.document(rows, summary)
        if a.out:
            d = os.path.dirname(os.path.abspath(a.out))
            os.makedirs(d, exist_ok=True)
            with open(a.out, "w") as fh:
                json.dump(doc, fh, indent=1, default=_json_default)
                fh.write("\n")
            self.say(f"wrote {a.out}")
        if a.md:
            with open(a.md, "w") as fh:
                fh.write(markdown(doc))
            self.say(f"wrote {a.md}")


def _default_cache():
    from distconv.planner.auto import default_cache_path
    return default_cache_path()
