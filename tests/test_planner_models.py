"""The planner on the OptCNN/FlexFlow networks: AlexNet and VGG (adaptive average pooling to
6x6 and 7x7, Dropout) and Inception-v3.

* the traced graph prices ``AdaptiveAvgPool2d`` of any output size (an ``avgpool`` layer
  with ``output_size``; 1x1 stays the global ``gap``), upsampling and overlapping bins
  included; a layer whose real output differs from what the planner assumes is refused
  (negative control); the trace draws no dropout mask (a real forward does);
* its compute price: the fitted model (a machine file's ``avgpool`` rates apply; without
  them the one-core defaults: negative control), the measured kernel and its cache key,
  the shard of the strategy's split;
* ``scripts/plan.py --model vgg16_bn`` (4 times narrower, 512 hidden) plans at 224x224
  on ``v100_ib`` and records train.py's knobs;
* under MPI (2 ranks), the planner's own plan of small AlexNet and VGG-BN variants is
  applied to the real models (AlexNet with its convs 8 times narrower, VGG with batch
  norm on a short configuration) and one training step matches torchvision in float64; the
  same comparison against a reference with one bias changed fails (negative control).
"""
import json

import numpy as np
import pytest

from distconv import models, nn
from distconv.planner.graph import GraphError, trace
from tests.mpi_harness import mpi

CFG = [8, "M", 16, "M", 16, "M", 16, "M", 16, "M"]


def _small(name):
    if name == "alexnet":
        return models.alexnet(5, hidden=32, width_divisor=8)
    return models.VGG(CFG, name.endswith("_bn"), 5, hidden=32)


@pytest.mark.parametrize("name,hw,pooled", [
    ("alexnet", 63, (1, 1)),     # 1x1 features upsampled to 6x6
    ("alexnet", 127, (3, 3)),    # 3x3 -> 6x6: overlapping bins
    ("vgg11", 40, (1, 1)),       # 1x1 -> 7x7
    ("vgg11", 320, (10, 10))])   # 10x10 -> 7x7: bins of 2 and 3
def test_adaptive_pool_traced_as_average_pool(name, hw, pooled):
    m = _small(name)
    g = trace(m, (3, 3, hw, hw))
    pool = {x.name: x for x in g.layers()}["avgpool"]
    out = (6, 6) if name == "alexnet" else (7, 7)
    assert pool.kind == "avgpool" and pool.attrs == {"output_size": out}
    assert pool.in_shape[2:] == pooled and pool.out_shape[2:] == out
    drop = [x for x in g.layers() if x.attrs.get("layer") == "Dropout"]
    assert len(drop) == 2 and all(x.kind == "relu" for x in drop)
    # 1x1 output keeps its own kind (the global average)
    g2 = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
               (2, 3, 9, 9))
    assert [x.kind for x in g2.layers()] == ["conv", "gap", "flatten"]


def test_tracing_draws_no_dropout_mask(monkeypatch):
    """The shape-only trace gives Dropout a shape-only mask: at the paper-scale batches
    (32 768 x 9 216 features for AlexNet) hashing the real mask took seconds and GBs.
    Negative control: a real training-mode forward does draw it."""
    from distconv.ops import dropout as dmod
    calls = []
    orig = dmod.dropout_mask

    def spy(*a, **kw):
        calls.append(a[0])
        return orig(*a, **kw)
    monkeypatch.setattr(dmod, "dropout_mask", spy)
    m = _small("alexnet")
    g = trace(m, (65536, 3, 63, 63))
    assert calls == [] and g.out_shape == (65536, 5)
    assert [x.step for _, x in m.named_modules() if isinstance(x, nn.Dropout)] == [0, 0]
    m(np.zeros((2, 3, 63, 63), np.float32))
    assert len(calls) == 2


def test_a_layer_that_differs_from_the_planners_shape_is_refused():
    """Negative control: the planner's output shape is checked against the real layer's."""
    class Odd(nn.AdaptiveAvgPool2d):
        def _out_hw(self, H, W):
            return (3, 4)   # not what output_size (3, 3) says
    m = nn.Sequential(nn.Conv2d(3, 4, 3), Odd(3), nn.Flatten(), nn.Linear(48, 2))
    with pytest.raises(GraphError, match=r"cannot price layer '1'.*\(2, 4, 3, 3\).*"
                                         r"\(2, 4, 3, 4\)"):
        trace(m, (2, 3, 9, 9))


def test_adaptive_pool_compute_price():
    from distconv.planner.compute import ComputeModel, work
    from distconv.planner.costs import CostModel
    from distconv.planner.events import act_dist
    from distconv.planner.machine import Machine, builtin

    v100 = Machine.load(builtin("v100_ib"))
    rates = v100.compute["rates"]["avgpool"]
    cm = ComputeModel(measure=False, backend="numpy", rates=v100.compute["rates"])
    fw, bw = cm.adaptive_avgpool(8, 256, 13, 13, 6, 6)
    a = dict(n=8, c=256, h=13, w=13, ho=6, wo=6)
    assert fw == pytest.approx(rates["t0"] + work("adaptive_fwd", a, 4) / rates["rate"])
    assert bw == pytest.approx(rates["t0"] + work("adaptive_bwd", a, 4) / rates["rate"])
    # negative control: without the machine's rates, one CPU core's (~100x slower here)
    cpu = ComputeModel(measure=False, backend="numpy").adaptive_avgpool(8, 256, 13, 13, 6, 6)
    assert cpu[0] > 20 * fw
    assert cm.adaptive_avgpool(0, 256, 13, 13, 6, 6) == (0.0, 0.0)

    # in the cost model: the shard of the input's split (rank 0's block), no communication
    g = trace(models.alexnet(1000), (64, 3, 224, 224))
    pool = {x.name: x for x in g.layers()}["avgpool"]
    cost = CostModel(g, 4, v100)
    whole = cost.layer(pool, None, act_dist((1, 1, 4), 4))   # C split in 4
    half = cost.layer(pool, None, act_dist((2, 1, 2), 4))    # N in 2, C in 2
    assert whole.comm_fwd == whole.comm_bwd == 0 and whole.mem == 0
    assert whole.compute_fwd == pytest.approx(cm.adaptive_avgpool(64, 64, 6, 6, 6, 6)[0])
    assert half.compute_fwd == pytest.approx(cm.adaptive_avgpool(32, 128, 6, 6, 6, 6)[0])


def test_adaptive_pool_measured_and_cached(tmp_path):
    from distconv.planner.compute import ComputeModel
    path = tmp_path / "cache.json"
    cm = ComputeModel(path, measure=True, backend="numpy", threads=1, reps=1,
                      evict_bytes=0)
    fw, bw = cm.adaptive_avgpool(2, 3, 5, 5, 7, 7)
    assert fw > 0 and bw > 0 and cm.measured == 2
    cm.save()
    keys = json.loads(path.read_text())["entries"]
    assert any(k.startswith("adaptive_fwd|n=2,c=3,h=5,w=5,ho=7,wo=7|") for k in keys)
    again = ComputeModel(path, measure=False, backend="numpy", threads=1, evict_bytes=0)
    assert again.adaptive_avgpool(2, 3, 5, 5, 7, 7) == (fw, bw)


def test_plan_script_plans_vgg16_bn(tmp_path):
    from tests.test_plan_script import load_script
    out = tmp_path / "plan.json"
    assert load_script().main(["--model", "vgg16_bn", "--batch", "128", "--ranks", "4",
                               "--machine", "v100_ib", "--width-divisor", "4", "--hidden",
                               "512", "--out", str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    names = [n for n, m in models.vgg16_bn(width_divisor=4, hidden=512).named_modules()
             if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    assert list(doc["plan"]) == names and len(names) == 13 + 13 + 3
    assert doc["meta"]["model"] == "vgg16_bn" and doc["meta"]["hidden"] == 512
    assert doc["meta"]["width_divisor"] == 4 and doc["meta"]["input_shape"] == [128, 3, 224,
                                                                                224]


@pytest.mark.parametrize("name,hw", [("alexnet", 63), ("vgg_bn", 33)])
@mpi(ranks=(2,), timeout=180)
def test_planners_plan_matches_torchvision(comm, name, hw):
    """The planner's plan (free communication, so model parallelism pays and the plan
    mixes strategies; the fitted compute model: every rank finds the same plan) applied
    to the real model: one training step equals torchvision's. Negative control: the same
    comparison (AlexNet) with one classifier bias of the reference changed reports
    mismatches."""
    import torch

    import distconv as dc
    from distconv.strategy import Strategy
    from tests.model_ref import compare_step, load_from_torch, share_dropout
    from tests.test_models_vgg_alexnet import _small_dc, _small_torch, _torchvision
    from tests.torch_ref import Report

    dc.set_default_dtype(np.float64)
    tvm = _torchvision()
    torch.manual_seed(0)
    tm = _small_torch(name, tvm, 32, div=8).double()  # VGG: a short configuration
    m = _small_dc(name, dc, div=8)
    res = dc.planner.plan_model(m, (3, 3, hw, hw + 1), comm.size, min_gain=0.0)
    plan = {k: dc.Strategy(*v) for k, v in res["plan"].items()}
    assert len({tuple(v) for v in res["plan"].values()}) >= 2  # a mixed plan
    m.set_strategy(plan)
    share_dropout(m, tm)
    load_from_torch(m, tm, seed=1)
    rng = np.random.default_rng(4)
    x, lab = rng.standard_normal((3, 3, hw, hw + 1)), rng.integers(0, 5, 3)
    rep = Report()
    compare_step(m, tm, x, lab, rep, f"{name} planner plan ({res['chosen']})",
                 Strategy().activation_distribution(4))
    rep.assert_ok(comm)
    if name != "alexnet":  # the negative control of the comparison: once is enough
        return
    with torch.no_grad():
        tm.classifier[-1].bias[0] += 1e-3
    bad = Report()
    compare_step(m, tm, x, lab, bad, "perturbed", Strategy().activation_distribution(4))
    errs = bad.merged(comm)
    assert any("perturbed logits" in e for e in errs), errs
