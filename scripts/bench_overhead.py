#!/usr/bin/env python
"""Python overhead of a distconv training step: the share of a ResNet forward+backward
spent outside the local kernels (distconv.ops and the Linear GEMMs).

    python scripts/bench_overhead.py --model resnet18 --batch 1 --size 224 --json out.json

Every function of ``distconv.ops`` that layers call is wrapped with a timer (nested calls
are counted once); the rest of the step is framework overhead: Python in the layers,
distribution bookkeeping, redistribute calls (no-ops on one rank) and allocation.
Target: < 15 % at batch 1.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

OPS = ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter",
       "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward",
       "global_avg_pool_forward", "global_avg_pool_backward", "bn_local_stats",
       "bn_mean_invstd", "bn_forward_apply", "bn_backward_reduce", "bn_backward_apply",
       "bn_param_grads", "relu_forward", "relu_backward")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import distconv as dc
    from distconv import backend, models, ops
    from distconv.nn import conv as nnconv
    backend.configure_threads(args.threads)
    inside = [0.0]
    depth = [0]

    def timed(f):
        @functools.wraps(f)
        def w(*a, **k):
            if depth[0]:
                return f(*a, **k)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                inside[0] += time.perf_counter() - t0
                depth[0] -= 1
        return w

    # the layers call ops.<name>(...) through the package, so patching it catches every call
    for name in OPS:
        setattr(ops, name, timed(getattr(ops, name)))
    # Linear's local GEMMs
    for meth in ("_local_forward", "_local_backward_data", "_local_backward_filter"):
        setattr(nnconv.Linear, meth, timed(getattr(nnconv.Linear, meth)))

    dc.manual_seed(0)
    model = models.MODELS[args.model](1000)
    crit = dc.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    y = rng.integers(0, 1000, args.batch)

    def step():
        loss = crit(model(x), y)
        loss.backward()
        dc.sync_gradients(model.parameters())
        return loss

    step()  # warm-up (workspaces, first-call costs)
    totals, insides = [], []
    for _ in range(args.repeats):
        inside[0] = 0.0
        t0 = time.perf_counter()
        step()
        totals.append(time.perf_counter() - t0)
        insides.append(inside[0])
    i = int(np.argsort(totals)[len(totals) // 2])
    tot, ins = totals[i], insides[i]
    share = 1 - ins / tot
    print(f"{args.model} batch {args.batch} {args.size}x{args.size}, {args.threads} thread(s): "
          f"step {tot * 1e3:.1f} ms, kernels {ins * 1e3:.1f} ms, outside kernels "
          f"{(tot - ins) * 1e3:.1f} ms = {100 * share:.1f} % (target < 15 %)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "bench_overhead", "model": args.model, "batch": args.batch,
                       "size": args.size, "threads": args.threads, "step_s": tot,
                       "kernels_s": ins, "outside_share": share, "all_steps_s": totals,
                       "all_kernels_s": insides}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
