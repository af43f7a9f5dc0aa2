"""Writers of :class:`distconv.data.H5Dataset` files.

Also here: :func:`make_digits` / :func:`ensure_digits` (scikit-learn's bundled 8×8
handwritten digits as train/test files) and :func:`make_synthetic` (random data of any
shape, written block by block), both written atomically (temp file + ``os.replace``).
``scripts/make_dataset.py`` is their command line.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np

from . import comm as _comm
from .atomic import atomic_path
from .errors import _agree_error

DIGITS_FILES = ("digits_train.h5", "digits_test.h5")


def _atomic_h5(path, fill: Callable) -> str:
    """Write an HDF5 file through a temp file in the same folder, then ``os.replace``."""
    import h5py
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            fill(f)
    return path


def write_h5_dataset(path, images: np.ndarray, labels: np.ndarray,
                     num_classes: Optional[int] = None, attrs: Optional[dict] = None) -> str:
    """Write ``images`` (N, C, H, W) and ``labels`` (N,) to ``path`` atomically."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"write_h5_dataset: need images (N, C, H, W) and labels (N,), got "
                         f"{images.shape} and {labels.shape}")

    def fill(f):
        f.create_dataset("images", data=images)
        d = f.create_dataset("labels", data=labels.astype(np.int64))
        if num_classes is not None:
            d.attrs["num_classes"] = int(num_classes)
            f.attrs["num_classes"] = int(num_classes)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v

    return _atomic_h5(path, fill)


def make_digits(out_dir, seed: int = 0, test_size: int = 360) -> tuple:
    """Write scikit-learn's bundled 1,797 8×8 handwritten digits as float32 N×1×8×8 images
    in [0, 1] (pixel / 16) with int64 labels 0..9, split by a seeded stratified split
    (1,437 train / 360 test by default) into ``out_dir/digits_train.h5`` and
    ``out_dir/digits_test.h5``. Returns ``(train_path, test_path)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=seed,
                                          stratify=y)
    out = []
    for name, xs, ys, part in ((DIGITS_FILES[0], xtr, ytr, "train"),
                               (DIGITS_FILES[1], xte, yte, "test")):
        attrs = {"source": "sklearn.datasets.load_digits (UCI optdigits), pixel/16",
                 "split": part, "seed": int(seed)}
        out.append(write_h5_dataset(os.path.join(os.fspath(out_dir), name),
                                    np.ascontiguousarray(xs), ys, num_classes=10, attrs=attrs))
    return tuple(out)


def ensure_digits(out_dir, seed: int = 0, comm=None) -> tuple:
    """:func:`make_digits` on rank 0 of ``comm`` unless both files exist; every rank gets
    ``(train_path, test_path)`` or the same error. Collective."""
    c = _comm.wrap(comm)
    paths = tuple(os.path.join(os.fspath(out_dir), n) for n in DIGITS_FILES)
    err = None
    if c.rank == 0 and not all(os.path.exists(p) for p in paths):
        try:
            make_digits(out_dir, seed=seed)
        except Exception as e:
            err = OSError(f"cannot write the digits data to {os.fspath(out_dir)!r}: "
                          f"{type(e).__name__}: {e}")
    _agree_error(c, err)
    return paths


def make_synthetic(path, shape: Sequence[int], classes: int, seed: int = 0,
                   dtype="float32", block_bytes: int = 64 << 20) -> str:
    """Write random images of ``shape`` (N, C, H, W) (float32 uniform in [0, 1), or uint8)
    and random labels in ``[0, classes)`` to ``path``, atomically. Written in blocks of
    about ``block_bytes`` so ImageNet-sized files never sit in memory whole. Block ``k``
    is drawn from ``default_rng([seed, k])``: the data depend only on ``shape``, ``dtype``,
    ``classes``, ``seed`` and ``block_bytes``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or any(s < 1 for s in shape):
        raise ValueError(f"make_synthetic: shape must be 4 positive integers N,C,H,W, got "
                         f"{shape}")
    classes = int(classes)
    if classes < 1:
        raise ValueError(f"make_synthetic: classes must be >= 1, got {classes}")
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.uint8)):
        raise ValueError(f"make_synthetic: dtype must be float32 or uint8, got {dt}")
    n = shape[0]
    per = int(np.prod(shape[1:])) * dt.itemsize
    rows = max(1, min(n, int(block_bytes) // max(per, 1)))

    def fill(f):
        img = f.create_dataset("images", shape=shape, dtype=dt)
        lab = f.create_dataset("labels", shape=(n,), dtype=np.int64)
        for k, start in enumerate(range(0, n, rows)):
            stop = min(n, start + rows)
            rng = np.random.default_rng([int(seed), k])
            lab[start:stop] = rng.integers(0, classes, stop - start)
            if dt == np.uint8:
                img[start:stop] = rng.integers(0, 256, (stop - start,) + shape[1:],
                                               dtype=np.uint8)
            else:
                img[start:stop] = rng.random((stop - start,) + shape[1:], dtype=np.float32)
        lab.attrs["num_classes"] = classes
        f.attrs["num_classes"] = classes
        f.attrs["source"] = f"distconv.data.make_synthetic(seed={int(seed)})"

    return _atomic_h5(path, fill)
