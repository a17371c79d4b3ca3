"""BadNets (Gu et al., 2017): a 3x3 white square at the bottom-right corner, all-to-one.

BackdoorBench's trigger is a 32x32 image, black except a 3x3 white square at rows/cols 29-31,
resized (bilinear) to the dataset's size; every pixel where it is > 0 overwrites the image
(spec §6.2). A custom trigger image can be given with ``patch_mask_path``.

Example:
    python attack/badnet.py --dataset cifar10 --model preactresnet18 --save_folder_name badnet_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..attack import Attack, AttackConfig, register_attack
from ..config import option
from .triggers import load_trigger_image, resize_pattern, stamp


def white_square_trigger(size: int = 32, square: int = 3, channels: int = 3) -> np.ndarray:
    """BackdoorBench's ``trigger_image.png``: black, with a white square flush with the
    bottom-right corner."""
    img = np.zeros((size, size, channels), dtype=np.uint8)
    img[size - square:, size - square:, :] = 255
    return img


@dataclass
class BadNetConfig(AttackConfig):
    patch_mask_path: str | None = option(None, "trigger image", default_help="the 3x3 white square")


@register_attack
class BadNet(Attack):
    """BadNets: patch trigger, all-to-one by default."""

    name = "badnet"
    config_cls = BadNetConfig

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        h, w, c = info.img_size
        if cfg.patch_mask_path:
            self.trigger = load_trigger_image(cfg.patch_mask_path, (h, w), c)
        elif h < 16:
            # Resizing the 32-px trigger to a tiny image would leave one grey pixel; draw a
            # 2x2 white square natively instead (only our 8x8 test dataset is this small).
            self.trigger = white_square_trigger(size=h, square=2, channels=c)
        else:
            self.trigger = resize_pattern(white_square_trigger(channels=c), (h, w), c)

    def apply_trigger(self, images, labels, indices, train):
        return stamp(images, self.trigger)

    def trigger_images(self):
        return {"patch_mask_path": ("trigger_image.png", self.trigger)}

    def provenance(self):
        return {"trigger": self.cfg.patch_mask_path or "3x3 white square, bottom-right (32x32, resized)"}
