"""distconv: channel-, filter- and sample-parallel CNN training over MPI.

Public names (see ../shared/DESIGN.md)::

    import distconv as dc
    dc.set_default_dtype(np.float64)
    dc.Strategy(sample=None, channel=1, filter=1); dc.Strategy.parse("sample=2,channel=2")
    dc.DistTensor.from_global(array, distribution); t.to_global(); t.redistribute(dist)
    dc.nn.Conv2d(...), dc.nn.BatchNorm2d(...), dc.nn.Linear(...), dc.nn.Sequential(...)
    loss = criterion(model(x), labels); loss.backward()    # define-by-run autograd
    dc.cat([a, b], dim=1); a + b; xa, xb = dc.fork(x, [branch_a, branch_b])
    with dc.no_grad(): ...
"""
from .backend import set_default_dtype, get_default_dtype, set_backend, backend_name  # noqa: F401
from .distribution import Distribution, block_sizes, block_range  # noqa: F401
from .grid import ProcessGrid  # noqa: F401
from .strategy import Strategy  # noqa: F401
from .tensor import DistTensor  # noqa: F401
from .autograd import no_grad, set_grad_enabled, is_grad_enabled  # noqa: F401
from .functional import add, cat, fork  # noqa: F401
from . import nn  # noqa: F401
from .nn import manual_seed, sync_gradients  # noqa: F401

__version__ = "0.1.0"

_LAZY = ("models", "optim", "planner", "data", "checkpoint", "trace", "profile", "halo",
         "spatial")


def __getattr__(name):
    """``dc.models``, ``dc.planner``, ... import on first use (the planner is heavy)."""
    if name in _LAZY:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
