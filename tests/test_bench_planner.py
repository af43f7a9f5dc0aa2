"""scripts/bench_planner.py: the planner's predicted vs measured validation, CI-sized.

The script runs on 2 ranks with ``--quick`` (tiny model, 2 repetitions), on 2 ranks with
``--model inception --bytes-only`` (the Inception-style net) and on 4 ranks with
``--bytes-only``; the tests check the JSON's structure, that every number is finite,
that the auto plan is one of the entries and that the predicted bytes per rank equal the
measured ones. Times are never asserted (the machine is shared).
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.mpi_harness import max_ranks, run_mpi_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_planner.py"


def _run(tmp_path, nranks, *extra, timeout=60):
    out = tmp_path / "v.json"
    md = tmp_path / "v.md"
    r = run_mpi_script(str(SCRIPT), nranks, timeout,
                       args=["--quick", "--cache", str(tmp_path / "cache.json"), "--out", str(out),
                             "--md", str(md), *extra], cwd=str(ROOT))
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return json.loads(out.read_text()), md.read_text(), r.stdout


def test_inception_model_bytes_two_ranks(tmp_path):
    """``--model inception`` (IncNet: blocks of three towers joined by dc.cat): its hand
    plans (one mixing the towers of a block) and the auto plan send exactly the predicted
    bytes on both ranks."""
    doc, _, _ = _run(tmp_path, 2, "--model", "inception", "--bytes-only")
    assert doc["model"]["name"].startswith("IncNet") and doc["bytes_only"]
    labels = [p["label"] for p in doc["plans"]]
    assert "towers-channel/filter/channel" in labels and "auto" in labels
    assert doc["model"]["strategic_layers"] == 2 + 2 * 5 + 1  # stem conv+bn, 2 blocks, fc
    tower = next(p for p in doc["plans"] if p["label"] == "towers-channel/filter/channel")
    assert tower["plan"]["blocks.0.b1"] == [1, 2, 1] and tower["plan"]["blocks.0.b2.0"] == [
        1, 1, 2]
    for p in doc["plans"]:
        assert p["bytes"]["equal"] and p["bytes"]["loss_equal"], (p["label"],
                                                                  p["bytes"]["per_rank"])
    assert doc["summary"]["bytes_all_equal"]


def test_help():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for flag in ("--quick", "--out", "--cache", "--bytes-only", "--machine", "--profile"):
        assert flag in r.stdout


def test_quick_two_ranks(tmp_path):
    doc, md, stdout = _run(tmp_path, 2, "--steps-per-plan", "2")
    assert doc["args"]["steps_per_plan"] == 2
    plans = doc["plans"]
    labels = [p["label"] for p in plans]
    assert len(labels) == len(set(labels)) >= 7  # >= 6 hand plans and the auto plan
    for want in ("sample", "channel", "filter", "auto"):
        assert want in labels
    names = None
    for p in plans:
        assert math.isfinite(p["predicted_s"]) and p["predicted_s"] > 0
        assert math.isfinite(p["measured_s"]) and p["measured_s"] > 0
        assert math.isfinite(p["error"])
        assert p["measured"]["reps"] >= 2
        assert p["bytes"]["equal"] and p["bytes"]["loss_equal"], (p["label"],
                                                                  p["bytes"]["per_rank"])
        assert len(p["bytes"]["per_rank"]) == 2
        for r in p["bytes"]["per_rank"]:
            assert r["measured"] == r["predicted"]
        # every plan names every strategic layer, with s*c*f = 2
        if names is None:
            names = set(p["plan"])
        assert set(p["plan"]) == names
        assert all(s * c * f == 2 for s, c, f in p["plan"].values())
    # the ranks are permutations
    assert sorted(p["rank_predicted"] for p in plans) == list(range(1, len(plans) + 1))
    assert sorted(p["rank_measured"] for p in plans) == list(range(1, len(plans) + 1))
    s = doc["summary"]
    assert s["bytes_all_equal"] is True
    assert math.isfinite(s["mae"]) and s["mae"] >= 0
    assert 0 <= s["rank_pairs_agree"] <= s["rank_pairs"]
    assert math.isfinite(s["auto_over_best_hand"])
    # paired: one entry per hand plan, the largest median is the reported ratio
    hands = [lab for lab in labels if lab not in ("auto", "auto-fastest")]
    assert set(s["auto_paired"]) == set(hands)
    assert s["best_hand_paired"] in hands
    assert s["auto_over_best_hand_paired"] == max(q["median"] for q in s["auto_paired"].values())
    assert "paired" in md
    assert set(s["targets"]) == {"mae_le_20pct", "ranking_agrees", "auto_le_1.05x_best_hand",
                                 "bytes_equal"}
    # machine constants calibrated on the job, compute model context and environment
    assert doc["machine"]["name"] == "calibrated_2rank"
    assert doc["compute_model"]["context"] == "float32|numpy|t1"
    assert doc["environment"]["ranks"] == 2 and doc["environment"]["date"]
    assert doc["simulate"]["overlap"] is False
    # the cache was written where asked
    cache = json.loads((tmp_path / "cache.json").read_text())
    assert any(k.startswith("conv_fwd|") for k in cache["entries"])
    assert "| auto |" in md and "MAE" in md
    assert "MAE" in stdout


@pytest.mark.skipif(max_ranks() < 4, reason="needs 4 ranks")
def test_bytes_only_four_ranks(tmp_path):
    doc, _, _ = _run(tmp_path, 4, "--bytes-only")
    assert doc["bytes_only"] is True
    labels = [p["label"] for p in doc["plans"]]
    assert "auto" in labels and "s2c2f1" in labels
    for p in doc["plans"]:
        assert "measured_s" not in p
        assert math.isfinite(p["predicted_s"])
        assert len(p["bytes"]["per_rank"]) == 4
        assert p["bytes"]["equal"] and p["bytes"]["loss_equal"], (p["label"],
                                                                  p["bytes"]["per_rank"])
    assert doc["summary"]["bytes_all_equal"] is True


# ----------------------------------------------- the planner changes this validation made
# (deterministic: nothing timed except where a test only checks types and caching)

CTX = "float32|numpy|t1"


def _cm(**kw):
    from distconv.planner.compute import ComputeModel
    kw.setdefault("threads", 1)
    kw.setdefault("dtype", "float32")
    kw.setdefault("backend", "numpy")
    return ComputeModel(**kw)


def test_cache_entries_timed_without_eviction_are_ignored(tmp_path):
    from distconv.planner.compute import code_fingerprint
    path = tmp_path / "c.json"
    key = f"relu_fwd|numel=64|{CTX}"
    code = f"code-{code_fingerprint()}"
    path.write_text(json.dumps({"format": 1, "entries": {key: 1.0}, "rates": {},
                                "timing": {CTX: f"evict0|{code}"}}))
    with pytest.warns(UserWarning, match="evict0"):
        m = _cm(cache_path=path, measure=False)
    assert key not in m.entries and m.evict_bytes == 32 << 20
    old = _cm(cache_path=path, measure=False, evict_bytes=0)  # timed the same way: kept
    assert old.entries[key] == 1.0
    m.entries[key] = 2.0
    m.save()
    d = json.loads(path.read_text())
    assert d["timing"][CTX] == f"evict33554432|{code}" and d["entries"][key] == 2.0
    assert _cm(cache_path=path, measure=False).entries[key] == 2.0


@pytest.mark.parametrize("timing", [None, "evict33554432", "evict33554432|code-0123456789ab"])
def test_cache_entries_of_other_kernel_code_are_ignored(tmp_path, timing):
    """Entries timed by another version of the kernels (another fingerprint, or a file
    from before fingerprints) are measured again; the same file under this code's
    fingerprint is kept (the control)."""
    from distconv.planner.compute import code_fingerprint
    path = tmp_path / "c.json"
    key = f"update_sgd|numel=4096|{CTX}"
    doc = {"format": 1, "entries": {key: 1.0}, "rates": {}}
    if timing is not None:
        doc["timing"] = {CTX: timing}
    path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="fingerprint of the timed code"):
        m = _cm(cache_path=path, measure=False)
    assert key not in m.entries
    doc["timing"] = {CTX: f"evict33554432|code-{code_fingerprint()}"}
    path.write_text(json.dumps(doc))
    assert _cm(cache_path=path, measure=False).entries[key] == 1.0


def test_layer_overhead_measured_cached_and_zero_when_not_measured():
    from distconv.planner.compute import OVERHEAD_KINDS
    assert _cm(measure=False).layer_overhead("conv") == (0.0, 0.0)
    m = _cm(reps=1)
    for kind in OVERHEAD_KINDS:
        t = m.layer_overhead(kind, bias=kind == "linear")
        assert len(t) == 2 and all(isinstance(x, float) and x >= 0 for x in t), kind
    assert m.measured == 2 * len(OVERHEAD_KINDS)
    before = m.measured
    m.layer_overhead("bn")
    assert m.measured == before  # cached
    assert f"overhead_fwd|kind=linear,bias=1|{CTX}" in m.entries
    with pytest.raises(ValueError, match="unknown kind"):
        m.layer_overhead("softmax")


def test_measuring_overheads_keeps_the_models_initial_weights():
    """Timing the layers' Python builds layers; the next model's weights are those it
    would have had without it (``nn.module.kept_init_seed``). Control: building a layer
    outside it does move them."""
    import distconv as dc
    from distconv import nn

    def weight():
        return nn.Conv2d(2, 3, 3).weight.data.local.copy()
    dc.manual_seed(3)
    want = weight()
    dc.manual_seed(3)
    _cm(reps=1).layer_overhead("conv")
    assert np.array_equal(weight(), want)
    dc.manual_seed(3)
    nn.Conv2d(1, 1, 1)
    assert not np.array_equal(weight(), want)


def _toy_cost(overheads):
    from distconv import nn
    from distconv.planner.costs import CostModel
    from distconv.planner.graph import trace
    m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                      nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False))
    cm = _cm(measure=False)
    for (kind, b), (f, w) in overheads.items():
        cm.entries[f"overhead_fwd|kind={kind},bias={b}|{CTX}"] = f
        cm.entries[f"overhead_bwd|kind={kind},bias={b}|{CTX}"] = w
    return CostModel(trace(m, (2, 4, 6, 6)), 2, None, cm)  # Machine(): free links


def test_costs_add_layer_and_redistribution_overheads():
    from distconv.planner.events import act_dist
    o = {("conv", 0): (1e-3, 2e-3), ("bn", 0): (3e-3, 4e-3), ("relu", 0): (5e-3, 6e-3),
         ("redistribute", 0): (7e-3, 7e-3)}
    plain, with_o = _toy_cost({}), _toy_cost(o)
    conv, bn, relu = list(plain.graph.layers())[:3]
    ch, fi = (1, 2, 1), (1, 1, 2)
    for layer, st, (f, b) in ((conv, ch, o[("conv", 0)]), (bn, ch, o[("bn", 0)]),
                              (relu, None, o[("relu", 0)])):
        src = act_dist(ch, 4)
        a, c = plain.layer(layer, st, src), with_o.layer(layer, st, src)
        assert abs(c.compute_fwd - a.compute_fwd - f) < 1e-12
        assert abs(c.compute_bwd - a.compute_bwd - b) < 1e-12
    # the links are free: what comm costs is the redistribution's Python per collective
    # (a channel conv's forward reduce-scatter, its backward allgather), and a move
    # between two grids that keeps every element in place is one (empty) collective too
    c = with_o.layer(conv, ch, act_dist(ch, 4))
    assert abs(c.comm_fwd - 7e-3) < 1e-12 and abs(c.comm_bwd - 7e-3) < 1e-12
    moved = with_o.layer(conv, ch, act_dist(fi, 4))  # (1,1,2) -> (1,2,1): nothing moves
    assert moved.bytes == c.bytes
    assert abs(moved.comm_fwd - 2 * 7e-3) < 1e-12 and abs(moved.comm_bwd - 2 * 7e-3) < 1e-12
    # batch norm's statistics are bare allreduces (no redistribution): no overhead
    assert with_o.layer(bn, (2, 1, 1), act_dist((2, 1, 1), 4)).comm_fwd == 0.0
    assert plain.layer(conv, ch, act_dist(fi, 4)).comm_fwd == 0.0


# ------------------------------------------------------------------ planner_report, no MPI
def _report():
    from distconv.bench import planner_report
    return planner_report


def _row(label, steps, clean=None, predicted=1.0):
    import numpy as np
    return {"label": label, "predicted_s": predicted, "measured_s": float(np.median(steps)),
            "measured": {"steps_s": list(steps), "clean": clean or [True] * len(steps)}}


def test_paired_ratio_follows_the_repetitions_not_the_medians():
    """A VM that flips between a fast and a slow mode: the medians of two equally fast
    plans land in different modes (ratio of medians 1.25), the per-repetition ratio is 1."""
    rep = _report()
    # the VM is slow (57 ms) for repetitions 0-6 and fast (45 ms) from 9 on; in 7 and 8
    # the mode flips between the auto plan's step and the hand plan's: the auto plan has
    # 9 slow steps, the hand plan 7, so their medians land in different modes
    auto = _row("auto", [57.0] * 9 + [45.0] * 7)
    hand = _row("hand", [57.0] * 7 + [45.0] * 9)
    q = rep.paired_ratio(auto["measured"], hand["measured"])
    assert q["n"] == 16
    # the ratio per repetition is auto_i / hand_i: 57/57, 45/45 or 57/45 where the modes
    # differ (2 of 16), so the median is 1
    assert q["median"] == 1.0
    c = rep.compare([hand, auto], 0.2)
    assert c["auto_over_best_hand"] == 57.0 / 45.0  # the medians' ratio is fooled
    assert c["auto_over_best_hand_paired"] == 1.0 and c["best_hand_paired"] == "hand"


def test_paired_ratio_negative_control_a_slower_auto_plan_fails():
    """An auto plan 10% slower in every repetition, under the same mode flips, is
    reported 1.10x: the paired target can fail."""
    rep = _report()
    modes = [45.0, 57.0] * 8
    hand_a = _row("channel", modes)
    hand_b = _row("filter", [m * 1.02 for m in modes])
    auto = _row("auto", [m * 1.10 for m in modes])
    c = rep.compare([hand_a, hand_b, auto], 0.2)
    assert abs(c["auto_over_best_hand_paired"] - 1.10) < 1e-12
    assert c["best_hand_paired"] == "channel"
    assert abs(c["auto_paired"]["filter"]["median"] - 1.10 / 1.02) < 1e-12
    assert not c["auto_over_best_hand_paired"] <= 1.05


def test_paired_ratio_uses_repetitions_clean_for_both():
    rep = _report()
    a = _row("auto", [10.0, 10.0, 10.0, 99.0], clean=[True, True, True, False])
    h = _row("hand", [10.0, 10.0, 10.0, 10.0])
    q = rep.paired_ratio(a["measured"], h["measured"])
    assert q["n"] == 3 and q["from_clean"] and q["median"] == 1.0
    # fewer than 3 clean for both: every repetition
    a = _row("auto", [10.0, 20.0, 20.0], clean=[True, False, False])
    q = rep.paired_ratio(a["measured"], _row("h", [10.0] * 3)["measured"])
    assert q["n"] == 3 and not q["from_clean"] and q["median"] == 2.0
    assert rep.paired_ratio({"steps_s": []}, h["measured"]) is None


def test_auto_fastest_is_not_a_hand_plan():
    """The planner's fastest predicted plan (measured as "auto-fastest" when plan_model
    returned a uniform plan within min_gain of it) is compared with the hand plans like
    the auto plan, never counted as one."""
    rep = _report()
    modes = [45.0, 57.0] * 4
    hand = _row("channel", modes)
    auto = _row("auto", modes)
    fastest = _row("auto-fastest", [m * 0.9 for m in modes])
    c = rep.compare([hand, auto, fastest], 0.2)
    assert c["best_hand"] == "channel" and set(c["auto_paired"]) == {"channel"}
    assert c["auto_over_best_hand_paired"] == 1.0
    assert abs(c["fastest_over_best_hand_paired"] - 0.9) < 1e-12
    assert c["fastest_best_hand_paired"] == "channel"
