"""A machine for the planner's cost model: ranks per node, α–β links per collective, compute.

The communication model is the α–β (latency–bandwidth) model of OptCNN/FlexFlow, one pair
of constants per collective kind and per link class:

    t = alpha_k(link) * steps(kind, g) + beta_k(link) * bytes

* ``bytes`` is what the busiest member of the collective moves: the maximum over the
  members of ``max(bytes_sent, bytes_recv)`` exactly as :meth:`distconv.comm.Communicator.
  stats` counts them (bandwidth-optimal volumes: an allreduce of ``n`` bytes on ``g``
  ranks counts about ``2 n (g-1)/g``, an allgather of blocks ``b`` counts ``b (g-1)``).
  ``beta`` is therefore seconds per *counted* byte.
* ``steps`` is the number of message rounds a latency-bound run takes, so ``alpha`` is
  seconds per message step: ``ceil(log2 g)`` for allreduce, allgather and reduce_scatter
  (recursive doubling/halving), ``g - 1`` for alltoall (pairwise exchange; alltoallv too).
* ``link`` is ``"intra"`` when every member sits on one node (``rank // ranks_per_node``
  equal for all), otherwise ``"inter"``: a collective that crosses nodes is paced by its
  slowest link.

A :class:`Machine` is saved as JSON (``save``/``load``); :func:`builtin` names the machine
files shipped in ``distconv/planner/machines/``, and :func:`calibrate` measures one on the
current MPI job. ``compute`` holds what :mod:`distconv.planner.compute` needs: a ``scale``
applied to measured kernel times, optional fitted ``rates`` per layer family
(``{family: {"t0": s, "rate": per_s}}``: seconds = t0 + work / rate, work in flop for
conv/linear and bytes for the memory-bound families) and an optional ``profile`` path.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("allreduce", "allgather", "reduce_scatter", "alltoall")
LINKS = ("intra", "inter")
_ALIASES = {"alltoallv": "alltoall"}
_MACHINES_DIR = Path(__file__).resolve().parent / "machines"


def zero_links() -> dict:
    """Links of zero cost for every link class and kind."""
    return {link: {k: {"alpha": 0.0, "beta": 0.0} for k in KINDS} for link in LINKS}


def _default_compute() -> dict:
    return {"scale": 1.0, "rates": None, "profile": None}


def steps(kind: str, g: int) -> int:
    """Message steps of one collective of ``kind`` on ``g`` ranks (see the module doc)."""
    kind = _kind(kind)
    g = int(g)
    if g <= 1:
        return 0
    if kind == "alltoall":
        return g - 1
    return int(math.ceil(math.log2(g)))


def _kind(kind) -> str:
    k = _ALIASES.get(kind, kind)
    if k not in KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; expected one of {KINDS} "
                         "(or 'alltoallv')")
    return k


def _members(group) -> list:
    if isinstance(group, numbers.Integral) and not isinstance(group, bool):
        group = int(group)
        if group < 0:
            raise ValueError(f"group size must be >= 0, got {group}")
        return list(range(group))
    try:
        if isinstance(group, (str, bytes)):
            raise TypeError
        members = [int(r) for r in group]
    except (TypeError, ValueError):
        raise ValueError(f"group must be an int size or a sequence of ranks, got {group!r}") \
            from None
    if any(r < 0 for r in members):
        raise ValueError(f"group ranks must be >= 0, got {members}")
    return members


@dataclass
class Machine:
    """Ranks per node, α–β link constants per collective kind, compute settings.

    ``links[link][kind] = {"alpha": seconds per message step, "beta": seconds per byte}``
    for ``link`` in ``("intra", "inter")`` and every kind in :data:`KINDS`.
    ``memory_per_rank``: bytes a rank may use (``None``: unlimited).
    """

    name: str = "unnamed"
    ranks_per_node: int = 1
    links: dict = field(default_factory=zero_links)
    compute: dict = field(default_factory=_default_compute)
    memory_per_rank: int | None = None
    notes: str = ""

    # ------------------------------------------------------------------ model
    def link_of(self, group) -> str:
        """``"intra"`` if all ranks of ``group`` are on one node, else ``"inter"``."""
        members = _members(group)
        rpn = max(1, int(self.ranks_per_node))
        nodes = {r // rpn for r in members}
        return "intra" if len(nodes) <= 1 else "inter"

    def collective_time(self, kind, bytes_, group) -> float:
        """Seconds of one collective of ``kind`` whose busiest member moves ``bytes_``.

        ``group``: the world ranks taking part (a sequence) or a size ``g`` (ranks
        ``0..g-1``). ``0.0`` for a group of at most one rank.
        ``t = alpha * steps(kind, g) + beta * bytes_`` with the constants of the link class
        of the group (:meth:`link_of`); ``steps`` is ``ceil(log2 g)`` for allreduce,
        allgather and reduce_scatter and ``g - 1`` for alltoall(v).
        """
        kind = _kind(kind)
        members = _members(group)
        g = len(members)
        if g <= 1:
            return 0.0
        b = float(bytes_)
        if not b >= 0:
            raise ValueError(f"bytes_ must be >= 0, got {bytes_!r}")
        c = self.links[self.link_of(members)][kind]
        return float(c["alpha"]) * steps(kind, g) + float(c["beta"]) * b

    # ------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict:
        """A JSON-ready dict (deep copy) that :meth:`from_dict` reads back."""
        return {
            "name": self.name,
            "ranks_per_node": int(self.ranks_per_node),
            "links": {link: {k: {"alpha": float(v["alpha"]), "beta": float(v["beta"])}
                             for k, v in self.links[link].items()} for link in LINKS},
            "compute": json.loads(json.dumps(self.compute)),
            "memory_per_rank": (None if self.memory_per_rank is None
                                else int(self.memory_per_rank)),
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d) -> "Machine":
        """A validated :class:`Machine` from :meth:`to_dict`'s layout.

        ``ValueError`` naming the bad key and value: unknown or missing keys, a link class
        or collective kind missing, a negative or non-finite alpha/beta, a bad compute entry.
        ``links``, ``compute``, ``memory_per_rank`` and ``notes`` may be left out (defaults).
        """
        if not isinstance(d, dict):
            raise ValueError(f"machine description must be a dict, got {type(d).__name__}")
        known = {"name", "ranks_per_node", "links", "compute", "memory_per_rank", "notes"}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"machine: unknown key(s) {extra}; known keys: {sorted(known)}")
        name = d.get("name", "unnamed")
        if not isinstance(name, str):
            raise ValueError(f"machine 'name' must be a string, got {name!r}")
        rpn = d.get("ranks_per_node", 1)
        if isinstance(rpn, bool) or not _is_int(rpn) or rpn < 1:
            raise ValueError(f"machine 'ranks_per_node' must be an integer >= 1, got {rpn!r}")
        links = _check_links(d.get("links", zero_links()))
        compute = _check_compute(d.get("compute", _default_compute()))
        mem = d.get("memory_per_rank")
        if mem is not None:
            if isinstance(mem, bool) or not _is_int(mem) or mem <= 0:
                raise ValueError("machine 'memory_per_rank' must be a positive integer "
                                 f"(bytes) or null, got {mem!r}")
            mem = int(mem)
        notes = d.get("notes", "")
        if not isinstance(notes, str):
            raise ValueError(f"machine 'notes' must be a string, got {notes!r}")
        return cls(name=name, ranks_per_node=int(rpn), links=links, compute=compute,
                   memory_per_rank=mem, notes=notes)

    def save(self, path) -> None:
        """Write :meth:`to_dict` as JSON (indent 1) to ``path`` atomically."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                   dir=str(path.parent) if str(path.parent) else ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def load(cls, path) -> "Machine":
        """Read a machine file; ``ValueError`` naming the file if it is not a valid one."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"machine file {str(path)!r} does not exist") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"machine file {str(path)!r} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"machine file {str(path)!r}: {e}") from None


def _is_int(x) -> bool:
    if isinstance(x, int):
        return True
    return isinstance(x, float) and math.isfinite(x) and x == int(x)


def _nonneg(value, where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"machine {where} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"machine {where} must be finite and >= 0, got {value!r}")
    return v


def _check_links(links) -> dict:
    if not isinstance(links, dict):
        raise ValueError(f"machine 'links' must be a dict, got {links!r}")
    extra = sorted(set(links) - set(LINKS))
    if extra:
        raise ValueError(f"machine 'links': unknown link class(es) {extra}; expected {LINKS}")
    out = {}
    for link in LINKS:
        if link not in links:
            raise ValueError(f"machine 'links' is missing link class {link!r}")
        per = links[link]
        if not isinstance(per, dict):
            raise ValueError(f"machine links[{link!r}] must be a dict, got {per!r}")
        extra = sorted(set(per) - set(KINDS))
        if extra:
            raise ValueError(f"machine links[{link!r}]: unknown kind(s) {extra}; "
                             f"expected {KINDS}")
        out[link] = {}
        for k in KINDS:
            if k not in per:
                raise ValueError(f"machine links[{link!r}] is missing kind {k!r}")
            c = per[k]
            if not isinstance(c, dict):
                raise ValueError(f"machine links[{link!r}][{k!r}] must be a dict with "
                                 f"'alpha' and 'beta', got {c!r}")
            bad = sorted(set(c) - {"alpha", "beta"})
            if bad:
                raise ValueError(f"machine links[{link!r}][{k!r}]: unknown key(s) {bad}")
            for key in ("alpha", "beta"):
                if key not in c:
                    raise ValueError(f"machine links[{link!r}][{k!r}] is missing {key!r}")
            out[link][k] = {key: _nonneg(c[key], f"links[{link!r}][{k!r}][{key!r}]")
                            for key in ("alpha", "beta")}
    return out


def _check_compute(compute) -> dict:
    if not isinstance(compute, dict):
        raise ValueError(f"machine 'compute' must be a dict, got {compute!r}")
    extra = sorted(set(compute) - {"scale", "rates", "profile"})
    if extra:
        raise ValueError(f"machine 'compute': unknown key(s) {extra}; "
                         "expected 'scale', 'rates', 'profile'")
    scale = compute.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"machine compute['scale'] must be a finite number > 0, got {scale!r}")
    rates = compute.get("rates")
    if rates is not None:
        if not isinstance(rates, dict):
            raise ValueError(f"machine compute['rates'] must be a dict or null, got {rates!r}")
        checked = {}
        for fam, r in rates.items():
            where = f"compute['rates'][{fam!r}]"
            if not isinstance(r, dict) or set(r) != {"t0", "rate"}:
                raise ValueError(f"machine {where} must be {{'t0': s, 'rate': per_s}}, "
                                 f"got {r!r}")
            t0 = _nonneg(r["t0"], where + "['t0']")
            rate = _nonneg(r["rate"], where + "['rate']")
            if rate <= 0:
                raise ValueError(f"machine {where}['rate'] must be > 0, got {r['rate']!r}")
            checked[str(fam)] = {"t0": t0, "rate": rate}
        rates = checked
    profile = compute.get("profile")
    if profile is not None and not isinstance(profile, str):
        raise ValueError(f"machine compute['profile'] must be a path string or null, "
                         f"got {profile!r}")
    return {"scale": float(scale), "rates": rates, "profile": profile}


# ------------------------------------------------------------------ shipped machine files
def available() -> list:
    """Names of the machine files shipped in ``distconv/planner/machines/``."""
    if not _MACHINES_DIR.is_dir():
        return []
    return sorted(p.stem for p in _MACHINES_DIR.glob("*.json"))


def builtin(name: str) -> str:
    """Path of the shipped machine file ``name`` (e.g. ``"dev_2core"``, ``"v100_ib"``)."""
    stem = str(name)
    if stem.endswith(".json"):
        stem = stem[:-5]
    names = available()
    if stem not in names:
        raise ValueError(f"no built-in machine {name!r}; available: {names}")
    return str(_MACHINES_DIR / f"{stem}.json")


# ------------------------------------------------------------------------- calibration
def _median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _bench(c, sizes, reps, kinds=KINDS):
    """Time every kind and size on Communicator ``c`` (collective over ``c``).

    Returns ``{kind: [(bytes, median seconds), ...]}`` for this rank, bytes as
    ``c.stats()`` counts them (max of sent and received per call).
    """
    import time

    import numpy as np

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
    import numpy as np

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
              name="calibrated", verbose=False) -> "Machine":
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
    import socket
    import time

    from distconv import comm as _comm

    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 4:
        raise ValueError(f"calibrate: sizes must be byte counts >= 4, got {sizes}")
    if int(reps) < 1:
        raise ValueError(f"calibrate: reps must be >= 1, got {reps}")
    base = _comm.wrap(comm)
    t_start = time.perf_counter()
    p, me = base.size, base.rank
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    def say(msg):
        if verbose and me == 0:
            print(f"[calibrate] {msg}", flush=True)

    if p == 1:
        say("1 rank: nothing to measure, zero-cost links")
        return Machine(name=name, ranks_per_node=1, links=zero_links(),
                       notes=f"calibrate() on 1 rank ({socket.gethostname()}, {stamp}): "
                             "no communication to measure, links cost 0.")

    hosts = base.allgather_obj(socket.gethostname())
    node_names = list(dict.fromkeys(hosts))            # in order of first appearance
    node_of = [node_names.index(h) for h in hosts]
    per_node = [node_of.count(i) for i in range(len(node_names))]
    nnodes = len(node_names)
    rpn = max(per_node)
    notes = [f"calibrate() on {p} ranks, {nnodes} node(s) {per_node} ranks each, "
             f"sizes {list(int(s) for s in sizes)} B, {reps} reps (median per rank, max "
             f"over ranks), float32, {stamp}."]
    if len(set(per_node)) > 1:
        notes.append(f"Uneven ranks per node {per_node}: ranks_per_node is the largest.")
    if any(node_of[r] != r // rpn for r in range(p)):
        notes.append("Ranks are not placed in blocks of ranks_per_node per node, so "
                     "link_of() may misclassify groups of this job.")
    say(f"{p} ranks on {nnodes} node(s): {per_node}")

    # private duplicate with its own statistics, so the caller's counters stay untouched
    priv_mpi = base.split(0, me).mpi
    priv = _comm.Communicator(priv_mpi, _comm.CommStats())
    subs = [priv_mpi]

    def measured(c):
        """(group size, {kind: [(bytes, t)]}) with max over the group's ranks."""
        data = _bench(c, sizes, reps)
        allv = c.allgather_obj(data)
        agg = {k: [(max(v[k][i][0] for v in allv), max(v[k][i][1] for v in allv))
                   for i in range(len(sizes))] for k in KINDS}
        return c.size, agg

    intra = inter = None
    if nnodes == 1:
        say("measuring intra-node collectives")
        intra = [measured(priv)]
    else:
        node_mpi = priv.split(node_of[me], me).mpi
        subs.append(node_mpi)
        node_c = _comm.Communicator(node_mpi, _comm.CommStats())
        if max(per_node) > 1:
            say("measuring intra-node collectives on every node at once")
            res = measured(node_c) if node_c.size > 1 else None
            intra = [r for r in priv.allgather_obj(res if node_c.rank == 0 else None)
                     if r is not None]
        leader = node_c.rank == 0
        lead_mpi = priv.split(0 if leader else 1, me).mpi
        subs.append(lead_mpi)
        say("measuring inter-node collectives, one rank per node")
        res = None
        if leader:
            res = measured(_comm.Communicator(lead_mpi, _comm.CommStats()))
        inter = [r for r in priv.allgather_obj(res if me == 0 else None) if r is not None]

    links = None
    if me == 0:
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
    links = priv.allgather_obj(links)[0]
    notes.append(f"Took {time.perf_counter() - t_start:.1f} s.")
    notes_s = " ".join(priv.allgather_obj(notes)[0])
    for s in reversed(subs):
        s.Free()
    return Machine(name=name, ranks_per_node=rpn, links=links, notes=notes_s)


def _gbps(beta):
    return "inf GB/s" if beta <= 0 else f"{1e-9 / beta:.2f} GB/s"
