"""Where the detectors read a network: feature points of any network, found generically, and
batched feature extraction (the defenses' network surgery is :mod:`burnkit.network_surgery`).

Feature-space detectors (Spectral Signatures, SPECTRE, SCAn, Beatrix, Activation Clustering) read
an intermediate representation. BackdoorBench hard-codes module names (``--target_layer layer4`` for
PreAct-ResNet18) and has no value for other models; here a *feature point* is found from the
network's own forward pass, so every model of the zoo has a default:

* :func:`final_layer`: the last parametrised module (``nn.Linear`` or a convolution) the forward
  pass runs - the classification layer (``linear``, ``fc``, ``classifier.6``, SqueezeNet's
  ``classifier.1`` convolution).
* :func:`default_feature_point`: the output of the last *stage* before the final layer, i.e. the
  last 4-D (N x C x H x W) output among the network's top-level children (a child that is a flat
  ``nn.Sequential`` of leaf layers - VGG's ``features`` - is looked into), pooling, dropout and
  identity layers and anything before the first layer with weights (a ``Resize`` in front of a ViT)
  excluded.
  PreAct-ResNet18 and ResNets give ``layer4`` (BackdoorBench's choice), VGG and the small CNN the
  last ReLU of ``features``, DenseNet/MobileNet/EfficientNet ``features``. A network with no such
  output (ViT) gets the input of its final layer, the penultimate representation.

A feature point is written ``NAME`` (that module's output) or ``NAME:input`` (its input), which is
also the syntax of ``--target_layer``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import ImageSet
from .engine import eval_mode, iterate
from .errors import BurnError

POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.LPPool2d)
GLOBAL_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
PASS_THROUGH = (nn.modules.dropout._DropoutNd, nn.Identity, nn.Flatten)  # no stage of their own
INPUT_SUFFIX = ":input"


def _trace(net: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, nn.Module, tuple]]:
    """``(name, module, output shape)`` of every submodule in the order the forward pass calls them
    (a module called twice keeps its first call)."""
    calls: list[tuple[str, nn.Module, tuple]] = []
    seen: set[str] = set()

    def hook(name):
        def record(module, _inputs, output):
            if name not in seen and isinstance(output, torch.Tensor):
                seen.add(name)
                calls.append((name, module, tuple(output.shape)))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in net.named_modules() if name]
    try:
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad(), eval_mode(net):
            net(torch.zeros(2, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def final_layer(net: nn.Module, input_shape: tuple[int, ...]) -> str:
    """Name of the last ``nn.Linear`` / convolution the forward pass runs (the classifier)."""
    layers = [name for name, m, _ in _trace(net, input_shape) if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if not layers:
        raise BurnError(f"{type(net).__name__} runs no nn.Linear or convolution; pass --target_layer")
    return layers[-1]


def _stages(net: nn.Module) -> set[str]:
    """Top-level children, with a flat ``nn.Sequential`` of leaf layers replaced by its members."""
    names = set()
    for name, child in net.named_children():
        flat = isinstance(child, nn.Sequential) and len(child) > 0 and all(
            len(list(c.children())) == 0 for c in child)
        names.update(f"{name}.{sub}" for sub, _ in child.named_children()) if flat else names.add(name)
    return names


def default_feature_point(net: nn.Module, input_shape: tuple[int, ...]) -> str:
    """The last stage output before the final layer (see the module docstring)."""
    calls = _trace(net, input_shape)
    head = final_layer(net, input_shape)
    stages = _stages(net)
    last = None
    learnt = False  # a stage counts once a module with weights has run (not a Resize in front of a ViT)
    for name, module, shape in calls:
        if name == head or name.startswith(head + ".") or (name in stages and isinstance(module, GLOBAL_POOLING)):
            break  # the classifier, or the global pooling in front of it (ConvNeXt normalises after it)
        learnt = learnt or next(module.parameters(), None) is not None
        if learnt and name in stages and len(shape) == 4 and not isinstance(module, POOLING + PASS_THROUGH):
            last = name
    return last if last is not None else head + INPUT_SUFFIX


def resolve_feature_point(net: nn.Module, point: str | None, input_shape: tuple[int, ...]) -> str:
    """``point`` checked against the network's modules, or the default when ``point`` is None."""
    if point in (None, "", "None", "none"):
        return default_feature_point(net, input_shape)
    name = point[:-len(INPUT_SUFFIX)] if point.endswith(INPUT_SUFFIX) else point
    modules = dict(net.named_modules())
    if not name or name not in modules:
        near = sorted(_stages(net))[:12]
        raise BurnError(f"--target_layer {point!r} is not a module of {type(net).__name__}; use a module name "
                        f"such as {', '.join(near)} (optionally with ':input'), or leave it unset for the default")
    return point


class _Capture:
    """Hook that keeps the output (or input) of one module for the current forward pass."""

    def __init__(self, net: nn.Module, point: str):
        take_input = point.endswith(INPUT_SUFFIX)
        module = dict(net.named_modules())[point[:-len(INPUT_SUFFIX)] if take_input else point]
        self.value: torch.Tensor | None = None
        if take_input:
            self.handle = module.register_forward_pre_hook(self._keep_input)
        else:
            self.handle = module.register_forward_hook(self._keep_output)

    def _keep_input(self, _module, args):
        self.value = args[0].detach().clone()  # a later in-place op must not change it

    def _keep_output(self, _module, _args, output):
        self.value = output.detach().clone()

    def close(self):
        self.handle.remove()


def identity_flatten(features: torch.Tensor) -> torch.Tensor:
    return features.flatten(1)


def spatial_sum(features: torch.Tensor) -> torch.Tensor:
    """Sum over the spatial dimensions (N x C x H x W -> N x C); 2-D features pass unchanged."""
    return features.flatten(2).sum(2) if features.dim() > 2 else features


@torch.no_grad()
def extract(model, images: ImageSet, point: str, device: torch.device, batch_size: int = 256,
            reduce: Callable[[torch.Tensor], torch.Tensor] = identity_flatten,
            amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features at ``point`` (after ``reduce``, per batch, float32 on CPU) and logits of every sample.

    ``model`` is a :class:`burnkit.models.Classifier` (images in [0, 1]; the hook sits on
    ``model.net``). ``reduce`` runs on the device per batch, so a detector that only needs a
    statistic of a large feature map (a Gram deviation, a spatial sum) never holds all the maps.
    """
    model.to(device)
    capture = _Capture(model.net, point)
    feats, logits = [], []
    try:
        with eval_mode(model):
            for batch in iterate(images, batch_size, device):
                with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                    out = model(batch.x)
                feats.append(reduce(capture.value.float()).float().cpu())
                logits.append(out.float().cpu())
    finally:
        capture.close()
    if not feats:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(feats), torch.cat(logits)


def as_numpy(features, dtype=np.float64) -> np.ndarray:
    """A NumPy array of ``features`` (float64 by default; ``dtype=None`` keeps float32 features as they are,
    for large feature sets that are upcast class by class)."""
    out = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    return out if dtype is None and out.dtype in (np.float32, np.float64) else out.astype(dtype or np.float64)
