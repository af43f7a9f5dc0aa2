"""Containers: Sequential and Residual."""
from __future__ import annotations

from collections import OrderedDict

from ..tensor import DistTensor
from .module import Module


class Sequential(Module):
    """Modules applied in order; ``backward`` runs them in reverse.

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

    def backward(self, dy):
        for m in reversed(list(self._modules.values())):
            dy = m.backward(dy)
        return dy

    def __repr__(self):
        inner = "\n".join(f"  ({k}): {m!r}" for k, m in self._modules.items())
        return f"Sequential(\n{inner}\n)"


class Residual(Module):
    """``y = body(x) + shortcut(x)`` (``shortcut=None``: identity).

    The two branches may end in different distributions: the shortcut's output is moved to
    the body's before the sum; in backward ``dy`` goes to both branches and the two input
    gradients are summed in the input's distribution.
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
        if not isinstance(x, DistTensor):
            # the body decided how to cut a global input; cut the identity path the same way
            x = DistTensor.from_global(x, self._input_dist_guess(yb, x))
        ys = self.shortcut(x) if self.shortcut is not None else x
        if tuple(ys.shape) != tuple(yb.shape):
            raise ValueError(f"Residual: body output shape {yb.shape} and shortcut output shape "
                             f"{ys.shape} differ")
        s_dist = ys.distribution
        ys = ys.redistribute(yb.distribution)
        self._saved = (x.distribution, s_dist)
        return DistTensor(yb.local + ys.local, yb.distribution, yb.shape)

    @staticmethod
    def _input_dist_guess(yb, x):
        from ..distribution import Distribution
        d = yb.distribution
        return Distribution(d.grid, list(d.split[:2]) + [None] * (x.ndim - 2))

    def backward(self, dy):
        x_dist, s_dist = self._saved_state()
        dxb = self.body.backward(dy)
        if isinstance(dy, DistTensor):
            dys = dy.redistribute(s_dist)
        else:
            dys = DistTensor.from_global(dy, s_dist)
        dxs = self.shortcut.backward(dys) if self.shortcut is not None else dys
        dxb = dxb.redistribute(x_dist)
        dxs = dxs.redistribute(x_dist)
        return DistTensor(dxb.local + dxs.local, x_dist, dxb.shape)
