"""HDF5 checkpoints of global tensors: written atomically, loadable on any grid.

A checkpoint holds *global* tensors under PyTorch's state-dict names, so a file saved
on 2 ranks with ``Strategy(sample=2)`` loads on 1, 3 or 8 ranks with any strategy or
per-layer plan: each rank cuts its own shard out of the global arrays.

The file format (layout, checksum, reading) is :mod:`distconv.ckptfile`.

Saving is collective: every rank gathers the global tensors (``to_global``); rank 0
alone writes ``path + ".tmp-<pid>"``, flushes, fsyncs and closes it, calls
:data:`_before_rename`, renames it over ``path`` with :func:`os.replace` (atomic) and
fsyncs the directory. Any failure on rank 0 becomes the same :class:`CheckpointError`
on every rank (an agreement after the write, never a hang), the temporary file is
removed and whatever was at ``path`` before is left untouched.

Loading is collective too: every rank opens the file read-only, validates it (format
version, checksum, model keys and shapes, optimizer/scheduler compatibility) and the
ranks agree before anything is changed, so a bad file raises the same error everywhere
and leaves model and optimizer untouched.

Fault-injection hooks (module attributes, ``None`` by default; tests set them):

* ``_before_rename(tmp_path)``: rank 0, after the temporary file is complete and
  fsynced, before the rename;
* ``_after_dataset(tmp_path, name)``: rank 0, after each dataset is written;
* ``_after_read(path, contents)``: every rank, after reading (and before validating)
  a checkpoint; ``contents`` is the internal :class:`_Contents` record.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np

from .atomic import atomic_path
from .ckptfile import (FORMAT_VERSION, CheckpointCorruptError,  # noqa: F401
                       CheckpointError, CheckpointNotFoundError, _Contents, _checksum,
                       _escape, _fsync_path, _h5, _header, _open_read, _read)
from .backend import get_xp, to_numpy
from .errors import agree_error


# fault-injection hooks (see the module docstring)
_before_rename = None
_after_dataset = None
_after_read = None

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_info", "CheckpointError",
           "CheckpointCorruptError", "CheckpointNotFoundError", "FORMAT_VERSION"]


# exception types that may cross ranks by name in _agree_error
_KINDS = {c.__name__: c for c in (CheckpointError, CheckpointCorruptError,
                                  CheckpointNotFoundError, ValueError, TypeError, KeyError)}


def _comm_of(model):
    """The communicator of the model's tensors (the world communicator if it has none)."""
    for _, p in getattr(model, "named_parameters", lambda: ())():
        return p.data.grid.world
    for _, b in getattr(model, "named_buffers", lambda: ())():
        return b.grid.world
    from . import comm as _comm
    return _comm.world()


def _agree_error(comm, err: BaseException | None) -> None:
    """:func:`distconv.errors.agree_error` for checkpoints: the type is one of
    :data:`_KINDS`, else :class:`CheckpointError`; a ``KeyError``'s text is its key's,
    unquoted."""
    agree_error(comm, err, _KINDS, lambda e: "CheckpointError",
                lambda e: str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))


def _run(fn, *args):
    """``fn(*args)``, returning ``(result, None)`` or ``(None, exception)``."""
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        return None, e


# ------------------------------------------------------------------ what is saved
def _optimizer_record(model, optimizer, comm):
    """Collective: the optimizer's global state tensors and its JSON-able attributes."""
    names = {}
    for n, p in getattr(model, "named_parameters", lambda: ())():
        names.setdefault(id(p), n)
    items = optimizer.state_tensors()
    comm.check_same([(int(i), str(k)) for i, k, _ in items], "optimizer state keys")
    tensors = OrderedDict()
    for i, k, t in items:
        tensors[(int(i), str(k))] = np.asarray(to_numpy(t.to_global()))
    info = {
        "class": type(optimizer).__name__,
        "step_count": int(optimizer.step_count),
        "lr": float(optimizer.lr),
        "defaults": json.dumps(optimizer.defaults, sort_keys=True),
        "params": json.dumps([[names.get(id(p), ""), [int(s) for s in p.shape]]
                              for p in optimizer.params]),
        "state_keys": json.dumps([[i, k] for i, k in tensors]),
    }
    return tensors, info


def _scheduler_record(scheduler):
    return {"class": type(scheduler).__name__,
            "state": json.dumps(scheduler.state_dict(), sort_keys=True)}


def _put(f, tmp, datasets, name, a) -> None:
    """Dataset ``name`` of array ``a`` in HDF5 file ``f``, recorded for the checksum."""
    datasets[name] = a
    f.create_dataset(name, data=a)
    if _after_dataset is not None:
        _after_dataset(tmp, name)


def _write(path, tmp, model_sd, opt_tensors, opt_info, sched_info, meta_json, nranks):
    """Rank 0: write everything to ``tmp``, fsync, rename over ``path``, fsync the dir."""
    h5py = _h5()
    from . import __version__
    datasets = {}
    with atomic_path(path, tmp, make_folder=False):
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["meta"] = meta_json
            f.attrs["nranks"] = int(nranks)
            f.attrs["distconv_version"] = __version__
            g = f.create_group("model")
            g.attrs["keys"] = json.dumps(list(model_sd))
            for k, a in model_sd.items():
                _put(f, tmp, datasets, "model/" + _escape(k), a)
            if opt_info is not None:
                g = f.create_group("optimizer")
                for k, v in opt_info.items():
                    g.attrs[k] = v
                for (i, k), a in opt_tensors.items():
                    _put(f, tmp, datasets, f"optimizer/{i}/{_escape(k)}", a)
            if sched_info is not None:
                g = f.create_group("scheduler")
                for k, v in sched_info.items():
                    g.attrs[k] = v
            f.attrs["checksum"] = _checksum(
                datasets, _header(meta_json, model_sd, opt_info, sched_info))
            f.flush()
        _fsync_path(tmp)
        if _before_rename is not None:
            _before_rename(tmp)
    _fsync_path(os.path.dirname(path) or ".", directory=True)


def save_checkpoint(path, model, optimizer=None, scheduler=None, meta: dict | None = None):
    """Collective: write model (and optimizer/scheduler) state and ``meta`` to ``path``.

    Every rank calls it with the same ``path``. ``meta``: a JSON-serialisable dict (step,
    epoch, loader position, RNG state, strategy text, ...); rank 0's is stored. The write
    is atomic: after a failure (on rank 0: unwritable directory, full disk, ...) every
    rank raises the same :class:`CheckpointError`, the previous file at ``path`` is intact
    and no temporary file is left.
    """
    comm = _comm_of(model)
    path = os.fspath(path)
    comm.check_same(path, "checkpoint path")
    path = os.path.abspath(path)
    # arguments: checked on every rank, agreed before any gathering
    meta_json, err = _run(lambda: json.dumps({} if meta is None else meta, sort_keys=True,
                                             allow_nan=True))
    if err is None and meta is not None and not isinstance(meta, dict):
        err = TypeError(f"save_checkpoint: meta must be a dict, got {type(meta).__name__}")
    elif err is not None:
        err = TypeError(f"save_checkpoint: meta is not JSON-serialisable: {err}")
    sched_info = None
    if err is None and scheduler is not None:
        sched_info, e = _run(_scheduler_record, scheduler)
        if e is not None:
            err = TypeError(f"save_checkpoint: scheduler state is not JSON-serialisable: {e}")
    if err is None and optimizer is not None:
        _, e = _run(json.dumps, optimizer.defaults)
        if e is not None:
            err = TypeError(f"save_checkpoint: optimizer defaults are not JSON-serialisable: "
                            f"{e}")
    _agree_error(comm, err)

    # collective: every rank gathers the global tensors
    model_sd = OrderedDict((str(k), np.asarray(to_numpy(v)))
                           for k, v in model.state_dict().items())
    opt_tensors, opt_info = (_optimizer_record(model, optimizer, comm) if optimizer is not None
                             else (None, None))

    err = None
    if comm.rank == 0:
        tmp = f"{path}.tmp-{os.getpid()}"
        _, e = _run(_write, path, tmp, model_sd, opt_tensors, opt_info, sched_info, meta_json,
                    comm.size)
        if e is not None:
            err = CheckpointError(f"cannot write checkpoint {path!r}: {type(e).__name__}: {e}")
            err.__cause__ = e
    _agree_error(comm, err)


# ------------------------------------------------------------------ reading
def _model_shapes(model) -> "OrderedDict[str, tuple]":
    """The model's state-dict keys and global shapes, without any communication."""
    if hasattr(model, "named_parameters") and hasattr(model, "named_buffers"):
        out = OrderedDict()
        for n, p in model.named_parameters():
            out[n] = tuple(p.shape)
        for n, b in model.named_buffers():
            out[n] = tuple(b.shape)
        return out
    return OrderedDict((k, tuple(np.shape(v))) for k, v in model.state_dict().items())


def _check_model(path, c: _Contents, model) -> None:
    own = _model_shapes(model)
    missing = [k for k in own if k not in c.model]
    unexpected = [k for k in c.model if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(c.model[k].shape)}, model {own[k]}"
                  for k in own if k in c.model and tuple(c.model[k].shape) != own[k]]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if mismatched:
            parts.append(f"mismatched shapes [{'; '.join(mismatched)}]")
        raise ValueError(f"checkpoint {path!r} does not fit this model (a different "
                         f"architecture?): " + ", ".join(parts))


def _check_optimizer(path, c: _Contents, optimizer) -> None:
    if c.opt_info is None:
        raise ValueError(f"checkpoint {path!r} holds no optimizer state; pass optimizer=None "
                         f"to load the model only")
    cls = c.opt_info["class"]
    if cls != type(optimizer).__name__:
        raise ValueError(f"checkpoint {path!r} holds {cls} state, but the optimizer is a "
                         f"{type(optimizer).__name__}")
    params = json.loads(c.opt_info["params"])
    if len(params) != len(optimizer.params):
        raise ValueError(f"checkpoint {path!r}: the optimizer had {len(params)} parameters, "
                         f"this one has {len(optimizer.params)}")
    bad = [f"parameter {i} ({n or '?'}): checkpoint {tuple(s)}, optimizer {tuple(p.shape)}"
           for i, ((n, s), p) in enumerate(zip(params, optimizer.params))
           if tuple(s) != tuple(p.shape)]
    bad += [f"state {k!r} of parameter {i}: shape {tuple(a.shape)}, parameter "
            f"{tuple(optimizer.params[i].shape)}"
            for (i, k), a in c.opt.items()
            if not (0 <= i < len(optimizer.params))
            or tuple(a.shape) != tuple(optimizer.params[i].shape)]
    if bad:
        raise ValueError(f"checkpoint {path!r}: optimizer state does not fit: "
                         + "; ".join(bad))


def _check_scheduler(path, c: _Contents, scheduler) -> None:
    if c.sched_info is None:
        raise ValueError(f"checkpoint {path!r} holds no scheduler state; pass scheduler=None")
    cls = c.sched_info["class"]
    if cls != type(scheduler).__name__:
        raise ValueError(f"checkpoint {path!r} holds {cls} scheduler state, but the scheduler "
                         f"is a {type(scheduler).__name__}")


def load_checkpoint(path, model, optimizer=None, scheduler=None) -> dict:
    """Collective: restore ``model`` (and optimizer/scheduler) from ``path``; returns meta.

    Works for any number of ranks and any strategy: each rank keeps its shard of the
    global tensors. Every rank validates the file and the ranks agree before anything
    changes: a missing file raises :class:`CheckpointNotFoundError`; a file that is not
    HDF5, truncated, or of an unknown ``format_version`` :class:`CheckpointError`; a
    checksum mismatch :class:`CheckpointCorruptError`; a checkpoint of another model
    (keys or shapes differ) or an incompatible optimizer/scheduler ``ValueError``.
    The optimizer's ``lr`` and ``step_count`` are restored (its other hyperparameters
    are the constructor's); the scheduler's state is loaded last.
    """
    comm = _comm_of(model)
    path = os.path.abspath(os.fspath(path))
    c, err = _run(_read, path)
    if err is None and _after_read is not None:
        _, err = _run(_after_read, path, c)
    _agree_error(comm, err)

    def check():
        _check_model(path, c, model)
        if optimizer is not None:
            _check_optimizer(path, c, optimizer)
        if scheduler is not None:
            _check_scheduler(path, c, scheduler)
    _, err = _run(check)
    _agree_error(comm, err)
    # every rank must have read the same contents (not, say, a stale copy of the file on a
    # node-local disk): the stored checksum, verified above against the data each rank
    # read, is compared across ranks, so the loads below need no further checks
    sums = comm.allgather_obj((c.checksum, path)) if comm.size > 1 else [(c.checksum, path)]
    if any(s != sums[0][0] for s, _ in sums):
        detail = "; ".join(f"rank {r}: {p!r} checksum {s[:12]}" for r, (s, p) in
                           enumerate(sums))
        raise CheckpointError(f"the ranks read different checkpoint contents ({detail}); "
                              f"every rank must load the same file, else replicas would "
                              f"diverge")

    # collective from here on: every rank cuts its shards out of the same global arrays
    from .nn.module import Module
    if isinstance(model, Module):  # values already agreed: the file's checksum was compared
        model.load_state_dict(c.model, strict=True, check_values=False)
    else:
        model.load_state_dict(c.model)
    if optimizer is not None:
        from .tensor import DistTensor
        xp = get_xp()
        items = []
        for (i, k), a in c.opt.items():
            p = optimizer.params[i]
            arr = xp.asarray(a.astype(p.data.dtype, copy=False))
            items.append((i, k, DistTensor.from_global(arr, p.data.distribution, check=False)))
        optimizer.load_state_tensors(items, c.opt_info["step_count"], check=False)
        optimizer.lr = c.opt_info["lr"]
    if scheduler is not None:
        scheduler.load_state_dict(json.loads(c.sched_info["state"]))
    return c.meta


def checkpoint_info(path, verify: bool = False) -> dict:
    """What a checkpoint holds, for tools (no MPI; reads only attributes unless ``verify``).

    Returns ``{"path", "format_version", "meta", "keys" (model state-dict keys),
    "shapes" ({key: shape}), "dtypes" ({key: dtype str}), "optimizer" (class, step_count,
    lr, defaults, state keys; or None), "scheduler" (class, state; or None), "nranks"
    (of the job that saved it), "checksum"}``; with ``verify`` the checksum is checked
    (:class:`CheckpointCorruptError` on mismatch) and ``"verified": True`` is added.
    Raises the same errors as :func:`load_checkpoint` for unreadable files.
    """
    path = os.path.abspath(os.fspath(path))
    c = _read(path, data=verify, verify=verify)
    shapes, dtypes = OrderedDict(), OrderedDict()
    if verify:
        for k, a in c.model.items():
            shapes[k], dtypes[k] = tuple(a.shape), a.dtype.str
    else:
        try:
            with _open_read(path) as f:
                for k in c.model_keys:
                    ds = f["model/" + _escape(k)]
                    shapes[k], dtypes[k] = tuple(ds.shape), ds.dtype.str
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read checkpoint {path!r}: {type(e).__name__}: "
                                  f"{e}") from e
    try:
        opt = None
        if c.opt_info is not None:
            opt = {"class": c.opt_info["class"], "step_count": c.opt_info["step_count"],
                   "lr": c.opt_info["lr"], "defaults": json.loads(c.opt_info["defaults"]),
                   "state_keys": [tuple(x) for x in json.loads(c.opt_info["state_keys"])]}
        sched = None
        if c.sched_info is not None:
            sched = {"class": c.sched_info["class"],
                     "state": json.loads(c.sched_info["state"])}
        meta = c.meta if verify else json.loads(c.meta_json)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointCorruptError(f"checkpoint {path!r} is corrupt (cannot decode its "
                                     f"attributes: {type(e).__name__}: {e})") from e
    out = {"path": path, "format_version": c.version, "meta": meta,
           "keys": list(c.model_keys), "shapes": dict(shapes), "dtypes": dict(dtypes),
           "optimizer": opt, "scheduler": sched, "nranks": c.nranks, "checksum": c.checksum}
    if verify:
        out["verified"] = True
    return out
