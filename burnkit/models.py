"""The classifier every attack and defense calls: normalisation in exactly one place.

BackdoorBench feeds its networks *normalised* tensors and stores no normalisation in its state
dicts. :class:`Classifier` takes pixels in [0, 1], normalises them with the dataset's constants and
calls ``net``, the plain BackdoorBench network. Only ``net.state_dict()`` is ever saved or loaded,
so the files keep BackdoorBench's key names.
"""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import attack_models
from attack_models import ModelInputError, UnknownModelError

from .datasets import DatasetInfo
from .errors import BurnError
from .records import cpu_state_dict


class Classifier(nn.Module):
    """``Classifier(net, mean, std)(x01) -> logits``; ``x01`` is float NCHW in [0, 1]."""

    def __init__(self, net: nn.Module, mean, std, model_name: str = "", num_classes: int | None = None):
        super().__init__()
        self.net = net
        self.model_name = model_name
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean.to(x01.dtype)) / self.std.to(x01.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z.dtype) + self.mean.to(z.dtype)

    def input_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid range [0, 1] expressed in the network's (normalised) input space."""
        return self.normalize(torch.zeros_like(self.mean)), self.normalize(torch.ones_like(self.mean))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x01))

    def bb_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """The network's state dict with CPU tensors and BackdoorBench's key names, keeping the
        ``_metadata`` (module versions) that ``model.cpu().state_dict()`` carries in its records."""
        return cpu_state_dict(self.net.state_dict(), clone=True)


class _Hardsigmoid(nn.Module):
    """``relu6(x + 3) / 6``: the values and gradient of ``nn.Hardsigmoid``, twice differentiable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


@contextlib.contextmanager
def twice_differentiable(net: nn.Module):
    """Within the block, ``net`` runs through operations PyTorch can differentiate twice, computing
    the same function: every ``nn.Hardsigmoid`` (MobileNetV3's squeeze-excitation gate) as
    ``relu6(x + 3) / 6``, and attention (ViT) with the math kernel of ``scaled_dot_product_attention``
    instead of the fused ones, whose backward has no derivative. For algorithms that differentiate
    gradients (I-BAU's hypergradient); no parameter changes, so the state dict is untouched."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    swapped = []
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.Hardsigmoid):
            parent_name, _, attr = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, _Hardsigmoid())
            swapped.append((parent, attr, module))
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield net
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)


def architecture_name(net: nn.Module) -> str:
    """The class name a user recognises in messages: BackdoorBench's ViT, ``Sequential(Resize, vit)``,
    is a ``VisionTransformer``."""
    if isinstance(net, nn.Sequential):
        inner = [m for m in net if next(m.parameters(), None) is not None]
        if len(inner) == 1:
            return type(inner[0]).__name__
    return type(net).__name__


def build_classifier(model_name: str, info: DatasetInfo, num_classes: int | None = None) -> Classifier:
    """A fresh classifier for ``model_name`` on dataset ``info``."""
    num_classes = num_classes or info.num_classes
    try:
        net = attack_models.create_model(model_name, num_classes=num_classes,
                                         in_channels=info.channels, image_size=info.img_size[0])
    except UnknownModelError as err:
        raise BurnError(str(err.args[0])) from None
    except ModelInputError as err:
        h, w = info.img_size[:2]
        raise BurnError(f"model '{model_name}' cannot take {info.name}: it needs inputs of at least "
                        f"{err.min_size}x{err.min_size} px and {info.name} images are {h}x{w}; choose another model") from None
    return Classifier(net, info.mean, info.std, model_name=model_name, num_classes=num_classes)


def strip_module_prefix(state_dict) -> "OrderedDict[str, torch.Tensor]":
    """Remove the ``module.`` prefix DataParallel adds (spec §5.1)."""
    out = OrderedDict()
    for key, value in state_dict.items():
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def load_bb_state_dict(clf: Classifier, state_dict, source: str = "record") -> None:
    """Load a BackdoorBench state dict into ``clf.net`` strictly, with a clear error on mismatch.

    ``module.`` prefixes are stripped. If names differ but the count and shapes agree in order,
    keys are matched by position, as BackdoorBench's loader does (spec §1.6 step 8).
    """
    state = strip_module_prefix(state_dict)
    own = clf.net.state_dict()
    if set(state) != set(own) and len(state) == len(own) and all(
            tuple(a.shape) == tuple(b.shape) for a, b in zip(state.values(), own.values())):
        state = OrderedDict(zip(own.keys(), state.values()))
    # module versions: the record's when it carries them under these names, else this build's
    state._metadata = copy.deepcopy(getattr(own, "_metadata", OrderedDict()))
    state._metadata.update({k.removeprefix("module."): v for k, v in getattr(state_dict, "_metadata", {}).items()
                            if k.removeprefix("module.") in state._metadata})
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise BurnError(f"the {source}'s weights do not fit model '{clf.model_name}': {'; '.join(detail)}; "
                        "check model_name in the record and --dataset")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise BurnError(
                f"the {source}'s weight {key} has shape {tuple(value.shape)} but model "
                f"'{clf.model_name}' for this dataset expects {tuple(own[key].shape)}; "
                "the record's class count or image size contradicts --dataset")
    clf.net.load_state_dict(state, strict=True)
