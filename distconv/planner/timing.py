"""Wall-clock timing of one rank's kernels, robust to a shared machine's load."""
from __future__ import annotations

import time

import numpy as np


def _median_time(fn, reps, before=None, after=None, single=False):
    """Median wall seconds of ``reps`` calls of ``fn`` (``before()`` untimed ahead of each,
    ``after()`` timed at the end, e.g. a device sync).

    ``single`` (one thread computes): a call counts only if the OS left the core to it,
    i.e. its wall time exceeds its process CPU time by at most 5% (or 20 us); up to
    ``3 * reps`` more calls are made until ``reps`` such clean ones are in. On a machine
    shared with other processes this keeps a burst of their load out of the cached time;
    if too few calls are clean the median of all is used.
    """
    clean, every = [], []
    limit = reps * 4 if single else reps
    while len(every) < limit and len(clean) < reps:
        if before is not None:
            before()
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        if after is not None:
            after()
        t = time.perf_counter() - t0
        c = time.process_time() - c0
        every.append(t)
        if not single or t - c <= max(0.05 * t, 20e-6):
            clean.append(t)
    return float(np.median(clean if len(clean) >= (reps + 1) // 2 else every))


def _blas_threads():
    """The BLAS thread count in effect now (threadpoolctl), 1 if unknown."""
    try:
        from threadpoolctl import threadpool_info
        n = [d.get("num_threads", 1) for d in threadpool_info() if d.get("user_api") == "blas"]
        return max(n) if n else 1
    except Exception:  # threadpoolctl missing or broken
        return 1
