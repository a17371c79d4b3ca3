"""SAU: Shared Adversarial Unlearning (Wei et al., NeurIPS 2023, spec §7.7).

Paper: "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial
Examples", https://arxiv.org/abs/2307.10562.

A frozen copy of the backdoored model is the reference ``h_ref``; the other copy ``h`` is trained.
For ``n_rounds`` passes over the clean subset (test transform: no augmentation), every batch gets

1. **shared PGD** (:func:`shared_pgd`): a per-sample perturbation ``δ`` in [0, 1] pixel space,
   ``||δ||_∞ <= trigger_norm`` (``x + δ`` is *not* clipped to the image range, as BackdoorBench;
   ``--clip_image true`` clips it), initialised at ``+trigger_norm`` (``pgd_init: max``), refined by
   ``adv_steps`` signed-gradient *descent* steps of size ``adv_lr`` on ``beta_1 * L_adv + beta_2 * L_share``
   (:func:`pgd_objective`), where

   * ``L_adv = -(CE(h(x+δ), y) + CE(h_ref(x+δ), y)) / 2``, each model's term counted only on samples
     whose prediction has not yet flipped away from that model's clean prediction;
   * ``L_share`` = the Jensen-Shannon divergence of the two models' softmax outputs (probabilities
     floored at 1e-8), counted only on samples that are not yet a *shared* adversarial example: both
     models flipped away from their own clean prediction, to the same class;

   stopping after the step at which every sample was a shared adversarial example;
2. **unlearning** (:func:`unlearning_loss`), ``outer_steps`` Adam steps on
   ``lmd_1 CE(h(x), y) + lmd_2 CE(h(x+δ), y) + lmd_3 L_shared`` where ``L_shared``
   (:func:`shared_unlearning_term`) acts on samples whose reference prediction on ``x+δ`` is wrong and
   differs from its clean prediction (``ŷ_ref``): with ``p = p_h(ŷ_ref | x+δ)`` and ``q`` the
   probability of every other class, the per-sample loss is
   ``-(log(1e-6 + min(q, 0.999)) + log(1 + 1e-6 - max(p, 0.001))) / 2`` - two terms that are equal in
   exact arithmetic (``-log(1 - p)``); the first keeps the gradient when ``p`` rounds to 1.

Masked sums are divided by the batch size (a per-sample loss averaged over the batch, the paper's
empirical risk). BatchNorm stays in eval mode unless ``--train_mode``, which runs the clean and the
perturbed batch through the model as one batch (shared batch statistics); the scheduler is never
stepped (BackdoorBench builds one but does not step it). The test sets are scored every
``--test_every`` rounds and after the last (BackdoorBench: every round).

These are BackdoorBench's definitions (spec §7.7); the only deliberate difference is ``pgd_init:
random``, drawn as BackdoorBench draws it (uniform in [0, 1), then clipped to the bound).

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
from ..options import SCHEDULE_FLAGS

PGD_INITS = ("max", "min", "zero", "random")
JS_FLOOR = 1e-8  # BackdoorBench floors both softmax outputs before the JS divergence
SHARED_EPS = 1e-6  # inside both logarithms of the shared unlearning loss
P_BOUNDS = (0.001, 0.999)  # BackdoorBench's clamps of the two terms


@dataclass
class SAUConfig(DefenseConfig):
    n_rounds: int = option(100, "passes over the clean subset (each: shared PGD + unlearning per batch)")
    outer_steps: int = option(1, "unlearning optimiser steps per batch")
    lr: float = option(0.0001, "learning rate of the unlearning optimiser")
    client_optimizer: str = option("adam", "unlearning optimiser: adam (amsgrad, as BackdoorBench), sgd or adadelta")
    wd: float = option(0.0, "weight decay of the unlearning optimiser")
    batch_size: int = option(256, "batch size")
    lr_scheduler: str | None = option("CosineAnnealingLR", "BackdoorBench's key; the scheduler is never stepped there either",
                                      unused=True)
    optim: str = option("Adam", "BackdoorBench's key, unused there too (see --client_optimizer)", unused=True)
    lmd_1: float = option(1.0, "weight of CE on clean samples")
    lmd_2: float = option(0.0, "weight of CE on perturbed samples")
    lmd_3: float = option(1.0, "weight of the shared adversarial unlearning loss")
    beta_1: float = option(0.01, "PGD: weight of the adversarial loss L_adv")
    beta_2: float = option(1.0, "PGD: weight of the sharing loss L_share (JS divergence)")
    trigger_norm: float = option(0.2, "L_inf bound of the perturbation in [0, 1] pixel units")
    norm_type: str = option("L_inf", "perturbation norm (L_inf)")
    adv_lr: float = option(0.2, "PGD step size in pixel units")
    adv_steps: int = option(5, "PGD steps")
    pgd_init: str = option("max", "PGD start: max (+bound), min (-bound), zero or random (uniform [0, 1) "
                                  "clipped to the bound, as BackdoorBench)")
    clip_image: bool = option(False, "also keep x + delta in the image range [0, 1] (burnkit extra; "
                                     "BackdoorBench only bounds delta)")
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
    """Per-sample Jensen-Shannon divergence (nats) of ``softmax(logits_p)`` and ``softmax(logits_q)``,
    both floored at ``JS_FLOOR`` as BackdoorBench does (the floor also stops the gradient of
    vanishing probabilities)."""
    p = F.softmax(logits_p, 1).clamp(min=JS_FLOOR)
    q = F.softmax(logits_q, 1).clamp(min=JS_FLOOR)
    log_m = (0.5 * (p + q)).log()
    return 0.5 * (p * p.log() + q * q.log() - p * log_m - q * log_m).sum(1)


@dataclass
class PGDMasks:
    """Which samples each PGD term still counts (bool per sample)."""

    model_unflipped: torch.Tensor  # h still predicts its clean prediction
    ref_unflipped: torch.Tensor  # h_ref still predicts its clean prediction
    shared: torch.Tensor  # both flipped away from their clean predictions, to the same class


def pgd_masks(pred: torch.Tensor, pred_ref: torch.Tensor, clean_pred: torch.Tensor,
              clean_pred_ref: torch.Tensor) -> PGDMasks:
    model_unflipped, ref_unflipped = pred == clean_pred, pred_ref == clean_pred_ref
    return PGDMasks(model_unflipped, ref_unflipped, ~model_unflipped & ~ref_unflipped & (pred == pred_ref))


def pgd_objective(logits: torch.Tensor, logits_ref: torch.Tensor, labels: torch.Tensor, masks: PGDMasks,
                  beta_1: float, beta_2: float) -> torch.Tensor:
    """``beta_1 L_adv + beta_2 L_share``; PGD *descends* it (raising CE, pulling outputs together).
    ``L_adv`` averages the two models' CE (the ``/2``)."""
    n = labels.shape[0]
    ce = F.cross_entropy(logits, labels, reduction="none")
    ce_ref = F.cross_entropy(logits_ref, labels, reduction="none")
    l_adv = -((ce * masks.model_unflipped).sum() + (ce_ref * masks.ref_unflipped).sum()) / 2 / n
    l_share = (js_divergence(logits, logits_ref) * ~masks.shared).sum() / n
    return beta_1 * l_adv + beta_2 * l_share


def initial_perturbation(x: torch.Tensor, cfg: SAUConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    bound = cfg.trigger_norm
    if cfg.pgd_init == "max":
        return torch.full_like(x, bound)
    if cfg.pgd_init == "min":
        return torch.full_like(x, -bound)
    if cfg.pgd_init == "random":  # BackdoorBench: rand_like (uniform [0, 1)), then the projection
        return torch.rand(x.shape, generator=generator).to(x.device).clamp(-bound, bound)
    return torch.zeros_like(x)


def project(delta: torch.Tensor, x: torch.Tensor, bound: float, clip_image: bool) -> torch.Tensor:
    """Onto ``||δ||_∞ <= bound`` (and, with ``clip_image``, ``x + δ`` in [0, 1])."""
    delta = delta.clamp(-bound, bound)
    return (x + delta).clamp(0.0, 1.0) - x if clip_image else delta


def shared_pgd(model: nn.Module, ref: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SAUConfig,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """A per-sample shared adversarial perturbation for the batch ``x`` (pixels in [0, 1])."""
    bound = cfg.trigger_norm
    delta = project(initial_perturbation(x, cfg, generator), x, bound, cfg.clip_image)
    with eval_mode(model), eval_mode(ref):
        with torch.no_grad():
            clean_pred, clean_pred_ref = model(x).argmax(1), ref(x).argmax(1)
        for _ in range(cfg.adv_steps):
            delta.requires_grad_(True)
            logits, logits_ref = model(x + delta), ref(x + delta)
            masks = pgd_masks(logits.argmax(1), logits_ref.argmax(1), clean_pred, clean_pred_ref)
            loss = pgd_objective(logits, logits_ref, y, masks, cfg.beta_1, cfg.beta_2)
            grad, = torch.autograd.grad(loss, delta)
            delta = project(delta.detach() - cfg.adv_lr * grad.sign(), x, bound, cfg.clip_image)
            if bool(masks.shared.all()):  # BackdoorBench checks after the step it has taken
                break
    return delta.detach()


def shared_unlearning_term(logits_adv: torch.Tensor, ref_adv_pred: torch.Tensor, ref_fooled: torch.Tensor) -> torch.Tensor:
    """``L_shared``: on samples where the reference was fooled, BackdoorBench's two-term form of
    ``-log(1 - p)`` with ``p = p(ŷ_ref | x+δ)`` and ``q`` = the other classes' probability,
    ``-(log(1e-6 + min(q, 0.999)) + log(1 + 1e-6 - max(p, 0.001))) / 2``, summed and divided by the
    batch size. ``q`` is summed from the other classes, so the first term keeps a gradient when
    ``p`` is within float precision of 1; both terms are flat for ``p < 0.001``."""
    probs = F.softmax(logits_adv, 1)
    hit = F.one_hot(ref_adv_pred, probs.shape[1]).to(probs.dtype)
    p = (probs * hit).sum(1)
    q = (probs * (1 - hit)).sum(1)
    per_sample = -(torch.log(SHARED_EPS + q.clamp(max=P_BOUNDS[1])) +
                   torch.log(1 + SHARED_EPS - p.clamp(min=P_BOUNDS[0]))) / 2
    return (per_sample * ref_fooled).sum() / logits_adv.shape[0]


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
        for _ in range(cfg.outer_steps):
            with eval_mode(model, train=cfg.train_mode):  # one batch: BatchNorm statistics are shared
                logits_clean, logits_adv = model(torch.cat([x, x_adv])).split(len(x))
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
        row.update(run.test_row(model, epoch, cfg.n_rounds, ra_loss=True))

    run.fit(model, data.clean_subset, train_cfg, step=make_sau_step(ref, cfg, generator), phase="unlearn",
            eval_suite=None, augment=None, epoch_end=score)
    return model


@register_defense
class SAU(Defense):
    """SAU: unlearn shared adversarial examples of the backdoored and the unlearning model."""

    name = "sau"
    # flags it accepts but does not read: n_rounds rounds; the unlearning optimiser is never scheduled
    unused_flags = ("epochs", *SCHEDULE_FLAGS)
    config_cls = SAUConfig
    budget_keys = ("n_rounds",)

    def repair(self, model, data, cfg, run):
        return shared_adversarial_unlearning(model, data, cfg, run)
