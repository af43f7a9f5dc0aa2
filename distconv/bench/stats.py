"""Counters and timing rules shared by the benchmark scripts."""
from __future__ import annotations

import numpy as np

#: a repetition is clean when the OS took less than ``frac`` of its step from every rank
#: ... or less than this many seconds
CLEAN_FLOOR_S = 0.5e-3

_FIELDS = ("calls", "bytes_sent", "bytes_recv", "time")


def stats_delta(after, before):
    """``{kind: {calls, bytes_sent, bytes_recv, time}}`` of what happened between two
    ``Communicator.stats()`` snapshots (kinds with no call and no byte left out; the
    ``total`` entry dropped)."""
    out = {}
    for k, v in after.items():
        if k == "total":
            continue
        b = before.get(k, {"calls": 0, "bytes_sent": 0, "bytes_recv": 0, "time": 0.0})
        d = {f: v[f] - b[f] for f in _FIELDS}
        if d["calls"] or d["bytes_sent"] or d["bytes_recv"]:
            out[k] = d
    return out


def is_clean(steps, losts, frac, floor=CLEAN_FLOOR_S):
    """Clean repetition: on every rank the time the OS took (``losts``, seconds) is at most
    ``frac`` of that rank's step (``steps``) or ``floor`` seconds."""
    return all(lost <= max(frac * step, floor) for step, lost in zip(steps, losts))


def paired_ratio(base, other) -> dict:
    """Speedup of ``other`` over ``base`` from step times measured in the same rounds:
    the median and quartiles of the per-round ratios ``base / other`` (drift of the
    machine between rounds cancels) and the ratio of the medians."""
    a, b = np.asarray(base, float), np.asarray(other, float)
    q1, med, q3 = (float(v) for v in np.percentile(a / b, [25, 50, 75]))
    return {"speedup_paired_median": med, "speedup_paired_q1": q1, "speedup_paired_q3": q3,
            "speedup_ratio_of_medians": float(np.median(a) / np.median(b))}
