"""The planner's strategy tuples: ``(s, c, f)`` (sample, channel, filter) and, for a split
of height and width, ``(s, c, f, h, w)`` -- :class:`distconv.Strategy`'s fields in order.
The candidates on ``p`` ranks (:func:`factorizations`), and their text forms.
"""
from __future__ import annotations


def factorizations(p: int, spatial: bool = False) -> list:
    """Every ``(s, c, f)`` with ``s*c*f == p``, sample-major order; with ``spatial`` also
    every ``(s, 1, 1, h, w)`` with ``s*h*w == p`` and ``h*w > 1`` (a split of H and W,
    :class:`distconv.Strategy`'s ``height`` and ``width``)."""
    out = [(s, c, p // (s * c)) for s in range(p, 0, -1) for c in range(1, p // s + 1)
           if p % s == 0 and (p // s) % c == 0]
    if spatial:
        out += [(s, 1, 1, h, p // (s * h)) for s in range(p, 0, -1) for h in range(1, p // s + 1)
                if p % s == 0 and (p // s) % h == 0 and p // s > 1]
    return out


def to_strategy(st):
    """The :class:`distconv.Strategy` of a strategy tuple ``(s, c, f)`` or
    ``(s, c, f, h, w)``."""
    from ..strategy import Strategy
    return Strategy(*(int(v) for v in st))


def strategy_text(st) -> str:
    """``"sample=s,channel=c,filter=f"`` (plus ``height``/``width`` when above 1)."""
    return str(to_strategy(st))


def strategy_short(st) -> str:
    """``"s2 c1 f2"`` (plus ``" h2 w2"`` for a split of H or W) for tables."""
    out = f"s{st[0]} c{st[1]} f{st[2]}"
    if len(st) == 5 and st[3] * st[4] > 1:
        out += f" h{st[3]} w{st[4]}"
    return out


def parse_strategy(text) -> tuple:
    """``"sample=2,channel=1,filter=1"`` (all three given) -> ``(2, 1, 1)``; a spatial
    strategy (``height``/``width`` above 1) -> ``(s, c, f, h, w)``."""
    from ..strategy import Strategy
    s = Strategy.parse(text) if isinstance(text, str) else Strategy(**text)
    if s.sample is None:
        raise ValueError(f"a plan entry must name sample, channel and filter, got {text!r}")
    if s.spatial:
        return (s.sample, s.channel, s.filter, s.height, s.width)
    return (s.sample, s.channel, s.filter)


def is_spatial(st) -> bool:
    """True for a strategy tuple that splits H or W (``(s, c, f, h, w)``, ``h*w > 1``)."""
    return st is not None and len(st) == 5 and st[3] * st[4] > 1
