"""The distributed mini-batch loader of :class:`distconv.data.H5Dataset` files.

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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from . import comm as _comm
from .backend import get_default_dtype, get_xp
from .errors import _agree_error
from .distribution import Distribution
from .strategy import Strategy
from .tensor import DistTensor

if TYPE_CHECKING:  # data imports this module
    from .data import H5Dataset


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
        from .data import H5Dataset  # data imports this module
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
