"""Replicas stay identical whatever the caller passes (MPI cases at 2 and 4 ranks).

Every loader is fed per-rank-different values (rank r passes arrays filled with r, or a
key on some ranks only, or a different checkpoint file) and must end either with
identical replicas or with the same error on every rank, leaving the state as it was:

* ``Module.load_state_dict`` (data-parallel Linear; a channel/filter-split net where a
  "mixed" dict would not even create replicas that differ);
* ``DistTensor.from_global`` of replicated data;
* ``checkpoint.load_checkpoint`` (ranks reading different files);
* ``Optimizer.load_state_tensors`` (replicas of the momentum buffer differ, or the step
  count does);
* ``replicas.check_replicas`` (what ``train.py --check-replicas-every`` calls) names the
  first tensor whose replicas differ and passes on a consistent model, also when shards
  legitimately differ between the ranks of a channel split.

Negative controls: the same calls with equal values on every rank succeed, and each
check is shown to fire on a one-element difference.
"""
from collections import OrderedDict

import numpy as np
import pytest

from tests.mpi_harness import mpi, mpi_tmp_path

RANKS = (2, 4)
T = 90


def f64():
    import distconv as dc
    dc.set_default_dtype(np.float64)


def linear_dp(comm):
    """Linear(4, 3) replicated on every rank (data parallelism)."""
    import distconv as dc
    dc.manual_seed(0)
    return dc.nn.Linear(4, 3, strategy=dc.Strategy(sample=comm.size))


def split_net(comm):
    """Conv (channel split) -> BN -> Conv (filter split): shards differ by rank."""
    import distconv as dc
    from distconv import nn
    dc.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, strategy=dc.Strategy(channel=2)),
                         nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 2, 1, strategy=dc.Strategy(filter=2)))


def all_ranks_same(comm, sd):
    """Every rank's state dict equals rank 0's (bitwise)."""
    mine = {k: np.asarray(v) for k, v in sd.items()}
    ref = comm.bcast(mine, root=0)
    return all(np.array_equal(mine[k], ref[k]) for k in ref)


def assert_unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


# ------------------------------------------------------------------ load_state_dict
@mpi(ranks=RANKS, timeout=T)
def test_load_state_dict_rank_dependent_values_raise_everywhere(comm):
    f64()
    m = linear_dp(comm)
    before = m.state_dict()
    sd = {k: np.full(v.shape, float(comm.rank), v.dtype) for k, v in before.items()}
    with pytest.raises(RuntimeError, match=r'the values of "weight", "bias" differ between '
                                           r"ranks"):
        m.load_state_dict(sd)
    assert_unchanged(m, before)
    # only one element of one key differs, on the last rank only
    sd = {k: np.full(v.shape, 0.5, v.dtype) for k, v in before.items()}
    if comm.rank == comm.size - 1:
        sd["bias"][2] = np.nextafter(0.5, 1.0)
    with pytest.raises(RuntimeError, match=r'the values of "bias" differ between ranks'):
        m.load_state_dict(sd)
    assert_unchanged(m, before)
    # negative control: the same values everywhere load, and the replicas agree
    sd["bias"][2] = 0.5
    r = m.load_state_dict(sd)
    assert r.missing_keys == [] and r.unexpected_keys == []
    got = m.state_dict()
    assert all_ranks_same(comm, got) and np.all(got["weight"] == 0.5)
    from distconv.replicas import check_replicas
    check_replicas(m)


@mpi(ranks=RANKS, timeout=T)
def test_load_state_dict_key_on_some_ranks_only(comm):
    """strict=False with a key given on rank 0 only: the others would keep their old
    value, so it is refused on every rank."""
    f64()
    m = linear_dp(comm)
    before = m.state_dict()
    sd = {"weight": before["weight"] + 1.0}
    if comm.rank == 0:
        sd["bias"] = before["bias"] + 1.0
    with pytest.raises(RuntimeError, match=r'the values of "bias" differ between ranks \(or '
                                           r"are given on some ranks only\)"):
        m.load_state_dict(sd, strict=False)
    assert_unchanged(m, before)
    r = m.load_state_dict({"weight": before["weight"] + 1.0}, strict=False)
    assert r.missing_keys == ["bias"] and r.unexpected_keys == []
    assert np.array_equal(m.state_dict()["weight"], before["weight"] + 1.0)


@mpi(ranks=(2, 4), timeout=T)
def test_load_state_dict_split_model(comm):
    """Channel/filter-split layers: a dict that differs by rank is refused too (each rank
    would keep a shard of a different dict)."""
    f64()
    net = split_net(comm)
    before = net.state_dict()
    sd = {k: (v + comm.rank if v.dtype.kind == "f" else v) for k, v in before.items()}
    with pytest.raises(RuntimeError, match=r'the values of "0.weight", "0.bias", "1.weight", '
                                           r'"1.bias", "1.running_mean", "1.running_var", '
                                           r'"3.weight", "3.bias" differ'):
        net.load_state_dict(sd)
    assert_unchanged(net, before)
    net.load_state_dict({k: v * 2 for k, v in before.items()})
    assert all_ranks_same(comm, net.state_dict())


# ------------------------------------------------------------------ from_global
@mpi(ranks=RANKS, timeout=T)
def test_from_global_rank_dependent_values(comm):
    f64()
    import distconv as dc
    from distconv.distribution import Distribution
    g = dc.Strategy(sample=comm.size).grid()
    rep = Distribution.replicated(g, 2)
    x = np.arange(12.0).reshape(3, 4)
    with pytest.raises(ValueError, match=r"from_global: the ranks passed different values "
                                         r"for the global array of shape \(3, 4\) \(ranks "
                                         r"grouped by equal values: \[\[0\], \[1\]"):
        dc.DistTensor.from_global(x + comm.rank, rep)
    y = x.copy()
    if comm.rank == comm.size - 1:
        y[2, 3] = -0.0 if y[2, 3] == 0 else np.nextafter(y[2, 3], 0)
    with pytest.raises(ValueError, match=r"ranks grouped by equal values"):
        dc.DistTensor.from_global(y, rep)
    t = dc.DistTensor.from_global(x, rep)   # negative control
    np.testing.assert_array_equal(t.local, x)
    # a split distribution: every rank must still pass the same global array
    split = Distribution(g, [("sample",), None])
    with pytest.raises(ValueError, match=r"from_global: the ranks passed different values"):
        dc.DistTensor.from_global(x * (1 + comm.rank), split)
    np.testing.assert_array_equal(dc.DistTensor.from_global(x, split).to_global(), x)


# ------------------------------------------------------------------ checkpoints
@mpi(ranks=RANKS, timeout=T)
def test_checkpoint_ranks_reading_different_files(comm):
    """Each rank loads its own path (e.g. a stale node-local copy): refused everywhere."""
    f64()
    import os

    from distconv import checkpoint, optim
    m = linear_dp(comm)
    opt = optim.SGD(m.parameters(), 0.1, momentum=0.9)
    with mpi_tmp_path(comm) as folder:
        paths = [os.path.join(folder, f"c{i}.h5") for i in range(2)]
        for i, p in enumerate(paths):
            m.load_state_dict({k: v + i for k, v in m.state_dict().items()})
            checkpoint.save_checkpoint(p, m, opt, meta={"i": i})
        before = m.state_dict()
        with pytest.raises(checkpoint.CheckpointError, match=r"the ranks read different "
                                                             r"checkpoint contents \(rank 0: "):
            checkpoint.load_checkpoint(paths[comm.rank % 2], m, opt)
        assert_unchanged(m, before)
        meta = checkpoint.load_checkpoint(paths[0], m, opt)   # negative control
        assert meta == {"i": 0} and all_ranks_same(comm, m.state_dict())


# ------------------------------------------------------------------ optimizer state
@mpi(ranks=RANKS, timeout=T)
def test_optimizer_state_replicas(comm):
    f64()
    from distconv import optim
    from distconv.tensor import DistTensor
    m = linear_dp(comm)
    opt = optim.SGD(m.parameters(), 0.1, momentum=0.9)

    def items(fill):
        return [(i, "momentum_buffer",
                 DistTensor(np.full(p.data.local.shape, fill, np.float64), p.data.distribution,
                            p.shape))
                for i, p in enumerate(opt.params)]

    with pytest.raises(RuntimeError, match=r"SGD.load_state_tensors: the replicas of "
                                           r"optimizer state 'momentum_buffer' of parameter 0, "
                                           r"'momentum_buffer' of parameter 1 differ"):
        opt.load_state_tensors(items(float(comm.rank)), 3)
    assert opt.state == [{}, {}] and opt.step_count == 0
    with pytest.raises(ValueError, match=r"ranks disagree on optimizer step_count"):
        opt.load_state_tensors(items(1.0), 3 + comm.rank)
    with pytest.raises(ValueError, match=r"ranks disagree on optimizer state items"):
        opt.load_state_tensors(items(1.0)[:1] if comm.rank == 0 else items(1.0), 3)
    with pytest.raises(ValueError, match=r"state does not fit the parameters: "
                                         r"'momentum_buffer' of parameter 0: shape \(3,\), "
                                         r"parameter \(3, 4\)"):
        opt.load_state_tensors([(0, "momentum_buffer", items(1.0)[1][2])], 3)
    assert opt.state == [{}, {}] and opt.step_count == 0
    opt.load_state_tensors(items(1.0), 3)  # negative control
    assert opt.step_count == 3 and np.all(opt.state[0]["momentum_buffer"] == 1.0)
    sched = optim.StepLR(opt, step_size=2)
    with pytest.raises(ValueError, match=r"ranks disagree on LR scheduler last_step"):
        sched.load_state_dict({"last_step": comm.rank})
    sched.load_state_dict({"last_step": 5})
    assert sched.last_step == 5 and opt.lr == pytest.approx(0.1 * 0.1 ** 2)


# ------------------------------------------------------------------ periodic check
@mpi(ranks=RANKS, timeout=T)
def test_check_replicas_names_the_first_differing_tensor(comm):
    f64()
    from distconv import optim
    from distconv.replicas import ReplicaMismatchError, check_replicas
    m = linear_dp(comm)
    opt = optim.SGD(m.parameters(), 0.1, momentum=0.9)
    check_replicas(m, opt)                       # consistent: passes
    if comm.rank == comm.size - 1:
        m.bias.data.local[1] += 1e-15
    with pytest.raises(ReplicaMismatchError, match=r"model: the replicas of 'bias' differ "
                                                   r"between ranks$"):
        check_replicas(m, opt)
    if comm.rank == comm.size - 1:
        m.weight.data.local[0, 0] += 1.0
    with pytest.raises(ReplicaMismatchError, match=r"the replicas of 'weight' differ between "
                                                   r"ranks \(and 1 more: \['bias'\]\)"):
        check_replicas(m, opt)
    # optimizer state is checked too
    m2 = linear_dp(comm)
    opt2 = optim.SGD(m2.parameters(), 0.1, momentum=0.9)
    opt2.state[1]["momentum_buffer"] = np.full(m2.bias.data.local.shape, float(comm.rank))
    with pytest.raises(ReplicaMismatchError, match=r"optimizer state 'momentum_buffer' of "
                                                   r"bias"):
        check_replicas(m2, opt2)


@mpi(ranks=(2, 4), timeout=T)
def test_check_replicas_split_shards_are_not_replicas(comm):
    """Ranks of a channel or filter split hold different shards: that is not a mismatch;
    a difference between the two sample groups' copies of one shard is."""
    f64()
    from distconv.replicas import ReplicaMismatchError, check_replicas
    net = split_net(comm)
    check_replicas(net)
    if comm.size == 2:
        return  # no replicas of a shard at 2 ranks: nothing can differ
    # 4 ranks: sample=2 x channel=2; rank 3 holds the same shard of 0.weight as rank 1
    if comm.rank == 3:
        net[0].weight.data.local[...] += 1.0
    with pytest.raises(ReplicaMismatchError, match=r"the replicas of '0.weight' differ"):
        check_replicas(net)


@mpi(ranks=RANKS, timeout=T)
def test_load_state_dict_bad_type_on_one_rank(comm):
    """A non-mapping, or a value that cannot be cast, on one rank only: the same error on
    every rank instead of the others waiting in a collective."""
    f64()
    m = linear_dp(comm)
    good = m.state_dict()
    with pytest.raises(TypeError, match=r"Expected state_dict to be dict-like, got <class "
                                        r"'list'>\. \(on rank\(s\) \[0\]\)"):
        m.load_state_dict(list(good.items()) if comm.rank == 0 else good)
    bad = dict(good)
    if comm.rank == comm.size - 1:
        bad["bias"] = np.array(["a", "b", "c"])
    with pytest.raises(RuntimeError, match=r'While copying the parameter named "bias".*'
                                           rf"\(on rank\(s\) \[{comm.size - 1}\]\)"):
        m.load_state_dict(bad)
    assert_unchanged(m, good)
    odd = OrderedDict(good)
    odd._metadata = ["not", "a", "dict"] if comm.rank == 0 else good._metadata
    with pytest.raises(RuntimeError, match=r"cannot read the state dict: AttributeError.*"
                                           r"\(on rank\(s\) \[0\]\)"):
        m.load_state_dict(odd)
    m.load_state_dict(good)  # negative control
