"""AlexNet with torchvision's definition (``torchvision.models.alexnet``), defaults and
module names, so ``state_dict`` keys and shapes match and weights move both ways.

Forward only: backward
comes from the recorded forward (define-by-run autograd).

``strategy``: one :class:`~distconv.Strategy` (or its text) for every layer, or a
per-layer plan ``{module name: Strategy or text}`` (names as in ``named_modules()``,
e.g. ``"features.3"``, ``"classifier"``; ``""`` sets the default), as the ResNets.
"""
from __future__ import annotations

from .. import nn
from ._common import FeaturesClassifier, min_image_size, split_strategy


class AlexNet(FeaturesClassifier):
    """torchvision's AlexNet (the one-GPU variant of "One weird trick", 61.1 M parameters
    at 1000 classes). x: (N, in_channels, H, W), H and W >= 63 -> logits (N, num_classes).

    ``in_channels``, ``hidden`` (the classifier width, 4096 in torchvision) and
    ``width_divisor`` (the conv channel counts 64-192-384-256-256 divided by it) are extra
    knobs for small tests; the defaults give torchvision's model."""

    def __init__(self, num_classes=1000, dropout=0.5, in_channels=3, hidden=4096,
                 width_divisor=1, strategy=None):
        super().__init__()
        s, plan = split_strategy(strategy)
        d = int(width_divisor)
        if d < 1 or any(c % d for c in (64, 192, 384, 256)):
            raise ValueError(f"AlexNet: width_divisor must divide 64, 192, 384 and 256, got "
                             f"{width_divisor}")
        c1, c2, c3, c4 = 64 // d, 192 // d, 384 // d, 256 // d
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=11, stride=4, padding=2, strategy=s),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2, strategy=s),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1, strategy=s),
            nn.ReLU(),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1, strategy=s),
            nn.ReLU(),
            nn.Conv2d(c4, c4, kernel_size=3, padding=1, strategy=s),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(c4 * 6 * 6, hidden, strategy=s),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden, strategy=s),
            nn.ReLU(),
            nn.Linear(hidden, num_classes, strategy=s),
        )
        self.min_size = min_image_size(self.features)
        if plan is not None:
            self.set_strategy(plan)


def alexnet(num_classes=1000, **kw) -> AlexNet:
    """AlexNet as ``torchvision.models.alexnet`` (``dropout=0.5``; PyTorch's default
    initialisation of every layer, as torchvision)."""
    return AlexNet(num_classes, **kw)
