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
  (recursive doubling/halving; a broadcast too, a binomial tree priced with allgather's
  constants), ``g - 1`` for alltoall (pairwise exchange; alltoallv too, and a halo
  exchange or its adjoint: one message per neighbour, alltoall's constants).
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
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_text

KINDS = ("allreduce", "allgather", "reduce_scatter", "alltoall")
LINKS = ("intra", "inter")
# a halo exchange (and its adjoint) is point-to-point with each neighbour: priced with the
# alltoall constants, one alpha per neighbour (``steps`` of a group of me + neighbours)
# a broadcast (the loss of placed logits tells every rank its value) is a binomial tree:
# ceil(log2 g) steps as an allgather's, priced with allgather's constants
_ALIASES = {"alltoallv": "alltoall", "halo": "alltoall", "halo_adjoint": "alltoall",
            "bcast": "allgather"}
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
                         f"(or {sorted(_ALIASES)})")
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
        write_text(path, json.dumps(self.to_dict(), indent=1) + "\n", fsync=True)

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


def __getattr__(name):
    """``calibrate`` and ``fit_alpha_beta`` live in :mod:`.calibrate` (which imports this
    module); they are reachable from here too, resolved on first use so that either module
    can be imported first."""
    if name in ("calibrate", "fit_alpha_beta"):
        import importlib
        return getattr(importlib.import_module(".calibrate", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
