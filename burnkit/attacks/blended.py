"""Blended (Chen et al., 2017): blend a trigger image into the input with ratio alpha.

``poisoned = (1 - alpha) x + alpha t``, clipped and truncated to uint8, alpha 0.2 at train and test
time (spec §6.2). BackdoorBench's default trigger (a Hello-Kitty photo) is not ours to ship, so the
default trigger is the project's own fixed image: uniform noise from a seeded generator, as in the
original Blended paper's random-pattern variant. Any image can be given with
``attack_trigger_img_path``.

Example:
    python attack/blended.py --dataset cifar10 --model preactresnet18 --save_folder_name blended_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..attack import Attack, AttackConfig, register_attack
from ..config import option
from .triggers import blend, load_trigger_image

NOISE_SEED = 20171215  # fixed: the default trigger must be the same image on every machine


def noise_trigger(h: int, w: int, c: int, seed: int = NOISE_SEED) -> np.ndarray:
    """The default Blended trigger: ``H x W x C`` uniform uint8 noise from a seeded generator."""
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


@dataclass
class BlendedConfig(AttackConfig):
    attack_trigger_img_path: str | None = option(None, "trigger image",
                                                 default_help="the project's seeded noise image")
    attack_train_blended_alpha: float = option(0.2, "blend ratio for training images")
    attack_test_blended_alpha: float = option(0.2, "blend ratio for test images")

    def validate(self):
        super().validate()
        for key in ("attack_train_blended_alpha", "attack_test_blended_alpha"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                from ..errors import BurnError

                raise BurnError(f"{key} must be in [0, 1], got {getattr(self, key)}")


@register_attack
class Blended(Attack):
    """Blended: alpha-blend a trigger image, all-to-one by default."""

    name = "blended"
    config_cls = BlendedConfig

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        h, w, c = info.img_size
        if cfg.attack_trigger_img_path:
            self.trigger = load_trigger_image(cfg.attack_trigger_img_path, (h, w), c)
        else:
            self.trigger = noise_trigger(h, w, c)

    def apply_trigger(self, images, labels, indices, train):
        alpha = self.cfg.attack_train_blended_alpha if train else self.cfg.attack_test_blended_alpha
        return blend(images, self.trigger, alpha)

    def trigger_images(self):
        return {"attack_trigger_img_path": ("blended_trigger.png", self.trigger)}

    def provenance(self):
        return {"trigger": self.cfg.attack_trigger_img_path or f"seeded uniform noise (seed {NOISE_SEED})"}
