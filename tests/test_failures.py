"""Failure behaviour of scripts/train.py under real mpiexec jobs.

* a rank that raises, or is killed with SIGKILL, mid-step ends the whole 2- or 4-rank
  job with a non-zero status within 15 s (no rank left hanging);
* a crash between writing and renaming a checkpoint keeps the previous checkpoint
  valid, and ``--resume`` from it ends exactly where a run that never crashed ends;
* SIGUSR1/SIGTERM (what Slurm's ``--signal`` sends) make every rank write a checkpoint
  at the next step boundary and exit 0, and ``--resume`` continues exactly.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mpi_harness import child_env, mpiexec_command, run_mpi_script
from tests.test_train import (RESUME, TRAIN, assert_same_checkpoint, ckpt, digits,  # noqa: F401
                              metrics, steps, straight, train)


@pytest.mark.parametrize("kind", ["raise", "kill"])
@pytest.mark.parametrize("nranks", [2, 4])
def test_failing_rank_ends_the_job_quickly(digits, tmp_path, nranks, kind):  # noqa: F811
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = run_mpi_script(TRAIN, nranks, 60, args=["--width", "4", "--batch-size", "32",
                                                "--data", digits[0], "--out", str(out)],
                       env={"DISTCONV_FAULT": f"{kind}@rank=1,step=3"}, cwd=str(tmp_path))
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert took < 15, f"the job took {took:.1f} s to end after rank 1 failed"
    if kind == "raise":
        assert "[rank 1] uncaught exception" in r.stderr and "injected fault" in r.stderr


def test_crash_while_writing_checkpoint_keeps_previous(digits, straight, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    r = train(2, out, *RESUME, data=digits[0], test_data=digits[1], ok=False,
              env={"DISTCONV_FAULT": "checkpoint@epoch=2"})
    assert r.returncode != 0 and "injected fault" in r.stderr
    assert ckpt(out)[1]["loader"]["epoch"] == 1  # the epoch-1 checkpoint is intact
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # no temporary file left
    train(2, out, *RESUME, "--resume", data=digits[0], test_data=digits[1])
    assert_same_checkpoint(out, straight)


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
        if str(out).encode() in cmd and any(b"python" in c for c in cmd[:1]) \
                and any(c.endswith(b"train.py") for c in cmd):
            pids.append(int(d))
    return pids


WIDE = ["--width", "16", "--log-every", "1", "--dtype", "float64"]  # slow enough to signal


@pytest.fixture(scope="module")
def straight16(digits, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("straight16") / "out"
    train(2, out, *WIDE, *RESUME, data=digits[0], test_data=digits[1])
    return out


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_and_exits_zero(digits, straight16, tmp_path, sig):  # noqa: F811
    out = tmp_path / "out"
    argv = [*WIDE, *RESUME,
            "--data", digits[0], "--test-data", digits[1], "--out", str(out)]
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
        for pid in pids[:1]:  # like Slurm's signal to one task: the ranks agree anyway
            os.kill(pid, sig)
        so, se = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, se
    assert "checkpoint written at step" in so
    stopped_at = ckpt(out)[1]["step"]
    assert 3 <= stopped_at < 46
    train(2, out, *WIDE, *RESUME, "--resume", data=digits[0], test_data=digits[1])
    assert_same_checkpoint(out, straight16)
    assert [r["step"] for r in steps(metrics(out))][-1] == 46


GUARDED = """
import sys
from mpi4py import MPI
from distconv.comm import run_guarded

def main(mode):
    r = MPI.COMM_WORLD.Get_rank()
    if mode == "alone" and r == 1:
        raise ValueError("rank 1 alone fails")
    if mode == "all":
        raise ValueError(f"every rank fails (rank {r})")
    MPI.COMM_WORLD.Barrier()  # the others wait here for rank 1 forever

sys.exit(run_guarded(main, sys.argv[1]))
"""


@pytest.mark.parametrize("mode", ["alone", "all"])
@pytest.mark.parametrize("nranks", [2, 4])
def test_run_guarded_entry_point(tmp_path, nranks, mode):
    """The guard every script uses: a lone failing rank aborts the job; ranks failing alike
    all get their message out and exit 1."""
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED)
    t0 = time.monotonic()
    r = run_mpi_script(str(script), nranks, 30, args=[mode], cwd=str(tmp_path))
    assert r.returncode != 0 and time.monotonic() - t0 < 15
    if mode == "alone":
        assert "[rank 1] uncaught exception" in r.stderr and "rank 1 alone fails" in r.stderr
    else:
        for k in range(nranks):
            assert f"every rank fails (rank {k})" in r.stderr


def test_soak_random_crashes_and_resumes_match_straight_run(digits, straight, tmp_path):  # noqa: F811
    """--quick soak: the 46 steps of the straight run with a checkpoint every 3 steps; the
    job is crashed at random steps (a rank raises) and resumed from the last periodic
    checkpoint each time, sometimes on another rank count. It ends with exactly the
    straight run's weights and optimizer state."""
    import numpy as np

    rng = np.random.default_rng(1)
    out = tmp_path / "out"
    crashes = sorted(rng.choice(np.arange(5, 46), size=5, replace=False).tolist())
    args = [*RESUME, "--checkpoint-every", "3"]
    for k, at in enumerate(crashes):
        nranks = 1 if k % 3 == 2 else 2  # any rank count can resume any checkpoint
        r = train(nranks, out, *args, *(["--resume"] if k else []), data=digits[0],
                  test_data=digits[1], ok=False,
                  env={"DISTCONV_FAULT": f"raise@rank=0,step={at}"})
        if r.returncode == 0:  # the checkpoint it resumed from was already past `at`
            continue
        assert "injected fault" in r.stderr
        # the last checkpoint before step `at`: periodic (every 3) or end of epoch (23)
        assert ckpt(out)[1]["step"] == max(3 * ((at - 1) // 3), 23 * ((at - 1) // 23))
    train(2, out, *args, "--resume", data=digits[0], test_data=digits[1])
    assert ckpt(out)[1]["step"] == 46
    assert_same_checkpoint(out, straight, rtol=1e-10)


def test_empty_dataset_is_an_error(tmp_path):
    import numpy as np

    from distconv.data import write_h5_dataset

    p = write_h5_dataset(str(tmp_path / "zero.h5"), np.zeros((0, 1, 8, 8), np.float32),
                         np.zeros((0,), np.int64), num_classes=10)
    r = train(2, tmp_path / "out", data=p, ok=False)
    assert r.returncode != 0 and "holds no samples" in r.stderr and "zero.h5" in r.stderr
