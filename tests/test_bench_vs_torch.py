"""scripts/bench_vs_torch.py: distconv vs PyTorch / DDP training steps in one job (no
timing asserts: the figures are checked for shape and sanity only)."""
import json
import math
import subprocess
import sys
from pathlib import Path

from tests.mpi_harness import run_mpi_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_vs_torch.py"


def test_help():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for flag in ("--models", "--batches", "--strategies", "--rounds", "--json", "--md",
                 "--quick"):
        assert flag in r.stdout


def test_quick_two_ranks_every_config(tmp_path):
    out, md = tmp_path / "v.json", tmp_path / "v.md"
    r = run_mpi_script(str(SCRIPT), 2, 240,
                       args=["--quick", "--json", str(out), "--md", str(md)], cwd=str(ROOT),
                       env={"DISTCONV_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["ranks"] == 2 and [g["batch"] for g in doc["groups"]] == [2, 4]
    want = ["torch 1x1", "torch 1x2", "DDP 2x1", "distconv 1", "distconv 2 sample",
            "distconv 2 channel", "distconv 2 filter", "distconv 2 auto"]
    for g in doc["groups"]:
        assert [x["config"] for x in g["results"]] == want
        assert g["notes"]["auto_plan"]
        for x in g["results"]:
            assert len(x["step_s"]) == doc["rounds"]
            assert all(t > 0 and math.isfinite(t) for t in x["step_s"])
            v = x["speed_vs"]["torch 1x1"]
            assert v["q1"] <= v["median"] <= v["q3"]
            assert len(x["cpu_step_s"]) == doc["rounds"] and x["cpu_median_s"] >= 0
        assert g["results"][0]["speed_vs"]["torch 1x1"]["median"] == 1.0
    assert "| resnet18 | 4 | DDP 2x1 |" in md.read_text()
