"""distconv.planner.auto.plan_model: which candidate it returns.

The searched plans, data parallelism and every uniform plan (one (s, c, f) for all
layers) are simulated; a mixed plan is returned only if it beats every uniform plan by
more than ``min_gain``. The fixture (a wide-ResNet-like model on the shipped dev_2core
machine, fitted kernel times: deterministic) has a mixed plan predicted ~1-2% faster
than the best uniform plan on 2 and 4 ranks.
"""
import pytest

from distconv.models.resnet import BasicBlock, ResNet
from distconv.planner import auto
from distconv.planner import machine as mach
from distconv.planner.simulate import simulate


def _model():
    return ResNet(BasicBlock, [1, 1], num_classes=10, in_channels=3, stem="cifar",
                  base_width=64)


def _plan(p, **kw):
    m = mach.Machine.load(mach.builtin("dev_2core"))
    kw.setdefault("memory_limit", float("inf"))
    return auto.plan_model(_model(), (4, 3, 8, 8), p, m, **kw)


@pytest.mark.parametrize("p", [2, 4])
def test_min_gain_zero_returns_the_fastest_predicted_mixed_plan(p):
    r = _plan(p, min_gain=0.0)
    assert r["chosen"] == r["fastest"] and r["chosen"].startswith("search")
    assert len(set(r["plan"].values())) > 1  # mixed
    assert r["predicted"]["step_s"] == min(r["candidates"].values())


@pytest.mark.parametrize("p", [2, 4])
def test_default_min_gain_prefers_a_uniform_plan_within_it(p):
    fast = _plan(p, min_gain=0.0)
    r = _plan(p)
    assert r["min_gain"] == auto.MIN_GAIN
    assert r["chosen"].startswith("uniform ")
    (st,) = set(r["plan"].values())  # one strategy everywhere
    assert r["chosen"] == "uniform " + ",".join(
        f"{k}={v}" for k, v in zip(("sample", "channel", "filter"), st))
    # it is the fastest uniform plan, and the mixed one is faster by less than min_gain
    gain = r["predicted"]["step_s"] / fast["predicted"]["step_s"] - 1
    assert 0 < gain <= auto.MIN_GAIN
    cost = r["cost"]
    names = r["graph"].strategic_names()
    for other in cost.strategies:
        t = simulate(cost, {n: other for n in names})["step_s"]
        assert t >= r["predicted"]["step_s"] - 1e-15
    # the fastest mixed plan is still reported
    assert r["fastest"] == fast["chosen"]
    assert r["candidates"][r["fastest"]] == pytest.approx(fast["predicted"]["step_s"])


def test_negative_control_a_gain_above_min_gain_keeps_the_mixed_plan():
    fast = _plan(2, min_gain=0.0)
    best_uniform = min(v for k, v in fast["candidates"].items()
                       if k.startswith("uniform") or k == "data parallel")
    gain = best_uniform / fast["predicted"]["step_s"] - 1
    r = _plan(2, min_gain=gain * 0.5)  # the mixed plan's gain now exceeds min_gain
    assert r["chosen"] == fast["chosen"] and r["plan"] == fast["plan"]


def test_uniform_candidates_respect_the_memory_limit():
    free = _plan(2)
    chosen_mem = free["predicted"]["memory"]
    # a limit just below the chosen uniform plan's memory rules it out
    r = _plan(2, memory_limit=chosen_mem - 1)
    assert r["predicted"]["memory"] <= chosen_mem - 1
    assert r["plan"] != free["plan"]


def test_format_table_says_why_a_uniform_plan_was_chosen():
    r = _plan(2)
    text = auto.format_table(r)
    assert f"chosen: {r['chosen']}" in text and "within min_gain 5%" in text
    s = auto.predicted_summary(r)
    assert s["chosen"] == r["chosen"] and s["fastest"] == r["fastest"]
    assert s["min_gain"] == auto.MIN_GAIN


@pytest.mark.parametrize("enabled", [True, False])
def test_plan_model_pauses_the_garbage_collector_and_restores_it(monkeypatch, enabled):
    import gc
    seen = []
    real = auto.search

    def spy(*a, **kw):
        seen.append(gc.isenabled())
        return real(*a, **kw)
    monkeypatch.setattr(auto, "search", spy)
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        _plan(2)
        assert gc.isenabled() is enabled  # as it was before the call
    finally:
        (gc.enable if was else gc.disable)()
    assert seen and not any(seen)  # paused while the searches ran


def test_gc_paused_restores_the_collector_when_the_body_raises():
    import gc
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with auto.gc_paused():
            assert not gc.isenabled()
            raise RuntimeError("boom")
    assert gc.isenabled()
