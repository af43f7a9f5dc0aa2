"""distconv.models.inception_v3 against torchvision's Inception3 in float64.

* keys and shapes of the full model (with and without the auxiliary classifier) equal
  torchvision's, and its initialisation has torchvision's statistics;
* a small variant (every channel count / 16, so the same keys; torchvision's own
  ``inception_blocks`` hook builds the reference) matches in training mode with the
  auxiliary classifier at 299x299 and without it at 75x75: logits, aux logits, loss
  ``CE + 0.4 CE_aux``, the input gradient, every parameter gradient and the running
  statistics, on 1 rank and on 2 ranks under two mixed per-layer plans (branches of one
  block under different strategies, joined by dc.cat); eval mode at 75x75;
* the full-width network at 75x75 (eval-mode logits, weights from torchvision);
* bad input raises the same clear error on every rank: an image below the minimum size
  (75, or 299 in training mode with aux_logits), a state dict of another width or of
  another architecture, a plan naming a module that does not exist.
"""
import numpy as np
import pytest

from distconv.backend import set_default_dtype
from distconv.strategy import Strategy
from tests.mpi_harness import mpi

DIV = 16
K = 5

# two mixed per-layer plans for 2 ranks (module names of named_modules())
PLANS = {
    "mixA": {"": "sample=2", "Conv2d_1a_3x3": "sample=1,channel=2",
             "Mixed_5b.branch1x1": "sample=1,channel=2",
             "Mixed_5b.branch5x5_2": "sample=1,filter=2", "Mixed_6a": "sample=1,filter=2",
             "Mixed_6b": "sample=1,channel=2", "Mixed_6e.branch7x7dbl_3": "sample=1,filter=2",
             "AuxLogits": "sample=1,filter=2", "AuxLogits.fc": "sample=1,channel=2",
             "Mixed_7b.branch3x3_2a": "sample=1,filter=2", "fc": "sample=1,channel=2"},
    "mixB": {"": "sample=1,filter=2", "Conv2d_2a_3x3": "sample=2", "Mixed_5c": "sample=2",
             "Mixed_6a.branch3x3": "sample=1,channel=2", "Mixed_6d.branch_pool": "sample=2",
             "Mixed_7a": "sample=1,channel=2", "Mixed_7c.branch_pool": "sample=2",
             "fc": "sample=2"},
}


def _pair(aux, hw, seed=0, **kw):
    """(distconv model, torchvision reference) of the small variant, same weights."""
    import torch

    from distconv import models
    from tests.model_ref import load_from_torch, share_dropout, torch_inception

    torch.manual_seed(seed)
    tm = torch_inception(DIV, K, aux)
    m = models.inception_v3(K, aux_logits=aux, width_divisor=DIV, init_weights=False, **kw)
    share_dropout(m, tm)
    load_from_torch(m, tm, seed=seed + 1)
    return m, tm


@mpi(ranks=(1, 2), timeout=240)
def test_inception_small_matches_torchvision(comm):
    from tests.model_ref import compare_step
    from tests.torch_ref import Report

    set_default_dtype(np.float64)
    rep = Report()
    plans = {"dp": {"": "sample=*"}} if comm.size == 1 else PLANS
    rng = np.random.default_rng(3)
    for i, (name, plan) in enumerate(plans.items()):
        # aux logits at 299x299 for the first plan, 75x75 without them for the others
        aux, hw = (True, 299) if i == 0 else (False, 75)
        m, tm = _pair(aux, hw, seed=i, strategy=plan)
        x = rng.standard_normal((2, 3, hw, hw + 2 * i))
        lab = rng.integers(0, K, 2)
        dist = Strategy().activation_distribution(4)
        out = compare_step(m, tm, x, lab, rep, f"{name} aux={aux} {hw}", dist)
        rep.expect(f"{name} returns InceptionOutputs", type(out).__name__ ==
                   ("InceptionOutputs" if aux else "DistTensor"))
        # eval mode: logits only (also with aux_logits), the running statistics used
        m.eval()
        tm.eval()
        xe = rng.standard_normal((3, 3, 75, 76))
        with __import__("distconv").no_grad():
            y = m(xe)
        import torch
        rep.check(f"{name} eval logits", y.to_global(), tm(torch.from_numpy(xe)))
    rep.assert_ok(comm)


@mpi(ranks=(2,), timeout=240)
def test_inception_under_the_planners_plan_matches_torchvision(comm):
    """The planner's own plan (series-parallel search over the cat joins; the fitted
    compute model, so every rank finds the same plan) trains like torchvision."""
    import distconv as dc
    from tests.model_ref import compare_step
    from tests.torch_ref import Report

    set_default_dtype(np.float64)
    m, tm = _pair(False, 75, seed=5)
    res = dc.planner.plan_model(m, (2, 3, 75, 77), comm.size, min_gain=0.0)
    plan = {k: dc.Strategy(*v) for k, v in res["plan"].items()}
    assert len({str(v) for v in plan.values()}) >= 1 and len(plan) > 90
    m.set_strategy(plan)
    rng = np.random.default_rng(4)
    rep = Report()
    compare_step(m, tm, rng.standard_normal((2, 3, 75, 77)), rng.integers(0, K, 2), rep,
                 f"planner plan ({res['chosen']})", Strategy().activation_distribution(4))
    rep.assert_ok(comm)


def test_inception_full_size_keys_shapes_and_init():
    import torch

    from distconv import models
    from tests.model_ref import torchvision_models

    tvm = torchvision_models()
    set_default_dtype(np.float32)
    m = models.inception_v3()
    sd = m.state_dict()
    shapes = {k: v.shape for k, v in sd.items()}
    for aux in (True, False):
        with torch.device("meta"):
            tsd = tvm.inception_v3(aux_logits=aux, init_weights=False).state_dict()
        want = [k for k in sd if aux or not k.startswith("AuxLogits.")]
        assert want == list(tsd)
        assert {k: shapes[k] for k in want} == {k: tuple(v.shape) for k, v in tsd.items()}
    assert not any(k.startswith("AuxLogits") for k in
                   models.inception_v3(10, aux_logits=False, width_divisor=16).state_dict())
    # torchvision's initialisation: N(0, 0.1) (0.01 / 0.001 in the auxiliary classifier)
    assert abs(sd["Mixed_6b.branch1x1.conv.weight"].std() / 0.1 - 1) < 0.02
    assert abs(sd["AuxLogits.conv1.conv.weight"].std() / 0.01 - 1) < 0.02
    assert abs(sd["AuxLogits.fc.weight"].std() / 0.001 - 1) < 0.02
    assert (sd["Mixed_7c.branch_pool.bn.weight"] == 1).all()
    assert m.min_size == (75, 75) and m.min_size_aux == (299, 299)


@pytest.mark.slow
def test_inception_full_width_75():
    """The real network (27 M parameters), torchvision's weights, eval-mode logits."""
    import torch

    from distconv import models
    from tests.model_ref import load_from_torch, torchvision_models

    tvm = torchvision_models()
    set_default_dtype(np.float64)
    torch.manual_seed(0)
    tm = tvm.inception_v3(num_classes=K, aux_logits=False, init_weights=False).double().eval()
    m = models.inception_v3(K, aux_logits=False, init_weights=False).eval()
    load_from_torch(m, tm, seed=1)
    x = np.random.default_rng(2).standard_normal((1, 3, 75, 75))
    ref = tm(torch.from_numpy(x)).detach().numpy()
    y = m(x).to_global()
    assert np.abs(y - ref).max() <= 1e-10 * np.abs(ref).max()


def test_inception_weights_to_torchvision():
    """distconv's own initial weights (and running statistics after a step) load into
    torchvision's model strictly and give the same eval-mode logits."""
    import torch

    from distconv import models
    from tests.model_ref import torch_inception
    from tests.torch_ref import to_torch_state

    set_default_dtype(np.float64)
    m = models.inception_v3(K, aux_logits=True, width_divisor=DIV)
    m(np.random.default_rng(1).standard_normal((2, 3, 299, 299)))  # moves running stats
    m.eval()
    tm = torch_inception(DIV, K, True).eval()
    tm.load_state_dict(to_torch_state(m.state_dict()), strict=True)
    x = np.random.default_rng(2).standard_normal((2, 3, 80, 75))
    ref = tm(torch.from_numpy(x)).detach().numpy()
    assert np.abs(m(x).to_global() - ref).max() <= 1e-10 * np.abs(ref).max()


def test_inception_transform_input():
    import torch

    from distconv import models
    from tests.model_ref import load_from_torch, torch_inception

    set_default_dtype(np.float64)
    torch.manual_seed(0)
    tm = torch_inception(DIV, K, False, transform_input=True).eval()
    m = models.inception_v3(K, aux_logits=False, transform_input=True, width_divisor=DIV,
                            init_weights=False).eval()
    load_from_torch(m, tm)
    x = np.random.default_rng(2).standard_normal((2, 3, 75, 75))
    xt = torch.tensor(x, requires_grad=True)
    ref = tm(xt)
    y = m(x)
    assert np.abs(y.to_global() - ref.detach().numpy()).max() <= 1e-10 * ref.abs().max().item()
    dy = np.random.default_rng(3).standard_normal(y.shape)
    ref.backward(torch.from_numpy(dy))
    dx = m.backward(dy).to_global()
    assert np.abs(dx - xt.grad.numpy()).max() <= 1e-10 * xt.grad.abs().max().item()


@mpi(ranks=(2,), timeout=120)
def test_inception_bad_input_raises_everywhere(comm):
    from distconv import models

    set_default_dtype(np.float64)
    m = models.inception_v3(K, width_divisor=DIV)
    with pytest.raises(ValueError, match="needs at least 299x299"):
        m(np.zeros((2, 3, 298, 299)))  # training mode with aux_logits
    m.eval()
    with pytest.raises(ValueError, match="needs at least 75x75"):
        m(np.zeros((2, 3, 74, 80)))
    m.eval()(np.zeros((2, 3, 75, 75)))  # the minimum works
    # a state dict of another width: the first mismatched key and both shapes (torch's text)
    other = models.inception_v3(K, width_divisor=8).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for Conv2d_1a_3x3\.conv\.weight: "
                                           r"copying a param with shape torch\.Size\(\[4, 3, 3, "
                                           r"3\]\) from checkpoint, the shape in current model is "
                                           r"torch\.Size\(\[2, 3, 3, 3\]\)"):
        m.load_state_dict(other)
    # another architecture: the keys it lacks and the ones it does not know (torch's text)
    vgg = models.VGG([8, "M"], num_classes=K, hidden=8).state_dict()
    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\) in state_dict: "
                                           r"\"Conv2d_1a_3x3\.conv\.weight\".*Unexpected "
                                           r"key\(s\) in state_dict: \"features\.0\.weight\""):
        m.load_state_dict(vgg)
    # a plan naming a module that does not exist
    with pytest.raises(ValueError, match=r"plan names layers that do not exist: "
                                         r"\['Mixed_5z'\]"):
        models.inception_v3(K, width_divisor=DIV, strategy={"": "sample=2",
                                                            "Mixed_5z": "sample=1,filter=2"})
    # still usable afterwards, on every rank
    m.load_state_dict(m.state_dict())
    m(np.zeros((2, 3, 75, 75)))
