"""GPU local kernels (CUDA sources in ``kernels/``, compiled by CuPy) and their NumPy twins.

The kernels are found, compiled and launched by :mod:`distconv.cudakernels`
(whose names ``KERNELS``, ``kernels_dir``, ``compile_all``... are re-exported
here); the channel-block packing used by :mod:`distconv.comm` lives in
:mod:`distconv.packing` and is re-exported here too. One module per concern:

* ``conv.py``: im2col/col2im and the convolutions (im2col + cuBLAS, or cuDNN);
* ``batchnorm.py``, ``pool.py``, ``activation.py``: the other launchers;
* ``twins.py``: every NumPy twin ``<name>_numpy``;
* ``_common.py``: geometry, shape checks and helpers the launchers and twins share.

Every GPU function here has the signature and semantics of the CPU op of the
same name in :mod:`distconv.ops` (or of ``commargs._pack``/``commargs._assemble`` for
the channel-block packing), and a NumPy twin ``<name>_numpy`` that transliterates
the CUDA kernel's index math with vectorised NumPy: it is the reference the GPU
tests compare against and works on any machine. The GPU functions accept NumPy
arrays too, and then simply call their twin, so::

    from distconv.ops import cuda as K
    cols = K.im2col(x, (3, 3), (1, 1), (1, 1), (1, 1))   # CuPy in -> CUDA kernel
                                                          # NumPy in -> im2col_numpy

GPU kernels take float32 or float64 data (the packing kernels any dtype) and
use 64-bit index math; the convolutions are im2col/col2im plus one cuBLAS GEMM
(``cupy.matmul``) per block of samples. With ``DISTCONV_CUDNN=1`` in the
environment and a CuPy that has ``cupy.cudnn`` (CuPy <= 13 with cuDNN), the
convolutions call cuDNN instead; if cuDNN is missing or fails, they fall back
to the im2col path (with one warning). This module imports without CuPy:
CuPy is imported inside the functions that need it.

Numerics: kernels are compiled with ``--fmad=false`` so element-wise results
round exactly like NumPy's separate operations (CuPy adds ``-ftz=true``:
float32 denormals flush to zero on the GPU). Reductions and GEMMs sum in a
different order than NumPy, so they agree to rounding only.
"""
from __future__ import annotations

from ...cudakernels import (COMPILE_OPTIONS, KERNELS, compile_all, get_module,  # noqa: F401
                            kernel_source, kernels_dir)
from ...packing import (pack_channel_blocks, pack_channel_blocks_numpy,  # noqa: F401
                        unpack_channel_blocks, unpack_channel_blocks_numpy)
from .activation import relu_backward, relu_forward  # noqa: F401
from .batchnorm import (bn_backward_apply, bn_backward_reduce, bn_forward_apply,  # noqa: F401
                        bn_local_stats)
from .conv import (col2im, conv2d_backward_data, conv2d_backward_filter,  # noqa: F401
                   conv2d_forward, cudnn_available, cudnn_enabled, im2col)
from .pool import (avg_pool2d_backward, avg_pool2d_forward, max_pool2d_backward,  # noqa: F401
                   max_pool2d_forward)
from .twins import (avg_pool2d_backward_numpy, avg_pool2d_forward_numpy,  # noqa: F401
                    bn_backward_apply_numpy, bn_backward_reduce_numpy, bn_forward_apply_numpy,
                    bn_local_stats_numpy, col2im_numpy, conv2d_backward_data_numpy,
                    conv2d_backward_filter_numpy, conv2d_forward_numpy, im2col_numpy,
                    max_pool2d_backward_numpy, max_pool2d_forward_numpy, relu_backward_numpy,
                    relu_forward_numpy)

__all__ = [
    "COMPILE_OPTIONS", "KERNELS", "kernels_dir", "kernel_source", "get_module", "compile_all",
    "cudnn_available", "cudnn_enabled",
    "im2col", "col2im", "im2col_numpy", "col2im_numpy",
    "pack_channel_blocks", "unpack_channel_blocks",
    "pack_channel_blocks_numpy", "unpack_channel_blocks_numpy",
    "bn_local_stats", "bn_forward_apply", "bn_backward_reduce", "bn_backward_apply",
    "bn_local_stats_numpy", "bn_forward_apply_numpy", "bn_backward_reduce_numpy",
    "bn_backward_apply_numpy",
    "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward",
    "max_pool2d_forward_numpy", "max_pool2d_backward_numpy", "avg_pool2d_forward_numpy",
    "avg_pool2d_backward_numpy",
    "relu_forward", "relu_backward", "relu_forward_numpy", "relu_backward_numpy",
    "conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter",
    "conv2d_forward_numpy", "conv2d_backward_data_numpy", "conv2d_backward_filter_numpy",
]
