"""The models the planner scripts (``plan.py``, ``planner_study.py``) build by name.

Every ``--model`` name is a ResNet of :data:`distconv.models.MODELS` or a network of
:data:`distconv.models.CNN_MODELS` (AlexNet, VGG, Inception-v3); :func:`build_model`
builds it as ``scripts/train.py`` does for images of a given C x H x W shape.
"""
from __future__ import annotations

#: default image shapes (C, H, W): train.py's digits data (8x8 grey images) for
#: small_resnet, ImageNet for the others (299x299 for Inception-v3, the smallest its
#: auxiliary classifier takes)
DIGITS_SHAPE = (1, 8, 8)
IMAGENET_SHAPE = (3, 224, 224)
INCEPTION_SHAPE = (3, 299, 299)
#: the large-image case of spatial parallelism: CosmoFlow's 4 channels, 512x512
CONVSTACK_SHAPE = (4, 512, 512)


def model_names() -> list:
    """Every model name: the ResNets of ``distconv.models.MODELS`` and the networks of
    ``CNN_MODELS`` (AlexNet, VGG, Inception-v3), as train.py accepts them."""
    from distconv.models import CNN_MODELS, MODELS
    return sorted(MODELS) + sorted(CNN_MODELS)


def default_shape(model: str) -> tuple:
    """The image shape (C, H, W) a model is planned for when none is given."""
    if model == "small_resnet":
        return DIGITS_SHAPE
    if model == "convstack2d":
        return CONVSTACK_SHAPE
    return INCEPTION_SHAPE if model == "inception_v3" else IMAGENET_SHAPE


def build_model(name: str, image_shape, num_classes: int, width: int = 16,
                width_divisor: int = 1, hidden: int = 4096, aux_logits: bool = True,
                strategy=None, init_weights: bool = False):
    """The model train.py builds for ``--model name`` on images of ``image_shape``
    (C, H, W). ``width``: small_resnet's base width; ``width_divisor``, ``hidden``,
    ``aux_logits``: the AlexNet/VGG/Inception knobs of train.py; ``strategy``: one
    Strategy or a per-layer plan. The ResNets get the 3x3 'cifar' stem when W <= 64.
    ``init_weights=False`` leaves VGG's and Inception-v3's torchvision initialisation out
    (the planner needs shapes only; training passes True)."""
    from distconv import models
    c, _, w = image_shape
    if name == "small_resnet":
        return models.small_resnet(num_classes, in_channels=c, width=width, strategy=strategy)
    if name in models.CNN_MODELS:
        kw = {"width_divisor": width_divisor, "strategy": strategy}
        if name not in ("alexnet", "convstack2d"):
            kw["init_weights"] = init_weights
        if name == "inception_v3":
            kw["aux_logits"] = aux_logits
        else:
            kw["hidden"] = hidden
        return models.CNN_MODELS[name](num_classes, in_channels=c, **kw)
    stem = "cifar" if w <= 64 else "imagenet"  # as scripts/train.py chooses it
    return models.MODELS[name](num_classes, in_channels=c, stem=stem, strategy=strategy)
