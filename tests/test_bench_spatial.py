"""scripts/bench_spatial.py: 1 rank vs height=2/channel=2/filter=2 on a conv stack, paired in
one job (no timing asserts: the figures are checked for shape and sanity only)."""
import json
import math
import subprocess
import sys
from pathlib import Path

from tests.mpi_harness import run_mpi_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_spatial.py"


def test_help():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for flag in ("--strategies", "--rounds", "--json", "--quick", "--overlap", "--layers",
                 "--clean-frac"):
        assert flag in r.stdout


def test_quick_two_ranks_writes_paired_rounds_and_memory(tmp_path):
    out = tmp_path / "s.json"
    r = run_mpi_script(str(SCRIPT), 2, 90, args=["--quick", "--rounds", "4", "--json", str(out)],
                       cwd=str(ROOT))
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["ranks"] == 2 and len(doc["one_rank_step_s"]) == 4
    cases = ["height=2 overlap", "height=2 no overlap", "channel=2", "filter=2"]
    assert [x["case"] for x in doc["results"]] == cases
    for x in doc["results"]:
        assert len(x["step_s"]) == 4 and all(t > 0 and math.isfinite(t) for t in x["step_s"])
        assert x["speedup_paired_q1"] <= x["speedup_paired_median"] <= x["speedup_paired_q3"]
        assert 0 <= x["clean_rounds"] <= 4
    mem = doc["memory"]
    assert mem["1 rank"]["activations"] > 0
    for c in cases:
        assert mem[c]["peak"] >= mem[c]["activations"] + mem[c]["scratch"] > 0
    assert all(mem[c][f"{k}_ratio"] > 0 for c in cases for k in ("activations", "peak"))
    halo = [r.get("halo", 0) for r in mem["height=2 no overlap"]["sent_per_rank"]]
    assert all(h > 0 for h in halo)
    assert "paired speedup" in r.stdout


def test_a_strategy_that_does_not_fit_fails_on_every_rank(tmp_path):
    r = run_mpi_script(str(SCRIPT), 2, 60, args=["--quick", "--strategies", "height=3"],
                       cwd=str(ROOT))
    assert r.returncode != 0
    assert "does not fit 2 ranks" in r.stdout + r.stderr
