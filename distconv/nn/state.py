"""Loading a state dict with PyTorch's semantics (what ``Module.load_state_dict`` runs).

Each rank checks its dict and collects what it would load, the ranks agree on the
errors before any collective, the values are compared across ranks by checksum, and
only then is anything changed (all-or-nothing).
"""
from __future__ import annotations

from collections import OrderedDict, namedtuple
from collections.abc import Mapping

import numpy as np

from ..backend import get_xp, to_numpy
from ..tensor import DistTensor


class _IncompatibleKeys(namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])):
    """What :meth:`Module.load_state_dict` returns: torch's ``_IncompatibleKeys`` (same
    name, fields and repr)."""

    __slots__ = ()

    def __repr__(self):
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return super().__repr__()

    __str__ = __repr__


IncompatibleKeys = _IncompatibleKeys

_ABSENT = 0x5A17_AB5E_7E57_0001  # checksum slot of a key a rank does not load


def _as_array(v):
    """``v`` as a NumPy array if it is array-like (NumPy, CuPy, CPU torch tensor, NumPy
    scalar), else ``None`` (torch rejects non-tensors the same way)."""
    if isinstance(v, np.generic):
        return np.asarray(v)
    if not (hasattr(v, "shape") and hasattr(v, "dtype")):
        return None
    if hasattr(v, "detach") and hasattr(v, "numpy"):  # torch.Tensor
        return v.detach().cpu().numpy()
    return np.asarray(to_numpy(v))


def _torch_size(shape) -> str:
    """A shape as torch prints it in its load_state_dict messages."""
    return f"torch.Size({[int(s) for s in shape]})"


def load_state(module, state_dict, strict: bool = True, check_values: bool = True):
    """``module.load_state_dict(state_dict, strict, check_values=check_values)`` (see its
    docstring)."""
    from ..replicas import differing, digest
    from .module import _agree_local
    own = [p.data for p in module.parameters()] + [b for _, b in module.named_buffers()]
    comm = own[0].grid.world if own else None
    agree = comm.agree if comm is not None else _agree_local
    # every rank checks, then all agree before any collective or change
    agree(isinstance(state_dict, Mapping),
          f"Expected state_dict to be dict-like, got {type(state_dict)}.", TypeError)
    metadata = getattr(state_dict, "_metadata", None)
    state = OrderedDict(state_dict)
    missing, unexpected, errors, todo = [], [], [], []
    try:
        collect_state(module, state, "", metadata, missing, unexpected, errors, todo)
    except Exception as e:  # noqa: BLE001 - agreed below, never raised on one rank only
        errors.append(f"cannot read the state dict: {type(e).__name__}: {e}")
    if strict:
        if unexpected:
            errors.insert(0, "Unexpected key(s) in state_dict: {}. ".format(
                ", ".join(f'"{k}"' for k in unexpected)))
        if missing:
            errors.insert(0, "Missing key(s) in state_dict: {}. ".format(
                ", ".join(f'"{k}"' for k in missing)))
    head = f"Error(s) in loading state_dict for {type(module).__name__}:\n\t"
    agree(not errors, head + "\n\t".join(errors), RuntimeError)
    # the same values on every rank: one checksum per key of this model (a sentinel
    # where a rank does not load the key), compared with one allreduce
    if comm is not None and comm.size > 1 and check_values:
        by_key = {k: arr for k, _, _, arr, _ in todo}
        keys = [f"{mn}.{n}" if mn else n for mn, m in module.named_modules()
                for n in list(m._parameters) + list(m._buffers)]   # state-dict order
        digs = [digest(by_key[k]) if k in by_key else _ABSENT for k in keys]
        bad = [k for k, d in zip(keys, differing(comm, digs)) if d]
        if bad:
            raise RuntimeError(head + "the values of {} differ between ranks (or are "
                               "given on some ranks only); every rank must pass the "
                               "same state dict, else the replicas of these tensors "
                               "would diverge".format(", ".join(f'"{k}"' for k in bad)))
    xp = get_xp()
    for _, m, name, arr, cur in todo:
        new = DistTensor.from_global(xp.asarray(arr), cur.distribution, check=False)
        if name in m._parameters:
            m._parameters[name].data = new
        else:
            m._buffers[name] = new
            object.__setattr__(m, name, new)
    return _IncompatibleKeys(missing, unexpected)


def collect_state(module, state, prefix, metadata, missing, unexpected, errors, todo):
    """torch's recursive ``load``: what this module and its children would load.

    Appends to ``missing``/``unexpected``/``errors`` as torch does, and
    ``(key, module, name, array, current DistTensor)`` to ``todo``.
    """
    local_meta = {} if metadata is None else metadata.get(prefix[:-1], {})
    module._upgrade_state(state, prefix, local_meta.get("version", None))
    local = OrderedDict()
    for n, p in module._parameters.items():
        local[n] = p.data
    for n, b in module._buffers.items():
        local[n] = b
    for name, cur in local.items():
        key = prefix + name
        if key not in state:
            missing.append(key)
            continue
        arr = _as_array(state[key])
        if arr is None:
            errors.append(f'While copying the parameter named "{key}", expected an '
                          f"array (NumPy, CuPy or torch.Tensor) from checkpoint but "
                          f"received {type(state[key])}")
            continue
        if len(cur.shape) == 0 and arr.shape == (1,):  # torch 0.3 format of 0-d tensors
            arr = arr[0]
        if tuple(arr.shape) != tuple(cur.shape):
            errors.append(f"size mismatch for {key}: copying a param with shape "
                          f"{_torch_size(arr.shape)} from checkpoint, the shape in "
                          f"current model is {_torch_size(cur.shape)}.")
            continue
        try:
            arr = np.asarray(arr).astype(np.dtype(cur.dtype), copy=False)
        except (TypeError, ValueError) as e:
            errors.append(f'While copying the parameter named "{key}", whose dimensions '
                          f"in the model are {_torch_size(cur.shape)}, an exception "
                          f"occurred : {e.args}.")
            continue
        todo.append((key, module, name, np.asarray(arr, order="C"), cur))
    extra = prefix + "_extra_state"  # torch's extra-state key: none of ours has one
    if extra in state:
        unexpected.append(extra)
    for key in state:
        if key.startswith(prefix) and key != extra:
            parts = key[len(prefix):].split(".", 1)
            if len(parts) > 1:
                if parts[0] not in module._modules:
                    unexpected.append(key)
            elif parts[0] not in local:
                unexpected.append(key)
    for name, child in module._modules.items():
        cp = prefix + name + "."
        collect_state(child, OrderedDict((k, v) for k, v in state.items()
                                         if k.startswith(cp)),
                      cp, metadata, missing, unexpected, errors, todo)
