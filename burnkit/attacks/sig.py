"""SIG (Barni, Kallas & Tondi, 2019): a clean-label backdoor with an additive sinusoidal signal.

Every poisoned image gets ``delta * sin(2 pi j f / W)`` added at column ``j`` (the same value in
every row and channel), then is clipped to [0, 255] and cast to uint8 (spec §6.2). Training images
are poisoned **only in the target class** and keep their label (clean-label); at test time every
non-target image carries the signal.

Clean-label poison ratio: as in BackdoorBench (spec §9.5), ``pratio`` is a fraction of **all**
training samples, so ``round(pratio * N_train)`` target-class images are poisoned. On CIFAR-10 with
pratio 0.1 that is 5000 = the whole target class; with ``--train_subset`` it is counted on the
subset. When that exceeds the target class the run stops with an error asking for a lower pratio.

Example:
    python attack/sig.py --dataset cifar10 --model preactresnet18 --save_folder_name sig_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..attack import Attack, AttackConfig, register_attack
from ..config import option
from ..errors import BurnError


def sinusoid_signal(width: int, delta: float, freq: float) -> np.ndarray:
    """The per-column signal ``delta * sin(2 pi j f / W)`` for ``j = 0 .. W-1`` (float64)."""
    columns = np.arange(width, dtype=np.float64)
    return delta * np.sin(2.0 * np.pi * columns * freq / width)


def add_sinusoid(images: np.ndarray, delta: float, freq: float) -> np.ndarray:
    """Add the SIG signal to ``n x H x W x C`` uint8 images; clip to [0, 255] and truncate to uint8."""
    signal = sinusoid_signal(images.shape[2], delta, freq)[None, None, :, None]
    return np.clip(images.astype(np.float64) + signal, 0, 255).astype(np.uint8)


@dataclass
class SigConfig(AttackConfig):
    sig_delta: float = option(40.0, "amplitude of the sinusoid (0-255 pixel scale)")
    sig_f: float = option(6.0, "frequency: periods of the sinusoid across the image width")

    def validate(self):
        super().validate()
        if self.attack_label_trans != "all2one":
            raise BurnError("SIG is clean-label (poisoned images keep their target-class label), so only "
                            "attack_label_trans all2one is meaningful; drop --attack_label_trans all2all")


@register_attack
class Sig(Attack):
    """SIG: clean-label sinusoidal-signal backdoor, all-to-one."""

    name = "sig"
    config_cls = SigConfig
    clean_label = True

    def plan(self, train_y, test_y, rng):
        plan = super().plan(train_y, test_y, rng)
        in_target = int(np.sum(train_y[plan.train_positions] == self.cfg.attack_target))
        if len(plan.train_poison) == in_target:
            self.logger.info("SIG: pratio %s poisons all %d training images of target class %d (BackdoorBench's "
                             "clean-label rule, pratio over all samples)", self.cfg.pratio, in_target,
                             self.cfg.attack_target)
        return plan

    def apply_trigger(self, images, labels, indices, train):
        return add_sinusoid(images, self.cfg.sig_delta, self.cfg.sig_f)

    def provenance(self):
        return {"trigger": f"sinusoid delta {self.cfg.sig_delta}, f {self.cfg.sig_f}",
                "clean_label_pool": "target class only; pratio counts all training samples (spec §9.5)"}
