"""Checkpoints: global tensors round-trip across strategies and rank counts, resuming is
exact, writes are atomic, and every kind of bad file (or bad directory) raises the same
clear error on every rank without hanging.

Most cases run under the MPI harness at 1, 2 and 4 ranks. Loading a file written by a
job with a *different* number of ranks needs two jobs: :func:`test_other_rank_counts`
(a plain pytest test) runs :func:`_script_main` under ``mpiexec`` three times.
"""
import json
import os
import sys

import numpy as np
import pytest

from tests.mpi_harness import mpi, mpi_tmp_path, run_mpi_script

RANKS = (1, 2, 4)
T = 60

# strategy the file is saved with -> strategy it is loaded with, per rank count
SAVE = {1: "sample=1", 2: "sample=2", 3: "sample=3", 4: "sample=2,channel=2"}
LOAD = {1: "sample=1", 2: "sample=1,channel=2", 3: "sample=1,filter=3",
        4: "sample=1,channel=2,filter=2"}


# ------------------------------------------------------------------ helpers
def f64():
    from distconv.backend import set_default_dtype

    set_default_dtype(np.float64)


def make_model(strategy, seed=0, width=6):
    """Conv-BN-ReLU-Conv-BN-ReLU-pool-Linear; ``seed`` fixes the initial weights."""
    import distconv as dc
    from distconv import nn

    s = dc.Strategy.parse(strategy) if isinstance(strategy, str) else strategy
    nn.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, strategy=s), nn.BatchNorm2d(4, strategy=s), nn.ReLU(),
        nn.Conv2d(4, width, 3, padding=1, bias=False, strategy=s),
        nn.BatchNorm2d(width, strategy=s), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5, strategy=s))


def make_opt(kind, model):
    from distconv import optim

    if kind == "sgd":
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        return opt, optim.StepLR(opt, step_size=2, gamma=0.5)
    opt = optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    return opt, optim.CosineAnnealingLR(opt, T_max=10)


def batch(step, n=8):
    rng = np.random.default_rng(1000 + step)
    return rng.standard_normal((n, 3, 5, 5)), rng.integers(0, 5, size=n)


def train(model, opt, sched, steps, start=0):
    from distconv import nn

    crit = nn.CrossEntropyLoss()
    model.train()
    for step in range(start, start + steps):
        x, y = batch(step)
        crit(model(x), y)
        model.backward(crit.backward())
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def opt_state(opt):
    """Collective: {(param index, key): global numpy array}."""
    from distconv.backend import to_numpy

    return {(i, k): np.array(to_numpy(t.to_global())) for i, k, t in opt.state_tensors()}


def state(model):
    """Collective: a copy of the global state dict (on one rank ``to_global`` may return the
    live arrays)."""
    return {k: np.array(v) for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict, exact=True):
    assert list(a) == list(b)
    for k in a:
        if exact:
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-9, atol=1e-12, err_msg=str(k))


def still_works(comm):
    assert comm.allreduce(1) == comm.size


def saved(comm, path, opt_kind="sgd", steps=2, meta=None, seed=0):
    """A trained model saved at ``path``; returns (model, opt, sched, its global state)."""
    from distconv import checkpoint

    model = make_model(SAVE[comm.size], seed=seed)
    opt, sched = make_opt(opt_kind, model)
    train(model, opt, sched, steps)
    checkpoint.save_checkpoint(path, model, opt, sched, meta=meta or {"step": steps})
    return model, opt, sched, state(model)


def on_rank0(comm, fn):
    """Run ``fn`` on rank 0 only, then let every rank see the result (a file change)."""
    err = None
    if comm.rank == 0:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            err = repr(e)
    err = comm.bcast(err, root=0)
    assert err is None, err


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@mpi(ranks=RANKS, timeout=T)
def test_roundtrip_other_strategy(comm, opt_kind):
    """Saved with one strategy, loaded into a fresh model (other weights) with another:
    global weights, buffers, optimizer state, lr, step counts and meta are identical, and
    training on gives what the uninterrupted run gives."""
    from distconv import checkpoint

    f64()
    meta = {"step": 2, "epoch": 0, "loader": {"position": 16}, "strategy": SAVE[comm.size],
            "rng": [1, 2, 3], "model": "test-net", "args": {"lr": 0.1, "nan": float("inf")}}
    with mpi_tmp_path(comm) as d:
        path = str(d / "ckpt.h5")
        a, aopt, asched, a_sd = saved(comm, path, opt_kind, meta=meta)
        a_opt = opt_state(aopt)
        assert a_opt, "the optimizer has state after two steps"

        b = make_model(LOAD[comm.size], seed=7)
        bopt, bsched = make_opt(opt_kind, b)
        got = checkpoint.load_checkpoint(path, b, bopt, bsched)
        assert got == json.loads(json.dumps(meta))
        assert_same(state(b), a_sd)
        assert_same(opt_state(bopt), a_opt)
        assert bopt.step_count == aopt.step_count == 2
        assert bopt.lr == aopt.lr
        assert bsched.last_step == asched.last_step == 2
        # the shards really are in the new strategy's layout
        w = b[0].weight.data
        assert w.distribution == b[0]._wdist

        train(a, aopt, asched, 1, start=2)
        train(b, bopt, bsched, 1, start=2)
        assert_same(state(b), state(a), exact=(comm.size == 1))
        assert_same(opt_state(bopt), opt_state(aopt), exact=(comm.size == 1))
        assert bopt.lr == aopt.lr


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@mpi(ranks=RANKS, timeout=T)
def test_resume_is_exact(comm, opt_kind):
    """Stop after 2 steps, save, load into a fresh model (same strategy), train 2 more:
    bit-identical to 4 steps without stopping."""
    from distconv import checkpoint

    f64()
    ref = make_model(SAVE[comm.size])
    ropt, rsched = make_opt(opt_kind, ref)
    train(ref, ropt, rsched, 4)
    with mpi_tmp_path(comm) as d:
        path = str(d / "ckpt.h5")
        saved(comm, path, opt_kind)
        m = make_model(SAVE[comm.size], seed=3)
        opt, sched = make_opt(opt_kind, m)
        assert checkpoint.load_checkpoint(path, m, opt, sched) == {"step": 2}
        train(m, opt, sched, 2, start=2)
    assert_same(state(m), state(ref))
    assert_same(opt_state(opt), opt_state(ropt))
    assert (opt.lr, opt.step_count) == (ropt.lr, ropt.step_count)


@mpi(ranks=RANKS, timeout=T)
def test_model_only_and_info(comm):
    """Without optimizer/scheduler; checkpoint_info reports meta, version and keys."""
    from distconv import checkpoint

    f64()
    with mpi_tmp_path(comm) as d:
        path = str(d / "m.h5")
        model = make_model(SAVE[comm.size])
        checkpoint.save_checkpoint(path, model, meta={"model": "net", "step": 0})
        sd = state(model)
        other = make_model(LOAD[comm.size], seed=5)
        assert checkpoint.load_checkpoint(path, other) == {"model": "net", "step": 0}
        assert_same(state(other), sd)
        # a checkpoint without optimizer state cannot restore an optimizer
        opt, _ = make_opt("sgd", other)
        with pytest.raises(ValueError, match="holds no optimizer state"):
            checkpoint.load_checkpoint(path, other, opt)
        if comm.rank == 0:
            info = checkpoint.checkpoint_info(path)
            assert info["format_version"] == checkpoint.FORMAT_VERSION == 1
            assert info["meta"] == {"model": "net", "step": 0}
            assert info["keys"] == list(sd)
            assert info["shapes"] == {k: v.shape for k, v in sd.items()}
            assert info["optimizer"] is None and info["scheduler"] is None
            assert info["nranks"] == comm.size
            assert checkpoint.checkpoint_info(path, verify=True)["verified"]
        comm.Barrier()
        # with optimizer and scheduler
        path2 = str(d / "full.h5")
        saved(comm, path2, "adam")
        if comm.rank == 0:
            info = checkpoint.checkpoint_info(path2, verify=True)
            assert info["optimizer"]["class"] == "Adam"
            assert info["optimizer"]["step_count"] == 2
            assert ("0", "exp_avg") not in info["optimizer"]["state_keys"]
            assert (0, "exp_avg") in info["optimizer"]["state_keys"]
            assert info["scheduler"] == {"class": "CosineAnnealingLR",
                                         "state": {"last_step": 2}}
            import h5py

            with h5py.File(path2, "r") as f:
                assert f.attrs["format_version"] == 1
                assert len(f.attrs["checksum"]) == 64
                assert "0.weight" in f["model"] and "1.running_mean" in f["model"]
                assert f["model/1.num_batches_tracked"][()] == 2
                assert f["optimizer"].attrs["class"] == "Adam"
        comm.Barrier()


@mpi(ranks=(1, 2, 4), timeout=T)
def test_small_resnet_plan(comm):
    """A ResNet saved data-parallel loads under a per-layer plan."""
    pytest.importorskip("distconv.models")
    from distconv import checkpoint
    from distconv.models import small_resnet

    f64()
    p = comm.size
    with mpi_tmp_path(comm) as d:
        path = str(d / "r.h5")
        import distconv as dc

        dc.nn.manual_seed(1)
        a = small_resnet(width=4)
        opt, _ = make_opt("sgd", a)
        checkpoint.save_checkpoint(path, a, opt, meta={"model": "small_resnet"})
        sd = state(a)
        dc.nn.manual_seed(2)
        b = small_resnet(width=4, strategy={"": f"sample=1,channel={p}",
                                            "layer2": f"sample=1,filter={p}"})
        bopt, _ = make_opt("sgd", b)
        assert checkpoint.load_checkpoint(path, b, bopt)["model"] == "small_resnet"
        assert_same(state(b), sd)


# ------------------------------------------------------------------ other rank counts
def _script_main(argv):
    """Run under mpiexec: ``save PATH OUT.npz`` or ``load PATH OUT.npz PATH2``."""
    from mpi4py import MPI

    from distconv import checkpoint

    f64()
    mode, path, npz = argv[:3]
    n = MPI.COMM_WORLD.size
    rank = MPI.COMM_WORLD.rank
    if mode == "save":
        model = make_model(SAVE[n])
        opt, sched = make_opt("sgd", model)
        train(model, opt, sched, 2)
        checkpoint.save_checkpoint(path, model, opt, sched, meta={"nranks": n, "step": 2})
        train(model, opt, sched, 2, start=2)
        final = state(model)
        if rank == 0:
            np.savez(npz, **final)
    else:
        import h5py

        model = make_model(LOAD[n], seed=9)
        opt, sched = make_opt("sgd", model)
        meta = checkpoint.load_checkpoint(path, model, opt, sched)
        assert meta["step"] == 2 and meta["nranks"] != n, meta
        with h5py.File(path, "r") as f:
            want = {k: f["model"][k][()] for k in json.loads(f["model"].attrs["keys"])}
            want_opt = {(i, k): f[f"optimizer/{i}/{k}"][()]
                        for i, k in json.loads(f["optimizer"].attrs["state_keys"])}
        assert_same({k: np.asarray(v) for k, v in state(model).items()},
                    {k: np.asarray(v) for k, v in want.items()})
        assert_same(opt_state(opt), {k: np.asarray(v) for k, v in want_opt.items()})
        assert opt.step_count == 2 and sched.last_step == 2
        # save again from this rank count: the same global content
        path2 = argv[3]
        checkpoint.save_checkpoint(path2, model, opt, sched, meta=meta)
        if rank == 0:
            with h5py.File(path, "r") as f1, h5py.File(path2, "r") as f2:
                names = []
                f1.visititems(lambda nm, o: names.append(nm)
                              if isinstance(o, h5py.Dataset) else None)
                for nm in names:
                    np.testing.assert_array_equal(f1[nm][()], f2[nm][()], err_msg=nm)
                assert f1.attrs["checksum"] == f2.attrs["checksum"]
        train(model, opt, sched, 2, start=2)
        final = state(model)
        ref = np.load(npz)
        for k, v in final.items():
            np.testing.assert_allclose(v, ref[k], rtol=1e-9, atol=1e-12, err_msg=k)
    MPI.COMM_WORLD.Barrier()
    if rank == 0:
        print(f"OK {mode} n={n}", flush=True)


_SCRIPT = "import sys\nfrom tests.test_checkpoint import _script_main\n_script_main(sys.argv[1:])\n"


def test_other_rank_counts(tmp_path):
    """Saved by a 2-rank job (sample=2); loaded by 1- and 4-rank jobs with other strategies:
    identical global state, identical file when saved again, training continues alike."""
    from tests.mpi_harness import max_ranks

    path, npz = str(tmp_path / "c.h5"), str(tmp_path / "final.npz")
    r = run_mpi_script(_SCRIPT, 2, timeout=90, args=["save", path, npz])
    assert r.returncode == 0 and "OK save n=2" in r.stdout, r.stdout + r.stderr
    for n in (1, 4):
        if n > max_ranks():
            continue
        r = run_mpi_script(_SCRIPT, n, timeout=90,
                           args=["load", path, npz, str(tmp_path / f"again{n}.h5")])
        assert r.returncode == 0 and f"OK load n={n}" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ atomicity
class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("hook", ["_before_rename", "_after_dataset"])
@mpi(ranks=RANKS, timeout=T)
def test_failed_write_keeps_previous(comm, hook):
    """A crash while rank 0 writes: the same error on every rank, the previous checkpoint is
    intact and loadable, no temporary file is left."""
    from distconv import checkpoint

    f64()
    with mpi_tmp_path(comm) as d:
        path = str(d / "ckpt.h5")
        model, opt, sched, sd1 = saved(comm, path, meta={"step": 2})
        opt1 = opt_state(opt)
        train(model, opt, sched, 1, start=2)
        seen = []

        def crash(tmp, *rest):
            seen.append(tmp)
            assert os.path.exists(tmp) and tmp.startswith(path + ".tmp-")
            raise Crash("injected crash")

        setattr(checkpoint, hook, crash)
        try:
            with pytest.raises(checkpoint.CheckpointError,
                               match=r"cannot write checkpoint .*ckpt\.h5.*Crash: injected "
                                     r"crash \(on rank\(s\) \[0\]\)" if comm.size > 1 else
                               r"cannot write checkpoint .*Crash: injected crash"):
                checkpoint.save_checkpoint(path, model, opt, sched, meta={"step": 3})
        finally:
            setattr(checkpoint, hook, None)
        assert bool(seen) == (comm.rank == 0)
        assert sorted(os.listdir(d)) == ["ckpt.h5"]
        fresh = make_model(LOAD[comm.size], seed=4)
        fopt, fsched = make_opt("sgd", fresh)
        assert checkpoint.load_checkpoint(path, fresh, fopt, fsched) == {"step": 2}
        assert_same(state(fresh), sd1)
        assert_same(opt_state(fopt), opt1)
        # and the next save works and replaces it
        checkpoint.save_checkpoint(path, model, opt, sched, meta={"step": 3})
        assert checkpoint.load_checkpoint(path, fresh, fopt, fsched) == {"step": 3}
        assert sorted(os.listdir(d)) == ["ckpt.h5"]
        still_works(comm)


@mpi(ranks=RANKS, timeout=T)
def test_unwritable_directory(comm):
    """The parent of the path is a regular file: the same error on every rank, no hang."""
    from distconv import checkpoint

    f64()
    with mpi_tmp_path(comm) as d:
        blocker = d / "somefile"
        on_rank0(comm, lambda: blocker.write_text("not a directory"))
        model = make_model(SAVE[comm.size])
        opt, sched = make_opt("sgd", model)
        train(model, opt, sched, 1)
        path = str(blocker / "ckpt.h5")
        with pytest.raises(checkpoint.CheckpointError,
                           match=r"cannot write checkpoint .*somefile/ckpt\.h5.*"
                                 r"Not a directory"):
            checkpoint.save_checkpoint(path, model, opt, sched)
        # a directory that does not exist
        with pytest.raises(checkpoint.CheckpointError, match=r"cannot write checkpoint .*"
                                                             r"missing/ckpt\.h5"):
            checkpoint.save_checkpoint(str(d / "missing" / "ckpt.h5"), model)
        assert sorted(os.listdir(d)) == ["somefile"]
        still_works(comm)


@mpi(ranks=RANKS, timeout=T)
def test_bad_arguments(comm):
    """Meta that is not JSON, or a path that differs between ranks: the same error on every
    rank before anything is gathered or written."""
    from distconv import checkpoint

    f64()
    with mpi_tmp_path(comm) as d:
        model = make_model(SAVE[comm.size])
        path = str(d / "c.h5")
        with pytest.raises(TypeError, match="meta is not JSON-serialisable"):
            checkpoint.save_checkpoint(path, model, meta={"x": object()})
        with pytest.raises(TypeError, match="meta must be a dict"):
            checkpoint.save_checkpoint(path, model, meta=[1, 2])
        # only rank 1 passes something bad: still raised everywhere
        bad = {"x": object()} if comm.rank == min(1, comm.size - 1) else {"x": 1}
        with pytest.raises(TypeError, match="meta is not JSON-serialisable"):
            checkpoint.save_checkpoint(path, model, meta=bad)
        if comm.size > 1:
            with pytest.raises(ValueError, match="ranks disagree on checkpoint path"):
                checkpoint.save_checkpoint(str(d / f"c{comm.rank}.h5"), model)
        assert os.listdir(d) == []
        still_works(comm)


# ------------------------------------------------------------------ damaged files
def _flip_data(path, name):
    import h5py

    with h5py.File(path, "r") as f:
        ds = f[name]
        off, n = ds.id.get_offset(), ds.id.get_storage_size()
    assert off is not None and n > 0
    with open(path, "r+b") as fh:
        fh.seek(off + n // 2)
        b = fh.read(1)
        fh.seek(off + n // 2)
        fh.write(bytes([b[0] ^ 0x5A]))


def _set_attr(path, name, value, obj="/"):
    import h5py

    with h5py.File(path, "r+") as f:
        f[obj].attrs[name] = value


DAMAGE = {
    # how the file is damaged -> (exception class name, message regex)
    "missing": ("CheckpointNotFoundError", r"checkpoint '.*gone\.h5' does not exist"),
    "random_bytes": ("CheckpointError", r"checkpoint '.*ckpt\.h5' is not an HDF5 file"),
    "truncated": ("CheckpointError", r"checkpoint '.*ckpt\.h5'.*truncated"),
    "weights_flipped": ("CheckpointCorruptError",
                        r"checkpoint '.*ckpt\.h5' is corrupt \(checksum mismatch\)"),
    "momentum_flipped": ("CheckpointCorruptError", r"is corrupt \(checksum mismatch\)"),
    "attrs_edited": ("CheckpointCorruptError", r"is corrupt \(checksum mismatch\)"),
    "version": ("CheckpointError", r"'.*ckpt\.h5' has format_version 99; this distconv "
                                   r"reads version 1"),
    "foreign_hdf5": ("CheckpointError", r"is not a distconv checkpoint"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@mpi(ranks=RANKS, timeout=T)
def test_damaged_file(comm, damage):
    """Every kind of damage gives a clear error naming the file on every rank, and the model
    and optimizer are left as they were."""
    from distconv import checkpoint

    f64()
    with mpi_tmp_path(comm) as d:
        path = str(d / "ckpt.h5")
        model, opt, sched, sd = saved(comm, path, steps=1)
        before = opt_state(opt)

        def damage_it():
            if damage == "random_bytes":
                with open(path, "wb") as fh:
                    fh.write(np.random.default_rng(0).bytes(4096))
            elif damage == "truncated":
                size = os.path.getsize(path)
                with open(path, "r+b") as fh:
                    fh.truncate(size * 2 // 3)
            elif damage == "weights_flipped":
                _flip_data(path, "model/3.weight")
            elif damage == "momentum_flipped":
                _flip_data(path, "optimizer/0/momentum_buffer")
            elif damage == "attrs_edited":
                _set_attr(path, "meta", json.dumps({"step": 1000}))
                _set_attr(path, "lr", 123.0, "optimizer")
            elif damage == "version":
                _set_attr(path, "format_version", 99)
            elif damage == "foreign_hdf5":
                import h5py

                with h5py.File(path, "w") as f:
                    f["images"] = np.zeros((2, 3))

        on_rank0(comm, damage_it)
        target = str(d / "gone.h5") if damage == "missing" else path
        kind, msg = DAMAGE[damage]
        exc = getattr(checkpoint, kind)
        with pytest.raises(exc, match=msg) as ei:
            checkpoint.load_checkpoint(target, model, opt, sched)
        if comm.size > 1:
            assert f"(on rank(s) {list(range(comm.size))})" in str(ei.value)
        if damage == "missing":
            assert isinstance(ei.value, FileNotFoundError)
        assert_same(state(model), sd)
        assert_same(opt_state(opt), before)
        if comm.rank == 0 and damage != "missing":
            with pytest.raises(exc, match=msg):
                checkpoint.checkpoint_info(path, verify=True)
        still_works(comm)


@mpi(ranks=RANKS, timeout=T)
def test_damaged_on_one_rank_only(comm):
    """A check that fails on one rank only (here forced through the read hook) still raises
    on every rank."""
    from distconv import checkpoint

    f64()
    with mpi_tmp_path(comm) as d:
        path = str(d / "ckpt.h5")
        model, opt, sched, sd = saved(comm, path)
        bad_rank = comm.size - 1

        def hook(p, contents):
            if comm.rank == bad_rank:
                raise checkpoint.CheckpointCorruptError(f"checkpoint {p!r} is corrupt "
                                                        f"(checksum mismatch)")

        checkpoint._after_read = hook
        try:
            with pytest.raises(checkpoint.CheckpointCorruptError,
                               match=rf"checksum mismatch\)( \(on rank\(s\) \[{bad_rank}\]\))?$"):
                checkpoint.load_checkpoint(path, model, opt, sched)
        finally:
            checkpoint._after_read = None
        assert_same(state(model), sd)
        still_works(comm)


# ------------------------------------------------------------------ wrong model
@mpi(ranks=RANKS, timeout=T)
def test_wrong_model(comm):
    """A checkpoint of another architecture or optimizer: ValueError listing the keys on
    every rank; nothing is changed."""
    import distconv as dc
    from distconv import checkpoint, nn

    f64()
    with mpi_tmp_path(comm) as d:
        path = str(d / "ckpt.h5")
        saved(comm, path)
        s = dc.Strategy.parse(LOAD[comm.size])

        wider = make_model(LOAD[comm.size], width=8)
        sd = state(wider)
        with pytest.raises(ValueError, match=r"does not fit this model.*mismatched shapes "
                                             r"\[3\.weight: checkpoint \(6, 4, 3, 3\), model "
                                             r"\(8, 4, 3, 3\); 4\.weight"):
            checkpoint.load_checkpoint(path, wider)
        assert_same(state(wider), sd)

        nn.manual_seed(0)
        shorter = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, strategy=s),
                                nn.BatchNorm2d(4, strategy=s), nn.ReLU(),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(4, 5, strategy=s))
        with pytest.raises(ValueError, match=r"missing keys \['5\.weight', '5\.bias'\], "
                                             r"unexpected keys \['3\.weight', '4\.weight'"):
            checkpoint.load_checkpoint(path, shorter)

        # right model, wrong optimizer or scheduler
        m = make_model(LOAD[comm.size], seed=3)
        msd = state(m)
        aopt, asched = make_opt("adam", m)
        with pytest.raises(ValueError, match=r"holds SGD state, but the optimizer is a Adam"):
            checkpoint.load_checkpoint(path, m, aopt)
        sopt, _ = make_opt("sgd", m)
        with pytest.raises(ValueError, match=r"holds StepLR scheduler state, but the "
                                             r"scheduler is a CosineAnnealingLR"):
            checkpoint.load_checkpoint(path, m, sopt, asched)
        from distconv import optim

        few = optim.SGD(m.parameters()[:2], lr=0.1, momentum=0.9)
        with pytest.raises(ValueError, match=r"the optimizer had 9 parameters, this one "
                                             r"has 2"):
            checkpoint.load_checkpoint(path, m, few)
        assert_same(state(m), msd)
        assert sopt.step_count == 0 and not opt_state(sopt)
        still_works(comm)


if __name__ == "__main__":  # pragma: no cover
    _script_main(sys.argv[1:])
