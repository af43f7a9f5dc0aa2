"""Models with torchvision's definitions and state-dict names: the ResNet family
(:data:`MODELS`, the ones the planner can trace) and the networks the OptCNN/FlexFlow papers
evaluate on, AlexNet, VGG and Inception-v3, and a CosmoFlow-like 2-D conv stack for large
images (:data:`CNN_MODELS`)."""
from .resnet import (BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50,  # noqa: F401
                     wide_resnet, wide_resnet50_2, small_resnet, MODELS)
from .alexnet import AlexNet, alexnet  # noqa: F401
from .vgg import VGG, vgg11, vgg11_bn, vgg16, vgg16_bn  # noqa: F401
from .inception import Inception3, InceptionOutputs, inception_v3  # noqa: F401
from .convstack import ConvStack2d, convstack2d  # noqa: F401

#: name -> constructor ``f(num_classes, **kw)`` of the non-ResNet models (``strategy=``
#: one Strategy or a per-layer plan; ``in_channels=``; see each model for its test knobs).
CNN_MODELS = {"alexnet": alexnet, "vgg11": vgg11, "vgg11_bn": vgg11_bn, "vgg16": vgg16,
              "vgg16_bn": vgg16_bn, "inception_v3": inception_v3, "convstack2d": convstack2d}
