#!/usr/bin/env python
"""What the autograd tape costs: a whole training step of this checkout against another
checkout of distconv (the code before the tape), side by side.

::

    git worktree add /tmp/distconv-base 01015f6      # the code before the tape
    python scripts/bench_tape.py --baseline /tmp/distconv-base --json f.json

Two worker processes, one per checkout (``PYTHONPATH`` picks the package), stay alive
for the whole run; the driver lets them run ``--steps`` steps in turn, alternating which
goes first every round, so both see the same machine state. Each step is PyTorch's loop:
``opt.zero_grad(); loss = crit(model(x), y); loss.backward(); opt.step()`` (a checkout
without ``loss.backward()`` runs ``model.backward(crit.backward())``). Model: ResNet-18
with the CIFAR stem on 32x32 inputs, 10 classes, float32, SGD with momentum, one rank,
one BLAS thread. Reported: per round the median step of each side and their ratio
(this / baseline); the run's median ratio and quartiles. ``overhead = ratio - 1``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="path of the other distconv checkout (repo root)")
    ap.add_argument("--rounds", type=int, default=30, help="alternating rounds (default 30)")
    ap.add_argument("--steps", type=int, default=5, help="steps per side per round (default 5)")
    ap.add_argument("--batch", type=int, default=2, help="global batch (default 2)")
    ap.add_argument("--width", type=int, default=64, help="ResNet-18 base width (default 64)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap


# ------------------------------------------------------------------ worker
def worker(args) -> int:
    import numpy as np
    import distconv as dc
    from distconv import models, nn, optim

    dc.set_default_dtype(np.float32)
    dc.manual_seed(0)
    model = models.resnet18(num_classes=10, stem="cifar", base_width=args.width)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)

    def step():
        opt.zero_grad()
        loss = crit(model(x), y)
        if hasattr(loss, "backward"):
            loss.backward()
        else:  # the code before the tape
            model.backward(crit.backward())
        opt.step()

    step()
    print(json.dumps({"ready": dc.__file__}), flush=True)
    for line in sys.stdin:
        n = int(line)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        print(json.dumps({"times": times}), flush=True)
    return 0


# ------------------------------------------------------------------ driver
def _spawn(root, args):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(args.batch),
           "--width", str(args.width)]
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = json.loads(p.stdout.readline())
    return p, ready["ready"]


def _run(p, n):
    p.stdin.write(f"{n}\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())["times"]


def _quartiles(v):
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return q[0], statistics.median(v), q[2]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.baseline:
        raise SystemExit("bench_tape: --baseline DIR is required (a checkout of the code to "
                         "compare with, e.g. made by git worktree add)")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sides = {}
    for name, root in (("this", here), ("baseline", args.baseline)):
        sides[name] = _spawn(root, args)
        print(f"{name}: distconv from {sides[name][1]}", flush=True)
    rounds = []
    try:
        for r in range(args.rounds):
            order = ("this", "baseline") if r % 2 == 0 else ("baseline", "this")
            med = {k: statistics.median(_run(sides[k][0], args.steps)) for k in order}
            ratio = med["this"] / med["baseline"]
            rounds.append({"this_s": med["this"], "baseline_s": med["baseline"],
                           "ratio": ratio, "first": order[0]})
            print(f"round {r + 1:3d}/{args.rounds}: this {1e3 * med['this']:8.2f} ms  "
                  f"baseline {1e3 * med['baseline']:8.2f} ms  ratio {ratio:.4f}", flush=True)
    finally:
        for p, _ in sides.values():
            p.stdin.close()
            p.wait(timeout=60)
    q1, m, q3 = _quartiles([x["ratio"] for x in rounds])
    out = {"benchmark": "bench_tape", "model": f"resnet18 cifar stem width {args.width}",
           "batch": args.batch, "dtype": "float32", "ranks": 1, "threads": 1,
           "steps_per_round": args.steps, "rounds": rounds, "ratio_median": m,
           "ratio_q1": q1, "ratio_q3": q3,
           "this_median_s": statistics.median(x["this_s"] for x in rounds),
           "baseline_median_s": statistics.median(x["baseline_s"] for x in rounds),
           "this": sides["this"][1], "baseline": sides["baseline"][1]}
    print(f"step time this/baseline: median {m:.4f} (quartiles {q1:.4f}-{q3:.4f}) over "
          f"{len(rounds)} paired rounds: overhead {100 * (m - 1):+.2f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
