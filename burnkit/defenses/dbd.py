"""DBD: Decoupling the training process (Huang et al., "Backdoor Defense via Decoupling the Training
Process", ICLR 2022), as BackdoorBench runs it (extra-defenses §11.4). No clean data.

A backdoor is learnt because the features and the labels are learnt together; DBD learns them apart:

1. **self-supervised**: a fresh backbone (the record's network without its classification layer)
   + an MLP head (d -> 512 -> BN -> ReLU -> 128) trained ``epoch_self`` epochs with SimCLR's NT-Xent
   loss (temperature ``temperature_self`` 0.5) on two views of every image (crop 0.2-1, flip, colour
   jitter, grayscale, blur), batch ``batch_size_self`` (512), SGD ``lr_self`` 0.4 / momentum 0.9 /
   wd 1e-4, cosine with T_max ``cos_t_max_self`` (1000: it barely decays). The labels are not used,
   so the trigger is not tied to the target class. As in BackdoorBench's loss (the DBD authors'
   ``SimCLRLoss``), only the first view of each image is an anchor (``simclr_anchors first``; ``both``:
   SimCLR's symmetric loss over all 2B views);
2. **warm-up**: the classification layer alone on the frozen backbone (BN in train mode) for
   ``epoch_warmup`` (10) epochs, symmetric cross-entropy (alpha 0.1, beta 1), Adam ``lr_warmup``
   0.002 (one Adam over the whole network, as BackdoorBench builds it; the frozen backbone gets no
   step), batch 128, the train augmentation;
3. **semi-supervised fine-tuning** of the whole network for ``epochs``: before every epoch all
   samples are scored by SCE (eval mode) under one draw of the train augmentation, as BackdoorBench
   scores them through its train transform (``split_scoring_augment``); the ``epsilon`` (0.5) share
   with the lowest loss keeps its labels, the rest is used unlabelled; then ``train_iteration`` (1024)
   MixMatch steps with ``batch_size_semi`` (64) labelled + 64 unlabelled images (two views,
   sharpening T 0.5, mixup alpha 0.75, lambda_u 15 ramped linearly over ``rampup_length`` epochs of
   BackdoorBench's global epoch counter, the warm-up epochs included: ``rampup_counts_warmup``), the
   warm-up's Adam going on at ``lr_semi`` 0.002 (``semi_optimizer continue``, BackdoorBench's one
   optimizer; ``fresh``: a new Adam). The last model is exported, in the plain layout of the record's
   network.

BackdoorBench's export keeps ``backbone.*``/``linear.*`` keys (§11.4 pitfall; here the plain layout)
and its ``--epsilon`` is parsed as an int.

Files: ``self_df.csv`` (``epoch, loss_self``), ``dbd_df.csv`` / ``_summary`` (warm-up and
semi-supervised epochs: ``is_pretrain`` 0 / 1, ``xloss``, ``uloss``, ``labeled``,
``labeled_poison`` - the poison among the labelled samples, from the record's flags, report only -
and the test columns), checkpoints per phase.

Example:
    python defense/dbd.py --result_file badnet_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import option
from ..data import ImageSet
from ..defense import Defense, DefenseData, DefenseRun, register_defense
from ..engine import StepContext, StepOutput, TrainConfig, eval_mode, iterate, predict
from ..models import Classifier
from ..network_surgery import ProjectionModel, attach_head, detach_head, feature_dim
from ..options import OPTIMISER_FLAGS, SCHEDULE_FLAGS
from ..results import MetricLog
from ..views import ContrastiveViews
from .retraining import (NoCleanDataConfig, fit_phase, fresh_classifier, poisoned_train,
                         poisoned_train_size, require_share)

ANCHORS = ("first", "both")
BB_UNUSED_KEYS = ("data_root", "seed", "poison_rate", "target_type", "target_label", "trigger_type", "num_classes",
                  "input_height", "input_width", "input_channel", "num_workers_semi", "temperature")


@dataclass
class DBDConfig(NoCleanDataConfig):
    YAML_COMPAT_KEYS: ClassVar[tuple[str, ...]] = BB_UNUSED_KEYS
    epoch_self: int = option(100, "epochs of SimCLR self-supervised learning", low=0)
    batch_size_self: int = option(512, "batch size of SimCLR", low=2)
    lr_self: float = option(0.4, "SGD learning rate of SimCLR", above=0)
    temperature_self: float = option(0.5, "NT-Xent temperature", above=0)
    cos_t_max_self: int = option(1000, "cosine T_max (epochs) of SimCLR's learning rate", low=1)
    epoch_warmup: int = option(10, "epochs of the linear warm-up on the frozen backbone", low=0)
    lr_warmup: float = option(0.002, "Adam learning rate of the warm-up", above=0)
    sce_alpha: float = option(0.1, "symmetric cross-entropy: weight of CE", low=0)
    sce_beta: float = option(1.0, "symmetric cross-entropy: weight of reverse CE", low=0)
    epochs: int = option(100, "epochs of semi-supervised (MixMatch) fine-tuning", low=0)
    epsilon: float = option(0.5, "share of samples kept labelled (lowest SCE) in every semi epoch", above=0, high=1)
    train_iteration: int = option(1024, "MixMatch iterations per semi epoch", low=1)
    batch_size_semi: int = option(64, "labelled (and unlabelled) batch size of MixMatch", low=1)
    lr_semi: float = option(0.002, "Adam learning rate of MixMatch", above=0)
    lambda_u: float = option(15.0, "weight of MixMatch's unlabelled loss", low=0)
    rampup_length: int = option(190, "epochs over which lambda_u ramps up linearly", low=1)
    mixmatch_temperature: float = option(0.5, "sharpening temperature", above=0)
    mixmatch_alpha: float = option(0.75, "mixup Beta(alpha, alpha)", above=0)
    simclr_anchors: str = option("first", "NT-Xent anchors: first (each image's first view, BackdoorBench's and the "
                                          "DBD authors' SimCLRLoss) or both views (SimCLR's symmetric loss)",
                                 choices=ANCHORS)
    rampup_counts_warmup: bool = option(True, "lambda_u's ramp counts the global epoch, warm-up included "
                                              "(BackdoorBench); false: from the semi phase's first epoch")
    split_scoring_augment: bool = option(True, "score the samples for the labelled/unlabelled split under one draw "
                                               "of the train augmentation (BackdoorBench's train transform); false: "
                                               "the images as they are")
    semi_optimizer: str = option("continue", "continue: the warm-up's Adam goes on at lr_semi (BackdoorBench's one "
                                             "optimizer); fresh: a new Adam", choices=("continue", "fresh"))
    batch_size: int = option(128, "BackdoorBench's key; its warm-up forces 128, as here")
    amp: bool = option(False, "mixed precision on CUDA")


# --------------------------------------------------------------------------- losses


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, anchors: str = "first") -> torch.Tensor:
    """NT-Xent over the 2B normalised projections ``[z1; z2]``: an anchor's positive is the other view
    of its image, its negatives the other 2B - 2 views. ``anchors``: ``first`` (BackdoorBench, the DBD
    authors' ``SimCLRLoss``): the B first views only; ``both``: all 2B views (SimCLR's symmetric loss)."""
    if anchors not in ANCHORS:
        raise ValueError(f"anchors must be one of {ANCHORS}, got {anchors!r}")
    n = len(z1)
    z = torch.cat([z1, z2])
    rows = n if anchors == "first" else 2 * n
    logits = z[:rows] @ z.T / temperature
    logits = logits.masked_fill(torch.eye(rows, 2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])[:rows].to(z.device)
    return F.cross_entropy(logits, targets)


def symmetric_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
                            reduction: str = "mean") -> torch.Tensor:
    """SCE (Wang et al. 2019): ``alpha * CE + beta * RCE``, RCE = -sum softmax(logits) log(clamp(onehot, 1e-4, 1))."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    probs = F.softmax(logits, dim=1).clamp(min=1e-7, max=1.0)
    one_hot = F.one_hot(labels, logits.shape[1]).float().clamp(min=1e-4, max=1.0)
    rce = -(probs * torch.log(one_hot)).sum(1)
    loss = alpha * ce + beta * rce
    return loss.mean() if reduction == "mean" else loss


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    p = p ** (1 / temperature)
    return p / p.sum(1, keepdim=True)


def linear_rampup(progress: float, length: int) -> float:
    return float(min(max(progress / length, 0.0), 1.0))


def unlabelled_weight(cfg: DBDConfig, semi_epoch: int, iteration: int, iterations: int) -> float:
    """MixMatch's lambda_u at an iteration of a semi-supervised epoch: ``lambda_u`` times the linear ramp
    over ``rampup_length`` epochs. BackdoorBench passes its global epoch (warm-up epochs first) plus the
    iteration's fraction (``rampup_counts_warmup``); otherwise the ramp starts at the semi phase."""
    epoch = semi_epoch + (cfg.epoch_warmup if cfg.rampup_counts_warmup else 0)
    return cfg.lambda_u * linear_rampup(epoch + iteration / iterations, cfg.rampup_length)


# --------------------------------------------------------------------------- the semi-supervised split


class SemiSplit:
    """The labelled / unlabelled split of the current semi epoch (updated before every epoch)."""

    def __init__(self, train: ImageSet):
        self.train = train
        self.labelled_mask = torch.zeros(len(train), dtype=torch.bool)
        self.unlabelled: ImageSet | None = None

    def update(self, losses: torch.Tensor, epsilon: float, iterations: int, batch: int) -> ImageSet:
        """Keep the ``epsilon`` share with the lowest loss labelled; return the labelled pool repeated
        (reshuffled each time through) to ``iterations * batch`` samples, one MixMatch step per batch."""
        count = max(1, int(len(losses) * epsilon))
        order = torch.argsort(losses, stable=True)
        self.labelled_mask = torch.zeros(len(losses), dtype=torch.bool)
        self.labelled_mask[order[:count]] = True
        rest = order[count:]
        self.unlabelled = self.train.subset(rest if len(rest) else order[:count])
        labelled = order[:count]
        need = iterations * batch
        draws = [labelled[torch.randperm(count)] for _ in range(-(-need // count))]
        return self.train.subset(torch.cat(draws)[:need])


def mixmatch_step(cfg: DBDConfig, split: SemiSplit, augment, num_classes: int, iterations: int, state: dict):
    """One MixMatch update (Berthelot et al. 2019) on the engine's labelled batch and an unlabelled
    batch drawn here (torch's global RNG, which the engine's checkpoint restores)."""
    def step(model, batch, optimizer, ctx: StepContext) -> StepOutput:
        unl = split.unlabelled
        pos = torch.randint(0, len(unl), (len(batch),))
        u = unl.batch(pos, batch.x.device)
        u1, u2 = augment(u.x), augment(u.x)
        with torch.no_grad(), ctx.autocast():
            q = (F.softmax(model(u1).float(), 1) + F.softmax(model(u2).float(), 1)) / 2
            q = sharpen(q, cfg.mixmatch_temperature)
        inputs = torch.cat([batch.x, u1, u2])
        targets = torch.cat([F.one_hot(batch.y, num_classes).float(), q, q])
        lam = float(torch.distributions.Beta(cfg.mixmatch_alpha, cfg.mixmatch_alpha).sample())
        lam = max(lam, 1 - lam)
        perm = torch.randperm(len(inputs)).to(inputs.device)
        mixed_x = lam * inputs + (1 - lam) * inputs[perm]
        mixed_t = lam * targets + (1 - lam) * targets[perm]
        n = len(batch)
        with ctx.autocast():
            logits = model(mixed_x).float()
        x_loss = -(F.log_softmax(logits[:n], 1) * mixed_t[:n]).sum(1).mean()
        u_loss = ((F.softmax(logits[n:], 1) - mixed_t[n:]) ** 2).mean()
        weight = unlabelled_weight(cfg, ctx.epoch, state.get("it", 0), iterations)
        state["it"] = state.get("it", 0) + 1
        loss = x_loss + weight * u_loss
        ctx.backward_step(loss, optimizer)
        state["x"].append(float(x_loss.detach()))
        state["u"].append(float(u_loss.detach()))
        return StepOutput(loss.detach())
    return step


# --------------------------------------------------------------------------- the three stages


def self_supervised(run: DefenseRun, model: Classifier, train: ImageSet, cfg: DBDConfig) -> None:
    """SimCLR on ``model``'s backbone (its classification layer must be detached)."""
    dim = feature_dim(model, train.shape)
    projector = nn.Sequential(nn.Linear(dim, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, 128))
    contrastive = ProjectionModel(model, projector)
    views = ContrastiveViews(blur=True)

    def simclr_step(net, batch, optimizer, ctx: StepContext) -> StepOutput:
        x = batch.x.cpu()
        with ctx.autocast():
            z = net(torch.cat([views(x), views(x)]).to(batch.x.device)).float()
            loss = nt_xent(z[:len(x)], z[len(x):], cfg.temperature_self, cfg.simclr_anchors)
        ctx.backward_step(loss, optimizer)
        return StepOutput(loss.detach())

    log = MetricLog(run.out_dir, "self")
    optimizer = torch.optim.SGD(contrastive.parameters(), lr=cfg.lr_self, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.cos_t_max_self)
    batch_size = min(cfg.batch_size_self, len(train))  # full batches only: the head's BatchNorm1d needs > 1 sample
    fit_phase(run, contrastive, train, TrainConfig(epochs=cfg.epoch_self, batch_size=batch_size, drop_last=True,
                                                    augment=False, amp=cfg.amp),
              "self", step=simclr_step, optimizer=optimizer, scheduler=scheduler, eval_suite=None, log=False,
              on_row=lambda row: (log.append({"epoch": row["epoch"], "loss_self": row["train_epoch_loss_avg_over_batch"]}),
                                  log.save()))
    log.finish()


def warmup(run: DefenseRun, model: Classifier, linear: nn.Linear, train: ImageSet,
           cfg: DBDConfig) -> torch.optim.Optimizer:
    """The classification layer alone on the frozen backbone (BN keeps training mode); returns its Adam.
    With ``semi_optimizer continue`` that Adam holds the whole network, as BackdoorBench's (the frozen
    parameters get no gradient, so no step), and the semi phase goes on with it."""
    frozen = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in linear.parameters())]
    for p in frozen:
        p.requires_grad_(False)

    def sce_step(net, batch, optimizer, ctx: StepContext) -> StepOutput:
        with ctx.autocast():
            logits = net(batch.x).float()
            loss = symmetric_cross_entropy(logits, batch.y, cfg.sce_alpha, cfg.sce_beta)
        ctx.backward_step(loss, optimizer)
        return StepOutput(loss.detach(), logits.detach())

    params = model.parameters() if cfg.semi_optimizer == "continue" else linear.parameters()
    optimizer = torch.optim.Adam(params, lr=cfg.lr_warmup)
    try:
        fit_phase(run, model, train, TrainConfig(epochs=cfg.epoch_warmup, batch_size=128, lr_scheduler=None,
                                                 amp=cfg.amp),
                  "warmup", step=sce_step, optimizer=optimizer, scheduler=None,
                  epoch_end=lambda _e, _m, row: row.update(is_pretrain=0))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return optimizer


@torch.no_grad()
def split_losses(net, train: ImageSet, cfg: DBDConfig, device: torch.device, augment, epoch: int) -> torch.Tensor:
    """Per-sample SCE under the label each sample carries (eval mode), the split's score. With
    ``split_scoring_augment`` every image is scored under one draw of ``augment`` (BackdoorBench scores
    through its train transform), drawn from a generator seeded by the run's seed and the epoch, so a
    resumed run draws the same; otherwise the images as they are."""
    if not cfg.split_scoring_augment or augment is None:
        logits = predict(net, train, device, amp=cfg.amp)
    else:
        generator = torch.Generator().manual_seed(cfg.random_seed * 1_000_003 + epoch)
        ctx = StepContext(device, cfg.amp and device.type == "cuda", None)
        outs = []
        with eval_mode(net):
            for batch in iterate(train, 512, device, generator=generator, augment=augment):
                with ctx.autocast():
                    outs.append(net(batch.x).float().cpu())
        logits = torch.cat(outs)
    return symmetric_cross_entropy(logits, train.labels.cpu(), cfg.sce_alpha, cfg.sce_beta, reduction="none")


def semi_optimizer(model: Classifier, warmup_adam: torch.optim.Optimizer, cfg: DBDConfig) -> torch.optim.Optimizer:
    """The semi phase's Adam at ``lr_semi``: the warm-up's, moments included (``continue``, BackdoorBench's
    one optimizer), or a new one (``fresh``)."""
    if cfg.semi_optimizer == "fresh":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr_semi)
    for group in warmup_adam.param_groups:
        group["lr"] = cfg.lr_semi
    return warmup_adam


def semi_supervised(run: DefenseRun, model: Classifier, train: ImageSet, cfg: DBDConfig,
                    optimizer: torch.optim.Optimizer) -> None:
    split = SemiSplit(train)
    state: dict = {"x": [], "u": []}
    step = mixmatch_step(cfg, split, run.augment, run.record.num_classes, cfg.train_iteration, state)

    def epoch_begin(epoch: int, net) -> ImageSet:
        losses = split_losses(net, train, cfg, run.device, run.augment, epoch)
        state.update(x=[], u=[], it=0)
        return split.update(losses, cfg.epsilon, cfg.train_iteration, cfg.batch_size_semi)

    def epoch_end(_epoch, _net, row):
        row.update(is_pretrain=1, xloss=sum(state["x"]) / max(1, len(state["x"])),
                   uloss=sum(state["u"]) / max(1, len(state["u"])), labeled=int(split.labelled_mask.sum()),
                   labeled_poison=int((split.labelled_mask & train.poison.cpu()).sum()))

    fit_phase(run, model, train, TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size_semi, lr_scheduler=None,
                                             amp=cfg.amp),
              "semi", step=step, optimizer=optimizer, scheduler=None, epoch_begin=epoch_begin, epoch_end=epoch_end)


def decoupling(model: Classifier, data: DefenseData, cfg: DBDConfig, run: DefenseRun) -> Classifier:
    train = poisoned_train(data, "DBD")
    require_share(len(train), cfg.epsilon, "--epsilon", "labels")
    model = fresh_classifier(run)
    name, linear = detach_head(model.net, "DBD")
    self_supervised(run, model, train, cfg)
    attach_head(model.net, name, linear)
    adam = warmup(run, model, linear, train, cfg)
    semi_supervised(run, model, train, cfg, semi_optimizer(model, adam, cfg))
    run.extra_results["test_data_for_decisions"] = False
    return model


@register_defense
class Decoupling(Defense):
    """DBD: self-supervised backbone, linear warm-up, then semi-supervised fine-tuning on low-loss samples."""

    name = "dbd"
    # flags it accepts but does not read: every phase has its own lr_*, batch_size_* and optimiser
    unused_flags = ("lr", "batch_size", *OPTIMISER_FLAGS, *SCHEDULE_FLAGS)
    config_cls = DBDConfig
    needs_clean_subset = False
    budget_keys: ClassVar[tuple[str, ...]] = ("epoch_self", "epoch_warmup", "epochs", "train_iteration")

    def repair(self, model, data, cfg, run):
        return decoupling(model, data, cfg, run)

    def preflight(self, cfg, record, out_dir):
        require_share(poisoned_train_size(record, "DBD"), cfg.epsilon, "--epsilon", "labels")
