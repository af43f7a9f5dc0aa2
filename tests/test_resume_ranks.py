"""Fault tolerance across rank counts, and the periodic replica check of train.py.

* 4 -> 2: a 4-rank job with ``--strategy auto`` writes a checkpoint every 10 steps and
  loses a rank (SIGKILL) at step 25; resubmitted on 2 ranks with ``--resume --strategy
  auto`` (what ``slurm/train.sbatch`` does after a requeue on fewer nodes) it plans anew
  for 2 ranks (the 4-rank plan.json is not reused), resumes from step 20 and ends equal,
  to 1e-10 in float64, to a straight 2-rank run from the same checkpoint under another
  strategy (channel split). Negative control: the same comparison fails against a run
  that did one step less.
* ``--check-replicas-every 1`` passes on a healthy run; when one rank's copy of a
  replicated parameter is nudged by 1e-6 (``DISTCONV_FAULT=diverge@...``) it stops the
  job naming the step and the parameter; without the flag the same fault goes unnoticed
  (the run ends with exit code 0), which is why the check exists.
"""
import json
import shutil

import numpy as np
import pytest

from tests.test_train import TRAIN, ckpt, digits, train  # noqa: F401

COMMON = ["--epochs", "1", "--max-steps", "30"]


def _final_state_close(a, b, rtol):
    """Every model and optimizer tensor of checkpoint a equals b's to rtol (and atol)."""
    (xa, ma, _), (xb, mb, _) = ckpt(a), ckpt(b)
    assert sorted(xa) == sorted(xb) and ma["step"] == mb["step"]
    for k in xa:
        np.testing.assert_allclose(xa[k], xb[k], rtol=rtol, atol=rtol, err_msg=k)


def test_resume_4_ranks_to_2_with_auto_plan(digits, tmp_path):  # noqa: F811
    env = {"DISTCONV_CACHE_DIR": str(tmp_path / "cache")}
    lost = tmp_path / "lost"
    r = train(4, lost, *COMMON, "--strategy", "auto", "--machine", "dev_2core",
              "--checkpoint-every", 10, data=digits[0], ok=False,
              env=dict(env, DISTCONV_FAULT="kill@rank=3,step=25"))
    assert r.returncode != 0, "the 4-rank job should have lost a rank"
    assert ckpt(lost)[1]["step"] == 20
    plan4 = json.loads((lost / "plan.json").read_text())
    assert plan4["meta"]["ranks"] == 4

    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    shutil.copytree(lost, resumed)
    shutil.copytree(lost, straight)
    r = train(2, resumed, *COMMON, "--resume", "--strategy", "auto", "--machine", "dev_2core",
              data=digits[0], env=env)
    assert "was planned for 4 ranks, this job has 2: planning anew" in r.stdout
    assert "resumed from" in r.stdout and "step 20" in r.stdout
    plan2 = json.loads((resumed / "plan.json").read_text())
    assert plan2["meta"]["ranks"] == 2
    from distconv.strategy import Strategy
    assert all(np.prod(Strategy.parse(s).resolve(2)) == 2 for s in plan2["plan"].values())

    train(2, straight, *COMMON, "--resume", "--strategy", "sample=1,channel=2",
          data=digits[0])
    assert ckpt(resumed)[1]["step"] == 30
    _final_state_close(resumed, straight, 1e-10)

    # negative control: a run from the same checkpoint that stops one step earlier differs
    short = tmp_path / "short"
    shutil.copytree(lost, short)
    train(2, short, "--epochs", "1", "--max-steps", "29", "--resume", "--strategy",
          "sample=2", data=digits[0])
    (xa, _, _), (xs, _, _) = ckpt(resumed), ckpt(short)
    assert any(not np.allclose(xa[k], xs[k], rtol=1e-10, atol=1e-10) for k in xa)


def test_check_replicas_every(digits, tmp_path):  # noqa: F811
    args = ["--epochs", "1", "--max-steps", "6", "--strategy", "mixed"]
    r = train(2, tmp_path / "ok", *args, "--check-replicas-every", 1, data=digits[0])
    assert r.returncode == 0
    fault = {"DISTCONV_FAULT": "diverge@rank=1,step=3"}
    r = train(2, tmp_path / "bad", *args, "--check-replicas-every", 1, data=digits[0],
              ok=False, env=fault)
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert ("step 3 (epoch 1): model: the replicas of 'conv1.weight' differ between ranks"
            in text), text[-3000:]
    # without the check the same divergence goes unnoticed
    r = train(2, tmp_path / "unchecked", *args, data=digits[0], env=fault)
    assert r.returncode == 0


@pytest.mark.parametrize("every", ["-1", "x"])
def test_check_replicas_every_rejects_bad_values(digits, tmp_path, every):  # noqa: F811
    r = train(1, tmp_path / "out", "--max-steps", "1", "--check-replicas-every", every,
              data=digits[0], ok=False)
    assert r.returncode != 0
    assert "--check-replicas-every" in r.stderr
