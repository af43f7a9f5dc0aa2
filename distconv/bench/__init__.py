"""Helpers shared by the benchmark and driver scripts in ``scripts/`` (one copy each).

The scripts are argparse front ends; what more than one of them needs lives here:

* :mod:`distconv.bench.stats`: communication-counter deltas and the "clean repetition"
  rule of the timing scripts;
* :mod:`distconv.bench.paired`: 1 rank vs P ranks paired round by round in one job
  (``bench_paired.py``, ``bench_spatial.py``);
* :mod:`distconv.bench.runs`: the input layout of a model, a 1-rank strategy inside a
  P-rank job, and the planner's plan and predicted step for a model (calibrated here).
* :mod:`distconv.bench.quiet`: waiting until the machine is quiet before timing;
* :mod:`distconv.bench.models`: the planner scripts' models by name, built as train.py
  builds them;
* :mod:`distconv.bench.cli`: argument defaults that differ with ``--quick`` and lower
  bounds, checked alike in every script.

What one script measures or reports lives in its own modules here, so the script is its
argparse front end: ``planner_bench``, ``planner_run`` and ``planner_report``
(bench_planner.py), ``plan_report`` (plan.py), ``study`` and ``study_report``
(planner_study.py), ``comm_bench`` (bench_comm.py), ``layer_bench`` and ``layer_report``
(bench_layers.py), ``scaling`` and ``scaling_report`` (scaling.py).

The PyTorch twin of the ResNets (a benchmark peer and test oracle) is
``scripts/torch_resnet.py``: distconv itself never imports torch.

The list of BLAS/OpenMP thread variables and the machine facts scripts record are in
:mod:`distconv.envinfo`. Nothing here is imported by the rest of distconv.
"""
