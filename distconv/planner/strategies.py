"""The planner's strategies: named tuples of :class:`distconv.Strategy`'s fields --
:class:`Split` ``(sample, channel, filter)``, :class:`SpatialSplit` with ``height`` and
``width`` too, and, for a layer placed on a subset of the job's ranks (operator
placement), :class:`Placed` with its ``ranks`` and the job's size ``world``. Tuples, so
they hash and compare as fast as plain ones (and equal the plain tuples of the same
numbers, which plan files and tests write). The candidates on ``p`` ranks
(:func:`factorizations`), the contiguous halves and quarters of a job
(:func:`rank_sets`), and their text forms.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple


class Split(NamedTuple):
    """``sample x channel x filter`` ranks, H and W not split."""

    sample: int
    channel: int
    filter: int


class SpatialSplit(NamedTuple):
    """``sample x channel x filter x height x width`` ranks."""

    sample: int
    channel: int
    filter: int
    height: int
    width: int


class Placed(NamedTuple):
    """A strategy on the world ranks ``ranks`` of a job of ``world`` ranks
    (:class:`distconv.Strategy` with ``ranks``); ``s*c*f*h*w == len(ranks)``. A tuple, so
    it hashes and compares as fast as the unplaced ones."""

    sample: int
    channel: int
    filter: int
    height: int
    width: int
    ranks: Tuple[int, ...]
    world: int


def factorizations(p: int, spatial: bool = False) -> list:
    """Every ``(s, c, f)`` with ``s*c*f == p``, sample-major order; with ``spatial`` also
    every ``(s, 1, 1, h, w)`` with ``s*h*w == p`` and ``h*w > 1`` (a split of H and W,
    :class:`distconv.Strategy`'s ``height`` and ``width``)."""
    out = [Split(s, c, p // (s * c)) for s in range(p, 0, -1) for c in range(1, p // s + 1)
           if p % s == 0 and (p // s) % c == 0]
    if spatial:
        out += [SpatialSplit(s, 1, 1, h, p // (s * h)) for s in range(p, 0, -1)
                for h in range(1, p // s + 1) if p % s == 0 and (p // s) % h == 0 and p // s > 1]
    return out


def placed_factorizations(ranks, world: int) -> list:
    """Every :class:`Placed` ``(s, c, f, 1, 1, ranks, world)`` with ``s*c*f == len(ranks)``
    (the order of :func:`factorizations`)."""
    ranks = tuple(int(r) for r in ranks)
    return [Placed(s, c, f, 1, 1, ranks, int(world)) for s, c, f in factorizations(len(ranks))]


def rank_sets(p: int) -> list:
    """The contiguous halves and quarters of a job of ``p`` ranks (those that divide it),
    halves first: ``[(0..p/2-1), (p/2..p-1), (0..p/4-1), ...]``."""
    out = []
    for parts in (2, 4):
        if p % parts == 0 and p >= parts:
            q = p // parts
            out += [tuple(range(k * q, (k + 1) * q)) for k in range(parts)]
    return out


def partitions(p: int, n: int) -> list:
    """The ways to give ``n`` branches disjoint contiguous halves and quarters that together
    cover all ``p`` ranks, in branch order from rank 0: ``[[ranks of branch 0, ...], ...]``
    (2 branches: the two halves; 3: one half and two quarters, the half to any branch; 4:
    the four quarters; none for other ``n`` or a ``p`` they do not divide)."""
    if n == 2 and p % 2 == 0 and p >= 2:
        sizes = [[p // 2, p // 2]]
    elif n == 3 and p % 4 == 0:
        sizes = [[p // 4] * 3 for _ in range(3)]
        for i in range(3):
            sizes[i][i] = p // 2
    elif n == 4 and p % 4 == 0:
        sizes = [[p // 4] * 4]
    else:
        return []
    out = []
    for sz in sizes:
        sets, at = [], 0
        for q in sz:
            sets.append(tuple(range(at, at + q)))
            at += q
        out.append(sets)
    return out


def as_strategy(st):
    """``st`` as a hashable strategy tuple (a list from JSON becomes a :class:`Split` or
    :class:`SpatialSplit`; a tuple stays as it is)."""
    if isinstance(st, tuple):
        return st
    return Split(*st) if len(st) == 3 else SpatialSplit(*st)


def placement(st):
    """The world ranks of a placed strategy, ``None`` for one on every rank."""
    return st.ranks if isinstance(st, Placed) else None


def grid_shape(st) -> tuple:
    """The grid shape of a strategy tuple: ``(s, c, f)``, or ``(s, c, f, h, w)`` when it
    splits H or W."""
    return tuple(st[:5]) if is_spatial(st) else tuple(st[:3])


def to_strategy(st):
    """The :class:`distconv.Strategy` of a strategy tuple ``(s, c, f)``,
    ``(s, c, f, h, w)`` or :class:`Placed`."""
    from ..strategy import Strategy
    return Strategy(*(int(v) for v in st[:5]), ranks=placement(st))


def strategy_text(st) -> str:
    """``"sample=s,channel=c,filter=f"`` (plus ``height``/``width`` when above 1 and
    ``ranks`` when placed)."""
    return str(to_strategy(st))


def strategy_short(st) -> str:
    """``"s2 c1 f2"`` (plus ``" h2 w2"`` for a split of H or W and ``" @0-3"`` for a
    placed strategy) for tables."""
    s = to_strategy(st)
    out = f"s{s.sample} c{s.channel} f{s.filter}"
    if s.spatial:
        out += f" h{s.height} w{s.width}"
    if isinstance(st, Placed):
        from ..strategy import format_ranks
        out += f" @{format_ranks(st.ranks)}"
    return out


def parse_strategy(text, world=None) -> tuple:
    """``"sample=2,channel=1,filter=1"`` (all three given) -> ``(2, 1, 1)``; a spatial
    strategy (``height``/``width`` above 1) -> ``(s, c, f, h, w)``; one with ``ranks`` ->
    :class:`Placed` in a job of ``world`` ranks (default: up to its highest rank)."""
    from ..strategy import Strategy
    s = Strategy.parse(text) if isinstance(text, str) else Strategy(**text)
    if s.sample is None:
        raise ValueError(f"a plan entry must name sample, channel and filter, got {text!r}")
    if s.ranks is not None:
        if world is None:
            world = max(s.ranks) + 1
        s.check(int(world))
        return Placed(s.sample, s.channel, s.filter, s.height, s.width, tuple(s.ranks),
                      int(world))
    if s.spatial:
        return SpatialSplit(s.sample, s.channel, s.filter, s.height, s.width)
    return Split(s.sample, s.channel, s.filter)


def from_strategy(s, world: int) -> tuple:
    """The planner's tuple of :class:`distconv.Strategy` ``s`` in a job of ``world`` ranks
    (``sample=None`` resolved over its rank set; ``ValueError`` if it does not fit)."""
    shape = s.check(int(world))
    if s.ranks is not None:
        return Placed(*(tuple(shape) + (1, 1))[:5], tuple(s.ranks), int(world))
    return Split(*shape) if len(shape) == 3 else SpatialSplit(*shape)


def is_spatial(st) -> bool:
    """True for a strategy tuple that splits H or W (``h*w > 1``)."""
    return st is not None and len(st) >= 5 and st[3] * st[4] > 1
