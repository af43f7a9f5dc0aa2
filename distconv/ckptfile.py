"""The checkpoint file of :mod:`distconv.checkpoint`: its layout, checksum and reading.

File layout (``format_version`` 1)::

    /                  attrs: format_version (1), checksum (sha256 hex), meta (JSON),
                              nranks (of the saving job), distconv_version
    /model/<key>       one dataset per ``model.state_dict()`` key ('%' and '/' in a key
                       are written as %25 and %2F); attr keys: JSON list in state-dict order
    /optimizer/<i>/<k> global state tensor k (e.g. momentum_buffer, exp_avg) of parameter i;
                       attrs: class, step_count, lr, defaults (JSON), params (JSON list of
                       [model name or "", shape]), state_keys (JSON list of [i, k])
    /scheduler         attrs: class, state (JSON of ``scheduler.state_dict()``)

The checksum is a SHA-256 over every dataset (sorted by full name: name, dtype, shape,
bytes) followed by a canonical JSON header of the attributes that load reads (meta,
model keys, optimizer and scheduler attributes), so any change to data the loader uses
is detected.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict

import numpy as np

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read, or is not a usable distconv checkpoint."""


class CheckpointCorruptError(CheckpointError):
    """The checkpoint's contents do not match its checksum (or cannot be decoded)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the path (also a ``FileNotFoundError``)."""


def _escape(key: str) -> str:
    """A state-dict key as one HDF5 link name (no '/'; '.' is fine)."""
    return key.replace("%", "%25").replace("/", "%2F")


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def _checksum(datasets, header: dict) -> str:
    """SHA-256 over ``datasets`` ({full name: array}, sorted by name) then the header."""
    h = hashlib.sha256()
    for name in sorted(datasets):
        a = np.ascontiguousarray(datasets[name])
        h.update(name.encode("utf-8") + b"\0")
        h.update(f"{a.dtype.str}{tuple(a.shape)}".encode() + b"\0")
        h.update(a.reshape(-1).view(np.uint8).data)
    h.update(b"header\0" + _canon(header).encode("utf-8"))
    return h.hexdigest()


def _header(meta_json, model_keys, opt, sched) -> dict:
    return {"format_version": FORMAT_VERSION, "meta": meta_json, "model_keys": list(model_keys),
            "optimizer": opt, "scheduler": sched}


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open directories; nothing more to do
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # fsync of a directory is unsupported on some filesystems
            raise
    finally:
        os.close(fd)


def _h5():
    import h5py
    return h5py


def _open_read(path: str):
    h5py = _h5()
    try:
        return h5py.File(path, "r", locking=False)
    except TypeError:  # HDF5 older than 1.12.1: no locking argument
        return h5py.File(path, "r")


class _Contents:
    """Everything read from a checkpoint file (global numpy arrays and decoded attrs)."""

    def __init__(self):
        self.version = None
        self.meta = {}
        self.meta_json = "{}"
        self.model = OrderedDict()          # key -> array
        self.model_keys = []
        self.opt_info = None                # dict of attrs as stored, or None
        self.opt = {}                       # (i, key) -> array
        self.sched_info = None
        self.checksum = None
        self.nranks = None


def _attr_str(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _read(path: str, data: bool = True, verify: bool = True) -> _Contents:
    """Read and check a checkpoint (no MPI). Raises CheckpointError and subclasses."""
    h5py = _h5()
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a file")
    try:
        is_h5 = h5py.is_hdf5(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e}") from e
    if not is_h5:
        raise CheckpointError(f"checkpoint {path!r} is not an HDF5 file (wrong format or "
                              f"damaged header)")
    try:
        f = _open_read(path)
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint {path!r} (truncated or damaged HDF5 "
                              f"file?): {e}") from e
    c = _Contents()
    try:
        with f:
            if "format_version" not in f.attrs:
                raise CheckpointError(f"{path!r} is not a distconv checkpoint (no "
                                      f"format_version attribute)")
            try:
                c.version = int(f.attrs["format_version"])
            except (TypeError, ValueError):
                c.version = None
            if c.version != FORMAT_VERSION:
                v = f.attrs["format_version"]
                v = v.item() if hasattr(v, "item") else v
                raise CheckpointError(
                    f"checkpoint {path!r} has format_version {v!r}; "
                    f"this distconv reads version {FORMAT_VERSION} only")
            c.meta_json = _attr_str(f.attrs.get("meta", "{}"))
            c.checksum = _attr_str(f.attrs.get("checksum", ""))
            c.nranks = int(f.attrs["nranks"]) if "nranks" in f.attrs else None
            if "model" not in f:
                raise CheckpointCorruptError(f"checkpoint {path!r} is corrupt (no model group)")
            c.model_keys = json.loads(_attr_str(f["model"].attrs.get("keys", "[]")))
            if "optimizer" in f:
                c.opt_info = {k: (_attr_str(v) if isinstance(v, (str, bytes)) else v)
                              for k, v in f["optimizer"].attrs.items()}
                c.opt_info["step_count"] = int(c.opt_info["step_count"])
                c.opt_info["lr"] = float(c.opt_info["lr"])
                c.opt_info = {k: c.opt_info[k] for k in sorted(c.opt_info)}
            if "scheduler" in f:
                c.sched_info = {k: _attr_str(v) for k, v in f["scheduler"].attrs.items()}
            if not data and not verify:
                return c
            names = []
            f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            arrays = {n: np.asarray(f[n][()]) for n in names}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py raises OSError, KeyError, ValueError...
        raise CheckpointError(f"cannot read checkpoint {path!r} (truncated or corrupt "
                              f"file?): {type(e).__name__}: {e}") from e
    if verify:
        header = _header(c.meta_json, c.model_keys, c.opt_info, c.sched_info)
        if _checksum(arrays, header) != c.checksum:
            raise CheckpointCorruptError(f"checkpoint {path!r} is corrupt (checksum mismatch)")
    try:
        c.meta = json.loads(c.meta_json)
        for k in c.model_keys:
            c.model[k] = arrays["model/" + _escape(k)]
        if c.opt_info is not None:
            for i, k in json.loads(c.opt_info["state_keys"]):
                c.opt[(int(i), str(k))] = arrays[f"optimizer/{int(i)}/{_escape(k)}"]
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointCorruptError(f"checkpoint {path!r} is corrupt (inconsistent "
                                     f"contents: {type(e).__name__}: {e})") from e
    return c


# ------------------------------------------------------------------ loading
