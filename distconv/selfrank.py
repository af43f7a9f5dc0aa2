"""A grid and a strategy of this process alone (``MPI.COMM_SELF``, private statistics).

A layer built with :func:`self_strategy` runs the same Python as under any strategy but
issues no collective with other ranks, so one rank of a running job can run or time it on
its own (the compute model's layer overheads, the 1-rank baselines of the benchmarks).
"""
from __future__ import annotations

_GRID: list = []


def self_grid(fresh: bool = False):
    """The ``(1, 1, 1)`` :class:`~distconv.grid.ProcessGrid` of this process alone (the same
    one on every call); ``fresh``: a new one, not the same grid to ``same_grid``."""
    from .comm import self_comm
    from .grid import ProcessGrid
    from .strategy import AXES
    if fresh:
        return ProcessGrid(self_comm(), (1, 1, 1), AXES)
    if not _GRID:
        _GRID.append(ProcessGrid(self_comm(), (1, 1, 1), AXES))
    return _GRID[0]


def self_strategy():
    """A :class:`~distconv.strategy.Strategy` of one sample group whose grid is
    :func:`self_grid`."""
    from .strategy import Strategy

    class _SelfStrategy(Strategy):
        def grid(self, comm=None):
            return self_grid()
    return _SelfStrategy(sample=1, channel=1, filter=1)
