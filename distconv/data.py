"""HDF5 datasets read in blocks: each rank reads only the samples, channels, rows and
columns it holds.

File layout: a dataset ``images`` (N×C×H×W, float16/32/64 or uint8) and a dataset
``labels`` (N, integers in ``[0, num_classes)``). ``num_classes`` is taken from the
argument, else from an integer attribute ``num_classes`` on ``labels`` or on the file,
else ``max(labels) + 1``.

:class:`H5Dataset` opens the file read-only on every rank with plain h5py (no MPI-IO:
each rank opens it itself) and checks it on every rank; the ranks then agree, so a
missing, corrupt or truncated file, a missing ``images``/``labels`` dataset, a wrong
shape or dtype, mismatched lengths or labels out of range raise the same error (naming
the file and the problem) on every rank instead of hanging the others.

The loader (:class:`DistLoader`, :mod:`distconv.loader`) and the files' writers
(:mod:`distconv.datafiles`) are re-exported here.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from . import comm as _comm
from .errors import DatasetKeyError, _agree_error

__all__ = ["H5Dataset", "DistLoader", "ReadRecord", "DatasetKeyError", "make_digits",
           "ensure_digits", "make_synthetic", "write_h5_dataset", "DIGITS_FILES"]


# --------------------------------------------------------------------------- dataset

def _h5_open(p):
    """``h5py.File(p, "r")`` (without file locks where the file system has none); the
    errors say what is wrong with the file."""
    import h5py
    if not os.path.exists(p):
        raise FileNotFoundError(f"HDF5 dataset file {p!r} does not exist")
    if os.path.isdir(p):
        raise OSError(f"HDF5 dataset file {p!r} is a directory, not a file")
    try:
        try:
            return h5py.File(p, "r")
        except OSError as e:  # a file system without locks (some parallel ones)
            if "lock" not in str(e).lower():
                raise
            return h5py.File(p, "r", locking=False)
    except Exception as e:
        text = str(e)
        low = text.lower()
        if "truncated" in low:
            what = "the file is truncated (an incomplete copy or an interrupted write?)"
        elif "signature" in low:
            what = "not an HDF5 file (corrupt, or another format)"
        else:
            what = "cannot open it"
        raise OSError(f"cannot open HDF5 dataset file {p!r}: {what} [h5py: {text}]") \
            from None


def _checked_datasets(f, p, ik, lk):
    """``(images, labels)`` datasets of file ``f`` (path ``p``), checked: present, 4-d
    float or uint8 images, 1-d integer labels, as many of each."""
    import h5py
    have = sorted(f.keys())
    for key, what in ((ik, "images"), (lk, "labels")):
        if key not in f:
            raise DatasetKeyError(f"HDF5 dataset file {p!r} has no {what} dataset {key!r} "
                                  f"(it has: {', '.join(have) or 'nothing'})")
        if not isinstance(f[key], h5py.Dataset):
            raise ValueError(f"HDF5 dataset file {p!r}: {key!r} is a "
                             f"{type(f[key]).__name__}, not a dataset")
    img, lab = f[ik], f[lk]
    if img.ndim != 4:
        raise ValueError(f"HDF5 dataset file {p!r}: images {ik!r} must be 4-d "
                         f"(N, C, H, W), got shape {img.shape}")
    dt = img.dtype
    if not (dt.kind == "f" or dt == np.uint8):
        raise ValueError(f"HDF5 dataset file {p!r}: images {ik!r} must be float or uint8, "
                         f"got {dt}")
    if lab.ndim != 1:
        raise ValueError(f"HDF5 dataset file {p!r}: labels {lk!r} must be 1-d (N,), got "
                         f"shape {lab.shape}")
    if lab.dtype.kind not in "iu":
        raise ValueError(f"HDF5 dataset file {p!r}: labels {lk!r} must be integers, got "
                         f"{lab.dtype}")
    if lab.shape[0] != img.shape[0]:
        raise ValueError(f"HDF5 dataset file {p!r}: images {ik!r} has {img.shape[0]} samples "
                         f"but labels {lk!r} has {lab.shape[0]}")
    return img, lab


def _num_classes(f, lab, labels, num_classes, p, lk) -> int:
    """The class count: ``num_classes``, else the file's ``num_classes`` attribute (on the
    labels or the file), else max label + 1; every label checked against it."""
    if num_classes is None:
        for obj in (lab, f):
            v = obj.attrs.get("num_classes")
            if v is not None:
                num_classes = int(np.asarray(v).item())
                break
        source = "the file's num_classes attribute"
    else:
        source = "num_classes"
    if num_classes is None:
        if labels.size and labels.min() < 0:
            i = int(np.argmin(labels))
            raise ValueError(f"HDF5 dataset file {p!r}: labels {lk!r} must be >= 0, got "
                             f"labels[{i}] = {labels[i]}")
        return int(labels.max()) + 1 if labels.size else 0
    if int(num_classes) < 1:
        raise ValueError(f"HDF5 dataset file {p!r}: {source} must be >= 1, got "
                         f"{num_classes}")
    num_classes = int(num_classes)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"HDF5 dataset file {p!r}: labels {lk!r} must be in "
                         f"[0, {num_classes}) ({source}), but {bad.size} are not "
                         f"(first: labels[{i}] = {labels[i]})")
    return num_classes


class H5Dataset:
    """``H5Dataset(path, images="images", labels="labels", num_classes=None, comm=None)``.

    Opens ``path`` read-only on every rank of ``comm`` (default: world) and checks it;
    raises the same ``FileNotFoundError`` / ``OSError`` (unreadable, not HDF5, truncated),
    :class:`DatasetKeyError` (a ``KeyError``: missing dataset) or ``ValueError`` (bad
    shape, dtype, lengths or labels) on every rank, its message naming the file.

    Attributes: ``path``, ``shape`` (N, C, H, W), ``sample_shape`` = ``image_shape``
    (C, H, W), ``dtype``
    (of the stored images), ``labels`` (all N labels, int64, in memory), ``num_classes``,
    ``images`` (the h5py dataset). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path, images: str = "images", labels: str = "labels",
                 num_classes: Optional[int] = None, comm=None):
        self.comm = _comm.wrap(comm)
        self.path = os.fspath(path)
        self.images_key, self.labels_key = images, labels
        self.file = None
        err = None
        try:
            self._open(num_classes)
        except (OSError, KeyError, ValueError, TypeError) as e:
            err = e
        except Exception as e:  # h5py/HDF5 errors of other kinds: still agreed on
            err = OSError(f"cannot read HDF5 dataset file {self.path!r}: "
                          f"{type(e).__name__}: {e}")
        try:
            _agree_error(self.comm, err)
        except BaseException:
            self.close()
            raise

    def _open(self, num_classes):
        self.file = _h5_open(self.path)
        img, lab = _checked_datasets(self.file, self.path, self.images_key, self.labels_key)
        n = img.shape[0]
        try:
            labels = np.asarray(lab[()], dtype=np.int64) if n else np.zeros(0, np.int64)
            if n and img.size:  # touch both ends of the images: catches damaged storage
                img[0, 0, 0, 0]
                img[n - 1, -1, -1, -1]
        except Exception as e:
            raise OSError(f"cannot read HDF5 dataset file {self.path!r} (damaged?): "
                          f"{type(e).__name__}: {e}") from None
        self.images = img
        self.labels = labels
        self.num_classes = _num_classes(self.file, lab, labels, num_classes, self.path,
                                        self.labels_key)
        self.shape = tuple(int(s) for s in img.shape)
        self.sample_shape = self.shape[1:]
        self.dtype = np.dtype(img.dtype)

    # ------------------------------------------------------------- access
    def __len__(self) -> int:
        return self.shape[0]

    @property
    def image_shape(self) -> tuple:
        """``(C, H, W)`` of one image (same as ``sample_shape``)."""
        return self.sample_shape

    def read_block(self, rows, channels=None, height=None, width=None) -> np.ndarray:
        """Images ``rows`` (ascending, no repeats) × the given ``(start, stop)`` ranges of
        C, H, W (``None``: all), in the stored dtype, with one h5py read (none when empty)."""
        rows = np.asarray(rows, dtype=np.int64)
        rngs = [(0, s) if r is None else (int(r[0]), int(r[1]))
                for r, s in zip((channels, height, width), self.sample_shape)]
        shape = (rows.size,) + tuple(e - s for s, e in rngs)
        if rows.size == 0 or any(e <= s for s, e in rngs):
            return np.empty(shape, self.dtype)
        if rows.size > 1 and np.any(np.diff(rows) <= 0):
            raise ValueError("read_block: rows must be ascending without repeats")
        sl = tuple(slice(s, e) for s, e in rngs)
        if rows[-1] - rows[0] + 1 == rows.size:  # one contiguous run: a plain slice
            out = self.images[(slice(int(rows[0]), int(rows[-1]) + 1),) + sl]
        else:
            out = self.images[(rows,) + sl]
        return np.asarray(out)

    def close(self) -> None:
        """Close the file (idempotent)."""
        f, self.file = self.file, None
        if f is not None:
            try:
                f.close()
            except Exception:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        shape = getattr(self, "shape", None)
        return (f"H5Dataset({self.path!r}, shape={shape}, "
                f"num_classes={getattr(self, 'num_classes', None)})")


# --------------------------------------------------------------------------- loader


# the loader and the writers live in their own modules; this one is their public home
from .datafiles import (DIGITS_FILES, ensure_digits, make_digits,  # noqa: E402,F401
                        make_synthetic, write_h5_dataset)
from .loader import DistLoader, ReadRecord  # noqa: E402,F401
