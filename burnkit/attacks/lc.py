"""Label-consistent backdoor (Turner, Tsipras and Madry, 2019): clean-label poisoning with
adversarially perturbed target-class images and a four-corner pattern.

* Clean-label: poisoned training samples come from the target class only and keep their (correct)
  label. As in BackdoorBench (spec §9.5), the count is ``round(pratio * N_train)`` - the ratio is
  taken over **all** training samples, not over the target class: on CIFAR-10 pratio 0.1 poisons
  5000 images, i.e. the whole target class; a count above the class size is refused.
* Training images: replaced by the PGD adversarial image ``adv[original_index]`` (generated here by
  ``python -m burnkit.resources lc_adv``), then the four-corner pattern is added.
* Test images: the four-corner pattern only, no adversarial replacement (spec §6.2).
* The pattern: a 3x3 +-1 motif in each corner of a 32x32 canvas (nearest-resized for other sizes).
  With ``reduced_amplitude`` a, ``+-255 a`` is added to every channel and clipped, so for a = 1
  corner pixels become exactly 0 or 255; ``reduced_amplitude: null`` pastes 0/255 directly.
* Only all-to-one: clean-label poisoning never shows the model a relabelled sample, so an
  all-to-all mapping (y -> y + 1) cannot be taught; all2all is refused with an error.

Example:
    python -m burnkit.resources lc_adv --dataset cifar10 --model preactresnet18 --classes 0
    python attack/lc.py --dataset cifar10 --model preactresnet18 --save_folder_name lc_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..attack import Attack, AttackConfig, register_attack
from ..config import option
from ..errors import BurnError
from ..resources import (DEFAULT_CACHE, check_length, crafted_path, lc_adv_path, load_image_array, missing,
                         resource_command)

# The 3x3 motif at the bottom-right corner (+1 -> brighten, -1 -> darken): a checkerboard whose
# outermost pixel is bright. It is symmetric, so mirroring it into the other corners changes nothing.
CORNER_MOTIF = np.array([[1, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=np.int8)
CANVAS = 32


def corner_signs(h: int, w: int) -> np.ndarray:
    """``h x w`` int8 map: +-1 on the four corner motifs, 0 elsewhere (nearest-resized from 32x32)."""
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.int8)
    m = CORNER_MOTIF.shape[0]
    canvas[:m, :m] = CORNER_MOTIF[::-1, ::-1]
    canvas[:m, -m:] = CORNER_MOTIF[::-1, :]
    canvas[-m:, :m] = CORNER_MOTIF[:, ::-1]
    canvas[-m:, -m:] = CORNER_MOTIF
    if (h, w) == (CANVAS, CANVAS):
        return canvas
    coded = Image.fromarray((canvas + 1).astype(np.uint8)).resize((w, h), Image.NEAREST)
    return np.asarray(coded, dtype=np.int8) - 1


def add_corner_trigger(images: np.ndarray, reduced_amplitude: float | None = 1.0) -> np.ndarray:
    """Four-corner trigger on ``n x H x W x C`` uint8 images (all channels alike)."""
    signs = corner_signs(images.shape[1], images.shape[2])[None, :, :, None]
    if reduced_amplitude is None:
        out = images.copy()
        out[np.broadcast_to(signs > 0, images.shape)] = 255
        out[np.broadcast_to(signs < 0, images.shape)] = 0
        return out
    added = images.astype(np.float64) + 255.0 * reduced_amplitude * signs
    return np.clip(added, 0, 255).astype(np.uint8)


@dataclass
class LabelConsistentConfig(AttackConfig):
    attack_train_replace_imgs_path: str | None = option(
        None, "PGD images, uint8 N_train x H x W x C",
        default_help="<resource_cache>/label-consistent/<model>_<dataset>_train.npy")
    attack_test_replace_imgs_path: str | None = option(None, "BackdoorBench's key; test images get the corner "
                                                             "pattern only", unused=True)
    reduced_amplitude: float | None = option(1.0, "corner amplitude in [0, 1] (null: paste 0/255)")
    resource_cache: str = option(DEFAULT_CACHE, "folder of generated attack resources")

    def validate(self) -> None:
        super().validate()
        if self.attack_label_trans != "all2one":
            raise BurnError("label-consistent is clean-label and supports only --attack_label_trans all2one "
                            "(its poisoned samples keep their labels, so no all2all mapping can be taught)")
        if self.reduced_amplitude is not None and not 0 <= self.reduced_amplitude <= 1:
            raise BurnError(f"reduced_amplitude must be in [0, 1] or null, got {self.reduced_amplitude}")


@register_attack
class LabelConsistent(Attack):
    """LC: clean-label, adversarial target-class images + four-corner pattern."""

    name = "lc"
    config_cls = LabelConsistentConfig
    clean_label = True

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        path = Path(cfg.attack_train_replace_imgs_path) if cfg.attack_train_replace_imgs_path else \
            lc_adv_path(cfg.resource_cache, cfg.dataset, cfg.model)
        self.command = resource_command("lc_adv", cfg.dataset, cfg.model, cfg.resource_cache, cfg.dataset_path) + \
            f" --classes {cfg.attack_target}" + (f" --train_subset {cfg.train_subset} --random_seed {cfg.random_seed}"
                                                 if cfg.train_subset else "")
        if not path.is_file():
            raise missing("label-consistent adversarial images", path, self.command, "attack_train_replace_imgs_path")
        self.adv_path = path
        self.adv = load_image_array(path, info, None, "label-consistent adversarial images")
        sidecar = crafted_path(path)
        self.crafted = np.load(sidecar) if sidecar.is_file() else None  # a plain BackdoorBench array: all crafted

    def plan(self, train_y, test_y, rng):
        check_length(self.adv, len(train_y), self.adv_path, self.command)
        return super().plan(train_y, test_y, rng)

    def apply_trigger(self, images, labels, indices, train):
        if train:
            if self.crafted is not None and not self.crafted[indices].all():
                lacking = int(indices[~self.crafted[indices]][0])
                raise BurnError(f"{self.adv_path} holds no adversarial image for training index {lacking} "
                                f"(class {int(labels[~self.crafted[indices]][0])}); create them with `{self.command}`")
            images = np.asarray(self.adv[indices])
        return add_corner_trigger(images, self.cfg.reduced_amplitude)

    def provenance(self):
        return {"trigger": "four-corner 3x3 motif", "adversarial_images": str(self.adv_path),
                "clean_label_pratio_over": "all training samples (BackdoorBench)"}
