"""Calibration of a :class:`.machine.Machine`: the α–β constants of every collective kind
measured on the running job (:func:`calibrate`), per link class, and the fit
(:func:`fit_alpha_beta`)."""
from __future__ import annotations

import socket
import time

import numpy as np

from .machine import KINDS, LINKS, Machine, steps, zero_links


def _median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _bench(c, sizes, reps, kinds=KINDS):
    """Time every kind and size on Communicator ``c`` (collective over ``c``).

    Returns ``{kind: [(bytes, median seconds), ...]}`` for this rank, bytes as
    ``c.stats()`` counts them (max of sent and received per call).
    """
    p = c.size
    out = {k: [] for k in kinds}
    for size in sizes:
        n = max(1, int(size) // 4)          # float32 elements of the whole buffer
        m = max(1, n // p)                  # elements of one rank's block
        for kind in kinds:
            if kind == "allreduce":
                x = np.ones(n, np.float32)

                def call(x=x):
                    c.allreduce(x)
            elif kind == "allgather":
                x = np.ones(m, np.float32)
                counts = [m] * p

                def call(x=x, counts=counts):
                    c.allgather(x, 0, counts)
            elif kind == "reduce_scatter":
                x = np.ones(m * p, np.float32)
                counts = [m] * p

                def call(x=x, counts=counts):
                    c.reduce_scatter(x, 0, counts)
            else:
                x = np.ones((p, m), np.float32)
                ones, ms = [1] * p, [m] * p

                def call(x=x, ones=ones, ms=ms):
                    c.alltoall(x, 0, 1, ones, ms)
            c.barrier()
            call()                          # warm-up (datatypes, buffers, connections)
            c.reset_stats()
            ts = []
            for _ in range(int(reps)):
                c.barrier()
                t0 = time.perf_counter()
                call()
                ts.append(time.perf_counter() - t0)
            st = c.stats()[kind]
            nbytes = max(st["bytes_sent"], st["bytes_recv"]) / max(1, st["calls"])
            out[kind].append((float(nbytes), _median(ts)))
    return out


def fit_alpha_beta(points):
    """Fit ``t = alpha*steps + beta*bytes`` to ``[(steps, bytes, t), ...]``; alpha, beta >= 0.

    Least squares on the *relative* residual ``(model - t) / t`` (each point weighted by
    ``1/t``) so that small, latency-bound messages count as much as large ones; a negative
    coefficient is clipped to 0 and the other refitted alone.
    """
    pts = [(float(s), float(b), float(t)) for s, b, t in points if t > 0]
    if not pts:
        return 0.0, 0.0
    a = np.array([[s, b] for s, b, _ in pts])
    t = np.array([t for _, _, t in pts])
    w = 1.0 / t
    aw, tw = a * w[:, None], t * w

    def one(col):
        x = aw[:, col]
        den = float(x @ x)
        return max(0.0, float(x @ tw) / den) if den > 0 else 0.0

    if len(pts) >= 2 and np.linalg.matrix_rank(aw) == 2:
        coef, *_ = np.linalg.lstsq(aw, tw, rcond=None)
        alpha, beta = float(coef[0]), float(coef[1])
        if alpha >= 0 and beta >= 0:
            return alpha, beta
    # constrained: the best fit with one coefficient at 0
    cands = [(one(0), 0.0), (0.0, one(1))]
    resid = [float(np.sum((aw @ np.array(c) - tw) ** 2)) for c in cands]
    return cands[int(np.argmin(resid))]


def _fit(groups_data):
    """``{kind: {alpha, beta}}`` from ``[(g, {kind: [(bytes, t), ...]}), ...]``."""
    out = {}
    for k in KINDS:
        pts = [(steps(k, g), b, t) for g, data in groups_data for b, t in data[k]]
        alpha, beta = fit_alpha_beta(pts)
        out[k] = {"alpha": alpha, "beta": beta}
    return out


def calibrate(comm=None, sizes=(1 << 12, 1 << 16, 1 << 20, 1 << 22), reps=5,
              name="calibrated", verbose=False) -> Machine:
    """Measure the α–β constants of every collective kind on the current job.

    Collective over ``comm`` (default :func:`distconv.comm.world`; an mpi4py communicator
    or a :class:`~distconv.comm.Communicator`). For each kind and each buffer size in
    ``sizes`` (bytes of float32 data: an allreduce of ``size/4`` elements; allgather,
    reduce_scatter and alltoall of even blocks making ``size`` bytes in all) it times
    ``reps`` calls after one warm-up, with a barrier before each, and keeps the maximum
    over ranks of each rank's median. Bytes are per-rank bytes as ``stats()`` counts them.
    alpha, beta per kind come from :func:`fit_alpha_beta`.

    Nodes are told apart by host name. On one node, ``"intra"`` is measured and copied to
    ``"inter"`` (said in ``notes``). On several nodes, ``"intra"`` is measured on the
    node-local sub-communicators (all nodes at once) and ``"inter"`` on one rank per node;
    if every node has one rank, ``"inter"`` is copied to ``"intra"``. With one rank there
    is nothing to measure: the links cost 0. Every rank returns the same Machine.
    The communicator's statistics are not touched (a private duplicate is used).
    """
    from distconv import comm as _comm

    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 4:
        raise ValueError(f"calibrate: sizes must be byte counts >= 4, got {sizes}")
    if int(reps) < 1:
        raise ValueError(f"calibrate: reps must be >= 1, got {reps}")
    base = _comm.wrap(comm)
    t_start = time.perf_counter()
    me = base.rank
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    def say(msg):
        if verbose and me == 0:
            print(f"[calibrate] {msg}", flush=True)

    if base.size == 1:
        say("1 rank: nothing to measure, zero-cost links")
        return Machine(name=name, ranks_per_node=1, links=zero_links(),
                       notes=f"calibrate() on 1 rank ({socket.gethostname()}, {stamp}): "
                             "no communication to measure, links cost 0.")
    node_of, per_node, notes = _placement(base, sizes, reps, stamp)
    say(f"{base.size} ranks on {len(per_node)} node(s): {per_node}")
    # private duplicate with its own statistics, so the caller's counters stay untouched
    priv_mpi = base.split(0, me).mpi
    priv = _comm.Communicator(priv_mpi, _comm.CommStats())
    subs = [priv_mpi]
    intra, inter = _measure_links(priv, node_of, per_node, sizes, reps, subs, say)
    links = _fit_links(intra, inter, notes, say) if me == 0 else None
    links = priv.allgather_obj(links)[0]
    notes.append(f"Took {time.perf_counter() - t_start:.1f} s.")
    notes_s = " ".join(priv.allgather_obj(notes)[0])
    for s in reversed(subs):
        s.Free()
    return Machine(name=name, ranks_per_node=max(per_node), links=links, notes=notes_s)


def _placement(base, sizes, reps, stamp):
    """``(node of each rank, ranks per node, notes)`` from the ranks' host names."""
    p = base.size
    hosts = base.allgather_obj(socket.gethostname())
    node_names = list(dict.fromkeys(hosts))            # in order of first appearance
    node_of = [node_names.index(h) for h in hosts]
    per_node = [node_of.count(i) for i in range(len(node_names))]
    rpn = max(per_node)
    notes = [f"calibrate() on {p} ranks, {len(node_names)} node(s) {per_node} ranks each, "
             f"sizes {list(int(s) for s in sizes)} B, {reps} reps (median per rank, max "
             f"over ranks), float32, {stamp}."]
    if len(set(per_node)) > 1:
        notes.append(f"Uneven ranks per node {per_node}: ranks_per_node is the largest.")
    if any(node_of[r] != r // rpn for r in range(p)):
        notes.append("Ranks are not placed in blocks of ranks_per_node per node, so "
                     "link_of() may misclassify groups of this job.")
    return node_of, per_node, notes


def _measured(c, sizes, reps):
    """(group size, {kind: [(bytes, t)]}) with max over the group's ranks."""
    data = _bench(c, sizes, reps)
    allv = c.allgather_obj(data)
    agg = {k: [(max(v[k][i][0] for v in allv), max(v[k][i][1] for v in allv))
               for i in range(len(sizes))] for k in KINDS}
    return c.size, agg


def _measure_links(priv, node_of, per_node, sizes, reps, subs, say):
    """``(intra, inter)``: lists of :func:`_measured` results (None: not measurable), the
    sub-communicators made appended to ``subs`` (freed by the caller)."""
    from distconv import comm as _comm
    me = priv.rank
    if len(per_node) == 1:
        say("measuring intra-node collectives")
        return [_measured(priv, sizes, reps)], None
    intra = None
    node_mpi = priv.split(node_of[me], me).mpi
    subs.append(node_mpi)
    node_c = _comm.Communicator(node_mpi, _comm.CommStats())
    if max(per_node) > 1:
        say("measuring intra-node collectives on every node at once")
        res = _measured(node_c, sizes, reps) if node_c.size > 1 else None
        intra = [r for r in priv.allgather_obj(res if node_c.rank == 0 else None)
                 if r is not None]
    leader = node_c.rank == 0
    lead_mpi = priv.split(0 if leader else 1, me).mpi
    subs.append(lead_mpi)
    say("measuring inter-node collectives, one rank per node")
    res = None
    if leader:
        res = _measured(_comm.Communicator(lead_mpi, _comm.CommStats()), sizes, reps)
    inter = [r for r in priv.allgather_obj(res if me == 0 else None) if r is not None]
    return intra, inter


def _fit_links(intra, inter, notes, say):
    """``{"intra": {kind: {alpha, beta}}, "inter": ...}``; a link class not measured is a
    copy of the other (said in ``notes``)."""
    li = _fit(intra) if intra else None
    le = _fit(inter) if inter else None
    if le is None:
        le = {k: dict(v) for k, v in li.items()}
        notes.append("All ranks on one node: 'inter' is a copy of the measured 'intra'.")
    if li is None:
        li = {k: dict(v) for k, v in le.items()}
        notes.append("One rank per node: 'intra' is a copy of the measured 'inter'.")
    links = {"intra": li, "inter": le}
    for link in LINKS:
        for k in KINDS:
            c = links[link][k]
            say(f"{link:5s} {k:14s} alpha {c['alpha'] * 1e6:9.2f} us  "
                f"beta {c['beta'] * 1e9:8.4f} ns/B ({_gbps(c['beta'])})")
    return links


def _gbps(beta):
    return "inf GB/s" if beta <= 0 else f"{1e-9 / beta:.2f} GB/s"
