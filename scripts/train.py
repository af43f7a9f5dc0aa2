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
``DISTCONV_FAULT`` injects faults for tests (see :func:`parse_fault`).

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
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


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
                        "alexnet, vgg11, vgg11_bn, vgg16, vgg16_bn or inception_v3 (the last "
                        "six with torchvision's definitions; image sizes: AlexNet >= 63, "
                        "VGG >= 32, Inception-v3 >= 75, >= 299 with its auxiliary classifier)")
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
                   help="alexnet, vgg*, inception_v3: divide every conv channel count by this "
                        "(1: torchvision's widths; 16 gives tiny networks for tests)")
    p.add_argument("--hidden", type=int, default=4096,
                   help="alexnet, vgg*: width of the two hidden classifier layers")
    p.add_argument("--no-aux-logits", action="store_true",
                   help="inception_v3 without the auxiliary classifier (needed below "
                        "299x299 images; with it the loss is CE + 0.4 * CE_aux)")
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
    return p


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
                                  overlap=not args.no_overlap)
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


_STOP = {"signal": None}  # set by SIGTERM/SIGUSR1; acted on at the next step boundary


def _on_signal(signum, frame):
    _STOP["signal"] = signum


def parse_fault(text: str | None) -> dict:
    """``DISTCONV_FAULT`` (testing only): ``raise@rank=1,step=3`` (that rank raises at the
    start of that step), ``kill@rank=1,step=3`` (it dies with SIGKILL), or
    ``checkpoint@epoch=2`` (rank 0 fails between writing and renaming that epoch's
    checkpoint), or ``diverge@rank=1,step=3`` (after that step's update, that rank adds
    1e-6 to its copy of the first parameter: replicas that differ)."""
    if not text:
        return {}
    kind, _, rest = text.partition("@")
    out = {"kind": kind}
    for part in filter(None, rest.split(",")):
        k, _, v = part.partition("=")
        out[k] = int(v)
    if kind not in ("raise", "kill", "checkpoint", "diverge"):
        raise ValueError(f"DISTCONV_FAULT: unknown fault {kind!r} in {text!r}")
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import distconv as dc
    from distconv import backend, checkpoint, data, models, optim
    from distconv.comm import world
    from distconv.replicas import ReplicaMismatchError, check_replicas

    comm = world()
    rank, size = comm.rank, comm.size
    fault = parse_fault(os.environ.get("DISTCONV_FAULT"))
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _on_signal)
    if args.backend != "auto":
        backend.set_backend(args.backend)
    backend.configure_threads()
    dc.set_default_dtype(np.float32 if args.dtype == "float32" else np.float64)
    dc.manual_seed(args.seed)

    def say(msg):
        if rank == 0:
            print(msg, flush=True)

    # ---------------------------------------------------------------- data
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
    num_classes = args.num_classes or train_set.num_classes
    in_ch = train_set.image_shape[0]

    # ---------------------------------------------------------------- model
    known = sorted(models.MODELS) + sorted(models.CNN_MODELS)
    if args.model not in known:
        raise ValueError(f"unknown --model {args.model!r}; choose from {known}")
    strategy = load_strategy(args.strategy, size, args.model)
    planned = strategy == "auto"
    if planned:
        strategy = None
    if args.model == "small_resnet":
        model = models.small_resnet(num_classes, in_channels=in_ch, width=args.width,
                                    strategy=strategy)
    elif args.model in models.MODELS:
        stem = "cifar" if train_set.image_shape[-1] <= 64 else "imagenet"
        model = models.MODELS[args.model](num_classes, in_channels=in_ch, stem=stem,
                                          strategy=strategy)
    else:
        kw = {"width_divisor": args.width_divisor}
        if args.model == "inception_v3":
            kw["aux_logits"] = not args.no_aux_logits
        else:
            kw["hidden"] = args.hidden
        model = models.CNN_MODELS[args.model](num_classes, in_channels=in_ch, strategy=strategy,
                                              **kw)
    if args.model in models.CNN_MODELS:  # the same error on every rank, before any step
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
    if planned:
        from distconv.planner.planfile import to_strategies
        in_shape = (args.batch_size,) + tuple(train_set.image_shape)
        model.set_strategy(to_strategies(auto_plan(args, model, comm, in_shape, say)))
    first = next(m for _, m in model.named_modules() if isinstance(m, dc.nn.Conv2d))
    in_dist = first.input_distribution  # the loader cuts each batch as the first conv reads it
    dropouts = [(n, m) for n, m in model.named_modules() if isinstance(m, dc.nn.Dropout)]
    loader = data.DistLoader(train_set, args.batch_size, in_dist, shuffle=True, seed=args.seed)
    steps_per_epoch = len(loader)
    if args.optimizer == "sgd":
        opt = optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                        weight_decay=args.weight_decay)
    else:
        opt = optim.Adam(model.parameters(), args.lr, weight_decay=args.weight_decay)
    total = args.epochs * steps_per_epoch
    warm = int(args.warmup_epochs * steps_per_epoch)
    sched = optim.LinearWarmup(opt, warm, after=optim.CosineAnnealingLR(opt, max(1, total - warm)))
    sync = optim.GradientSync(model, opt, bucket_bytes=args.bucket_kb << 10,
                              overlap=not args.no_overlap)
    crit = dc.nn.CrossEntropyLoss()
    prof = None
    if args.profile:
        from distconv.profile import Profiler
        prof = Profiler(model, sync=sync)  # after GradientSync: its backward hooks are timed

    os.makedirs(args.out, exist_ok=True) if rank == 0 else None
    comm.barrier()
    ckpt_path = os.path.join(args.out, "checkpoint.h5")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start_epoch, step = 0, 0
    if args.resume:
        meta = checkpoint.load_checkpoint(ckpt_path, model, opt, sched)
        if meta.get("model") != args.model:
            raise ValueError(f"{ckpt_path} holds a {meta.get('model')!r} model, not "
                             f"{args.model!r}")
        step = int(meta["step"])
        for n, m in dropouts:  # the dropout masks continue where they were
            m.step = int(meta.get("dropout_steps", {}).get(n, 0))
        loader.load_state_dict(meta["loader"])
        start_epoch = loader.position()[0]
        say(f"resumed from {ckpt_path}: epoch {start_epoch}, step {step}")
    elif rank == 0:
        open(metrics_path, "w").close()

    def log(rec):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    say(f"distconv: {args.model} on {size} rank(s), strategy {args.strategy}, "
        f"{len(train_set)} training images {train_set.image_shape}, {num_classes} classes, "
        f"batch {args.batch_size}, {steps_per_epoch} steps/epoch, dtype {args.dtype}")

    def evaluate():
        if test_set is None:
            return None
        model.eval()
        tl = data.DistLoader(test_set, args.batch_size, in_dist, shuffle=False)
        correct = n = 0
        for x, y in tl:
            with dc.no_grad():
                logits = backend.to_numpy(model(x).to_global())
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        model.train()
        return correct / max(n, 1)

    def save(epoch):
        if fault.get("kind") == "checkpoint" and fault.get("epoch") == epoch:
            def fail(tmp):
                raise OSError(f"injected fault (DISTCONV_FAULT) before renaming {tmp}")
            checkpoint._before_rename = fail
        checkpoint.save_checkpoint(ckpt_path, model, opt, sched, meta={
            "epoch": epoch, "step": step, "model": args.model, "strategy": args.strategy,
            "loader": loader.state_dict(), "seed": args.seed, "args": vars(args),
            "dropout_steps": {n: m.step for n, m in dropouts}})

    named = [(n, p) for n, p in model.named_parameters()]

    def report_profile():
        """Collective (every rank calls it): rank 0 prints its per-layer table and writes
        OUT/profile.json with the summaries of all ranks."""
        if prof is None:
            return
        skip = 1 if len(prof.steps) > 1 else 0
        per_rank = comm.allgather_obj(prof.summary(skip))
        if rank != 0:
            return
        keys = ("wall_s", "comm_s", "exposed_comm_s", "bytes_sent")
        worst = {k: max(s["per_step"][k] for s in per_rank) for k in keys}
        path = os.path.join(args.out, "profile.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"ranks": size, "skip": skip, "per_rank": per_rank,
                       "max_over_ranks": worst}, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"profile of rank 0, per-step means over {per_rank[0]['nsteps']} step(s)"
              f"{' (first step skipped)' if skip else ''}:", flush=True)
        print(prof.table(skip), flush=True)
        print(f"max over {size} rank(s), per step: wall {1e3 * worst['wall_s']:.3f} ms, "
              f"comm {1e3 * worst['comm_s']:.3f} ms, exposed comm "
              f"{1e3 * worst['exposed_comm_s']:.3f} ms, sent {worst['bytes_sent'] / 1e3:.1f} kB;"
              f" all ranks in {path}", flush=True)

    def step_checks(loss):
        """``(names of what is not finite this step, stop requested)``, agreed on all ranks
        with one tiny allreduce: a non-finite gradient on any rank, or a SIGTERM/SIGUSR1
        that reached any rank."""
        xp = backend.get_xp()
        mine = [n for n, p in named  # a rank off a placed layer holds no gradient values
                if p.grad is not None and p.grad.grid.member
                and not bool(xp.isfinite(p.grad.local).all())]
        flag = comm.allreduce(np.asarray([1.0 if mine else 0.0,
                                          1.0 if _STOP["signal"] else 0.0]), op="max")
        out = [] if np.isfinite(loss) else ["loss"]  # the loss is the same on every rank
        if flag[0]:
            out += sorted({n.rpartition(".")[0] or n
                           for r in comm.allgather_obj(mine) for n in r})
        return out, bool(flag[1])

    t_run = time.perf_counter()
    done = False
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)
        t_ep = time.perf_counter()
        win_t, win_n, win_loss, win_acc, win_steps = time.perf_counter(), 0, 0.0, 0, 0
        comm.reset_stats()
        for x, y in loader:
            if fault.get("kind") in ("raise", "kill") and fault.get("rank") == rank \
                    and fault.get("step") == step + 1:
                if fault["kind"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected fault (DISTCONV_FAULT) at step {step + 1}")
            opt.zero_grad()
            running = ([(b, b.local.copy()) for _, b in model.named_buffers()]
                       if args.skip_nonfinite else [])
            if prof is not None:
                prof.step_begin()
            logits = model(x)
            if isinstance(logits, tuple):  # Inception-v3's (logits, aux_logits) in training
                loss = crit(logits[0], y) + 0.4 * crit(logits[1], y)
                logits = logits[0]
            else:
                loss = crit(logits, y)
            loss.backward()
            bad, stop = step_checks(loss)
            if bad:
                sync.wait()  # finish the allreduces in flight before leaving the step
                where = (f"step {step + 1} (epoch {epoch + 1}): non-finite values in "
                         f"{', '.join(bad)}")
                if not args.skip_nonfinite:
                    kept = (f"the last good checkpoint {ckpt_path} is kept"
                            if os.path.exists(ckpt_path) else "no checkpoint was written yet")
                    raise FloatingPointError(f"{where}; training stopped, {kept}")
                say(f"skipping {where} (--skip-nonfinite)")
                log({"kind": "skipped", "epoch": epoch + 1, "step": step + 1, "reason": where})
                opt.zero_grad()
                for b, saved in running:  # this step's batch statistics are not kept either
                    b.local[...] = saved
            else:
                opt.step()
                sched.step()
            if prof is not None:
                prof.step_end()
            step += 1
            if fault.get("kind") == "diverge" and fault.get("rank") == rank \
                    and fault.get("step") == step:
                named[0][1].data.local.reshape(-1)[:1] += 1e-6  # a view (NumPy or CuPy)
            if args.check_replicas_every and step % args.check_replicas_every == 0:
                try:
                    check_replicas(model, opt)
                except ReplicaMismatchError as e:  # raised on every rank alike
                    raise ReplicaMismatchError(f"step {step} (epoch {epoch + 1}): {e}; "
                                               f"training stopped") from None
            pred = backend.to_numpy(logits.to_global()).argmax(1)
            win_loss += loss
            win_acc += int((pred == y).sum())
            win_n += len(y)
            win_steps += 1
            if step % args.log_every == 0 or loader.position()[1] == steps_per_epoch:
                dt = time.perf_counter() - win_t
                st = comm.stats()
                comm_t = st["total"]["time"]
                rec = {"kind": "step", "epoch": epoch + 1, "step": step,
                       "loss": win_loss / win_steps, "accuracy": win_acc / max(win_n, 1),
                       "images_per_s": win_n / dt, "comm_share": comm_t / dt,
                       "lr": opt.lr, "bytes_sent": st["total"]["bytes_sent"]}
                say(f"epoch {epoch + 1} step {step} loss {rec['loss']:.4f} "
                    f"acc {rec['accuracy']:.3f} {rec['images_per_s']:.0f} img/s "
                    f"comm {100 * rec['comm_share']:.0f}% lr {opt.lr:.4f}")
                log(rec)
                comm.reset_stats()
                win_t, win_n, win_loss, win_acc, win_steps = time.perf_counter(), 0, 0.0, 0, 0
            if args.checkpoint_every and step % args.checkpoint_every == 0 and not stop:
                save(epoch + 1)
            if stop:
                save(epoch + 1)  # the loader's position says where to continue
                name = signal.Signals(_STOP["signal"]).name if _STOP["signal"] else "a signal"
                say(f"{name} received (on some rank): checkpoint written at step {step} to "
                    f"{ckpt_path}; exiting 0, continue with --resume")
                report_profile()
                return 0
            if args.max_steps is not None and step >= args.max_steps:
                done = True
                break
        acc = evaluate()
        ep_t = time.perf_counter() - t_ep
        rec = {"kind": "epoch", "epoch": epoch + 1, "step": step, "test_accuracy": acc,
               "epoch_time": ep_t, "elapsed": time.perf_counter() - t_run,
               "exposed_allreduce_time": sync.exposed_time}
        say(f"epoch {epoch + 1} done in {ep_t:.1f} s: test accuracy "
            f"{'n/a' if acc is None else f'{100 * acc:.2f}%'}")
        log(rec)
        save(epoch + 1)
        if done:
            break
    say(f"finished in {time.perf_counter() - t_run:.1f} s; gradient allreduce: "
        f"{sync.bytes / 2**20:.1f} MiB in buckets, {sync.exposed_time:.2f} s exposed "
        f"(blocked in opt.step); checkpoint {ckpt_path}, metrics {metrics_path}")
    report_profile()
    return 0


if __name__ == "__main__":
    from distconv.comm import run_guarded
    sys.exit(run_guarded(main))
