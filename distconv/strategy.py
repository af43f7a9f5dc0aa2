"""Strategy: how one layer splits its work over the ranks.

``Strategy(sample=s, channel=c, filter=f)`` puts the ranks on an ``s×c×f``
grid named ``("sample", "channel", "filter")`` (sample outermost).
``sample=None`` takes the ranks the other two leave. Activations between
layers are split on N over ``sample`` and on C (or features) over
``(channel, filter)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import comm as _comm
from .distribution import Distribution
from .grid import get_grid

AXES = ("sample", "channel", "filter")


@dataclass(frozen=True)
class Strategy:
    """Split of a layer's work: ``sample`` groups × ``channel`` groups × ``filter`` groups."""

    sample: Optional[int] = None
    channel: int = 1
    filter: int = 1

    def __post_init__(self):
        for name in AXES:
            v = getattr(self, name)
            if v is None and name == "sample":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Strategy {name} must be a positive integer, got {v!r}")

    # ------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, text: str) -> "Strategy":
        """``"sample=2,channel=2"`` -> ``Strategy(sample=2, channel=2)``; names may be
        abbreviated to ``s``, ``c``, ``f``; empty text or ``"sample"`` means data parallel."""
        text = (text or "").strip()
        if text in ("", "sample", "data"):
            return cls()
        kw = {}
        short = {"s": "sample", "c": "channel", "f": "filter"}
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"cannot parse strategy {text!r}: expected key=value pairs "
                                 f"like 'sample=2,channel=2', got {part!r}")
            k, v = part.split("=", 1)
            k = short.get(k, k)
            if k not in AXES:
                raise ValueError(f"cannot parse strategy {text!r}: unknown key {k!r} "
                                 f"(expected sample, channel or filter)")
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
        return f"sample={s},channel={self.channel},filter={self.filter}"

    def to_dict(self) -> dict:
        return {"sample": self.sample, "channel": self.channel, "filter": self.filter}

    # ------------------------------------------------------------- grids
    def resolve(self, nranks: int) -> tuple[int, int, int]:
        """``(s, c, f)`` for ``nranks`` ranks; ``ValueError`` naming the numbers if not."""
        cf = self.channel * self.filter
        if self.sample is None:
            if nranks % cf:
                raise ValueError(f"strategy {self} needs a multiple of channel*filter = {cf} "
                                 f"ranks, but there are {nranks}")
            return nranks // cf, self.channel, self.filter
        if self.sample * cf != nranks:
            raise ValueError(f"strategy {self} needs sample*channel*filter = "
                             f"{self.sample}*{self.channel}*{self.filter} = {self.sample * cf} "
                             f"ranks, but there are {nranks}")
        return self.sample, self.channel, self.filter

    def grid(self, comm=None):
        """The (cached) :class:`ProcessGrid` of this strategy on ``comm`` (default: world)."""
        c = _comm.wrap(comm)
        return get_grid(self.resolve(c.size), AXES, c)

    def activation_distribution(self, ndim: int = 4, comm=None) -> Distribution:
        """Between-layer layout: dim 0 split over sample, dim 1 over (channel, filter)."""
        g = self.grid(comm)
        split = [("sample",), ("channel", "filter")] + [None] * (ndim - 2)
        return Distribution(g, split[:ndim] if ndim >= 2 else [("sample",)])
