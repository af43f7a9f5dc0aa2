"""Inception-v3 with torchvision's definition (``torchvision.models.inception_v3``),
defaults, initialisation and module names, so ``state_dict`` keys and shapes match and
weights move both ways.

Branches are joined with :func:`distconv.cat` on the channel dimension (differentiable
across distributions: each branch may run under its own strategy). Each block first
forks its input to its towers (:func:`distconv.fork`), so towers placed on disjoint ranks
(``Strategy(ranks=...)``) run at the same time; towers on the input's own ranks get the
input as it is (the same moves and plan as without the fork). The pooling that
torchvision calls functionally (``F.avg_pool2d``/``F.max_pool2d`` in the blocks, the ReLU
of ``BasicConv2d``) is a parameterless sub-module here (``pool``, ``relu``), so it has a
name in ``named_modules()`` but adds no state-dict key. Forward only: backward comes from
the recorded forward (define-by-run autograd).

``strategy``: one :class:`~distconv.Strategy` (or its text) for every layer, or a per-layer
plan ``{module name: Strategy or text}`` (names as in ``named_modules()``, e.g.
``"Mixed_6b.branch7x7_2"``, ``"AuxLogits"``, ``"fc"``; ``""`` sets the default).
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np

from .. import nn
from ..backend import get_xp
from ..functional import cat, fork
from ..nn.module import Layer, init_rng
from ..tensor import DistTensor
from ._common import _set_global, check_image_size, min_image_size, split_strategy

#: What the model returns in training mode with ``aux_logits`` (torchvision's name).
InceptionOutputs = namedtuple("InceptionOutputs", ["logits", "aux_logits"])


class _Widths:
    """Channel counts of torchvision's network divided by ``divisor`` (a test knob)."""

    def __init__(self, divisor, strategy):
        self.div = int(divisor)
        self.strategy = strategy
        if self.div < 1:
            raise ValueError(f"inception_v3: width_divisor must be >= 1, got {divisor}")

    def __call__(self, c):
        if c % self.div:
            raise ValueError(f"inception_v3: width_divisor {self.div} does not divide the "
                             f"channel count {c}")
        return c // self.div

    def conv(self, cin, cout, **kw):
        """BasicConv2d with ``cin`` given as is (already divided) and ``cout`` divided."""
        return BasicConv2d(cin, self(cout), strategy=self.strategy, **kw)


class BasicConv2d(nn.Module):
    """conv (no bias) - BatchNorm2d(eps=0.001) - ReLU, as torchvision's ``BasicConv2d``."""

    def __init__(self, in_channels, out_channels, strategy=None, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, strategy=strategy, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001, strategy=strategy)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    """1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 branches, joined on C (35x35 stage)."""

    def __init__(self, in_channels, pool_features, w):
        super().__init__()
        self.branch1x1 = w.conv(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = w.conv(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = w.conv(w(48), 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = w.conv(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = w.conv(w(64), 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = w.conv(w(96), 96, kernel_size=3, padding=1)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.branch_pool = w.conv(in_channels, pool_features, kernel_size=1)
        self.out_channels = w(64) + w(64) + w(96) + w(pool_features)

    def forward(self, x):
        x1, x5, x3, xp = fork(x, [self.branch1x1, self.branch5x5_1, self.branch3x3dbl_1,
                                  self.branch_pool])
        b1 = self.branch1x1(x1)
        b5 = self.branch5x5_2(self.branch5x5_1(x5))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x3)))
        bp = self.branch_pool(self.pool(xp))
        return cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 branches (35x35 -> 17x17)."""

    def __init__(self, in_channels, w):
        super().__init__()
        self.branch3x3 = w.conv(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = w.conv(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = w.conv(w(64), 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = w.conv(w(96), 96, kernel_size=3, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2)
        self.out_channels = w(384) + w(96) + in_channels

    def forward(self, x):
        x3, xd = fork(x, [self.branch3x3, self.branch3x3dbl_1])
        b3 = self.branch3x3(x3)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(xd)))
        return cat([b3, bd, self.pool(x)], dim=1)


class InceptionC(nn.Module):
    """Factorised 7x7 (1x7 and 7x1) branches (17x17 stage)."""

    def __init__(self, in_channels, channels_7x7, w):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = w.conv(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = w.conv(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = w.conv(w(c7), c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = w.conv(w(c7), 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = w.conv(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = w.conv(w(c7), c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = w.conv(w(c7), c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = w.conv(w(c7), c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = w.conv(w(c7), 192, kernel_size=(1, 7), padding=(0, 3))
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.branch_pool = w.conv(in_channels, 192, kernel_size=1)
        self.out_channels = 4 * w(192)

    def forward(self, x):
        x1, x7, xd, xp = fork(x, [self.branch1x1, self.branch7x7_1, self.branch7x7dbl_1,
                                  self.branch_pool])
        b1 = self.branch1x1(x1)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x7)))
        bd = self.branch7x7dbl_1(xd)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            bd = m(bd)
        bp = self.branch_pool(self.pool(xp))
        return cat([b1, b7, bd, bp], dim=1)


class InceptionD(nn.Module):
    """1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 branches (17x17 -> 8x8)."""

    def __init__(self, in_channels, w):
        super().__init__()
        self.branch3x3_1 = w.conv(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = w.conv(w(192), 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = w.conv(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = w.conv(w(192), 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = w.conv(w(192), 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = w.conv(w(192), 192, kernel_size=3, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2)
        self.out_channels = w(320) + w(192) + in_channels

    def forward(self, x):
        x3, x7 = fork(x, [self.branch3x3_1, self.branch7x7x3_1])
        b3 = self.branch3x3_2(self.branch3x3_1(x3))
        b7 = self.branch7x7x3_1(x7)
        for m in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = m(b7)
        return cat([b3, b7, self.pool(x)], dim=1)


class InceptionE(nn.Module):
    """Expanded filter bank: 1x3 and 3x1 sub-branches joined inside the branches (8x8)."""

    def __init__(self, in_channels, w):
        super().__init__()
        self.branch1x1 = w.conv(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = w.conv(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = w.conv(w(384), 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = w.conv(w(384), 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = w.conv(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = w.conv(w(448), 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = w.conv(w(384), 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = w.conv(w(384), 384, kernel_size=(3, 1), padding=(1, 0))
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.branch_pool = w.conv(in_channels, 192, kernel_size=1)
        self.out_channels = w(320) + 4 * w(384) + w(192)

    def forward(self, x):
        x1, x3, xd, xp = fork(x, [self.branch1x1, self.branch3x3_1, self.branch3x3dbl_1,
                                  self.branch_pool])
        b1 = self.branch1x1(x1)
        b3 = self.branch3x3_1(x3)
        b3 = cat(_pair(self.branch3x3_2a, self.branch3x3_2b, b3), dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(xd))
        bd = cat(_pair(self.branch3x3dbl_3a, self.branch3x3dbl_3b, bd), dim=1)
        bp = self.branch_pool(self.pool(xp))
        return cat([b1, b3, bd, bp], dim=1)


def _pair(a, b, x) -> list:
    """``[a(xa), b(xb)]`` with ``x`` forked to the two sub-branches (InceptionE)."""
    xa, xb = fork(x, [a, b])
    return [a(xa), b(xb)]


class InceptionAux(nn.Module):
    """Auxiliary classifier on the 17x17 stage: avgpool 5/3 - 1x1 - 5x5 - global pool - fc."""

    def __init__(self, in_channels, num_classes, w):
        super().__init__()
        self.pool = nn.AvgPool2d(5, stride=3)
        self.conv0 = w.conv(in_channels, 128, kernel_size=1)
        self.conv1 = w.conv(w(128), 768, kernel_size=5)
        self.conv1.stddev = 0.01
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w(768), num_classes, strategy=w.strategy)
        self.fc.stddev = 0.001

    def forward(self, x):
        x = self.conv1(self.conv0(self.pool(x)))
        return self.fc(self.flatten(self.avgpool(x)))


class _TransformInput(Layer):
    """torchvision's ``transform_input``: channel c becomes ``x*scale[c] + shift[c]`` (from
    ImageNet's normalisation to the (-1, 1) range the Google weights expect). Elementwise
    per channel, any N/C split; a global input is cut data-parallel."""

    SCALE = (0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5)
    SHIFT = ((0.485 - 0.5) / 0.5, (0.456 - 0.5) / 0.5, (0.406 - 0.5) / 0.5)

    def _input(self, x):
        from ..nn.layers import elementwise_input
        return elementwise_input(x)

    def _coef(self, x):
        xp = get_xp()
        c0, c1 = x.distribution.dim_range(1, x.shape[1])
        sc = xp.asarray(np.array(self.SCALE[c0:c1], x.dtype).reshape(1, -1, 1, 1))
        sh = xp.asarray(np.array(self.SHIFT[c0:c1], x.dtype).reshape(1, -1, 1, 1))
        return sc, sh

    def _forward(self, x, save):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"inception_v3(transform_input=True) expects 3-channel images, "
                             f"got shape {x.shape}")
        sc, sh = self._coef(x)
        return DistTensor(x.local * sc + sh, x.distribution, x.shape), (x.distribution, sc)

    def _backward(self, ctx, dy, need_dx):
        dist, sc = ctx
        dy = dy.redistribute(dist)
        return DistTensor(dy.local * sc, dist, dy.shape)


class Inception3(nn.Module):
    """torchvision's ``Inception3`` (27.2 M parameters at 1000 classes).

    x: (N, in_channels, H, W) with H and W >= 75 (>= 299 in training mode with
    ``aux_logits``, where the auxiliary classifier needs a 17x17 stage) -> logits
    (N, num_classes); in training mode with ``aux_logits`` an ``InceptionOutputs(logits,
    aux_logits)`` of two DistTensors (``crit(out.logits, y) + 0.4 * crit(out.aux_logits,
    y)`` is a differentiable :class:`~distconv.nn.Loss`).

    ``in_channels`` and ``width_divisor`` (every channel count of the network divided by
    it; 1 gives torchvision's model, 16 a tiny one with the same keys) are extra knobs for
    small tests.
    """

    def __init__(self, num_classes=1000, aux_logits=True, transform_input=False,
                 init_weights=True, dropout=0.5, in_channels=3, width_divisor=1,
                 strategy=None):
        super().__init__()
        s, plan = split_strategy(strategy)
        w = _Widths(width_divisor, s)
        self.aux_logits = bool(aux_logits)
        self.transform_input = bool(transform_input)
        if self.transform_input:
            if in_channels != 3:
                raise ValueError("inception_v3: transform_input=True needs in_channels=3")
            self.transform = _TransformInput()
        self.Conv2d_1a_3x3 = w.conv(in_channels, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = w.conv(w(32), 32, kernel_size=3)
        self.Conv2d_2b_3x3 = w.conv(w(32), 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = w.conv(w(64), 80, kernel_size=1)
        self.Conv2d_4a_3x3 = w.conv(w(80), 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(w(192), pool_features=32, w=w)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, pool_features=64, w=w)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, pool_features=64, w=w)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, w)
        c = self.Mixed_6a.out_channels
        self.Mixed_6b = InceptionC(c, channels_7x7=128, w=w)
        self.Mixed_6c = InceptionC(c, channels_7x7=160, w=w)
        self.Mixed_6d = InceptionC(c, channels_7x7=160, w=w)
        self.Mixed_6e = InceptionC(c, channels_7x7=192, w=w)
        if self.aux_logits:
            self.AuxLogits = InceptionAux(c, num_classes, w)
        else:
            object.__setattr__(self, "AuxLogits", None)
        self.Mixed_7a = InceptionD(c, w)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, w)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, w)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(self.Mixed_7c.out_channels, num_classes, strategy=s)
        main = [self.Conv2d_1a_3x3.conv, self.Conv2d_2a_3x3.conv, self.Conv2d_2b_3x3.conv,
                self.maxpool1, self.Conv2d_3b_1x1.conv, self.Conv2d_4a_3x3.conv, self.maxpool2,
                self.Mixed_6a.branch3x3.conv]
        self.min_size = min_image_size(main + [self.Mixed_7a.branch3x3_2.conv])
        self.min_size_aux = self.min_size if self.AuxLogits is None else min_image_size(
            main + [self.AuxLogits.pool, self.AuxLogits.conv1.conv])
        if init_weights:
            self._init_weights(init_rng())
        if plan is not None:
            self.set_strategy(plan)

    def _init_weights(self, rng):
        """torchvision's: conv and linear weights N(0, stddev) truncated to [-2, 2] (stddev
        0.1, or the module's ``stddev``: 0.01 for AuxLogits.conv1, 0.001 for AuxLogits.fc);
        batch norm weight 1, bias 0; linear biases keep PyTorch's default initialisation."""
        for _, m in self.named_modules():
            if isinstance(m, BasicConv2d) and hasattr(m, "stddev"):
                m.conv.stddev = m.stddev
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                std = float(getattr(m, "stddev", 0.1))
                shape = tuple(m.weight.data.shape)
                v = rng.normal(0.0, std, shape)
                bad = np.abs(v) > 2
                while bad.any():
                    v[bad] = rng.normal(0.0, std, int(bad.sum()))
                    bad = np.abs(v) > 2
                _set_global(m.weight, v)
            elif isinstance(m, nn.BatchNorm2d):
                _set_global(m.weight, np.ones(m.weight.data.shape))
                _set_global(m.bias, np.zeros(m.bias.data.shape))

    def forward(self, x):
        aux_out = self.training and self.aux_logits
        if aux_out:
            check_image_size("inception_v3 (training mode with aux_logits)", x,
                             self.min_size_aux)
        else:
            check_image_size("inception_v3", x, self.min_size)
        if self.transform_input:
            x = self.transform(x)
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                     "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c",
                     "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = getattr(self, name)(x)
        aux = self.AuxLogits(x) if aux_out else None
        for name in ("Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool", "dropout", "flatten", "fc"):
            x = getattr(self, name)(x)
        if aux_out:
            return InceptionOutputs(x, aux)
        return x


def inception_v3(num_classes=1000, aux_logits=True, transform_input=False, init_weights=True,
                 strategy=None, **kw) -> Inception3:
    """Inception-v3 as ``torchvision.models.inception_v3`` (no pretrained weights: load
    torchvision's state dict with ``load_state_dict``)."""
    return Inception3(num_classes, aux_logits, transform_input, init_weights,
                      strategy=strategy, **kw)
