#!/usr/bin/env python
"""Validate the planner: predicted vs measured training-step time and bytes, per plan.

Run::

    mpiexec -n 2 python -m mpi4py scripts/bench_planner.py --out planner_validation.json
    mpiexec -n 2 python -m mpi4py scripts/bench_planner.py --quick --out /tmp/q.json   # CI
    mpiexec -n 4 python -m mpi4py scripts/bench_planner.py --bytes-only --out b4.json

One MPI job does everything:

1. Each rank is limited to ONE BLAS/OpenMP thread (:func:`distconv.envinfo.pin_threads`:
   the environment variables and threadpoolctl): a rank stands for one device.
2. The machine's alpha-beta constants are measured on this job
   (:func:`distconv.planner.machine.calibrate`, message sizes from 4 KiB up to the
   model's largest message), or read with ``--machine FILE``.
3. The local kernel times come from a :class:`distconv.planner.compute.ComputeModel`
   measured with threads=1 on every rank at the same time (so the two cores are as busy
   as in training), each shape in ``--compute-rounds`` sweeps over all shapes (the median
   of the rounds: ``ComputeModel.refine``), cached in ``--cache`` (default: ``distconv.planner.auto.
   default_cache_path()``). After measuring, each entry keeps the largest of the ranks'
   medians (a step waits for the slowest rank at every collective) and every rank
   rebuilds the same cost model from them, so every rank plans alike.
4. The model (``--model``) is a wide ResNet with a CIFAR stem: ``ResNet(BasicBlock,
   --blocks, stem="cifar", base_width=--width)`` (default two stages of one basic block,
   256 and 512 channels, 8x8 inputs, global batch 4, 10 classes: 4.7 M parameters, 19 MB
   of weight gradients against 0.26 MB activations): wide enough that channel and filter
   splits beat data parallelism, whose gradient allreduce and replicated update dominate.
   ``--model inception``: a small Inception-style net whose blocks concatenate branches
   (:class:`IncNet`: a 3x3 stem with batch norm, then ``sum(--blocks)`` blocks of three
   towers -- 1x1 | 1x1-relu-3x3 | 3x3 avg pool-1x1, W/4 + W/2 + W/4 channels -- joined by
   ``dc.cat`` and followed by batch norm and ReLU, then global pooling and the fc; width
   W = --width, default 512: 1.7 M parameters at two blocks).
5. Plans: the hand plans (uniform sample, channel and filter splits; on 4 ranks the
   2x2 mixes too; and mixed per-layer plans, see ``hand_plans``) and the planner's own
   plan (``auto``: :func:`distconv.planner.auto.plan_model` with the same machine and
   compute model, ``overlap=False``, no memory limit); when ``plan_model`` kept a
   uniform plan within ``MIN_GAIN`` of its fastest predicted plan, that plan is timed
   too (``auto-fastest``; compared with the hand plans like ``auto``, never counted as
   one).
   ``predicted`` = :func:`distconv.planner.simulate.simulate` ``(cost, plan,
   overlap=False)``: the gradient allreduce is blocking and not overlapped, exactly as the
   measured step runs it.
6. Measured step (one model instance per plan, ``set_strategy`` of the plan): barrier,
   then ``loss = CrossEntropyLoss(model(x), labels)``, ``model.backward(dloss)``,
   ``sync_gradients`` (the segmented allreduce, blocking), ``SGD.step()`` (momentum 0.9,
   weight decay 1e-4: the update the cost model times). Plans are interleaved repetition
   by repetition after ``--warmup`` untimed steps each (the order rotated by one plan
   per repetition), so drifting background load hits all of them alike. In a repetition
   each plan runs ``--steps-per-plan`` consecutive steps (default 2) and the last is
   timed: as in training, the timed step follows a step of the same model, whose
   weights, gradients and momentum are then where a training loop leaves them, not
   evicted by the other plans' models (with 1, every timed step follows another plan's
   model and runs about 10-25 % slower on the wide ResNet). A repetition's
   time is the max over ranks; a repetition is *clean* when no rank lost more than
   ``--clean-frac`` of it to other processes (wall - CPU time: MPICH busy-polls, so a
   rank's core is busy for the whole step). ``measured`` is the median over clean
   repetitions when there are at least 3, else over all; both are written.
7. Bytes: one more step per plan with ``comm.stats()`` snapshots around the model's
   forward, backward and gradient sync (the loss's own scalar allreduces are reported
   apart); on every rank the bytes sent and received per collective kind must equal
   :func:`distconv.planner.events.graph_events` of the plan.

Summary: per plan predicted ms, measured ms, error % and the ranks by predicted and by
measured time; the mean absolute relative error (MAE); pairwise ranking agreement over
the pairs whose measured times differ by more than ``--rank-margin`` (20%); the auto
plan's time over the best hand plan's, paired: for each hand plan the median over
repetitions of (auto step / hand step in the same repetition), and the largest of these
(the ratio of the two medians is reported too; it flips with the VM's speed modes, see
``distconv/bench/planner_report.py``). Targets: MAE <= 20%, every such pair ordered
alike, auto <= 1.05x best hand (paired), bytes equal.

``--bytes-only`` (automatic when there are more ranks than CPU cores, e.g. 4 ranks on
2 cores): no timing and no kernel measuring (the cost model takes cached kernel times
where it has them, else the fitted ones; a shipped machine file instead of calibrating),
only the bytes check of every plan. ``--profile``: after timing, run ``--profile-steps``
more steps per plan under :class:`distconv.profile.Profiler` and write predicted vs
measured time per layer (max over ranks) to the JSON, for diagnosing mispredictions.

Only rank 0 prints and writes the JSON (``--out``).
"""
from __future__ import annotations

import sys
import time

import numpy as np

from distconv.bench.cli import bench_parser, fill_defaults, positive_ints, require_positive
from distconv.envinfo import pin_threads

DEFAULTS = dict(width=256, blocks="1,1", size=8, batch=4, classes=10, repeats=25, warmup=2,
                steps_per_plan=2, calib_reps=21, compute_reps=9, compute_rounds=3)
QUICK = dict(width=8, blocks="1,1", size=8, batch=2, classes=4, repeats=2, warmup=1,
             steps_per_plan=1, calib_reps=2, compute_reps=1, compute_rounds=2)


def build_parser():
    ap = bench_parser("bench_planner.py", __doc__)
    ap.add_argument("--out", metavar="FILE", help="rank 0 writes every figure as JSON here")
    ap.add_argument("--quick", action="store_true",
                    help="CI-sized run: width 8, 8x8, batch 2, 2 repeats (seconds)")
    ap.add_argument("--model", choices=("resnet", "inception"), default="resnet",
                    help="the wide ResNet (default) or the Inception-style IncNet, whose "
                         "blocks join branches with dc.cat")
    ap.add_argument("--width", type=int, help="channels of the first stage (default 256; "
                                              "inception: 512, a multiple of 4)")
    ap.add_argument("--blocks", help="basic blocks per stage, comma-separated (default 1,1: "
                                     "two stages, width and 2*width channels)")
    ap.add_argument("--size", type=int, help="input height = width (default 8)")
    ap.add_argument("--batch", type=int, help="global batch N (default 4)")
    ap.add_argument("--classes", type=int, help="classes of the fc layer (default 10)")
    ap.add_argument("--repeats", type=int,
                    help="clean timed repetitions wanted per plan (default 25)")
    ap.add_argument("--max-repeats", type=int,
                    help="add repetitions until --repeats are clean, up to this many "
                         "(default 4 x --repeats); after a repetition that is not clean "
                         "the script waits for quiet (--wait-quiet) before the next")
    ap.add_argument("--warmup", type=int, help="untimed steps per plan first (default 2)")
    ap.add_argument("--steps-per-plan", type=int,
                    help="consecutive steps of each plan in a repetition, the last one timed "
                         "(default 2: the timed step follows a step of the same model, as in "
                         "training, not another plan's model; --quick 1)")
    ap.add_argument("--clean-frac", type=float, default=0.05,
                    help="a repetition is clean if every rank lost less than this fraction "
                         "of it to other processes (default 0.05)")
    ap.add_argument("--machine", metavar="FILE_OR_NAME",
                    help="machine file (or built-in name, e.g. dev_2core) instead of "
                         "calibrating on this job")
    ap.add_argument("--calib-reps", type=int, help="calibrate(): timed calls per size "
                                                   "(default 21)")
    ap.add_argument("--cache", metavar="FILE",
                    help="compute-model cache (default: distconv.planner.auto."
                         "default_cache_path())")
    ap.add_argument("--no-cache", action="store_true",
                    help="measure every kernel afresh; do not read or write a cache")
    ap.add_argument("--compute-reps", type=int,
                    help="timed calls per kernel shape in the compute model (default 9)")
    ap.add_argument("--compute-rounds", type=int,
                    help="sweeps over all kernel shapes, each shape's time the median of "
                         "its rounds (ComputeModel.refine; default 3)")
    ap.add_argument("--bytes-only", action="store_true",
                    help="only the bytes check (default when ranks > CPU cores)")
    ap.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                    help="before calibrating, measuring kernels and timing, wait up to S "
                         "seconds until the CPUs are >= 85%% idle while this job sleeps "
                         "(other users' processes; default 600, --quick 0)")
    ap.add_argument("--profile", action="store_true",
                    help="per-layer predicted vs measured (Profiler) into the JSON")
    ap.add_argument("--profile-steps", type=int, default=5,
                    help="profiled steps per plan with --profile (default 5)")
    ap.add_argument("--rank-margin", type=float, default=0.20,
                    help="pairs of plans whose measured times differ by more than this "
                         "fraction must be ordered alike by the prediction (default 0.20)")
    ap.add_argument("--md", metavar="FILE", help="rank 0 also writes a Markdown report")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def parse_args(argv=None):
    """The arguments with their defaults (``--quick``'s where asked) filled in and checked."""
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.model == "inception" and a.width is None and not a.quick:
        a.width = 512
    fill_defaults(a, DEFAULTS, QUICK)
    if a.wait_quiet is None:
        a.wait_quiet = 0.0 if a.quick else 600.0
    if a.max_repeats is None:
        a.max_repeats = a.repeats if a.quick else 4 * a.repeats
    a.blocks = positive_ints(ap, a.blocks, "--blocks")
    require_positive(ap, a, ("width", "size", "batch", "classes", "repeats", "steps_per_plan",
                             "calib_reps", "compute_reps", "compute_rounds"))
    if a.model == "inception" and a.width % 4:
        ap.error(f"--model inception needs --width divisible by 4, got {a.width}")
    if a.warmup < 0 or a.max_repeats < a.repeats:
        ap.error("need --warmup >= 0 and --max-repeats >= --repeats")
    if not 0 < a.clean_frac < 1 or not 0 < a.rank_margin < 10:
        ap.error("--clean-frac must be in (0, 1) and --rank-margin in (0, 10)")
    return a


def main(argv=None):
    pin_threads(1)  # one BLAS/OpenMP thread per rank
    args = parse_args(argv)
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1)
    import distconv as dc
    from distconv.bench.planner_run import PlannerBench
    from distconv.comm import world

    dc.set_default_dtype(np.float32)
    comm = world()
    t0 = time.perf_counter()
    if comm.size < 2:
        raise SystemExit("bench_planner.py needs at least 2 ranks (mpiexec -n 2 ...)")
    PlannerBench(args, comm, t0).run()
    return 0


if __name__ == "__main__":
    from distconv.comm import run_guarded
    sys.exit(run_guarded(main))
