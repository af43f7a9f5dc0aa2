"""scripts/bench_paired.py: one job alternating a 1-rank and a P-rank step (no timing
asserts: the figures are checked for shape and sanity only)."""
import json
import math
import subprocess
import sys
from pathlib import Path

from tests.mpi_harness import run_mpi_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_paired.py"


def test_help():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for flag in ("--strategies", "--rounds", "--json", "--quick", "--bucket-kb"):
        assert flag in r.stdout


def test_quick_two_ranks_writes_paired_rounds(tmp_path):
    out = tmp_path / "p.json"
    r = run_mpi_script(str(SCRIPT), 2, 60, args=["--quick", "--rounds", "4", "--json", str(out)],
                       cwd=str(ROOT))
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["ranks"] == 2 and len(doc["one_rank_step_s"]) == 4
    assert [x["strategy"] for x in doc["results"]] == ["channel=2", "filter=2", "sample"]
    for x in doc["results"]:
        assert len(x["step_s"]) == 4 and all(t > 0 and math.isfinite(t) for t in x["step_s"])
        assert x["speedup_paired_q1"] <= x["speedup_paired_median"] <= x["speedup_paired_q3"]
    assert "paired speedup" in r.stdout


def test_a_strategy_that_does_not_fit_fails_on_every_rank(tmp_path):
    r = run_mpi_script(str(SCRIPT), 2, 60, args=["--quick", "--strategies", "sample=3"],
                       cwd=str(ROOT))
    assert r.returncode != 0
    assert "does not fit 2 ranks" in r.stdout + r.stderr
