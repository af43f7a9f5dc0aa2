"""The CosmoFlow-like conv stack (distconv.models.convstack2d) against a PyTorch module of
the same structure and names, in float64, under plans that split height and width."""
import numpy as np
import pytest

from tests.mpi_harness import mpi

FEATURES = ("features.0", "features.1", "features.4", "features.5", "features.8",
            "features.9", "features.12", "features.13")


def torch_convstack(div, hidden, num_classes, in_channels=4):
    """``ConvStack2d``'s layers in torch.nn, same module names (state-dict keys)."""
    import torch.nn as tnn

    from distconv.models.convstack import WIDTHS

    class Ref(tnn.Module):
        def __init__(self):
            super().__init__()
            layers, c = [], in_channels
            for w in WIDTHS:
                layers += [tnn.Conv2d(c, w // div, 3, padding=1, bias=False),
                           tnn.BatchNorm2d(w // div), tnn.ReLU(), tnn.MaxPool2d(2)]
                c = w // div
            self.features = tnn.Sequential(*layers)
            self.avgpool = tnn.AdaptiveAvgPool2d(1)
            self.flatten = tnn.Flatten()
            self.classifier = tnn.Sequential(tnn.Linear(c, hidden), tnn.ReLU(),
                                             tnn.Linear(hidden, num_classes))

        def forward(self, x):
            return self.classifier(self.flatten(self.avgpool(self.features(x))))
    return Ref().double()


def plans(p):
    if p == 1:
        return {"dp": {"": "sample=*"}}
    out = {"height": {**{n: "sample=1,height=2" for n in FEATURES},
                      "classifier.0": "sample=1,filter=2", "classifier.2": "sample=2"}}
    if p == 2:
        out["width+sample"] = {"features.0": "sample=1,width=2", "features.1": "sample=2",
                               "features.4": "sample=1,height=2", "": "sample=1,filter=2"}
    if p == 4:
        out["2x2"] = {**{n: "sample=1,height=2,width=2" for n in FEATURES},
                      "": "sample=4"}
        out["mixed"] = {**{n: "sample=1,height=4" for n in FEATURES[3:]},
                        "features.0": "sample=2,height=2", "features.1": "sample=1,width=4",
                        "features.4": "sample=1,channel=2,filter=2", "": "sample=1,filter=4"}
        out["height"] = {**{n: "sample=1,height=4" for n in FEATURES}, "": "sample=4"}
    return out


def run(comm, perturb=False):
    import torch

    import distconv as dc
    from distconv.models import convstack2d
    from tests.model_ref import compare_step, load_from_torch
    from tests.torch_ref import Report

    dc.set_default_dtype(np.float64)
    rep = Report()
    rng = np.random.default_rng(7)
    for i, (pname, plan) in enumerate(plans(comm.size).items()):
        torch.manual_seed(i)
        tm = torch_convstack(8, 8, 3)
        m = convstack2d(3, in_channels=4, width_divisor=8, hidden=8, strategy=plan)
        load_from_torch(m, tm, seed=i)
        if perturb:
            with torch.no_grad():
                tm.features[4].weight[0, 0, 1, 1] += 1e-6
        x = rng.standard_normal((2, 4, 35, 33))
        lab = rng.integers(0, 3, 2)
        compare_step(m, tm, x, lab, rep, f"convstack {pname}", m.features[0].input_distribution)
    return rep


@mpi(ranks=(1, 2, 4), timeout=180)
def test_convstack_matches_torch_under_spatial_plans(comm):
    run(comm).assert_ok(comm)


@mpi(ranks=(2,), timeout=120)
def test_negative_control_a_changed_weight_is_caught(comm):
    with pytest.raises(AssertionError):
        run(comm, perturb=True).assert_ok(comm)


def test_state_dict_keys_match_torch():
    from distconv.models import convstack2d
    m = convstack2d(5, width_divisor=4, hidden=16)
    tm = torch_convstack(4, 16, 5)
    assert list(m.state_dict()) == list(tm.state_dict())
    assert m.min_size == (16, 16)
