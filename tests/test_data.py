"""distconv.data: HDF5 datasets read block by block, DistLoader, dataset writers.

MPI cases (1-4 ranks, every (sample, channel, filter) factorisation of the rank count):
the union of what the ranks get equals the NumPy global batch computed here
independently (own permutation, own floor+1 block math); each rank's h5py access is
spied on, so the hyperslab it read is checked to be exactly its own block; partial last
batches, batches smaller than the sample groups, resume from a saved position, and bad
files / arguments that must raise the same error on every rank. Serial cases: the
make_dataset.py command line and the writers.
"""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

import distconv as dc
from distconv.datafiles import _atomic_h5
from distconv.data import (DIGITS_FILES, DatasetKeyError, DistLoader, H5Dataset,
                           ensure_digits, make_digits, make_synthetic, write_h5_dataset)
from distconv.distribution import Distribution
from distconv.strategy import Strategy
from tests.mpi_harness import REPO_ROOT, mpi, mpi_tmp_path

RANKS = (1, 2, 3, 4)
SCRIPT = str(REPO_ROOT / "scripts" / "make_dataset.py")


# --------------------------------------------------------------------------- helpers

def factorisations(n):
    return [(s, c, n // (s * c)) for s in range(1, n + 1) if n % s == 0
            for c in range(1, n // s + 1) if (n // s) % c == 0]


def my_block(d, p, i):
    """Independent floor+1 rule: (start, stop) of block i of p of length d."""
    q, r = divmod(d, p)
    sizes = [q + 1] * r + [q] * (p - r)
    start = sum(sizes[:i])
    return start, start + sizes[i]


def nested(d, parts):
    """(start, stop) after splitting length d over [(p, i), ...], outermost first."""
    s, e = 0, d
    for p, i in parts:
        a, b = my_block(e - s, p, i)
        s, e = s + a, s + b
    return s, e


def expected_box(rank, scf, shape, spatial=False):
    """This rank's box of a batch, computed without distconv: grid (s, c, f) row-major.
    Default: N over sample, C over (channel, filter). spatial: H over channel instead."""
    s, c, f = scf
    cs, cc, cf = rank // (c * f), (rank // f) % c, rank % f
    n, C, H, W = shape
    if spatial:
        return (nested(n, [(s, cs)]), nested(C, [(f, cf)]), nested(H, [(c, cc)]), (0, W))
    return (nested(n, [(s, cs)]), nested(C, [(c, cc), (f, cf)]), (0, H), (0, W))


def write(comm, path, images, labels, **kw):
    if comm.rank == 0:
        write_h5_dataset(path, images, labels, **kw)
    comm.Barrier()


def data(n, shape=(5, 3, 4), dtype="float32", classes=6, seed=1):
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    else:
        x = rng.standard_normal((n,) + shape).astype(dtype)
    return x, rng.integers(0, classes, n)


def as_float(x, dtype):
    if x.dtype == np.uint8:
        return x.astype(dtype) / dtype.type(255)
    return x.astype(dtype)


class Spy:
    """Stands in for the h5py images dataset and records every selection read."""

    def __init__(self, ds):
        self.ds, self.keys = ds, []

    def __getitem__(self, key):
        self.keys.append(key)
        return self.ds[key]

    def __getattr__(self, name):
        return getattr(self.ds, name)


def check_batch(comm, x, labels, idx, images, lab, box, spy, loader, tag):
    """x/labels against the NumPy batch images[idx]; the read against the box."""
    dtype = np.dtype(dc.get_default_dtype())
    want = as_float(images[idx], dtype)
    gshape = want.shape
    assert x.shape == gshape, tag
    assert x.dtype == dtype, tag
    assert np.array_equal(labels, lab[idx]) and labels.dtype == np.int64, tag
    local = np.asarray(x.local)
    sl = tuple(slice(a, b) for a, b in box)
    assert local.shape == want[sl].shape, (tag, local.shape, box)
    np.testing.assert_array_equal(local, want[sl], err_msg=tag)
    # union over ranks: every element exactly once, equal to the NumPy batch
    got = np.zeros(gshape, dtype)
    count = np.zeros(gshape, np.int64)
    for b, blk in comm.allgather((box, local)):
        s = tuple(slice(p, q) for p, q in b)
        got[s] += blk
        count[s] += 1
    assert (count == 1).all(), tag
    np.testing.assert_array_equal(got, want, err_msg=tag)
    # what was read: exactly this rank's block, in one selection (none when empty)
    (s0, s1), ch, hh, ww = box
    mine = idx[s0:s1]
    rec = loader.last_read
    assert rec.positions == (s0, s1) and rec.channels == ch, (tag, rec)
    assert rec.height == hh and rec.width == ww, (tag, rec)
    assert np.array_equal(rec.rows, np.sort(mine)), tag
    assert np.array_equal(rec.order, mine), tag
    empty = mine.size == 0 or any(b <= a for a, b in box[1:])
    assert rec.calls == (0 if empty else 1), (tag, rec)
    assert rec.nbytes == int(np.prod([b - a for a, b in box])) * images.dtype.itemsize, tag
    assert len(spy.keys) == rec.calls, (tag, spy.keys)
    if spy.keys:
        key = spy.keys[-1]
        rows = key[0]
        if isinstance(rows, slice):
            rows = np.arange(rows.start, rows.stop)
        assert np.array_equal(np.asarray(rows), np.sort(mine)), (tag, key)
        assert key[1:] == tuple(slice(a, b) for a, b in box[1:]), (tag, key)
    spy.keys.clear()


# --------------------------------------------------------------------------- MPI: content

@pytest.mark.parametrize("dtype", ["float32", "uint8"])
@mpi(ranks=RANKS, timeout=60)
def test_loader_batches_equal_numpy(comm, dtype):
    n = 7
    images, lab = data(n, dtype=dtype)
    with mpi_tmp_path(comm) as d:
        path = str(d / "d.h5")
        write(comm, path, images, lab)
        with H5Dataset(path, comm=comm) as ds:
            assert ds.shape == images.shape and ds.num_classes == int(lab.max()) + 1
            spy = Spy(ds.images)
            ds.images = spy
            cases = [(scf, False) for scf in factorisations(comm.size)]
            cases += [((1, comm.size, 1), True)] if comm.size > 1 else []
            for scf, spatial in cases:
                st = Strategy(sample=scf[0], channel=scf[1], filter=scf[2])
                dist = st.activation_distribution(4)
                if spatial:  # any distribution: H split over channel, C over filter
                    dist = Distribution(dist.grid, [("sample",), ("filter",), ("channel",), None])
                for bs, shuffle, drop, epochs in [(4, True, False, 2), (1, True, False, 1),
                                                  (n + 2, False, False, 1), (3, True, True, 1)]:
                    loader = DistLoader(ds, bs, dist if spatial or bs != 4 else st,
                                        shuffle=shuffle, seed=5, drop_last=drop)
                    nb = n // bs if drop else -(-n // bs)
                    assert len(loader) == nb
                    for epoch in range(epochs):
                        order = (np.random.default_rng(5 + epoch).permutation(n) if shuffle
                                 else np.arange(n))
                        loader.set_epoch(epoch)
                        assert loader.position() == (epoch, 0)
                        k = 0
                        for k, (x, y) in enumerate(loader):
                            assert loader.position() == (epoch, k + 1)
                            idx = order[k * bs:(k + 1) * bs]
                            box = expected_box(comm.rank, scf, (len(idx),) + images.shape[1:],
                                               spatial)
                            tag = f"{scf} spatial={spatial} bs={bs} epoch={epoch} batch={k}"
                            check_batch(comm, x, y, idx, images, lab, box, spy, loader, tag)
                        assert k + 1 == nb
                    assert loader.position() == (epochs - 1, nb)
                    assert loader.state_dict()["epoch"] == epochs
                    assert not drop or len(idx) == bs


@mpi(ranks=RANKS, timeout=60)
def test_batch_smaller_than_sample_groups_and_float64(comm):
    dc.set_default_dtype(np.float64)
    images, lab = data(3, shape=(2, 2, 2), dtype="uint8")
    with mpi_tmp_path(comm) as d:
        path = str(d / "small.h5")
        write(comm, path, images, lab)
        with H5Dataset(path, comm=comm) as ds:
            loader = DistLoader(ds, 1, Strategy(), shuffle=True, seed=0)
            seen = []
            for k, (x, y) in enumerate(loader):
                # one sample over `size` sample groups: only sample group 0 has a row
                assert x.local.shape == ((1 if comm.rank == 0 else 0), 2, 2, 2)
                assert x.dtype == np.float64
                rec = loader.last_read
                assert rec.calls == (1 if comm.rank == 0 else 0)
                assert rec.rows.size == (1 if comm.rank == 0 else 0)
                if comm.rank == 0:
                    i = int(rec.rows[0])
                    np.testing.assert_array_equal(x.local[0], images[i] / 255.0)
                    assert y.tolist() == [lab[i]]
                seen.append(comm.bcast(loader.last_read.rows.tolist(), root=0))
            assert sorted(sum(seen, [])) == [0, 1, 2]
            # a dataset smaller than one batch: a single partial batch, no hang
            loader = DistLoader(ds, 8, Strategy())
            (x, y), = list(loader)
            assert x.shape == (3, 2, 2, 2) and y.shape == (3,)
            # drop_last with fewer samples than a batch: an empty epoch that still advances
            loader = DistLoader(ds, 8, Strategy(), drop_last=True)
            assert len(loader) == 0 and list(loader) == [] and loader.position() == (0, 0)


@mpi(ranks=RANKS, timeout=60)
def test_resume_from_saved_position(comm):
    n, bs = 10, 3
    images, lab = data(n)
    st = Strategy(sample=None, channel=2 if comm.size % 2 == 0 else 1)
    with mpi_tmp_path(comm) as d:
        path = str(d / "r.h5")
        write(comm, path, images, lab)
        with H5Dataset(path, comm=comm) as ds:
            def run(loader, steps, epochs=3):
                """The training loop of the data.py docstring, left after ``steps``."""
                out = []
                for epoch in range(loader.epoch, epochs):
                    loader.set_epoch(epoch)
                    for x, y in loader:
                        out.append((loader.last_read.epoch, loader.last_read.batch,
                                    x.to_global().copy(), y))
                        if len(out) == steps:
                            return out
                return out

            full = run(DistLoader(ds, bs, st, seed=3), 12)    # 3 epochs of 4 batches
            assert [(e, b) for e, b, _, _ in full] == [(e, b) for e in range(3) for b in range(4)]
            for stop in (2, 4, 5):      # mid-epoch, at an epoch boundary, just after it
                a = DistLoader(ds, bs, st, seed=3)
                run(a, stop)
                state = a.state_dict()
                assert (state["epoch"], state["batch"]) == divmod(stop, 4)
                # as read back from HDF5 attributes: numpy scalars
                state = {k: (np.bool_(v) if isinstance(v, bool) else np.int64(v))
                         for k, v in state.items()}
                b = DistLoader(ds, bs, st, seed=3)
                b.load_state_dict(state)
                rest = run(b, 12 - stop)
                for (e1, b1, x1, y1), (e2, b2, x2, y2) in zip(full[stop:], rest):
                    assert (e1, b1) == (e2, b2)
                    np.testing.assert_array_equal(x1, x2)
                    np.testing.assert_array_equal(y1, y2)
            # iterating a finished epoch again repeats it; set_epoch(e) keeps a position
            # inside e, set_epoch(e, 0) restarts it
            a = DistLoader(ds, bs, st, seed=3)
            a.set_epoch(1)
            assert [y.tolist() for _, y in a] == [f[3].tolist() for f in full[4:8]]
            assert a.position() == (1, 4) and a.state_dict()["epoch"] == 2
            assert [y.tolist() for _, y in a] == [f[3].tolist() for f in full[4:8]]
            for _ in zip(range(2), a):
                pass
            a.set_epoch(1)
            assert a.position() == (1, 2)
            a.set_epoch(1, 0)
            assert a.position() == (1, 0)
            # set_epoch and get_batch
            c = DistLoader(ds, bs, st, seed=3)
            c.set_epoch(2, 1)
            x, y = next(iter(c))
            np.testing.assert_array_equal(x.to_global(), full[9][2])
            x, y = c.get_batch(1, 3)
            np.testing.assert_array_equal(y, full[7][3])
            assert (c.epoch, c.batch) == (2, 2)
            # positions that do not fit: the same ValueError everywhere
            for bad, match in [({"epoch": 0, "batch": 5}, "out of range"),
                               (dict(c.state_dict(), batch_size=4), "batch_size"),
                               (dict(c.state_dict(), seed=4), "seed"),
                               ({"epoch": 0}, "bad state")]:
                with pytest.raises(ValueError, match=match) as ei:
                    c.load_state_dict(bad)
                assert len(set(comm.allgather(str(ei.value)))) == 1
            if comm.size > 1:
                with pytest.raises(ValueError, match="disagree"):
                    c.load_state_dict({"epoch": 0, "batch": comm.rank % 2})
            assert (c.epoch, c.batch) == (2, 2)


# --------------------------------------------------------------------------- MPI: errors

EXPECT = {  # kind: (exception type, what the message must say)
    "missing": (FileNotFoundError, "does not exist"),
    "corrupt": (OSError, "not an HDF5 file"),
    "empty-file": (OSError, "not an HDF5 file"),
    "truncated": (OSError, "truncated"),
    "directory": (OSError, "directory"),
    "no-images": (DatasetKeyError, "no images dataset 'images'"),
    "no-labels": (DatasetKeyError, "no labels dataset 'labels'"),
    "images-group": (ValueError, "not a dataset"),
    "mismatched": (ValueError, "has 6 samples but labels 'labels' has 5"),
    "ndim": (ValueError, "must be 4-d"),
    "labels-2d": (ValueError, "must be 1-d"),
    "labels-float": (ValueError, "must be integers"),
    "images-int32": (ValueError, "must be float or uint8"),
    "out-of-range": (ValueError, r"must be in \[0, 3\).*labels\[3\] = 3"),
    "negative": (ValueError, r"must be >= 0.*labels\[2\] = -1"),
    "attr-out-of-range": (ValueError, r"must be in \[0, 2\).*num_classes attribute"),
}
BAD = list(EXPECT)


def _make_bad(kind, path):
    """Write the bad dataset file of ``kind`` at ``path`` (rank 0 only)."""
    x, y = data(6)
    if kind == "missing":
        return
    if kind in ("corrupt", "empty-file"):
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).bytes(4096 if kind == "corrupt" else 0))
        return
    if kind == "truncated":
        write_h5_dataset(path, x, y)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size * 2 // 3)
        return
    if kind == "directory":
        os.mkdir(path)
        return
    with h5py.File(path, "w") as f:
        img = {"ndim": x.reshape(6, 3, 20), "images-int32": x.astype(np.int32)}.get(kind, x)
        lab = {"mismatched": y[:5], "labels-2d": y.reshape(6, 1),
               "labels-float": y.astype(np.float32),
               "out-of-range": np.array([0, 1, 2, 3, 1, 0]),   # num_classes=3 passed
               "negative": np.array([0, 1, -1, 2, 1, 0]),
               "attr-out-of-range": np.array([0, 1, 2, 1, 1, 0])}.get(kind, y)
        if kind == "images-group":
            f.create_group("images")
        elif kind != "no-images":
            f["images"] = img
        if kind != "no-labels":
            f["labels"] = lab
        if kind == "attr-out-of-range":  # the file says num_classes = 2
            f["labels"].attrs["num_classes"] = 2


@mpi(ranks=RANKS, timeout=60)
def test_bad_files_raise_same_error_everywhere(comm):
    import re
    with mpi_tmp_path(comm) as d:
        for kind in BAD:
            path = str(d / f"{kind}.h5")
            exc, words = EXPECT[kind]
            if comm.rank == 0:
                _make_bad(kind, path)
            comm.Barrier()
            with pytest.raises(exc, match=words) as ei:
                H5Dataset(path, num_classes=3 if kind == "out-of-range" else None, comm=comm)
            msg = str(ei.value)
            assert path in msg, (kind, msg)
            assert type(ei.value) is exc, (kind, type(ei.value))
            assert not msg.startswith("'"), msg  # KeyError messages print unquoted
            got = comm.allgather((type(ei.value).__name__, msg))
            assert len(set(got)) == 1, (kind, got)
            if comm.size > 1:
                assert re.search(r"on rank\(s\) \[0, 1", msg), msg


@mpi(ranks=RANKS, timeout=60)
def test_rank_dependent_problems_raise_everywhere(comm):
    images, lab = data(6)
    with mpi_tmp_path(comm) as d:
        good = str(d / "good.h5")
        write(comm, good, images, lab)
        # only the last rank is handed a path that does not exist
        path = good if comm.rank < comm.size - 1 else str(d / "nowhere.h5")
        with pytest.raises(FileNotFoundError, match="nowhere.h5"):
            H5Dataset(path, comm=comm)
        # only the last rank passes a num_classes the labels do not fit
        k = 6 if comm.rank < comm.size - 1 else 2
        with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):
            H5Dataset(good, num_classes=k, comm=comm)
        with H5Dataset(good, comm=comm) as ds:
            for args, exc, match in [((0,), ValueError, "batch_size"),
                                     ((2, "bogus"), ValueError, "cannot parse strategy"),
                                     ((2, object()), TypeError, "must be a Distribution"),
                                     ((2, Strategy(channel=comm.size + 1)), ValueError,
                                      "ranks")]:
                with pytest.raises(exc, match=match):
                    DistLoader(ds, *args)
            if comm.size == 1:
                pytest.skip("the rest needs two ranks")
            with pytest.raises(ValueError, match="disagree"):
                DistLoader(ds, 2 + (comm.rank == comm.size - 1), seed=1)
            # a read that fails on one rank only: every rank raises
            loader = DistLoader(ds, 4)
            if comm.rank == comm.size - 1:
                ds.images = None
            with pytest.raises(OSError, match="reading batch 0 of epoch 0"):
                next(iter(loader))


@mpi(ranks=(2,), timeout=60)
def test_ensure_digits_collective(comm):
    with mpi_tmp_path(comm) as d:
        tr, te = ensure_digits(d / "data", comm=comm)
        assert (tr, te) == tuple(str(d / "data" / n) for n in DIGITS_FILES)
        with H5Dataset(tr, comm=comm) as a, H5Dataset(te, comm=comm) as b:
            assert len(a) + len(b) == 1797 and a.num_classes == b.num_classes == 10
        t0 = os.path.getmtime(tr)
        assert ensure_digits(d / "data", comm=comm) == (tr, te)  # kept, not rewritten
        assert os.path.getmtime(tr) == t0
        blocker = d / "file"
        if comm.rank == 0:
            blocker.write_text("x")
        comm.Barrier()
        with pytest.raises(OSError, match="cannot write the digits data"):
            ensure_digits(blocker / "sub", comm=comm)


# --------------------------------------------------------------------------- serial

def _run(*args):
    """scripts/make_dataset.py's main(args) in this process (saves an interpreter start):
    (exit status, stdout)."""
    import contextlib
    import importlib.util
    import io
    spec = importlib.util.spec_from_file_location("make_dataset_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = mod.main(list(args))
        except SystemExit as e:
            rc = e.code
    return rc, buf.getvalue()


def test_make_dataset_digits(tmp_path):
    from sklearn.datasets import load_digits
    rc, out = _run("digits", "--out", str(tmp_path / "dig"))
    assert rc == 0, out
    paths = [tmp_path / "dig" / n for n in DIGITS_FILES]
    assert sorted(os.listdir(tmp_path / "dig")) == sorted(DIGITS_FILES)  # no temp files left
    xs, ys = [], []
    for p, n in zip(paths, (1437, 360)):
        with h5py.File(p, "r") as f:
            x, y = f["images"][()], f["labels"][()]
            assert f["labels"].attrs["num_classes"] == 10
        assert x.shape == (n, 1, 8, 8) and x.dtype == np.float32 and y.shape == (n,)
        assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
        xs.append(x)
        ys.append(y)
    y_all = np.concatenate(ys)
    assert len(y_all) == 1797 and set(np.unique(y_all)) == set(range(10))
    # stratified: each class's share of the test split within one sample of 360/1797
    ref = load_digits()
    share = np.bincount(ys[1], minlength=10) / np.bincount(ref.target, minlength=10)
    assert np.all(np.abs(np.bincount(ys[1], minlength=10)
                         - 360 * np.bincount(ref.target) / 1797) <= 1), share
    # the very images of sklearn (pixel / 16), with their labels, each once
    mine = np.concatenate([np.concatenate(xs).reshape(1797, 64) * 16, y_all[:, None]], 1)
    theirs = np.concatenate([ref.data, ref.target[:, None]], 1)
    assert np.array_equal(np.unique(mine, axis=0), np.unique(theirs, axis=0))
    # the same seed gives the same split; another seed another
    a, b = make_digits(tmp_path / "s0", seed=0), make_digits(tmp_path / "s1", seed=1)
    with h5py.File(a[1], "r") as f0, h5py.File(b[1], "r") as f1, h5py.File(paths[1], "r") as fr:
        assert np.array_equal(f0["images"][()], fr["images"][()])
        assert not np.array_equal(f0["images"][()], f1["images"][()])
    # the command runs as a program: --help needs no MPI or scikit-learn
    r = subprocess.run([sys.executable, SCRIPT, "digits", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--out" in r.stdout, r.stderr


def test_make_dataset_synthetic_and_help(tmp_path):
    rc, text = _run("--help")
    assert rc == 0 and "digits" in text and "synthetic" in text
    out = tmp_path / "s.h5"
    rc, text = _run("synthetic", "--shape", "9,3,5,4", "--classes", "4", "--out", str(out),
                    "--seed", "2")
    assert rc == 0, text
    with h5py.File(out, "r") as f:
        x, y = f["images"][()], f["labels"][()]
    assert x.shape == (9, 3, 5, 4) and x.dtype == np.float32 and y.shape == (9,)
    assert 0 <= x.min() and x.max() < 1 and y.min() >= 0 and y.max() < 4
    assert os.listdir(tmp_path) == ["s.h5"]
    for bad in (["--shape", "9,3,5", "--classes", "4"], ["--shape", "9,0,5,4", "--classes", "4"],
                ["--shape", "9,3,5,4", "--classes", "0"]):
        rc, text = _run("synthetic", *bad, "--out", str(tmp_path / "bad.h5"))
        assert rc == 2 and not (tmp_path / "bad.h5").exists(), text
    # written block by block: one block or many gives the same file when the blocks agree,
    # seeded, uint8 works, and the num_classes attribute is honoured by H5Dataset
    p1 = make_synthetic(tmp_path / "a.h5", (7, 2, 3, 3), 5, seed=4, block_bytes=72 * 3)
    p2 = make_synthetic(tmp_path / "b.h5", (7, 2, 3, 3), 5, seed=4, block_bytes=72 * 3)
    p3 = make_synthetic(tmp_path / "c.h5", (7, 2, 3, 3), 5, seed=4, dtype="uint8")
    p4 = make_synthetic(tmp_path / "d.h5", (7, 2, 3, 3), 5, seed=4)
    with h5py.File(p1, "r") as a, h5py.File(p2, "r") as b, h5py.File(p3, "r") as c, \
            h5py.File(p4, "r") as one:
        xa = a["images"][()]
        assert np.array_equal(xa, b["images"][()])
        assert not np.array_equal(xa[:3], xa[3:6])   # blocks drawn from their own streams
        assert not np.array_equal(xa, one["images"][()])  # 3 blocks, not one
        assert c["images"].dtype == np.uint8
    with H5Dataset(p3) as ds:
        assert ds.num_classes == 5 and ds.dtype == np.uint8
    with pytest.raises(ValueError, match="shape"):
        make_synthetic(tmp_path / "x.h5", (2, 3, 4), 3)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "t.h5"

    def fill(f):
        f["images"] = np.zeros((2, 1, 2, 2), np.float32)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        _atomic_h5(target, fill)
    assert os.listdir(tmp_path) == []
    write_h5_dataset(target, np.zeros((2, 1, 2, 2), np.float32), np.array([0, 1]))
    with pytest.raises(RuntimeError):  # a failed rewrite keeps the old file intact
        _atomic_h5(target, fill)
    assert os.listdir(tmp_path) == ["t.h5"]
    with H5Dataset(target) as ds:
        assert len(ds) == 2
