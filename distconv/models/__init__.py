"""Models: the ResNet family with torchvision's state-dict names."""
from .resnet import (BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50,  # noqa: F401
                     wide_resnet, wide_resnet50_2, small_resnet, MODELS)
