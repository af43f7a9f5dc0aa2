"""Local math on xp (NumPy or CuPy) arrays: convolution, pooling, batch-norm, activations, losses.

Nothing here talks to MPI or knows about distributions; layers in
:mod:`distconv.nn` call these on their local blocks. All image arrays are
NCHW and convolution weights OIHW, as in PyTorch.
"""
from .conv import (conv2d_output_hw, conv2d_forward, conv2d_backward_data,  # noqa: F401
                   conv2d_backward_filter)
