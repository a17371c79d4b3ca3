"""Adversarial training images for the label-consistent attack (Turner et al., 2019).

LC poisons target-class images that a clean model finds hard: each is replaced by its untargeted
L-inf PGD adversarial example (maximise the clean model's cross-entropy on the true label), so the
victim cannot fit them from their content and leans on the trigger. BackdoorBench's defaults: eps
8/255, step 1.5/255, 100 steps, stored as uint8 ``N_train x H x W x C`` indexed by original index.

Only the classes asked for are attacked (default: the target class, the only one LC poisons); the
other entries hold the clean image, and ``<name>_crafted.npy`` (bool, N_train) records which entries
are adversarial, so the attack refuses to use an image that was never crafted.
``--train_subset N`` crafts only the images in the class-balanced subset an attack with the same
``--train_subset N --random_seed S`` trains on (CPU-scale runs).

Example:
    python -m burnkit.resources lc_adv --dataset cifar10 --model smallcnn --classes 0
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import option
from ..engine import eval_mode, iterate
from ..errors import BurnError
from . import crafted_path, lc_adv_path
from .base import FromCleanModelConfig, Session, imageset, save_npy, to_uint8_nhwc


@dataclass
class LcAdvConfig(FromCleanModelConfig):
    eps: float = option(8.0, "L-inf radius in 0..255 pixel units")
    step_size: float = option(1.5, "PGD step in 0..255 pixel units")
    steps: int = option(100, "PGD steps")
    classes: list[int] | None = option([0], "classes to craft (LC poisons only its --attack_target, 0 unless "
                                            "changed); empty = all")
    train_subset: int = option(0, "craft only the class-balanced subset of this size an attack with the same "
                                  "--train_subset/--random_seed uses (0 = whole split)")
    batch_size: int = option(256, "batch size")

    def validate(self) -> None:
        super().validate()
        if self.eps <= 0 or self.step_size <= 0 or self.steps <= 0 or self.train_subset < 0:
            raise BurnError("need eps > 0, step_size > 0, steps > 0 and train_subset >= 0")


def pgd_untargeted(model, x01: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int) -> torch.Tensor:
    """L-inf PGD from the clean image (no random start, as for LC): ``argmax CE(model(x'), y)``
    over ``|x' - x| <= eps``, ``x'`` in [0, 1]. Units of ``eps``/``step``: [0, 1] pixels."""
    x_adv = x01.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        grad, = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x01 - eps), x01 + eps).clamp(0, 1)
    return x_adv.detach()


def craft_adversarial(model, images: np.ndarray, labels: np.ndarray, *, eps: float, step: float, steps: int,
                      batch_size: int, device) -> np.ndarray:
    """PGD images (uint8 ``n x H x W x C``) for ``images``; eps/step in 0..255 units."""
    data = imageset(images, labels)
    out = []
    with eval_mode(model):
        for batch in iterate(data, batch_size, device):
            out.append(to_uint8_nhwc(pgd_untargeted(model, batch.x, batch.y, eps / 255, step / 255, steps)))
    h, w, c = data.shape[1], data.shape[2], data.shape[0]
    return np.concatenate(out) if out else np.zeros((0, h, w, c), np.uint8)


def generate_lc_adv(cfg: LcAdvConfig) -> dict:
    run = Session(cfg)
    model = run.clean_model(cfg.clean_model_path)
    train_x, train_y = run.split(train=True)
    chosen = run.subset(train_y, cfg.train_subset)
    if cfg.classes:
        bad = [c for c in cfg.classes if not 0 <= c < run.info.num_classes]
        if bad:
            raise BurnError(f"--classes {bad} are not classes of {cfg.dataset} (0..{run.info.num_classes - 1})")
        chosen = chosen[np.isin(train_y[chosen], cfg.classes)]
    adv = craft_adversarial(model, train_x[chosen], train_y[chosen], eps=cfg.eps, step=cfg.step_size,
                            steps=cfg.steps, batch_size=cfg.batch_size, device=run.device)
    with torch.no_grad(), eval_mode(model):
        still_right = float((model(torch.as_tensor(adv[:512]).permute(0, 3, 1, 2).float().div(255).to(run.device))
                             .argmax(1).cpu().numpy() == train_y[chosen][:512]).mean()) if len(adv) else None
    full = train_x.copy()
    full[chosen] = adv
    crafted = np.zeros(len(train_y), dtype=bool)
    crafted[chosen] = True
    path = save_npy(lc_adv_path(cfg.resource_cache, cfg.dataset, cfg.model), full)
    save_npy(crafted_path(path), crafted)
    linf = int(np.abs(adv.astype(np.int16) - train_x[chosen].astype(np.int16)).max()) if len(adv) else 0
    return run.finish([path, crafted_path(path)], "lc_adv", crafted=int(crafted.sum()),
                      clean_model_acc_on_adv_first512=still_right, max_abs_change_0_255=linf)
