"""Containers: Sequential and Residual. They write ``forward`` only: backward comes from
the nodes their layers record (:mod:`distconv.autograd`)."""
from __future__ import annotations

from collections import OrderedDict

from ..functional import add
from .module import Module, call_input


class Sequential(Module):
    """Modules applied in order.

    Each layer takes its input in whatever distribution the previous layer produced and
    moves it to what it needs (``DistTensor.redistribute``), so consecutive layers with
    different strategies cost exactly one redistribution each way.
    """

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], (dict, OrderedDict)):
            for name, m in modules[0].items():
                self.add_module(str(name), m)
        else:
            for i, m in enumerate(modules):
                if not isinstance(m, Module):
                    raise TypeError(f"Sequential: item {i} is a {type(m).__name__}, not a Module")
                self.add_module(str(i), m)

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def __repr__(self):
        inner = "\n".join(f"  ({k}): {m!r}" for k, m in self._modules.items())
        return f"Sequential(\n{inner}\n)"


class Residual(Module):
    """``y = body(x) + shortcut(x)`` (``shortcut=None``: identity).

    The two branches may end in different distributions: the shortcut's output is moved to
    the body's before the sum (:func:`distconv.functional.add`); backward sends ``dy`` to
    both branches and sums the two input gradients in the input's distribution.
    """

    def __init__(self, body: Module, shortcut: Module | None = None):
        super().__init__()
        self.body = body
        if shortcut is not None:
            self.shortcut = shortcut
        else:
            object.__setattr__(self, "shortcut", None)

    def forward(self, x):
        yb = self.body(x)
        x = call_input(x)  # a global input: the tensor the body's first layer cut
        ys = self.shortcut(x) if self.shortcut is not None else x
        if tuple(ys.shape) != tuple(yb.shape):
            raise ValueError(f"Residual: body output shape {yb.shape} and shortcut output shape "
                             f"{ys.shape} differ")
        return add(yb, ys)
