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
from ._common import check_image_size, min_image_size, split_strategy


class AlexNet(nn.Module):
    """torchvision's AlexNet (the one-GPU variant of "One weird trick", 61.1 M parameters
    at 1000 classes). x: (N, in_channels, H, W), H and W >= 63 -> logits (N, num_classes).

    ``in_channels`` and ``hidden`` (the classifier width, 4096 in torchvision) are extra
    knobs for small tests; the defaults give torchvision's model."""

    def __init__(self, num_classes=1000, dropout=0.5, in_channels=3, hidden=4096,
                 strategy=None):
        super().__init__()
        s, plan = split_strategy(strategy)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2, strategy=s),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2, strategy=s),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1, strategy=s),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1, strategy=s),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1, strategy=s),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, hidden, strategy=s),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden, strategy=s),
            nn.ReLU(),
            nn.Linear(hidden, num_classes, strategy=s),
        )
        self.min_size = min_image_size(self.features)
        if plan is not None:
            self.set_strategy(plan)

    def forward(self, x):
        check_image_size("AlexNet", x, self.min_size)
        x = self.features(x)
        x = self.avgpool(x)
        x = self.flatten(x)
        return self.classifier(x)


def alexnet(num_classes=1000, **kw) -> AlexNet:
    """AlexNet as ``torchvision.models.alexnet`` (``dropout=0.5``; PyTorch's default
    initialisation of every layer, as torchvision)."""
    return AlexNet(num_classes, **kw)
