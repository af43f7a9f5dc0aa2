"""``scripts/train.py --profile`` under real ``mpiexec`` jobs, and the Slurm templates.

* ``--profile`` on 2 ranks prints rank 0's per-layer table and writes ``OUT/profile.json``
  with both ranks' summaries (the warm-up step left out, the evaluation not profiled);
  the loss trajectory is the same as without it, and without it nothing is written;
* a signal stop still writes the profile;
* every ``slurm/*.sbatch`` passes ``bash -n``, uses ``srun`` and has its "edit for your
  cluster" block; the scaling templates print their ``srun`` commands with ``--dry-run``
  and refuse an allocation smaller than the largest rank count.
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mpi_harness import child_env, mpiexec_command, run_mpi_script
from tests.test_train import TRAIN, digits, metrics, steps  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "slurm"
TIMEOUT = 120  # s per job
ARGS = ["--width", "8", "--batch-size", "32", "--log-every", "1", "--dtype", "float64",
        "--epochs", "1", "--max-steps", "3"]


def run_train(out, digits, *extra):  # noqa: F811
    argv = ARGS + ["--out", str(out), "--data", digits[0], "--test-data", digits[1],
                   *extra]
    r = run_mpi_script(TRAIN, 2, TIMEOUT, args=argv, cwd=str(Path(out).parent))
    assert r.returncode == 0, f"train.py failed:\n{r.stdout}\n{r.stderr}"
    return r


def test_help_documents_profile():
    spec = importlib.util.spec_from_file_location("train_script", TRAIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "--profile" in mod.build_parser().format_help()
    assert "--profile" in mod.__doc__


def check_profile(out, nsteps, skip):
    with open(Path(out) / "profile.json") as f:
        prof = json.load(f)
    assert prof["ranks"] == 2 and prof["skip"] == skip
    per = prof["per_rank"]
    assert [s["rank"] for s in per] == [0, 1]
    for s in per:
        assert s["nsteps"] == nsteps
        layers = s["layers"]
        assert "conv1" in layers and "fc" in layers
        # one forward per profiled step: the test-accuracy evaluation is not profiled
        assert layers["conv1"]["forward_calls"] == nsteps
        assert layers["conv1"]["backward_calls"] == nsteps
        sent = sum(d["bytes_sent"] for d in layers.values())
        assert sent > 0
        assert sent == pytest.approx(s["totals"]["bytes_sent"])  # layers + (outside)
        assert s["per_step"]["wall_s"] > 0
        assert all(st["wall_s"] > 0 for st in s["steps"]) and len(s["steps"]) == nsteps
        # the gradient allreduce (overlapped, waited for in opt.step) is in the step
        assert s["per_step"]["exposed_comm_s"] > 0
    for k in ("wall_s", "comm_s", "exposed_comm_s", "bytes_sent"):
        assert prof["max_over_ranks"][k] == max(s["per_step"][k] for s in per)
    return prof


def test_profile_table_and_json(digits, tmp_path):  # noqa: F811
    out = tmp_path / "prof"
    r = run_train(out, digits, "--profile")
    assert "layer" in r.stdout and "comm ms" in r.stdout and "(outside)" in r.stdout
    assert "profile of rank 0" in r.stdout and "first step skipped" in r.stdout
    check_profile(out, nsteps=2, skip=1)  # 3 steps, the first one skipped
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

    # without --profile: no table, no profile.json, and the same training
    plain = tmp_path / "plain"
    r2 = run_train(plain, digits)
    assert "comm ms" not in r2.stdout and "profile of rank 0" not in r2.stdout
    assert not (plain / "profile.json").exists()
    a, b = steps(metrics(out)), steps(metrics(plain))
    assert [x["step"] for x in a] == [1, 2, 3] == [x["step"] for x in b]
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    assert [x["accuracy"] for x in a] == [x["accuracy"] for x in b]


def test_profile_single_step_not_skipped(digits, tmp_path):  # noqa: F811
    out = tmp_path / "one"
    r = run_train(out, digits, "--profile", "--max-steps", "1")
    assert "comm ms" in r.stdout and "first step skipped" not in r.stdout
    check_profile(out, nsteps=1, skip=0)


def _ranks_of(out: Path):
    """PIDs of the python ranks whose command line names ``out``."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and os.path.basename(cmd[0]).startswith(b"python") \
                and str(out).encode() in cmd and any(c.endswith(b"train.py") for c in cmd):
            pids.append(int(d))
    return pids


def test_profile_written_on_signal_stop(digits, tmp_path):  # noqa: F811
    out = tmp_path / "sig"
    argv = ["--width", "16", "--batch-size", "32", "--log-every", "1", "--epochs", "30",
            "--profile", "--data", digits[0], "--test-data", digits[1], "--out", str(out)]
    p = subprocess.Popen(mpiexec_command(2) + [sys.executable, TRAIN] + argv,
                         cwd=str(tmp_path), env=child_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        t_end = time.monotonic() + 60
        while time.monotonic() < t_end:  # wait for a few logged steps
            f = out / "metrics.jsonl"
            if f.exists() and sum(1 for _ in open(f)) >= 3:
                break
            time.sleep(0.01)
        pids = _ranks_of(out)
        assert len(pids) == 2, pids
        os.kill(pids[0], signal.SIGUSR1)
        so, se = p.communicate(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, se
    m = re.search(r"checkpoint written at step (\d+)", so)
    assert m, so
    assert "comm ms" in so
    check_profile(out, nsteps=int(m.group(1)) - 1, skip=1)


# ------------------------------------------------------------------ Slurm templates
SBATCH = sorted(SLURM.glob("*.sbatch"))


def test_sbatch_templates_exist():
    names = {p.name for p in SBATCH}
    assert {"train.sbatch", "strong_scaling.sbatch", "weak_scaling.sbatch"} <= names


@pytest.mark.parametrize("path", SBATCH, ids=[p.name for p in SBATCH])
def test_sbatch_syntax_and_edit_block(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    text = path.read_text()
    # srun on a line that is not a comment (train.sbatch's own srun, or --launcher srun)
    assert any("srun" in ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "edit for your cluster" in text
    assert "#SBATCH" in text


def _bash(path, *args, env=None, timeout=60):
    e = dict(os.environ)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    for k in [k for k in e if k.startswith("SLURM_")]:
        del e[k]
    e.update(env or {})
    return subprocess.run(["bash", str(path), *args], cwd=str(REPO), env=e,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("mode", ["strong", "weak"])
def test_scaling_sbatch_dry_run(mode, tmp_path):
    path = SLURM / f"{mode}_scaling.sbatch"
    text = path.read_text()
    ranks = re.search(r"^RANKS=\$\{RANKS:-([\d,]+)\}", text, re.M).group(1)
    biggest = max(int(x) for x in ranks.split(","))
    assert re.search(rf"^#SBATCH --ntasks={biggest}\b", text, re.M)
    assert "#SBATCH --gpus-per-task=1" in text
    assert "DISTCONV_CUDA_AWARE=1" in text and "DISTCONV_BACKEND=cupy" in text
    r = _bash(path, "--dry-run", env={"OUT": str(tmp_path / "o")})
    assert r.returncode == 0, r.stdout + r.stderr
    cmds = [ln for ln in r.stdout.splitlines() if ln.startswith("srun -n ")]
    assert cmds and all(f"--mode {mode}" in c and "--worker" in c for c in cmds)
    assert {int(c.split()[2]) for c in cmds} == {int(x) for x in ranks.split(",")}
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    # an allocation smaller than the largest rank count is refused at once
    r = _bash(path, "--dry-run", env={"OUT": str(tmp_path / "o"), "SLURM_NTASKS": "2"})
    assert r.returncode != 0 and f"--ntasks={biggest}" in r.stderr
