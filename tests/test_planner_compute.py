"""Tests of the planner's local compute model (distconv.planner.compute).

Measurements are tiny (the machine is shared); only ratios loose enough for a noisy
machine are asserted on measured times. Everything with measure=False is exact.
"""
import json

import pytest

from distconv.planner.compute import ComputeModel, FAMILIES, _fit_line, work

CONV = (2, 8, 12, 12, 8, 3, 1, 1, 1)  # n, c, h, w, f, kernel, stride, padding, dilation
KEY = "conv_fwd|n=2,c=8,h=12,w=12,f=8,k=3x3,s=1x1,p=1x1,d=1x1|float32|numpy|t1"


def model(**kw):
    kw.setdefault("threads", 1)
    kw.setdefault("dtype", "float32")
    kw.setdefault("backend", "numpy")
    return ComputeModel(**kw)


def test_measured_conv_is_cached_and_round_trips(tmp_path):
    path = tmp_path / "compute.json"
    m = model(cache_path=path, reps=2)
    t = m.conv(*CONV)
    assert len(t) == 3 and all(x > 0 for x in t)
    assert (m.measured, m.hits) == (3, 0)
    assert m.conv(*CONV) == t  # second call: cache hits, no new measurement
    assert (m.measured, m.hits) == (3, 3)
    assert KEY in m.entries
    m.save()
    d = json.loads(path.read_text())
    assert d["format"] == 1 and d["entries"][KEY] == t[0]
    assert "float32|numpy|t1" in d["rates"]
    fresh = model(cache_path=path, measure=False)
    assert fresh.conv(*CONV) == t
    assert (fresh.measured, fresh.hits) == (0, 3)
    # another dtype is another key: predicted, not taken from the float32 entries
    other = model(cache_path=path, measure=False, dtype="float64")
    assert other.conv(*CONV) != t and other.hits == 0


def test_save_keeps_entries_written_by_others(tmp_path):
    path = tmp_path / "c.json"
    a, b = model(cache_path=path, reps=1), model(cache_path=path, reps=1)
    a.relu(64)
    a.save()
    b.add(64)
    b.save()
    entries = json.loads(path.read_text())["entries"]
    assert any(k.startswith("relu_fwd|numel=64|") for k in entries)
    assert any(k.startswith("add|numel=64|") for k in entries)
    assert not list(tmp_path.glob(".compute-*"))  # no temp file left behind


def test_zero_extent_shards_cost_nothing():
    m = model(reps=1)
    assert m.conv(0, 8, 12, 12, 8, 3, 1, 1, 1) == (0.0, 0.0, 0.0)
    assert m.conv(2, 8, 12, 12, 0, 3, 1, 1, 1) == (0.0, 0.0, 0.0)
    assert m.conv(2, 0, 12, 12, 8, 3, 1, 1, 1) == (0.0, 0.0, 0.0)
    assert m.linear(4, 0, 10) == (0.0, 0.0, 0.0)
    assert m.bn(0, 4, 5, 5) == (0.0, 0.0)
    assert m.relu(0) == (0.0, 0.0)
    assert m.maxpool(2, 0, 8, 8, 2, 2, 0) == (0.0, 0.0)
    assert m.avgpool(0, 4, 8, 8, 2, 2, 0) == (0.0, 0.0)
    assert m.global_avgpool(2, 0, 4, 4) == (0.0, 0.0)
    assert m.add(0) == 0.0 and m.update(0) == 0.0 and m.update(0, "adam") == 0.0
    assert m.measured == 0


def test_fit_line_recovers_exact_rates():
    pts = [(w, 1e-5 + w / 2e9) for w in (1e5, 1e6, 1e7, 1e8)]
    r = _fit_line(pts)
    assert r["t0"] == pytest.approx(1e-5, rel=1e-6) and r["rate"] == pytest.approx(2e9, rel=1e-6)
    assert _fit_line([(1.0, 2.0), (2.0, 1.0), (3.0, 0.5)]) is None  # no positive slope


def test_fitted_conv_model(tmp_path):
    path = tmp_path / "c.json"
    m = model(cache_path=path, reps=3)
    shapes = [(1, 4, 8, 8, 4), (2, 8, 12, 12, 8), (2, 16, 16, 16, 16), (4, 16, 16, 16, 32),
              (4, 32, 16, 16, 32)]
    measured = [m.conv(*s, 3, 1, 1, 1) for s in shapes]
    rates = m.fit()
    for fam in ("conv_fwd", "conv_bwd_data", "conv_bwd_filter"):
        assert rates[fam]["rate"] > 0 and rates[fam]["t0"] >= 0
    m.save()
    pred = model(cache_path=path, measure=False)  # refits from the loaded cache
    assert pred.rates["conv_fwd"] == rates["conv_fwd"]
    # unmeasured shapes: predictions grow with the flops
    grow = [pred.conv(4, c, 16, 16, 64, 3, 1, 1, 1) for c in (8, 32, 128)]
    assert pred.measured == 0 and pred.hits == 0
    for i in range(3):
        assert grow[0][i] < grow[1][i] < grow[2][i]
    # the fitted model reproduces the largest measured shape within a factor of 3
    n, c, h, w, f = shapes[-1]
    args = dict(n=n, c=c, h=h, w=w, f=f, k=(3, 3), s=(1, 1), p=(1, 1), d=(1, 1))
    for i, fam in enumerate(("conv_fwd", "conv_bwd_data", "conv_bwd_filter")):
        p = pred.predict(fam, work(fam, args, 4))
        assert measured[-1][i] / 3 < p < measured[-1][i] * 3, (fam, p, measured[-1][i])
    # negative control: a deliberately wrong rate gives a very different prediction
    wrong = model(measure=False, rates={"conv": {"t0": 0, "rate": 1e3}})
    assert wrong.conv(*shapes[-1], 3, 1, 1, 1)[0] > 100 * measured[-1][0]


def test_scale_doubles_every_time(tmp_path):
    calls = [("conv", CONV), ("linear", (8, 16, 4)), ("bn", (2, 4, 6, 6)), ("relu", (100,)),
             ("maxpool", (2, 4, 8, 8, 3, 2, 1)), ("avgpool", (2, 4, 8, 8, 2, None, 0)),
             ("global_avgpool", (2, 4, 4, 4)), ("add", (100,)), ("update", (100, "adam"))]
    one, two = model(measure=False), model(measure=False, scale=2)
    for name, args in calls:
        a, b = getattr(one, name)(*args), getattr(two, name)(*args)
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        assert all(y == pytest.approx(2 * x, rel=1e-12) and x > 0 for x, y in zip(a, b)), name
    # also on measured (cached) times
    path = tmp_path / "c.json"
    m = model(cache_path=path, reps=1)
    t = m.relu(256)
    m.save()
    t2 = model(cache_path=path, measure=False, scale=2).relu(256)
    assert t2 == pytest.approx(tuple(2 * x for x in t))


def test_measure_off_is_deterministic_and_rates_override():
    a, b = model(measure=False), model(measure=False)
    assert a.conv(*CONV) == b.conv(*CONV) and a.bn(4, 8, 6, 6) == b.bn(4, 8, 6, 6)
    # the default CPU core: 50 GFLOP/s + 20 us per pass
    flops = 2 * 2 * 8 * 8 * 9 * 12 * 12
    assert a.conv(*CONV)[0] == pytest.approx(20e-6 + flops / 50e9)
    # kind < group < family: the most specific name wins
    r = model(measure=False, rates={"memory": {"t0": 0, "rate": 1e12},
                                    "relu": {"t0": 1.0, "rate": 1e12},
                                    "relu_bwd": {"t0": 2.0, "rate": 1e12}})
    assert r.relu(10) == pytest.approx((1.0, 2.0))
    assert r.add(10) == pytest.approx(3 * 10 * 4 / 1e12)
    assert r.conv(*CONV) == a.conv(*CONV)  # flops families untouched
    with pytest.raises(ValueError):
        model(measure=False, rates={"conv": {"t0": 0, "rate": 0}})
    with pytest.warns(UserWarning, match="unknown"):
        model(measure=False, rates={"nonsense": {"t0": 0, "rate": 1}})


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 99, "entries": {}}',
                                     '{"format": 1, "entries": {"k": "x"}}'])
def test_corrupt_cache_warns_and_starts_empty(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.warns(UserWarning, match="bad.json"):
        m = model(cache_path=path, measure=False)
    assert m.entries == {}
    assert m.conv(*CONV)[0] > 0  # still predicts


def test_all_ops_measure_on_tiny_shapes():
    m = model(reps=1)
    out = {
        "linear": m.linear(4, 16, 8),
        "bn": m.bn(2, 3, 4, 4),
        "relu": m.relu(50),
        "maxpool": m.maxpool(2, 3, 8, 8, 3, 2, 1),
        "avgpool": m.avgpool(2, 3, 8, 8, 2, None, 0),
        "global_avgpool": m.global_avgpool(2, 3, 4, 4),
        "adaptive_avgpool": m.adaptive_avgpool(2, 3, 5, 5, 3, 3),
        "conv_s2": m.conv(2, 3, 9, 9, 4, (3, 1), 2, (1, 0), 1),
    }
    for name, t in out.items():
        assert all(isinstance(x, float) and x > 0 for x in t), name
    add, sgd, adam = m.add(50), m.update(50), m.update(50, "adam")
    assert all(isinstance(x, float) and x > 0 for x in (add, sgd, adam))
    assert m.measured == 3 + 2 * 6 + 3 + 3
    assert {k.split("|")[0] for k in m.entries} == set(FAMILIES)
    with pytest.raises(ValueError):
        m.update(10, "rmsprop")


def _scripted(cm, values):
    """Replace ``cm._measured`` by a script: each call returns the next value per family."""
    it = iter(values)
    calls = []

    def fake(families, measure_fn):
        calls.append(tuple(families))
        v = next(it)
        return {f: v for f in families}
    cm._measured = fake
    return calls


def test_refine_takes_the_median_of_the_rounds():
    cm = ComputeModel(measure=True, rounds=3, dtype="float32", backend="numpy")
    # first round: a measured 9.0 (a slow moment of the VM), b 1.0; then two sweeps over
    # both: a 2.0, b 1.5, a 3.0, b 0.5
    calls = _scripted(cm, [9.0, 1.0, 2.0, 1.5, 3.0, 0.5])
    a = cm.relu(1000)
    b = cm.relu(2000)
    assert a == (9.0, 9.0) and b == (1.0, 1.0)
    assert cm.refine() == 4  # two families (relu_fwd, relu_bwd) of two shapes
    # sweeps: a, b, a, b (not a, a, b, b): every shape is timed once per round
    assert len(calls) == 6 and calls[2] == calls[0] and calls[3] == calls[1]
    assert cm.relu(1000) == (3.0, 3.0)  # median of 9, 2, 3
    assert cm.relu(2000) == (1.0, 1.0)  # median of 1, 1.5, 0.5
    assert cm.refine() == 0  # nothing new measured since
    assert len(calls) == 6


def test_refine_with_one_round_or_cached_entries_changes_nothing(tmp_path):
    cm = ComputeModel(measure=True, rounds=1, dtype="float32", backend="numpy")
    _scripted(cm, [4.0])
    cm.relu(1000)
    assert cm.refine() == 0 and cm.relu(1000) == (4.0, 4.0)
    # a cache hit is not re-timed
    path = tmp_path / "c.json"
    cm.cache_path = str(path)
    cm.save()
    cm2 = ComputeModel(cache_path=path, measure=True, rounds=3, dtype="float32",
                       backend="numpy")
    calls = _scripted(cm2, [])
    assert cm2.relu(1000) == (4.0, 4.0)
    assert cm2.refine() == 0 and calls == []


def test_plan_model_refines_a_measuring_compute_model():
    """plan_model with rounds > 1: every kernel entry is timed ``rounds`` times and the
    plan is searched on the medians (a cost model built after the refinement)."""
    from distconv import nn
    from distconv.planner.auto import plan_model
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1))
    cm = ComputeModel(measure=True, rounds=2, reps=1, dtype="float32", backend="numpy")
    seen = []
    real = cm._measured

    def counting(families, fn):
        seen.append(tuple(families))
        return real(families, fn)
    cm._measured = counting
    res = plan_model(model, (2, 3, 6, 6), 2, memory_limit=float("inf"), compute=cm)
    kernel_calls = [f for f in seen if f]  # () are layer-overhead measurements
    assert kernel_calls and len(kernel_calls) % 2 == 0
    first = kernel_calls[:len(kernel_calls) // 2]
    assert kernel_calls[len(kernel_calls) // 2:] == first  # one more sweep, same order
    assert cm._recipes == {}
    assert res["plan"] and res["predicted"]["step_s"] > 0
