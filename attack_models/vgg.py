"""VGG-19 with batch norm (Simonyan & Zisserman, 2015), torchvision's layout and key names.

BackdoorBench builds ``vgg19_bn`` with torchvision (spec §5.2): convs at ``features.{0,3,7,...,49}``
(with bias), BN right after each, ``avgpool`` = AdaptiveAvgPool2d((7, 7)), and
``classifier.{0,3,6}`` = Linear 25088->4096->4096->num_classes with ReLU/Dropout between. Building
it here with the same registration order keeps the state dicts interchangeable without importing
torchvision (whose compiled ops must match the installed torch build). For 1-channel inputs the
first conv takes one channel under the same name.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import register_model

VGG19_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                512, 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, layout, num_classes: int = 10, in_channels: int = 3, batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(cin, item, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU(inplace=True))
            cin = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so training from scratch behaves the same
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


@register_model("vgg19_bn", last_layer="classifier.6")
def vgg19_bn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> VGG:
    return VGG(VGG19_LAYOUT, num_classes, in_channels, batch_norm=True)


@register_model("vgg19", last_layer="classifier.6")
def vgg19(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> VGG:
    return VGG(VGG19_LAYOUT, num_classes, in_channels, batch_norm=False)
