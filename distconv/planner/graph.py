"""The layer graph a planner works on: leaf layers with global shapes, in execution order,
with residual blocks kept as units.

:func:`trace` walks a distconv model (a ``ResNet``, a ``BasicBlock``/``Bottleneck``, a
``Sequential`` of layers, or a single layer) for a global input shape
``(N, C, H, W)`` and returns a :class:`Graph`: a list of items, each a
:class:`LayerSpec` or a :class:`BlockSpec` (``body`` layers, ``shortcut`` layers —
empty for the identity — and the ReLU after the join). Nothing is computed: shapes
follow from the layers' arguments. Layer names are those of ``named_modules()``,
so a plan ``{name: strategy}`` applies with ``model.set_strategy(plan)``.

Kinds: ``conv``, ``linear``, ``bn`` (each takes a :class:`distconv.Strategy`: the
*strategic* layers) and ``relu``, ``maxpool``, ``avgpool``, ``gap`` (global
average pool), ``flatten`` (which run on whatever split their input has).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import nn
from ..ops import conv2d_output_hw

STRATEGIC = ("conv", "linear", "bn")


@dataclass
class LayerSpec:
    """One leaf layer. ``in_shape``/``out_shape``: global shapes (N, C, H, W) or (N, F)."""

    name: str
    kind: str
    in_shape: tuple
    out_shape: tuple
    attrs: dict = field(default_factory=dict)

    @property
    def strategic(self) -> bool:
        return self.kind in STRATEGIC

    @property
    def weight_shape(self):
        a = self.attrs
        if self.kind == "conv":
            return (a["out_channels"], a["in_channels"]) + tuple(a["kernel_size"])
        if self.kind == "linear":
            return (a["out_features"], a["in_features"])
        if self.kind == "bn":
            return (self.in_shape[1],)
        return None

    @property
    def num_params(self) -> int:
        w = self.weight_shape
        if w is None:
            return 0
        n = 1
        for s in w:
            n *= s
        if self.kind == "bn":
            return 2 * n if self.attrs.get("affine", True) else 0
        if self.attrs.get("bias"):
            n += w[0]
        return n


@dataclass
class BlockSpec:
    """A residual block: ``join(body(x) + shortcut(x))``; ``shortcut == []`` is the identity."""

    name: str
    body: list
    shortcut: list
    join: LayerSpec
    in_shape: tuple
    out_shape: tuple


@dataclass
class Graph:
    items: list
    in_shape: tuple

    def layers(self):
        """Every LayerSpec in execution order (block bodies, then shortcuts, then joins)."""
        for it in self.items:
            if isinstance(it, BlockSpec):
                yield from it.body
                yield from it.shortcut
                yield it.join
            else:
                yield it

    def traverse(self, dist, layer_fn, join_fn):
        """Run through the graph in execution order, threading the input distribution:
        ``layer_fn(layer, in_dist) -> out_dist`` for every layer and ``join_fn(block,
        body_dist, shortcut_dist)`` at each residual join (before the ReLU after it).
        Returns the distribution of the output."""
        for it in self.items:
            if isinstance(it, BlockSpec):
                x = dist
                for layer in it.body:
                    dist = layer_fn(layer, dist)
                sd = x
                for layer in it.shortcut:
                    sd = layer_fn(layer, sd)
                join_fn(it, dist, sd)
                dist = layer_fn(it.join, dist)
            else:
                dist = layer_fn(it, dist)
        return dist

    def strategic_names(self) -> list:
        return [layer.name for layer in self.layers() if layer.strategic]

    @property
    def out_shape(self):
        return self.items[-1].out_shape if self.items else self.in_shape


# ------------------------------------------------------------------------ tracing
def _leaf(name, m, shape):
    """LayerSpec of leaf module ``m`` for input ``shape``."""
    shape = tuple(int(s) for s in shape)
    if isinstance(m, nn.Conv2d):
        if len(shape) != 4 or shape[1] != m.in_channels:
            raise ValueError(f"{name}: Conv2d({m.in_channels}, ...) cannot take shape {shape}")
        ho, wo = conv2d_output_hw(shape[2], shape[3], m.kernel_size, m.stride, m.padding,
                                  m.dilation)
        return LayerSpec(name, "conv", shape, (shape[0], m.out_channels, ho, wo), {
            "in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": tuple(m.kernel_size), "stride": tuple(m.stride),
            "padding": tuple(m.padding), "dilation": tuple(m.dilation),
            "bias": m.bias is not None})
    if isinstance(m, nn.Linear):
        if len(shape) != 2 or shape[1] != m.in_features:
            raise ValueError(f"{name}: Linear({m.in_features}, ...) cannot take shape {shape}")
        return LayerSpec(name, "linear", shape, (shape[0], m.out_features), {
            "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None})
    if isinstance(m, nn.BatchNorm2d):
        if len(shape) != 4 or shape[1] != m.num_features:
            raise ValueError(f"{name}: BatchNorm2d({m.num_features}) cannot take shape {shape}")
        return LayerSpec(name, "bn", shape, shape, {"affine": m.weight is not None})
    if isinstance(m, nn.ReLU):
        return LayerSpec(name, "relu", shape, shape)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k, s, p = m.kernel_size, m.stride, m.padding
        ho = (shape[2] + 2 * p[0] - k[0]) // s[0] + 1
        wo = (shape[3] + 2 * p[1] - k[1]) // s[1] + 1
        kind = "maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool"
        return LayerSpec(name, kind, shape, (shape[0], shape[1], ho, wo),
                         {"kernel_size": tuple(k), "stride": tuple(s), "padding": tuple(p)})
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return LayerSpec(name, "gap", shape, (shape[0], shape[1], 1, 1))
    if isinstance(m, nn.Flatten):
        n = 1
        for s in shape[1:]:
            n *= s
        return LayerSpec(name, "flatten", shape, (shape[0], n))
    raise ValueError(f"the planner does not know layer {name!r} of type {type(m).__name__}")


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _block(prefix, b, shape):
    from ..models.resnet import BasicBlock, Bottleneck
    if isinstance(b, BasicBlock):
        body_names, join_name = ["conv1", "bn1", "relu", "conv2", "bn2"], "relu2"
    elif isinstance(b, Bottleneck):
        body_names = ["conv1", "bn1", "relu", "conv2", "bn2", "relu2", "conv3", "bn3"]
        join_name = "relu3"
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(type(b).__name__)
    body, s = [], shape
    for n in body_names:
        spec = _leaf(_join(prefix, n), getattr(b, n), s)
        body.append(spec)
        s = spec.out_shape
    short, t = [], shape
    if b.downsample is not None:
        for i, m in enumerate(b.downsample):
            spec = _leaf(_join(prefix, f"downsample.{i}"), m, t)
            short.append(spec)
            t = spec.out_shape
    if tuple(t) != tuple(s):
        raise ValueError(f"{prefix}: shortcut shape {t} differs from the body's {s}")
    join = _leaf(_join(prefix, join_name), getattr(b, join_name), s)
    return BlockSpec(prefix, body, short, join, tuple(shape), tuple(s))


def _walk(prefix, m, shape, items):
    from ..models.resnet import ResNet, _Block
    if isinstance(m, _Block):
        blk = _block(prefix, m, shape)
        items.append(blk)
        return blk.out_shape
    if isinstance(m, ResNet):
        names = ["conv1", "bn1", "relu"] + (["maxpool"] if m.maxpool is not None else [])
        names += [f"layer{i + 1}" for i in range(m._nstages)] + ["avgpool", "flatten", "fc"]
        for n in names:
            shape = _walk(_join(prefix, n), getattr(m, n), shape, items)
        return shape
    if isinstance(m, nn.Sequential):
        for k, sub in m._modules.items():
            shape = _walk(_join(prefix, k), sub, shape, items)
        return shape
    spec = _leaf(prefix or type(m).__name__, m, shape)
    items.append(spec)
    return spec.out_shape


def trace(model, in_shape) -> Graph:
    """The :class:`Graph` of ``model`` for a global input of shape ``in_shape``."""
    in_shape = tuple(int(s) for s in in_shape)
    items: list = []
    _walk("", model, in_shape, items)
    if not any(it.strategic for it in Graph(items, in_shape).layers()):
        raise ValueError("the model has no conv, linear or batch-norm layer to plan")
    return Graph(items, in_shape)
