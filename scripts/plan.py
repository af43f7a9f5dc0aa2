#!/usr/bin/env python
"""Search the best per-layer parallel strategy of a model for P ranks (OptCNN/FlexFlow style).

    python scripts/plan.py --model small_resnet --ranks 4 --machine dev_2core
    python scripts/plan.py --model resnet50 --batch 256 --ranks 1024 --machine v100_ib \\
        --out runs/resnet50_p1024.json
    mpiexec -n 2 python scripts/plan.py --machine calibrate --save-machine my_node.json
    mpiexec -n 2 python scripts/train.py --strategy plan.json          # use the plan

The model is traced for the global input ``--batch x --image-shape``; the cost model
(:mod:`distconv.planner`) prices every layer under every strategy ``(sample, channel,
filter)`` with ``s*c*f = P`` (local kernel time, the bytes of every collective the layer
issues through the machine's alpha-beta links, memory per rank), a dynamic program over
the layer chain and residual blocks finds the cheapest plan that fits the memory limit,
and a step simulator with overlapped gradient allreduces compares it with pure data
parallelism. The per-layer table and the predicted speedup are printed, and the plan is
written with :func:`distconv.planner.planfile.save_plan` (``{"plan": {layer: strategy},
"predicted": {...}, "meta": {...}}``), which ``scripts/train.py --strategy FILE``
accepts as it is.

``--machine`` is a machine JSON file, the name of a shipped one (``dev_2core``,
``v100_ib``), or ``calibrate``: measure the links of the current MPI job (run under
``mpiexec``; ``--ranks`` then defaults to the job size). Planning runs on rank 0 only,
and only rank 0 prints and writes files. Nothing else needs MPI: without ``mpiexec``
the script plans for any ``--ranks``, however large.

Exit status: 0 on success, 2 for a bad command line (argparse style), 1 when the
machine file, the model/shape combination or the memory limit makes planning
impossible; the message names what was expected and what came.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from distconv.bench.cli import (add_bucket_kb, bucket_bytes, bytes_arg,  # noqa: F401
                                int_at_least, parse_bytes, parse_shape, shape_arg)
from distconv.bench.models import build_model, default_shape, model_names
from distconv.bench.plan_report import fmt_bytes, mcmc_vs_dp, model_flags, plan_meta, usage_text


PROG = "plan.py"
EXAMPLES = """\
examples:
  python scripts/plan.py --model small_resnet --ranks 4 --machine dev_2core
      the train.py default model (digits data, 1x8x8 images, batch 64) on 4 ranks
  python scripts/plan.py --model resnet50 --batch 256 --ranks 1024 --machine v100_ib \\
      --out runs/resnet50_p1024.json
      ResNet-50 on 1024 V100s (4 per node, InfiniBand), ImageNet 3x224x224 inputs
  python scripts/plan.py --model wide_resnet50_2 --batch 64 --ranks 64 \\
      --machine v100_ib --memory-limit 8GiB --optimizer adam
  python scripts/plan.py --model vgg16 --batch 512 --ranks 16 --machine v100_ib
      VGG-16 (also alexnet, vgg11[_bn], vgg16_bn, inception_v3 at 3x299x299)
  mpiexec -n 2 python scripts/plan.py --machine calibrate --save-machine node.json
      measure this job's links and kernels, plan for 2 ranks, keep the machine file
  python scripts/plan.py --machine node.json --ranks 8 --compute measure
  mpiexec -n 2 python scripts/train.py --strategy plan.json
      train with the written plan (same --model, --width, batch and shape)

--machine: a JSON file, a shipped name ({builtins}) or 'calibrate'.
"""

MACHINE_LIMIT = object()  # default of --memory-limit: the machine file's memory_per_rank


class PlanError(Exception):
    """A problem that makes planning impossible (exit status 1, one line, no traceback)."""


# ------------------------------------------------------------------ argument parsing
def _rank() -> int:
    from distconv.comm import world
    return world().rank


class _Parser(argparse.ArgumentParser):
    """argparse that prints help and errors on MPI rank 0 only (every rank still exits
    with the same status)."""

    def _print_message(self, message, file=None):
        if message and _rank() == 0:
            super()._print_message(message, file)


def build_parser() -> argparse.ArgumentParser:
    from distconv.planner.machine import available
    p = _Parser(
        prog=PROG,
        description="Search the fastest per-layer sample/channel/filter plan of a model on\n"
                    "P ranks with the planner's cost model (compute, alpha-beta communication,\n"
                    "memory per rank), print the per-layer table and the predicted speedup\n"
                    "over pure data parallelism, and write a plan file that\n"
                    "scripts/train.py --strategy accepts. Runs without mpiexec except for\n"
                    "--machine calibrate.",
        epilog=EXAMPLES.format(builtins=", ".join(available()) or "none"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    _add_machine_args(p)
    _add_search_args(p)
    return p


def _add_model_args(p):
    """--model, --batch, --image-shape, --num-classes and train.py's model knobs."""
    p.add_argument("--model", default="small_resnet", choices=model_names(), metavar="NAME",
                   help=f"model (train.py --model): {', '.join(model_names())} "
                        "(default: small_resnet, train.py's default)")
    p.add_argument("--batch", type=int_at_least("global batch"), default=64, metavar="N",
                   help="GLOBAL mini-batch size (train.py --batch-size; default 64)")
    p.add_argument("--image-shape", type=shape_arg, default=None, metavar="C,H,W",
                   help="input image shape (default: 1,8,8 for small_resnet, the digits "
                        "data train.py uses; 3,299,299 for inception_v3; 3,224,224 for the "
                        "other ImageNet models). The ResNets get train.py's 3x3 'cifar' "
                        "stem when W <= 64")
    p.add_argument("--num-classes", type=int_at_least("classes"), default=None, metavar="K",
                   help="classes of the classifier (default: 10 for small_resnet, 1000 "
                        "otherwise)")
    p.add_argument("--width", type=int_at_least("channels"), default=16,
                   help="base width of small_resnet (train.py --width; default 16)")
    p.add_argument("--width-divisor", type=int_at_least("divisor"), default=1,
                   help="alexnet, vgg*, inception_v3: every conv channel count divided by "
                        "this (train.py --width-divisor; default 1: torchvision's widths)")
    p.add_argument("--hidden", type=int_at_least("features"), default=4096,
                   help="alexnet, vgg*: width of the two hidden classifier layers "
                        "(train.py --hidden; default 4096)")
    p.add_argument("--no-aux-logits", action="store_true",
                   help="inception_v3 without its auxiliary classifier (train.py "
                        "--no-aux-logits; with it the model has two outputs)")


def _add_machine_args(p):
    """--ranks, --machine and how kernel times are had."""
    from distconv.planner.machine import available
    p.add_argument("--ranks", type=int_at_least("ranks"), default=None, metavar="P",
                   help="target number of ranks, any size (required, except with "
                        "--machine calibrate where it defaults to the MPI job size)")
    p.add_argument("--machine", required=True, metavar="FILE|NAME|calibrate",
                   help="machine description: a JSON file, a shipped machine "
                        f"({', '.join(available())}), or 'calibrate' to measure the "
                        "current MPI job (run under mpiexec)")
    p.add_argument("--save-machine", default=None, metavar="PATH",
                   help="write the loaded or calibrated machine file here")
    p.add_argument("--calibrate-reps", type=int_at_least("repetitions"), default=5,
                   metavar="R", help="timed calls per size and collective when "
                                     "calibrating (default 5)")
    p.add_argument("--compute", choices=("fitted", "measure"), default=None,
                   help="local kernel times: 'fitted' (t0 + work/rate with the machine "
                        "file's rates, or one-CPU-core defaults) or 'measure' (time every "
                        "shard shape on THIS machine with distconv's kernels and cache "
                        "it). Default: measure with --machine calibrate, fitted otherwise")
    p.add_argument("--compute-cache", default=None, metavar="PATH",
                   help="kernel-time cache (JSON). With --compute measure default: "
                        "$DISTCONV_CACHE_DIR/compute_profile.json (~/.cache/distconv); "
                        "with fitted, only used when given: its measured entries of this "
                        "machine are then used where they exist")
    p.add_argument("--threads", type=int_at_least("threads"), default=None,
                   help="BLAS threads to measure kernels with (default: cores of this "
                        "node / ranks of the target on one node)")


def _add_search_args(p):
    """The search's limits and settings, and the output."""
    p.add_argument("--memory-limit", type=bytes_arg, default=MACHINE_LIMIT, metavar="BYTES",
                   help="memory per rank the plan must fit, e.g. 16GiB, 512MiB, 16GB, "
                        "17179869184 or 'none' (default: the machine's memory_per_rank)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="optimizer state in the memory and update model (sgd: momentum, "
                        "one slot; adam: two)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="element type of activations, weights and messages")
    p.add_argument("--spatial", action="store_true",
                   help="also search splits of height and width (Strategy(height=, "
                        "width=): halo exchanges priced by running the layers shape-only); "
                        "for large images at small batches, e.g. --model convstack2d")
    p.add_argument("--placement", action="store_true",
                   help="also place the branches of forks joined by a cat (Inception's "
                        "towers) on disjoint halves and quarters of the ranks, running at "
                        "the same time (Strategy(ranks=)); the model must dc.fork them, "
                        "as --model inception_v3 does")
    p.add_argument("--no-overlap", action="store_true",
                   help="predict with gradient allreduces blocking in opt.step() instead of "
                        "overlapped with backward (train.py --no-overlap)")
    add_bucket_kb(p)
    p.add_argument("--min-gain", type=float, default=None, metavar="FRAC",
                   help="return a mixed plan only if it is predicted faster than every "
                        "uniform plan (one strategy for all layers) by more than this "
                        "fraction (default 0.05: distconv.planner.auto.MIN_GAIN; 0 returns "
                        "the fastest predicted plan)")
    p.add_argument("--mcmc-budget", type=float, default=0.0, metavar="S",
                   help="seconds of MCMC refinement (FlexFlow's search: change one "
                        "layer's strategy at a time, accept by the simulated step) started "
                        "from the fastest searched or uniform plan; the plan it finds is "
                        "returned if the simulator rates it faster (default 0: off)")
    p.add_argument("--mcmc-seed", type=int, default=0, metavar="K",
                   help="random seed of the MCMC chain (default 0)")
    p.add_argument("--out", default="plan.json", metavar="PLAN.json",
                   help="plan file to write (default plan.json)")
    p.add_argument("--quiet", action="store_true",
                   help="print only errors (and warnings), not the table")


# ------------------------------------------------------------------ machine and compute
def resolve_machine(spec: str):
    """``(Machine, source)`` for a machine file path or a shipped name (not 'calibrate');
    :class:`PlanError` naming what was expected and what came."""
    from distconv.planner.machine import Machine, available, builtin
    looks_like_path = (os.path.exists(spec) or spec.endswith(".json") or os.sep in spec
                       or (os.altsep is not None and os.altsep in spec))
    if looks_like_path:
        path = spec
    elif spec in available():
        path = builtin(spec)
    else:
        raise PlanError(f"--machine: expected a machine JSON file, a shipped machine "
                        f"({', '.join(available())}) or 'calibrate', got {spec!r} (no such "
                        f"file or shipped machine)")
    try:
        m = Machine.load(path)
    except (OSError, ValueError) as e:
        msg = str(e) if isinstance(e, ValueError) or "machine file" in str(e) else \
            f"machine file {path!r} cannot be read: {e.strerror or e}"
        raise PlanError(f"--machine: {msg}") from None
    return m, (spec if path != spec else os.path.abspath(path))


def default_threads(ranks: int, machine) -> int:
    """Threads one rank of the target job gets on this node: cores / ranks per node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    local = max(1, min(int(ranks), int(getattr(machine, "ranks_per_node", 1) or 1)))
    return max(1, cores // local)


def make_compute(mode: str, machine, dtype: str, cache_path, threads):
    """The :class:`ComputeModel` for ``--compute``: fitted with the machine file's rates and
    scale (a cache only if one was given), or measured on this machine and cached."""
    from distconv.planner.compute import ComputeModel
    comp = getattr(machine, "compute", None) or {}
    kw = {"scale": float(comp.get("scale") or 1.0), "dtype": dtype}
    if comp.get("rates"):
        kw["rates"] = comp["rates"]
    if mode == "measure":
        from distconv.planner.auto import MEASURE_ROUNDS
        return ComputeModel(cache_path=cache_path, measure=True, threads=threads,
                            rounds=MEASURE_ROUNDS, **kw)
    return ComputeModel(cache_path=cache_path, measure=False, **kw)


# ------------------------------------------------------------------ the work
def _model(args):
    """``(model, image shape, classes, global input shape)`` of the arguments."""
    shape = args.image_shape or default_shape(args.model)
    classes = args.num_classes or (10 if args.model == "small_resnet" else 1000)
    in_shape = (args.batch,) + tuple(shape)
    try:
        model = build_model(args.model, shape, classes, args.width, args.width_divisor,
                            args.hidden, not args.no_aux_logits)
    except ValueError as e:
        raise PlanError(f"--model {args.model} with --image-shape {_join(shape)}: {e}") \
            from None
    return model, shape, classes, in_shape


def _compute(args, machine, ranks):
    """``(mode, cache, threads, ComputeModel)`` of --compute, --compute-cache, --threads."""
    from distconv.planner import auto
    mode = args.compute or ("measure" if args.machine == "calibrate" else "fitted")
    cache = args.compute_cache
    if mode == "measure" and cache is None:
        cache = auto.default_cache_path()
    threads = args.threads or (default_threads(ranks, machine) if mode == "measure" else None)
    return mode, cache, threads, make_compute(mode, machine, args.dtype, cache, threads)


def _search(args, model, in_shape, ranks, machine, compute, limit) -> dict:
    """:func:`plan_model` with the arguments' settings; its ValueErrors as PlanErrors that
    say which limit or input to change."""
    from distconv.planner import auto
    try:
        return auto.plan_model(model, in_shape, ranks, machine, compute=compute,
                               # plan_model reads None as "the machine's limit"
                               memory_limit=float("inf") if limit is None else limit,
                               item=4 if args.dtype == "float32" else 8,
                               optimizer=args.optimizer, overlap=not args.no_overlap,
                               bucket_bytes=bucket_bytes(args),
                               min_gain=(auto.MIN_GAIN if args.min_gain is None
                                         else args.min_gain),
                               mcmc_budget=args.mcmc_budget, mcmc_seed=args.mcmc_seed,
                               spatial=args.spatial, placement=args.placement)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("no plan fits") or "memory limit" in msg:
            src = ("--memory-limit" if args.memory_limit is not MACHINE_LIMIT
                   else f"machine {machine.name!r} memory_per_rank")
            raise PlanError(f"{src} = {limit} bytes ({fmt_bytes(limit)}) per rank is too "
                            f"small for {args.model} with global input "
                            f"{_join(in_shape, 'x')} on {ranks} rank(s): {msg}; give a "
                            f"larger --memory-limit or more --ranks") from None
        raise PlanError(f"cannot plan {args.model} with global input {_join(in_shape, 'x')}"
                        f" on {ranks} rank(s): {msg}") from None


def _save_compute(compute, cache, say):
    """Write the measured kernel times to the cache (a warning if it cannot)."""
    try:
        compute.save()
    except OSError as e:
        print(f"{PROG}: warning: cannot write the compute cache {cache!r}: {e}",
              file=sys.stderr)
    say(f"compute: {compute.measured} kernel pass(es) measured, {compute.hits} looked up "
        f"again (cache {cache})")


def _print_result(res, say):
    """The planner's table, the strategies used, the chosen candidate and MCMC's result."""
    from distconv.planner import auto
    say("")
    say(auto.format_table(res))
    say(f"strategies used: {usage_text(res)}")
    if "chosen" in res:  # planners that compare several candidate plans say which won
        say(f"chosen candidate: {res['chosen']}")
    if res.get("mcmc") is not None:
        say(mcmc_vs_dp(res))


def run_plan(args, machine, source: str, ranks: int, say) -> dict:
    """Build the model, plan it, print, write the plan file. Rank 0 only."""
    from distconv.planner import auto
    from distconv.planner.planfile import save_plan

    model, shape, classes, in_shape = _model(args)
    mode, cache, threads, compute = _compute(args, machine, ranks)
    # --memory-limit: bytes, None ('none': no limit) or MACHINE_LIMIT (not given)
    limit = (machine.memory_per_rank if args.memory_limit is MACHINE_LIMIT
             else args.memory_limit)
    say(f"{PROG}: {args.model}, global input {_join(in_shape, 'x')}, {ranks} rank(s) on "
        f"machine {machine.name!r} ({machine.ranks_per_node} per node), compute {mode}"
        f"{f' ({threads} thread(s), cache {cache})' if mode == 'measure' else ''}, memory "
        f"limit {fmt_bytes(limit)} per rank, {args.optimizer}, {args.dtype}, allreduce "
        f"{'blocking' if args.no_overlap else 'overlapped'}")
    t0 = time.perf_counter()
    res = _search(args, model, in_shape, ranks, machine, compute, limit)
    total_s = time.perf_counter() - t0
    res["memory_limit"] = limit
    if mode == "measure":
        _save_compute(compute, cache, say)
    _print_result(res, say)
    order = res["graph"].strategic_names()  # the plan file lists layers in model order
    res["plan"] = {n: res["plan"][n] for n in order}
    meta = plan_meta(args, res, classes=classes, shape=shape, in_shape=in_shape, ranks=ranks,
                     machine=machine, source=source, mode=mode, threads=threads,
                     seconds=total_s)
    try:
        save_plan(args.out, res["plan"], predicted=auto.predicted_summary(res), meta=meta)
    except OSError as e:
        raise PlanError(f"--out: cannot write the plan file {args.out!r}: "
                        f"{e.strerror or e}") from None
    say(f"wrote {args.out} ({len(res['plan'])} layers); use it with: mpiexec -n {ranks} "
        f"python scripts/train.py --model {args.model}{model_flags(args)} --batch-size "
        f"{args.batch} --strategy {args.out}")
    return res


def _join(vals, sep=","):
    return sep.join(str(int(v)) for v in vals)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from distconv.comm import world
    comm = world()
    rank, size = comm.rank, comm.size
    calibrate = args.machine == "calibrate"
    if args.ranks is None and not calibrate:
        parser.error("--ranks: expected the target rank count (an integer >= 1), got "
                     "nothing; it is required unless --machine calibrate")
    if not args.mcmc_budget >= 0.0 or args.mcmc_budget == float("inf"):
        parser.error(f"--mcmc-budget: expected seconds >= 0 (0: off), got {args.mcmc_budget}")
    if args.min_gain is not None and not 0.0 <= args.min_gain < 10.0:
        parser.error(f"--min-gain: expected a fraction >= 0 (e.g. 0.05), got {args.min_gain}")
    ranks = args.ranks if args.ranks is not None else size

    def say(msg=""):
        if rank == 0 and not args.quiet:
            try:
                print(msg, flush=True)
            except BrokenPipeError:  # e.g. piped into head: stop printing, keep working
                args.quiet = True
                sys.stdout = open(os.devnull, "w")

    rc = 0
    machine = source = None
    if calibrate:  # collective: every rank of the job takes part
        from distconv.planner.machine import calibrate as _calibrate
        if size == 1 and rank == 0:
            print(f"{PROG}: warning: --machine calibrate on 1 rank measures no "
                  "communication (links cost 0); run it under mpiexec -n N",
                  file=sys.stderr, flush=True)
        say(f"{PROG}: calibrating the links of this {size}-rank job")
        machine = _calibrate(comm, reps=args.calibrate_reps, name="calibrated",
                             verbose=not args.quiet)
        source = "calibrate"
    if rank == 0:
        try:
            if not calibrate:
                machine, source = resolve_machine(args.machine)
            if args.save_machine:
                try:
                    machine.save(args.save_machine)
                except OSError as e:
                    raise PlanError(f"--save-machine: cannot write {args.save_machine!r}: "
                                    f"{e.strerror or e}") from None
                say(f"wrote machine file {args.save_machine}")
            run_plan(args, machine, source, ranks, say)
        except PlanError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
            rc = 1
    return _agree_status(comm, rc)


def _agree_status(comm, rc: int) -> int:
    """Every rank returns rank 0's status. The other ranks wait for it sleeping (a
    nonblocking allreduce polled every 20 ms), so they do not spin on a core while rank 0
    plans or times kernels."""
    if comm.size == 1:
        return rc
    import numpy as np
    req = comm.iallreduce(np.array([rc], dtype=np.int64), op="max")
    while not req.test():
        time.sleep(0.02)
    return int(req.wait()[0])


if __name__ == "__main__":
    from distconv.comm import run_guarded
    sys.exit(run_guarded(main))
