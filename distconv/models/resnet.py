"""ResNet family (basic and bottleneck blocks, 18/34/50, wide variants, CIFAR and
ImageNet stems) with torchvision's module names, so ``state_dict`` keys match
``torchvision.models.resnet*`` and weights move both ways.

Every model takes ``strategy``: one :class:`Strategy` (or its text) for all layers,
or a per-layer plan ``{module name: Strategy or text}`` (names as in
``named_modules()``, e.g. ``"layer2.0.conv1"``; a name covers the modules under it;
``""`` sets the default).
"""
from __future__ import annotations

from ..functional import add
from ..strategy import Strategy
from .. import nn
from ..nn.module import call_input


def _conv3x3(cin, cout, stride=1, strategy=None):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, strategy=strategy)


def _conv1x1(cin, cout, stride=1, strategy=None):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False, strategy=strategy)


class _Block(nn.Module):
    """Shared residual join of the blocks: ``relu(body + shortcut(x))``."""

    def _set_downsample(self, downsample) -> None:
        """The shortcut module, registered last (torchvision's state-dict order); None is
        kept as a plain attribute (no module: the identity)."""
        if downsample is not None:
            self.downsample = downsample
        else:
            object.__setattr__(self, "downsample", None)

    def _join(self, x, out, relu):
        x = call_input(x)  # a global input: the tensor conv1 cut
        idn = self.downsample(x) if self.downsample is not None else x
        return relu(add(out, idn))


class BasicBlock(_Block):
    """conv3x3-bn-relu-conv3x3-bn + shortcut, relu. x: (N, inplanes, H, W) ->
    (N, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, width_per_group=64,
                 strategy=None):
        super().__init__()
        if width_per_group != 64:
            raise ValueError("BasicBlock supports width_per_group=64 only (as torchvision)")
        self.conv1 = _conv3x3(inplanes, planes, stride, strategy)
        self.bn1 = nn.BatchNorm2d(planes, strategy=strategy)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes, 1, strategy)
        self.bn2 = nn.BatchNorm2d(planes, strategy=strategy)
        self.relu2 = nn.ReLU()
        self._set_downsample(downsample)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self._join(x, self.bn2(self.conv2(out)), self.relu2)



class Bottleneck(_Block):
    """1x1-3x3-1x1 bottleneck (stride on the 3x3, as torchvision v1.5), expansion 4.
    x: (N, inplanes, H, W) -> (N, 4*planes, H/stride, W/stride)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, width_per_group=64,
                 strategy=None):
        super().__init__()
        width = int(planes * (width_per_group / 64.0))
        self.conv1 = _conv1x1(inplanes, width, 1, strategy)
        self.bn1 = nn.BatchNorm2d(width, strategy=strategy)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(width, width, stride, strategy)
        self.bn2 = nn.BatchNorm2d(width, strategy=strategy)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv1x1(width, planes * 4, 1, strategy)
        self.bn3 = nn.BatchNorm2d(planes * 4, strategy=strategy)
        self.relu3 = nn.ReLU()
        self._set_downsample(downsample)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self._join(x, self.bn3(self.conv3(out)), self.relu3)



class ResNet(nn.Module):
    """torchvision-style ResNet. x: (N, in_channels, H, W) -> logits (N, num_classes).

    ``stem="imagenet"``: 7x7/2 conv + 3x3/2 max-pool (224x224 inputs);
    ``stem="cifar"``: 3x3/1 conv, no pool (32x32 or smaller inputs).
    ``base_width``: channels of the first stage (64 in torchvision);
    ``width_per_group``: bottleneck inner width (128 for wide_resnet50_2).
    """

    def __init__(self, block, layers, num_classes=1000, in_channels=3, stem="imagenet",
                 base_width=64, width_per_group=64, strategy=None):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        plan = None
        if isinstance(strategy, dict):
            plan, strategy = strategy, None
        elif isinstance(strategy, str):
            strategy = Strategy.parse(strategy)
        self.inplanes = base_width
        self._wpg = width_per_group
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False,
                                   strategy=strategy)
        else:
            self.conv1 = nn.Conv2d(in_channels, base_width, 3, stride=1, padding=1, bias=False,
                                   strategy=strategy)
        self.bn1 = nn.BatchNorm2d(base_width, strategy=strategy)
        self.relu = nn.ReLU()
        if stem == "imagenet":
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            object.__setattr__(self, "maxpool", None)
        widths = [base_width * (2 ** i) for i in range(len(layers))]
        for i, (w, n) in enumerate(zip(widths, layers)):
            self.add_module(f"layer{i + 1}", self._make_layer(block, w, n, 1 if i == 0 else 2,
                                                              strategy))
        self._nstages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes, strategy=strategy)
        if plan is not None:
            self.set_strategy(plan)

    def _make_layer(self, block, planes, blocks, stride, strategy):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride, strategy),
                nn.BatchNorm2d(planes * block.expansion, strategy=strategy))
        mods = [block(self.inplanes, planes, stride, downsample, self._wpg, strategy)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            mods.append(block(self.inplanes, planes, 1, None, self._wpg, strategy))
        return nn.Sequential(*mods)

    def _stages(self):
        mods = [self.conv1, self.bn1, self.relu]
        if self.maxpool is not None:
            mods.append(self.maxpool)
        mods += [getattr(self, f"layer{i + 1}") for i in range(self._nstages)]
        return mods + [self.avgpool, self.flatten, self.fc]

    def forward(self, x):
        for m in self._stages():
            x = m(x)
        return x



def resnet18(num_classes=1000, **kw) -> ResNet:
    """ResNet-18 (basic blocks 2-2-2-2)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, **kw)


def resnet34(num_classes=1000, **kw) -> ResNet:
    """ResNet-34 (basic blocks 3-4-6-3)."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, **kw)


def resnet50(num_classes=1000, **kw) -> ResNet:
    """ResNet-50 (bottlenecks 3-4-6-3)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, **kw)


def wide_resnet50_2(num_classes=1000, **kw) -> ResNet:
    """Wide ResNet-50-2: bottleneck inner width doubled (torchvision's definition)."""
    kw.setdefault("width_per_group", 128)
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, **kw)


def wide_resnet(depth=18, width=2, num_classes=1000, **kw) -> ResNet:
    """A ResNet-18/34/50 with every stage ``width`` times wider (``base_width=64*width``),
    the width multiplier of the channel/filter-parallelism paper."""
    kw.setdefault("base_width", int(64 * width))
    return {18: resnet18, 34: resnet34, 50: resnet50}[depth](num_classes, **kw)


def small_resnet(num_classes=10, in_channels=1, width=16, strategy=None) -> ResNet:
    """A small ResNet for 8x8 digits: 3x3 stem, two stages of one basic block
    (``width`` and ``2*width`` channels), global pool, fc."""
    return ResNet(BasicBlock, [1, 1], num_classes, in_channels=in_channels, stem="cifar",
                  base_width=width, strategy=strategy)


MODELS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50,
          "wide_resnet50_2": wide_resnet50_2, "small_resnet": small_resnet}
