"""Local math on xp (NumPy or CuPy) arrays: convolution, pooling, batch-norm, activations, losses,
dropout masks.

Nothing here talks to MPI or knows about distributions; layers in
:mod:`distconv.nn` call these on their local blocks. All image arrays are
NCHW and convolution weights OIHW, as in PyTorch. Kernel/stride/padding arguments and output
sizes follow one set of rules, :mod:`distconv.ops.geometry`.
"""
from .geometry import conv2d_output_hw, pool2d_output_hw  # noqa: F401
from .conv import conv2d_forward, conv2d_backward_data, conv2d_backward_filter  # noqa: F401
from .pool import (max_pool2d_forward, max_pool2d_backward, avg_pool2d_forward,  # noqa: F401
                   avg_pool2d_backward, global_avg_pool_forward, global_avg_pool_backward,
                   avg_pool2d_divisor, adaptive_pool_bins,
                   adaptive_avg_pool2d_output_hw, adaptive_avg_pool2d_forward,
                   adaptive_avg_pool2d_backward)
from .dropout import dropout_mask, dropout_keep, dropout_key  # noqa: F401
from .batchnorm import (bn_local_stats, bn_mean_invstd, bn_forward_apply,  # noqa: F401
                        bn_backward_reduce, bn_backward_apply, bn_param_grads)
from .activation import relu_forward, relu_backward  # noqa: F401
from .loss import (logsumexp, log_softmax, softmax, cross_entropy_forward_local,  # noqa: F401
                   cross_entropy_backward_local)
