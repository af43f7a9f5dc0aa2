"""The planner's cache keys beyond EXACT_RANKS ranks give the events of uncached real runs.

Beyond :data:`distconv.planner.commmodel.EXACT_RANKS` ranks the planner evaluates rank 0
alone and keys a move between two grids by rank 0's blocks
(:func:`distconv.planner.commmodel.move_key`), and a layer's entry, a residual join and a
cat share by rank 0's block of their input (``costs._phys_layout``). These tests fill the
caches in a shuffled order (so that later calls are answered by entries another
argument set made) and compare every answer with the real ``_move`` run afresh
(``run_move``), at rank counts with uneven blocks. The negative controls show that a key
that drops what the events depend on is caught.
"""
import random

import pytest

from distconv.distribution import Distribution
from distconv.planner import commmodel
from distconv.planner.commmodel import EXACT_RANKS, VGrid, redistribute_events, run_move
from distconv.planner.costs import CostModel, factorizations

SHAPE = (37, 45, 5, 3)  # nothing divides evenly


def layouts(p):
    """Between-layer distributions, a conv's entry layouts with and without a pending
    axis, and an output layout, on every (s, c, f) grid of ``p`` ranks."""
    out = []
    for st in factorizations(p):
        g = VGrid(st)
        rest = [None, None]
        act = Distribution(g, [("sample",), ("channel", "filter")] + rest)
        xc = Distribution(g, [("sample",), ("channel",)] + rest)
        out += [act, xc, xc.replace(pending=("filter",)),
                Distribution(g, [("sample",), ("filter",)] + rest).replace(pending=("channel",)),
                Distribution(g, [("sample", "channel"), None] + rest)]
    return out


def pairs(p, n, seed):
    lay = layouts(p)
    rng = random.Random(seed)
    return [(rng.choice(lay), rng.choice(lay)) for _ in range(n)]


def check_keyed(p, n, seed, item=4):
    """Every keyed answer equals a fresh run; returns how many were answered by an entry
    that another argument set made."""
    commmodel._MOVES.clear()
    made: dict = {}
    shared = 0
    for src, dst in pairs(p, n, seed):
        key = commmodel.move_key(SHAPE, src, dst, 0, item)
        if key in made and made[key] != (src, dst):
            shared += 1
        made.setdefault(key, (src, dst))
        got = redistribute_events(SHAPE, src, dst, 0, item)
        want = list(run_move(SHAPE, src, dst, 0, item))
        assert got == want, (src, dst, got, want)
    return shared


@pytest.mark.parametrize("p", [EXACT_RANKS + 8, 36, 64])
def test_keyed_moves_equal_fresh_runs(p):
    assert p > EXACT_RANKS
    shared = check_keyed(p, 600, seed=p)
    assert shared > 50  # the shortcut keys were exercised, not just the full ones


def test_within_exact_ranks_every_rank_keyed_in_full():
    src, dst = pairs(12, 1, seed=0)[0]
    for r in range(12):
        assert commmodel.move_key(SHAPE, src, dst, r, 4)[:5] == (SHAPE, src, dst, r, 4)


def test_negative_control_a_key_without_the_target_block_is_caught(monkeypatch):
    real = commmodel.move_key

    def coarse(shape, src, dst, rank, item):
        k = real(shape, src, dst, rank, item)
        return k[:4] + k[5:] if k[0] == "x" else k  # drops rank 0's target block

    monkeypatch.setattr(commmodel, "move_key", coarse)
    with pytest.raises(AssertionError):
        check_keyed(36, 600, seed=36)


def _entry_reference(cost, layer, st, d):
    """``_entry_cost`` recomputed with every move run afresh and no layout key."""
    from distconv.planner import events
    saved = events.redistribute_events
    events.redistribute_events = lambda *a: list(run_move(*a))
    try:
        per = [events.entry_events(layer, st, d, 0, cost.item)]
        return tuple(cost.events_time([x[i] for x in per]) for i in range(2))
    finally:
        events.redistribute_events = saved


@pytest.mark.parametrize("kind", ["conv", "bn"])
def test_entry_costs_keyed_by_rank0_block_equal_fresh(kind):
    from distconv.planner.graph import LayerSpec
    p = 36
    if kind == "conv":
        layer = LayerSpec("c", "conv", SHAPE, (37, 7, 5, 3),
                          dict(in_channels=45, out_channels=7, kernel_size=(3, 3),
                               stride=(1, 1), padding=(1, 1), dilation=(1, 1), bias=False))
    else:
        layer = LayerSpec("b", "bn", SHAPE, SHAPE, {})
    cost = CostModel(None, p)
    sts = factorizations(p)
    acts = [Distribution(VGrid(st), [("sample",), ("channel", "filter"), None, None])
            for st in sts]
    rng = random.Random(1)
    checked = 0
    for _ in range(250):
        st, d = rng.choice(sts), rng.choice(acts)
        assert cost._entry_cost(layer, st, d) == _entry_reference(cost, layer, st, d)
        checked += 1
    assert len(cost._entry) < checked  # answers were shared between layouts


def test_negative_control_a_layout_key_without_the_block_is_caught(monkeypatch):
    from distconv.planner import costs
    real = costs._phys_layout

    def coarse(d, shape):
        k = real(d, shape)
        return ("box",) + k[2:] if k and k[0] == "box" else k  # drops rank 0's block

    monkeypatch.setattr(costs, "_phys_layout", coarse)
    with pytest.raises(AssertionError):
        test_entry_costs_keyed_by_rank0_block_equal_fresh("conv")
