"""Waiting for a quiet machine before timing (shared machines, other users' processes)."""
from __future__ import annotations

import time

import numpy as np

#: a poll of a nonblocking collective every this many seconds leaves the core idle
POLL_S = 0.02


def cpu_idle(seconds):
    """Idle fraction of all CPUs over ``seconds`` (/proc/stat; None where unavailable)."""
    def rd():
        with open("/proc/stat") as fh:
            v = [int(t) for t in fh.readline().split()[1:]]
        return v[3] + v[4], sum(v)
    try:
        a = rd()
        time.sleep(seconds)
        b = rd()
    except (OSError, ValueError, IndexError):
        return None
    return (b[0] - a[0]) / max(1, b[1] - a[1])


def wait_quiet(comm, max_s, need=0.85, probe_s=2.0):
    """Wait (at most ``max_s``) until the machine is idle while this job sleeps.

    Every rank sleeps (a nonblocking broadcast polled every :data:`POLL_S`, so no core is
    busy) while rank 0 samples the idle fraction of all CPUs over ``probe_s``; done once it
    is at least ``need``. Returns ``{"idle", "waited_s", "quiet"}`` (the same on every rank).
    """
    t0 = time.perf_counter()
    res = None
    while True:
        if comm.rank == 0:
            idle = cpu_idle(probe_s)
            waited = time.perf_counter() - t0
            done = idle is None or idle >= need or waited >= max_s
            res = {"idle": idle, "waited_s": waited, "quiet": idle is None or idle >= need}
        else:
            done = None
        flag = np.array([1 if done else 0], np.int64)
        r = comm.mpi.Ibcast(flag, root=0)
        while not r.Test():
            time.sleep(POLL_S)
        if flag[0]:
            break
    return comm.mpi.bcast(res, root=0)
