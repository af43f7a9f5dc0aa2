"""Tests of the MPI test harness itself (tests/mpi_harness.py).

The cases marked @mpi run for real under mpiexec; the negative controls write
a test module into tmp_path and run pytest on it in a subprocess, then read
its JUnit XML and terminal output.
"""
import os
import re
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.mpi_harness import REPO_ROOT, MpiTimeoutError, mpi, mpi_tmp_path, run_mpi_script

# --------------------------------------------------------------------------- (a) real cases


@mpi(ranks=(1, 2, 3, 4), timeout=30)
def test_collective_at_each_rank_count(comm):
    from mpi4py import MPI

    assert comm.size == MPI.COMM_WORLD.size
    assert MPI.Comm.Compare(comm, MPI.COMM_WORLD) == MPI.CONGRUENT  # a dup, not WORLD
    assert comm.allreduce(comm.rank + 1) == comm.size * (comm.size + 1) // 2
    assert os.environ["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("n", [0, 3, pytest.param(10, id="ten")])
@pytest.mark.parametrize("dtype, scale", [("float32", 1.0), ("float64", 2.5)])
@mpi(ranks=(2, 3), timeout=30)
def test_parametrize_stacks_on_mpi(comm, n, dtype, scale):
    import numpy as np

    assert comm.allgather((n, dtype, scale)) == [(n, dtype, scale)] * comm.size
    x = np.full(n, comm.rank * scale, dtype=dtype)
    total = np.empty_like(x)
    comm.Allreduce(x, total)
    np.testing.assert_allclose(total, scale * comm.size * (comm.size - 1) / 2)


@mpi(ranks=(2,), timeout=30)
def test_shared_tmp_path(comm):
    with mpi_tmp_path(comm) as d:
        if comm.rank == 0:
            (d / "x.txt").write_text("hi")
        comm.Barrier()
        assert (d / "x.txt").read_text() == "hi"


# --------------------------------------------------------------------------- negative controls

NEGATIVE = '''
import pytest
from tests.mpi_harness import mpi


@mpi(ranks=(1, 2, 4), timeout=20)
def test_ok(comm):
    assert comm.allreduce(1) == comm.size


@mpi(ranks=(2,), timeout=20)
def test_fail_rank1(comm):
    comm.Barrier()
    print(f"hello from rank {comm.rank}")
    if comm.rank == 1:
        raise ValueError("boom on rank one")


@mpi(ranks=(2,), timeout=30)
def test_fail_fast(comm):
    if comm.rank == 1:
        raise KeyError("rank one left early")
    comm.Barrier()  # rank 0 waits here for rank 1, which never comes


@mpi(ranks=(2,), timeout=3)
def test_hang(comm):
    if comm.rank == 0:
        comm.Barrier()  # rank 1 never joins


@mpi(ranks=(2,), timeout=20)
def test_after_hang(comm):
    assert comm.allreduce(comm.rank) == 1


@mpi(ranks=(2,), timeout=20)
def test_skipped_inside(comm):
    pytest.skip("not today")


@mpi(ranks=(1, 3), timeout=20)
def test_capped(comm):
    pass
'''


def _run_pytest(tmp_path: Path, *extra):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_negative.py").write_text(textwrap.dedent(NEGATIVE))
    xml = tmp_path / f"report{len(list(tmp_path.glob('report*.xml')))}.xml"
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["DISTCONV_TEST_MAX_RANKS"] = "2"
    env["DISTCONV_TEST_OUTDIR"] = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.mpi_harness", "-p", "no:cacheprovider",
           "-rA", f"--junitxml={xml}", *extra, "test_negative.py"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=150)
    elapsed = time.monotonic() - t0
    outcomes = {}
    for tc in ET.parse(xml).getroot().iter("testcase"):
        status, text = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                status = "failed" if tag in ("failure", "error") else "skipped"
                text = (el.get("message") or "") + "\n" + (el.text or "")
        outcomes[tc.get("name")] = (status, text)
    return proc, outcomes, elapsed


@pytest.fixture(scope="module")
def negative(tmp_path_factory):
    return _run_pytest(tmp_path_factory.mktemp("negative"))


def test_negative_control_outcomes(negative):
    proc, outcomes, elapsed = negative
    got = {name: status for name, (status, _) in outcomes.items()}
    assert got == {
        "test_ok[np=1]": "passed",
        "test_ok[np=2]": "passed",
        "test_ok[np=4]": "skipped",          # DISTCONV_TEST_MAX_RANKS=2
        "test_fail_rank1[np=2]": "failed",
        "test_fail_fast[np=2]": "failed",
        "test_hang[np=2]": "failed",
        "test_after_hang[np=2]": "passed",   # relaunched after the hang's abort
        "test_skipped_inside[np=2]": "skipped",
        "test_capped[np=1]": "passed",
        "test_capped[np=3]": "skipped",
    }, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 1
    assert "DISTCONV_TEST_MAX_RANKS=2" in outcomes["test_capped[np=3]"][1]
    assert "not today" in outcomes["test_skipped_inside[np=2]"][1]


def test_negative_failure_on_one_rank_shows_its_traceback(negative):
    proc, outcomes, _ = negative
    text = outcomes["test_fail_rank1[np=2]"][1]
    assert "failed on rank(s) 1 of 2" in text
    assert "---- rank 1 ----" in text and "---- rank 0 ----" not in text
    assert "ValueError: boom on rank one" in text
    assert 'test_negative.py", line' in text  # the test's own frame
    # each rank's output comes back, separately
    assert "hello from rank 0" in proc.stdout and "hello from rank 1" in proc.stdout
    assert "Captured stdout+stderr (rank 1)" in proc.stdout
    assert "mpiexec" in text and "-n 2" in text  # the command line is shown


def test_negative_failure_before_collective_is_fast(negative):
    _, outcomes, _ = negative
    text = outcomes["test_fail_fast[np=2]"][1]
    assert "failed on rank(s) 1 while rank(s) 0 stayed inside the case" in text
    assert "KeyError: 'rank one left early'" in text


def test_negative_hang_times_out_and_next_case_runs(negative):
    proc, outcomes, elapsed = negative
    text = outcomes["test_hang[np=2]"][1]
    assert "timed out after 3s (hang?)" in text
    m = re.search(r"the job was aborted ([0-9.]+)s after the case started", text)
    assert m and float(m.group(1)) < 3 + 7, text
    # every rank printed where it was stuck
    assert "in test_hang" in proc.stdout
    assert outcomes["test_after_hang[np=2]"][0] == "passed"
    # fail-fast (3 s grace) + hang (3 s) + launches; without the aborts it would take
    # the overall limit of a launch (> 120 s)
    assert elapsed < 60, elapsed


def test_keyword_selection_runs_only_selected(tmp_path):
    proc, outcomes, _ = _run_pytest(tmp_path, "-k", "test_ok and np2")
    assert outcomes == {"test_ok[np=2]": ("passed", "")}, proc.stdout[-3000:]
    assert proc.returncode == 0


# --------------------------------------------------------------------------- run_mpi_script

RAISES = """
from mpi4py import MPI
comm = MPI.COMM_WORLD
if comm.rank == 1:
    raise RuntimeError("rank 1 gives up")
comm.Barrier()
"""


def test_run_mpi_script_rank_raises_exits_nonzero_quickly():
    t0 = time.monotonic()
    res = run_mpi_script(RAISES, 3, timeout=15)
    assert time.monotonic() - t0 < 15
    assert res.returncode != 0
    assert "rank 1 gives up" in res.stdout + res.stderr


def test_run_mpi_script_path_and_args(tmp_path):
    script = tmp_path / "hello.py"
    script.write_text("import sys\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n"
                      "got = c.gather((c.rank, c.size, sys.argv[1:]))\n"
                      "if c.rank == 0:\n    print('GOT', got)\n")
    res = run_mpi_script(str(script), 2, timeout=30, args=("--x", 3))
    assert res.returncode == 0, res.stderr
    assert "GOT [(0, 2, ['--x', '3']), (1, 2, ['--x', '3'])]" in res.stdout


def _procs_with(token: str):
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if token.encode() in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
            except OSError:
                pass
    return found


def test_run_mpi_script_timeout_kills_the_job():
    token = f"hang_token_{os.getpid()}_{time.time_ns()}"
    code = f"# {token}\nfrom mpi4py import MPI\nif MPI.COMM_WORLD.rank == 0:\n" \
           "    MPI.COMM_WORLD.Barrier()\n"
    t0 = time.monotonic()
    with pytest.raises(MpiTimeoutError, match="did not finish within 2"):
        run_mpi_script(code, 2, timeout=2)
    assert time.monotonic() - t0 < 12
    time.sleep(0.5)
    assert _procs_with(token) == []
