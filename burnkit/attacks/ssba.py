"""SSBA, sample-specific backdoor (Li et al., "Invisible Backdoor Attack with Sample-Specific
Triggers", ICCV 2021), all-to-one by default.

Every poisoned image is **replaced** by entry ``[original_index]`` of a pre-generated array
(spec §6.2): ``<dataset>_ssba_train_b1.npy`` for training, ``<dataset>_ssba_test_b1.npy`` for test,
both uint8 ``N x H x W x C`` over the whole split. The arrays are made here by
``python -m burnkit.resources ssba`` (a small StegaStamp-like encoder trained by the engine hides a
fixed bit string in every image; see :mod:`burnkit.resources.ssba_codec`); any
BackdoorBench-format arrays can be passed with ``--attack_train_replace_imgs_path`` /
``--attack_test_replace_imgs_path``.

Example:
    python -m burnkit.resources ssba --dataset cifar10
    python attack/ssba.py --dataset cifar10 --model preactresnet18 --save_folder_name ssba_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..attack import Attack, AttackConfig, register_attack
from ..config import option
from ..resources import DEFAULT_CACHE, check_length, load_image_array, missing, resource_command, ssba_paths


@dataclass
class SsbaConfig(AttackConfig):
    attack_train_replace_imgs_path: str | None = option(
        None, "training replacement images", default_help="<resource_cache>/ssba/<dataset>_ssba_train_b1.npy")
    attack_test_replace_imgs_path: str | None = option(
        None, "test replacement images", default_help="<resource_cache>/ssba/<dataset>_ssba_test_b1.npy")
    resource_cache: str = option(DEFAULT_CACHE, "folder of generated attack resources")


@register_attack
class Ssba(Attack):
    """SSBA: replace poisoned images by their encoder-embedded versions."""

    name = "ssba"
    config_cls = SsbaConfig

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        default_train, default_test = ssba_paths(cfg.resource_cache, cfg.dataset)
        command = resource_command("ssba", cfg.dataset, None, cfg.resource_cache, cfg.dataset_path)
        self.paths = {}
        self.arrays = {}
        self.command = command
        for split, given, default in (("train", cfg.attack_train_replace_imgs_path, default_train),
                                      ("test", cfg.attack_test_replace_imgs_path, default_test)):
            path = Path(given) if given else default
            if not path.is_file():
                raise missing(f"SSBA {split} replacement images", path, command,
                              f"attack_{split}_replace_imgs_path")
            self.paths[split] = path
            self.arrays[split] = load_image_array(path, info, None, f"SSBA {split} replacement images")

    def plan(self, train_y, test_y, rng):
        for split, labels in (("train", train_y), ("test", test_y)):
            check_length(self.arrays[split], len(labels), self.paths[split], self.command)
        return super().plan(train_y, test_y, rng)

    def apply_trigger(self, images, labels, indices, train):
        return np.ascontiguousarray(self.arrays["train" if train else "test"][indices])

    def provenance(self):
        return {"trigger": "SSBA replacement arrays", "train_array": str(self.paths["train"]),
                "test_array": str(self.paths["test"])}
