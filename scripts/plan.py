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
import datetime
import os
import re
import shlex
import sys
import time


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

# Default image shape and class count per model: train.py's digits data (8x8 grey
# images, 10 classes) for small_resnet, ImageNet for the others (299x299 for Inception-v3,
# the smallest its auxiliary classifier takes).
DIGITS_SHAPE = (1, 8, 8)
IMAGENET_SHAPE = (3, 224, 224)
INCEPTION_SHAPE = (3, 299, 299)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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


def parse_bytes(text: str):
    """``"16GiB"``, ``"512MiB"``, ``"16GB"``, ``"1e9"``, ``"17179869184"`` -> bytes (int);
    ``"none"`` -> ``None`` (no limit). ``ValueError`` naming the accepted forms."""
    t = str(text).strip()
    if t.lower() in ("none", "unlimited"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)", t)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"expected a byte count such as 17179869184, 16GiB, 512MiB, 16GB "
                         f"or 'none' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), "
                         f"got {text!r}")
    n = float(m.group(1)) * _UNITS[unit]
    if not n >= 1:
        raise ValueError(f"expected a memory limit of at least 1 byte, got {text!r}")
    return int(n)


def _bytes_arg(text):
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_shape(text: str) -> tuple:
    """``"3,224,224"`` -> ``(3, 224, 224)``; ``ValueError`` unless three integers >= 1."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise ValueError(f"expected C,H,W: three integers >= 1 such as 3,224,224, got {text!r}")
    return vals


def _shape_arg(text):
    try:
        return parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(what):
    def conv(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1 ({what}), "
                                             f"got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1 ({what}), got {v}")
        return v
    return conv


def model_names() -> list:
    """Every ``--model`` name: the ResNets of ``distconv.models.MODELS`` and the networks
    of ``CNN_MODELS`` (AlexNet, VGG, Inception-v3), as train.py accepts them."""
    from distconv.models import CNN_MODELS, MODELS
    return sorted(MODELS) + sorted(CNN_MODELS)


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
    p.add_argument("--model", default="small_resnet", choices=model_names(), metavar="NAME",
                   help=f"model (train.py --model): {', '.join(model_names())} "
                        "(default: small_resnet, train.py's default)")
    p.add_argument("--batch", type=_positive("global batch"), default=64, metavar="N",
                   help="GLOBAL mini-batch size (train.py --batch-size; default 64)")
    p.add_argument("--image-shape", type=_shape_arg, default=None, metavar="C,H,W",
                   help="input image shape (default: 1,8,8 for small_resnet, the digits "
                        "data train.py uses; 3,299,299 for inception_v3; 3,224,224 for the "
                        "other ImageNet models). The ResNets get train.py's 3x3 'cifar' "
                        "stem when W <= 64")
    p.add_argument("--num-classes", type=_positive("classes"), default=None, metavar="K",
                   help="classes of the classifier (default: 10 for small_resnet, 1000 "
                        "otherwise)")
    p.add_argument("--width", type=_positive("channels"), default=16,
                   help="base width of small_resnet (train.py --width; default 16)")
    p.add_argument("--width-divisor", type=_positive("divisor"), default=1,
                   help="alexnet, vgg*, inception_v3: every conv channel count divided by "
                        "this (train.py --width-divisor; default 1: torchvision's widths)")
    p.add_argument("--hidden", type=_positive("features"), default=4096,
                   help="alexnet, vgg*: width of the two hidden classifier layers "
                        "(train.py --hidden; default 4096)")
    p.add_argument("--no-aux-logits", action="store_true",
                   help="inception_v3 without its auxiliary classifier (train.py "
                        "--no-aux-logits; with it the model has two outputs)")
    p.add_argument("--ranks", type=_positive("ranks"), default=None, metavar="P",
                   help="target number of ranks, any size (required, except with "
                        "--machine calibrate where it defaults to the MPI job size)")
    p.add_argument("--machine", required=True, metavar="FILE|NAME|calibrate",
                   help="machine description: a JSON file, a shipped machine "
                        f"({', '.join(available())}), or 'calibrate' to measure the "
                        "current MPI job (run under mpiexec)")
    p.add_argument("--save-machine", default=None, metavar="PATH",
                   help="write the loaded or calibrated machine file here")
    p.add_argument("--calibrate-reps", type=_positive("repetitions"), default=5,
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
    p.add_argument("--threads", type=_positive("threads"), default=None,
                   help="BLAS threads to measure kernels with (default: cores of this "
                        "node / ranks of the target on one node)")
    p.add_argument("--memory-limit", type=_bytes_arg, default=MACHINE_LIMIT, metavar="BYTES",
                   help="memory per rank the plan must fit, e.g. 16GiB, 512MiB, 16GB, "
                        "17179869184 or 'none' (default: the machine's memory_per_rank)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="optimizer state in the memory and update model (sgd: momentum, "
                        "one slot; adam: two)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="element type of activations, weights and messages")
    p.add_argument("--no-overlap", action="store_true",
                   help="predict with gradient allreduces blocking in opt.step() instead of "
                        "overlapped with backward (train.py --no-overlap)")
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
    return p


# ------------------------------------------------------------------ model and machine
def default_shape(model: str) -> tuple:
    if model == "small_resnet":
        return DIGITS_SHAPE
    return INCEPTION_SHAPE if model == "inception_v3" else IMAGENET_SHAPE


def build_model(name: str, image_shape, num_classes: int, width: int = 16,
                width_divisor: int = 1, hidden: int = 4096, aux_logits: bool = True):
    """The model train.py builds for ``--model name`` on images of ``image_shape``
    (``width``: small_resnet's; ``width_divisor``, ``hidden``, ``aux_logits``: the
    AlexNet/VGG/Inception knobs of train.py)."""
    from distconv import models
    c, _, w = image_shape
    if name == "small_resnet":
        return models.small_resnet(num_classes, in_channels=c, width=width)
    if name in models.CNN_MODELS:
        kw = {"width_divisor": width_divisor}
        if name != "alexnet":  # the plan needs shapes only: skip torchvision's init
            kw["init_weights"] = False
        if name == "inception_v3":
            kw["aux_logits"] = aux_logits
        else:
            kw["hidden"] = hidden
        return models.CNN_MODELS[name](num_classes, in_channels=c, **kw)
    stem = "cifar" if w <= 64 else "imagenet"  # as scripts/train.py chooses it
    return models.MODELS[name](num_classes, in_channels=c, stem=stem)


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


# ------------------------------------------------------------------ reporting
def short_strategy(st) -> str:
    s, c, f = st
    return f"s{s} c{c} f{f}"


def strategy_usage(result) -> list:
    """``[(strategy, {kind: count}), ...]`` of the plan, most used first."""
    kinds = {layer.name: layer.kind for layer in result["graph"].layers()}
    use: dict = {}
    for name, st in result["plan"].items():
        d = use.setdefault(tuple(st), {})
        k = kinds.get(name, "?")
        d[k] = d.get(k, 0) + 1
    return sorted(use.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))


def usage_text(result) -> str:
    parts = []
    for st, kinds in strategy_usage(result):
        n = sum(kinds.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        parts.append(f"{short_strategy(st)}: {n} layer{'s' if n != 1 else ''} ({detail})")
    return "; ".join(parts)


def mcmc_vs_dp(result) -> str:
    """What MCMC found against the DP search's plan (the fastest of its sync weights)."""
    run = result["mcmc"]
    dp = [t for n, t in (result.get("candidates") or {}).items() if n.startswith("search")]
    line = (f"MCMC {run['seconds']:.2f} s ({run['proposals']} proposals, {run['accepted']} "
            f"accepted): {run['step_s'] * 1e3:.3f} ms")
    if dp:
        line += (f" vs DP search {min(dp) * 1e3:.3f} ms "
                 f"({100 * (1 - run['step_s'] / min(dp)):+.2f}%)")
    line += f"; started from {run['start']} ({run['start_step_s'] * 1e3:.3f} ms)"
    return line + ("; MCMC plan returned" if run.get("returned") else "")


def _fmt_bytes(n) -> str:
    if n is None:
        return "unlimited"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------ the work
def run_plan(args, machine, source: str, ranks: int, say) -> dict:
    """Build the model, plan it, print, write the plan file. Rank 0 only."""
    from distconv.models import CNN_MODELS
    from distconv.planner import auto
    from distconv.planner.planfile import save_plan

    shape = args.image_shape or default_shape(args.model)
    classes = args.num_classes or (10 if args.model == "small_resnet" else 1000)
    in_shape = (args.batch,) + tuple(shape)
    try:
        model = build_model(args.model, shape, classes, args.width, args.width_divisor,
                            args.hidden, not args.no_aux_logits)
    except ValueError as e:
        raise PlanError(f"--model {args.model} with --image-shape {_join(shape)}: {e}") \
            from None
    mode = args.compute or ("measure" if args.machine == "calibrate" else "fitted")
    cache = args.compute_cache
    if mode == "measure" and cache is None:
        cache = auto.default_cache_path()
    threads = args.threads or (default_threads(ranks, machine) if mode == "measure" else None)
    compute = make_compute(mode, machine, args.dtype, cache, threads)
    # --memory-limit: bytes, None ('none': no limit) or MACHINE_LIMIT (not given)
    limit = (machine.memory_per_rank if args.memory_limit is MACHINE_LIMIT
             else args.memory_limit)
    say(f"{PROG}: {args.model}, global input {_join(in_shape, 'x')}, {ranks} rank(s) on "
        f"machine {machine.name!r} ({machine.ranks_per_node} per node), compute {mode}"
        f"{f' ({threads} thread(s), cache {cache})' if mode == 'measure' else ''}, memory "
        f"limit {_fmt_bytes(limit)} per rank, {args.optimizer}, {args.dtype}, allreduce "
        f"{'blocking' if args.no_overlap else 'overlapped'}")
    t0 = time.perf_counter()
    try:
        res = auto.plan_model(model, in_shape, ranks, machine, compute=compute,
                              # plan_model reads None as "the machine's limit"
                              memory_limit=float("inf") if limit is None else limit,
                              item=4 if args.dtype == "float32" else 8,
                              optimizer=args.optimizer, overlap=not args.no_overlap,
                              min_gain=(auto.MIN_GAIN if args.min_gain is None
                                        else args.min_gain),
                              mcmc_budget=args.mcmc_budget, mcmc_seed=args.mcmc_seed)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("no plan fits") or "memory limit" in msg:
            src = ("--memory-limit" if args.memory_limit is not MACHINE_LIMIT
                   else f"machine {machine.name!r} memory_per_rank")
            raise PlanError(f"{src} = {limit} bytes ({_fmt_bytes(limit)}) per rank is too "
                            f"small for {args.model} with global input "
                            f"{_join(in_shape, 'x')} on {ranks} rank(s): {msg}; give a "
                            f"larger --memory-limit or more --ranks") from None
        raise PlanError(f"cannot plan {args.model} with global input {_join(in_shape, 'x')}"
                        f" on {ranks} rank(s): {msg}") from None
    total_s = time.perf_counter() - t0
    res["memory_limit"] = limit
    if mode == "measure":
        try:
            compute.save()
        except OSError as e:
            print(f"{PROG}: warning: cannot write the compute cache {cache!r}: {e}",
                  file=sys.stderr)
        say(f"compute: {compute.measured} kernel pass(es) measured, {compute.hits} looked up "
            f"again (cache {cache})")
    say("")
    say(auto.format_table(res))
    say(f"strategies used: {usage_text(res)}")
    if "chosen" in res:  # planners that compare several candidate plans say which won
        say(f"chosen candidate: {res['chosen']}")
    if res.get("mcmc") is not None:
        say(mcmc_vs_dp(res))
    order = res["graph"].strategic_names()  # the plan file lists layers in model order
    res["plan"] = {n: res["plan"][n] for n in order}
    pred = auto.predicted_summary(res)
    meta = {
        "model": args.model, "num_classes": classes,
        "width": args.width if args.model == "small_resnet" else None,
        "stem": (None if args.model == "small_resnet" or args.model in CNN_MODELS
                 else ("cifar" if shape[2] <= 64 else "imagenet")),
        **({"width_divisor": args.width_divisor} if args.model in CNN_MODELS else {}),
        **({"hidden": args.hidden} if args.model in CNN_MODELS
           and args.model != "inception_v3" else {}),
        **({"aux_logits": not args.no_aux_logits} if args.model == "inception_v3" else {}),
        "input_shape": list(in_shape), "ranks": ranks, "machine": machine.name,
        "machine_source": source, "ranks_per_node": machine.ranks_per_node,
        "compute": mode, "threads": threads, "memory_limit": res["memory_limit"],
        "optimizer": args.optimizer, "dtype": args.dtype, "overlap": not args.no_overlap,
        "plan_seconds": total_s, "chosen": res.get("chosen"),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        save_plan(args.out, res["plan"], predicted=pred, meta=meta)
    except OSError as e:
        raise PlanError(f"--out: cannot write the plan file {args.out!r}: "
                        f"{e.strerror or e}") from None
    width = f" --width {args.width}" if args.model == "small_resnet" and args.width != 16 else ""
    if args.model in CNN_MODELS:  # train.py must build the same model
        width += f" --width-divisor {args.width_divisor}" if args.width_divisor != 1 else ""
        if args.model != "inception_v3" and args.hidden != 4096:
            width += f" --hidden {args.hidden}"
        if args.model == "inception_v3" and args.no_aux_logits:
            width += " --no-aux-logits"
    say(f"wrote {args.out} ({len(res['plan'])} layers); use it with: mpiexec -n {ranks} "
        f"python scripts/train.py --model {args.model}{width} --batch-size {args.batch} "
        f"--strategy {args.out}")
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
