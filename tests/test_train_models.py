"""scripts/train.py with the OptCNN/FlexFlow networks (tiny widths, synthetic HDF5 data of
the right image size, 2 ranks, float64, 2 steps each):

* inception_v3 at 75x75 without the auxiliary classifier under the default mixed plan,
  and vgg16 at 32x32 channel-parallel, train and write a checkpoint;
* a vgg16 run resumed after one step ends with the same checkpoint as two steps straight
  through (the dropout masks continue: their step counters are in the checkpoint);
* ``--strategy auto`` plans and trains AlexNet (adaptive pooling to 6x6), and accepts
  Inception-v3 with its auxiliary classifier;
* images below the network's minimum end the job with a clear error instead of a crash.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from tests.mpi_harness import run_mpi_script
from tests.test_train import assert_same_checkpoint, ckpt

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "scripts" / "train.py")
COMMON = ["--batch-size", "4", "--log-every", "1", "--dtype", "float64", "--epochs", "1"]
VGG = ["--model", "vgg16", "--width-divisor", "16", "--hidden", "16"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from distconv.data import make_synthetic

    d = tmp_path_factory.mktemp("synthetic")
    return {hw: str(make_synthetic(str(d / f"s{hw}.h5"), (8, 3, hw, hw), 4, seed=hw))
            for hw in (32, 75)}


def _train(out, *args, ok=True):
    r = run_mpi_script(TRAIN, 2, 120, args=COMMON + ["--out", str(out)] + [str(a) for a in args],
                       cwd=str(Path(out).parent))
    if ok:
        assert r.returncode == 0, f"train.py failed:\n{r.stdout}\n{r.stderr}"
    else:
        assert r.returncode != 0
    return r


def _steps(out):
    with open(Path(out) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if '"step"' in line and '"kind": "step"' in line]


def test_train_inception_and_vgg(images, tmp_path):
    out = tmp_path / "inc"
    _train(out, "--model", "inception_v3", "--width-divisor", "16", "--no-aux-logits",
           "--data", images[75], "--max-steps", 2)
    recs = _steps(out)
    assert [r["step"] for r in recs] == [1, 2] and all(np.isfinite(r["loss"]) for r in recs)
    arrays, meta, _ = ckpt(out)
    assert meta["model"] == "inception_v3" and meta["dropout_steps"] == {"dropout": 2}
    assert "model/Mixed_7c.branch3x3_2a.conv.weight" in arrays

    # vgg16 channel-parallel: 2 steps straight == 1 step + resume for 1 step
    straight, resumed = tmp_path / "vgg", tmp_path / "vgg_resumed"
    _train(straight, *VGG, "--data", images[32], "--strategy", "sample=1,channel=2",
           "--max-steps", 2)
    _train(resumed, *VGG, "--data", images[32], "--strategy", "sample=1,channel=2",
           "--max-steps", 1)
    assert ckpt(resumed)[1]["dropout_steps"] == {"classifier.2": 1, "classifier.5": 1}
    _train(resumed, *VGG, "--data", images[32], "--strategy", "sample=1,channel=2",
           "--max-steps", 2, "--resume")
    assert_same_checkpoint(straight, resumed, rtol=1e-12)


def test_train_alexnet_strategy_auto(images, tmp_path):
    """``--strategy auto`` plans AlexNet (adaptive pooling to 6x6, dropout) for the job
    (the shipped dev_2core links, kernels measured into a fresh cache) and trains."""
    out = tmp_path / "alex"
    r = _train(out, "--model", "alexnet", "--width-divisor", "16", "--hidden", "16",
               "--data", images[75], "--strategy", "auto", "--machine", "dev_2core",
               "--compute-cache", tmp_path / "cache.json", "--max-steps", 2)
    assert "--strategy auto: planned in" in r.stdout
    plan = json.loads((out / "plan.json").read_text())["plan"]
    assert list(plan) == ["features.0", "features.3", "features.6", "features.8",
                          "features.10", "classifier.1", "classifier.4", "classifier.6"]
    recs = _steps(out)
    assert [r["step"] for r in recs] == [1, 2] and all(np.isfinite(r["loss"]) for r in recs)


def test_train_clear_errors(images, tmp_path):
    # with its auxiliary classifier (two outputs) --strategy auto is accepted: the job
    # ends on the image size, not on a refusal (planning it: tests/test_planner_outputs.py)
    r = _train(tmp_path / "small", "--model", "inception_v3", "--width-divisor", "16",
               "--data", images[75], "--strategy", "auto", ok=False)
    assert "needs images of at least 299x299" in r.stdout + r.stderr
    assert "--no-aux-logits" in r.stdout + r.stderr
    assert "not available" not in r.stdout + r.stderr
