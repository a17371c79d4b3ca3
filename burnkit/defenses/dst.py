"""D-ST: sample distinction, then two-stage secure training (Chen, Wu & Wang, "Effective Backdoor
Defense by Exploiting Sensitivity of Poisoned Samples", NeurIPS 2022), as BackdoorBench runs it
(extra-defenses §11.5). No clean data. The sample distinction (SD) is D-BR's (``dbr.py``).

After SD has split the poisoned training set into clean / suspicious / poisoned samples:

1. a **fresh** encoder (the record's network without its classification layer) + a projection MLP
   (d -> d -> ReLU -> ``feat_dim``, normalised) is trained ``epochs_extractor`` (200) epochs with the
   semi-supervised contrastive loss on two SimCLR views (crop 0.2-1, flip, colour jitter, grayscale):
   a clean sample's positives are its other view and every same-label sample, a suspicious or
   poisoned sample's only positive is its own other view (temperature 0.1, base temperature 0.07 as
   SupContrast). SGD ``lr_extractor`` 0.5, momentum 0.9, weight decay ``weight_decay_extractor``
   5e-4 (BackdoorBench's ``set_optimizer``; SupContrast's is 1e-4); the lr warms up per iteration from
   0.01 over ``warm_epochs`` (10) epochs, then follows a cosine to 0.001 x ``lr_extractor``;
2. a linear head on the frozen encoder (eval mode) is trained ``epochs_classifier`` (10) epochs on
   ``CE(clean) - poison_loss_weight * CE(poisoned)`` (0.001; suspicious samples give no loss), SGD
   momentum 0.9, weight decay ``weight_decay_classifier`` 5e-4 (BackdoorBench's; SupContrast's linear
   stage has none), the lr warming up per iteration from 0.01 to ``lr_classifier`` (5), on one view of
   the same strong augmentation as the encoder stage (``classifier_augment contrastive``, as
   BackdoorBench's ``mixed_ce`` loader; ``standard``: the train crop and flip);
3. encoder and head are merged into a plain network of the record's architecture and exported.

BackdoorBench's ``d-st/cifar10.yaml`` lacks keys its script reads (§11.5 pitfall); here every key has
its intended default.

Files: SD's (see ``dbr.py``), ``log/train_extractor_df.csv``, ``d-st_df.csv`` / ``_summary`` (the
classifier stage, one row per epoch), ``d-st_samples.csv`` / ``d-st_report.json``.

Example:
    python defense/d-st.py --result_file badnet_cifar10
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import option
from ..defense import Defense, DefenseData, DefenseRun, register_defense
from ..engine import StepContext, StepOutput, TrainConfig
from ..models import Classifier
from ..network_surgery import FrozenEncoderHead, ProjectionModel, attach_head, detach_head, feature_dim
from ..results import MetricLog
from ..views import ContrastiveViews
from .dbr import CLEAN, POISON, SampleDistinctionConfig, report_distinction, sample_distinction
from .retraining import fit_phase, fresh_classifier, poisoned_train, poisoned_train_size


CLASSIFIER_AUGMENTS = ("contrastive", "standard")


@dataclass
class DSTConfig(SampleDistinctionConfig):
    epochs_extractor: int = option(200, "epochs of the contrastive encoder training", low=1)
    lr_extractor: float = option(0.5, "peak learning rate of the encoder training", above=0)
    weight_decay_extractor: float = option(5e-4, "weight decay of the encoder training (BackdoorBench's set_optimizer; "
                                                 "SupContrast: 1e-4)", low=0)
    weight_decay_classifier: float = option(5e-4, "weight decay of the linear head (BackdoorBench's set_optimizer; "
                                                  "SupContrast's linear stage: 0)", low=0)
    classifier_augment: str = option("contrastive", "augmentation of the head's stage: contrastive (one view of the "
                                                    "encoder stage's strong augmentation, BackdoorBench) or standard "
                                                    "(the train crop and flip)", choices=CLASSIFIER_AUGMENTS)
    temperature: float = option(0.1, "temperature of the contrastive loss", above=0)
    base_temperature: float = option(0.07, "SupContrast's base temperature (the loss is scaled by temperature / it)",
                                     above=0)
    warm_epochs: int = option(10, "epochs of linear lr warm-up (from 0.01) of both stages", low=0)
    feat_dim: int = option(128, "output width of the projection MLP", low=1)
    epochs_classifier: int = option(10, "epochs of the linear head on the frozen encoder", low=1)
    lr_classifier: float = option(5.0, "learning rate the head's warm-up reaches", above=0)
    poison_loss_weight: float = option(0.001, "weight of the (subtracted) CE on the poisoned set", low=0)


# --------------------------------------------------------------------------- losses


def consistency_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor,
                                 temperature: float, base_temperature: float | None = None) -> torch.Tensor:
    """D-ST's semi-supervised contrastive loss over the 2B normalised projections ``[z1; z2]``.

    Anchor i's positives: for a clean sample, every other view of the same label (both views of
    every same-label sample, the non-clean ones included, as BackdoorBench's mask does); for a
    suspicious or poisoned one only its own other view. Loss = -(T / T_base) x the mean over anchors
    of the mean log-probability of the positives among all other 2B - 1 views."""
    base_temperature = base_temperature or temperature
    n = len(z1)
    z = torch.cat([z1, z2])
    y = labels.repeat(2)
    anchor_clean = clean.repeat(2)
    same_sample = torch.arange(2 * n, device=z.device) % n
    positives = torch.where(anchor_clean[:, None], y[:, None] == y[None, :],
                            same_sample[:, None] == same_sample[None, :]).float()
    not_self = 1 - torch.eye(2 * n, device=z.device)
    positives = positives * not_self
    logits = z @ z.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_log_prob_pos = (positives * log_prob).sum(1) / positives.sum(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, flags: torch.Tensor, weight: float) -> torch.Tensor:
    """``CE(clean) - weight * CE(poisoned)``; a group absent from the batch contributes 0. A batch of
    suspicious samples only gives a zero loss that is still part of the graph (zero gradients), so
    the training step runs instead of failing on a constant."""
    loss = logits.sum() * 0.0
    clean, poison = flags == CLEAN, flags == POISON
    if clean.any():
        loss = loss + F.cross_entropy(logits[clean], labels[clean])
    if poison.any():
        loss = loss - weight * F.cross_entropy(logits[poison], labels[poison])
    return loss


def warmup_cosine(lr: float, epochs: int, iters_per_epoch: int, warm_epochs: int, warm_from: float = 0.01,
                  decay: float | None = 1e-3):
    """SupContrast's per-iteration learning rate as a ``LambdaLR`` multiplier: linear warm-up from
    ``warm_from`` over ``warm_epochs`` epochs to where the schedule is then, then per epoch a cosine
    from ``lr`` to ``decay * lr`` (``decay`` None: constant ``lr``). Epochs count from 1, as there."""
    def per_epoch(epoch: int) -> float:
        if decay is None:
            return lr
        low = lr * decay
        return low + (lr - low) * (1 + math.cos(math.pi * epoch / epochs)) / 2

    warm_to = per_epoch(warm_epochs)

    def multiplier(step: int) -> float:
        epoch, batch = step // iters_per_epoch + 1, step % iters_per_epoch
        if epoch <= warm_epochs:
            progress = (batch + (epoch - 1) * iters_per_epoch) / (warm_epochs * iters_per_epoch)
            return (warm_from + progress * (warm_to - warm_from)) / lr
        return per_epoch(epoch) / lr

    return multiplier


# --------------------------------------------------------------------------- the two stages


def _iters(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def secure_training(run: DefenseRun, train, flags: torch.Tensor, cfg: DSTConfig) -> Classifier:
    model = fresh_classifier(run, seed_offset=1)
    name, linear = detach_head(model.net, "D-ST")
    dim = feature_dim(model, train.shape)
    projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, cfg.feat_dim))
    contrastive = ProjectionModel(model, projector)
    views = ContrastiveViews(blur=False)
    flags_dev = flags.to(run.device)

    def extractor_step(net, batch, optimizer, ctx: StepContext) -> StepOutput:
        x = batch.x
        both = torch.cat([views(x.cpu()).to(x.device), views(x.cpu()).to(x.device)])
        with ctx.autocast():
            z = net(both).float()
            z1, z2 = z[:len(x)], z[len(x):]
            loss = consistency_contrastive_loss(z1, z2, batch.y, flags_dev[batch.position] == CLEAN,
                                                cfg.temperature, cfg.base_temperature)
        ctx.backward_step(loss, optimizer)
        return StepOutput(loss.detach())

    iters = _iters(len(train), cfg.batch_size)
    optimizer = torch.optim.SGD(contrastive.parameters(), lr=cfg.lr_extractor, momentum=0.9,
                                weight_decay=cfg.weight_decay_extractor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        cfg.lr_extractor, cfg.epochs_extractor, iters, cfg.warm_epochs))
    log = MetricLog(run.log_dir, "train_extractor")
    fit_phase(run, contrastive, train, TrainConfig(epochs=cfg.epochs_extractor, batch_size=cfg.batch_size,
                                                    augment=False, scheduler_step="batch", amp=cfg.amp),
              "extractor", step=extractor_step, optimizer=optimizer, scheduler=scheduler, eval_suite=None,
              log=False, on_row=lambda row: (log.append({k: v for k, v in row.items() if k != "batch"}), log.save()))
    log.finish()

    head = FrozenEncoderHead(model, linear)

    strong = cfg.classifier_augment == "contrastive"

    def classifier_step(net, batch, optimizer, ctx: StepContext) -> StepOutput:
        x = views(batch.x.cpu()).to(batch.x.device) if strong else batch.x
        with ctx.autocast():
            logits = net(x)
            loss = mixed_cross_entropy(logits.float(), batch.y, flags_dev[batch.position], cfg.poison_loss_weight)
        ctx.backward_step(loss, optimizer)
        return StepOutput(loss.detach(), logits.detach())

    optimizer = torch.optim.SGD(linear.parameters(), lr=cfg.lr_classifier, momentum=0.9,
                                weight_decay=cfg.weight_decay_classifier)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        cfg.lr_classifier, cfg.epochs_classifier, iters, cfg.warm_epochs, decay=None))
    fit_phase(run, head, train, TrainConfig(epochs=cfg.epochs_classifier, batch_size=cfg.batch_size,
                                            scheduler_step="batch", augment=not strong, amp=cfg.amp),
              "classifier", step=classifier_step, optimizer=optimizer, scheduler=scheduler)
    for p in model.parameters():
        p.requires_grad_(True)
    attach_head(model.net, name, linear)
    return model


def dst(model: Classifier, data: DefenseData, cfg: DSTConfig, run: DefenseRun) -> Classifier:
    train = poisoned_train(data, "D-ST")
    flags, scores = sample_distinction(run, train, cfg)
    report_distinction(run, train, flags, scores)
    run.extra_results["test_data_for_decisions"] = False
    return secure_training(run, train, flags, cfg)


@register_defense
class DST(Defense):
    """D-ST: separate samples by their feature sensitivity, then train securely from scratch."""

    name = "d-st"
    config_cls = DSTConfig
    needs_clean_subset = False
    budget_keys: ClassVar[tuple[str, ...]] = ("epochs", "epochs_intra", "epochs_extractor", "epochs_classifier")

    def repair(self, model, data, cfg, run):
        return dst(model, data, cfg, run)

    def preflight(self, cfg, record, out_dir):
        poisoned_train_size(record, "D-ST")
