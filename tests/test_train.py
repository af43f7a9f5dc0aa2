"""scripts/train.py end to end, under real ``mpiexec`` jobs.

* the loss trajectory of ~15 steps on the digits data (float64) is the same on 1 rank
  and on 2 and 4 ranks under sample, channel, filter, mixed and per-layer-plan strategies;
* resuming (after a whole epoch, or mid-epoch after ``--max-steps``) gives the same final
  checkpoint and the same metrics as training straight through, also when the 2-rank
  checkpoint is resumed on 1 rank or on 4 ranks with another strategy;
* bad input (missing/corrupt/truncated data file, missing datasets, labels out of range,
  empty images, a checkpoint of another model) ends the job quickly with a non-zero
  status and an error naming the file and the problem, and leaves the previous
  checkpoint and metrics byte for byte as they were;
* the default command (no ``--data``) writes the digits files, metrics and checkpoint.

Each job is small (``--width 4``, float64, a few dozen steps), and one digits data
folder is shared by the whole session.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.mpi_harness import run_mpi_script

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "scripts" / "train.py")
SMALL = ["--width", "4", "--batch-size", "32", "--log-every", "1", "--dtype", "float64"]
TIMEOUT = 120  # s per job; a job that hangs fails the test with every rank's output
EXACT_KEYS = ("kind", "epoch", "step", "accuracy", "test_accuracy")  # compared exactly
CLOSE_KEYS = ("loss", "lr")                                          # compared to rtol


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """(train, test) digits HDF5 files, written once per session."""
    from distconv.data import make_digits

    return tuple(str(p) for p in make_digits(tmp_path_factory.mktemp("digits")))


def train(nranks, out, *args, data=None, test_data=None, ok=True, env=None):
    """Run train.py on ``nranks`` ranks in ``out``'s parent folder; returns the
    CompletedProcess (and checks the exit status if ``ok``); ``env`` adds variables."""
    argv = SMALL + ["--out", str(out)] + [str(a) for a in args]
    if data is not None:
        argv += ["--data", data]
    if test_data is not None:
        argv += ["--test-data", test_data]
    r = run_mpi_script(TRAIN, nranks, TIMEOUT, args=argv, cwd=str(Path(out).parent), env=env)
    if ok:
        assert r.returncode == 0, f"train.py failed:\n{r.stdout}\n{r.stderr}"
    return r


def metrics(out):
    with open(Path(out) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def steps(recs, first=1, last=None):
    return [r for r in recs if r["kind"] == "step" and r["step"] >= first
            and (last is None or r["step"] <= last)]


def assert_same_records(got, want, rtol):
    assert len(got) == len(want) and got, (len(got), len(want))
    for g, w in zip(got, want):
        for k in EXACT_KEYS:
            assert g.get(k) == w.get(k), (k, g, w)
        for k in CLOSE_KEYS:
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=rtol, abs=1e-300), (k, g, w)


def ckpt(out):
    """{dataset name: array} of every dataset (model and optimizer) and the meta dict."""
    import h5py

    arrays = {}
    with h5py.File(Path(out) / "checkpoint.h5", "r") as f:
        f.visititems(lambda n, o: arrays.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset)
                     else None)
        meta = json.loads(f.attrs["meta"])
        sched = json.loads(f["scheduler"].attrs["state"])
    return arrays, meta, sched


def assert_same_checkpoint(a, b, rtol=0.0):
    (xa, ma, sa), (xb, mb, sb) = ckpt(a), ckpt(b)
    assert sorted(xa) == sorted(xb)
    assert any(k.startswith("model/") for k in xa) and any(k.startswith("optimizer/")
                                                           for k in xa)
    for k in xa:
        if rtol == 0:
            np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)
        else:
            np.testing.assert_allclose(xa[k], xb[k], rtol=rtol, atol=rtol, err_msg=k)
    assert ma["step"] == mb["step"] and ma["loader"] == mb["loader"]
    assert sa == sb


# ------------------------------------------------------------------ 1. strategies
PLAN2 = {"": "sample=*", "layer1": "sample=1,channel=2", "layer2.0.conv2": "sample=1,filter=2",
         "layer2.0.downsample": "sample=2", "fc": "sample=1,channel=2"}
PLAN4 = {"plan": {"": {"sample": None}, "layer1": "sample=2,filter=2",
                  "layer2": {"sample": 1, "channel": 2, "filter": 2},
                  "fc": "sample=1,filter=4"}}
STRATEGIES = [(2, "sample=2"), (2, "sample=1,channel=2"), (2, "sample=1,filter=2"),
              (2, "mixed"), (2, PLAN2), (4, "sample=2,channel=2"), (4, PLAN4)]


@pytest.fixture(scope="session")
def reference_run(digits, tmp_path_factory):
    """15 steps on 1 rank (default strategy)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    train(1, out, "--max-steps", 15, "--epochs", 1, data=digits[0])
    return metrics(out)


@pytest.mark.parametrize("nranks,strategy", STRATEGIES,
                         ids=[f"np{n}-{s if isinstance(s, str) else 'plan'}"
                              for n, s in STRATEGIES])
def test_same_loss_trajectory_on_any_ranks_and_strategy(digits, reference_run, tmp_path,
                                                        nranks, strategy):
    if isinstance(strategy, dict):
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps(strategy))
        strategy = str(plan)
    out = tmp_path / "out"
    r = train(nranks, out, "--max-steps", 15, "--epochs", 1, "--strategy", strategy,
              data=digits[0])
    assert f"on {nranks} rank(s)" in r.stdout
    ref = steps(reference_run)
    assert len(ref) == 15
    assert ref[-1]["loss"] < ref[0]["loss"]  # it learns
    recs = metrics(out)
    assert_same_records(steps(recs), ref, rtol=1e-9)
    ep = [x for x in recs if x["kind"] == "epoch"]
    assert len(ep) == 1 and ep[0]["step"] == 15
    arrays, meta, _ = ckpt(out)
    assert meta["step"] == 15 and meta["loader"]["batch"] == 15
    if nranks > 1:
        assert all(x["bytes_sent"] > 0 for x in steps(recs))


def test_strategy_auto_plans_for_the_job_and_resume_reuses_the_plan(digits, reference_run,
                                                                    tmp_path):
    """``--strategy auto``: calibrate + measure + search on the job, OUT/plan.json names a
    strategy for every conv/linear/bn layer, the run follows the 1-rank trajectory, and
    ``--resume`` keeps that plan."""
    from distconv import models
    from distconv.planner.graph import trace
    from distconv.planner.planfile import load_plan

    out = tmp_path / "out"
    env = {"DISTCONV_CACHE_DIR": str(tmp_path / "cache")}
    r = train(2, out, "--max-steps", 15, "--epochs", 1, "--strategy", "auto", data=digits[0],
              env=env)
    assert "calibrating the links" in r.stdout
    assert "predicted speedup over pure data parallelism" in r.stdout
    plan = load_plan(out / "plan.json")
    names = trace(models.small_resnet(10, in_channels=1, width=4), (32, 1, 8, 8)).strategic_names()
    assert sorted(plan) == sorted(names)
    assert all(s * c * f == 2 for s, c, f in plan.values())
    assert (tmp_path / "cache" / "compute_profile.json").exists()
    assert_same_records(steps(metrics(out)), steps(reference_run), rtol=1e-9)
    doc = json.loads((out / "plan.json").read_text())
    assert doc["predicted"]["step_s"] > 0 and doc["meta"]["ranks"] == 2
    r = train(2, out, "--resume", "--epochs", 2, "--max-steps", 17, "--strategy", "auto",
              data=digits[0], env=env)
    assert "reusing the plan" in r.stdout and "calibrating" not in r.stdout
    assert load_plan(out / "plan.json") == plan


def test_strategy_auto_with_an_unknown_machine_fails_on_every_rank(digits, tmp_path):
    t0 = time.monotonic()
    r = train(2, tmp_path / "out", "--strategy", "auto", "--machine", "nosuch_cluster",
              "--max-steps", 2, data=digits[0], ok=False)
    assert r.returncode != 0 and time.monotonic() - t0 < TIMEOUT
    assert "no built-in machine 'nosuch_cluster'" in r.stdout + r.stderr


# ------------------------------------------------------------------ 2. resume
RESUME = ["--batch-size", "64", "--epochs", "2"]  # 23 steps per epoch, last batch partial


@pytest.fixture(scope="session")
def straight(digits, tmp_path_factory):
    """2 epochs straight through on 2 ranks (mixed plan), with test accuracy."""
    out = tmp_path_factory.mktemp("straight") / "out"
    train(2, out, *RESUME, data=digits[0], test_data=digits[1])
    return out


@pytest.fixture(scope="session")
def first_epoch(digits, tmp_path_factory):
    """The first epoch only (``--epochs 1``, then the job ends), on 2 ranks."""
    out = tmp_path_factory.mktemp("epoch1") / "out"
    train(2, out, "--batch-size", 64, "--epochs", 1, data=digits[0], test_data=digits[1])
    return out


def _copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_resume_after_an_epoch_is_exact(digits, straight, first_epoch, tmp_path):
    out = _copy(first_epoch, tmp_path, "resumed")
    r = train(2, out, *RESUME, "--resume", data=digits[0], test_data=digits[1])
    assert "resumed from" in r.stdout
    assert_same_checkpoint(out, straight)
    want, got = metrics(straight), metrics(out)
    assert_same_records([x for x in got if x["epoch"] == 2],
                        [x for x in want if x["epoch"] == 2], rtol=0)
    # the metrics file keeps the first epoch and appends the second
    assert [x["step"] for x in steps(got)] == list(range(1, 47))


def test_resume_mid_epoch_is_exact(digits, straight, tmp_path):
    out = tmp_path / "out"
    train(2, out, *RESUME, "--max-steps", 30, data=digits[0], test_data=digits[1])
    assert ckpt(out)[1]["loader"]["epoch"] == 1 and ckpt(out)[1]["loader"]["batch"] == 7
    train(2, out, *RESUME, "--resume", data=digits[0], test_data=digits[1])
    assert_same_checkpoint(out, straight)
    got, want = metrics(out), metrics(straight)
    assert_same_records(steps(got, 31), steps(want, 31), rtol=0)
    assert got[-1]["kind"] == "epoch" and got[-1]["test_accuracy"] == want[-1]["test_accuracy"]


@pytest.mark.parametrize("nranks,strategy", [(1, "mixed"), (4, "sample=2,channel=2")])
def test_resume_on_other_rank_count_and_strategy(digits, straight, first_epoch, tmp_path,
                                                 nranks, strategy):
    out = _copy(first_epoch, tmp_path, "resumed")
    train(nranks, out, *RESUME, "--resume", "--strategy", strategy, data=digits[0],
          test_data=digits[1])
    assert_same_checkpoint(out, straight, rtol=1e-10)
    got = [x for x in metrics(out) if x["epoch"] == 2]
    assert_same_records(got, [x for x in metrics(straight) if x["epoch"] == 2], rtol=1e-10)


# ------------------------------------------------------------------ 3. bad input
@pytest.fixture(scope="session")
def good_run(digits, tmp_path_factory):
    """A short 2-rank run whose checkpoint and metrics the failing runs must not touch."""
    out = tmp_path_factory.mktemp("good") / "out"
    train(2, out, "--max-steps", 3, "--epochs", 1, data=digits[0])
    return out


def _write(path, **datasets):
    import h5py

    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
            if k == "labels":
                f[k].attrs["num_classes"] = 10
    return str(path)


def _images(n=40, shape=(1, 8, 8)):
    return np.random.default_rng(0).random((n,) + shape, dtype=np.float32)


def _labels(n=40):
    return np.arange(n) % 10


def bad_data(kind, tmp, digits):
    """(extra train.py args, what stderr must contain besides the file name, file name)."""
    if kind == "missing":
        return ["--data", str(tmp / "nope.h5")], "does not exist", "nope.h5"
    if kind == "corrupt":
        p = tmp / "corrupt.h5"
        p.write_bytes(np.random.default_rng(0).bytes(4096))
        return ["--data", str(p)], "not an HDF5 file", p.name
    if kind == "truncated":
        p = tmp / "truncated.h5"
        p.write_bytes(Path(digits[0]).read_bytes()[:20000])
        return ["--data", str(p)], "truncated", p.name
    if kind == "no_images":
        p = _write(tmp / "noimg.h5", labels=_labels())
        return ["--data", p], "has no images dataset 'images'", "noimg.h5"
    if kind == "no_labels":
        p = _write(tmp / "nolab.h5", images=_images())
        return ["--data", p], "has no labels dataset 'labels'", "nolab.h5"
    if kind == "label_attr":
        lab = _labels()
        lab[7] = 12
        p = _write(tmp / "lab12.h5", images=_images(), labels=lab)
        return ["--data", p], "must be in [0, 10)", "lab12.h5"
    if kind == "label_num_classes":
        import h5py

        p = tmp / "lab11.h5"
        with h5py.File(p, "w") as f:
            f["images"], f["labels"] = _images(), np.where(_labels() == 9, 11, _labels())
        return ["--data", str(p), "--num-classes", "10"], "must be in [0, 10)", p.name
    if kind == "label_negative":
        lab = _labels()
        lab[3] = -1
        p = _write(tmp / "neg.h5", images=_images(), labels=lab)
        return ["--data", p], "labels[3] = -1", "neg.h5"
    if kind == "empty_images":
        p = _write(tmp / "empty.h5", images=_images(shape=(1, 0, 0)), labels=_labels())
        return ["--data", p], "are empty", "empty.h5"
    if kind == "images_3d":
        p = _write(tmp / "img3d.h5", images=_images()[:, 0], labels=_labels())
        return ["--data", p], "must be 4-d", "img3d.h5"
    raise AssertionError(kind)


def _snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


def _assert_fails(r, t0, needles):
    dt = time.monotonic() - t0
    text = r.stderr + r.stdout
    assert r.returncode != 0, f"the job did not fail:\n{text}"
    assert dt < 60, f"the failing job took {dt:.0f}s"
    for n in needles:
        assert n in r.stderr, f"{n!r} not in stderr:\n{r.stderr}"


BAD_DATA = ["missing", "corrupt", "truncated", "no_images", "no_labels", "label_attr",
            "label_num_classes", "label_negative", "empty_images", "images_3d"]


@pytest.mark.parametrize("kind", BAD_DATA)
def test_bad_data_fails_fast_and_keeps_checkpoint(digits, good_run, tmp_path, kind):
    out = _copy(good_run, tmp_path, "out")
    before = _snapshot(out)
    args, what, fname = bad_data(kind, tmp_path, digits)
    t0 = time.monotonic()
    r = train(2, out, "--resume", "--epochs", 1, *args, ok=False)
    _assert_fails(r, t0, [fname, what])
    assert _snapshot(out) == before


BAD_RESUME = {
    "other_model": (["--model", "resnet18"], ["does not fit this model", "layer3"]),
    "other_width": (["--width", "8"], ["does not fit this model", "conv1.weight"]),
    "other_channels": (["--data", "RGB"], ["does not fit this model", "conv1.weight"]),
    "no_checkpoint": (["--out", "EMPTY"], ["does not exist"]),
}


@pytest.mark.parametrize("kind", list(BAD_RESUME))
def test_bad_resume_fails_fast_and_keeps_checkpoint(digits, good_run, tmp_path, kind):
    out = _copy(good_run, tmp_path, "out")
    before = _snapshot(out)
    extra, needles = BAD_RESUME[kind]
    extra = list(extra)
    data = digits[0]
    if "RGB" in extra:  # 3-channel images: the 1-channel checkpoint's conv1 cannot take them
        data = _write(tmp_path / "rgb.h5", images=_images(shape=(3, 8, 8)), labels=_labels())
        extra = []
    ck = out / "checkpoint.h5"
    if "EMPTY" in extra:
        extra[extra.index("EMPTY")] = str(tmp_path / "empty_out")
        ck = tmp_path / "empty_out" / "checkpoint.h5"
    t0 = time.monotonic()
    r = train(2, out, "--resume", "--epochs", 1, *extra, data=data, ok=False)
    _assert_fails(r, t0, needles + [str(ck)])
    assert _snapshot(out) == before


BAD_ARGS = {
    "plan_unknown_layer": ("plan", ["plan names layers that do not exist", "layer9"]),
    "strategy_too_many_ranks": (["--strategy", "sample=3"], ["needs", "3 ranks, but there are 2"]),
    "strategy_unparsable": (["--strategy", "sample=1,channel=x"], ["cannot parse strategy"]),
    # only rank 0 creates --out: it fails alone while rank 1 waits in a barrier, so this
    # is the path where the job must be aborted (after train.py's short grace)
    "out_not_a_folder": ("out", ["Not a directory", "afile"]),
}


@pytest.mark.parametrize("kind", list(BAD_ARGS))
def test_bad_arguments_fail_fast_and_keep_checkpoint(digits, good_run, tmp_path, kind):
    out = _copy(good_run, tmp_path, "out")
    before = _snapshot(out)
    extra, needles = BAD_ARGS[kind]
    if extra == "plan":
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"": "sample=*", "layer9": "sample=1,filter=2"}))
        extra = ["--strategy", str(plan)]
    elif extra == "out":
        (tmp_path / "afile").write_text("not a folder")
        extra = ["--out", str(tmp_path / "afile" / "sub")]
    t0 = time.monotonic()
    r = train(2, out, "--resume", "--epochs", 1, *extra, data=digits[0], ok=False)
    _assert_fails(r, t0, needles)
    assert _snapshot(out) == before


def test_one_pixel_images_are_fine(digits, tmp_path):
    """A 1×1 image is a shape small_resnet can take (3×3 convolutions with padding 1 keep
    1×1, the stride-2 stage gives 1×1, as in torch): it trains; only empty images fail."""
    p = _write(tmp_path / "one.h5", images=_images(shape=(1, 1, 1)), labels=_labels())
    out = tmp_path / "out"
    train(2, out, "--epochs", 1, data=p)
    assert len(steps(metrics(out))) == 2  # 40 images, batches of 32


# ------------------------------------------------------------------ 4. defaults
def test_default_command_makes_the_digits_data(tmp_path):
    """``mpiexec -n 2 python scripts/train.py --epochs 1 --max-steps 5``: no --data, no
    --out: data/digits_*.h5 appear in the working folder, runs/train gets the outputs."""
    r = run_mpi_script(TRAIN, 2, TIMEOUT, args=["--epochs", "1", "--max-steps", "5"],
                       cwd=str(tmp_path))
    assert r.returncode == 0, f"train.py failed:\n{r.stdout}\n{r.stderr}"
    for name in ("digits_train.h5", "digits_test.h5"):
        assert (tmp_path / "data" / name).is_file()
    out = tmp_path / "runs" / "train"
    assert (out / "checkpoint.h5").is_file()
    ep = [x for x in metrics(out) if x["kind"] == "epoch"]
    assert len(ep) == 1 and ep[0]["step"] == 5 and 0 <= ep[0]["test_accuracy"] <= 1
    assert "small_resnet on 2 rank(s), strategy mixed" in r.stdout
    assert "1437 training images" in r.stdout
    _, meta, _ = ckpt(out)
    assert meta["step"] == 5 and meta["model"] == "small_resnet"


def test_help():
    r = subprocess.run([sys.executable, TRAIN, "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    for flag in ("--model", "--strategy", "--epochs", "--batch-size", "--data", "--out",
                 "--resume", "--seed"):
        assert flag in r.stdout


# ------------------------------------------------------------------ non-finite steps
@pytest.fixture(scope="module")
def nan_data(tmp_path_factory):
    """Digits-like data whose sample 5 is NaN: the batch holding it has a NaN loss."""
    from distconv.data import write_h5_dataset

    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 8, 8))
    x[5] = np.nan
    p = tmp_path_factory.mktemp("nan") / "nan.h5"
    return write_h5_dataset(str(p), x.astype(np.float32), rng.integers(0, 10, 64),
                            num_classes=10)


def test_nonfinite_step_stops_training_and_keeps_checkpoint(digits, nan_data, tmp_path):
    out = tmp_path / "out"
    train(2, out, "--epochs", "1", "--max-steps", "1", data=digits[0])  # a good checkpoint
    before = (out / "checkpoint.h5").read_bytes()
    r = train(2, out, "--epochs", "2", "--batch-size", "16", data=nan_data, ok=False)
    assert r.returncode != 0
    assert "FloatingPointError" in r.stderr and "non-finite values in loss" in r.stderr
    assert "(epoch 1)" in r.stderr and "conv1" in r.stderr  # names the step and layers
    assert (out / "checkpoint.h5").read_bytes() == before


def test_skip_nonfinite_skips_the_step(nan_data, tmp_path):
    import h5py

    out = tmp_path / "out"
    train(2, out, "--epochs", "1", "--batch-size", "16", "--skip-nonfinite", data=nan_data)
    recs = metrics(out)
    skipped = [r for r in recs if r["kind"] == "skipped"]
    assert len(skipped) == 1 and "non-finite values in loss" in skipped[0]["reason"]
    with h5py.File(out / "checkpoint.h5", "r") as f:
        for k, d in f["model"].items():
            assert np.isfinite(d[()]).all(), k  # weights and running statistics stay finite
