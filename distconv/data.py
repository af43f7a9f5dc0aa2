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

:class:`DistLoader` yields global mini-batches ``(x, labels)``: ``x`` a
:class:`~distconv.tensor.DistTensor` in the input distribution of the first layer
(N split over ``sample``, C over ``(channel, filter)``, and for a spatial strategy H over
``height`` and W over ``width``), ``labels`` the int64 labels of the whole global batch on
every rank (CrossEntropyLoss wants global labels; they are tiny and read once, when the
dataset opens). For each batch a rank reads exactly ``distribution.box(batch_shape)``: its
floor+1 block of the batch's samples and, when C, H or W is split, only its channels, rows
and columns (one hyperslab; a rank of a ``height=2`` layout reads half of each image).

Reading shuffled samples: the global order is ``np.random.default_rng(seed + epoch)
.permutation(N)`` (``arange(N)`` without shuffle), the same on every rank without any
communication. A rank's samples in a batch are not contiguous in the file, so it sorts
them and reads them with ONE h5py hyperslab selection, ``images[sorted_rows, c0:c1,
h0:h1, w0:w1]`` (h5py fancy indexing; a plain slice when the rows form one contiguous
run), then puts the rows back in batch order. One selection of k rows costs about as
much as k single-row reads would cost in HDF5 alone, without k Python round trips (about
5x faster than a read per row at 1,000 rows). What was read is kept in
:attr:`DistLoader.last_read` (a :class:`ReadRecord`).

Position and resume: the loader's position is ``(epoch, batch)``, ``batch`` being how
many batches of ``epoch`` it has yielded (it counts a batch as it yields it). Iterating
yields the rest of the epoch; iterating a finished epoch again repeats it (as PyTorch
does without ``set_epoch``). :meth:`DistLoader.state_dict` is where to continue (a
finished epoch saves as the start of the next), and ``set_epoch(e)`` keeps a position
inside epoch ``e``, so the PyTorch-style loop resumes mid-epoch as it is::

    loader.load_state_dict(saved)                  # on resume only
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)                    # keeps a restored mid-epoch position
        for x, y in loader:
            ...                                    # loader.state_dict() at any step

Also here: :func:`make_digits` / :func:`ensure_digits` (scikit-learn's bundled 8×8
handwritten digits as train/test files) and :func:`make_synthetic` (random data of any
shape, written block by block), both written atomically (temp file + ``os.replace``).
``scripts/make_dataset.py`` is their command line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from . import comm as _comm
from .atomic import atomic_path
from .backend import get_default_dtype, get_xp
from .distribution import Distribution
from .strategy import Strategy
from .tensor import DistTensor

__all__ = ["H5Dataset", "DistLoader", "ReadRecord", "DatasetKeyError", "make_digits",
           "ensure_digits", "make_synthetic", "write_h5_dataset", "DIGITS_FILES"]

DIGITS_FILES = ("digits_train.h5", "digits_test.h5")


class DatasetKeyError(KeyError):
    """A missing dataset in an HDF5 file (a ``KeyError`` whose message prints unquoted)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


_KINDS = {"FileNotFoundError": FileNotFoundError, "OSError": OSError,
          "DatasetKeyError": DatasetKeyError, "ValueError": ValueError,
          "TypeError": TypeError}


def _agree_error(comm, err: Optional[BaseException]) -> None:
    """Raise the same exception on every rank of ``comm`` if any rank has ``err``.

    The exception type is that of the lowest failing rank; the message is the one of
    :meth:`Communicator.agree` (the failing ranks and their messages).
    """
    kind = None
    if err is not None:
        kind = type(err).__name__ if type(err).__name__ in _KINDS else (
            "OSError" if isinstance(err, OSError) else "ValueError")
    kinds = comm.allgather_obj(kind) if comm.size > 1 else [kind]
    first = next((k for k in kinds if k is not None), None)
    if first is None:
        return
    comm.agree(err is None, "" if err is None else str(err), exc=_KINDS[first])


# --------------------------------------------------------------------------- dataset

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
        import h5py
        p, ik, lk = self.path, self.images_key, self.labels_key
        if not os.path.exists(p):
            raise FileNotFoundError(f"HDF5 dataset file {p!r} does not exist")
        if os.path.isdir(p):
            raise OSError(f"HDF5 dataset file {p!r} is a directory, not a file")
        try:
            try:
                self.file = h5py.File(p, "r")
            except OSError as e:  # a file system without locks (some parallel ones)
                if "lock" not in str(e).lower():
                    raise
                self.file = h5py.File(p, "r", locking=False)
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
        f = self.file
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
        n = img.shape[0]
        if lab.shape[0] != n:
            raise ValueError(f"HDF5 dataset file {p!r}: images {ik!r} has {n} samples but "
                             f"labels {lk!r} has {lab.shape[0]}")
        try:
            labels = np.asarray(lab[()], dtype=np.int64) if n else np.zeros(0, np.int64)
            if n and img.size:  # touch both ends of the images: catches damaged storage
                img[0, 0, 0, 0]
                img[n - 1, -1, -1, -1]
        except Exception as e:
            raise OSError(f"cannot read HDF5 dataset file {p!r} (damaged?): "
                          f"{type(e).__name__}: {e}") from None
        if num_classes is None:
            for obj in (lab, f):
                v = obj.attrs.get("num_classes")
                if v is not None:
                    num_classes = int(np.asarray(v).item())
                    break
            source = "the file's num_classes attribute"
        else:
            source = "num_classes"
        if num_classes is not None:
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
        else:
            if n and labels.min() < 0:
                i = int(np.argmin(labels))
                raise ValueError(f"HDF5 dataset file {p!r}: labels {lk!r} must be >= 0, got "
                                 f"labels[{i}] = {labels[i]}")
            num_classes = int(labels.max()) + 1 if n else 0
        self.images = img
        self.labels = labels
        self.num_classes = num_classes
        self.shape = tuple(int(s) for s in img.shape)
        self.sample_shape = self.shape[1:]
        self.dtype = np.dtype(dt)

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

@dataclass(frozen=True)
class ReadRecord:
    """What one rank read for one batch (see :attr:`DistLoader.last_read`).

    ``rows``: the file indices read, ascending: the sample coordinates of the hyperslab.
    ``positions``: ``(start, stop)`` of this rank's block within the batch; batch
    position ``start + k`` holds file row ``order[k]``, i.e. ``rows`` put back in batch
    order. ``channels``, ``height``, ``width``: the ``(start, stop)`` ranges read.
    ``calls``: h5py read calls (0 when the block is empty, else 1). ``nbytes``: bytes read.
    """

    epoch: int
    batch: int
    positions: tuple
    rows: np.ndarray = field(repr=False)
    order: np.ndarray = field(repr=False)
    channels: tuple
    height: tuple
    width: tuple
    calls: int
    nbytes: int


def _resolve_distribution(spec) -> Distribution:
    if spec is None:
        spec = Strategy()
    if isinstance(spec, str):
        spec = Strategy.parse(spec)
    if isinstance(spec, Strategy):
        return spec.activation_distribution(4)
    if isinstance(spec, Distribution):
        return spec
    d = getattr(spec, "input_distribution", None)
    if isinstance(d, Distribution):
        return d
    raise TypeError(f"DistLoader: distribution must be a Distribution, a Strategy, a strategy "
                    f"string or a layer with an input_distribution, got {type(spec).__name__}")


class DistLoader:
    """``DistLoader(dataset, batch_size, distribution=None, shuffle=True, seed=0,
    drop_last=False, *, check_reads=True, on_read=None)``.

    ``distribution``: where the batches go: a 4-d :class:`Distribution` (typically the
    first layer's ``input_distribution``), a :class:`Strategy` or strategy string (its
    ``activation_distribution(4)``), a layer with an ``input_distribution``, or ``None``
    (data parallel on all ranks). Iterating yields ``(x, labels)`` for the rest of the
    current epoch: ``x`` a DistTensor of global shape ``(b, C, H, W)`` (``b = batch_size``
    except for a partial last batch) in that distribution, dtype
    :func:`distconv.get_default_dtype` (uint8 images scaled to [0, 1]), on the backend's
    device; ``labels`` the int64 labels of the whole batch, a NumPy array on every rank.

    ``check_reads``: the ranks agree after each read (one small allgather), so an I/O
    error on one rank raises on all. ``on_read(record)``: called with each
    :class:`ReadRecord`. The configuration is checked to be the same on every rank.
    """

    def __init__(self, dataset: H5Dataset, batch_size: int, distribution=None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, *,
                 check_reads: bool = True,
                 on_read: Optional[Callable[[ReadRecord], None]] = None):
        err, dist = None, None
        try:
            dist = _resolve_distribution(distribution)
        except (TypeError, ValueError) as e:
            err = e
        comm = dist.grid.comm if dist is not None else _comm.world()
        if err is None:
            err = self._check_args(dataset, batch_size, dist, seed)
        _agree_error(comm, err)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.distribution = dist
        self.comm = comm
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.check_reads = bool(check_reads)
        self.on_read = on_read
        comm.check_same((self.batch_size, self.shuffle, self.seed, self.drop_last,
                         tuple(dataset.shape), repr(dist)), "DistLoader configuration "
                        "(batch_size, shuffle, seed, drop_last, dataset shape, distribution)")
        self.epoch = 0
        self.batch = 0
        self.last_read: Optional[ReadRecord] = None
        self.bytes_read = 0
        self._order_cache = (None, None)

    @staticmethod
    def _check_args(dataset, batch_size, dist, seed):
        if not isinstance(dataset, H5Dataset) or getattr(dataset, "file", None) is None:
            return TypeError(f"DistLoader: dataset must be an open H5Dataset, got {dataset!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            return ValueError(f"DistLoader: batch_size must be a positive integer, got "
                              f"{batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            return ValueError(f"DistLoader: seed must be an integer, got {seed!r}")
        if dist.ndim != 4:
            return ValueError(f"DistLoader: the distribution must be 4-d (N, C, H, W), got "
                              f"{dist}")
        if dist.pending:
            return ValueError(f"DistLoader: the input distribution cannot be a pending sum: "
                              f"{dist}")
        return None

    # ------------------------------------------------------------- geometry
    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def num_batches(self) -> int:
        """Batches per epoch (the partial last one counts unless ``drop_last``)."""
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __len__(self) -> int:
        return self.num_batches

    def batch_shape(self, batch: int) -> tuple:
        """Global shape ``(b, C, H, W)`` of batch ``batch`` (same on every rank)."""
        start = batch * self.batch_size
        b = max(0, min(self.batch_size, self.num_samples - start))
        return (b,) + tuple(self.dataset.sample_shape)

    def order(self, epoch: int) -> np.ndarray:
        """The global sample order of ``epoch``: ``default_rng(seed + epoch).permutation(N)``
        with shuffle, else ``arange(N)``; identical on every rank."""
        key, cached = self._order_cache
        if key == epoch and cached is not None:
            return cached
        n = self.num_samples
        if self.shuffle:
            order = np.random.default_rng(self.seed + int(epoch)).permutation(n)
        else:
            order = np.arange(n)
        order = order.astype(np.int64, copy=False)
        self._order_cache = (epoch, order)
        return order

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """File indices of the samples of batch ``batch`` of ``epoch``, in batch order."""
        start = batch * self.batch_size
        return self.order(epoch)[start:start + self.batch_size]

    # ------------------------------------------------------------- position
    def position(self) -> tuple:
        """``(epoch, batch)``: ``batch`` batches of ``epoch`` have been yielded (counted as
        each is yielded, so it is ``len(loader)`` while the last batch is in use)."""
        return self.epoch, self.batch

    def set_epoch(self, epoch: int, batch: Optional[int] = None) -> None:
        """Make ``epoch`` the one the next iteration yields (its order is seeded by
        ``seed + epoch``). Without ``batch``: a position inside ``epoch`` that is not
        finished (restored by :meth:`load_state_dict`, or an iteration left early) is kept,
        otherwise the epoch starts at its first batch. ``batch``: start there."""
        epoch = int(epoch)
        nb = self.num_batches
        if batch is None:
            batch = self.batch if (epoch == self.epoch and self.batch < nb) else 0
        batch = int(batch)
        if epoch < 0 or not 0 <= batch <= nb:
            raise ValueError(f"DistLoader.set_epoch: position (epoch={epoch}, batch={batch}) "
                             f"is out of range: an epoch has {nb} batches")
        self.epoch, self.batch = epoch, batch

    def state_dict(self) -> dict:
        """Where to continue: ``epoch`` and ``batch`` (batches of it already done; a
        finished epoch is saved as ``(epoch + 1, 0)``), and the settings that fix the
        order. Plain ints and bools (fit for HDF5 attributes or JSON)."""
        epoch, batch = self.epoch, self.batch
        if self.num_batches and batch >= self.num_batches:
            epoch, batch = epoch + 1, 0
        return {"epoch": int(epoch), "batch": int(batch), "seed": self.seed,
                "shuffle": self.shuffle, "batch_size": self.batch_size,
                "drop_last": self.drop_last, "num_samples": self.num_samples}

    def load_state_dict(self, state) -> None:
        """Restore a position saved by :meth:`state_dict`. Raises the same ``ValueError`` on
        every rank if it does not fit this loader (other seed, batch size, dataset
        length...), is out of range, or differs between ranks."""
        err = None
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
            mine = self.state_dict()
            diff = [f"{k}: saved {state[k]!r}, loader {mine[k]!r}"
                    for k in ("seed", "shuffle", "batch_size", "drop_last", "num_samples")
                    if k in state and _plain(state[k]) != mine[k]]
            if diff:
                raise ValueError("DistLoader.load_state_dict: the saved position belongs to a "
                                 "different loader (" + "; ".join(diff) + ")")
            nb = self.num_batches
            if epoch < 0 or not 0 <= batch <= nb:
                raise ValueError(f"DistLoader.load_state_dict: position (epoch={epoch}, "
                                 f"batch={batch}) is out of range: an epoch has {nb} batches")
        except (KeyError, TypeError, ValueError) as e:
            err = e if isinstance(e, ValueError) else ValueError(
                f"DistLoader.load_state_dict: bad state {state!r}: {type(e).__name__}: {e}")
        _agree_error(self.comm, err)
        self.comm.check_same((epoch, batch), "DistLoader position (epoch, batch)")
        self.epoch, self.batch = epoch, batch

    # ------------------------------------------------------------- iteration
    def __iter__(self):
        """The rest of the current epoch (all of it again if it is finished)."""
        epoch, nb = self.epoch, self.num_batches
        if self.batch >= nb:
            self.batch = 0
        while self.epoch == epoch and self.batch < nb:
            b = self.batch
            out = self.get_batch(epoch, b)
            self.batch = b + 1
            yield out

    def get_batch(self, epoch: int, batch: int):
        """``(x, labels)`` of batch ``batch`` of ``epoch`` without moving the position."""
        nb = self.num_batches
        if not 0 <= batch < nb:
            raise ValueError(f"DistLoader: batch {batch} out of range (an epoch has {nb})")
        idx = self.batch_indices(epoch, batch)
        shape = self.batch_shape(batch)
        box = self.distribution.box(shape)
        (s0, s1), ch, hh, ww = box
        # a rank off a placed grid reads nothing (its block is shape-only)
        mine = idx[s0:s1] if self.distribution.grid.member else idx[:0]
        perm = np.argsort(mine, kind="stable")
        rows = mine[perm]
        local_shape = tuple(e - s for s, e in box)
        dtype = get_default_dtype()
        err, block = None, None
        try:
            block = self.dataset.read_block(rows, ch, hh, ww)
        except Exception as e:
            err = OSError(f"DistLoader: reading batch {batch} of epoch {epoch} from "
                          f"{self.dataset.path!r} failed: {type(e).__name__}: {e}")
        if self.check_reads:
            _agree_error(self.comm, err)
        elif err is not None:
            raise err
        out = np.empty(local_shape, dtype)
        out[perm] = block
        if self.dataset.dtype == np.uint8:
            out /= dtype.type(255)
        empty = rows.size == 0 or any(e <= s for s, e in box[1:])
        rec = ReadRecord(epoch=int(epoch), batch=int(batch), positions=(s0, s1),
                         rows=rows, order=mine.copy(), channels=ch, height=hh, width=ww,
                         calls=0 if empty else 1, nbytes=int(block.nbytes))
        self.last_read = rec
        self.bytes_read += rec.nbytes
        if self.on_read is not None:
            self.on_read(rec)
        xp = get_xp()
        x = DistTensor(xp.asarray(out), self.distribution, shape)
        return x, self.dataset.labels[idx].copy()

    def __repr__(self):
        return (f"DistLoader({self.dataset!r}, batch_size={self.batch_size}, "
                f"{self.distribution}, shuffle={self.shuffle}, seed={self.seed}, "
                f"position=(epoch={self.epoch}, batch={self.batch}))")


def _plain(v):
    """A numpy scalar (as read back from HDF5 attributes) as a Python int/bool."""
    if isinstance(v, np.generic):
        return v.item()
    return v


# --------------------------------------------------------------------------- writers

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
