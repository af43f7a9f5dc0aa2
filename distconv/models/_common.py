"""Helpers shared by the AlexNet, VGG and Inception-v3 definitions."""
from __future__ import annotations

import math

import numpy as np

from .. import nn
from ..ops.geometry import conv_output_size, pool_output_size
from ..strategy import Strategy


def split_strategy(strategy):
    """``strategy`` argument of a model -> (one Strategy or None for the layers, plan or None).

    As the ResNets: one :class:`Strategy` (or its text) for every layer, or a per-layer
    plan ``{module name: Strategy or text}`` applied with ``set_strategy`` after building.
    """
    if isinstance(strategy, dict):
        return None, strategy
    if isinstance(strategy, str):
        return Strategy.parse(strategy), None
    return strategy, None


def _layer_out(size, m, dim):
    """Spatial size after module ``m`` along ``dim`` (0: H, 1: W); raises ValueError when
    the output would be empty; None for modules that keep the size."""
    if isinstance(m, nn.Conv2d):
        k, s, p, d = (t[dim] for t in (m.kernel_size, m.stride, m.padding, m.dilation))
        out = conv_output_size(size, k, s, p, d)
    elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k, s, p = (t[dim] for t in (m.kernel_size, m.stride, m.padding))
        out = pool_output_size(size, k, s, p, bool(getattr(m, "ceil_mode", False)))
    else:
        return size
    if out < 1:
        raise ValueError("empty")
    return out


def min_image_size(features, limit=4096):
    """Smallest (H, W) the layers of ``features`` (a Sequential of convs, pools and
    elementwise layers) accept without an empty output; found by a scan (layer sizes are
    monotone in the input size)."""
    mods = list(features)
    best = []
    for dim in (0, 1):
        for n in range(1, limit + 1):
            try:
                size = n
                for m in mods:
                    size = _layer_out(size, m, dim)
            except ValueError:
                continue
            best.append(n)
            break
        else:
            raise ValueError(f"no input size up to {limit} fits these layers")
    return tuple(best)


def check_image_size(name, x, minimum):
    """The same ValueError on every rank (global shape) when ``x`` is below ``minimum``."""
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise ValueError(f"{name} expects (N, C, H, W) images, got shape {shape}")
    if shape[2] < minimum[0] or shape[3] < minimum[1]:
        raise ValueError(f"{name}: input image {shape[2]}x{shape[3]} is too small; the network "
                         f"needs at least {minimum[0]}x{minimum[1]}")


class FeaturesClassifier(nn.Module):
    """torchvision's plain CNN layout (AlexNet, VGG): ``features`` -> ``avgpool`` ->
    ``flatten`` -> ``classifier``. A subclass builds those four and ``min_size`` (the
    smallest (H, W) ``features`` accepts); a smaller input raises naming the class.

    forward: x (N, C, H, W) -> the classifier's output (N, num_classes)."""

    def forward(self, x):
        check_image_size(type(self).__name__, x, self.min_size)
        x = self.features(x)
        x = self.avgpool(x)
        x = self.flatten(x)
        return self.classifier(x)


def _set_global(p, array):
    """Replace parameter ``p``'s value by ``array`` (the same global array on every rank)."""
    from ..nn.module import new_param
    p.data = new_param(np.asarray(array, dtype=p.data.local.dtype), p.data.distribution).data


def torchvision_vgg_init(model, rng):
    """torchvision's VGG initialisation: convs kaiming-normal (fan_out, relu gain), bias 0;
    batch norm weight 1, bias 0; linear layers normal(0, 0.01), bias 0."""
    for _, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shape = tuple(m.weight.data.shape)
            fan_out = shape[0] * int(np.prod(shape[2:]))
            _set_global(m.weight, rng.normal(0.0, math.sqrt(2.0 / fan_out), shape))
            if m.bias is not None:
                _set_global(m.bias, np.zeros(m.bias.data.shape))
        elif isinstance(m, nn.BatchNorm2d):
            if getattr(m, "weight", None) is not None:
                _set_global(m.weight, np.ones(m.weight.data.shape))
                _set_global(m.bias, np.zeros(m.bias.data.shape))
        elif isinstance(m, nn.Linear):
            shape = tuple(m.weight.data.shape)
            _set_global(m.weight, rng.normal(0.0, 0.01, shape))
            if m.bias is not None:
                _set_global(m.bias, np.zeros(m.bias.data.shape))
