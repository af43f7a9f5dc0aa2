"""torchvision references of distconv's AlexNet, VGG and Inception-v3 (small variants with
the same keys) and a one-step comparison of a whole model against its reference.

torchvision 0.28's wheel is a CUDA build whose compiled ops fail to register against the
CPU torch: :func:`torchvision_models` puts an empty ``torchvision._meta_registrations``
module in ``sys.modules`` before importing it (its model definitions are plain Python).
"""
from __future__ import annotations

import functools
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

from distconv import nn
from distconv.backend import to_numpy
from distconv.tensor import DistTensor
from tests.torch_ref import TorchDropout


def torchvision_models():
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import pytest
    return pytest.importorskip("torchvision.models")


def torch_inception(div, num_classes, aux_logits, transform_input=False):
    """torchvision's Inception3 with every channel count divided by ``div`` (through its own
    ``inception_blocks`` hook: a BasicConv2d factory that divides in and out channels; the
    image's 3 channels stay), float64, weights not initialised."""
    torchvision_models()
    from torchvision.models import inception as tvi

    def conv_block(cin, cout, **kw):
        return tvi.BasicConv2d(cin if cin == 3 else cin // div, cout // div, **kw)

    def aux(cin, n):
        a = tvi.InceptionAux(cin, n, conv_block=conv_block)
        a.fc = torch.nn.Linear(768 // div, n)
        return a

    blocks = [conv_block] + [functools.partial(c, conv_block=conv_block) for c in (
        tvi.InceptionA, tvi.InceptionB, tvi.InceptionC, tvi.InceptionD, tvi.InceptionE)]
    m = tvi.Inception3(num_classes, aux_logits=aux_logits, transform_input=transform_input,
                       inception_blocks=blocks + [aux], init_weights=False)
    m.fc = torch.nn.Linear(2048 // div, num_classes)
    return m.double()


def share_dropout(model, tmodel):
    """Replace every torch Dropout of ``tmodel`` by the reference of the distconv Dropout
    at the same name (same seed and step)."""
    dcd = {n: m for n, m in model.named_modules() if isinstance(m, nn.Dropout)}
    for name, tm in list(tmodel.named_modules()):
        if isinstance(tm, torch.nn.Dropout):
            parent, _, leaf = name.rpartition(".")
            owner = tmodel.get_submodule(parent) if parent else tmodel
            setattr(owner, leaf, TorchDropout(dcd[name]))


def load_from_torch(model, tmodel, seed=None):
    """Copy ``tmodel``'s state into ``model`` (keys and shapes must agree); with ``seed``,
    random running statistics first (so eval mode is not the identity)."""
    tsd = {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
    if seed is not None:
        rng = np.random.default_rng(seed)
        for k in tsd:
            if k.endswith("running_mean"):
                tsd[k] = rng.standard_normal(tsd[k].shape) * 0.1
            elif k.endswith("running_var"):
                tsd[k] = rng.uniform(0.5, 2.0, tsd[k].shape)
        tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in tsd.items()})
    assert list(model.state_dict()) == list(tsd)
    model.load_state_dict(tsd)
    return tsd


def compare_step(model, tmodel, x, labels, report, what, x_dist, aux_weight=0.4):
    """One training-mode (or eval-mode) step of ``model`` and ``tmodel`` on ``x``: logits
    (and auxiliary logits when the model returns two), the loss ``CE(logits) + aux_weight *
    CE(aux)``, the input gradient, every parameter gradient (after ``sync_gradients``) and
    every buffer, recorded in ``report``.

    A conv bias followed by batch norm in training mode has a zero gradient in exact
    arithmetic (the normalisation removes any constant), so both sides hold roundoff:
    a bias gradient is compared relative to the largest gradient of its module's weight
    when that is larger than its own reference."""
    model.zero_grad()
    tmodel.zero_grad(set_to_none=True)
    xd = DistTensor.from_global(x, x_dist)
    xd.requires_grad = True
    out = model(xd)
    xt = torch.tensor(x, requires_grad=True)
    tout = tmodel(xt)
    crit = nn.CrossEntropyLoss()
    lt = torch.tensor(labels)
    if isinstance(out, tuple):
        report.check(f"{what} logits", out[0].to_global(), tout[0])
        report.check(f"{what} aux logits", out[1].to_global(), tout[1])
        loss = crit(out[0], labels) + aux_weight * crit(out[1], labels)
        tloss = F.cross_entropy(tout[0], lt) + aux_weight * F.cross_entropy(tout[1], lt)
    else:
        report.expect(f"{what} one output", not isinstance(tout, tuple))
        report.check(f"{what} logits", out.to_global(), tout)
        loss = crit(out, labels)
        tloss = F.cross_entropy(tout, lt)
    report.check(f"{what} loss", np.float64(loss), tloss, dtype=False)
    loss.backward()
    tloss.backward()
    nn.sync_gradients(model.parameters())
    report.check(f"{what} dx", to_numpy(xd.grad.to_global()), xt.grad)
    tparams = dict(tmodel.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    report.expect(f"{what} parameter names", names == list(tparams))
    for name, p in model.named_parameters():
        tp = tparams[name]
        if p.grad is None:
            report.fail(f"{what} grad {name}: None after backward")
            continue
        ref = tp.grad if tp.grad is not None else torch.zeros_like(tp)
        tol = None
        wname = name[:-len("bias")] + "weight"
        if name.endswith("bias") and wname in tparams and tparams[wname].grad is not None:
            scale = float(tparams[wname].grad.abs().max())
            own = float(ref.abs().max())
            if scale > own > 0:
                tol = 1e-10 * scale / own
        report.check(f"{what} grad {name}", to_numpy(p.grad.to_global()), ref, tol=tol)
    tsd = tmodel.state_dict()
    for k, v in model.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            report.check(f"{what} {k}", v, tsd[k])
    return out
