"""Per-layer, per-step profile of a model: wall time and communication of every leaf module.

::

    prof = Profiler(model)               # hooks on every leaf module
    for step in range(n):
        prof.step_begin()
        loss = crit(model(x), labels); loss.backward(); sync_gradients(model.parameters())
        prof.step_end()
    print(prof.table()); prof.to_json("profile.json"); d = prof.summary()

A *leaf* is a module with no sub-modules (Conv2d, BatchNorm2d, ReLU, ...). Each call of a
leaf's forward and the backward of each recorded call (forward pre/post hooks and full
backward pre/post hooks, PyTorch's names) record its wall time and the difference of
``distconv.comm.world().stats()`` before and after it (sub-communicators share that
statistics object), per collective kind: calls, bytes sent, bytes received, time.
Communication during a step but outside every leaf call (e.g. a residual join's
redistribution or ``sync_gradients``) is recorded under the pseudo-layer ``"(outside)"``,
so the layers' bytes plus ``"(outside)"`` equal the step's ``stats()`` totals.

``compute = wall - comm time`` per layer. ``exposed communication`` of a step = the
communication time inside leaf calls + the blocking (not ``*_wait``) communication outside
them + the time blocked in ``GradientSync.wait`` (``Profiler(model, sync=...)``; without
one, the time of the ``*_wait`` kinds outside the layers). The hooks only read clocks and
counters, so results are unchanged. ``remove()`` unregisters them.
"""
from __future__ import annotations

import json
import time

from . import comm as _comm

OUTSIDE = "(outside)"
_FIELDS = ("calls", "bytes_sent", "bytes_recv", "time")


def _delta(after: dict, before: dict) -> dict:
    out = {}
    for k, v in after.items():
        if k == "total":
            continue
        b = before.get(k)
        d = {f: v[f] - (b[f] if b else 0) for f in _FIELDS}
        if d["calls"] or d["bytes_sent"] or d["bytes_recv"]:
            out[k] = d
    return out


def _add_kinds(into: dict, kinds: dict, sign: int = 1) -> None:
    for k, d in kinds.items():
        e = into.setdefault(k, {"calls": 0, "bytes_sent": 0, "bytes_recv": 0, "time": 0.0})
        for f in _FIELDS:
            e[f] += sign * d[f]


def _tot(kinds: dict) -> dict:
    t = {"calls": 0, "bytes_sent": 0, "bytes_recv": 0, "time": 0.0}
    for d in kinds.values():
        for f in _FIELDS:
            t[f] += d[f]
    return t


def _new_layer():
    return {"forward_s": 0.0, "backward_s": 0.0, "forward_calls": 0, "backward_calls": 0,
            "kinds": {}}


class Profiler:
    """Record per-leaf-module wall and communication of every step (see the module doc)."""

    def __init__(self, model, comm=None, sync=None):
        self.model = model
        self.comm = _comm.wrap(comm)
        self.sync = sync
        self.steps: list[dict] = []
        self._cur: dict | None = None
        self._depth = 0
        self._wrapped = []
        self._types = {}
        seen = set()
        for name, m in model.named_modules():
            if any(True for _ in m.children()) or id(m) in seen:
                continue
            seen.add(id(m))
            name = name or type(m).__name__
            self._types[name] = type(m).__name__
            self._wrap(name, m)

    # ------------------------------------------------------------ hooks
    def _wrap(self, name, m):
        prof = self
        open_calls = []  # (phase, t0, stats0) of the calls of m in progress

        def begin(phase):
            def hook(*args):
                if prof._cur is None or prof._depth:
                    open_calls.append(None)
                    return None
                prof._depth += 1
                open_calls.append((phase, prof.comm.stats(), time.perf_counter()))
                return None
            return hook

        def end(*args):
            entry = open_calls.pop()
            if entry is None:
                return None
            phase, s0, t0 = entry
            t1 = time.perf_counter()
            s1 = prof.comm.stats()
            prof._depth -= 1
            rec = prof._cur["layers"].setdefault(name, _new_layer())
            rec[phase + "_s"] += t1 - t0
            rec[phase + "_calls"] += 1
            _add_kinds(rec["kinds"], _delta(s1, s0))
            return None

        self._wrapped += [m.register_forward_pre_hook(begin("forward")),
                          m.register_forward_hook(end),
                          m.register_full_backward_pre_hook(begin("backward")),
                          m.register_full_backward_hook(end)]

    def remove(self) -> None:
        """Unregister every hook."""
        for h in self._wrapped:
            h.remove()
        self._wrapped = []

    # ------------------------------------------------------------ steps
    def step_begin(self) -> None:
        if self._cur is not None:
            raise RuntimeError("Profiler.step_begin called twice without step_end")
        self._cur = {"layers": {}, "stats0": self.comm.stats(),
                     "sync0": getattr(self.sync, "exposed_time", 0.0),
                     "t0": time.perf_counter()}

    def step_end(self) -> dict:
        if self._cur is None:
            raise RuntimeError("Profiler.step_end called without step_begin")
        wall = time.perf_counter() - self._cur["t0"]
        cur, self._cur = self._cur, None
        total = _delta(self.comm.stats(), cur["stats0"])
        outside = {k: dict(v) for k, v in total.items()}
        for rec in cur["layers"].values():
            _add_kinds(outside, rec["kinds"], -1)
        outside = {k: v for k, v in outside.items()
                   if v["calls"] or v["bytes_sent"] or v["bytes_recv"] or abs(v["time"]) > 0}
        layer_comm = sum(_tot(r["kinds"])["time"] for r in cur["layers"].values())
        out_block = sum(v["time"] for k, v in outside.items() if not k.endswith("_wait"))
        out_wait = sum(v["time"] for k, v in outside.items() if k.endswith("_wait"))
        if self.sync is not None:
            sync_wait = getattr(self.sync, "exposed_time", 0.0) - cur["sync0"]
        else:
            sync_wait = out_wait
        tt = _tot(total)
        step = {"wall_s": wall, "layers": cur["layers"], "outside": outside,
                "comm_s": tt["time"], "bytes_sent": tt["bytes_sent"],
                "bytes_recv": tt["bytes_recv"], "layer_comm_s": layer_comm,
                "sync_wait_s": sync_wait,
                "exposed_comm_s": layer_comm + out_block + sync_wait,
                "layer_wall_s": sum(r["forward_s"] + r["backward_s"]
                                    for r in cur["layers"].values())}
        self.steps.append(step)
        return step

    def reset(self) -> None:
        self.steps = []

    # ------------------------------------------------------------ reports
    def summary(self, skip: int = 0) -> dict:
        """Totals over the recorded steps (after the first ``skip``) and per-step means.

        ``layers[name]``: type, forward_s, backward_s, wall_s, comm_s, compute_s,
        comm_by_kind {kind: calls, bytes_sent, bytes_recv, time}, bytes_sent, bytes_recv
        (totals over the steps; ``*_per_step`` = mean). ``steps``: one dict per step.
        ``per_step``: means of wall_s, comm_s, compute_s, exposed_comm_s, sync_wait_s,
        bytes_sent, bytes_recv.
        """
        steps = self.steps[skip:]
        n = len(steps)
        layers = {}
        names = list(self._types) + [OUTSIDE]
        for name in names:
            acc = _new_layer()
            for s in steps:
                r = s["layers"].get(name) if name != OUTSIDE else \
                    {"forward_s": 0.0, "backward_s": 0.0, "forward_calls": 0,
                     "backward_calls": 0, "kinds": s["outside"]}
                if r is None:
                    continue
                for f in ("forward_s", "backward_s", "forward_calls", "backward_calls"):
                    acc[f] += r[f]
                _add_kinds(acc["kinds"], r["kinds"])
            if name == OUTSIDE and not acc["kinds"]:
                continue
            t = _tot(acc["kinds"])
            wall = acc["forward_s"] + acc["backward_s"]
            d = {"type": self._types.get(name, OUTSIDE),
                 "forward_s": acc["forward_s"], "backward_s": acc["backward_s"],
                 "forward_calls": acc["forward_calls"],
                 "backward_calls": acc["backward_calls"],
                 "wall_s": wall, "comm_s": t["time"],
                 "compute_s": wall - t["time"] if name != OUTSIDE else 0.0,
                 "comm_by_kind": acc["kinds"], "bytes_sent": t["bytes_sent"],
                 "bytes_recv": t["bytes_recv"]}
            for f in ("wall_s", "comm_s", "compute_s", "bytes_sent", "bytes_recv"):
                d[f + "_per_step"] = d[f] / n if n else 0.0
            layers[name] = d
        flat = [{k: v for k, v in s.items() if k not in ("layers", "outside")} for s in steps]
        for f in flat:
            f["compute_s"] = f["wall_s"] - f["comm_s"]
        keys = ("wall_s", "comm_s", "compute_s", "exposed_comm_s", "layer_comm_s",
                "sync_wait_s", "bytes_sent", "bytes_recv")
        per_step = {k: (sum(f[k] for f in flat) / n if n else 0.0) for k in keys}
        totals = {k: sum(f[k] for f in flat) for k in keys}
        return {"nsteps": n, "rank": self.comm.rank if hasattr(self.comm, "rank") else None,
                "layers": layers, "steps": flat, "per_step": per_step, "totals": totals}

    def table(self, skip: int = 0) -> str:
        """A printable per-layer table (per-step means, milliseconds and kB)."""
        s = self.summary(skip)
        hdr = f"{'layer':<28}{'type':<14}{'fwd ms':>9}{'bwd ms':>9}{'comm ms':>9}" \
              f"{'comp ms':>9}{'sent kB':>10}{'recv kB':>10}  kinds"
        lines = [hdr, "-" * len(hdr)]
        n = max(s["nsteps"], 1)
        for name, d in s["layers"].items():
            kinds = ",".join(sorted(d["comm_by_kind"]))
            lines.append(f"{name[:27]:<28}{d['type'][:13]:<14}{1e3 * d['forward_s'] / n:9.3f}"
                         f"{1e3 * d['backward_s'] / n:9.3f}{1e3 * d['comm_s'] / n:9.3f}"
                         f"{1e3 * d['compute_s'] / n:9.3f}{d['bytes_sent'] / n / 1e3:10.1f}"
                         f"{d['bytes_recv'] / n / 1e3:10.1f}  {kinds}")
        p = s["per_step"]
        lines.append("-" * len(hdr))
        lines.append(f"step ({s['nsteps']} steps, means): wall {1e3 * p['wall_s']:.3f} ms, "
                     f"comm {1e3 * p['comm_s']:.3f} ms, compute {1e3 * p['compute_s']:.3f} ms, "
                     f"exposed comm {1e3 * p['exposed_comm_s']:.3f} ms, "
                     f"sent {p['bytes_sent'] / 1e3:.1f} kB")
        return "\n".join(lines)

    def to_json(self, path, skip: int = 0) -> None:
        with open(path, "w") as fh:
            json.dump(self.summary(skip), fh, indent=1)
