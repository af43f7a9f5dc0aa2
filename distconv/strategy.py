"""Strategy: how one layer splits its work over the ranks.

``Strategy(sample=s, channel=c, filter=f)`` puts the ranks on an ``s×c×f``
grid named ``("sample", "channel", "filter")`` (sample outermost).
``sample=None`` takes the ranks the others leave. Activations between
layers are split on N over ``sample`` and on C (or features) over
``(channel, filter)``.

``height=h, width=w`` (spatial splits) add two grid axes: with ``h`` or ``w``
above 1 the grid is ``s×c×f×h×w`` named ``("sample", "channel", "filter",
"height", "width")`` and activations are also split on H over ``height`` and
on W over ``width``. With ``h = w = 1`` the grid stays the 3-axis one, so
every existing plan is unchanged.

``ranks=(r0, r1, ...)`` (text ``ranks=0-1``, ``ranks=0+2``, ``ranks=0-1+4-5``) places the
layer on those world ranks only (operator placement): its grid has ``len(ranks)``
positions, position ``q`` being world rank ``ranks[q]``; the other ranks skip the layer
(:mod:`distconv.grid`). ``ranks=None`` (default) is every rank of the job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from . import comm as _comm
from .distribution import Distribution
from .grid import get_grid

AXES = ("sample", "channel", "filter")
SPATIAL_AXES = ("height", "width")
ALL_AXES = AXES + SPATIAL_AXES


@dataclass(frozen=True)
class Strategy:
    """Split of a layer's work: ``sample`` groups × ``channel`` groups × ``filter`` groups
    × ``height`` blocks × ``width`` blocks."""

    sample: Optional[int] = None
    channel: int = 1
    filter: int = 1
    height: int = 1
    width: int = 1
    ranks: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if self.ranks is not None:
            object.__setattr__(self, "ranks", _check_ranks(self.ranks))
        for name in ALL_AXES:
            v = getattr(self, name)
            if v is None and name == "sample":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Strategy {name} must be a positive integer, got {v!r}")

    # ------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, text: str) -> "Strategy":
        """``"sample=2,channel=2"`` -> ``Strategy(sample=2, channel=2)``; names may be
        abbreviated to ``s``, ``c``, ``f``, ``h``, ``w``; empty text or ``"sample"`` means
        data parallel."""
        text = (text or "").strip()
        if text in ("", "sample", "data"):
            return cls()
        kw = {}
        short = {"s": "sample", "c": "channel", "f": "filter", "h": "height", "w": "width"}
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"cannot parse strategy {text!r}: expected key=value pairs "
                                 f"like 'sample=2,channel=2', got {part!r}")
            k, v = part.split("=", 1)
            k = short.get(k, k)
            if k not in ALL_AXES + ("ranks",):
                raise ValueError(f"cannot parse strategy {text!r}: unknown key {k!r} "
                                 f"(expected sample, channel, filter, height, width or ranks)")
            if k in kw:
                raise ValueError(f"cannot parse strategy {text!r}: {k!r} given twice")
            if k == "ranks":
                kw[k] = _parse_ranks(text, v)
                continue
            try:
                kw[k] = None if (k == "sample" and v in ("", "*", "None")) else int(v)
            except ValueError:
                raise ValueError(f"cannot parse strategy {text!r}: {k}={v!r} is not an "
                                 f"integer") from None
        return cls(**kw)

    def __str__(self):
        s = "*" if self.sample is None else str(self.sample)
        sp = "".join(f",{n}={getattr(self, n)}" for n in SPATIAL_AXES if getattr(self, n) > 1)
        pl = "" if self.ranks is None else f",ranks={format_ranks(self.ranks)}"
        return f"sample={s},channel={self.channel},filter={self.filter}{sp}{pl}"

    def to_dict(self) -> dict:
        """The fields; ``height``/``width`` only when above 1 and ``ranks`` (a list) only
        when set (older plan files stay as they were)."""
        d = {"sample": self.sample, "channel": self.channel, "filter": self.filter}
        d.update({n: getattr(self, n) for n in SPATIAL_AXES if getattr(self, n) > 1})
        if self.ranks is not None:
            d["ranks"] = list(self.ranks)
        return d

    @property
    def spatial(self) -> bool:
        """True when H or W is split (``height`` or ``width`` above 1)."""
        return self.height > 1 or self.width > 1

    def axes(self) -> tuple:
        """The names of this strategy's grid axes."""
        return ALL_AXES if self.spatial else AXES

    # ------------------------------------------------------------- grids
    def resolve(self, nranks: int) -> tuple:
        """The grid shape for ``nranks`` ranks: ``(s, c, f)``, or ``(s, c, f, h, w)`` for a
        spatial strategy; ``ValueError`` naming the numbers if it does not fit."""
        rest = (self.channel, self.filter) + ((self.height, self.width) if self.spatial
                                              else ())
        names = ("channel", "filter") + (SPATIAL_AXES if self.spatial else ())
        cf = 1
        for v in rest:
            cf *= v
        if self.sample is None:
            if nranks % cf:
                have = "there are" if self.ranks is None else "its rank set has"
                raise ValueError(f"strategy {self} needs a multiple of {'*'.join(names)} = "
                                 f"{cf} ranks, but {have} {nranks}")
            return (nranks // cf,) + rest
        if self.sample * cf != nranks:
            nums = "*".join(str(v) for v in (self.sample,) + rest)
            have = (f"there are {nranks}" if self.ranks is None else
                    f"its rank set {format_ranks(self.ranks)} has {nranks}")
            raise ValueError(f"strategy {self} needs sample*{'*'.join(names)} = {nums} = "
                             f"{self.sample * cf} ranks, but {have}")
        return (self.sample,) + rest

    def grid(self, comm=None):
        """The (cached) :class:`ProcessGrid` of this strategy on ``comm`` (default: world);
        with ``ranks``, a grid of those ranks of ``comm`` (``ValueError`` on every rank if
        one is outside the job or the strategy does not fit ``len(ranks)`` ranks)."""
        c = _comm.wrap(comm)
        shape = self.check(c.size)
        if self.ranks is not None:
            # its members make a communicator together and the others stand in for them: a
            # rank-dependent placement would leave ranks waiting, so the world agrees on it
            # first, on every call (an error on every rank, not a hang)
            c.check_same((shape, self.ranks), "a placed grid (shape, ranks): every rank must "
                         "build the same layers with the same strategies")
        return get_grid(shape, self.axes(), c, ranks=self.ranks)

    def check(self, world_size: int) -> tuple:
        """The grid shape in a job of ``world_size`` ranks (:meth:`resolve` over the rank set);
        ``ValueError`` if a placed rank is outside the job or the strategy does not fit."""
        if self.ranks is None:
            return self.resolve(world_size)
        out = [r for r in self.ranks if r >= world_size]
        if out:
            raise ValueError(f"strategy {self} places the layer on rank(s) {out}, outside the "
                             f"job of {world_size} ranks (ranks 0-{world_size - 1})")
        return self.resolve(len(self.ranks))

    def activation_distribution(self, ndim: int = 4, comm=None) -> Distribution:
        """Between-layer layout: dim 0 split over sample, dim 1 over (channel, filter);
        for a spatial strategy dim 2 over height and dim 3 over width (those above 1)."""
        return Distribution(self.grid(comm), self.activation_split(ndim))

    def activation_split(self, ndim: int = 4) -> list:
        """The split of :meth:`activation_distribution` (one entry per dimension), without
        a grid: what the planner lays out on its grids without communicators."""
        split = [("sample",), ("channel", "filter")] + [None] * (ndim - 2)
        if ndim == 4:
            if self.height > 1:
                split[2] = ("height",)
            if self.width > 1:
                split[3] = ("width",)
        return split[:ndim] if ndim >= 2 else [("sample",)]


def _check_ranks(ranks) -> tuple:
    """``ranks`` as a tuple of distinct non-negative ints; ``ValueError`` otherwise."""
    try:
        out = tuple(ranks)
    except TypeError:
        raise ValueError(f"Strategy ranks must be a sequence of world ranks, got "
                         f"{ranks!r}") from None
    if not out:
        raise ValueError("Strategy ranks is an empty rank set: a layer needs at least one "
                         "rank (ranks=None means every rank of the job)")
    if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in out):
        raise ValueError(f"Strategy ranks must be non-negative integers, got {list(out)}")
    if len(set(out)) != len(out):
        raise ValueError(f"Strategy ranks lists a rank twice: {list(out)}")
    return out


def _parse_ranks(text: str, v: str) -> tuple:
    """``"0-3"`` -> (0, 1, 2, 3); ranges and single ranks joined by ``+``: ``"0-1+4"``."""
    out = []
    for part in v.split("+"):
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(f"cannot parse strategy {text!r}: ranks={v!r} is not a rank set "
                             f"like 0-3 or 0+2 or 0-1+4-5") from None
        if b < a:
            raise ValueError(f"cannot parse strategy {text!r}: rank range {part!r} is empty")
        out.extend(range(a, b + 1))
    return tuple(out)


def format_ranks(ranks) -> str:
    """(0, 1, 2, 4) -> ``"0-2+4"`` (the text form :meth:`Strategy.parse` reads)."""
    parts, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if j == i else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return "+".join(parts)
