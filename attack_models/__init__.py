"""The model zoo of attacked networks, with BackdoorBench's exact state-dict names.

Every name BackdoorBench's ``generate_cls_model`` builds is here (spec §1.7), with the keys and
shapes of ``tests/data/bb-model-keys.json.gz``: ``preactresnet18`` (BackdoorBench's own network,
:mod:`attack_models.preact_resnet`) and 26 torchvision architectures built with torchvision's
constructors (:mod:`attack_models.torchvision_zoo`). ``smallcnn`` and ``preactresnet34`` are
burnkit's extras for CPU-scale work.

Models register themselves with :func:`register_model`; :func:`create_model` builds one by the
``model_name`` stored in a record. Every entry point takes ``num_classes``, ``in_channels`` and
``image_size``: a network whose pooling cannot take a dataset's image size (AlexNet at 32 px,
Inception-v3 below 75 px, ...) is refused with :class:`ModelInputError` instead of failing deep
inside its forward pass.

Example:
    >>> from attack_models import create_model, list_models
    >>> net = create_model("preactresnet18", num_classes=10)
    >>> len(net.state_dict())
    102
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


class UnknownModelError(KeyError):
    """Raised for a model name that is not in the zoo."""


class ModelInputError(ValueError):
    """Raised when a model cannot take the requested input size (``min_size`` > ``image_size``)."""

    def __init__(self, name: str, min_size: int, image_size: int):
        self.name, self.min_size, self.image_size = name, min_size, image_size
        super().__init__(f"model '{name}' needs inputs of at least {min_size}x{min_size} px (its pooling reduces "
                         f"smaller images to nothing); these images are {image_size}x{image_size}")


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    last_layer: str  # state-dict prefix of the final classification layer
    min_size: int  # smallest square input (px) the forward pass accepts
    backdoorbench: bool  # a name BackdoorBench's generate_cls_model builds


_REGISTRY: dict[str, ModelSpec] = {}

# Names BackdoorBench accepts but cannot build (spec §1.7, §9.6): no record can name them.
NOT_BUILDABLE = {
    "resnext29": "ResNeXt29_2x64d() got an unexpected keyword argument 'num_classes'",
    "senet18": "SENet18() got an unexpected keyword argument 'num_classes'",
}


def register_model(name: str, last_layer: str, min_size: int = 1, backdoorbench: bool = True):
    """Register ``fn(num_classes, in_channels, image_size) -> nn.Module`` under ``name``.

    ``last_layer`` is the state-dict prefix of the final classification layer (BackdoorBench's
    ``selected_layer_name``, used by TrojanNN); ``min_size`` the smallest square input in pixels
    the network's forward pass accepts (measured; ``tests/test_models.py`` checks it).
    """

    def decorator(fn):
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = ModelSpec(fn, last_layer, min_size, backdoorbench)
        return fn

    return decorator


def _spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        pass
    if name in NOT_BUILDABLE:
        raise UnknownModelError(
            f"model '{name}' cannot be built: BackdoorBench's own generate_cls_model fails for it "
            f"({NOT_BUILDABLE[name]}), so no BackdoorBench record can name it") from None
    raise UnknownModelError(f"unknown model '{name}'; the zoo has: {', '.join(sorted(_REGISTRY))}") from None


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a randomly initialised network from the zoo for ``image_size`` x ``image_size`` inputs."""
    spec = _spec(name)
    if image_size < spec.min_size:
        raise ModelInputError(name, spec.min_size, image_size)
    return spec.build(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def list_models(pattern: str = "*", backdoorbench: bool | None = None) -> list[str]:
    """Registered names matching ``pattern``; ``backdoorbench=True`` keeps BackdoorBench's names only."""
    return sorted(n for n, s in _REGISTRY.items() if fnmatch.fnmatch(n, pattern)
                  and (backdoorbench is None or s.backdoorbench == backdoorbench))


def last_layer_name(name: str) -> str:
    return _spec(name).last_layer


def min_input_size(name: str) -> int:
    return _spec(name).min_size


# Explicit imports register the architectures (no star-imports).
from . import preact_resnet, small_cnn, torchvision_zoo  # noqa: E402,F401
