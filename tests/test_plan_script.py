"""scripts/plan.py end to end, and the plan-file format.

* ``--help`` works and shows the examples;
* planning small_resnet (train.py's default model and digits shape) for 2 and 4 ranks on
  the shipped ``dev_2core`` machine writes a plan file whose plan equals the printed
  table's strategy column, names every strategic layer of the traced model, and whose
  every value factorizes P;
* in an MPI job of P = 2 and 4 ranks, ``plan.main()`` writes the plan (also a non-trivial
  channel/filter one: width 64, batch 8), every rank applies it with
  ``model.set_strategy(to_strategies(plan))``, and one forward + backward gives the
  logits and input gradient of the data-parallel model (float64);
* ``scripts/train.py --strategy plan.json`` trains 3 steps with a written plan on 2 ranks;
* ``--machine calibrate`` under ``mpiexec -n 2`` prints once (rank 0), and writes a
  ``--save-machine`` file that ``Machine.load`` reads back and a plan for 2 ranks;
* bad input (unknown model, ranks 0, missing --ranks, bad image shape or memory text, a
  missing / invalid / directory machine file, an unknown machine name, a memory limit
  nothing fits) exits 2 (command line) or 1 (planning) with one line naming what was
  expected and what came, and no traceback;
* ``save_plan``/``load_plan`` round-trip a bare ``{layer: strategy}`` object and the
  ``{"plan": ...}`` wrapper; a bad entry is a ValueError naming the layer.
"""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.mpi_harness import child_env, mpi, mpi_tmp_path, run_mpi_script

REPO = Path(__file__).resolve().parent.parent
PLAN = str(REPO / "scripts" / "plan.py")
TRAIN = str(REPO / "scripts" / "train.py")
TIMEOUT = 60  # s per subprocess; the jobs here take 1-10 s


def plan_cmd(*args, cwd=None, timeout=TIMEOUT):
    """Run plan.py (no mpiexec) and return the CompletedProcess."""
    return subprocess.run([sys.executable, PLAN, *[str(a) for a in args]], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env=child_env(None, unbuffered=True))


def table_plan(stdout: str) -> dict:
    """``{layer: (s, c, f)}`` from the strategy column of plan.py's table."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\S+)\s+(conv|bn|linear)\s+.*?\s+s(\d+) c(\d+) f(\d+)\s", line)
        if m:
            out[m.group(1)] = tuple(int(m.group(i)) for i in (3, 4, 5))
    return out


def load_script():
    spec = importlib.util.spec_from_file_location("plan_script", PLAN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_clean_error(r, rc, *needles):
    """Exit status ``rc``, the error on one ``plan.py: error:`` line, no traceback."""
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("plan.py: error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ------------------------------------------------------------------ command line
def test_help():
    r = plan_cmd("--help")
    assert r.returncode == 0, r.stderr
    for s in ("--model", "--ranks", "--machine", "calibrate", "--memory-limit", "examples:",
              "v100_ib", "dev_2core", "train.py --strategy"):
        assert s in r.stdout, s


@pytest.mark.parametrize("p", [2, 4])
def test_plan_small_resnet_dev_2core(tmp_path, p):
    from distconv import models
    from distconv.planner.graph import trace
    from distconv.planner.planfile import load_plan

    out = tmp_path / "plan.json"
    r = plan_cmd("--ranks", p, "--machine", "dev_2core", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "predicted speedup over pure data parallelism" in r.stdout
    assert "strategies used:" in r.stdout
    plan = load_plan(out)
    printed = table_plan(r.stdout)
    assert plan == printed
    names = trace(models.small_resnet(10, in_channels=1, width=16), (64, 1, 8, 8)) \
        .strategic_names()
    assert list(plan) == names  # every strategic layer, in model order
    for st in plan.values():
        assert len(st) == 3 and st[0] * st[1] * st[2] == p and min(st) >= 1
    doc = json.loads(out.read_text())
    meta, pred = doc["meta"], doc["predicted"]
    assert meta["model"] == "small_resnet" and meta["ranks"] == p
    assert meta["input_shape"] == [64, 1, 8, 8] and meta["machine"] == "dev_2core"
    assert "plan.py" in meta["command"] and meta["date"] and meta["bucket_kb"] == 4096
    assert pred["step_s"] > 0 and pred["dp_step_s"] > 0
    assert pred["speedup_vs_dp"] == pytest.approx(pred["dp_step_s"] / pred["step_s"])


def test_plan_quiet_and_save_machine(tmp_path):
    from distconv.planner.machine import Machine, builtin

    out, mfile = tmp_path / "p.json", tmp_path / "m.json"
    r = plan_cmd("--ranks", 2, "--machine", "v100_ib", "--model", "small_resnet",
                 "--save-machine", mfile, "--out", out, "--quiet", "--memory-limit", "1GiB")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert Machine.load(mfile) == Machine.load(builtin("v100_ib"))
    assert json.loads(out.read_text())["meta"]["memory_limit"] == 2**30
    # one allreduce per parameter (--bucket-kb 0), each started as its layer's backward
    # ends, against one 4 MiB bucket (this small net's gradients all fit) sent at the end
    one = tmp_path / "one.json"
    r = plan_cmd("--ranks", 2, "--machine", "v100_ib", "--model", "small_resnet",
                 "--out", one, "--quiet", "--memory-limit", "1GiB", "--bucket-kb", "0")
    assert r.returncode == 0, r.stderr
    a, b = (json.loads(f.read_text()) for f in (out, one))
    assert b["meta"]["bucket_kb"] == 0
    assert b["predicted"]["dp_step_s"] != a["predicted"]["dp_step_s"]


@pytest.mark.parametrize("args,rc,needles", [
    (["--model", "nosuch", "--ranks", "2", "--machine", "dev_2core"], 2,
     ["--model", "'nosuch'", "small_resnet"]),
    (["--ranks", "0", "--machine", "dev_2core"], 2, ["--ranks", ">= 1", "got 0"]),
    (["--machine", "dev_2core"], 2, ["--ranks", "got nothing"]),
    (["--ranks", "2", "--machine", "dev_2core", "--image-shape", "3,224"], 2,
     ["C,H,W", "'3,224'"]),
    (["--ranks", "2", "--machine", "dev_2core", "--memory-limit", "12XB"], 2,
     ["GiB", "'12XB'"]),
    (["--ranks", "2", "--machine", "no_such_machine"], 1,
     ["dev_2core", "v100_ib", "calibrate", "'no_such_machine'"]),
    (["--ranks", "2", "--machine", "{tmp}/missing.json"], 1, ["missing.json", "does not exist"]),
    (["--ranks", "2", "--machine", "{tmp}/bad.json"], 1, ["bad.json", "not valid JSON"]),
    (["--ranks", "2", "--machine", "{tmp}/wrong.json"], 1, ["wrong.json", "ranks_per_node",
                                                          "got 0"]),
    (["--ranks", "2", "--machine", "{tmp}"], 1, ["cannot be read"]),
    (["--ranks", "2", "--machine", "dev_2core", "--memory-limit", "64KiB"], 1,
     ["--memory-limit", "65536 bytes", "too small", "no plan fits"]),
    (["--ranks", "2", "--machine", "v100_ib", "--model", "resnet50", "--batch", "512",
      "--memory-limit", "16GB"], 1, ["--memory-limit", "too small", "resnet50"]),
])
def test_errors_are_one_clean_line(tmp_path, args, rc, needles):
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "wrong.json").write_text(json.dumps({"name": "x", "ranks_per_node": 0}))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = plan_cmd(*args, "--out", tmp_path / "never.json", cwd=tmp_path)
    assert_clean_error(r, rc, *needles)
    assert not (tmp_path / "never.json").exists()


def test_parse_bytes():
    mod = load_script()
    assert mod.parse_bytes("16GiB") == 16 * 2**30
    assert mod.parse_bytes("512MiB") == 512 * 2**20
    assert mod.parse_bytes("16GB") == 16 * 10**9
    assert mod.parse_bytes("1e9") == 10**9
    assert mod.parse_bytes("17179869184") == 17179869184
    assert mod.parse_bytes("none") is None
    for bad in ("", "16 GiBs", "-1", "0", "abc", "16G"):
        with pytest.raises(ValueError, match="expected"):
            mod.parse_bytes(bad)


# ------------------------------------------------------------------ applying a plan
PLANS = {  # name -> plan.py arguments (besides --ranks/--out)
    "default": ["--machine", "dev_2core"],
    "wide_b8": ["--machine", "dev_2core", "--width", "64", "--batch", "8", "--no-overlap"],
}


@pytest.mark.parametrize("which", list(PLANS))
@mpi(ranks=(2, 4), timeout=60)
def test_written_plan_applies_and_matches_data_parallel(comm, which):
    """plan.main() under MPI (rank 0 plans and writes), then every rank applies the file
    and a forward + backward equals the data-parallel model's (float64)."""
    import distconv as dc
    from distconv import models
    from distconv.planner.planfile import load_plan, to_strategies

    p = comm.size
    with mpi_tmp_path(comm) as folder:
        path = str(folder / f"plan_{which}.json")
        args = PLANS[which] + ["--ranks", str(p), "--out", path, "--quiet"]
        assert load_script().main(args) == 0
        plan = load_plan(path)
    width = int(args[args.index("--width") + 1]) if "--width" in args else 16
    batch = int(args[args.index("--batch") + 1]) if "--batch" in args else 64
    assert all(s * c * f == p for s, c, f in plan.values())
    if which == "wide_b8":  # small batch, wide layers: the planner leaves data parallelism
        assert any(c > 1 or f > 1 for _, c, f in plan.values()), plan
    dc.set_default_dtype(np.float64)

    def run(strategy):
        dc.manual_seed(3)
        m = models.small_resnet(10, in_channels=1, width=width)
        if strategy is not None:
            m.set_strategy(strategy)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, 1, 8, 8))
        dy = rng.standard_normal((batch, 10))
        y = m(x).to_global()
        dx = m.backward(dy).to_global()
        return np.asarray(y), np.asarray(dx)

    y_plan, dx_plan = run(to_strategies(plan))
    y_dp, dx_dp = run(dc.Strategy(sample=p))
    np.testing.assert_allclose(y_plan, y_dp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx_plan, dx_dp, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from distconv.data import make_digits

    return tuple(str(p) for p in make_digits(tmp_path_factory.mktemp("digits")))


@pytest.mark.timeout(90)
def test_train_accepts_written_plan(tmp_path, digits):
    """A 2-rank plan with channel/filter layers drives 3 steps of scripts/train.py."""
    plan = tmp_path / "plan.json"
    r = plan_cmd("--ranks", 2, "--machine", "dev_2core", "--width", "64", "--batch", "8",
                 "--out", plan, "--quiet")
    assert r.returncode == 0, r.stderr
    from distconv.planner.planfile import load_plan
    assert any(c > 1 or f > 1 for _, c, f in load_plan(plan).values())
    out = tmp_path / "run"
    t = run_mpi_script(TRAIN, 2, 45, cwd=str(tmp_path), args=[
        "--strategy", str(plan), "--width", "64", "--batch-size", "8", "--epochs", "1",
        "--max-steps", "3", "--log-every", "1", "--data", digits[0], "--out", str(out)])
    assert t.returncode == 0, f"{t.stdout}\n{t.stderr}"
    assert f"strategy {plan}" in t.stdout
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    steps = [x for x in recs if x["kind"] == "step"]
    assert [x["step"] for x in steps] == [1, 2, 3]
    assert all(np.isfinite(x["loss"]) for x in steps)


def test_calibrate_under_mpiexec(tmp_path):
    from distconv.planner.machine import KINDS, Machine
    from distconv.planner.planfile import load_plan

    mfile, out, cache = tmp_path / "node.json", tmp_path / "plan.json", tmp_path / "cache.json"
    r = run_mpi_script(PLAN, 2, 60, cwd=str(tmp_path), args=[
        "--machine", "calibrate", "--calibrate-reps", "2", "--save-machine", str(mfile),
        "--compute-cache", str(cache), "--out", str(out)])
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert r.stdout.count("predicted speedup over pure data parallelism") == 1  # rank 0 only
    m = Machine.load(mfile)
    assert m.ranks_per_node == 2 and m.name == "calibrated"
    assert all(m.links["intra"][k]["alpha"] + m.links["intra"][k]["beta"] > 0 for k in KINDS)
    doc = json.loads(out.read_text())
    assert doc["meta"]["ranks"] == 2 and doc["meta"]["compute"] == "measure"
    assert doc["meta"]["machine_source"] == "calibrate"
    assert all(s * c * f == 2 for s, c, f in load_plan(out).values())
    assert json.loads(cache.read_text())["entries"]  # kernels were measured and cached


# ------------------------------------------------------------------ plan files
def test_plan_file_round_trip(tmp_path):
    from distconv import Strategy
    from distconv.planner.planfile import load_plan, save_plan, to_strategies

    plan = {"conv1": (2, 1, 1), "bn1": (1, 2, 1), "fc": (1, 1, 2)}
    path = tmp_path / "a.json"
    save_plan(path, plan, predicted={"step_s": 1.0}, meta={"ranks": 2})
    assert load_plan(path) == plan
    doc = json.loads(path.read_text())
    assert doc["plan"]["bn1"] == "sample=1,channel=2,filter=1"
    assert doc["meta"] == {"ranks": 2} and doc["predicted"] == {"step_s": 1.0}
    st = to_strategies(plan)
    assert st["bn1"] == Strategy(sample=1, channel=2, filter=1)
    # a bare {layer: strategy} object, texts or objects, as a user writes it by hand
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"conv1": "sample=2,channel=1,filter=1",
                                "fc": {"sample": 1, "channel": 2, "filter": 1}}))
    assert load_plan(bare) == {"conv1": (2, 1, 1), "fc": (1, 2, 1)}
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"plan": {"conv1": "sample=1,channel=1,filter=2"},
                                   "meta": {"anything": 1}}))
    assert load_plan(wrapped) == {"conv1": (1, 1, 2)}


@pytest.mark.parametrize("entry,needle", [
    ({"layer1.0.conv2": "sample=2,chanel=1,filter=1"}, "layer1.0.conv2"),
    ({"conv1": "channel=2"}, "conv1"),        # sample left open: not a plan entry
    ({"fc": 7}, "fc"),
    ({"bn1": {"sample": 1, "colour": 2}}, "bn1"),
])
def test_plan_file_bad_entry_names_the_layer(tmp_path, entry, needle):
    from distconv.planner.planfile import load_plan
    for doc in (entry, {"plan": entry}):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=re.escape(repr(needle))):
            load_plan(path)


@pytest.mark.parametrize("text,needle", [("[1, 2]", "expected a JSON object"),
                                         ("{}", "empty"), ("{oops", "cannot read")])
def test_plan_file_not_a_plan(tmp_path, text, needle):
    from distconv.planner.planfile import load_plan
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle):
        load_plan(path)


def test_spatial_plan_of_a_large_image_model(tmp_path):
    """--spatial on a CosmoFlow-like conv stack at batch 1 on 512x512 images: the planner
    splits the early layers' height or width, the plan file says so, and its table too."""
    plan = tmp_path / "plan.json"
    r = plan_cmd("--model", "convstack2d", "--batch", 1, "--ranks", 4, "--machine", "v100_ib",
                 "--spatial", "--out", plan)
    assert r.returncode == 0, r.stderr
    from distconv.planner.planfile import load_plan
    got = load_plan(plan)
    assert any(len(st) == 5 and st[3] * st[4] > 1 for st in got.values()), got
    assert all(len(st) == 3 for n, st in got.items() if n.startswith("classifier"))
    assert re.search(r"features\.0\s+conv .* s1 c1 f1 h\d w\d", r.stdout), r.stdout
    r = plan_cmd("--model", "convstack2d", "--batch", 1, "--ranks", 4, "--machine", "v100_ib",
                 "--out", tmp_path / "plain.json")
    assert r.returncode == 0, r.stderr
    assert all(len(st) == 3 for st in load_plan(tmp_path / "plain.json").values())


@pytest.mark.timeout(90)
def test_train_runs_a_spatial_plan(tmp_path):
    """A plan file with height/width entries drives scripts/train.py on 2 ranks."""
    from distconv.data import make_synthetic
    data = tmp_path / "cs.h5"
    make_synthetic(str(data), (4, 4, 32, 32), 4, seed=0)
    plan = tmp_path / "plan.json"
    entries = {f"features.{i}": "sample=1,channel=1,filter=1,height=2"
               for i in (0, 1, 4, 5, 8, 9, 12, 13)}
    entries.update({"classifier.0": "sample=1,channel=1,filter=2",
                    "classifier.2": "sample=2,channel=1,filter=1"})
    plan.write_text(json.dumps({"plan": entries}))
    out = tmp_path / "run"
    t = run_mpi_script(TRAIN, 2, 60, cwd=str(tmp_path), args=[
        "--model", "convstack2d", "--strategy", str(plan), "--batch-size", "2",
        "--epochs", "1", "--max-steps", "2", "--log-every", "1", "--hidden", "16",
        "--data", str(data), "--out", str(out)])
    assert t.returncode == 0, f"{t.stdout}\n{t.stderr}"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    assert [x["step"] for x in recs if x["kind"] == "step"] == [1, 2]
