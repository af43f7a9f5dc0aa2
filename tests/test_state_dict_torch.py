"""``load_state_dict`` against torch on the same dicts, for every module type.

Plain tests (one process). For each module type (Conv2d with/without bias, Linear
with/without bias, BatchNorm2d incl. affine=False and track_running_stats=False,
Sequential, Residual, ResNet-18 and ResNet-50 at tiny width) and each case (exact,
missing, unexpected, wrong shape, several at once, the older formats torch still loads:
BatchNorm without ``num_batches_tracked`` with no or version-1 ``_metadata``, a 0-d
tensor given as shape (1,); a float32 dict for a float64 module), torch's module and
distconv's load the same dict with ``strict=True`` and ``strict=False``:

* both raise, with the same type and message (on one rank distconv's message is
  torch's, character for character), or
* both return the same ``(missing_keys, unexpected_keys)`` and then hold the same
  state.

After an error distconv's module is unchanged (all-or-nothing; torch may have copied
part of the dict). Negative control: a deliberately different message is detected.
"""
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _modules():
    """{case name: factory of (distconv module, torch twin)} (float64)."""
    import distconv as dc
    from distconv import nn
    from tests.torch_ref import torch_module

    def leaf(make):
        def f():
            dc.set_default_dtype(np.float64)
            dc.manual_seed(0)
            m = make()
            return m, torch_module(m, nranks=1)
        return f

    def resnet(name):
        def f():
            from tests.test_models import build_dc, build_torch
            dc.set_default_dtype(np.float64)
            return build_dc(name), build_torch(name, torch.float64)
        return f

    return {
        "conv": leaf(lambda: nn.Conv2d(3, 4, 3)),
        "conv_nobias": leaf(lambda: nn.Conv2d(3, 4, 3, bias=False)),
        "linear": leaf(lambda: nn.Linear(5, 3)),
        "linear_nobias": leaf(lambda: nn.Linear(5, 3, bias=False)),
        "bn": leaf(lambda: nn.BatchNorm2d(4)),
        "bn_noaffine": leaf(lambda: nn.BatchNorm2d(4, affine=False)),
        "bn_nostats": leaf(lambda: nn.BatchNorm2d(4, track_running_stats=False)),
        "sequential": leaf(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                                 nn.Flatten(), nn.Linear(4, 2))),
        "residual": leaf(lambda: nn.Residual(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)),
            nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)))),
        "resnet18": resnet("resnet18"),
        "resnet50": resnet("resnet50"),
    }


MODULES = _modules()


def _with_meta(d, meta):
    out = OrderedDict(d)
    if meta is not None:
        out._metadata = meta
    return out


def _cases(tsd):
    """{case: torch-tensor dict (with ``_metadata`` where the case keeps it)}."""
    meta = tsd._metadata
    keys = list(tsd)
    first, last = keys[0], keys[-1]
    nbt = [k for k in keys if k.endswith("num_batches_tracked")]
    c = OrderedDict()
    c["exact"] = _with_meta(tsd, meta)
    c["exact_no_metadata"] = _with_meta(tsd, None)
    c["missing_first"] = _with_meta({k: v for k, v in tsd.items() if k != first}, meta)
    c["missing_last_no_meta"] = _with_meta({k: v for k, v in tsd.items() if k != last}, None)
    c["empty"] = _with_meta({}, None)
    extra = {"extra": torch.zeros(2), first + ".sub": torch.zeros(1),
             "_extra_state": torch.zeros(1)}
    if "." in first:
        extra[first.split(".")[0] + ".nope.w"] = torch.zeros(1)
    c["unexpected"] = _with_meta(dict(tsd, **extra), meta)
    bad = torch.zeros((tsd[first].shape[0] + 1,) + tuple(tsd[first].shape[1:]),
                      dtype=tsd[first].dtype)
    c["wrong_shape"] = _with_meta(dict(tsd, **{first: bad}), meta)
    c["wrong_shape_2d_for_1d"] = _with_meta(dict(tsd, **{last: torch.zeros(1, 2)}), meta)
    several = {k: v for k, v in tsd.items() if k != last}
    several.update({first: bad, "zzz": torch.ones(1)})
    c["several"] = _with_meta(several, meta)
    c["float32_values"] = _with_meta(
        {k: (v.float() if v.is_floating_point() else v) for k, v in tsd.items()}, meta)
    if nbt:
        no_nbt = {k: v for k, v in tsd.items() if k not in nbt}
        c["old_bn_no_metadata"] = _with_meta(no_nbt, None)
        c["old_bn_version1"] = _with_meta(
            no_nbt, OrderedDict((k, {"version": 1}) for k in meta))
        c["bn_version2_missing_nbt"] = _with_meta(no_nbt, meta)
        c["nbt_shape_1"] = _with_meta(
            dict(tsd, **{k: torch.tensor([7]) for k in nbt}), meta)
        c["nbt_shape_2"] = _with_meta(
            dict(tsd, **{k: torch.tensor([7, 8]) for k in nbt}), meta)
    return c


def _perturbed(tsd):
    """``tsd`` with new values everywhere (so a load visibly changes the module)."""
    g = torch.Generator().manual_seed(1)
    out = OrderedDict()
    for k, v in tsd.items():
        if v.is_floating_point():
            out[k] = torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5
        else:
            out[k] = v + 5
    out._metadata = tsd._metadata
    return out


def _as_numpy(d):
    out = OrderedDict((k, v.detach().numpy().copy()) for k, v in d.items())
    if hasattr(d, "_metadata"):
        out._metadata = d._metadata
    return out


def _outcome(fn):
    try:
        r = fn()
    except Exception as e:  # noqa: BLE001 - compared below
        return ("raise", type(e).__name__, str(e))
    return ("ok", list(r.missing_keys), list(r.unexpected_keys), repr(r))


def _same_state(m, t):
    mine, theirs = m.state_dict(), t.state_dict()
    assert list(mine) == list(theirs)
    for k in mine:
        np.testing.assert_array_equal(mine[k], theirs[k].detach().numpy(), err_msg=k)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("kind", list(MODULES))
def test_load_state_dict_like_torch(kind, strict):
    m, t = MODULES[kind]()
    base = _perturbed(t.state_dict())
    cases = _cases(base)
    seen = set()
    for name, d in cases.items():
        m, t = MODULES[kind]()
        m.load_state_dict(_as_numpy(t.state_dict()))  # the same starting state
        before = m.state_dict()
        theirs = _outcome(lambda: t.load_state_dict(d, strict=strict))
        if theirs[0] == "raise":  # the torch twin's class name may differ (TorchResidual)
            theirs = theirs[:2] + (theirs[2].replace(f"for {type(t).__name__}:",
                                                     f"for {type(m).__name__}:", 1),)
        mine = _outcome(lambda: m.load_state_dict(_as_numpy(d), strict=strict))
        assert mine == theirs, f"{kind}/{name} strict={strict}:\n mine {mine}\n torch {theirs}"
        seen.add(theirs[0])
        if theirs[0] == "ok":
            _same_state(m, t)
        else:  # all-or-nothing: nothing changed
            after = m.state_dict()
            for k in before:
                np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert seen == {"ok", "raise"}, seen  # both outcomes were compared


@pytest.mark.parametrize("kind", ["conv", "bn", "sequential"])
def test_value_types(kind):
    """torch tensors and CPU arrays load alike; a value that is not an array is an error
    naming the key (torch's wording differs only in the array types it names)."""
    m, t = MODULES[kind]()
    d = _perturbed(t.state_dict())
    r = m.load_state_dict(OrderedDict(d))   # torch tensors directly
    assert repr(r) == "<All keys matched successfully>" and str(r) == repr(r)
    t.load_state_dict(d)
    _same_state(m, t)
    k = next(iter(d))
    bad = _as_numpy(d)
    bad[k] = [1.0, 2.0]
    with pytest.raises(RuntimeError, match=f'While copying the parameter named "{k}", '
                                           f"expected an array .* received <class 'list'>"):
        m.load_state_dict(bad)
    with pytest.raises(RuntimeError, match=f'While copying the parameter named "{k}", '
                                           f"expected torch.Tensor"):
        t.load_state_dict(dict(d, **{k: [1.0, 2.0]}))
    with pytest.raises(TypeError, match="Expected state_dict to be dict-like, got <class "
                                        "'list'>"):
        m.load_state_dict([1, 2])


def test_comparison_detects_a_difference():
    """Negative control: the outcome comparison fails when the messages differ."""
    m, t = MODULES["conv"]()
    d = _perturbed(t.state_dict())
    del d["bias"]
    theirs = _outcome(lambda: t.load_state_dict(d))
    mine = _outcome(lambda: m.load_state_dict(_as_numpy(d)))
    assert mine == theirs
    assert mine[0] == "raise" and 'Missing key(s) in state_dict: "bias". ' in mine[2]
    altered = (mine[0], mine[1], mine[2].replace('"bias"', '"weight"'))
    assert altered != theirs
    assert _outcome(lambda: m.load_state_dict(_as_numpy(d), strict=False)) != theirs


@pytest.mark.parametrize("kind", list(MODULES))
def test_our_state_dict_loads_into_torch(kind):
    """distconv's state_dict (keys, layouts and ``_metadata`` versions) is what torch's
    module loads strictly; with a key removed both refuse it alike."""
    m, t = MODULES[kind]()
    sd = m.state_dict()
    tmeta = t.state_dict()._metadata   # ours may name more (parameterless) modules
    assert {k: sd._metadata[k] for k in tmeta} == dict(tmeta)
    as_torch = OrderedDict((k, torch.from_numpy(v.copy())) for k, v in sd.items())
    as_torch._metadata = sd._metadata
    r = t.load_state_dict(as_torch)
    assert repr(r) == "<All keys matched successfully>"
    _same_state(m, t)
    k = list(sd)[-1]
    del as_torch[k]
    theirs = _outcome(lambda: t.load_state_dict(as_torch))
    mine = _outcome(lambda: m.load_state_dict(_as_numpy(as_torch)))
    theirs = theirs[:2] + (theirs[2].replace(f"for {type(t).__name__}:",
                                             f"for {type(m).__name__}:", 1),)
    assert mine == theirs and mine[0] == "raise" and f'"{k}"' in mine[2]
