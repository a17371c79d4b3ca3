"""SAU: Shared Adversarial Unlearning (Wei et al., NeurIPS 2023, spec §7.7).

Paper: "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial
Examples", https://arxiv.org/abs/2307.10562.

A frozen copy of the backdoored model is the reference ``h_ref``; the other copy ``h`` is trained.
For ``n_rounds`` passes over the clean subset (test transform: no augmentation), every batch gets

1. **shared PGD** (:func:`shared_pgd`): a per-sample perturbation ``δ`` in [0, 1] pixel space,
   ``||δ||_∞ <= trigger_norm``, ``x + δ`` kept in [0, 1], initialised at ``+trigger_norm``
   (``pgd_init: max``), refined by ``adv_steps`` signed-gradient *descent* steps of size ``adv_lr`` on
   ``beta_1 * L_adv + beta_2 * L_share`` (:func:`pgd_objective`), where

   * ``L_adv = -(CE(h(x+δ), y) + CE(h_ref(x+δ), y))``, each model's term counted only on samples
     whose prediction has not yet flipped away from that model's clean prediction;
   * ``L_share`` = the Jensen-Shannon divergence of the two models' softmax outputs, counted only on
     samples that are not yet a *shared* adversarial example (both models predict the same wrong
     class);

   stopping early once every sample is a shared adversarial example;
2. **unlearning** (:func:`unlearning_loss`), ``outer_steps`` Adam steps on
   ``lmd_1 CE(h(x), y) + lmd_2 CE(h(x+δ), y) + lmd_3 L_shared`` where ``L_shared`` penalises, on
   samples whose reference prediction was flipped to a wrong class ``ŷ_ref``, ``-log(1 - p_h(ŷ_ref | x+δ))``
   with ``p`` clamped to [0.001, 0.999].

Masked sums are divided by the batch size (a per-sample loss averaged over the batch, the paper's
empirical risk). BatchNorm stays in eval mode unless ``--train_mode``; the scheduler is never
stepped (BackdoorBench builds one but does not step it). Every round is scored (``sau_df.csv``).

Example:
    python defense/sau.py --result_file badnet_cifar10 --yaml_path config/defense/sau/cifar10.yaml
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import option
from ..defense import Defense, DefenseConfig, DefenseData, DefenseRun, register_defense
from ..engine import StepContext, StepOutput, eval_mode
from ..errors import BurnError
from ..models import Classifier

PGD_INITS = ("max", "min", "zero", "random")
PROB_CLAMP = (0.001, 0.999)


@dataclass
class SAUConfig(DefenseConfig):
    n_rounds: int = option(100, "passes over the clean subset (each: shared PGD + unlearning per batch)")
    outer_steps: int = option(1, "unlearning optimiser steps per batch")
    lr: float = option(0.0001, "learning rate of the unlearning optimiser")
    client_optimizer: str = option("adam", "unlearning optimiser: adam (amsgrad, as BackdoorBench), sgd or adadelta")
    wd: float = option(0.0, "weight decay of the unlearning optimiser")
    batch_size: int = option(256, "batch size")
    lr_scheduler: str | None = option("CosineAnnealingLR", "accepted for BackdoorBench compatibility (never stepped, as there)")
    optim: str = option("Adam", "accepted for BackdoorBench compatibility (unused, as there)")
    lmd_1: float = option(1.0, "weight of CE on clean samples")
    lmd_2: float = option(0.0, "weight of CE on perturbed samples")
    lmd_3: float = option(1.0, "weight of the shared adversarial unlearning loss")
    beta_1: float = option(0.01, "PGD: weight of the adversarial loss L_adv")
    beta_2: float = option(1.0, "PGD: weight of the sharing loss L_share (JS divergence)")
    trigger_norm: float = option(0.2, "L_inf bound of the perturbation in [0, 1] pixel units")
    norm_type: str = option("L_inf", "perturbation norm (L_inf)")
    adv_lr: float = option(0.2, "PGD step size in pixel units")
    adv_steps: int = option(5, "PGD steps")
    pgd_init: str = option("max", "PGD start: max (+bound), min (-bound), zero or random (uniform)")
    train_mode: bool = option(False, "unlearn with BatchNorm in train mode (batch statistics)")

    def validate(self) -> None:
        super().validate()
        if self.norm_type not in ("L_inf", "Linf", "linf"):
            raise BurnError(f"--norm_type {self.norm_type!r} is not supported; use L_inf")
        if self.pgd_init not in PGD_INITS:
            raise BurnError(f"--pgd_init {self.pgd_init!r} is unknown; use one of {', '.join(PGD_INITS)}")
        if self.trigger_norm < 0 or self.adv_lr < 0 or self.adv_steps < 0 or self.outer_steps < 1:
            raise BurnError("--trigger_norm, --adv_lr and --adv_steps must be >= 0 and --outer_steps >= 1")


# --------------------------------------------------------------------------- losses and masks


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence (nats) between ``softmax(logits_p)`` and ``softmax(logits_q)``."""
    log_p, log_q = F.log_softmax(logits_p, 1), F.log_softmax(logits_q, 1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), 0) - torch.log(torch.tensor(2.0, device=log_p.device))
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(1)
    return 0.5 * (kl_pm + kl_qm)


@dataclass
class PGDMasks:
    """Which samples each PGD term still counts (bool per sample)."""

    model_unflipped: torch.Tensor  # h still predicts its clean prediction
    ref_unflipped: torch.Tensor  # h_ref still predicts its clean prediction
    shared: torch.Tensor  # both predict the same class, and it is wrong


def pgd_masks(pred: torch.Tensor, pred_ref: torch.Tensor, clean_pred: torch.Tensor,
              clean_pred_ref: torch.Tensor, labels: torch.Tensor) -> PGDMasks:
    return PGDMasks(pred == clean_pred, pred_ref == clean_pred_ref, (pred == pred_ref) & (pred != labels))


def pgd_objective(logits: torch.Tensor, logits_ref: torch.Tensor, labels: torch.Tensor, masks: PGDMasks,
                  beta_1: float, beta_2: float) -> torch.Tensor:
    """``beta_1 L_adv + beta_2 L_share``; PGD *descends* it (raising CE, pulling outputs together)."""
    n = labels.shape[0]
    ce = F.cross_entropy(logits, labels, reduction="none")
    ce_ref = F.cross_entropy(logits_ref, labels, reduction="none")
    l_adv = -((ce * masks.model_unflipped).sum() + (ce_ref * masks.ref_unflipped).sum()) / n
    l_share = (js_divergence(logits, logits_ref) * ~masks.shared).sum() / n
    return beta_1 * l_adv + beta_2 * l_share


def _project(delta: torch.Tensor, x: torch.Tensor, bound: float) -> torch.Tensor:
    return (x + delta.clamp(-bound, bound)).clamp(0.0, 1.0) - x


def shared_pgd(model: nn.Module, ref: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SAUConfig,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """A per-sample shared adversarial perturbation for the batch ``x`` (pixels in [0, 1])."""
    bound = cfg.trigger_norm
    if cfg.pgd_init == "max":
        delta = torch.full_like(x, bound)
    elif cfg.pgd_init == "min":
        delta = torch.full_like(x, -bound)
    elif cfg.pgd_init == "random":
        delta = (torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1) * bound
    else:
        delta = torch.zeros_like(x)
    delta = _project(delta, x, bound)
    with eval_mode(model), eval_mode(ref):
        with torch.no_grad():
            clean_pred, clean_pred_ref = model(x).argmax(1), ref(x).argmax(1)
        for _ in range(cfg.adv_steps):
            delta.requires_grad_(True)
            logits, logits_ref = model(x + delta), ref(x + delta)
            masks = pgd_masks(logits.argmax(1), logits_ref.argmax(1), clean_pred, clean_pred_ref, y)
            if bool(masks.shared.all()):
                break
            loss = pgd_objective(logits, logits_ref, y, masks, cfg.beta_1, cfg.beta_2)
            grad, = torch.autograd.grad(loss, delta)
            delta = _project(delta.detach() - cfg.adv_lr * grad.sign(), x, bound)
    return delta.detach()


def shared_unlearning_term(logits_adv: torch.Tensor, ref_adv_pred: torch.Tensor, ref_fooled: torch.Tensor) -> torch.Tensor:
    """``L_shared``: mean over the batch of ``-log(1 - p(ŷ_ref | x+δ))`` on samples where the reference was fooled."""
    p = F.softmax(logits_adv, 1).gather(1, ref_adv_pred.unsqueeze(1)).squeeze(1).clamp(*PROB_CLAMP)
    return (-torch.log(1.0 - p) * ref_fooled).sum() / logits_adv.shape[0]


def unlearning_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, labels: torch.Tensor,
                    ref_adv_pred: torch.Tensor, ref_fooled: torch.Tensor, cfg: SAUConfig) -> torch.Tensor:
    loss = cfg.lmd_1 * F.cross_entropy(logits_clean, labels)
    if cfg.lmd_2:
        loss = loss + cfg.lmd_2 * F.cross_entropy(logits_adv, labels)
    if cfg.lmd_3:
        loss = loss + cfg.lmd_3 * shared_unlearning_term(logits_adv, ref_adv_pred, ref_fooled)
    return loss


def make_sau_step(ref: nn.Module, cfg: SAUConfig, generator: torch.Generator | None = None):
    """An engine step: shared PGD against (model, ref), then ``outer_steps`` unlearning updates."""

    def sau_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> StepOutput:
        x, y = batch.x, batch.y
        delta = shared_pgd(model, ref, x, y, cfg, generator)
        x_adv = x + delta
        with torch.no_grad():
            ref_clean_pred = ref(x).argmax(1)
            ref_adv_pred = ref(x_adv).argmax(1)
        ref_fooled = (ref_adv_pred != y) & (ref_adv_pred != ref_clean_pred)
        with eval_mode(model, train=cfg.train_mode):
            for _ in range(cfg.outer_steps):
                logits_clean, logits_adv = model(x), model(x_adv)
                loss = unlearning_loss(logits_clean, logits_adv, y, ref_adv_pred, ref_fooled, cfg)
                ctx.backward_step(loss, optimizer)
        return StepOutput(loss.detach(), logits_clean.detach())

    return sau_step


# --------------------------------------------------------------------------- the defense


def shared_adversarial_unlearning(model: Classifier, data: DefenseData, cfg: SAUConfig,
                                  run: DefenseRun) -> Classifier:
    model.to(run.device)
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    train_cfg = cfg.train_config(epochs=cfg.n_rounds, lr_scheduler=None, amp=False, augment=False)
    generator = torch.Generator().manual_seed(cfg.random_seed + 1)

    def score(epoch, model, row):
        row.update(run.evaluate(model).row(ra_loss=True))

    run.fit(model, data.clean_subset, train_cfg, step=make_sau_step(ref, cfg, generator), phase="unlearn",
            eval_suite=None, augment=None, epoch_end=score)
    return model


@register_defense
class SAU(Defense):
    """SAU: unlearn shared adversarial examples of the backdoored and the unlearning model."""

    name = "sau"
    config_cls = SAUConfig

    def repair(self, model, data, cfg, run):
        return shared_adversarial_unlearning(model, data, cfg, run)
