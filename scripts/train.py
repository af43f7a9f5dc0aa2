#!/usr/bin/env python
"""Train a CNN across MPI ranks: ``mpiexec -n N python scripts/train.py [flags]``.

Placeholder: the command line below is the stable one (DESIGN.md,
"Commands"), but training end to end is not implemented yet (issue
"Training end to end"). Running it prints that and exits with status 2.
"""
import argparse
import os
import sys

NOT_IMPLEMENTED = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a CNN across MPI ranks with per-layer sample/channel/filter "
                    "parallelism. Launch with: mpiexec -n N python scripts/train.py [flags]. "
                    "With no flags it will train a small ResNet on the bundled digits data. "
                    "NOT IMPLEMENTED YET (issue 'Training end to end'): this placeholder "
                    "exits with status 2.")
    p.add_argument("--model", default=None,
                   help="model name (a ResNet-family or small net); default: a small ResNet")
    p.add_argument("--strategy", default=None,
                   help="'sample=2,channel=2' style strategy for every layer, a per-layer "
                        "plan file (JSON), or 'auto' for the planner's choice")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--data", default=None, metavar="FILE.h5",
                   help="HDF5 dataset; default: the bundled digits data")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder for metrics.jsonl and checkpoint.h5")
    p.add_argument("--resume", action="store_true",
                   help="resume from DIR/checkpoint.h5")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    return p


def _launcher_rank() -> int:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    if _launcher_rank() != 0:
        return NOT_IMPLEMENTED
    print("scripts/train.py: training end to end is not implemented yet "
          "(issue \"Training end to end\"); nothing was trained.", file=sys.stderr)
    return NOT_IMPLEMENTED


if __name__ == "__main__":
    sys.exit(main())
