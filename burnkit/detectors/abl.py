"""``detection_pretrain/abl.py``: ABL's loss-based isolation on the poisoned training set
(algorithm: :mod:`burnkit.detection.abl`; BackdoorBench folder ``detection_pretrain/abl/``).

A fresh network of the record's architecture is trained for ``tuning_epochs`` on ``bd_train``
(BackdoorBench's test transform: no augmentation; SGD with Nesterov momentum, a fixed learning
rate), resumably (``checkpoint/isolation.pt``); the attack model is not used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..detection.abl import guarded_step, lowest_share, per_sample_loss
from ..detector import DetectionResult, Detector, DetectorConfig, register_detector
from ..engine import TrainConfig, fit
from ..models import build_classifier

GUARDS = ("LGA", "Flooding")


@dataclass
class ABLDetectionConfig(DetectorConfig):
    tuning_epochs: int = option(20, "epochs of the isolation model", low=1)
    lr: float = option(0.01, "learning rate (fixed)", above=0)
    momentum: float = option(0.9, "SGD momentum (Nesterov)", low=0)
    weight_decay: float = option(1e-4, "weight decay", low=0)
    gradient_ascent_type: str = option("Flooding", "loss guard: Flooding (BackdoorBench) or LGA (the paper)",
                                       choices=GUARDS)
    flooding: float = option(0.5, "Flooding level b: |CE - b| + b", low=0)
    gamma: float = option(0.5, "LGA floor γ: sign(CE - γ) CE", low=0)
    isolation_ratio: float = option(0.01, "share flagged: the lowest losses (the paper's 1 %; BackdoorBench "
                                          "flags the true poisoning rate)", above=0, high=1)
    resume: bool = option(True, "continue the isolation training of an interrupted run")


@register_detector
class ABLIsolation(Detector):
    """ABL loss isolation: the lowest-loss samples of a briefly, guardedly trained model."""

    name = "abl"
    config_cls = ABLDetectionConfig
    header = ("AUC", "target")
    folder = "detection_pretrain/{}"

    def detect(self, model, data, cfg, run):
        fresh = build_classifier(data.record.model_name, data.info, data.num_classes)
        kind = cfg.gradient_ascent_type.lower()
        gamma = cfg.gamma if kind == "lga" else cfg.flooding
        train_cfg = TrainConfig(epochs=cfg.tuning_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                sgd_momentum=cfg.momentum, wd=cfg.weight_decay, lr_scheduler=None,
                                augment=False, amp=cfg.amp)
        optimizer = torch.optim.SGD(fresh.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
        fingerprint = {"record": str(data.record.record_dir), "n": len(data.inspected), "epochs": cfg.tuning_epochs,
                       "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "guard": kind,
                       "gamma": gamma, "batch_size": cfg.batch_size, "seed": cfg.random_seed}
        with run.timed("isolation_training"):
            result = fit(fresh, data.inspected, train_cfg, device=run.device, step=guarded_step(kind, gamma),
                         optimizer=optimizer, seed=cfg.random_seed, progress=cfg.progress, desc="abl isolation",
                         checkpoint=run.out_dir / "checkpoint" / "isolation.pt", resume=cfg.resume,
                         fingerprint=fingerprint)
        with run.timed("losses"):
            loss = per_sample_loss(fresh, data.inspected, run.device, amp=cfg.amp)
        flags = lowest_share(loss, cfg.isolation_ratio)
        last = result.rows[-1] if result.rows else {}
        return DetectionResult(-loss, flags, threshold=float(-loss[flags].max()) if flags.any() else None,
                               target="None", notes={
                                   "score": "minus the isolation model's cross-entropy", "guard": kind,
                                   "guard_level": gamma, "train_loss_last_epoch": last.get("train_epoch_loss_avg_over_batch"),
                                   "train_acc_last_epoch": last.get("train_acc"),
                                   "rule": f"the {cfg.isolation_ratio} share with the lowest loss"})
