"""The planner's per-layer event lists (planner/events.py: each layer's moves recorded once
per strategy on canonical sizes by planner/layermoves.py, then priced per rank) against
the real layers run shape-only on the real sizes (planner/realrun.py), rank by rank,
without MPI.

``tests/test_planner_comm.py`` checks both against ``comm.stats()`` of real MPI runs at
1-4 ranks; this checks the fast path against the layers' own code at more rank counts
and every strategy, so that a move the recording misses or misnames fails here."""
import pytest

from distconv.planner import layermoves
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
    # layers without a strategy: recorded per input layout
    "flatten": LayerSpec("f", "flatten", (5, 7, 3, 2), (5, 42), {}),
    "flatten1x1": LayerSpec("f", "flatten", (5, 7, 1, 1), (5, 7), {}),
    "maxpool": LayerSpec("m", "maxpool", (5, 7, 6, 5), (5, 7, 3, 3), dict(
        kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), ceil_mode=False)),
    "gap": LayerSpec("g", "gap", (5, 7, 6, 5), (5, 7, 1, 1), {}),
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
    for st in fs if lay.strategic else [None]:
        for st_in in fs:
            d = act_dist(st_in, nd)
            for r in range(p):
                fast = layer_events(lay, st, d, r, 8)
                real = run_layer(lay, st, d, p, r, 8)
                if any(_moving(a) != _moving(b) for a, b in zip(fast[:3], real[:3])) or \
                        _where(fast[3]) != _where(real[3]):
                    out.append((st, st_in, r))
    return out


def _where(d):
    return d.grid.shape, d.grid.names, d.split, d.pending


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("p", [1, 2, 3, 4, 6, 8])
def test_event_lists_equal_the_layers_run_shape_only(p, name):
    assert differences(p, name) == []


def test_negative_control_input_layout_ignored_is_caught(monkeypatch):
    # the entry moves priced as if the input always arrived where the layer computes
    orig = layermoves.LayerMoves.entry_events
    monkeypatch.setattr(layermoves.LayerMoves, "entry_events",
                        lambda self, layer, in_dist, rank: orig(self, layer, self.out_dist, rank))
    assert differences(4, "conv1x1")


def test_negative_control_output_sizes_named_as_input_sizes(monkeypatch):
    # every moved dim named by the input's dim at the same index (C for K): the output's
    # and the weight's moves priced with the wrong channel count
    orig = layermoves._dim_names
    monkeypatch.setattr(layermoves, "_dim_names", lambda i, o, base: {
        s: ("x", k) for s, (_, k) in orig(i, o, base).items()})
    layermoves.clear_cache()
    try:
        assert differences(2, "conv1x1")
    finally:
        layermoves.clear_cache()
