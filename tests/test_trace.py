"""Shape-only execution (distconv.trace) against a real step on real ranks.

For every model in ``distconv.models`` (small widths) and a user-defined DAG the
library has never seen, under mixed per-layer plans, with and without GradientSync
buckets: the bytes and calls per collective kind that ``shape_only_step`` predicts for
rank r of P (no MPI, no data) equal ``comm.stats()`` of a real training step on rank r,
at 1-4 ranks. A negative control shows the comparison fails for another plan. Also:
tracing needs no mpi4py, the model comes back unchanged, and a model whose code needs
data under shape-only execution gets an error naming the layer.
"""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.mpi_harness import mpi

RANKS = (1, 2, 3, 4)
T = 180


def _plans(p):
    from tests.torch_ref import strategies
    sts = [str(s) for s in strategies(p)]
    return sts[0], sts[-1], sts[len(sts) // 2]


def _models(p):
    import distconv as dc
    from distconv import models, nn
    from tests.test_autograd import _dag_model
    a, b, c = _plans(p)
    return {
        "small_resnet": (lambda: models.small_resnet(num_classes=5, width=6),
                         {"": a, "layer1": b, "layer2.0.conv2": c, "fc": b}, (5, 1, 8, 8)),
        "resnet18": (lambda: models.resnet18(num_classes=7, base_width=4, stem="imagenet"),
                     {"": c, "layer2": a, "layer3.0.downsample": b}, (3, 3, 32, 32)),
        "resnet50": (lambda: models.resnet50(num_classes=3, base_width=2),
                     {"": b, "layer1": c}, (2, 3, 32, 32)),
        "dag": (lambda: _dag_model(p, 1), None, (5, 3, 6, 5)),
        "sequential": (lambda: nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1, strategy=a), nn.BatchNorm2d(5, strategy=b),
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 9, 4, strategy=c)),
            None, (7, 3, 6, 6)),
        "dp": (lambda: models.small_resnet(num_classes=4, width=4), dc.Strategy(), (4, 1, 8, 8)),
    }


def _real_step(comm, model, in_shape, bucket):
    import distconv as dc
    from distconv import nn, optim
    from distconv.comm import wrap
    rng = np.random.default_rng(0)
    x = rng.standard_normal(in_shape)
    labels = rng.integers(0, 3, in_shape[0])
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sync = optim.GradientSync(model, opt, bucket_bytes=bucket) if bucket else None
    world = wrap(None)
    world.reset_stats()
    opt.zero_grad()
    loss = nn.CrossEntropyLoss()(model(x), labels)
    loss.backward()
    opt.step()
    st = world.stats()
    if sync is not None:
        sync.remove()
    del dc
    return st, labels


def _counts(stats):
    return {k: (v["calls"], v["bytes_sent"], v["bytes_recv"]) for k, v in stats.items()}


@pytest.mark.parametrize("bucket", [0, 2048])
@pytest.mark.parametrize("name", ["small_resnet", "resnet18", "resnet50", "dag", "sequential",
                                  "dp"])
@mpi(ranks=RANKS, timeout=T)
def test_shape_only_bytes_equal_real_step(comm, name, bucket):
    import distconv as dc
    from distconv import optim
    from distconv.trace import shape_only_step
    dc.set_default_dtype(np.float64)
    build, plan, in_shape = _models(comm.size)[name]
    dc.manual_seed(3)
    model = build()
    if plan is not None:
        model.set_strategy(plan)
    sd = model.state_dict()
    real, labels = _real_step(comm, model, in_shape, bucket)
    model.load_state_dict(sd)
    sync = (lambda m, o: optim.GradientSync(m, o, bucket_bytes=bucket)) if bucket else None
    tr = shape_only_step(model, in_shape, comm.size, comm.rank, labels=labels, sync=sync)
    assert _counts(tr.stats) == _counts(real), (name, _counts(tr.stats), _counts(real))
    assert sum(e.sent for e in tr.events) == real["total"]["bytes_sent"]
    # the model is back on the real world, unchanged
    after = model.state_dict()
    assert all(np.array_equal(after[k], sd[k]) for k in sd)
    assert model.parameters()[0].data.grid.comm is dc.comm.world()


@mpi(ranks=(2, 3, 4), timeout=T)
def test_shape_only_negative_control_other_plan(comm):
    """A trace of another plan does not match the real step (the comparison can fail)."""
    import distconv as dc
    from distconv.trace import shape_only_step
    dc.set_default_dtype(np.float64)
    build, plan, in_shape = _models(comm.size)["small_resnet"]
    dc.manual_seed(3)
    model = build()
    model.set_strategy(plan)
    real, labels = _real_step(comm, model, in_shape, 0)
    other = {"": _plans(comm.size)[1]}
    tr = shape_only_step(model, in_shape, comm.size, comm.rank, plan=other, labels=labels)
    assert _counts(tr.stats) != _counts(real)


def test_shape_only_trace_and_plan_model_without_mpi4py():
    code = textwrap.dedent("""
        import sys
        sys.modules["mpi4py"] = None          # mpi4py cannot be imported
        import numpy as np
        import distconv as dc
        from distconv import models
        from distconv.trace import shape_only_step, graph_of
        m = models.resnet50(num_classes=1000)
        tr = shape_only_step(m, (256, 3, 224, 224), 1024, rank=5, plan="sample=256,filter=4")
        g = graph_of(tr.nodes)
        kinds = sorted({n for n, *_ in g})
        print(tr.logits_shape, tr.stats["total"]["calls"], len(g), kinds)
        from distconv.planner import machine
        mf = machine.Machine.load(machine.builtin("v100_ib"))
        r = dc.planner.plan_model(models.small_resnet(), (16, 1, 8, 8), 8, machine=mf)
        assert r["predicted"]["step_s"] > 0 and r["plan"]
        assert "mpi4py" not in sys.modules or sys.modules["mpi4py"] is None
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("(256, 1000)")
    assert "'Conv2d'" in out.stdout and "'add'" in out.stdout


def test_shape_only_error_names_the_layer():
    from distconv import nn
    from distconv.trace import shape_only_step

    class BadLayer(nn.Conv2d):
        def _forward(self, x, save):
            int(x.local[0, 0, 0, 0])           # needs a value inside a layer
            return super()._forward(x, save)

    m = nn.Sequential(nn.Conv2d(1, 2, 1), BadLayer(2, 2, 1))
    with pytest.raises(RuntimeError, match=r"shape-only execution failed in forward at '1'"):
        shape_only_step(m, (2, 1, 4, 4), 2)


def test_shape_only_sub_communicators_are_the_grids_subgroups():
    """``ShapeComm.split_grid``: the positions that share this rank's coordinates off the
    axes, ordered row-major over the axes as given (what ``comm.split`` gives a real
    grid), for every rank, axis subset and order of a 3-axis and a 4-axis grid."""
    from itertools import permutations

    from distconv.grid import ProcessGrid
    from distconv.shapecomm import ShapeComm
    for shape in ((2, 3, 4), (2, 1, 3, 2)):
        names = ("a", "b", "c", "d")[:len(shape)]
        size = int(np.prod(shape))
        for r in range(size):
            world = ShapeComm(size, r)
            g = ProcessGrid(world, shape, names)
            for k in range(len(shape) + 1):
                for idx in permutations(range(len(shape)), k):
                    off = [i for i in range(len(shape)) if i not in idx]
                    same = [q for q in range(size) if all(
                        g.coords_of(q)[i] == g.coords[i] for i in off)]
                    want = sorted(same, key=lambda q: [g.coords_of(q)[i] for i in idx])
                    sub = world.split_grid(g, list(idx))
                    assert list(sub.members) == want and sub.rank == want.index(r)


def test_a_shape_only_world_and_its_grids_are_freed_with_it():
    """``get_grid`` keeps a world's grids on the world: a shape-only world that nothing
    else references is freed, grids and all (the planner makes thousands)."""
    import gc
    import weakref

    from distconv import Strategy
    from distconv.grid import get_grid
    from distconv.launch import use_world
    from distconv.shapecomm import ShapeComm
    world = ShapeComm(8, 3)
    with use_world(world):
        g = Strategy(sample=2, filter=4).grid()
    assert g is get_grid((2, 1, 4), ("sample", "channel", "filter"), world)  # shared
    refs = weakref.ref(world), weakref.ref(g)
    del world, g
    gc.collect()
    assert refs[0]() is None and refs[1]() is None
