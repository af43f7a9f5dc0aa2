"""distconv.profile.Profiler (1 and 2 ranks) and the scripts/scaling.py driver end to end."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.mpi_harness import child_env, mpi

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "scaling.py"
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _run_model(model, x, dy, prof=None, steps=2):
    from distconv import sync_gradients
    from distconv.comm import world
    outs = []
    inside = {}  # stats() differences over the profiled steps only (not to_global below)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = None
        s0 = world().stats()
        if prof is not None:
            prof.step_begin()
        y = model(x)
        dx = model.backward(dy)
        sync_gradients(model.parameters())
        if prof is not None:
            prof.step_end()
        s1 = world().stats()
        for kind, v in s1.items():
            e = inside.setdefault(kind, {"bytes_sent": 0, "bytes_recv": 0})
            for f in e:
                e[f] += v[f] - s0.get(kind, {}).get(f, 0)
        outs.append((y.to_global(), dx.to_global(),
                     [p.grad.to_global() for p in model.parameters()]))
    return outs, inside


@pytest.mark.parametrize("which", ["block", "seq"])
@mpi(ranks=(1, 2), timeout=60)
def test_profiler_bytes_and_outputs(comm, which):
    from distconv import DistTensor, Strategy, manual_seed, nn
    from distconv.models.resnet import BasicBlock
    from distconv.profile import OUTSIDE, Profiler

    st = Strategy(channel=comm.size) if which == "seq" else Strategy(filter=comm.size)
    manual_seed(0)
    if which == "block":
        model = BasicBlock(4, 4, strategy=st)
        dist = model.conv1.input_distribution
    else:
        c1 = nn.Conv2d(4, 6, 3, padding=1, bias=False, strategy=st)
        model = nn.Sequential(c1, nn.BatchNorm2d(6, strategy=st), nn.ReLU(),
                              nn.Conv2d(6, 4, 1, bias=True, strategy=Strategy()))
        dist = c1.input_distribution
    rng = np.random.default_rng(1)
    xg = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    x = DistTensor.from_global(xg, dist)
    y0 = model(x)
    dy = DistTensor.from_global(rng.standard_normal(y0.shape).astype(np.float32),
                                y0.distribution)
    ref, _ = _run_model(model, x, dy)
    prof = Profiler(model)
    got, inside = _run_model(model, x, dy, prof)
    for (ya, dxa, ga), (yb, dxb, gb) in zip(ref, got):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(dxa, dxb)
        for a, b in zip(ga, gb):
            np.testing.assert_array_equal(a, b)

    s = prof.summary()
    assert s["nsteps"] == 2
    leaves = [n for n, m in model.named_modules() if not list(m.children())]
    for n in leaves:
        assert s["layers"][n]["forward_calls"] == 2
        assert s["layers"][n]["backward_calls"] == 2
    # per-layer bytes (plus communication outside the leaves) == stats() totals
    for f in ("bytes_sent", "bytes_recv"):
        want = inside["total"][f]
        assert sum(d[f] for d in s["layers"].values()) == want
        assert s["totals"][f] == want
        # per kind too
        for kind, v in inside.items():
            if kind == "total":
                continue
            w = v[f]
            assert sum(d["comm_by_kind"].get(kind, {}).get(f, 0)
                       for d in s["layers"].values()) == w
    if comm.size > 1:
        assert sum(s["layers"][n]["bytes_sent"] for n in leaves) > 0
    for n in leaves:
        d = s["layers"][n]
        assert d["compute_s"] == pytest.approx(d["wall_s"] - d["comm_s"])
        assert d["wall_s"] >= 0
    ps = s["per_step"]
    assert ps["wall_s"] > 0 and ps["exposed_comm_s"] >= 0
    assert OUTSIDE not in s["layers"] or s["layers"][OUTSIDE]["compute_s"] == 0.0
    text = prof.table()
    assert leaves[0] in text and "exposed comm" in text
    path = Path(f"/tmp/_prof_{comm.rank}_{comm.size}_{which}.json")
    prof.to_json(path)
    import json
    assert json.loads(path.read_text())["nsteps"] == 2
    path.unlink()
    # remove() restores the methods; outputs still the same
    prof.remove()
    again, _ = _run_model(model, x, dy)
    np.testing.assert_array_equal(again[0][0], ref[0][0])
    assert len(prof.steps) == 2


def _script(*args, timeout=60):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=timeout)


def test_help_and_dry_run(tmp_path):
    r = _script("--help")
    assert r.returncode == 0 and "--strategies" in r.stdout and "--launcher" in r.stdout
    r = _script("--dry-run", "--ranks", "1,2", "--strategies", "sample;filter=2",
                "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    cmds = [ln for ln in r.stdout.splitlines() if "--worker" in ln]
    assert len(cmds) == 3
    assert any("-n 2" in c and "--strategy filter=2" in c for c in cmds)
    assert "does not fit 1 rank" in r.stdout
    assert not (tmp_path / "scaling.csv").exists()
    r = _script("--dry-run", "--launcher", "srun", "--ranks", "2", "--strategies", "sample")
    assert r.returncode == 0 and r.stdout.strip().startswith("srun -n 2")


def test_quick_end_to_end(tmp_path):
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location("scaling_script", SCRIPT)
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "tmp"
    r = _script("--quick", "--out", out, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out / "scaling.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert list(rows[0].keys()) == mod.COLUMNS
    assert [int(r["ranks"]) for r in rows] == [1, 2]
    for row in rows:
        for k, v in row.items():
            if k not in ("strategy", "mode", "model"):
                assert np.isfinite(float(v)), (k, v)
        assert float(row["step_s"]) > 0 and float(row["images_per_s"]) > 0
        assert float(row["peak_rss_mb"]) > 0
    assert float(rows[0]["speedup"]) == pytest.approx(1.0)
    assert float(rows[1]["grad_bytes_per_rank"]) > 0
    assert float(rows[1]["dp_grad_bytes_per_rank"]) > 0
    for name in ("speedup.png", "efficiency.png", "breakdown.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIG
