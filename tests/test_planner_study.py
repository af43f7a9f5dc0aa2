"""scripts/planner_study.py on a CI-sized case: the JSON and Markdown it writes.

The paper-scale run (ResNet-50 / Wide-ResNet-50-2 on up to 1024 ranks) takes minutes
and is committed under benchmarks/results; here a ResNet-18 on 32x32 images on 2 and 4
ranks and an AlexNet on 63x63 on 2 ranks, with 0.2 s of MCMC each, check the records:
the chosen plan is the fastest predicted one or a uniform plan within ``MIN_GAIN`` of
it, MCMC never ends slower than its start, every number is finite, and AlexNet's
strategies are summarised by its own stages.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "planner_study.py"


def test_small_study(tmp_path):
    from distconv.planner.auto import MIN_GAIN
    out, md = tmp_path / "s.json", tmp_path / "s.md"
    r = subprocess.run([sys.executable, str(SCRIPT), "--models", "resnet18", "--ranks", "4",
                        "--per-gpu", "1", "--global-batch", "2", "--extra",
                        "resnet18:2:2:3x32x32", "--extra", "alexnet:2:4:3x63x63",
                        "--mcmc-budget", "0.2", "--image-shape", "3,32,32",
                        "--num-classes", "10", "--machine", "dev_2core", "--json", str(out),
                        "--markdown", str(md)],
                       capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    recs = doc["records"]
    assert len(recs) == 4  # P=4 N=4, P=4 N=2, and the extra cases
    alex = recs[-1]
    assert alex["model"] == "alexnet" and alex["stages"] == ["features", "classifier"]
    assert set(alex["dominant"]) == {"features", "classifier"}
    for rec in recs:  # MCMC from the fastest candidate never ends slower than it
        m = rec["mcmc"]
        assert m["proposals"] > 0 and m["gain"] >= 1.0 and m["step_s"] <= m["start_step_s"]
        assert m["search_plus_mcmc_s"] == rec["search_s"] + m["seconds"]
    for rec in recs:
        assert math.isfinite(rec["speedup_vs_dp"]) and rec["speedup_vs_dp"] > 0
        assert rec["fastest"] in rec["candidates_step_s"]
        assert rec["chosen"] == rec["fastest"] or rec["chosen"].startswith(
            ("uniform ", "data parallel"))
        # the chosen plan is at most MIN_GAIN slower than the fastest predicted
        assert rec["fastest_speedup_vs_dp"] >= rec["speedup_vs_dp"] - 1e-12
        assert rec["fastest_speedup_vs_dp"] <= rec["speedup_vs_dp"] * (1 + MIN_GAIN) + 1e-12
    text = md.read_text()
    assert "| chosen |" in text and "fastest" in text
    assert "| features | classifier |" in text and "| DP + MCMC s |" in text


def test_placement_study(tmp_path):
    """``--placement``: Inception-v3 on 4 ranks at 1 and 2 images per rank; each record
    compares the plan with placement against the plan without it (never slower: the
    searches without placement stay candidates) and the Markdown has its table."""
    out, md = tmp_path / "p.json", tmp_path / "p.md"
    r = subprocess.run([sys.executable, str(SCRIPT), "--models", "inception_v3", "--ranks",
                        "4", "--per-gpu", "1,2", "--global-batch", "none", "--extra", "none",
                        "--placement", "--machine", "v100_ib", "--json", str(out),
                        "--markdown", str(md)],
                       capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 2 and json.loads(out.read_text())["placement"] is True
    for rec in recs:
        pl = rec["placement"]
        assert pl["step_s"] <= rec["plan"]["step_s"] * (1 + 1e-12)
        assert pl["gain_over_unplaced"] >= 1.0 - 1e-12
        assert (pl["placed_layers"] > 0) == bool(pl["placed_blocks"])
    assert any(rec["placement"]["placed_blocks"] for rec in recs)  # 4 ranks, 1-2 per rank
    assert "Operator placement" in md.read_text()
