"""Loading and launching the CUDA kernels of ``kernels/*.cu`` (CuPy ``RawModule``).

The CUDA sources live in the top-level ``kernels/`` folder of the repository,
installed inside the package as ``distconv.kernels``. Each ``.cu`` file is
compiled on first use with ``cupy.RawModule(code=..., options=COMPILE_OPTIONS)``
and kept per (file, device); CuPy also caches the binaries on disk, keyed by
the source text (``#include "common.cuh"`` is pasted in before compiling, so
the key covers the header too).

This module knows every kernel's name and argument types (:data:`KERNELS`) and
nothing of what the kernels compute: the launchers are
:mod:`distconv.packing` (channel-block packing for :mod:`distconv.comm`) and
:mod:`distconv.ops.cuda` (the local ops). Both call :func:`launch`, :func:`cupy`
and :func:`is_gpu_array` through this module, so the host emulation of the
tests replaces those three here, in one place. It imports without CuPy: CuPy
is imported inside the functions that need it.

Numerics: kernels are compiled with ``--fmad=false`` so element-wise results
round exactly like NumPy's separate operations (CuPy adds ``-ftz=true``:
float32 denormals flush to zero on the GPU).
"""
from __future__ import annotations

import os
import re

import numpy as np

from .backend import is_gpu_array  # noqa: F401  (the seam the tests' host emulation patches)

__all__ = ["COMPILE_OPTIONS", "KERNELS", "THREADS", "RED_THREADS", "kernels_dir",
           "kernel_source", "get_module", "get_function", "compile_all", "launch",
           "float_suffix", "cupy", "is_gpu_array"]

# NVRTC options of every module. --fmad=false: no a*b+c contraction, so element-wise
# kernels round exactly like their NumPy twins.
COMPILE_OPTIONS = ("--fmad=false",)

THREADS = 256         # threads per block of the element-wise kernels
RED_THREADS = 256     # == DC_RED_THREADS in kernels/common.cuh (reduction kernels)
MAX_BLOCKS = 1 << 16  # grid cap; every kernel loops grid-stride

_FLOAT_SUFFIX = {np.dtype(np.float32): ("f32", "f"), np.dtype(np.float64): ("f64", "d")}


# --------------------------------------------------------------- kernel table
def _kernel_table():
    """{file: {kernel name: argument kinds}}; kinds: P pointer, i int64, f float32, d float64."""
    i12, i16 = "i" * 12, "i" * 16
    t = {"im2col.cu": {}, "pack.cu": {}, "batchnorm.cu": {}, "pool.cu": {}, "activation.cu": {}}
    for s, sc in (("f32", "f"), ("f64", "d")):
        t["im2col.cu"][f"im2col_{s}"] = "PP" + i16
        t["im2col.cu"][f"col2im_{s}"] = "PP" + i16
        t["batchnorm.cu"][f"bn_stats_partial_{s}"] = "PPPiiii"
        t["batchnorm.cu"][f"bn_backward_reduce_partial_{s}"] = "PPPPPiiii"
        t["batchnorm.cu"][f"bn_forward_apply_{s}"] = "PPPPPiii"
        t["batchnorm.cu"][f"bn_backward_apply_{s}"] = "PPPPPPPiii"
        for a in ("u8", "i32"):
            t["pool.cu"][f"max_pool2d_forward_{s}_{a}"] = "PPP" + i12
            t["pool.cu"][f"max_pool2d_backward_{s}_{a}"] = "PPP" + i12
        t["pool.cu"][f"avg_pool2d_forward_{s}"] = "PP" + i12 + "i"
        t["pool.cu"][f"avg_pool2d_backward_{s}"] = "PP" + i12 + "i"
        t["activation.cu"][f"relu_forward_{s}"] = "PPi"
        t["activation.cu"][f"relu_backward_{s}"] = "PPPi"
    for b in ("b1", "b2", "b4", "b8"):
        t["pack.cu"][f"pack_channel_blocks_{b}"] = "PPPiiii"
        t["pack.cu"][f"unpack_channel_blocks_{b}"] = "PPPiiii"
    return t


#: Every kernel distconv launches: ``{source file: {kernel name: argument kinds}}``.
#: tests/test_kernels.py checks it against the entry points nvcc finds in the sources.
KERNELS = _kernel_table()
#: ``{kernel name: argument kinds}`` and ``{kernel name: source file}``.
SIGNATURE = {k: s for d in KERNELS.values() for k, s in d.items()}
FILE_OF = {k: f for f, d in KERNELS.items() for k in d}


# ------------------------------------------------------------ sources, modules
_KDIR = None
_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[^\n]*$', re.M)


def kernels_dir() -> str:
    """The folder holding the CUDA sources.

    ``$DISTCONV_KERNELS_DIR`` if set; else ``distconv/kernels`` of an installed
    package; else the ``distconv.kernels`` package (editable installs map it to
    the repository's ``kernels/``); else ``kernels/`` next to the ``distconv``
    folder of a source checkout.
    """
    global _KDIR
    if _KDIR is not None:
        return _KDIR
    pkg = os.path.dirname(os.path.abspath(__file__))  # .../distconv
    cands = []
    if os.environ.get("DISTCONV_KERNELS_DIR"):
        cands.append(os.environ["DISTCONV_KERNELS_DIR"])
    cands.append(os.path.join(pkg, "kernels"))
    try:
        from importlib import resources
        cands.append(str(resources.files("distconv.kernels")))
    except Exception:  # not installed as a package (plain source checkout)
        pass
    cands.append(os.path.join(os.path.dirname(pkg), "kernels"))
    for d in cands:
        if os.path.isfile(os.path.join(d, "common.cuh")):
            _KDIR = d
            return d
    raise FileNotFoundError("distconv CUDA kernels not found; looked in " + ", ".join(cands))


def kernel_source(filename: str) -> str:
    """Text of ``kernels/<filename>`` with its ``#include "..."`` files pasted in (once each)."""
    d = kernels_dir()
    seen = {filename}

    def load(name):
        with open(os.path.join(d, name), encoding="utf-8") as f:
            text = f.read()

        def paste(m):
            inc = m.group(1)
            if inc in seen:
                return ""
            seen.add(inc)
            return f"// ---- begin {inc}\n{load(inc)}\n// ---- end {inc}"

        return _INCLUDE_RE.sub(paste, text)

    return load(filename)


def cupy():
    """The ``cupy`` module (imported on first use; the tests' host emulation puts NumPy here)."""
    import cupy
    return cupy


_MODULES: dict = {}
_FUNCS: dict = {}


def get_module(filename: str):
    """The compiled ``cupy.RawModule`` of ``kernels/<filename>`` on the current device (cached)."""
    cp = cupy()
    key = (filename, cp.cuda.Device().id)
    mod = _MODULES.get(key)
    if mod is None:
        mod = cp.RawModule(code=kernel_source(filename), options=COMPILE_OPTIONS)
        _MODULES[key] = mod
    return mod


def get_function(name: str):
    """Kernel ``name`` (a key of :data:`SIGNATURE`) of the current device, compiled (cached)."""
    cp = cupy()
    key = (name, cp.cuda.Device().id)
    fn = _FUNCS.get(key)
    if fn is None:
        fn = get_module(FILE_OF[name]).get_function(name)
        _FUNCS[key] = fn
    return fn


def compile_all() -> None:
    """Compile and load every kernel now (e.g. to keep compilation out of timings)."""
    for name in SIGNATURE:
        get_function(name)


def launch(name, total, args, threads=THREADS, blocks=None):
    """Launch kernel ``name`` with ``args`` converted to its C types (see :data:`KERNELS`).

    ``total``: elements the grid-stride loop covers (sets the grid unless ``blocks``).
    """
    sig = SIGNATURE[name]
    if len(args) != len(sig):
        raise TypeError(f"{name} takes {len(sig)} arguments, got {len(args)}")
    conv = []
    for i, (kind, a) in enumerate(zip(sig, args)):
        if kind == "P":
            if not is_gpu_array(a) or not a.flags.c_contiguous:
                raise TypeError(f"{name}: argument {i} must be a C-contiguous CuPy array")
            conv.append(a)
        elif kind == "i":
            conv.append(np.int64(a))
        elif kind == "f":
            conv.append(np.float32(a))
        else:
            conv.append(np.float64(a))
    if blocks is None:
        blocks = -(-int(total) // threads)
    blocks = max(1, min(MAX_BLOCKS, int(blocks)))
    get_function(name)((blocks,), (threads,), tuple(conv))


def float_suffix(dtype, what="data"):
    """``("f32", "f")`` or ``("f64", "d")``: the kernel-name suffix and argument kind of a
    float dtype; ``TypeError`` for any other dtype."""
    try:
        return _FLOAT_SUFFIX[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"GPU kernels take float32 or float64 {what}, "
                        f"got {np.dtype(dtype)}") from None
