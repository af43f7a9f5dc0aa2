"""Dispatch of the ops to their CUDA kernels (distconv/ops/cuda/) for CuPy arrays, and to
their shape rules (distconv/ops/shapes.py) for shape-only arrays."""
import numpy as np

from ..backend import array_module


def gpu_impl(name: str, a):
    """The CUDA implementation of op ``name`` when ``a`` is a CuPy array, its shape rule
    when ``a`` is a :class:`~distconv.meta.MetaArray`, else ``None`` (the NumPy code)."""
    if array_module(a) is np:
        return None
    if type(a).__module__ == "distconv.meta":
        from . import shapes
        return getattr(shapes, name)
    from . import cuda
    return getattr(cuda, name)
