"""Array backend (NumPy or CuPy), default dtype, device binding and threads per rank.

``xp`` is the array module every other part of distconv computes with. It is
chosen once, at import, from ``DISTCONV_BACKEND`` (``numpy`` or ``cupy``);
without it, CuPy is used when it imports and sees a GPU, NumPy otherwise.
Nothing here imports mpi4py: the local rank comes from the launcher's
environment variables.
"""
from __future__ import annotations

import os

import numpy as np

_DEFAULT_DTYPE = np.dtype(np.float32)
_BACKEND = None  # "numpy" | "cupy", decided lazily
_XP = None

_LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID",
                    "PMI_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "PALS_LOCAL_RANKID")
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE",
                    "PMI_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE", "PALS_LOCAL_SIZE")
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "BLIS_NUM_THREADS")


def set_default_dtype(dtype) -> None:
    """Set the floating dtype new parameters and converted inputs get (float32 or float64)."""
    global _DEFAULT_DTYPE
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"default dtype must be float32 or float64, got {dt}")
    _DEFAULT_DTYPE = dt


def get_default_dtype() -> np.dtype:
    """The dtype set by :func:`set_default_dtype` (float32 unless set)."""
    return _DEFAULT_DTYPE


def _env_int(names):
    for n in names:
        v = os.environ.get(n)
        if v is not None:
            try:
                return int(v.split(",")[0])
            except ValueError:
                continue
    return None


def local_rank() -> int:
    """This process's rank on its node, read from the launcher's environment (0 if unknown)."""
    r = _env_int(_LOCAL_RANK_VARS)
    return 0 if r is None else r


def local_size() -> int:
    """Number of ranks on this node, from the launcher's environment (1 if unknown)."""
    r = _env_int(_LOCAL_SIZE_VARS)
    return 1 if r is None or r < 1 else r


def _cupy_usable():
    try:
        import cupy  # noqa: F401
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def backend_name() -> str:
    """``"numpy"`` or ``"cupy"``: the backend in use (decided on first call)."""
    global _BACKEND
    if _BACKEND is None:
        choice = os.environ.get("DISTCONV_BACKEND", "").strip().lower()
        if choice in ("", "auto"):
            choice = "cupy" if _cupy_usable() else "numpy"
        if choice not in ("numpy", "cupy"):
            raise ValueError(f"DISTCONV_BACKEND must be 'numpy' or 'cupy', got {choice!r}")
        if choice == "cupy" and not _cupy_usable():
            raise RuntimeError("DISTCONV_BACKEND=cupy but CuPy cannot be imported or sees no GPU")
        _BACKEND = choice
        if choice == "cupy":
            bind_device()
    return _BACKEND


def set_backend(name: str) -> None:
    """Force the backend (``"numpy"`` or ``"cupy"``); call before creating layers."""
    global _BACKEND, _XP
    name = name.lower()
    if name not in ("numpy", "cupy"):
        raise ValueError(f"backend must be 'numpy' or 'cupy', got {name!r}")
    if name == "cupy" and not _cupy_usable():
        raise RuntimeError("backend 'cupy' requested but CuPy cannot be imported or sees no GPU")
    _BACKEND = name
    _XP = None
    if name == "cupy":
        bind_device()


def get_xp():
    """The array module of the backend in use (``numpy`` or ``cupy``)."""
    global _XP
    if _XP is None:
        if backend_name() == "cupy":
            import cupy
            _XP = cupy
        else:
            _XP = np
    return _XP


def array_module(a):
    """``numpy`` or ``cupy``, whichever owns array ``a`` (for a shape-only
    :class:`~distconv.meta.MetaArray`, the namespace of :mod:`distconv.meta`)."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np
    mod = type(a).__module__
    if mod == "distconv.meta":
        from .meta import xp
        return xp
    if mod.startswith("cupy"):
        import cupy
        return cupy
    return np


def is_gpu_array(a) -> bool:
    """True for a CuPy array (anything exposing ``__cuda_array_interface__``)."""
    return hasattr(a, "__cuda_array_interface__")


def to_numpy(a) -> np.ndarray:
    """A NumPy copy (or view) of ``a``, moving it from the GPU if needed."""
    if is_gpu_array(a):
        return a.get()
    return np.asarray(a)


def bind_device() -> int:
    """Bind this rank to GPU ``local_rank % n_gpus``; returns the device id."""
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    dev = local_rank() % n
    cupy.cuda.Device(dev).use()
    return dev


def threads_per_rank() -> int:
    """BLAS threads this rank should use: cores on the node / ranks on the node (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, cores // local_size())


def configure_threads(n: int | None = None) -> int:
    """Limit BLAS/OpenMP threads of this rank to ``n`` (default: :func:`threads_per_rank`).

    A thread count the user set in ``OMP_NUM_THREADS`` (or the BLAS-specific
    variables) wins when ``n`` is not given. Returns the count applied.
    """
    if n is None:
        user = _env_int(_THREAD_VARS)
        n = user if user is not None else threads_per_rank()
    n = max(1, int(n))
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=n)
    except ImportError:  # threadpoolctl missing: the env var still helps child processes
        pass
    for v in _THREAD_VARS:
        os.environ.setdefault(v, str(n))
    return n


def tune_malloc() -> bool:
    """Keep large freed buffers in the process heap instead of returning them to the OS.

    Training allocates and frees the same large activation and message buffers every
    step; with glibc's defaults each one is a fresh mmap whose pages fault in again (on a
    64 MiB buffer that costs more than the MPI transfer itself). This raises glibc's mmap
    and trim thresholds to 1 GiB (as PyTorch's caching CPU allocator avoids the same cost).
    Skipped when ``DISTCONV_MALLOC_TUNING=0`` or when libc is not glibc. Returns whether
    it was applied.
    """
    if os.environ.get("DISTCONV_MALLOC_TUNING", "1") == "0":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
        ok = (libc.mallopt(m_trim_threshold, 1 << 31) == 1) and ok
        return ok
    except (OSError, AttributeError):
        return False


_MALLOC_TUNED = tune_malloc()


def pinned_empty(shape, dtype):
    """A host array in pinned (page-locked) memory for staging GPU transfers; plain NumPy
    when none is available."""
    try:
        import cupyx
        return cupyx.empty_pinned(shape, dtype)
    except Exception:  # pragma: no cover - no pinned memory available
        return np.empty(shape, dtype)


def pinned_copy(a):
    """A pinned host copy of GPU array ``a``."""
    h = pinned_empty(a.shape, a.dtype)
    a.get(out=h)
    return h
