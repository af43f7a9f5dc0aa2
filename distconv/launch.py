"""The world communicator and the job's entry points: :func:`world`, :func:`use_world`
(another world for shape-only runs), :func:`wrap`, :func:`self_comm`, :func:`abort` and
:func:`run_guarded` (an uncaught exception on any rank ends the whole job).
"""
from __future__ import annotations

import os
import time

from .comm import MPI, CommStats, Communicator

_WORLD = None
_WORLD_OVERRIDE: list = []


def world() -> Communicator:
    """The (cached) :class:`Communicator` over ``MPI.COMM_WORLD`` (inside
    :func:`use_world`, the communicator given there)."""
    global _WORLD
    if _WORLD_OVERRIDE:
        return _WORLD_OVERRIDE[-1]
    if _WORLD is None:
        try:
            _WORLD = Communicator(MPI.COMM_WORLD)
        except ImportError:
            _WORLD = Communicator(_solo_without_mpi())
    return _WORLD


_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                  "PMIX_RANK", "SLURM_NTASKS")


class _Solo:
    """The world of a single process when mpi4py is not installed (the planner and
    shape-only tracing need no MPI): the mpi4py calls a one-rank Communicator makes."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Barrier(self):
        return None

    def allgather(self, obj):
        return [obj]

    def Split(self, color, key=0):
        return self

    def Dup(self):
        return self

    def Abort(self, code=1):
        os._exit(code)


def _solo_without_mpi():
    launched = [v for v in _LAUNCHER_VARS if int(os.environ.get(v, "1") or 1) > 1
                or (v.endswith("RANK") and v in os.environ)]
    if launched:
        raise ImportError(f"mpi4py is not installed, but this process was started by an MPI "
                          f"launcher ({', '.join(launched)} set): install mpi4py "
                          f"(pip install mpi4py) to run on several ranks")
    return _Solo()


class use_world:
    """``with use_world(comm):`` makes ``comm`` the world: strategies, grids and layers built
    inside live on it (a :class:`distconv.shapecomm.ShapeComm` for shape-only runs)."""

    def __init__(self, comm: Communicator):
        self.comm = comm

    def __enter__(self):
        _WORLD_OVERRIDE.append(self.comm)
        return self.comm

    def __exit__(self, *exc):
        _WORLD_OVERRIDE.pop()
        return False


def self_comm() -> Communicator:
    """A new :class:`Communicator` over ``MPI.COMM_SELF`` (this process alone) with its own
    statistics: collectives on it move nothing and never wait for another rank."""
    return Communicator(MPI.COMM_SELF, CommStats())


def wrap(comm) -> Communicator:
    """A :class:`Communicator` for ``comm`` (an mpi4py communicator, a Communicator, or None)."""
    if comm is None:
        return world()
    if isinstance(comm, Communicator):
        return comm
    if _WORLD_OVERRIDE:
        raise ValueError("an mpi4py communicator was passed inside use_world(); pass None")
    if comm == MPI.COMM_WORLD:
        return world()
    return Communicator(comm)


def abort(code: int = 1) -> None:
    """``MPI_Abort`` on COMM_WORLD: ends every rank of the job."""
    MPI.COMM_WORLD.Abort(code)


def run_guarded(main, *args, grace: float = 3.0) -> int:
    """Run ``main(*args)`` so that an uncaught exception on any rank ends the whole job.

    The failing rank prints ``[rank r] uncaught exception`` and its traceback to stderr.
    When every rank fails alike (distconv raises bad-input errors on all ranks at once)
    they meet in a nonblocking barrier and exit with status 1, so mpiexec forwards every
    message; a rank that fails alone calls ``MPI_Abort`` after ``grace`` seconds, which
    ends the ranks still waiting in a collective. Returns ``main``'s status (0 if None).
    Use it in every entry point: ``sys.exit(run_guarded(main))``.
    """
    import sys
    import traceback
    exit_comm = MPI.COMM_WORLD.Dup()  # only for the exit handshake
    try:
        rc = main(*args)
        exit_comm.Free()
        return 0 if rc is None else int(rc)
    except SystemExit:
        raise
    except BaseException:
        r = MPI.COMM_WORLD.Get_rank()
        sys.stderr.write(f"[rank {r}] uncaught exception, aborting the job:\n"
                         f"{traceback.format_exc()}")
        sys.stderr.flush()
        req = exit_comm.Ibarrier()
        t_end = time.monotonic() + grace
        while not req.Test() and time.monotonic() < t_end:
            time.sleep(0.002)
        if not req.Test():
            MPI.COMM_WORLD.Abort(1)
        return 1
