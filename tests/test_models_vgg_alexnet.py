"""AlexNet and VGG definitions (distconv/models/alexnet.py, vgg.py) against torchvision.

These models are written against the intended ``distconv.nn`` API of issue 16
(``nn.Dropout``, ``nn.AdaptiveAvgPool2d`` with any output size). Until distconv.nn has
them, the fixture ``layers`` puts single-process stand-ins in their place (eval-mode
identity dropout; adaptive pooling through ``ops.adaptive_avg_pool2d_forward``) and the
tests check the definitions only: state-dict keys and shapes equal torchvision's, weights
load from torchvision, and eval-mode logits equal torchvision's in float64 on one process.
Gradients, training-mode dropout and MPI runs are for the layer work that follows.

torchvision is optional here (skipped when missing); the registry's 0.28 wheel is a CUDA
build whose compiled ops fail to register against the CPU torch, so an empty
``torchvision._meta_registrations`` module is put in ``sys.modules`` before importing it.
"""
import sys
import types

import numpy as np
import pytest

NUM_CLASSES = 5


def _torchvision():
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    return pytest.importorskip("torchvision.models")


@pytest.fixture
def layers(monkeypatch):
    """distconv.nn with Dropout and any-size AdaptiveAvgPool2d (stand-ins where missing)."""
    import distconv as dc
    from distconv import ops
    from distconv.nn import layers as L
    from distconv.tensor import DistTensor

    if not hasattr(dc.nn, "Dropout"):
        class Dropout(dc.nn.Module):  # stand-in: eval mode only
            def __init__(self, p=0.5):
                super().__init__()
                self.p = p

            def forward(self, x):
                if self.training and self.p > 0:
                    raise NotImplementedError("stand-in Dropout: eval mode only")
                return L._elementwise_input(x, getattr(x, "ndim", 2))

        monkeypatch.setattr(dc.nn, "Dropout", Dropout, raising=False)
    try:
        dc.nn.AdaptiveAvgPool2d((7, 7))
    except ValueError:
        class AdaptiveAvgPool2d(dc.nn.Module):  # stand-in: spatial dims whole
            def __init__(self, output_size):
                super().__init__()
                self.output_size = output_size

            def forward(self, x):
                x = L._elementwise_input(x)
                y = ops.adaptive_avg_pool2d_forward(x.local, self.output_size)
                return DistTensor(y, x.distribution, tuple(x.shape[:2]) + tuple(y.shape[2:]))

        monkeypatch.setattr(dc.nn, "AdaptiveAvgPool2d", AdaptiveAvgPool2d)
    return dc


def _small_torch(name, tvm, hidden):
    """torchvision's model with the classifier's Linear layers shrunk to ``hidden`` (same
    positions, so the same keys); VGG on a short configuration."""
    import torch

    if name == "alexnet":
        m = tvm.alexnet(num_classes=NUM_CLASSES)
        fin = 256 * 6 * 6
        idx = (1, 4, 6)
    else:
        from torchvision.models import vgg as tvv
        cfg = [8, "M", 16, "M", 16, "M", 16, "M", 16, "M"]
        m = tvv.VGG(tvv.make_layers(cfg, batch_norm=name.endswith("_bn")), NUM_CLASSES)
        fin = 16 * 7 * 7
        idx = (0, 3, 6)
    sizes = [(fin, hidden), (hidden, hidden), (hidden, NUM_CLASSES)]
    for i, (a, b) in zip(idx, sizes):
        m.classifier[i] = torch.nn.Linear(a, b)
    return m


def _small_dc(name, dc):
    from distconv.models import alexnet as A
    from distconv.models import vgg as V

    if name == "alexnet":
        return A.alexnet(NUM_CLASSES, hidden=32)
    cfg = [8, "M", 16, "M", 16, "M", 16, "M", 16, "M"]
    return V.VGG(cfg, name.endswith("_bn"), NUM_CLASSES, hidden=32)


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
    from distconv.models import alexnet as A
    from distconv.models import vgg as V

    dc.set_default_dtype(np.float32)
    with torch.device("meta"):
        tsd = getattr(tvm, name)().state_dict()
    m = (A.alexnet if name == "alexnet" else getattr(V, name))()
    sd = m.state_dict()
    assert list(sd) == list(tsd)
    assert _shapes(sd) == {k: tuple(v.shape) for k, v in tsd.items()}
    if name.startswith("vgg"):
        w = sd["features.0.weight"]
        assert abs(w.std() / np.sqrt(2.0 / (64 * 9)) - 1) < 0.05
        assert abs(sd["classifier.0.weight"].std() / 0.01 - 1) < 0.01
        assert not sd["classifier.0.bias"].any() and not sd["features.0.bias"].any()
