"""scripts/bench_search_time.py: its CLI, and one small run of two checkouts."""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_search_time.py"
sys.path.insert(0, str(SCRIPT.parent))
import bench_search_time as bst  # noqa: E402


def test_help_names_the_flags():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for flag in ("--code", "--case", "--rounds", "--json"):
        assert flag in r.stdout


@pytest.mark.parametrize("argv, says", [
    (["--code", "new"], "expected NAME=CHECKOUT"),
    (["--code", "new=/nonexistent"], "a directory holding distconv/"),
    (["--code", f"new={ROOT}", "--case", "resnet50:0:8"], "expected MODEL:RANKS:BATCH"),
    (["--code", f"new={ROOT}", "--rounds", "0"], "--rounds must be >= 1, got 0"),
])
def test_bad_arguments_say_what_was_expected(argv, says, capsys):
    with pytest.raises(SystemExit):
        bst.parse_args(argv)
    assert says in capsys.readouterr().err


def test_two_codes_side_by_side(tmp_path):
    other = tmp_path / "copy"  # a second checkout: each run must import its own
    shutil.copytree(ROOT / "distconv", other / "distconv",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--code", f"a={ROOT}", "--code",
                        f"b={other}", "--case", "resnet18:4:8", "--rounds", "1", "--json",
                        str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert [x["code"] for x in doc["runs"]] == ["a", "b"]
    assert doc["runs"][0]["distconv"].startswith(str(ROOT / "distconv"))
    assert doc["runs"][1]["distconv"].startswith(str(other / "distconv"))
    a, b = doc["summary"]
    assert a["ratio_median"] == 1.0 and a["n"] == b["n"] == 1
    assert b["ratio_median"] == pytest.approx(doc["runs"][1]["search_s"]
                                              / doc["runs"][0]["search_s"])
    assert a["digests"] == b["digests"] and len(a["digests"]) == 1  # the same code plans alike
    assert "resnet18:4:8" in r.stdout
    assert doc["commits"]["a"] == bst.commit_of(str(ROOT)) and doc["commits"]["b"] is None


def test_summary_lists_every_digest_a_code_gave():
    runs = [{"case": ["m", 2, 2], "code": "a", "round": k, "search_s": s,
             "cpu_plan_model_s": s, "digest": d}
            for k, s, d in ((1, 1.0, "x"), (2, 2.0, "y"))]
    runs += [{**r, "code": "b", "search_s": r["search_s"] * 3} for r in runs]
    rows = bst.summarise(runs, [("a", "."), ("b", ".")], [("m", 2, 2)])
    assert rows[0]["digests"] == ["x", "y"]  # a control: differing plans are not hidden
    assert rows[1]["ratio_median"] == pytest.approx(3.0)


def test_a_checkout_that_cannot_plan_is_named(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ROOT / "distconv", broken / "distconv",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (broken / "distconv" / "planner" / "auto.py").write_text("raise ImportError('broken')\n")
    r = subprocess.run([sys.executable, str(SCRIPT), "--code", f"bad={broken}", "--case",
                        "resnet18:2:2", "--rounds", "1"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode != 0
    assert f"planning ('resnet18', 2, 2) with {broken} failed" in r.stderr
    assert "ImportError: broken" in r.stderr
