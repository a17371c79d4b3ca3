"""Network surgery and layer outputs that several defenses share, found generically (where the
detectors read features is :mod:`burnkit.feature_points`).

Defenses that look inside a network (AC, Spectral, DBD, D-BR, D-ST) need three things from any zoo
model without knowing its name: the classification layer (the last ``nn.Linear``), the outputs of a
named layer for a whole image set, and the network as a feature extractor (the classification layer
swapped for the identity, so ``net(x)`` returns what the layer would have read).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from .data import ImageSet
from .engine import StepContext, eval_mode, iterate
from .errors import BurnError


def final_linear(net: nn.Module, who: str = "this defense") -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` of ``net`` in module order (the classification layer) and its name."""
    found = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise BurnError(f"{who} needs a final nn.Linear layer; {type(net).__name__} has none")
    return found[-1]


def _set_submodule(net: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, module)


def detach_head(net: nn.Module, who: str = "this defense") -> tuple[str, nn.Linear]:
    """Replace the classification layer of ``net`` by ``nn.Identity`` in place, so that ``net``
    returns its features; returns the layer's name and the layer (see :func:`attach_head`)."""
    name, linear = final_linear(net, who)
    _set_submodule(net, name, nn.Identity())
    return name, linear


def attach_head(net: nn.Module, name: str, linear: nn.Linear) -> None:
    """Put a classification layer back where :func:`detach_head` took it from."""
    _set_submodule(net, name, linear)


@contextlib.contextmanager
def headless(net: nn.Module, who: str = "this defense") -> Iterator[nn.Linear]:
    """``net`` without its classification layer for the block (yields the layer)."""
    name, linear = detach_head(net, who)
    try:
        yield linear
    finally:
        attach_head(net, name, linear)


def feature_layer(net: nn.Module, requested: str | None = None) -> str:
    """The layer whose outputs are the "late features" of Spectral Signatures: ``requested`` when
    given, else BackdoorBench's ``layer4`` when the network has one, else the last top-level child
    that outputs a feature map and is not a pooling layer (``features`` of the small CNN and VGG)."""
    modules = dict(net.named_modules())
    if requested:
        if requested not in modules or requested == "":
            raise BurnError(f"--target_layer {requested!r} is not a layer of {type(net).__name__}; "
                            f"top-level layers: {', '.join(n for n, _ in net.named_children())}")
        return requested
    if "layer4" in modules:
        return "layer4"
    shapes: dict[str, tuple] = {}
    children = list(net.named_children())
    handles = [m.register_forward_hook(lambda _m, _i, o, n=name: shapes.__setitem__(n, tuple(o.shape)))
               for name, m in children]
    first = next((m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    channels = first.in_channels if isinstance(first, nn.Conv2d) else 3
    try:
        param = next(net.parameters())
        with torch.no_grad(), eval_mode(net):
            net(torch.zeros(2, channels, 32, 32, device=param.device))
    except RuntimeError:
        pass  # the shapes seen before a size error still tell where the feature maps are
    finally:
        for h in handles:
            h.remove()
    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)
    maps = [n for n, m in children if len(shapes.get(n, ())) == 4 and not isinstance(m, pools)]
    if not maps:
        raise BurnError(f"{type(net).__name__} has no top-level layer with a feature map; pass --target_layer")
    return maps[-1]


def layer_outputs(model: nn.Module, net: nn.Module, layer: str, imageset: ImageSet, device: torch.device,
                  batch_size: int = 256, amp: bool = False) -> torch.Tensor:
    """The flattened outputs of ``net``'s module ``layer`` for every sample of ``imageset`` (float32,
    CPU, in order), with the model in eval mode and no augmentation. ``model`` is what is called on
    [0, 1] pixels (a :class:`~burnkit.models.Classifier` whose network is ``net``)."""
    return _tapped(model, dict(net.named_modules())[layer], False, imageset, device, batch_size, amp)


def penultimate_features(model: nn.Module, net: nn.Module, imageset: ImageSet, device: torch.device,
                         batch_size: int = 256, amp: bool = False) -> torch.Tensor:
    """What the classification layer reads (BackdoorBench's ``avgpool`` output for PreAct-ResNet18),
    flattened, for every sample of ``imageset`` (eval mode, no augmentation)."""
    return _tapped(model, final_linear(net)[1], True, imageset, device, batch_size, amp)


@torch.no_grad()
def _tapped(model: nn.Module, module: nn.Module, inputs: bool, imageset: ImageSet, device: torch.device,
            batch_size: int, amp: bool) -> torch.Tensor:
    """The inputs (``inputs``) or outputs of ``module`` over ``imageset``, flattened per sample."""
    captured: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> None:
        captured.append(t.detach().flatten(1).float().cpu())

    handle = (module.register_forward_pre_hook(lambda _m, args: keep(args[0])) if inputs
              else module.register_forward_hook(lambda _m, _i, out: keep(out)))
    ctx = StepContext(device, amp, None)
    outs = []
    model.to(device)
    try:
        with eval_mode(model):
            for batch in iterate(imageset, batch_size, device):
                captured.clear()
                with ctx.autocast():
                    model(batch.x)
                outs.append(captured[-1])
    finally:
        handle.remove()
    return torch.cat(outs) if outs else torch.zeros(0, 0)


def feature_dim(encoder: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Width of the (flattened) output of ``encoder`` for one input of ``(C, H, W)``."""
    param = next(encoder.parameters())
    with torch.no_grad(), eval_mode(encoder):
        return int(encoder(torch.zeros(2, *input_shape, device=param.device)).flatten(1).shape[1])


class ProjectionModel(nn.Module):
    """An encoder (a network without its classification layer) followed by a projection MLP whose
    output is L2-normalised: the model of SimCLR (DBD) and supervised contrastive learning (D-ST)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.projector(self.encoder(x).flatten(1)), dim=1)


class FrozenEncoderHead(nn.Module):
    """A linear head trained on a frozen encoder kept in eval mode (D-ST's classifier stage): the
    engine's ``model.train()`` switches only the head."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.encoder(x).flatten(1)
        return self.head(features)
