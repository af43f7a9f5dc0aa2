"""scripts/bench_placement.py: placed branches vs one rank vs split plans in one job (no
timing asserts: the figures are checked for shape and sanity only)."""
import json
import math
import subprocess
import sys
from pathlib import Path

from tests.mpi_harness import run_mpi_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_placement.py"


def test_help():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for flag in ("--plans", "--rounds", "--json", "--quick", "--filters"):
        assert flag in r.stdout


def test_quick_two_ranks_writes_interleaved_rounds(tmp_path):
    out = tmp_path / "p.json"
    r = run_mpi_script(str(SCRIPT), 2, 150, args=["--quick", "--rounds", "4", "--predict",
                                                  "--json", str(out)], cwd=str(ROOT))
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["ranks"] == 2
    assert [x["plan"] for x in doc["results"]] == ["placed", "one_rank", "channel=2",
                                                    "filter=2", "sample=2"]
    for x in doc["results"]:
        assert len(x["step_s"]) == 4 and all(t > 0 and math.isfinite(t) for t in x["step_s"])
        assert x["speedup_paired_q1"] <= x["speedup_paired_median"] <= x["speedup_paired_q3"]
        assert x["predicted_ms"] > 0 and math.isfinite(x["predicted_speedup"])
    assert doc["results"][1]["predicted_speedup"] == 1.0  # one_rank is the baseline
    assert "vs one_rank" in r.stdout and "predicted" in r.stdout


def test_wrong_rank_count_fails_on_every_rank():
    r = run_mpi_script(str(SCRIPT), 3, 60, args=["--quick"], cwd=str(ROOT))
    assert r.returncode != 0
    assert "runs on 2 ranks, got 3" in r.stdout + r.stderr
