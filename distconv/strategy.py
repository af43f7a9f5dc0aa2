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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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

    def __post_init__(self):
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
            if k not in ALL_AXES:
                raise ValueError(f"cannot parse strategy {text!r}: unknown key {k!r} "
                                 f"(expected sample, channel, filter, height or width)")
            if k in kw:
                raise ValueError(f"cannot parse strategy {text!r}: {k!r} given twice")
            try:
                kw[k] = None if (k == "sample" and v in ("", "*", "None")) else int(v)
            except ValueError:
                raise ValueError(f"cannot parse strategy {text!r}: {k}={v!r} is not an "
                                 f"integer") from None
        return cls(**kw)

    def __str__(self):
        s = "*" if self.sample is None else str(self.sample)
        sp = "".join(f",{n}={getattr(self, n)}" for n in SPATIAL_AXES if getattr(self, n) > 1)
        return f"sample={s},channel={self.channel},filter={self.filter}{sp}"

    def to_dict(self) -> dict:
        """The fields; ``height``/``width`` only when above 1 (older plan files stay as they
        were)."""
        d = {"sample": self.sample, "channel": self.channel, "filter": self.filter}
        d.update({n: getattr(self, n) for n in SPATIAL_AXES if getattr(self, n) > 1})
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
                raise ValueError(f"strategy {self} needs a multiple of {'*'.join(names)} = "
                                 f"{cf} ranks, but there are {nranks}")
            return (nranks // cf,) + rest
        if self.sample * cf != nranks:
            nums = "*".join(str(v) for v in (self.sample,) + rest)
            raise ValueError(f"strategy {self} needs sample*{'*'.join(names)} = {nums} = "
                             f"{self.sample * cf} ranks, but there are {nranks}")
        return (self.sample,) + rest

    def grid(self, comm=None):
        """The (cached) :class:`ProcessGrid` of this strategy on ``comm`` (default: world)."""
        c = _comm.wrap(comm)
        return get_grid(self.resolve(c.size), self.axes(), c)

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
