"""Distributed layers with PyTorch's names, arguments and state-dict layouts."""
from .module import (Module, Layer, Parameter, RemovableHandle, manual_seed,  # noqa: F401
                     sync_gradients)
from .conv import Conv2d, Linear  # noqa: F401
from .batchnorm import BatchNorm2d  # noqa: F401
from .layers import (ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Dropout,  # noqa: F401
                     Flatten)
from .container import Sequential, Residual  # noqa: F401
from .loss import CrossEntropyLoss, Loss  # noqa: F401
