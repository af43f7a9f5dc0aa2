"""The planner's per-layer event lists (planner/events.py, the fast path the search uses)
against the real layers run shape-only (planner/realrun.py), rank by rank, without MPI.

``tests/test_planner_comm.py`` checks both against ``comm.stats()`` of real MPI runs at
1-4 ranks; this checks the fast path against the layers' own code at more rank counts
and every strategy, so that a change in a layer's algorithm that the hand-written lists
miss fails here."""
import pytest

from distconv.planner import events
from distconv.planner.costs import factorizations
from distconv.planner.events import act_dist, layer_events
from distconv.planner.graph import LayerSpec
from distconv.planner.realrun import run_layer


def _conv(k, stride, bias):
    ho = (6 + 2 * (k // 2) - k) // stride + 1
    wo = (5 + 2 * (k // 2) - k) // stride + 1
    return LayerSpec("c", "conv", (5, 7, 6, 5), (5, 9, ho, wo), dict(
        in_channels=7, out_channels=9, kernel_size=(k, k), stride=(stride, stride),
        padding=(k // 2, k // 2), dilation=(1, 1), bias=bias))


LAYERS = {
    "conv3x3s2_bias": _conv(3, 2, True),
    "conv1x1": _conv(1, 1, False),
    "linear": LayerSpec("l", "linear", (5, 11), (5, 6),
                        dict(in_features=11, out_features=6, bias=True)),
    "bn": LayerSpec("b", "bn", (5, 7, 6, 5), (5, 7, 6, 5), {"affine": True}),
}


def _moving(evs):
    """The collectives that move bytes between ranks (what both sides must agree on)."""
    return [(e.kind, e.group, e.sent, e.recv) for e in evs
            if len(e.group) > 1 and (e.sent or e.recv)]


def differences(p, name):
    lay = LAYERS[name]
    nd = len(lay.in_shape)
    fs = factorizations(p)
    out = []
    for st in fs:
        for st_in in fs:
            d = act_dist(st_in, nd)
            for r in range(p):
                fast = layer_events(lay, st, d, r, 8)
                real = run_layer(lay, st, d, p, r, 8)
                if any(_moving(a) != _moving(b) for a, b in zip(fast[:3], real[:3])):
                    out.append((st, st_in, r))
    return out


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("p", [1, 2, 3, 4, 6, 8])
def test_event_lists_equal_the_layers_run_shape_only(p, name):
    assert differences(p, name) == []


def test_negative_control_a_missing_reduction_is_caught(monkeypatch):
    # the conv's input gradient as if it were not pending over filter (no reduction)
    monkeypatch.setattr(events, "_xc_pending", events._xc)
    assert differences(4, "conv1x1")
