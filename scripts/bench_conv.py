#!/usr/bin/env python
"""Benchmark distconv's local convolution kernels against PyTorch.

For each convolution shape (the distinct conv layers of ResNet-50 at 224x224,
plus one wide-ResNet layer) and each pass (forward, backward-data,
backward-filter), this times ``distconv.ops.conv`` and the PyTorch equivalent
(``torch.nn.functional.conv2d``, ``torch.nn.grad.conv2d_input`` and
``torch.nn.grad.conv2d_weight``) with the same dtype and thread count, and
prints GFLOP/s side by side, the distconv/PyTorch ratio per shape, and the
geometric-mean ratio per pass and overall. It also measures the numpy BLAS
sgemm/dgemm rate on a large square matrix (the practical ceiling for a
GEMM-based convolution) and prints which BLAS is in use.

Timings alternate distconv and PyTorch repeat by repeat so that noise from a
shared machine hits both alike; each number is the median of the repeats
after one warm-up call.

Examples::

    python scripts/bench_conv.py --threads 1 --json bench1.json
    python scripts/bench_conv.py --quick
    OPENBLAS_CORETYPE=Haswell python scripts/bench_conv.py --threads 2
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time

import numpy as np

from distconv.bench.cli import bench_parser
from distconv.envinfo import blas_info

# (name, C, F, H(=W), kernel, stride, padding)
RESNET50 = [
    ("conv1 7x7/2 3->64 @224", 3, 64, 224, 7, 2, 3),
    ("l1 1x1 64->64 @56", 64, 64, 56, 1, 1, 0),
    ("l1 3x3 64->64 @56", 64, 64, 56, 3, 1, 1),
    ("l1 1x1 64->256 @56 (+ds)", 64, 256, 56, 1, 1, 0),
    ("l1 1x1 256->64 @56", 256, 64, 56, 1, 1, 0),
    ("l2 1x1 256->128 @56", 256, 128, 56, 1, 1, 0),
    ("l2 3x3/2 128->128 @56", 128, 128, 56, 3, 2, 1),
    ("l2 ds 1x1/2 256->512 @56", 256, 512, 56, 1, 2, 0),
    ("l2 1x1 128->512 @28", 128, 512, 28, 1, 1, 0),
    ("l2 1x1 512->128 @28", 512, 128, 28, 1, 1, 0),
    ("l2 3x3 128->128 @28", 128, 128, 28, 3, 1, 1),
    ("l3 1x1 512->256 @28", 512, 256, 28, 1, 1, 0),
    ("l3 3x3/2 256->256 @28", 256, 256, 28, 3, 2, 1),
    ("l3 ds 1x1/2 512->1024 @28", 512, 1024, 28, 1, 2, 0),
    ("l3 1x1 256->1024 @14", 256, 1024, 14, 1, 1, 0),
    ("l3 1x1 1024->256 @14", 1024, 256, 14, 1, 1, 0),
    ("l3 3x3 256->256 @14", 256, 256, 14, 3, 1, 1),
    ("l4 1x1 1024->512 @14", 1024, 512, 14, 1, 1, 0),
    ("l4 3x3/2 512->512 @14", 512, 512, 14, 3, 2, 1),
    ("l4 ds 1x1/2 1024->2048 @14", 1024, 2048, 14, 1, 2, 0),
    ("l4 1x1 512->2048 @7", 512, 2048, 7, 1, 1, 0),
    ("l4 1x1 2048->512 @7", 2048, 512, 7, 1, 1, 0),
    ("l4 3x3 512->512 @7", 512, 512, 7, 3, 1, 1),
    # wide_resnet50_2, layer2 bottleneck 3x3 (width 256 at 28x28)
    ("wrn50-2 l2 3x3 256->256 @28", 256, 256, 28, 3, 1, 1),
]

QUICK = [
    ("l1 3x3 64->64 @28", 64, 64, 28, 3, 1, 1),
    ("l2 3x3/2 128->128 @28", 128, 128, 28, 3, 2, 1),
    ("l1 1x1 64->256 @28", 64, 256, 28, 1, 1, 0),
]

PASSES = ("fwd", "bwd_data", "bwd_filter")


def parse_args(argv=None):
    p = bench_parser("bench_conv.py", __doc__)
    p.add_argument("--json", metavar="FILE", help="write all results as JSON to FILE")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for numpy's BLAS and torch (default: all cores)")
    p.add_argument("--quick", action="store_true",
                   help="CI-sized run: 3 small shapes, batch 8, few repeats (< 30 s)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default 32; 8 with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per measurement (default 5; 2 with --quick)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                   help="array module for distconv (cupy: run the same ops on GPU arrays)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (default); cpu: this process's CPU time, steadier "
                        "on a shared machine but only meaningful with --threads 1")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    p.add_argument("--shapes", default=None,
                   help="comma-separated substrings: only run shapes whose name contains one")
    return p.parse_args(argv)


def conv_flops(n, c, f, ho, wo, k):
    """Multiply-adds x2 of one pass (the same count for all three passes)."""
    return 2.0 * n * c * f * ho * wo * k * k


CLOCK = time.perf_counter


def median_time(fn, repeats, sync):
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        sync()
        ts.append(CLOCK() - t0)
    return float(np.median(ts))


def interleaved(fns, repeats, sync):
    """Median time of each callable, alternating them repeat by repeat (after a warm-up each)."""
    for f in fns:
        if f is not None:
            f()
    sync()
    ts = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            if f is None:
                continue
            t0 = CLOCK()
            f()
            sync()
            ts[i].append(CLOCK() - t0)
    return [float(np.median(t)) if t else None for t in ts]


def gemm_rate(xp, dtype, n, repeats, sync):
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)).astype(dtype))
    b = a.copy()
    c = xp.empty_like(a)
    t = median_time(lambda: xp.matmul(a, b, out=c), repeats, sync)
    return 2.0 * n ** 3 / t / 1e9


def geomean(v):
    v = [x for x in v if x is not None and x > 0]
    return float(math.exp(sum(math.log(x) for x in v) / len(v))) if v else None


def _backend(name):
    """``(array module, sync)`` of ``--backend``."""
    if name == "cupy":
        try:
            import cupy as xp
        except ImportError:
            sys.exit("error: --backend cupy needs CuPy, which cannot be imported here")
        return xp, xp.cuda.Stream.null.synchronize
    return np, (lambda: None)


def _torch(args, threads):
    """PyTorch set to ``threads`` threads, or None (``--no-torch`` or not importable)."""
    if args.no_torch:
        return None
    try:
        import torch
    except ImportError:
        print("torch not importable: PyTorch columns skipped", file=sys.stderr)
        return None
    torch.set_num_threads(threads)
    return torch


def _environment(args, dtype, batch, threads, repeats, torch, xp, sync) -> dict:
    """The run's facts (printed and kept in the JSON), the GEMM ceiling included."""
    info = {
        "host": platform.node(), "python": platform.python_version(), "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None), "backend": args.backend,
        "dtype": str(dtype), "batch": batch, "threads": threads, "repeats": repeats,
        "quick": args.quick, "clock": args.clock,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "blas": blas_info(),
        "loadavg_start": list(os.getloadavg()),
    }
    print(f"# distconv conv benchmark: dtype={dtype} batch={batch} threads={threads} "
          f"backend={args.backend} repeats={repeats} clock={args.clock}")
    print(f"# OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']!r}  "
          f"load average at start: {info['loadavg_start'][0]:.2f} (other processes skew timings)")
    for d in info["blas"]:
        print(f"# BLAS: {d['internal_api']} {d['version']} architecture={d['architecture']} "
              f"num_threads={d['num_threads']} ({d['prefix']})")
    gn = 1024 if args.quick else 3072
    info["gemm_n"] = gn
    info["gemm_gflops"] = gemm_rate(xp, dtype, gn, 3, sync)
    print(f"# numpy {dtype.name} GEMM {gn}^3: {info['gemm_gflops']:.1f} GFLOP/s "
          f"(the practical ceiling)")
    if torch is not None:
        print(f"# torch {torch.__version__}, threads={torch.get_num_threads()}, "
              f"mkldnn={torch.backends.mkldnn.is_available()}")
    return info


def _torch_passes(torch, tdev, x_np, w_np, dy_np, s, p) -> dict:
    """PyTorch's three passes of one shape (what a user of ``F.conv2d`` runs)."""
    xt = torch.from_numpy(x_np).to(tdev)
    wt = torch.from_numpy(w_np).to(tdev)
    dyt = torch.from_numpy(dy_np).to(tdev)
    F_ = torch.nn.functional

    def t_fwd():
        with torch.no_grad():
            return F_.conv2d(xt, wt, None, s, p)

    def t_bd():
        with torch.no_grad():
            return torch.nn.grad.conv2d_input(xt.shape, wt, dyt, s, p)

    def t_bf():
        with torch.no_grad():
            return torch.nn.grad.conv2d_weight(xt, wt.shape, dyt, s, p)
    return {"fwd": t_fwd, "bwd_data": t_bd, "bwd_filter": t_bf}


def _shape_rows(shape, batch, dtype, xp, torch, tdev, repeats, tsync, rng) -> list:
    """The three passes of one conv shape, distconv and PyTorch interleaved: one row each
    (printed as it is measured)."""
    from distconv.ops import conv as dconv
    name, c, f, h, k, s, p = shape
    x_np = rng.standard_normal((batch, c, h, h)).astype(dtype)
    w_np = (rng.standard_normal((f, c, k, k)) / math.sqrt(c * k * k)).astype(dtype)
    ho, wo = dconv.conv2d_output_hw(h, h, (k, k), (s, s), (p, p), (1, 1))
    dy_np = rng.standard_normal((batch, f, ho, wo)).astype(dtype)
    x, w, dy = xp.asarray(x_np), xp.asarray(w_np), xp.asarray(dy_np)
    st, pd, dl = (s, s), (p, p), (1, 1)
    dc = {
        "fwd": lambda: dconv.conv2d_forward(x, w, st, pd, dl),
        "bwd_data": lambda: dconv.conv2d_backward_data(dy, w, (h, h), st, pd, dl),
        "bwd_filter": lambda: dconv.conv2d_backward_filter(x, dy, (k, k), st, pd, dl),
    }
    pt = ({q: None for q in PASSES} if torch is None
          else _torch_passes(torch, tdev, x_np, w_np, dy_np, s, p))
    fl = conv_flops(batch, c, f, ho, wo, k)
    rows = []
    for q in PASSES:
        t_dc, t_pt = interleaved([dc[q], pt[q]], repeats, tsync)
        g_dc = fl / t_dc / 1e9
        g_pt = fl / t_pt / 1e9 if t_pt else None
        ratio = g_dc / g_pt if g_pt else None
        rows.append({"shape": name, "C": c, "F": f, "H": h, "W": h, "k": k, "stride": s,
                     "padding": p, "Ho": ho, "Wo": wo, "pass": q, "gflop": fl / 1e9,
                     "distconv_s": t_dc, "torch_s": t_pt, "distconv_gflops": g_dc,
                     "torch_gflops": g_pt, "ratio": ratio})
        print(f"{name:32s} {q:10s} {g_dc:8.1f} "
              f"{(f'{g_pt:8.1f}' if g_pt else '     n/a')} "
              f"{(f'{ratio:6.2f}' if ratio else '   n/a')} {t_dc * 1e3:8.2f} "
              f"{(f'{t_pt * 1e3:8.2f}' if t_pt else '     n/a')}", flush=True)
    return rows


def _summary(rows, with_torch) -> dict:
    """Geometric means of the GFLOP/s ratios per pass and overall, and the total-time
    ratio (printed)."""
    summary = {q: geomean([r["ratio"] for r in rows if r["pass"] == q]) for q in PASSES}
    summary["overall"] = geomean([r["ratio"] for r in rows])
    summary["distconv_gflops_geomean"] = geomean([r["distconv_gflops"] for r in rows])
    summary["torch_gflops_geomean"] = geomean([r["torch_gflops"] for r in rows])
    t_dc_tot = sum(r["distconv_s"] for r in rows)
    t_pt_tot = sum(r["torch_s"] for r in rows if r["torch_s"]) if with_torch else None
    summary["time_ratio_total"] = (t_pt_tot / t_dc_tot) if t_pt_tot else None
    print("geometric-mean GFLOP/s ratio distconv/PyTorch:")
    for q in PASSES + ("overall",):
        v = summary[q]
        print(f"  {q:12s} {v:.3f}" if v is not None else f"  {q:12s} n/a")
    if summary["time_ratio_total"]:
        print(f"  total time PyTorch/distconv over all shapes and passes: "
              f"{summary['time_ratio_total']:.3f}")
    return summary


def main(argv=None):
    args = parse_args(argv)
    batch = args.batch if args.batch is not None else (8 if args.quick else 32)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    shapes = QUICK if args.quick else RESNET50
    if args.shapes:
        keys = [s.strip() for s in args.shapes.split(",") if s.strip()]
        shapes = [s for s in shapes if any(k in s[0] for k in keys)]
    dtype = np.dtype(args.dtype)
    try:
        ncores = len(os.sched_getaffinity(0))
    except AttributeError:
        ncores = os.cpu_count() or 1
    threads = args.threads if args.threads else ncores
    if args.clock == "cpu":
        if threads != 1 or args.backend != "numpy":
            sys.exit("error: --clock cpu needs --threads 1 and --backend numpy")
        global CLOCK
        CLOCK = time.process_time

    from threadpoolctl import threadpool_limits
    limiter = threadpool_limits(limits=threads)  # noqa: F841 (kept alive)
    xp, sync = _backend(args.backend)
    torch = _torch(args, threads)
    tdev = "cuda" if args.backend == "cupy" else "cpu"

    def tsync():
        if torch is not None and tdev == "cuda":
            torch.cuda.synchronize()
        sync()

    info = _environment(args, dtype, batch, threads, repeats, torch, xp, sync)
    rng = np.random.default_rng(0)
    hdr = (f"{'shape':32s} {'pass':10s} {'dc GF/s':>8s} {'pt GF/s':>8s} {'ratio':>6s} "
           f"{'dc ms':>8s} {'pt ms':>8s}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for shape in shapes:
        rows += _shape_rows(shape, batch, dtype, xp, torch, tdev, repeats, tsync, rng)
    info["loadavg_end"] = list(os.getloadavg())
    print()
    print(f"# load average at end: {info['loadavg_end'][0]:.2f}")
    summary = _summary(rows, torch is not None)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "rows": rows, "summary": summary}, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
