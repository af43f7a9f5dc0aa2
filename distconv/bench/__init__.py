"""Helpers shared by the benchmark and driver scripts in ``scripts/`` (one copy each).

The scripts are argparse front ends; what more than one of them needs lives here:

* :mod:`distconv.bench.stats`: communication-counter deltas and the "clean repetition"
  rule of the timing scripts;
* :mod:`distconv.bench.paired`: 1 rank vs P ranks paired round by round in one job
  (``bench_paired.py``, ``bench_spatial.py``);
* :mod:`distconv.bench.runs`: the input layout of a model, a 1-rank strategy inside a
  P-rank job, and the planner's plan and predicted step for a model (calibrated here).

The PyTorch twin of the ResNets (a benchmark peer and test oracle) is
``scripts/torch_resnet.py``: distconv itself never imports torch.

The list of BLAS/OpenMP thread variables and the machine facts scripts record are in
:mod:`distconv.envinfo`. Nothing here is imported by the rest of distconv.
"""
