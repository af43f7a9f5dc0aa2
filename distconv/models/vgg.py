"""VGG-11/16 (and with batch norm) with torchvision's definitions
(``torchvision.models.vgg*``), defaults, initialisation and module names, so
``state_dict`` keys and shapes match and weights move both ways.

Forward only: backward
comes from the recorded forward (define-by-run autograd).

``strategy``: one :class:`~distconv.Strategy` (or its text) for every layer, or a
per-layer plan ``{module name: Strategy or text}`` (names as in ``named_modules()``,
e.g. ``"features.0"``, ``"classifier.0"``; ``""`` sets the default), as the ResNets.
"""
from __future__ import annotations

from .. import nn
from ..nn.module import init_rng
from ._common import FeaturesClassifier, min_image_size, split_strategy, torchvision_vgg_init

#: torchvision's configurations: output channels of each 3x3 conv, "M" a 2x2 max pool.
CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}


def make_layers(cfg, batch_norm=False, in_channels=3, strategy=None):
    """torchvision's ``make_layers``: conv3x3(pad 1) [+ BatchNorm2d] + ReLU per number,
    MaxPool2d(2, 2) per "M", numbered in one Sequential (so keys are ``features.<i>.*``)."""
    layers = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1, strategy=strategy))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v, strategy=strategy))
            layers.append(nn.ReLU())
            in_channels = v
    return nn.Sequential(*layers)


class VGG(FeaturesClassifier):
    """torchvision's VGG: ``features``, ``avgpool`` (adaptive to 7x7), ``classifier``
    (4096-4096 with dropout). x: (N, in_channels, H, W), H and W >= 32 -> (N, num_classes).

    ``cfg``: a key of :data:`CFGS` or a list like them. ``in_channels``, ``hidden`` (the
    classifier width, 4096 in torchvision) and ``width_divisor`` (every conv channel count
    of ``cfg`` divided by it) are extra knobs for small tests; the defaults give
    torchvision's models."""

    def __init__(self, cfg="D", batch_norm=False, num_classes=1000, init_weights=True,
                 dropout=0.5, in_channels=3, hidden=4096, width_divisor=1, strategy=None):
        super().__init__()
        s, plan = split_strategy(strategy)
        cfg = CFGS[cfg] if isinstance(cfg, str) else list(cfg)
        d = int(width_divisor)
        if d < 1 or any(v % d for v in cfg if v != "M"):
            raise ValueError(f"VGG: width_divisor {width_divisor} must divide every channel "
                             f"count of {cfg}")
        cfg = [v if v == "M" else v // d for v in cfg]
        self.features = make_layers(cfg, batch_norm, in_channels, s)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.flatten = nn.Flatten()
        last = [v for v in cfg if v != "M"][-1]
        self.classifier = nn.Sequential(
            nn.Linear(last * 7 * 7, hidden, strategy=s),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden, strategy=s),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes, strategy=s),
        )
        self.min_size = min_image_size(self.features)
        if init_weights:
            torchvision_vgg_init(self, init_rng())
        if plan is not None:
            self.set_strategy(plan)


def vgg11(num_classes=1000, **kw) -> VGG:
    """VGG-11 (configuration "A"), as ``torchvision.models.vgg11``."""
    return VGG("A", False, num_classes, **kw)


def vgg11_bn(num_classes=1000, **kw) -> VGG:
    """VGG-11 with batch norm, as ``torchvision.models.vgg11_bn``."""
    return VGG("A", True, num_classes, **kw)


def vgg16(num_classes=1000, **kw) -> VGG:
    """VGG-16 (configuration "D"), as ``torchvision.models.vgg16``."""
    return VGG("D", False, num_classes, **kw)


def vgg16_bn(num_classes=1000, **kw) -> VGG:
    """VGG-16 with batch norm, as ``torchvision.models.vgg16_bn``."""
    return VGG("D", True, num_classes, **kw)
