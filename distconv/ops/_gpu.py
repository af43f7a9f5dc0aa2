"""Dispatch of the ops to their CUDA kernels (distconv/ops/cuda.py) for CuPy arrays."""
import numpy as np

from ..backend import array_module


def gpu_impl(name: str, a):
    """The CUDA implementation of op ``name`` when ``a`` is a CuPy array, else ``None``."""
    if array_module(a) is np:
        return None
    from . import cuda
    return getattr(cuda, name)
