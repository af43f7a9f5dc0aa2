"""A CosmoFlow-like 2-D convolution stack for large images (the spatial-parallelism case).

CosmoFlow (Mathuriya et al., SC18; the LBANN spatial-parallel convolutions of Dryden et
al., IPDPS19) trains on volumes too large for one device at batch 1; this is its 2-D
analogue: blocks of conv 3x3 (padding 1) - batch norm - ReLU - max pool 2x2 that halve H
and W and widen the channels, then global average pooling and a two-layer classifier.
There is no torchvision counterpart: it is the model ``plan.py`` and ``train.py`` use for
plans that split height and width.
"""
from __future__ import annotations

from .. import nn
from ._common import check_image_size, min_image_size, split_strategy

#: conv widths of the blocks (divided by ``width_divisor``)
WIDTHS = (32, 64, 128, 128)


class ConvStack2d(nn.Module):
    """x: (N, in_channels, H, W), H and W >= 16 -> logits (N, num_classes).

    ``in_channels`` (4: CosmoFlow's redshift channels), ``width_divisor`` (the widths
    :data:`WIDTHS` divided by it), ``hidden`` (the classifier's hidden width); ``strategy``
    one :class:`~distconv.Strategy` or a per-layer plan, as the other models."""

    def __init__(self, num_classes=4, in_channels=4, width_divisor=1, hidden=128,
                 strategy=None):
        super().__init__()
        s, plan = split_strategy(strategy)
        d = int(width_divisor)
        if d < 1 or any(w % d for w in WIDTHS):
            raise ValueError(f"ConvStack2d: width_divisor must divide {WIDTHS}, got "
                             f"{width_divisor}")
        layers, c = [], int(in_channels)
        for w in WIDTHS:
            layers += [nn.Conv2d(c, w // d, 3, padding=1, bias=False, strategy=s),
                       nn.BatchNorm2d(w // d, strategy=s), nn.ReLU(), nn.MaxPool2d(2)]
            c = w // d
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(c, hidden, strategy=s), nn.ReLU(),
                                        nn.Linear(hidden, num_classes, strategy=s))
        self.min_size = min_image_size(self.features)
        if plan is not None:
            self.set_strategy(plan)

    def forward(self, x):
        check_image_size("ConvStack2d", x, self.min_size)
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def convstack2d(num_classes=4, **kw) -> ConvStack2d:
    """:class:`ConvStack2d` (PyTorch's default initialisation of every layer)."""
    return ConvStack2d(num_classes, **kw)
