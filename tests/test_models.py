"""The ResNet family against a torchvision-style torch oracle, and the optimizers, LR
schedules and overlapped gradient sync against torch.optim / ``nn.sync_gradients``.

Plain tests (one process): state-dict names and shapes of every model equal the oracle's
(scripts/torch_resnet.py), weights move both ways and give the same logits (float32, eval
and train mode, batch-norm running statistics included), the LR schedules give torch's
lr sequences. MPI cases (1, 2 ranks; GradientSync also at 4): a train step's loss,
logits, input gradient, weight gradients and running statistics match torch float64
under per-layer plans; SGD (momentum, Nesterov, weight decay) and Adam match
torch.optim over 3 steps to 1e-10 with sharded state; GradientSync (bucketed,
overlapped) sums exactly what ``sync_gradients`` sums.

torch is imported lazily (inside the tests) so that the MPI launches stay cheap.
"""
import numpy as np
import pytest

from tests.mpi_harness import mpi

# models at tiny widths: (distconv factory name, torch oracle arguments, distconv kwargs,
# input shape). base_width 4 keeps even wide_resnet50_2 at a few thousand weights.
MODELS = {
    "small_resnet": dict(block="basic", layers=[1, 1], in_channels=1, stem="cifar",
                         base_width=4, x=(4, 1, 8, 8)),
    "resnet18": dict(block="basic", layers=[2, 2, 2, 2], in_channels=3, stem="imagenet",
                     base_width=4, x=(4, 3, 64, 64)),
    "resnet34": dict(block="basic", layers=[3, 4, 6, 3], in_channels=3, stem="cifar",
                     base_width=4, x=(4, 3, 16, 16)),
    "resnet50": dict(block="bottleneck", layers=[3, 4, 6, 3], in_channels=3, stem="cifar",
                     base_width=4, x=(4, 3, 16, 16)),
    "wide_resnet50_2": dict(block="bottleneck", layers=[3, 4, 6, 3], in_channels=2,
                            stem="imagenet", base_width=4, width_per_group=128,
                            x=(4, 2, 48, 48)),
}
NUM_CLASSES = 7


def build_dc(name, strategy=None, seed=0):
    """The distconv model ``name`` at the tiny width of :data:`MODELS`."""
    import distconv as dc
    from distconv import models

    spec = MODELS[name]
    dc.manual_seed(seed)
    if name == "small_resnet":
        return models.small_resnet(NUM_CLASSES, in_channels=spec["in_channels"],
                                   width=spec["base_width"], strategy=strategy)
    return models.MODELS[name](NUM_CLASSES, in_channels=spec["in_channels"],
                               stem=spec["stem"], base_width=spec["base_width"],
                               strategy=strategy)


def build_torch(name, dtype, seed=0):
    """The torch oracle of ``name`` (own random initialisation from ``seed``)."""
    import torch

    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "torch_resnet", Path(__file__).resolve().parents[1] / "scripts" / "torch_resnet.py")
    tr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tr)

    spec = MODELS[name]
    torch.manual_seed(seed)
    block = tr.BasicBlock if spec["block"] == "basic" else tr.Bottleneck
    m = tr.ResNet(block, spec["layers"], NUM_CLASSES, in_channels=spec["in_channels"],
                  stem=spec["stem"], base_width=spec["base_width"],
                  width_per_group=spec.get("width_per_group", 64))
    return m.to(dtype)


def perturb(sd, seed):
    """``sd`` with random batch-norm affine parameters and running statistics (so that eval
    mode is not the identity and every tensor matters)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in sd.items():
        v = np.array(v, copy=True)
        if k.endswith("running_var"):
            v = rng.uniform(0.5, 2.0, v.shape).astype(v.dtype)
        elif k.endswith("running_mean") or (k.endswith(("bn1.bias", "bn2.bias", "bn3.bias",
                                                        "downsample.1.bias"))):
            v = (0.3 * rng.standard_normal(v.shape)).astype(v.dtype)
        elif k.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
            v = rng.uniform(0.5, 1.5, v.shape).astype(v.dtype)
        elif k.endswith("num_batches_tracked"):
            v = np.asarray(3, dtype=v.dtype)
        out[k] = v
    return out


def torch_sd_numpy(tm):
    return {k: v.detach().cpu().numpy().copy() for k, v in tm.state_dict().items()}


def load_into_torch(tm, sd):
    import torch

    tm.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()})


def dc_logits(model, x):
    from distconv.backend import to_numpy

    return np.asarray(to_numpy(model(x).to_global()))


# ================================================================== plain tests

@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_keys_and_shapes_match_torch(name, torch1):
    torch = torch1

    sd = build_dc(name).state_dict()
    tsd = build_torch(name, torch.float32).state_dict()
    assert list(sd) == list(tsd)  # same names, same order
    for k in sd:
        assert tuple(sd[k].shape) == tuple(tsd[k].shape), k


def _check_logits(m, tm, x, name, what):
    """distconv vs torch logits, float32, in eval and in train mode. Eval: 1e-5. Train
    mode normalises with batch statistics of a few values per channel in the last stages,
    which amplifies float32 rounding: torch's own float32 logits of the 50-layer models are
    ~1e-5 off the float64 answer there. So in train mode the bound is 1e-5 or three times
    torch's own float32 error against torch float64, whichever is larger."""
    import copy

    import torch

    with torch.no_grad():
        for train in (False, True):
            tm64 = copy.deepcopy(tm).to(torch.float64).train(train)
            m.train(train)
            tm.train(train)
            got, want = dc_logits(m, x), tm(torch.from_numpy(x)).numpy()
            exact = tm64(torch.from_numpy(x.astype(np.float64))).numpy()
            tol = 1e-5 if not train else max(1e-5, 3 * float(np.abs(want - exact).max()))
            np.testing.assert_allclose(got, want, rtol=0, atol=tol,
                                       err_msg=f"{name} {what} train={train}")


@pytest.mark.parametrize("name", list(MODELS))
def test_weights_move_both_ways_float32(name, torch1):
    """distconv -> torch and torch -> distconv give the same logits (float32) in eval and
    in train mode; train mode updates the running statistics alike; state dicts round-trip
    exactly."""
    import torch

    import distconv as dc

    dc.set_default_dtype(np.float32)
    x = np.random.default_rng(1).standard_normal(MODELS[name]["x"]).astype(np.float32)
    m = build_dc(name)
    tm = build_torch(name, torch.float32, seed=5)

    # distconv -> torch (BN parameters and statistics randomised first)
    m.load_state_dict(perturb(m.state_dict(), 2))
    load_into_torch(tm, m.state_dict())
    _check_logits(m, tm, x, name, "dc->torch")
    sd, tsd = m.state_dict(), torch_sd_numpy(tm)
    for k in sd:  # the train-mode forward moved the running statistics the same way
        np.testing.assert_allclose(sd[k], tsd[k], rtol=1e-5, atol=1e-5, err_msg=k)

    # torch -> distconv: torch's own initialisation, randomised BN state
    tm2 = build_torch(name, torch.float32, seed=7)
    load_into_torch(tm2, perturb(torch_sd_numpy(tm2), 3))
    m.load_state_dict(torch_sd_numpy(tm2))
    back = m.state_dict()
    for k, v in torch_sd_numpy(tm2).items():  # an exact round trip
        assert back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    _check_logits(m, tm2, x, name, "torch->dc")


def _lr_sequence(sched, opt, n):
    out = [opt.lr]
    for _ in range(n):
        sched.step()
        out.append(opt.lr)
    return out


def _torch_lr_sequence(sched, opt, n):
    out = [opt.param_groups[0]["lr"]]
    for _ in range(n):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("kind", ["step", "cosine", "warmup", "warmup_cosine"])
def test_lr_schedules_match_torch(kind, torch1):
    import warnings

    import torch

    import distconv as dc
    from distconv import optim

    base, n = 0.1, 30
    lin = dc.nn.Linear(3, 2)
    opt = optim.SGD(lin.parameters(), lr=base, momentum=0.9)
    tp = [torch.nn.Parameter(torch.zeros(2))]
    topt = torch.optim.SGD(tp, lr=base, momentum=0.9)
    T = torch.optim.lr_scheduler
    if kind == "step":
        s, ts = optim.StepLR(opt, step_size=4, gamma=0.5), T.StepLR(topt, 4, gamma=0.5)
    elif kind == "cosine":
        n = 12  # beyond T_max torch's cosine rises again; distconv's stays at eta_min
        s = optim.CosineAnnealingLR(opt, T_max=12, eta_min=0.005)
        ts = T.CosineAnnealingLR(topt, T_max=12, eta_min=0.005)
    elif kind == "warmup":
        s = optim.LinearWarmup(opt, 6, start_factor=0.1)
        ts = T.LinearLR(topt, start_factor=0.1, end_factor=1.0, total_iters=6)
    else:
        s = optim.LinearWarmup(opt, 6, start_factor=0.1,
                               after=optim.CosineAnnealingLR(opt, T_max=n - 6))
        ts = T.SequentialLR(topt, [T.LinearLR(topt, start_factor=0.1, total_iters=6),
                                   T.CosineAnnealingLR(topt, T_max=n - 6)], milestones=[6])
    got = _lr_sequence(s, opt, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _torch_lr_sequence(ts, topt, n)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    if kind == "cosine":
        for _ in range(5):
            s.step()
            assert opt.lr == pytest.approx(0.005, rel=1e-12)
    # the state round-trips: a fresh schedule resumed at step k continues the sequence
    state = s.state_dict()
    opt2 = optim.SGD(lin.parameters(), lr=base)
    s2 = {"step": lambda: optim.StepLR(opt2, step_size=4, gamma=0.5),
          "cosine": lambda: optim.CosineAnnealingLR(opt2, T_max=12, eta_min=0.005),
          "warmup": lambda: optim.LinearWarmup(opt2, 6, start_factor=0.1),
          "warmup_cosine": lambda: optim.LinearWarmup(
              opt2, 6, start_factor=0.1, after=optim.CosineAnnealingLR(opt2, T_max=n - 6))}[kind]()
    s2.load_state_dict(state)
    assert opt2.lr == opt.lr


# ================================================================== MPI cases
def _plans(size):
    return {
        "filter_layer2": {"": "sample=*", "layer2": f"sample=1,filter={size}"},
        "mixed": {"": "sample=*", "layer1": f"sample=1,channel={size}",
                  "layer2": f"sample=1,filter={size}", "fc": f"sample=1,channel={size}"},
    }


def _grads_vs_torch(comm, name, plan_name):
    import torch

    import distconv as dc
    from distconv.backend import to_numpy

    torch.set_num_threads(1)
    dc.set_default_dtype(np.float64)
    plan = _plans(comm.size)[plan_name]
    m = build_dc(name, strategy=plan)
    m.load_state_dict(perturb(m.state_dict(), 4))
    tm = build_torch(name, torch.float64)
    load_into_torch(tm, m.state_dict())
    m.train()
    tm.train()
    rng = np.random.default_rng(11)
    shape = (5,) + MODELS[name]["x"][1:]  # 5 samples: uneven blocks on 2 ranks
    x = rng.standard_normal(shape)
    y = rng.integers(0, NUM_CLASSES, size=shape[0])

    crit = dc.nn.CrossEntropyLoss()
    logits = m(x)
    loss = crit(logits, y)
    dx = m.backward(crit.backward())
    dc.sync_gradients(m.parameters())

    tx = torch.from_numpy(x).requires_grad_(True)
    tlogits = tm(tx)
    tloss = torch.nn.functional.cross_entropy(tlogits, torch.from_numpy(y))
    tloss.backward()

    assert loss == pytest.approx(tloss.item(), rel=1e-12)
    np.testing.assert_allclose(to_numpy(logits.to_global()), tlogits.detach().numpy(),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(dx.to_global()), tx.grad.numpy(), rtol=1e-9,
                               atol=1e-13)
    tparams = dict(tm.named_parameters())
    names = [n for n, _ in m.named_parameters()]
    assert names == list(tparams)
    for n, p in m.named_parameters():
        assert not p.grad.distribution.pending, n
        np.testing.assert_allclose(to_numpy(p.grad.to_global()), tparams[n].grad.numpy(),
                                   rtol=1e-9, atol=1e-12, err_msg=n)
    sd, tsd = m.state_dict(), torch_sd_numpy(tm)
    for k in sd:  # running statistics after one train-mode step
        np.testing.assert_allclose(sd[k], tsd[k], rtol=1e-10, atol=1e-13, err_msg=k)


@pytest.mark.parametrize("plan_name", ["filter_layer2", "mixed"])
@mpi(ranks=(1, 2), timeout=90)
def test_train_step_gradients_match_torch_small_resnet(comm, plan_name):
    _grads_vs_torch(comm, "small_resnet", plan_name)


@mpi(ranks=(2,), timeout=90)
def test_train_step_gradients_match_torch_resnet50(comm):
    """Bottlenecks with downsample shortcuts under the layer2 filter-parallel plan."""
    _grads_vs_torch(comm, "resnet50", "filter_layer2")


OPTS = {
    "sgd_momentum": ("sgd", dict(lr=0.1, momentum=0.9)),
    "sgd_nesterov_wd": ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgd_plain_wd": ("sgd", dict(lr=0.2, weight_decay=1e-3)),
    "adam": ("adam", dict(lr=0.01, weight_decay=0.0)),
    "adam_wd": ("adam", dict(lr=0.02, betas=(0.8, 0.99), weight_decay=1e-2)),
}


def _strategy(kind, size):
    return {"sample": "sample=*", "channel": f"sample=1,channel={size}",
            "filter": f"sample=1,filter={size}",
            "plan": {"": "sample=*", "layer2": f"sample=1,filter={size}",
                     "fc": f"sample=1,channel={size}"}}[kind]


class _FunctionalTorchOpt:
    """torch.optim's SGD / Adam through their functional forms (``torch.optim.sgd.sgd``,
    ``torch.optim.adam.adam``: the code the classes run). The classes import torch._dynamo
    on construction (~3 CPU-s per rank), too dear inside every MPI launch; the plain test
    :func:`test_optimizers_match_torch_optim_classes` uses the classes themselves."""

    def __init__(self, kind, kw, params):
        import torch

        self.kind, self.kw, self.params = kind, dict(kw), params
        if kind == "sgd":
            self.bufs = [None] * len(params)
        else:
            self.m = [torch.zeros_like(p) for p in params]
            self.v = [torch.zeros_like(p) for p in params]
            self.t = [torch.tensor(0.0) for _ in params]

    def step(self):
        import torch
        from torch.optim.adam import adam
        from torch.optim.sgd import sgd

        kw = self.kw
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            if self.kind == "sgd":
                sgd(self.params, grads, self.bufs, weight_decay=kw.get("weight_decay", 0.0),
                    momentum=kw.get("momentum", 0.0), lr=kw["lr"], dampening=0.0,
                    nesterov=kw.get("nesterov", False), maximize=False)
            else:
                b1, b2 = kw.get("betas", (0.9, 0.999))
                adam(self.params, grads, self.m, self.v, [], self.t, amsgrad=False, beta1=b1,
                     beta2=b2, lr=kw["lr"], weight_decay=kw.get("weight_decay", 0.0),
                     eps=1e-8, maximize=False)

    def state(self, i, key):
        return {"momentum_buffer": lambda: self.bufs[i], "exp_avg": lambda: self.m[i],
                "exp_avg_sq": lambda: self.v[i]}[key]()


class _ClassTorchOpt:
    def __init__(self, kind, kw, params):
        import torch

        cls = torch.optim.SGD if kind == "sgd" else torch.optim.Adam
        self.opt = cls(params, **kw)
        self.params = params

    def step(self):
        self.opt.step()

    def state(self, i, key):
        return self.opt.state[self.params[i]][key]


def _optimizer_vs_torch(comm_size, opt_name, strategy, torch_opt_cls):
    """3 steps of distconv's optimizer vs torch's fed the same gradients: weights and
    optimizer state equal to 1e-10 (float64); the state is held as local shards."""
    import torch

    import distconv as dc
    from distconv import optim
    from distconv.backend import to_numpy

    dc.set_default_dtype(np.float64)
    kind, kw = OPTS[opt_name]
    m = build_dc("small_resnet", strategy=_strategy(strategy, comm_size))
    m.load_state_dict(perturb(m.state_dict(), 6))
    named = list(m.named_parameters())
    tparams = [torch.nn.Parameter(torch.from_numpy(to_numpy(p.data.to_global()).copy()))
               for _, p in named]
    opt = (optim.SGD if kind == "sgd" else optim.Adam)(m.parameters(), **kw)
    topt = torch_opt_cls(kind, kw, tparams)
    crit = dc.nn.CrossEntropyLoss()
    rng = np.random.default_rng(3)
    split_seen = False
    for step in range(3):
        x = rng.standard_normal((6, 1, 8, 8))
        y = rng.integers(0, NUM_CLASSES, size=6)
        opt.zero_grad()
        crit(m(x), y)
        m.backward(crit.backward())
        dc.sync_gradients(m.parameters())
        for (n, p), tp in zip(named, tparams):
            tp.grad = torch.from_numpy(to_numpy(p.grad.to_global()).copy())
        opt.step()
        topt.step()
        assert opt.step_count == step + 1
        for (n, p), tp in zip(named, tparams):
            np.testing.assert_allclose(to_numpy(p.data.to_global()), tp.detach().numpy(),
                                       rtol=1e-10, atol=1e-12, err_msg=f"step {step}: {n}")
        # state: local shards of the parameter's shape, globally equal to torch's
        for i, (n, p) in enumerate(named):
            for k, v in opt.state[i].items():
                if k == "step":
                    continue
                assert v.shape == p.data.local.shape, (n, k)
                split_seen |= v.shape != tuple(p.shape)
        for i, k, t in opt.state_tensors():
            n, p = named[i]
            assert t.distribution == p.data.distribution
            np.testing.assert_allclose(to_numpy(t.to_global()), topt.state(i, k).numpy(),
                                       rtol=1e-10, atol=1e-13, err_msg=f"step {step}: {n} {k}")
        keys = {k for _, k, _ in opt.state_tensors()}
        if kind == "sgd":
            assert keys == ({"momentum_buffer"} if kw.get("momentum") else set())
        else:
            assert keys == {"exp_avg", "exp_avg_sq"}
    if comm_size > 1 and strategy != "sample" and keys:
        assert split_seen, "no optimizer state was sharded under a channel/filter split"


@pytest.mark.parametrize("strategy", ["sample", "channel", "filter", "plan"])
@pytest.mark.parametrize("opt_name", list(OPTS))
@mpi(ranks=(1, 2), timeout=90)
def test_optimizers_match_torch(comm, opt_name, strategy):
    import torch

    torch.set_num_threads(1)
    _optimizer_vs_torch(comm.size, opt_name, strategy, _FunctionalTorchOpt)


@pytest.mark.parametrize("opt_name", list(OPTS))
def test_optimizers_match_torch_optim_classes(opt_name, torch1):
    """The same against ``torch.optim.SGD`` / ``torch.optim.Adam`` themselves (1 rank)."""
    _optimizer_vs_torch(1, opt_name, "sample", _ClassTorchOpt)


def _gradsync_model(size, seed=0):
    import distconv as dc

    plan = {"": "sample=*", "layer2": f"sample={max(1, size // 2)},filter={min(2, size)}",
            "fc": f"sample=1,channel={size}"}
    dc.manual_seed(seed)
    return build_dc("small_resnet", strategy=plan, seed=seed)


@pytest.mark.parametrize("bucket_bytes,overlap", [(64, True), (4 << 20, True), (64, False)])
@mpi(ranks=(1, 2, 4), timeout=90)
def test_gradient_sync_equals_sync_gradients(comm, bucket_bytes, overlap):
    """GradientSync (small buckets: many nonblocking allreduces started during backward;
    one big bucket; no overlap) gives the gradients of ``nn.sync_gradients``, and the
    optimizer steps that use it give the same weights."""
    import distconv as dc
    from distconv import optim
    from distconv.backend import to_numpy

    dc.set_default_dtype(np.float64)
    rng = np.random.default_rng(5)
    crit = dc.nn.CrossEntropyLoss()
    a, b = _gradsync_model(comm.size), _gradsync_model(comm.size)
    opt_a = optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    sync = optim.GradientSync(a, opt_a, bucket_bytes=bucket_bytes, overlap=overlap)
    assert opt_a.sync is sync
    for step in range(2):
        x = rng.standard_normal((7, 1, 8, 8))
        y = rng.integers(0, NUM_CLASSES, size=7)
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            crit(m(x), y)
            m.backward(crit.backward())
        if overlap and comm.size > 1 and bucket_bytes == 64:
            assert sync._inflight, "no allreduce was started during backward"
        sync.wait()
        dc.sync_gradients(b.parameters())
        for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert pa.grad.distribution == pa.data.distribution, n
            assert pb.grad.distribution == pb.data.distribution, n
            np.testing.assert_allclose(to_numpy(pa.grad.local), to_numpy(pb.grad.local),
                                       rtol=1e-13, atol=1e-16, err_msg=n)
        opt_a.step()  # wait() again inside step: a no-op
        opt_b.step()
        for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            np.testing.assert_allclose(to_numpy(pa.data.local), to_numpy(pb.data.local),
                                       rtol=1e-13, atol=1e-16, err_msg=n)
    assert (sync.bytes > 0) == (comm.size > 1)
