"""1 rank vs P ranks paired step by step inside one job (``bench_paired.py``,
``bench_spatial.py``).

The shared dev VM changes speed by up to ~1.6x over seconds, so two jobs run a minute
apart time two different machines. :func:`paired_rounds` alternates, round after round, a
1-rank step on rank 0 (the other ranks wait in a nonblocking barrier, sleeping, so they do
not take a core) and one step of every P-rank case; a barrier precedes each step and a
P-rank step's time is the maximum over ranks. :func:`paired_row` summarises a case by the
median over rounds of ``A / B`` of the same round (drift cancels), with its quartiles and
the ratio of the medians.
"""
from __future__ import annotations

import time

import numpy as np


def strategy_fits(text: str, p: int) -> bool:
    """True when ``Strategy.parse(text)`` resolves on ``p`` ranks."""
    from ..strategy import Strategy
    try:
        Strategy.parse(text).resolve(p)
        return True
    except ValueError:
        return False


def paired_rounds(comm, single, cases: dict, rounds: int, warmup: int, log_every: int = 10):
    """Time ``warmup + rounds`` rounds; each runs ``single()`` on rank 0 alone, then every
    ``cases[name]()`` on all ranks, in order. Each callable runs one step and returns its
    seconds. Returns ``(a, b)``: ``a`` the ``rounds`` 1-rank times (rank 0; zeros elsewhere),
    ``b`` ``{name: [max over ranks per round]}`` (same on every rank)."""
    t_a, t_b = [], {k: [] for k in cases}
    t_start = time.perf_counter()
    for r in range(warmup + rounds):
        comm.idle_barrier(0.002)
        ta = single() if comm.rank == 0 else 0.0
        comm.idle_barrier(0.002)
        tb = {}
        for name, step in cases.items():
            comm.barrier()
            tb[name] = step()
        tb = {k: max(comm.allgather_obj(v)) for k, v in tb.items()}
        if r >= warmup:
            t_a.append(ta)
            for k in cases:
                t_b[k].append(tb[k])
        if comm.rank == 0 and log_every and (r + 1) % log_every == 0:
            print(f"[{time.perf_counter() - t_start:7.1f} s] round {r + 1}/{warmup + rounds}",
                  flush=True)
    return t_a, t_b


def paired_row(a, b, threshold: float = 1.6) -> dict:
    """Speedup of the P-rank times ``b`` over the 1-rank times ``a`` (same rounds):
    ``one_rank_ms``, ``p_ranks_ms`` (medians), ``speedup_paired_median``/``_q1``/``_q3``
    (of the per-round ratios ``a/b``), ``speedup_ratio_of_medians``, ``rounds_above_<t>``
    (rounds with ``a/b >= threshold``) and ``step_s`` (the P-rank times)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ratio = a / b
    q1, med, q3 = (float(v) for v in np.percentile(ratio, [25, 50, 75]))
    key = f"rounds_above_{threshold:g}".replace(".", "_")
    return {"one_rank_ms": float(np.median(a)) * 1e3, "p_ranks_ms": float(np.median(b)) * 1e3,
            "speedup_paired_median": med, "speedup_paired_q1": q1, "speedup_paired_q3": q3,
            "speedup_ratio_of_medians": float(np.median(a) / np.median(b)),
            key: int((ratio >= threshold).sum()), "step_s": b.tolist()}
