"""BackdoorBench's torchvision architectures, built with torchvision's own constructors.

BackdoorBench's ``generate_cls_model`` calls ``torchvision.models.<name>(num_classes=C)`` for every
name except ``preactresnet18`` (spec §1.7, §5.2); so does this module (``weights=None``: randomly
initialised, nothing downloaded; a record's weights are loaded afterwards). Two of its names are
built differently there, and here the same way:

* ``vit_*``: ``nn.Sequential(Resize((224, 224)), vit)`` with a ``num_classes`` head, so every key
  starts with ``1.`` and any input size works;
* ``convnext_tiny``: BackdoorBench copies ImageNet weights into a fresh ``num_classes`` model; the
  keys and shapes are those of ``convnext_tiny(num_classes=C)``.

The state-dict keys and shapes equal ``tests/data/bb-model-keys.json.gz`` (``tests/test_models.py``).

Adaptations that leave every key name unchanged:

* ``in_channels != 3`` (MNIST): the stem convolution (the first ``nn.Conv2d`` taking 3 channels)
  is rebuilt for that many input channels. BackdoorBench itself cannot feed 1-channel images to
  these networks, so such records are burnkit's own.
* GoogLeNet and Inception-v3 keep their auxiliary classifiers (their keys are in BackdoorBench's
  state dicts) but return only the main logits in training mode too, like every other network;
  BackdoorBench's trainer would fail on their tuple output.

``min_size`` is the smallest square input each network's forward pass accepts (measured with
torchvision 0.29): AlexNet needs 63 px, so it takes Tiny-ImageNet (64 px) but not CIFAR (32 px);
Inception-v3 needs 75 px, more than any BackdoorBench dataset except ImageNet.
"""
from __future__ import annotations

import torch.nn as nn

from . import register_model

# name: (final layer = BackdoorBench's selected_layer_name, smallest input in px)
ARCHITECTURES: dict[str, tuple[str, int]] = {
    "resnet18": ("fc", 1),
    "resnet34": ("fc", 1),
    "resnet50": ("fc", 1),
    "alexnet": ("classifier.6", 63),
    "vgg11": ("classifier.6", 32),
    "vgg16": ("classifier.6", 32),
    "vgg19": ("classifier.6", 32),
    "vgg19_bn": ("classifier.6", 32),
    "squeezenet1_0": ("classifier.1", 21),
    "densenet121": ("classifier", 29),
    "densenet161": ("classifier", 29),
    "inception_v3": ("fc", 75),
    "googlenet": ("fc", 15),
    "shufflenet_v2_x1_0": ("fc", 1),
    "mobilenet_v2": ("classifier.1", 1),
    "mobilenet_v3_large": ("classifier.3", 1),
    "resnext50_32x4d": ("fc", 1),
    "wide_resnet50_2": ("fc", 1),
    "mnasnet1_0": ("classifier.1", 1),
    "efficientnet_b0": ("classifier.1", 1),
    "efficientnet_b3": ("classifier.1", 1),
    "convnext_tiny": ("classifier.2", 32),
}
VIT_ARCHITECTURES = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32")
VIT_INPUT = 224  # BackdoorBench resizes every input to 224 x 224 in front of the ViT


def _torchvision_models():
    # Imported on first use: only these architectures depend on torchvision's build.
    import torchvision.models

    return torchvision.models


def adapt_input_channels(net: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the stem convolution (the first ``nn.Conv2d`` taking 3 channels) for
    ``in_channels`` inputs; its name, and every other key, stay the same."""
    if in_channels == 3:
        return net
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            stem = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                             module.dilation, module.groups, module.bias is not None, module.padding_mode)
            parent_name, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, attr, stem)
            return net
    raise ValueError(f"{type(net).__name__} has no 3-channel stem convolution to adapt")  # pragma: no cover


def _build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    models = _torchvision_models()
    kwargs = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True  # torchvision's default for weights=None, without its warning
    net = getattr(models, name)(**kwargs)
    if hasattr(net, "aux_logits"):
        net.aux_logits = False  # the aux heads stay (their keys); forward returns the main logits
    return adapt_input_channels(net, in_channels)


def _build_vit(name: str, num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.transforms import Resize

    vit = getattr(_torchvision_models(), name)(weights=None, num_classes=num_classes)
    return nn.Sequential(Resize((VIT_INPUT, VIT_INPUT)), adapt_input_channels(vit, in_channels))


def _register(name: str, last_layer: str, min_size: int, builder) -> None:
    @register_model(name, last_layer=last_layer, min_size=min_size)
    def build(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return builder(name, num_classes, in_channels)

    build.__name__ = name


for _name, (_layer, _min_size) in ARCHITECTURES.items():
    _register(_name, _layer, _min_size, _build_torchvision)
for _name in VIT_ARCHITECTURES:
    _register(_name, "1.heads.head", 1, _build_vit)
