"""The model zoo of attacked networks, with BackdoorBench's exact state-dict names.

Models register themselves with :func:`register_model`; :func:`create_model` builds one by the
``model_name`` stored in a record. Every entry point takes ``num_classes``, ``in_channels`` and
``image_size`` so that 1-channel and 64-pixel datasets work with every architecture.

Example:
    >>> from attack_models import create_model, list_models
    >>> net = create_model("preactresnet18", num_classes=10)
    >>> len(net.state_dict())
    102
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_LAST_LAYER: dict[str, str] = {}


class UnknownModelError(KeyError):
    """Raised for a model name that is not in the zoo."""


def register_model(name: str, last_layer: str):
    """Register ``fn(num_classes, in_channels, image_size) -> nn.Module`` under ``name``.

    ``last_layer`` is the state-dict prefix of the final classification layer (BackdoorBench's
    ``selected_layer_name``), used by attacks such as TrojanNN.
    """

    def decorator(fn):
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = fn
        _LAST_LAYER[name] = last_layer
        return fn

    return decorator


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a randomly initialised network from the zoo."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model '{name}'; the zoo has: {', '.join(sorted(_REGISTRY))}") from None
    return fn(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def last_layer_name(name: str) -> str:
    return _LAST_LAYER[name]


# Explicit imports register the architectures (no star-imports).
from . import preact_resnet, small_cnn, vgg  # noqa: E402,F401
