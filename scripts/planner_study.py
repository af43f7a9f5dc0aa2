#!/usr/bin/env python
"""Paper-scale planner study: searched per-layer plans vs pure data parallelism, simulated.

    python scripts/planner_study.py --json benchmarks/results/planner_paper_scale.json

For each model, rank count P and global batch N (small per-GPU batches N = b*P, and fixed
small global batches N over growing P, strong-scaling style, where data parallelism runs
out of samples once P > N), this runs :func:`distconv.planner.auto.plan_model` on a
machine file (default the shipped ``v100_ib``: 4 V100 16 GB per node, InfiniBand; fitted
compute rates from the file, alpha-beta links, memory limit = the file's
``memory_per_rank``) and records the predicted step time of the plan it returns (the
fastest under :func:`distconv.planner.simulate.simulate` of the searches with the
gradient allreduce weighted 1, 1/2 and 0 and of pure data parallelism; which one is
``chosen``) and of pure data parallelism (every layer ``(P, 1, 1)``), the step of the
weight-1 (additive) search alone, the gradient-allreduce time and bytes, the exposed (not
overlapped) allreduce, memory per rank, search seconds (all three searches) and the wall
time of the whole ``plan_model`` call, and which strategies the plan uses in which stage.
When P > N it also simulates data parallelism on only N of the ranks (the rest idle), the
better data-parallel baseline there.

Models: the ResNets of ``distconv.models.MODELS`` and the OptCNN/FlexFlow networks of
``CNN_MODELS`` (``alexnet``, ``vgg16``, ``inception_v3`` -- with its auxiliary classifier,
torchvision's training-mode default -- ...; ImageNet shapes: 3x299x299 for Inception-v3,
3x224x224 for the others unless ``--image-shape`` is given). ``--mcmc-budget S`` also
runs :func:`distconv.planner.mcmc.mcmc` for S seconds from the fastest predicted
candidate of each case and records what it finds and the seconds it took.

Nothing here runs a network: every number is the planner's cost model. It is CPU-bound
(several seconds per case at 1024 ranks): run it under ``flock`` on a shared machine.
Prints a Markdown table (``--markdown`` also writes it to a file).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time

from distconv.atomic import write_json
from distconv.bench.cli import add_bucket_kb, bucket_bytes
from distconv.bench.models import default_shape, model_names
from distconv.bench.study import run_case, source_info
from distconv.bench.study_report import fmt_ratio, markdown

PROG = "planner_study.py"
#: the extra cases when --extra is not given (MODEL:P:N[:CxHxW])
DEFAULT_EXTRA = ("wide_resnet50_2:16:1024", "wide_resnet50_2:64:16:3x3072x3072",
                 "wide_resnet50_2:64:32:3x2048x2048")


class UsageError(Exception):
    """A bad argument: the message is printed as ``planner_study.py: error: ...`` and the
    script exits with ``rc`` (2 for the command line, 1 for an unreadable machine file)."""

    def __init__(self, msg, rc=2):
        super().__init__(msg)
        self.rc = rc


def _ints(text):
    if text.strip().lower() in ("", "none"):
        return []
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Simulated paper-scale comparison of planner plans with pure data "
                    "parallelism (ResNet-50 / Wide-ResNet-50-2 on a V100/InfiniBand-class "
                    "machine file by default).",
        epilog="example: flock /tmp/bench.lock python scripts/planner_study.py --json "
               "benchmarks/results/planner_paper_scale.json --markdown /tmp/table.md",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="resnet50,wide_resnet50_2",
                   help=f"comma-separated models of {model_names()}")
    p.add_argument("--ranks", type=_ints, default=[16, 64, 256, 1024],
                   help="rank counts P")
    p.add_argument("--per-gpu", type=_ints, default=[1, 2, 4],
                   help="samples per GPU b (global batch N = b*P)")
    p.add_argument("--global-batch", type=_ints, default=[64, 256],
                   help="fixed global batches N run at every P (strong scaling; 'none': "
                        "no such cases)")
    p.add_argument("--extra", action="append", default=None, metavar="MODEL:P:N[:CxHxW]",
                   help="extra cases (repeatable), optionally with their own image shape. "
                        "Default: wide_resnet50_2 at 64 samples per GPU on 16 ranks (large "
                        "per-GPU batch), and on 64 ranks with 16 images of 3x3072x3072 and "
                        "32 of 3x2048x2048 (large images: data parallelism needs a whole "
                        "sample per GPU, 35 GB and 16 GB, against the 16 GB of a V100); "
                        "'none': no extra case")
    p.add_argument("--image-shape", default=None,
                   help="C,H,W (default 3,299,299 for inception_v3, else 3,224,224)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--machine", default="v100_ib", help="machine file or shipped name")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--mcmc-budget", type=float, default=0.0, metavar="S",
                   help="also run MCMC (FlexFlow's search) for S seconds from the fastest "
                        "predicted candidate of each case (0: no)")
    p.add_argument("--mcmc-seed", type=int, default=0)
    p.add_argument("--placement", action="store_true",
                   help="also plan each case with operator placement (plan_model(..., "
                        "placement=True): a cat's branches on disjoint halves and quarters "
                        "of the ranks) and report what it gains over the plan without it")
    add_bucket_kb(p)
    p.add_argument("--no-overlap", action="store_true",
                   help="gradient allreduces blocking after backward instead of overlapped "
                        "with it (plan_model(..., overlap=False); OptCNN's cost model adds "
                        "the parameter sync to the step)")
    p.add_argument("--source-commit", default=None, metavar="SHA",
                   help="the distconv commit these numbers come from, recorded in the JSON "
                        "(default: git rev-parse HEAD of the checkout this script is in, "
                        "and whether its distconv/planner has uncommitted changes)")
    p.add_argument("--json", required=True, metavar="FILE", help="results file to write")
    p.add_argument("--markdown", default=None, metavar="FILE",
                   help="also write the Markdown table here")
    return p


def _image_shape(args):
    """--image-shape as ``(C, H, W)``, or None when not given."""
    if args.image_shape is None:
        return None
    try:
        shape = tuple(int(v) for v in args.image_shape.split(","))
        assert len(shape) == 3 and min(shape) >= 1
    except (ValueError, AssertionError):
        raise UsageError(f"--image-shape: expected C,H,W (three integers >= 1), got "
                         f"{args.image_shape!r}") from None
    return shape


def _extra_case(text, known, shape):
    """One --extra ``MODEL:P:N[:CxHxW]`` -> ``(model, N, P, shape)``."""
    try:
        parts = text.split(":")
        assert len(parts) in (3, 4) and parts[0] in known
        shp = (tuple(int(v) for v in parts[3].split("x")) if len(parts) == 4
               else shape or default_shape(parts[0]))
        assert len(shp) == 3 and min(shp) >= 1
        return parts[0], int(parts[2]), int(parts[1]), shp
    except (ValueError, AssertionError):
        raise UsageError(f"--extra: expected MODEL:P:N[:CxHxW] with MODEL in {known}, got "
                         f"{text!r}") from None


def _models(args) -> list:
    """--models as a list of known names."""
    known = model_names()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in names if m not in known]
    if bad:
        raise UsageError(f"--models: unknown {bad}; expected names of {known}")
    return names


def study_cases(args, names, shape) -> list:
    """Every ``(model, N, P, shape)``: per model of ``names`` and P the batches b*P and
    the fixed global batches (at ``shape``, or the model's default), then the extra
    cases."""
    known = model_names()
    cases = []
    for m in names:
        for p in args.ranks:
            batches = sorted({b * p for b in args.per_gpu} | set(args.global_batch))
            cases += [(m, n, p, shape or default_shape(m)) for n in batches]
    extra = args.extra if args.extra is not None else DEFAULT_EXTRA
    for e in extra:
        if e.strip().lower() not in ("", "none"):  # --extra none: no extra case
            cases.append(_extra_case(e, known, shape))
    return cases


def load_machine(spec):
    """``(Machine, path)`` of --machine: a file, or the name of a shipped one."""
    from distconv.planner.machine import Machine, available, builtin
    path = spec if os.path.exists(spec) or spec not in available() else builtin(spec)
    try:
        return Machine.load(path), path
    except (OSError, ValueError) as e:
        raise UsageError(f"--machine: {e}", rc=1) from None


def _progress(i, total, case, rec) -> str:
    m, n, p, shp = case
    return (f"[{i + 1}/{total}] {m} {'x'.join(map(str, shp))} P={p} N={n}: plan "
            f"{rec['plan']['step_s'] * 1e3:.2f} ms, DP {rec['dp']['step_s'] * 1e3:.2f} ms, "
            f"speedup {rec['speedup_vs_dp']:.2f}x, sync {fmt_ratio(rec['sync_time_ratio'])} "
            f"less, chosen {rec['chosen']}, search {rec['search_s']:.1f} s, plan_model "
            f"{rec['plan_model_s']:.1f} s"
            + (f", MCMC {rec['mcmc']['seconds']:.1f} s {rec['mcmc']['proposals']} "
               f"proposals gain {100 * (rec['mcmc']['gain'] - 1):.2f}%"
               if rec.get("mcmc") else "")
            + (f"; with placement {rec['placement']['step_s'] * 1e3:.2f} ms "
               f"({rec['placement']['gain_over_unplaced']:.3f}x, placed "
               f"{len(rec['placement']['placed_blocks'])} block(s), search "
               f"{rec['placement']['search_s']:.1f} s)" if rec.get("placement") else ""))


def document(args, machine, path, records, total_s) -> dict:
    """The results file: the settings, where the numbers come from, and every record."""
    return {
        "what": "simulated (cost model only, nothing run on GPUs): planner plan vs pure "
                "data parallelism",
        "machine": machine.to_dict(), "machine_file": os.path.abspath(path),
        "optimizer": args.optimizer, "overlap": not args.no_overlap, "dtype": "float32",
        "bucket_kb": args.bucket_kb,
        "mcmc_budget_s": args.mcmc_budget, "mcmc_seed": args.mcmc_seed,
        "placement": args.placement,
        "source": source_info(args.source_commit),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "python": platform.python_version(),
                 "cpus": os.cpu_count()},
        "total_s": total_s,
        "records": records,
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        names, shape = _models(args), _image_shape(args)
        machine, path = load_machine(args.machine)
        cases = study_cases(args, names, shape)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.rc
    records = []
    t_all = time.perf_counter()
    for i, (m, n, p, shp) in enumerate(cases):
        rec = run_case(m, n, p, shp, args.num_classes, machine, args.optimizer,
                       args.mcmc_budget, args.mcmc_seed, not args.no_overlap, args.placement,
                       bucket_bytes(args))
        records.append(rec)
        print(_progress(i, len(cases), (m, n, p, shp), rec), flush=True)
    doc = document(args, machine, path, records, time.perf_counter() - t_all)
    write_json(args.json, doc)
    table = markdown(records)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")
    print(f"wrote {args.json} ({len(records)} cases, {doc['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
