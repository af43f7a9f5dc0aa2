"""Machine and software facts that benchmark scripts record next to their figures, and the
one list of the BLAS/OpenMP thread variables they pin.

Used by ``scripts/bench_*.py`` and ``scripts/scaling.py`` so that every results JSON names
the BLAS, the CPU and the code it was measured with. Nothing here imports MPI.
"""
from __future__ import annotations

import os
import platform
import subprocess

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Environment variables that set the thread count of the BLAS and OpenMP libraries.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def pin_threads(n: int = 1) -> None:
    """``n`` BLAS/OpenMP threads for this process and the processes it starts.

    Sets every variable of :data:`THREAD_ENV_VARS` to ``n`` (libraries loaded from now on,
    child processes) and limits the thread pools of the libraries already loaded (NumPy's
    BLAS is: importing distconv imports NumPy) with threadpoolctl, when it is installed.
    """
    for v in THREAD_ENV_VARS:
        os.environ[v] = str(int(n))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the variables still reach child processes
        return
    threadpool_limits(limits=int(n))
_BLAS_KEYS = ("user_api", "internal_api", "prefix", "version", "architecture", "num_threads",
              "threading_layer")


def blas_info() -> list:
    """One dict per BLAS/OpenMP library threadpoolctl sees (its API, version, CPU kernel
    architecture and current thread count); ``[{"error": ...}]`` without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"error": "threadpoolctl not installed"}]
    return [{k: d.get(k) for k in _BLAS_KEYS} for d in threadpool_info()]


def git_state(root: str = _ROOT) -> dict:
    """``{"commit": HEAD or None, "distconv_modified": uncommitted changes under
    distconv/}`` of the checkout at ``root`` (``{"commit": None, "error"}`` without git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no",
                                "distconv"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return {"commit": head or None, "distconv_modified": bool(dirty)}
    except Exception as e:  # no git, not a checkout
        return {"commit": None, "error": str(e)}


def cpu_model():
    """The CPU's model name from ``/proc/cpuinfo`` (else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def run_facts() -> dict:
    """What a results file ends with: ``cpu`` (:func:`cpu_model`), ``blas``
    (:func:`blas_info`), ``git`` (:func:`git_state`), ``date`` (UTC, ISO 8601) and
    ``command`` (this process's command line)."""
    import datetime
    import sys
    return {"cpu": cpu_model(), "blas": blas_info(), "git": git_state(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": " ".join(sys.argv)}


def write_results(path, doc: dict) -> None:
    """``doc`` followed by :func:`run_facts`, as JSON (indent 1) to ``path`` atomically;
    prints ``wrote <path>``."""
    from .atomic import write_json
    write_json(path, {**doc, **run_facts()})
    print(f"wrote {path}")
