#!/usr/bin/env python
"""The checks and reports of ``scripts/gpu_check.sh`` (runs on CPU too, for testing).

    python scripts/gpu_check_report.py env
    python scripts/gpu_check_report.py bench KERNELS.json CUDNN.json [--cudnn-log LOG]
    python scripts/gpu_check_report.py train GPU/metrics.jsonl CPU/metrics.jsonl --rtol 1e-8

* ``env``: Python, NumPy, CuPy, CUDA runtime, cuDNN, mpi4py/MPI, torch versions, the GPUs
  and the git commit (never fails: what cannot be queried is printed as such).
* ``bench``: two ``scripts/bench_conv.py --json`` files of the same shapes, distconv's
  own kernels (im2col + cuBLAS) and ``DISTCONV_CUDNN=1``; prints GFLOP/s of each per
  shape and pass, their ratio (kernels / cuDNN) and geometric means per pass. Exit 1 if
  the shapes differ, a time is missing, or ``--cudnn-log`` shows that cuDNN was not
  available (distconv then fell back to its own kernels and the comparison is void).
* ``train``: two ``train.py`` ``metrics.jsonl`` files; the per-step losses must agree to
  ``--rtol`` (exit 1 naming the first step that does not, or if a file has no steps).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDNN_MISSING = "cupy.cudnn is not available"


def cmd_env(args) -> int:
    print("python", platform.python_version(), "on", platform.node())
    for mod in ("numpy", "cupy", "mpi4py", "torch", "h5py"):
        try:
            m = __import__(mod)
            print(mod, getattr(m, "__version__", "?"))
        except Exception as e:  # noqa: BLE001 - a report, never a failure
            print(mod, "not importable:", e)
    try:
        import cupy
        rt = cupy.cuda.runtime
        n = rt.getDeviceCount()
        print("GPUs:", n, "| CUDA runtime", rt.runtimeGetVersion(), "| driver",
              rt.driverGetVersion())
        for i in range(n):
            print(f"  GPU {i}:", rt.getDeviceProperties(i)["name"].decode())
    except Exception as e:  # noqa: BLE001
        print("CuPy GPU query failed:", e)
    try:
        from cupy import cudnn
        print("cuDNN", cudnn.getVersion())
    except Exception as e:  # noqa: BLE001
        print("cuDNN not available to CuPy:", e)
    try:
        from mpi4py import MPI
        print(MPI.Get_library_version().splitlines()[0])
    except Exception as e:  # noqa: BLE001
        print("mpi4py/MPI:", e)
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        print("git", rev or "unknown")
    except Exception as e:  # noqa: BLE001
        print("git:", e)
    return 0


def _rows(path):
    with open(path) as f:
        doc = json.load(f)
    return {(r["shape"], r["pass"]): r for r in doc["rows"]}, doc.get("info", {})


def cmd_bench(args) -> int:
    if args.cudnn_log:
        with open(args.cudnn_log, errors="replace") as f:
            if CUDNN_MISSING in f.read():
                print(f"error: {args.cudnn_log} says '{CUDNN_MISSING}': the DISTCONV_CUDNN=1 "
                      f"run used distconv's own kernels, so there is no cuDNN comparison "
                      f"(pip install nvidia-cudnn-cu12, or cu13, gives CuPy a cuDNN)")
                return 1
    a, ia = _rows(args.kernels)
    b, ib = _rows(args.cudnn)
    if sorted(a) != sorted(b):
        print(f"error: the two files hold different (shape, pass) rows: only in "
              f"{args.kernels}: {sorted(set(a) - set(b))}; only in {args.cudnn}: "
              f"{sorted(set(b) - set(a))}")
        return 1
    bad = [k for k in a if not (a[k].get("distconv_gflops") or 0) > 0
           or not (b[k].get("distconv_gflops") or 0) > 0]
    if bad:
        print(f"error: no time for {bad}")
        return 1
    print(f"distconv kernels ({args.kernels}, backend {ia.get('backend')}) vs cuDNN "
          f"({args.cudnn}), dtype {ia.get('dtype')}, batch {ia.get('batch')}")
    print(f"{'shape':32s} {'pass':10s} {'kernels GF/s':>12s} {'cuDNN GF/s':>10s} {'ratio':>6s}")
    per_pass = {}
    for k in a:
        g1, g2 = a[k]["distconv_gflops"], b[k]["distconv_gflops"]
        per_pass.setdefault(k[1], []).append(g1 / g2)
        print(f"{k[0]:32s} {k[1]:10s} {g1:12.1f} {g2:10.1f} {g1 / g2:6.2f}")
    allr = [r for rs in per_pass.values() for r in rs]
    for p, rs in per_pass.items():
        print(f"geometric mean ratio (kernels / cuDNN), {p}: "
              f"{math.exp(sum(map(math.log, rs)) / len(rs)):.3f}")
    print(f"geometric mean ratio, all: {math.exp(sum(map(math.log, allr)) / len(allr)):.3f}")
    return 0


def _losses(path):
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in recs if r.get("kind") == "step"}


def cmd_train(args) -> int:
    a, b = _losses(args.first), _losses(args.second)
    if not a or not b:
        print(f"error: no step records in {args.first if not a else args.second}")
        return 1
    if sorted(a) != sorted(b):
        print(f"error: the runs logged different steps: {sorted(a)} vs {sorted(b)}")
        return 1
    worst = 0.0
    for s in sorted(a):
        rel = abs(a[s] - b[s]) / max(abs(b[s]), 1e-300)
        worst = max(worst, rel)
        if not rel <= args.rtol:
            print(f"error: step {s}: loss {a[s]!r} vs {b[s]!r} (relative difference "
                  f"{rel:.3e} > {args.rtol:g})")
            return 1
    print(f"{len(a)} steps: losses agree, largest relative difference {worst:.3e} "
          f"(<= {args.rtol:g}); last loss {a[max(a)]:.6f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="versions, GPUs, git commit")
    b = sub.add_parser("bench", help="distconv kernels vs cuDNN from two bench_conv JSONs")
    b.add_argument("kernels", help="bench_conv.py --json of the DISTCONV_CUDNN=0 run")
    b.add_argument("cudnn", help="bench_conv.py --json of the DISTCONV_CUDNN=1 run")
    b.add_argument("--cudnn-log", default=None, help="stdout+stderr of the cuDNN run")
    t = sub.add_parser("train", help="per-step losses of two train.py runs agree")
    t.add_argument("first", help="metrics.jsonl")
    t.add_argument("second", help="metrics.jsonl")
    t.add_argument("--rtol", type=float, default=1e-8)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"env": cmd_env, "bench": cmd_bench, "train": cmd_train}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
