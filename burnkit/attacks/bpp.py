"""BPP (Wang et al., CVPR 2022): an image-quantisation backdoor with contrastive negatives.

The trigger is colour-depth reduction: every 0-255 channel value is rounded to the nearest of
``squeeze_num`` levels, the multiples of ``255 / (squeeze_num - 1)``; with ``dithering`` the
rounding error is diffused Floyd-Steinberg style (7/16 right, 3/16 down-left, 5/16 down,
1/16 down-right) so that the image keeps its mean colour (spec §6.2). "Negative" samples add the
residual ``bd(p) - p`` of another random training image ``p`` to a clean image and keep their
label, which teaches the network that a generic quantisation-like perturbation is not the trigger.
Per batch ``num_bd = int(pratio * n)`` images are quantised and the next ``int(n * neg_ratio)``
are negatives (spec §1.4). Training poisons every batch on the fly
(:mod:`burnkit.attacks.dynamic`); the record is rebuilt afterwards as BackdoorBench does.

Example:
    python attack/bpp.py --dataset cifar10 --model preactresnet18 --save_folder_name bpp_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attack import register_attack
from ..config import option
from ..errors import BurnError
from .dynamic import DynamicAttack, DynamicConfig


def squeeze_colors(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Round every value of ``x`` (in [0, 1]) to the nearest of ``levels`` equally spaced levels."""
    steps = levels - 1
    return torch.round(x * steps) / steps


def floyd_steinberg(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantise NCHW ``x`` (in [0, 1]) to ``levels`` levels with Floyd-Steinberg error diffusion
    (raster order, every image and channel at once)."""
    img = x.clone()
    _, _, height, width = img.shape
    for row in range(height):
        for col in range(width):
            old = img[:, :, row, col].clone()
            new = squeeze_colors(old.clamp(0, 1), levels)
            img[:, :, row, col] = new
            err = old - new
            if col + 1 < width:
                img[:, :, row, col + 1] += err * (7 / 16)
            if row + 1 < height:
                if col > 0:
                    img[:, :, row + 1, col - 1] += err * (3 / 16)
                img[:, :, row + 1, col] += err * (5 / 16)
                if col + 1 < width:
                    img[:, :, row + 1, col + 1] += err * (1 / 16)
    return img


@dataclass
class BppConfig(DynamicConfig):
    neg_ratio: float = option(0.1, "negative samples per batch, as a fraction of the batch size")
    squeeze_num: int = option(8, "colour levels per channel after quantisation")
    dithering: bool = option(False, "Floyd-Steinberg dithering when quantising (slow on CPU)")

    def validate(self):
        super().validate()
        if self.squeeze_num < 2:
            raise BurnError(f"squeeze_num must be >= 2 colour levels, got {self.squeeze_num}")
        if not 0.0 <= self.neg_ratio <= 1.0:
            raise BurnError(f"neg_ratio must be in [0, 1], got {self.neg_ratio}")


@register_attack
class Bpp(DynamicAttack):
    """BPP: colour-depth quantisation backdoor with negative samples, all-to-one by default."""

    name = "bpp"
    config_cls = BppConfig

    def backdoor(self, x):
        if self.cfg.dithering:
            return floyd_steinberg(x, self.cfg.squeeze_num)
        return squeeze_colors(x, self.cfg.squeeze_num)

    def cross(self, x, partners, generator=None):
        return (x + self.backdoor(partners) - partners).clamp(0, 1)

    def num_cross(self, num_bd, n):
        return int(n * self.cfg.neg_ratio)

    def provenance(self):
        return {"trigger": f"{self.cfg.squeeze_num}-level colour quantisation"
                           f"{' with Floyd-Steinberg dithering' if self.cfg.dithering else ''}"}
