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
from typing import NamedTuple

import numpy as np

from .stats import is_clean, paired_ratio


def strategy_fits(text: str, p: int) -> bool:
    """True when ``Strategy.parse(text)`` fits a job of ``p`` ranks (its rank set, if it
    names one, inside the job; :meth:`Strategy.check`)."""
    from ..strategy import Strategy
    try:
        Strategy.parse(text).check(p)
        return True
    except ValueError:
        return False


def paired_world():
    """The world communicator of a paired benchmark, set up: one BLAS/OpenMP thread per
    rank (one rank stands for one device) and float32 as the default dtype."""
    from ..backend import set_default_dtype
    from ..comm import world
    from ..envinfo import pin_threads
    pin_threads(1)
    comm = world()
    set_default_dtype(np.float32)
    return comm


def check_fits(comm, texts, what: str = "strategy") -> None:
    """``ValueError`` on every rank, ``"<what> '<text>' does not fit <P> ranks"``, unless
    every Strategy text of ``texts`` fits the job (:func:`strategy_fits`)."""
    for s in texts:
        comm.agree(strategy_fits(s, comm.size), f"{what} {s!r} does not fit {comm.size} ranks")


def random_pair(seed: int, x_shape, dy_shape=None):
    """``(x, dy)``: float32 standard normal arrays of ``x_shape`` and ``dy_shape``
    (default ``x_shape``), drawn in that order from ``default_rng(seed)``: the same global
    input and output gradient on every rank."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    dy = rng.standard_normal(x_shape if dy_shape is None else dy_shape).astype(np.float32)
    return x, dy


class PairedTimes(NamedTuple):
    """What :func:`paired_rounds` measured: ``a`` the 1-rank step times (rank 0's; zeros
    elsewhere), ``b`` ``{case: [max over ranks per round]}``, ``clean_a``/``clean_b`` the
    same shapes, True for a clean step (:func:`distconv.bench.stats.is_clean`), and
    ``cpu_a``/``cpu_b`` the steps' process CPU time (wall minus lost; max over ranks)."""

    a: list
    b: dict
    clean_a: list
    clean_b: dict
    cpu_a: list
    cpu_b: dict


def _wall_lost(v):
    """A step's ``(seconds, seconds the OS took away)``: steps return one or the pair."""
    return (float(v[0]), float(v[1])) if isinstance(v, tuple) else (float(v), 0.0)


def paired_rounds(comm, single, cases: dict, rounds: int, warmup: int, log_every: int = 10,
                  clean_frac: float = 0.03) -> PairedTimes:
    """Time ``warmup + rounds`` rounds; each runs ``single()`` on rank 0 alone, then every
    ``cases[name]()`` on all ranks, in order. Each callable runs one step and returns its
    seconds, or ``(seconds, lost)`` with ``lost`` the time the OS gave its core to other
    processes (wall minus process CPU time: a busy rank's core was taken away); a step is
    clean when every rank lost at most ``clean_frac`` of its step. Same on every rank."""
    t_a, t_b = [], {k: [] for k in cases}
    c_a, c_b = [], {k: [] for k in cases}
    u_a, u_b = [], {k: [] for k in cases}
    t_start = time.perf_counter()
    for r in range(warmup + rounds):
        comm.idle_barrier(0.002)
        ta = _wall_lost(single()) if comm.rank == 0 else (0.0, 0.0)
        comm.idle_barrier(0.002)
        tb = {}
        for name, step in cases.items():
            comm.barrier()
            tb[name] = _wall_lost(step())
        got = comm.allgather_obj((ta, tb))
        if r >= warmup:
            t_a.append(got[0][0][0])
            c_a.append(is_clean([got[0][0][0]], [got[0][0][1]], clean_frac))
            u_a.append(got[0][0][0] - got[0][0][1])
            for k in cases:
                t_b[k].append(max(g[1][k][0] for g in got))
                u_b[k].append(max(g[1][k][0] - g[1][k][1] for g in got))
                c_b[k].append(is_clean([g[1][k][0] for g in got], [g[1][k][1] for g in got],
                                       clean_frac))
        if comm.rank == 0 and log_every and (r + 1) % log_every == 0:
            print(f"[{time.perf_counter() - t_start:7.1f} s] round {r + 1}/{warmup + rounds}",
                  flush=True)
    return PairedTimes(t_a, t_b, c_a, c_b, u_a, u_b)


def paired_row(a, b, threshold: float = 1.6, clean=None, cpu=None) -> dict:
    """Speedup of the P-rank times ``b`` over the 1-rank times ``a`` (same rounds):
    ``one_rank_ms``, ``p_ranks_ms`` (medians), ``speedup_paired_median``/``_q1``/``_q3``
    (of the per-round ratios ``a/b``), ``speedup_ratio_of_medians``, ``rounds_above_<t>``
    (rounds with ``a/b >= threshold``) and ``step_s`` (the P-rank times). With ``clean``
    (per round: both steps clean), also ``clean_rounds`` and the median and quartiles of
    the ratio over those rounds (``speedup_clean_*``, None when there are none). With
    ``cpu`` (``(cpu_a, cpu_b)``, the steps' CPU times), ``speedup_cpu_*`` the same ratio of
    CPU times (blind to the time other processes held the cores, but counting MPI's
    busy-waiting)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ratio = a / b
    key = f"rounds_above_{threshold:g}".replace(".", "_")
    out = {"one_rank_ms": float(np.median(a)) * 1e3, "p_ranks_ms": float(np.median(b)) * 1e3,
           **paired_ratio(a, b), key: int((ratio >= threshold).sum()), "step_s": b.tolist()}
    if clean is not None:
        keep = ratio[np.asarray(clean, bool)]
        qs = [float(v) for v in np.percentile(keep, [25, 50, 75])] if keep.size else [None] * 3
        out.update(clean_rounds=int(keep.size), speedup_clean_q1=qs[0],
                   speedup_clean_median=qs[1], speedup_clean_q3=qs[2])
    if cpu is not None:
        r = np.asarray(cpu[0], float) / np.asarray(cpu[1], float)
        q1, med, q3 = (float(v) for v in np.percentile(r, [25, 50, 75]))
        out.update(speedup_cpu_q1=q1, speedup_cpu_median=med, speedup_cpu_q3=q3)
    return out
