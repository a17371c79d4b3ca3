"""ABL's loss-based isolation (Li et al., "Anti-Backdoor Learning: Training Clean Models on Poisoned Data",
NeurIPS 2021, https://arxiv.org/abs/2110.11571), steps 1-2 of ``defense/abl.py`` (spec §11.1).

A fresh model is trained on the poisoned training set for a few epochs with a loss that stops the
descent once a sample's loss falls under a floor: the backdoor is learnt much faster than the clean
task, so after these epochs the poisoned samples are the ones with the lowest cross-entropy.

* ``lga`` (the paper's local gradient ascent): ``sign(CE - γ) · CE``;
* ``flooding`` (BackdoorBench's default): ``|CE - b| + b``;
both on the batch-mean CE, as BackdoorBench computes them.

The per-sample score is ``-CE`` of the isolation model (higher = more suspicious). The flags are the
``isolation_ratio`` share with the lowest CE (1 %, the paper's value; BackdoorBench's detector flags
exactly the true poisoning rate, an oracle: spec §12).

``detection_pretrain/abl.py`` runs it on a record's poisoned training set
(BackdoorBench folder ``detection_pretrain/abl/``).

A fresh network of the record's architecture is trained for ``tuning_epochs`` on ``bd_train``
(BackdoorBench's test transform: no augmentation; SGD with Nesterov momentum, a fixed learning
rate), resumably (``checkpoint/isolation.pt``); the attack model is not used.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import option
from ..detector import DetectionResult, Detector, DetectorConfig, register_detector
from ..engine import StepOutput, TrainConfig, fit, predict
from ..models import build_classifier


LOSS_GUARDS = ("lga", "flooding")


def guarded_step(kind: str, gamma: float):
    """An ``engine.fit`` step applying ABL's loss guard to the batch-mean cross-entropy."""
    if kind not in LOSS_GUARDS:
        raise ValueError(f"kind must be one of {LOSS_GUARDS}, got {kind!r}")

    def step(model, batch, optimizer, ctx) -> StepOutput:
        with ctx.autocast():
            logits = model(batch.x)
            ce = F.cross_entropy(logits, batch.y)
        loss = torch.sign(ce - gamma) * ce if kind == "lga" else (ce - gamma).abs() + gamma
        ctx.backward_step(loss, optimizer)
        return StepOutput(ce.detach(), logits.detach())

    return step


def per_sample_loss(model, images, device: torch.device, batch_size: int = 512, amp: bool = False) -> np.ndarray:
    """Cross-entropy of every sample against the label it carries (eval mode, no augmentation)."""
    logits = predict(model, images, device, batch_size, amp)
    return F.cross_entropy(logits, images.labels.cpu(), reduction="none").double().numpy()


def lowest_share(values: np.ndarray, share: float) -> np.ndarray:
    """Flags of the ``share`` of samples with the lowest values (at least one when share > 0)."""
    flags = np.zeros(len(values), dtype=bool)
    k = 0 if share <= 0 else min(len(values), max(1, int(round(share * len(values)))))
    flags[np.argsort(values, kind="stable")[:k]] = True
    return flags


# --------------------------------------------------------------------------- the detector


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
    unused_flags = tuple(f for f in Detector.unused_flags if f != "lr")  # its isolation training reads --lr
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
        with run.timed("isolation_training"):
            result = fit(fresh, data.inspected, train_cfg, device=run.device, step=guarded_step(kind, gamma),
                         optimizer=optimizer, seed=cfg.random_seed, progress=cfg.progress, desc="abl isolation",
                         checkpoint=run.out_dir / "checkpoint" / "isolation.pt", resume=cfg.resume,
                         fingerprint=run.fingerprint)
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
