"""A small, fast CNN for CPU-scale experiments (not part of BackdoorBench).

Four conv-BN-ReLU blocks (widths w, 2w, 4w, 4w) with max-pooling, global max-pool and one linear
layer. With w=32 it trains one CIFAR-10 epoch in about a minute on 2 CPU cores and reaches about
80% clean accuracy in a few epochs, which is enough to study backdoors without a GPU.
Layer names (``features``, ``classifier``) follow torchvision's convention; ``classifier`` is the
final ``nn.Linear``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import register_model


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(in_channels, w), nn.MaxPool2d(2),
            *_block(w, 2 * w), nn.MaxPool2d(2),
            *_block(2 * w, 4 * w), nn.MaxPool2d(2),
            *_block(4 * w, 4 * w),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model("smallcnn", last_layer="classifier", min_size=8, backdoorbench=False)
def smallcnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> SmallCNN:
    return SmallCNN(num_classes, in_channels)
