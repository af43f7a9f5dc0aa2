"""AlexNet and VGG (distconv/models/alexnet.py, vgg.py) against torchvision in float64.

* state-dict keys and shapes equal torchvision's (small variants here; the full models in
  the ``slow`` test), weights load from torchvision, eval-mode logits equal torchvision's
  (also at a size where adaptive pooling averages overlapping bins), with a negative
  control (a classifier weight in the wrong flatten order is caught);
* one training step (dropout included: the reference uses distconv's mask) matches on 1
  and 2 ranks under two mixed per-layer plans per model: logits, loss, the input gradient,
  every parameter gradient, running statistics;
* an image below the minimum size raises, naming it, on every rank.

torchvision is optional here (skipped when missing); see tests/model_ref.py for how it is
imported against the CPU torch.
"""
import numpy as np
import pytest

from tests.mpi_harness import mpi

NUM_CLASSES = 5
CFG = [8, "M", 16, "M", 16, "M", 16, "M", 16, "M"]


def _torchvision():
    from tests.model_ref import torchvision_models
    return torchvision_models()


@pytest.fixture
def layers():
    import distconv as dc
    return dc


def _small_torch(name, tvm, hidden, div=1):
    """torchvision's model with the classifier's Linear layers shrunk to ``hidden`` (same
    positions, so the same keys); VGG on a short configuration; AlexNet's convs with their
    channel counts divided by ``div``."""
    import torch

    if name == "alexnet":
        m = tvm.alexnet(num_classes=NUM_CLASSES)
        fin = 256 // div * 6 * 6
        idx = (1, 4, 6)
        for i in (0, 3, 6, 8, 10):
            c = m.features[i]
            cin = c.in_channels if i == 0 else c.in_channels // div
            m.features[i] = torch.nn.Conv2d(cin, c.out_channels // div, c.kernel_size,
                                            c.stride, c.padding)
    else:
        from torchvision.models import vgg as tvv
        m = tvv.VGG(tvv.make_layers(CFG, batch_norm=name.endswith("_bn")), NUM_CLASSES)
        fin = 16 * 7 * 7
        idx = (0, 3, 6)
    sizes = [(fin, hidden), (hidden, hidden), (hidden, NUM_CLASSES)]
    for i, (a, b) in zip(idx, sizes):
        m.classifier[i] = torch.nn.Linear(a, b)
    return m


def _small_dc(name, dc, strategy=None, div=1):
    from distconv import models

    if name == "alexnet":
        return models.alexnet(NUM_CLASSES, hidden=32, width_divisor=div, strategy=strategy)
    return models.VGG(CFG, name.endswith("_bn"), NUM_CLASSES, hidden=32, strategy=strategy)


def _shapes(sd):
    return {k: tuple(np.shape(v)) for k, v in sd.items()}


@pytest.mark.parametrize("name,hw", [("alexnet", 63), ("vgg11", 32), ("vgg16_bn", 40)])
def test_small_models_match_torchvision(name, hw, layers):
    import torch

    dc = layers
    tvm = _torchvision()
    dc.set_default_dtype(np.float64)
    torch.manual_seed(0)
    tm = _small_torch(name, tvm, 32).double().eval()
    m = _small_dc(name, dc)
    m.eval()
    tsd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    if name.endswith("_bn"):  # non-trivial running statistics
        rng = np.random.default_rng(1)
        for k in tsd:
            if k.endswith("running_mean"):
                tsd[k] = rng.standard_normal(tsd[k].shape)
            elif k.endswith("running_var"):
                tsd[k] = rng.uniform(0.5, 2.0, tsd[k].shape)
        tm.load_state_dict({k: torch.from_numpy(v) for k, v in tsd.items()})
    assert list(m.state_dict()) == list(tsd)
    assert _shapes(m.state_dict()) == _shapes(tsd)
    m.load_state_dict(tsd)
    x = np.random.default_rng(2).standard_normal((2, 3, hw, hw + 3))
    ref = tm(torch.from_numpy(x)).detach().numpy()
    y = m(x).to_global()
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err <= 1e-10, err
    # a size where the adaptive pooling averages overlapping bins (9 -> 7, 7 -> 6)
    big = 260 if name == "alexnet" else 300
    x_big = np.random.default_rng(3).standard_normal((1, 3, big, big - 7))
    ref_big = tm(torch.from_numpy(x_big)).detach().numpy()
    y_big = m(x_big).to_global()
    assert np.abs(y_big - ref_big).max() <= 1e-10 * np.abs(ref_big).max()
    # the other way: distconv's own initial weights load into torchvision strictly
    from tests.torch_ref import to_torch_state
    m2 = _small_dc(name, dc)
    m2.eval()
    tm2 = _small_torch(name, tvm, 32).double().eval()
    tm2.load_state_dict(to_torch_state(m2.state_dict()), strict=True)
    ref2 = tm2(torch.from_numpy(x)).detach().numpy()
    assert np.abs(m2(x).to_global() - ref2).max() <= 1e-10 * np.abs(ref2).max()
    # negative control: the first classifier weight in (H, W, C) flatten order disagrees
    k = next(k for k in tsd if k.startswith("classifier") and k.endswith("weight"))
    bad = dict(tsd)
    w = tsd[k]
    side = 6 if name == "alexnet" else 7
    bad[k] = w.reshape(w.shape[0], -1, side, side).transpose(0, 2, 3, 1).reshape(w.shape)
    m.load_state_dict(bad)
    y_bad = m(x_big).to_global()
    assert np.abs(y_bad - ref_big).max() > 1e-6 * np.abs(ref_big).max()


@pytest.mark.parametrize("name,minimum", [("alexnet", 63), ("vgg11", 32)])
def test_image_too_small_names_minimum(name, minimum, layers):
    import torch

    dc = layers
    tvm = _torchvision()
    dc.set_default_dtype(np.float64)
    m = _small_dc(name, dc)
    m.eval()
    assert m.min_size == (minimum, minimum)
    with pytest.raises(ValueError, match=f"needs at least {minimum}x{minimum}"):
        m(np.zeros((1, 3, minimum - 1, minimum)))
    # torchvision fails (somewhere inside) at minimum - 1 and runs at the minimum
    tm = _small_torch(name, tvm, 32).double().eval()
    tm(torch.zeros(1, 3, minimum, minimum, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        tm(torch.zeros(1, 3, minimum - 1, minimum - 1, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alexnet", "vgg11", "vgg16", "vgg16_bn"])
def test_full_size_state_dict_keys_and_shapes(name, layers):
    """The real models (61-138 M parameters, float32): torchvision's keys and shapes; VGG's
    initialisation has torchvision's statistics (conv std sqrt(2/fan_out), linear 0.01)."""
    import torch

    dc = layers
    tvm = _torchvision()
    from distconv import models

    dc.set_default_dtype(np.float32)
    with torch.device("meta"):
        tsd = getattr(tvm, name)().state_dict()
    m = getattr(models, name)()
    sd = m.state_dict()
    assert list(sd) == list(tsd)
    assert _shapes(sd) == {k: tuple(v.shape) for k, v in tsd.items()}
    if name.startswith("vgg"):
        w = sd["features.0.weight"]
        assert abs(w.std() / np.sqrt(2.0 / (64 * 9)) - 1) < 0.05
        assert abs(sd["classifier.0.weight"].std() / 0.01 - 1) < 0.01
        assert not sd["classifier.0.bias"].any() and not sd["features.0.bias"].any()


# two mixed per-layer plans per model for 2 ranks (names of named_modules())
PLANS = {
    "alexnet": {
        "mixA": {"": "sample=2", "features.3": "sample=1,filter=2",
                 "features.6": "sample=1,channel=2", "classifier.1": "sample=1,channel=2",
                 "classifier.4": "sample=1,filter=2"},
        "mixB": {"": "sample=1,channel=2", "features.0": "sample=2", "features.10":
                 "sample=1,filter=2", "classifier": "sample=2"}},
    "vgg": {
        "mixA": {"": "sample=2", "features.0": "sample=1,filter=2",
                 "features.6": "sample=1,channel=2", "classifier.0": "sample=1,channel=2",
                 "classifier.3": "sample=1,filter=2"},
        "mixB": {"": "sample=1,filter=2", "features.3": "sample=2",
                 "classifier.6": "sample=1,channel=2"}},
}


@pytest.mark.parametrize("name,hw", [("alexnet", 63), ("vgg11", 32), ("vgg16_bn", 33)])
@mpi(ranks=(1, 2), timeout=180)
def test_small_models_training_step(comm, name, hw):
    """Training mode (dropout on), two steps: logits, loss, dx, every gradient and the
    running statistics equal torchvision's, under two mixed plans (one data-parallel run on
    1 rank). AlexNet's convs are 8 times narrower (same keys)."""
    import torch

    import distconv as dc
    from distconv.strategy import Strategy
    from tests.model_ref import compare_step, load_from_torch, share_dropout
    from tests.torch_ref import Report

    dc.set_default_dtype(np.float64)
    tvm = _torchvision()
    plans = PLANS["alexnet" if name == "alexnet" else "vgg"] if comm.size == 2 else \
        {"dp": {"": "sample=*"}}
    rep = Report()
    rng = np.random.default_rng(4)
    for i, (pname, plan) in enumerate(plans.items()):
        torch.manual_seed(i)
        tm = _small_torch(name, tvm, 32, div=8).double()
        m = _small_dc(name, dc, strategy=plan, div=8)
        share_dropout(m, tm)
        load_from_torch(m, tm, seed=i)
        x = rng.standard_normal((3, 3, hw, hw + i))
        lab = rng.integers(0, NUM_CLASSES, 3)
        for step in range(2):  # the second step draws new dropout masks
            compare_step(m, tm, x, lab, rep, f"{name} {pname} step {step}",
                         Strategy().activation_distribution(4))
    rep.assert_ok(comm)


@mpi(ranks=(2,), timeout=60)
def test_bad_input_raises_everywhere(comm):
    import distconv as dc

    dc.set_default_dtype(np.float64)
    for name, minimum in (("alexnet", 63), ("vgg11", 32)):
        m = _small_dc(name, dc, strategy="sample=2")
        with pytest.raises(ValueError, match=f"needs at least {minimum}x{minimum}"):
            m(np.zeros((2, 3, minimum, minimum - 1)))
    a = _small_dc("alexnet", dc)
    v = _small_dc("vgg11", dc)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\) in state_dict: "
                                           r"\"features\.0\.weight\".*Unexpected"):
        a.load_state_dict({k: val for k, val in v.state_dict().items()
                           if k != "features.0.weight"})
    with pytest.raises(RuntimeError, match=r"size mismatch for features\.0\.weight: copying a "
                                           r"param with shape torch\.Size\(\[8, 3, 3, 3\]\) from "
                                           r"checkpoint, the shape in current model is "
                                           r"torch\.Size\(\[64, 3, 11, 11\]\)"):
        a.load_state_dict(v.state_dict(), strict=False)
    with pytest.raises(ValueError, match=r"do not exist: \['classifier\.9'\]"):
        _small_dc("vgg11", dc, strategy={"classifier.9": "sample=2"})
