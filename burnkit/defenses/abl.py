"""ABL: Anti-Backdoor Learning (Li et al., "Anti-Backdoor Learning: Training Clean Models on Poisoned
Data", NeurIPS 2021), as BackdoorBench runs it (extra-defenses §11.1). No clean data.

Poisoned samples are learnt much faster than clean ones, so early in training their loss is the
lowest. ABL trains a **fresh** model on the record's poisoned training set and:

1. **tunes** it ``tuning_epochs`` without augmentation (the test transform), SGD(``lr``, ``momentum``,
   ``weight_decay``, Nesterov) on a loss that keeps the batch loss near ``flooding`` (Flooding:
   ``|CE - b| + b``; LGA: ``sign(CE - gamma) * CE``), so clean samples are not fitted while the
   poison still is;
2. **isolates** the ``isolation_ratio`` share of samples with the lowest per-sample CE (eval mode);
3. with ``finetuning_ascent_model``, **trains on** the other samples for ``finetuning_epochs``
   (CE, the train augmentation; lr ``finetuning_lr`` = BackdoorBench's hard-coded 0.01, times 0.1
   from epoch ``finetuning_lr_drop_epoch`` = 40 on);
4. **unlearns** the isolated samples: ``unlearning_epochs`` of CE gradient *ascent* at
   ``unlearning_lr`` (BackdoorBench's hard-coded 1e-4), with the train augmentation
   (``unlearning_augment``; BackdoorBench gives the isolated set its train transform) and the
   fine-tuning's SGD going on, momentum buffers included (``unlearning_optimizer continue``;
   BackdoorBench sets the lr of the one optimizer of both phases). The last model is exported.

Fixed here (extra-defenses §11.1 pitfalls): each phase has its own CSV (BackdoorBench's
``unlearn_df.csv`` mixes fine-tuning and unlearning rows under one aggregator);
``--finetuning_ascent_model false`` means false. Every phase checkpoints per epoch and resumes.

Files: ``pre_train_df.csv``, ``finetune_df.csv``, ``unlearn_df.csv`` (each with ``_summary``),
``abl_df.csv`` (all phases, ``phase`` column; its summary's ``last`` = the exported model),
``abl_isolation_samples.csv`` / ``abl_isolation_report.json`` (per-sample isolation loss, isolated or not, and how many
isolated samples are poison - the flags are read for this report only), plots.

Example:
    python defense/abl.py --result_file badnet_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import option
from ..data import ImageSet
from ..defense import Defense, DefenseData, DefenseRun, register_defense
from ..engine import StepContext, StepOutput, TrainConfig, predict
from ..errors import BurnError
from ..models import Classifier
from ..options import OPTIMISER_FLAGS, SCHEDULE_FLAGS
from ..results import MetricLog, plot_metrics
from .retraining import (NoCleanDataConfig, fit_phase, fresh_classifier, poisoned_train,
                         poisoned_train_size, require_share, write_sample_flags)

ASCENT_TYPES = ("Flooding", "LGA")
UNLEARNING_OPTIMIZERS = ("continue", "fresh")
BB_UNUSED_KEYS = ("data_root", "seed", "poison_rate", "target_type", "target_label", "trigger_type", "num_classes",
                  "input_height", "input_width", "input_channel", "lr_finetuning_init", "lr_unlearning_init")


@dataclass
class ABLConfig(NoCleanDataConfig):
    YAML_COMPAT_KEYS: ClassVar[tuple[str, ...]] = BB_UNUSED_KEYS
    tuning_epochs: int = option(20, "epochs of the isolation (tuning) phase on all samples", low=1)
    finetuning_ascent_model: bool = option(True, "train on the non-isolated samples before unlearning")
    finetuning_epochs: int = option(60, "epochs of that training", low=0)
    unlearning_epochs: int = option(20, "epochs of gradient ascent on the isolated samples", low=0)
    lr: float = option(0.01, "learning rate of the tuning phase")
    momentum: float = option(0.9, "SGD momentum (Nesterov) of every phase", low=0)
    weight_decay: float = option(1e-4, "SGD weight decay of every phase", low=0)
    isolation_ratio: float = option(0.01, "share of samples isolated as poison (lowest loss)", above=0, high=1)
    gradient_ascent_type: str = option("Flooding", "loss of the tuning phase: Flooding or LGA", choices=ASCENT_TYPES)
    gamma: float = option(0.5, "LGA's loss target gamma")
    flooding: float = option(0.5, "Flooding's level b")
    batch_size: int = option(256, "batch size of every phase")
    finetuning_lr: float = option(0.01, "learning rate of the fine-tuning phase (BackdoorBench: hard-coded 0.01)", low=0)
    finetuning_lr_drop_epoch: int = option(40, "fine-tuning epoch from which the lr is 10x smaller (BackdoorBench: 40)",
                                           low=0)
    unlearning_lr: float = option(1e-4, "learning rate of the unlearning phase (BackdoorBench: hard-coded 1e-4)", low=0)
    unlearning_augment: bool = option(True, "the train augmentation on the isolated samples while unlearning "
                                            "(BackdoorBench); false: the images as they are")
    unlearning_optimizer: str = option("continue", "continue: the fine-tuning's SGD goes on at unlearning_lr, momentum "
                                                   "included (BackdoorBench); fresh: a new SGD",
                                       choices=UNLEARNING_OPTIMIZERS)
    amp: bool = option(False, "mixed precision on CUDA")


# --------------------------------------------------------------------------- losses and steps


def flooding_loss(ce: torch.Tensor, level: float) -> torch.Tensor:
    """Flooding (Ishida et al.): ``|CE - b| + b`` - gradient descent above b, ascent below it."""
    return (ce - level).abs() + level


def lga_loss(ce: torch.Tensor, gamma: float) -> torch.Tensor:
    """Local gradient ascent: ``sign(CE - gamma) * CE``."""
    return torch.sign(ce - gamma) * ce


def isolation_step(cfg: ABLConfig):
    """The tuning phase's step: the batch-mean CE through Flooding or LGA."""
    def step(model, batch, optimizer, ctx: StepContext) -> StepOutput:
        with ctx.autocast():
            logits = model(batch.x)
            ce = F.cross_entropy(logits, batch.y)
            loss = flooding_loss(ce, cfg.flooding) if cfg.gradient_ascent_type == "Flooding" else lga_loss(ce, cfg.gamma)
        ctx.backward_step(loss, optimizer)
        return StepOutput(ce.detach(), logits.detach())
    return step


def ascent_step(model, batch, optimizer, ctx: StepContext) -> StepOutput:
    """Gradient ascent on the cross-entropy (unlearning the isolated samples)."""
    with ctx.autocast():
        logits = model(batch.x)
        ce = F.cross_entropy(logits, batch.y)
    ctx.backward_step(-ce, optimizer)
    return StepOutput(ce.detach(), logits.detach())


# --------------------------------------------------------------------------- isolation


def per_sample_losses(model: Classifier, train: ImageSet, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """CE of every sample under its (possibly poisoned) label, eval mode, no augmentation
    (BackdoorBench uses batches of 1 in eval mode, which gives the same values)."""
    logits = predict(model, train, device, batch_size)
    return F.cross_entropy(logits, train.labels.cpu(), reduction="none")


def lowest_loss_share(losses: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the ``int(N * ratio)`` samples with the lowest loss (stable on ties)."""
    count = int(len(losses) * ratio)
    mask = torch.zeros(len(losses), dtype=torch.bool)
    mask[torch.argsort(losses, stable=True)[:count]] = True
    return mask


# --------------------------------------------------------------------------- the algorithm


def _sgd(model: Classifier, lr: float, cfg: ABLConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.momentum > 0)


def unlearning_optimizer(model: Classifier, finetuning: torch.optim.Optimizer | None,
                         cfg: ABLConfig) -> torch.optim.Optimizer:
    """The unlearning phase's SGD at ``unlearning_lr``: the fine-tuning's own optimizer with its momentum
    buffers (``continue``, BackdoorBench: one optimizer serves both phases, its lr reset per epoch), or
    a new one (``fresh``, or when there was no fine-tuning)."""
    if cfg.unlearning_optimizer == "fresh" or finetuning is None:
        return _sgd(model, cfg.unlearning_lr, cfg)
    for group in finetuning.param_groups:
        group["lr"] = cfg.unlearning_lr
    return finetuning


def _phase(run: DefenseRun, model: Classifier, train: ImageSet, phase: str, epochs: int, augment: bool,
           optimizer, scheduler=None, step=None):
    """One ABL phase through the engine; its rows go to ``<phase>_df.csv`` and ``abl_df.csv``."""
    cfg: ABLConfig = run.cfg  # type: ignore[assignment]
    log = MetricLog(run.out_dir, phase)

    def tag(_epoch, _model, row):
        row["phase"] = phase

    def on_row(row):
        log.append(row)
        log.save()

    train_cfg = TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr_scheduler=None, augment=augment, amp=cfg.amp)
    fit_phase(run, model, train, train_cfg, phase, step=step, optimizer=optimizer, scheduler=scheduler,
              attack_columns=True, epoch_end=tag, on_row=on_row)
    if log.rows:
        log.finish()
        plot_metrics(log.rows, run.out_dir, prefix=f"{phase}_")


def anti_backdoor_learning(model: Classifier, data: DefenseData, cfg: ABLConfig, run: DefenseRun) -> Classifier:
    train = poisoned_train(data, "ABL")
    require_share(len(train), cfg.isolation_ratio, "--isolation_ratio", "isolates")
    model = fresh_classifier(run)  # ABL trains from scratch; the backdoored model is not used
    _phase(run, model, train, "pre_train", cfg.tuning_epochs, False, _sgd(model, cfg.lr, cfg),
           step=isolation_step(cfg))

    with run.timed("isolation"):
        losses = per_sample_losses(model, train, run.device)
        isolated = lowest_loss_share(losses, cfg.isolation_ratio)
    write_sample_flags(run, train, isolated, losses, "abl_isolation")
    rest, iso = train.subset(torch.nonzero(~isolated).flatten()), train.subset(torch.nonzero(isolated).flatten())

    optimizer = None
    if cfg.finetuning_ascent_model and cfg.finetuning_epochs > 0:
        optimizer = _sgd(model, cfg.finetuning_lr, cfg)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [cfg.finetuning_lr_drop_epoch], 0.1)
        _phase(run, model, rest, "finetune", cfg.finetuning_epochs, True, optimizer, scheduler)
    if cfg.unlearning_epochs > 0:
        _phase(run, model, iso, "unlearn", cfg.unlearning_epochs, cfg.unlearning_augment,
               unlearning_optimizer(model, optimizer, cfg), step=ascent_step)
    run.extra_results.update({"test_data_for_decisions": False,
                              "epochs_trained": cfg.tuning_epochs + (cfg.finetuning_epochs if cfg.finetuning_ascent_model
                                                                     else 0) + cfg.unlearning_epochs})
    return model


@register_defense
class AntiBackdoorLearning(Defense):
    """ABL: train from scratch, isolate the lowest-loss samples early, then unlearn them."""

    name = "abl"
    # flags it accepts but does not read: its three phases use their own epochs, SGD and schedule
    unused_flags = ("epochs", *OPTIMISER_FLAGS, *SCHEDULE_FLAGS)
    config_cls = ABLConfig
    needs_clean_subset = False
    budget_keys: ClassVar[tuple[str, ...]] = ("tuning_epochs", "finetuning_epochs", "unlearning_epochs")

    def repair(self, model, data, cfg, run):
        return anti_backdoor_learning(model, data, cfg, run)

    def preflight(self, cfg, record, out_dir):
        n = poisoned_train_size(record, "ABL")
        require_share(n, cfg.isolation_ratio, "--isolation_ratio", "isolates")
        if cfg.finetuning_ascent_model and cfg.finetuning_epochs > 0 and int(n * cfg.isolation_ratio) >= n:
            raise BurnError(f"--isolation_ratio {cfg.isolation_ratio} isolates all {n} training samples, leaving none "
                            "to fine-tune on; lower it (or pass --finetuning_ascent_model false)")
