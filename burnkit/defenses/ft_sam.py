"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu et al., ICCV 2023, spec §7.6).

Papers: SAM - Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization"
(ICLR 2021, https://arxiv.org/abs/2010.01412); adaptive SAM - Kwon et al., "ASAM" (ICML 2021,
https://arxiv.org/abs/2102.11600); the gradient decomposition weighted by ``alpha`` and the rho
schedule are GSAM's (Zhuang et al., ICLR 2022, https://arxiv.org/abs/2203.08065); FT-SAM -
Zhu et al., "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization".

Every batch is one SAM step (:func:`make_sam_step`, an engine step function):

1. gradient ``g`` of the label-smoothed CE at ``w``;
2. ascend to ``w + e`` with ``e = ρ g / ||g||`` or, adaptive (the default), ``e = ρ w²⊙g / || |w|⊙g ||``;
3. gradient ``g_s`` at ``w + e`` with BatchNorm running statistics left untouched;
4. optionally subtract ``alpha`` times the part of ``g`` orthogonal to ``g_s`` (GSAM; 0 by default);
5. go back to ``w`` and let the base optimiser (SGD) step with ``g_s``.

``ρ`` follows the learning rate: ``ρ = rho_min + (rho_max - rho_min) * lr / lr_0``. As in BackdoorBench
the lr scheduler is stepped after every **batch** (``scheduler_step='batch'``), so
CosineAnnealingLR's ``T_max`` (100 unless ``--cos_t_max``) counts batches, not epochs, and the lr
follows a cosine with period ``2 * T_max`` batches; ReduceLROnPlateau is stepped with each batch's loss.

Differences from BackdoorBench (its defects, spec §9): the YAML's ``rho_max``/``rho_min``/
``label_smoothing``/``alpha`` take effect (BackdoorBench's argparse defaults override them);
``--index`` is honoured (otherwise BackdoorBench's class-balanced draw, the same indices for the same
seed); the CSV ``ft-sam_df.csv`` has an
``epoch`` column and sits in the defense folder (BackdoorBench: ``log/d-sam_df.csv``, no epoch);
ReduceLROnPlateau is stepped with a metric (BackdoorBench's call raises).

Example:
    python defense/ft-sam.py --result_file badnet_cifar10 --yaml_path config/defense/ft-sam/cifar10.yaml
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import option
from ..data import ImageSet
from ..datasets import dataset_info
from ..defense import Defense, DefenseConfig, DefenseData, DefenseRun, register_defense
from ..engine import StepContext, StepOutput, TrainConfig
from ..errors import BurnError
from ..models import Classifier, load_bb_state_dict
from ..records import read_defense_result

PERTURB_EPS = 1e-12  # keeps ρ/||g|| finite when the gradient vanishes


@dataclass
class FtSamConfig(DefenseConfig):
    epochs: int = option(100, "fine-tuning epochs")
    batch_size: int = option(256, "batch size")
    lr: float = option(0.01, "learning rate of the base optimiser")
    rho_max: float = option(2.0, "SAM radius at the initial lr")
    rho_min: float = option(2.0, "SAM radius as the lr reaches 0")
    adaptive: bool = option(True, "adaptive SAM (ASAM): scale the perturbation by |w|; a bare --adaptive "
                                  "turns it OFF, as BackdoorBench's store_false flag", bare="false")
    alpha: float = option(0.0, "GSAM: weight of the removed gradient component orthogonal to the SAM gradient")
    label_smoothing: float = option(0.1, "label smoothing of the CE (smoothing/(C-1) on the other classes)")
    rho: float = option(2.0, "BackdoorBench's key, unused there too: rho_max/rho_min apply", unused=True)
    print_freq: int = option(1, "BackdoorBench's logging interval", unused=True)
    bd_yaml_path: str | None = option(None, "BackdoorBench's key, unused there too", unused=True)
    checkpoint_path: str | None = option(None, "start from record/<checkpoint_path>/defense_result.pt (or that file)")

    def validate(self) -> None:
        super().validate()
        if self.rho_max < 0 or self.rho_min < 0:
            raise BurnError(f"--rho_max/--rho_min must be >= 0, got {self.rho_max}/{self.rho_min}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise BurnError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.checkpoint_path:
            resolve_checkpoint(self.checkpoint_path)  # fail before anything is written


# --------------------------------------------------------------------------- SAM pieces


def smooth_crossentropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Per-sample KL divergence to the smoothed one-hot target (``1 - s`` on the label, ``s/(C-1)``
    elsewhere), the SAM reference's loss; its gradient equals that of CE on the same target."""
    n_classes = logits.shape[1]
    target = torch.full_like(logits, smoothing / max(1, n_classes - 1))
    target.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing)
    log_target = torch.where(target > 0, target.clamp_min(1e-12).log(), torch.zeros_like(target))
    return (target * (log_target - F.log_softmax(logits, dim=1))).sum(1)


def sam_perturbation(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float,
                     adaptive: bool) -> list[torch.Tensor]:
    """The ascent step ``e``: ``ρ g/||g||`` or, adaptive, ``ρ w²⊙g / || |w|⊙g ||`` (norms over all tensors)."""
    scaled = [(p.abs() * g if adaptive else g) for p, g in zip(params, grads)]
    norm = torch.sqrt(sum((s ** 2).sum() for s in scaled))
    scale = rho / (norm + PERTURB_EPS)
    return [(p.pow(2) * g if adaptive else g) * scale for p, g in zip(params, grads)]


def remove_orthogonal_component(sam_grads: Sequence[torch.Tensor], first_grads: Sequence[torch.Tensor],
                                alpha: float) -> list[torch.Tensor]:
    """GSAM: ``g_s - alpha * g_⊥`` where ``g_⊥`` is the part of ``g`` orthogonal to ``g_s``."""
    flat_s = torch.cat([g.flatten() for g in sam_grads])
    flat_g = torch.cat([g.flatten() for g in first_grads])
    coef = (flat_s @ flat_g) / (flat_s @ flat_s + PERTURB_EPS)
    return [gs - alpha * (g - coef * gs) for gs, g in zip(sam_grads, first_grads)]


def proportional_rho(lr: float, base_lr: float, rho_max: float, rho_min: float) -> float:
    """GSAM's ProportionScheduler with min lr 0: ρ moves from rho_max to rho_min with the lr."""
    if base_lr <= 0:
        return rho_max
    return rho_min + (rho_max - rho_min) * lr / base_lr


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """Forward passes in the block normalise with batch statistics (train mode) but leave every
    BatchNorm's running mean/var and batch counter as they were."""
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def make_sam_step(base_lr: float, rho_max: float, rho_min: float, adaptive: bool, alpha: float,
                  label_smoothing: float):
    """An engine step function doing one (adaptive) SAM update; it runs in float32 (no GradScaler)."""

    def sam_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> StepOutput:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        logits = model(batch.x)
        loss = smooth_crossentropy(logits, batch.y, label_smoothing).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        live = [p for p in params if p.grad is not None]
        first_grads = [p.grad.detach().clone() for p in live]
        rho = proportional_rho(optimizer.param_groups[0]["lr"], base_lr, rho_max, rho_min)
        originals = [p.detach().clone() for p in live]
        with torch.no_grad():
            for p, e in zip(live, sam_perturbation(originals, first_grads, rho, adaptive)):
                p.add_(e)
        optimizer.zero_grad(set_to_none=True)
        with frozen_bn_stats(model):
            smooth_crossentropy(model(batch.x), batch.y, label_smoothing).mean().backward()
        with torch.no_grad():
            for p, w in zip(live, originals):
                p.copy_(w)
            if alpha:
                sam_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
                for p, g in zip(live, remove_orthogonal_component(sam_grads, first_grads, alpha)):
                    p.grad = g
        optimizer.step()
        return StepOutput(loss.detach(), logits.detach())

    return sam_step


# --------------------------------------------------------------------------- the defense


def choose_by_class(labels: np.ndarray, ratio: float, seed: int, num_classes: int) -> np.ndarray:
    """BackdoorBench's ``choose_by_class``: for class 0, 1, ... in turn, ``int(N * ratio / num_classes)``
    of its indices drawn without replacement by NumPy's legacy generator seeded with ``seed`` (what
    ``np.random.choice`` does after BackdoorBench's ``fix_random``), concatenated in that order."""
    per_class = int(len(labels) * ratio / num_classes)
    if per_class == 0:
        raise BurnError(f"--ratio {ratio} gives 0 samples per class of {len(labels)}; raise --ratio")
    rng = np.random.RandomState(seed % 2**32)
    picks = []
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise BurnError(f"class {cls} has {len(members)} training samples, fewer than the {per_class} "
                            f"that --ratio {ratio} asks of every class; lower --ratio")
        picks.append(rng.choice(members, per_class, replace=False))
    return np.concatenate(picks).astype(np.int64)


def fine_tune_sam(model: Classifier, data: DefenseData, cfg: FtSamConfig, run: DefenseRun) -> Classifier:
    if cfg.checkpoint_path:  # BackdoorBench: continue from another defense's result
        start = resolve_checkpoint(cfg.checkpoint_path)
        load_bb_state_dict(model, read_defense_result(start)["model"], source=str(start))
        run.logger.info("starting from %s", start)
    # FT-SAM's unused --rho shares its name with Adadelta's rho; keep the optimiser's own default.
    train_cfg = cfg.train_config(scheduler_step="batch", amp=False, rho=TrainConfig.rho)
    step = make_sam_step(cfg.lr, cfg.rho_max, cfg.rho_min, cfg.adaptive, cfg.alpha, cfg.label_smoothing)
    run.fit(model, data.clean_subset, train_cfg, step=step, phase="finetune")
    return model


def resolve_checkpoint(checkpoint_path: str) -> Path:
    for candidate in (Path("record") / checkpoint_path / "defense_result.pt", Path(checkpoint_path)):
        if candidate.is_file():
            return candidate
    raise BurnError(f"--checkpoint_path {checkpoint_path}: no record/{checkpoint_path}/defense_result.pt "
                    "nor such a file; give a defense result")


@register_defense
class FtSam(Defense):
    """FT-SAM: fine-tune on the clean subset with (adaptive) sharpness-aware minimisation."""

    name = "ft-sam"
    config_cls = FtSamConfig
    budget_keys = ("epochs",)

    def choose_subset(self, clean_train: ImageSet, cfg: FtSamConfig) -> np.ndarray:
        if cfg.index:
            return super().choose_subset(clean_train, cfg)
        return choose_by_class(clean_train.labels.cpu().numpy(), cfg.ratio, cfg.random_seed,
                               dataset_info(cfg.dataset).num_classes)

    def repair(self, model, data, cfg, run):
        return fine_tune_sam(model, data, cfg, run)
