#!/usr/bin/env python
"""Train a CNN across MPI ranks with per-layer sample/channel/filter parallelism.

    mpiexec -n 2 python scripts/train.py                  # small ResNet on the digits data
    mpiexec -n 4 python scripts/train.py --strategy sample=2,channel=2 --epochs 5
    mpiexec -n 2 python scripts/train.py --strategy plan.json --out runs/x --resume
    mpiexec -n 2 python scripts/train.py --strategy auto  # searched plan, OUT/plan.json

With no flags it writes the digits HDF5 files (scikit-learn's 1,797 handwritten
digits) to ``data/`` on first use and trains ``small_resnet`` with a mixed plan:
stem and first stage data-parallel, second stage filter-parallel, classifier
channel-parallel. Rank 0 prints a progress line every ``--log-every`` steps and
one line per epoch with the test accuracy; ``OUT/metrics.jsonl`` gets a JSON
record per logged step and per epoch; ``OUT/checkpoint.h5`` is written every
epoch and at the end (atomically). An uncaught exception on any rank prints the
rank and traceback and aborts the whole job, so no rank is left hanging.

SIGTERM or SIGUSR1 (e.g. ``sbatch --signal=USR1@120``) makes every rank write a
checkpoint at the next step boundary and exit 0; ``--resume`` continues from it.
A non-finite loss or gradient stops the run (``--skip-nonfinite`` skips the step).
``DISTCONV_FAULT`` injects faults for tests (see :func:`distconv.trainer.parse_fault`).

``--profile`` times every training step (forward, loss, backward and ``opt.step()``,
not the test-accuracy evaluation) per layer with :class:`distconv.profile.Profiler`:
wall, compute and communication time and bytes of every leaf module, and the exposed
communication of the step (including the time blocked waiting for the overlapped
gradient allreduce). At the end of the run, also after ``--max-steps`` or a signal
stop, rank 0 prints its per-layer table and writes ``OUT/profile.json``:
``{"ranks", "skip", "per_rank": [Profiler.summary() of rank 0, 1, ...],
"max_over_ranks": {wall_s, comm_s, exposed_comm_s, bytes_sent}}`` (per-step means,
maximum over the ranks). The first step (warm-up) is left out unless it is the only one.
Without ``--profile`` no wrappers are installed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


import numpy as np


def _nonnegative(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a CNN across MPI ranks with per-layer sample/channel/filter "
                    "parallelism. Launch with: mpiexec -n N python scripts/train.py [flags]. "
                    "With no flags: a small ResNet on the bundled digits data, mixed plan.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="small_resnet",
                   help="small_resnet, resnet18, resnet34, resnet50, wide_resnet50_2, "
                        "alexnet, vgg11, vgg11_bn, vgg16, vgg16_bn, inception_v3 (these six with "
                        "torchvision's definitions) or convstack2d (a CosmoFlow-like conv "
                        "stack for large images); image sizes: AlexNet >= 63, VGG >= 32, "
                        "Inception-v3 >= 75, >= 299 with its auxiliary classifier, "
                        "convstack2d >= 16")
    p.add_argument("--strategy", default="mixed",
                   help="'sample=2,channel=2' for every layer, a per-layer plan file (JSON: "
                        "layer name -> strategy text, as scripts/plan.py writes), 'mixed' "
                        "(data-parallel stem, filter-parallel last stage, channel-parallel "
                        "classifier) or 'auto' (search a plan for this job: calibrated links, "
                        "measured kernels; written to OUT/plan.json)")
    p.add_argument("--machine", default="calibrate",
                   help="for --strategy auto: 'calibrate' (measure the links of this job), "
                        "a machine JSON file or a built-in name (dev_2core, v100_ib)")
    p.add_argument("--compute-cache", default=None, metavar="FILE.json",
                   help="for --strategy auto: cache of measured kernel times (default "
                        "$DISTCONV_CACHE_DIR/compute_profile.json, ~/.cache/distconv)")
    p.add_argument("--epochs", type=int, default=12, help="number of epochs")
    p.add_argument("--batch-size", type=int, default=64, help="global mini-batch size")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warm-up length before the cosine schedule")
    p.add_argument("--data", default=None, metavar="FILE.h5",
                   help="training HDF5 file (datasets 'images' N×C×H×W and 'labels' N); "
                        "default: data/digits_train.h5, created on first use")
    p.add_argument("--test-data", default=None, metavar="FILE.h5",
                   help="test HDF5 file; default: data/digits_test.h5 when --data is not given")
    p.add_argument("--num-classes", type=int, default=None,
                   help="number of classes (default: max label + 1 of the training data)")
    p.add_argument("--width", type=int, default=16, help="base width of small_resnet")
    p.add_argument("--width-divisor", type=int, default=1,
                   help="alexnet, vgg*, inception_v3, convstack2d: divide every conv channel "
                        "count by this "
                        "(1: torchvision's widths; 16 gives tiny networks for tests)")
    p.add_argument("--hidden", type=int, default=4096,
                   help="alexnet, vgg*: width of the two hidden classifier layers; "
                        "convstack2d: of its one hidden layer")
    p.add_argument("--no-aux-logits", action="store_true",
                   help="inception_v3 without the auxiliary classifier (needed below "
                        "299x299 images; with it the loss is CE + 0.4 * CE_aux)")
    _run_args(p)
    return p


def _run_args(p) -> None:
    """The flags of the run itself: output, resume, numerics, logging, checks, profile."""
    p.add_argument("--out", default="runs/train", metavar="DIR",
                   help="output folder for metrics.jsonl and checkpoint.h5")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.h5 (any rank count or strategy)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data order")
    p.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    p.add_argument("--no-overlap", action="store_true",
                   help="sum gradients only in opt.step() instead of overlapping the "
                        "segmented allreduce with backward (to measure the hidden share)")
    p.add_argument("--bucket-kb", type=int, default=4096,
                   help="gradient bucket size for the overlapped allreduce")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="also write the checkpoint every K steps (0: only per epoch)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose loss or gradients are not finite instead of "
                        "stopping (the last good checkpoint is kept either way)")
    p.add_argument("--check-replicas-every", type=_nonnegative, default=0, metavar="N",
                   help="every N steps compare a checksum of every parameter, buffer and "
                        "optimizer-state shard across the ranks that hold replicas of it "
                        "(one small allreduce; cost in benchmarks/replicas.md) and stop, "
                        "naming the first tensor whose replicas differ (0: off)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps in total (for tests and benchmarks)")
    p.add_argument("--profile", action="store_true",
                   help="profile every training step per layer (distconv.profile.Profiler: "
                        "wall, compute, communication time and bytes, exposed communication "
                        "incl. time blocked on the overlapped gradient allreduce; evaluation "
                        "is not profiled); at the end rank 0 prints its per-layer table and "
                        "writes OUT/profile.json with every rank's summary. The first "
                        "(warm-up) step is left out unless it is the only one")


def mixed_plan(nranks: int, model: str = "small_resnet") -> dict:
    """The default mixed per-layer plan for ``nranks`` ranks: data-parallel first layers,
    filter-parallel last stage, channel-parallel classifier (ResNets); for AlexNet and VGG
    a filter-parallel first classifier layer and a channel-parallel second one; for
    Inception-v3 a filter-parallel last block and a channel-parallel classifier."""
    n = nranks
    if model == "alexnet":
        return {"": "sample=*", "classifier.1": f"sample=1,filter={n}",
                "classifier.4": f"sample=1,channel={n}"}
    if model.startswith("vgg"):
        return {"": "sample=*", "classifier.0": f"sample=1,filter={n}",
                "classifier.3": f"sample=1,channel={n}"}
    if model == "inception_v3":
        return {"": "sample=*", "Mixed_7c": f"sample=1,filter={n}",
                "fc": f"sample=1,channel={n}"}
    return {"": "sample=*", "layer2": f"sample=1,filter={n}", "fc": f"sample=1,channel={n}"}


def load_strategy(text: str, nranks: int, model: str = "small_resnet"):
    """``--strategy`` text -> Strategy or plan dict (validated by the caller's model)."""
    import distconv as dc
    if text == "mixed":
        return {k: dc.Strategy.parse(v) for k, v in mixed_plan(nranks, model).items()}
    if text.endswith(".json") or os.path.isfile(text):
        try:
            with open(text) as f:
                plan = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read strategy plan file {text!r}: {e}") from None
        if not isinstance(plan, dict):
            raise ValueError(f"plan file {text!r} must hold a JSON object: layer -> strategy")
        plan = plan.get("plan", plan)
        return {k: dc.Strategy.parse(v) if isinstance(v, str) else dc.Strategy(**v)
                for k, v in plan.items()}
    if text == "auto":
        return "auto"
    return dc.Strategy.parse(text)


def auto_plan(args, model, comm, in_shape, say) -> dict:
    """``--strategy auto``: search a per-layer plan for this job (every rank returns it).

    Every rank takes part in calibrating the α–β model of the links (``--machine
    calibrate``, the default) or reads the machine file; rank 0 measures the local kernel
    times of every shard shape it considers (cached in ``--compute-cache``), runs the
    search and writes ``OUT/plan.json``; the plan reaches the other ranks by an
    allgather. With ``--resume`` an existing ``OUT/plan.json`` is reused if it was made
    for this job's rank count; a job resumed on another rank count (e.g. requeued on
    fewer nodes after losing one) plans anew and overwrites it.
    """
    from distconv.planner import auto, machine, planfile
    from distconv.planner.compute import ComputeModel
    path = os.path.join(args.out, "plan.json")
    # rank 0's view of the file decides for every rank (the planning below is collective)
    found = comm.allgather_obj((os.path.exists(path), _plan_ranks(path))
                               if comm.rank == 0 else None)[0]
    if args.resume and found[0]:
        ranks = found[1]
        if ranks == comm.size:
            plan = planfile.load_plan(path)
            say(f"--strategy auto: reusing the plan in {path}")
            return plan
        say(f"--strategy auto: {path} was planned for {ranks} ranks, this job has "
            f"{comm.size}: planning anew")
    if args.machine == "calibrate":
        say(f"--strategy auto: calibrating the links of this job ({comm.size} ranks)")
        mach = machine.calibrate(comm)
    else:
        src = args.machine if os.path.exists(args.machine) else machine.builtin(args.machine)
        mach = machine.Machine.load(src)
    got = None
    if comm.rank == 0:
        try:
            cache = args.compute_cache or auto.default_cache_path()
            compute = ComputeModel(cache_path=cache, measure=True, dtype=args.dtype,
                                   rounds=auto.MEASURE_ROUNDS)
            say(f"--strategy auto: measuring kernel times (cache {cache}) and searching")
            t0 = time.perf_counter()
            res = auto.plan_model(model, in_shape, comm.size, mach, compute,
                                  optimizer=args.optimizer, item=np.dtype(args.dtype).itemsize,
                                  overlap=not args.no_overlap,
                                  bucket_bytes=args.bucket_kb << 10)
            compute.save()
            say(auto.format_table(res))
            say(f"--strategy auto: planned in {time.perf_counter() - t0:.1f} s "
                f"({compute.measured} kernel passes measured, {compute.hits} from the cache)")
            os.makedirs(args.out, exist_ok=True)
            planfile.save_plan(path, res["plan"], auto.predicted_summary(res),
                               {"model": args.model, "input_shape": list(in_shape),
                                "ranks": comm.size, "machine": mach.name,
                                "machine_file": mach.to_dict(),
                                "written_by": "scripts/train.py --strategy auto"})
            got = ("ok", res["plan"])
        except Exception as e:  # every rank raises the same error below
            got = ("error", f"--strategy auto failed on rank 0: {type(e).__name__}: {e}")
    got = comm.allgather_obj(got)[0]
    if got[0] != "ok":
        raise RuntimeError(got[1])
    return got[1]


def _plan_ranks(path):
    """The rank count a plan file was made for (its ``meta.ranks``), or None."""
    try:
        with open(path) as f:
            return json.load(f).get("meta", {}).get("ranks")
    except (OSError, ValueError, AttributeError):
        return None


def load_data(args):
    """``(train set, test set or None, train file)``: ``--data``/``--test-data``, or the
    digits files written to data/ on first use; a clear error for an empty file."""
    from distconv import data
    train_path, test_path = args.data, args.test_data
    if train_path is None:
        train_path = os.path.join("data", "digits_train.h5")
        test_path = test_path or os.path.join("data", "digits_test.h5")
        data.ensure_digits("data", seed=0)
    train_set = data.H5Dataset(train_path, num_classes=args.num_classes)
    test_set = data.H5Dataset(test_path, num_classes=args.num_classes) if test_path else None
    if len(train_set) == 0:
        raise ValueError(f"HDF5 dataset file {train_path!r} holds no samples: nothing to train")
    if min(train_set.image_shape) < 1:
        raise ValueError(f"HDF5 dataset file {train_path!r}: images of shape (C, H, W) = "
                         f"{train_set.image_shape} are empty; the model needs C, H, W >= 1")
    return train_set, test_set, train_path


def make_model(args, size, train_set, num_classes, train_path):
    """``--model`` under ``--strategy`` (none yet for ``auto``) for the data's images; the
    same error on every rank, before any step, for an unknown model or too small images."""
    from distconv import models
    from distconv.bench.models import build_model
    known = sorted(models.MODELS) + sorted(models.CNN_MODELS)
    if args.model not in known:
        raise ValueError(f"unknown --model {args.model!r}; choose from {known}")
    strategy = load_strategy(args.strategy, size, args.model)
    model = build_model(args.model, train_set.image_shape, num_classes, width=args.width,
                        width_divisor=args.width_divisor, hidden=args.hidden,
                        aux_logits=not args.no_aux_logits,
                        strategy=None if strategy == "auto" else strategy, init_weights=True)
    if args.model in models.CNN_MODELS:
        aux = getattr(model, "aux_logits", False)
        need = model.min_size_aux if aux else model.min_size
        h, w = train_set.image_shape[1:]
        if h < need[0] or w < need[1]:
            raise ValueError(f"--model {args.model} needs images of at least "
                             f"{need[0]}x{need[1]}, but {train_path!r} "
                             f"holds {h}x{w}"
                             + ("; without the auxiliary classifier (--no-aux-logits) "
                                f"{model.min_size[0]}x{model.min_size[1]} is enough"
                                if aux else ""))
    return model


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import distconv as dc
    from distconv import backend
    from distconv.comm import world
    from distconv.trainer import Trainer, install_stop_signals, parse_fault

    comm = world()
    rank, size = comm.rank, comm.size
    fault = parse_fault(os.environ.get("DISTCONV_FAULT"))
    install_stop_signals()
    if args.backend != "auto":
        backend.set_backend(args.backend)
    backend.configure_threads()
    dc.set_default_dtype(np.float32 if args.dtype == "float32" else np.float64)
    dc.manual_seed(args.seed)

    def say(msg):
        if rank == 0:
            print(msg, flush=True)

    train_set, test_set, train_path = load_data(args)
    num_classes = args.num_classes or train_set.num_classes
    model = make_model(args, size, train_set, num_classes, train_path)
    if args.strategy == "auto":
        from distconv.planner.planfile import to_strategies
        in_shape = (args.batch_size,) + tuple(train_set.image_shape)
        model.set_strategy(to_strategies(auto_plan(args, model, comm, in_shape, say)))
    first = next(m for _, m in model.named_modules() if isinstance(m, dc.nn.Conv2d))
    # the loader cuts each batch as the first conv reads it
    run = Trainer(args, comm, model, train_set, test_set, first.input_distribution, say,
                  fault=fault)
    run.open_run()
    say(f"distconv: {args.model} on {size} rank(s), strategy {args.strategy}, "
        f"{len(train_set)} training images {train_set.image_shape}, {num_classes} classes, "
        f"batch {args.batch_size}, {run.steps_per_epoch} steps/epoch, dtype {args.dtype}")
    return run.fit()


if __name__ == "__main__":
    from distconv.comm import run_guarded
    sys.exit(run_guarded(main))
