"""Input-Aware Dynamic backdoor (Nguyen & Tran, NeurIPS 2020).

A generator ``netG`` draws a pattern for every input and a mask network ``netM`` says where it
goes: ``poisoned = x + (pattern - x) * mask`` (spec §6.2). Both are small encoder-decoders (two
conv-ReLU-pool stages down, two upsample-conv stages back; no BatchNorm, so a network behaves the
same in training and when the record is written):

* ``netG``: output ``tanh``, mapped to pixel space ``(t + 1) / 2``; one pattern per image, same
  number of channels as the image;
* ``netM``: one-channel ``sigmoid`` output ``s``, sharpened to a near-binary mask
  ``tanh(20 s - 10) / (2 + EPSILON) + 0.5`` and broadcast over the channels.

Training, as in the paper and BackdoorBench:

1. mask pre-training, ``clean_train_epochs`` epochs, netM alone (Adam, betas (0.5, 0.9), lr_M,
   MultiStepLR): ``lambda_norm * mean(relu(mask - mask_density)) + lambda_div * L_div`` with the
   diversity loss ``L_div = mean(d(x1, x2) / (d(m1, m2) + EPSILON))``, ``d`` the per-sample RMS
   distance and ``x2`` random other training images; netM is frozen afterwards;
2. joint training, ``epochs - clean_train_epochs`` epochs (BackdoorBench's epoch counter continues
   from the pre-training, spec §9.5): classifier SGD(lr_C, momentum 0.9, wd 5e-4) with
   MultiStepLR(schedulerC_milestones, schedulerC_lambda) and netG Adam(lr_G) with
   MultiStepLR(schedulerG_milestones, schedulerG_lambda). Per batch the first ``int(pratio * n)``
   samples get their own trigger and the target label, the next as many are "cross" samples with
   the trigger (pattern and mask) of another random image and keep their label; the loss is
   cross-entropy plus ``lambda_div`` times the pattern diversity loss.

netG/netM are not stored in the record (BackdoorBench neither); their state is not in the engine's
checkpoint either, so an interrupted InputAware run starts over instead of resuming.

Example:
    python attack/inputaware.py --dataset cifar10 --model preactresnet18 --save_folder_name inputaware_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attack import register_attack
from ..config import option
from ..engine import StepOutput, TrainConfig, fit
from ..errors import BurnError
from ..options import OPTIMISER_FLAGS, SCHEDULE_FLAGS
from .dynamic import DynamicAttack, DynamicConfig


class EncoderDecoder(nn.Module):
    """conv(c, w)-ReLU-pool, conv(w, 2w)-ReLU-pool, conv(2w, 2w)-ReLU, up, conv(2w, w)-ReLU, up,
    conv(w, out). Image sides must be divisible by 4."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 16):
        super().__init__()

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]

        self.layers = nn.Sequential(
            *conv(in_channels, width), nn.MaxPool2d(2),
            *conv(width, 2 * width), nn.MaxPool2d(2),
            *conv(2 * width, 2 * width),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), *conv(2 * width, width),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(width, out_channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatternGenerator(EncoderDecoder):
    """netG: one pattern per image, in pixel space [0, 1]."""

    def forward(self, x):
        return (torch.tanh(super().forward(x)) + 1) / 2


class MaskGenerator(EncoderDecoder):
    """netM: one near-binary mask per image, ``1 x H x W`` in [0, 1]."""

    def __init__(self, in_channels: int, width: int = 16, epsilon: float = 1e-7):
        super().__init__(in_channels, 1, width)
        self.epsilon = epsilon

    def forward(self, x):
        soft = torch.sigmoid(super().forward(x))
        return torch.tanh(soft * 20 - 10) / (2 + self.epsilon) + 0.5


def compose(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """InputAware's trigger: ``x + (pattern - x) * mask``."""
    return x + (pattern - x) * mask


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor,
                   epsilon: float) -> torch.Tensor:
    """``mean(d(x1, x2) / (d(t1, t2) + epsilon))``, ``d`` the per-sample RMS distance: different
    inputs must get different triggers. (The RMS has a 1e-12 floor under the root, so two identical
    saturated masks give a large loss, not an infinite gradient.)"""
    if len(x1) == 0:
        return x1.new_zeros(())

    def dist(a, b):
        return (((a - b) ** 2).flatten(1).mean(1) + 1e-12).sqrt()

    return (dist(x1, x2) / (dist(t1, t2) + epsilon)).mean()


@dataclass
class InputAwareConfig(DynamicConfig):
    lr_G: float = option(0.01, "learning rate of the pattern generator netG (Adam)")
    lr_C: float = option(0.01, "learning rate of the classifier (SGD)")
    lr_M: float = option(0.01, "learning rate of the mask network netM (Adam)")
    C_lr_scheduler: str | None = option(None, "BackdoorBench's key; its classifier always uses MultiStepLR",
                                          unused=True)
    schedulerG_milestones: list[int] = option([200, 300, 400, 500], "netG MultiStepLR milestones (epochs)")
    schedulerC_milestones: list[int] = option([100, 200, 300, 400], "classifier MultiStepLR milestones (epochs)")
    schedulerM_milestones: list[int] = option([10, 20], "netM MultiStepLR milestones (epochs)")
    schedulerG_lambda: float = option(0.1, "netG learning-rate decay")
    schedulerC_lambda: float = option(0.1, "classifier learning-rate decay")
    schedulerM_lambda: float = option(0.1, "netM learning-rate decay")
    lambda_div: float = option(1.0, "weight of the diversity loss")
    lambda_norm: float = option(100.0, "weight of the mask-density loss")
    mask_density: float = option(0.032, "mask values above this are penalised")
    EPSILON: float = option(1e-7, "stabiliser of the diversity ratio")
    clean_train_epochs: int = option(25, "mask pre-training epochs (counted within --epochs)")

    def validate(self):
        super().validate()
        if self.clean_train_epochs < 0:
            raise BurnError(f"clean_train_epochs must be >= 0, got {self.clean_train_epochs}")
        if self.epochs <= self.clean_train_epochs:
            raise BurnError(f"--epochs {self.epochs} leaves no classifier training after {self.clean_train_epochs} "
                            "mask pre-training epochs (BackdoorBench counts both); raise --epochs or lower "
                            "--clean_train_epochs")


@register_attack
class InputAware(DynamicAttack):
    """Input-Aware Dynamic backdoor: per-image generated triggers with cross samples, all-to-one by default."""

    name = "inputaware"
    # flags it accepts but does not read: the classifier trains with SGD at lr_C under schedulerC_*
    unused_flags = ("lr", *OPTIMISER_FLAGS, *SCHEDULE_FLAGS)
    config_cls = InputAwareConfig
    static_trigger = False
    resumable = False

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        h, w, c = info.img_size
        if h % 4 or w % 4:
            raise BurnError(f"InputAware's generators need image sides divisible by 4, got {h}x{w}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.random_seed)
            self.netG = PatternGenerator(c, c)
            self.netM = MaskGenerator(c, epsilon=cfg.EPSILON)
        self.optG = torch.optim.Adam(self.netG.parameters(), lr=cfg.lr_G, betas=(0.5, 0.9))
        self.schedG = torch.optim.lr_scheduler.MultiStepLR(self.optG, cfg.schedulerG_milestones, cfg.schedulerG_lambda)

    # -- the trigger ---------------------------------------------------------------------------

    def backdoor(self, x):
        return compose(x, self.netG(x), self.netM(x))

    def cross(self, x, partners, generator=None):
        return compose(x, self.netG(partners), self.netM(partners))

    def num_cross(self, num_bd, n):
        return num_bd

    # -- training ------------------------------------------------------------------------------

    def prepare(self, device):
        """Mask pre-training (netM alone), then freeze netM."""
        cfg = self.cfg
        self.netG.to(device)
        self.netM.to(device)
        if cfg.clean_train_epochs:
            optM = torch.optim.Adam(self.netM.parameters(), lr=cfg.lr_M, betas=(0.5, 0.9))
            schedM = torch.optim.lr_scheduler.MultiStepLR(optM, cfg.schedulerM_milestones, cfg.schedulerM_lambda)
            mask_cfg = TrainConfig(epochs=cfg.clean_train_epochs, batch_size=cfg.batch_size, augment=False)
            fit(self.netM, self.train_set, mask_cfg, device=device, step=self.mask_step, optimizer=optM,
                scheduler=schedM, seed=cfg.random_seed, desc=f"{self.name} mask", progress=cfg.progress, flags=cfg,
                on_row=lambda row: self.logger.info("mask pre-training epoch %d: loss %.4f", row["epoch"],
                                                    row["train_epoch_loss_avg_over_batch"]))
        self.netM.eval().requires_grad_(False)
        self.netG.train()
        with torch.no_grad():
            sample = self.train_set.images[: cfg.batch_size].to(device).float().div(255.0)
            density = float(self.netM(sample).mean()) if len(sample) else 0.0
        self.logger.info("mask pre-training done: mean mask value %.4f (mask_density %s)", density, cfg.mask_density)
        if density < cfg.mask_density / 100:
            self.logger.warning("the mask network collapsed to an (almost) empty mask, so the trigger is invisible; "
                                "rerun with another --random_seed or a lower --lr_M")

    def mask_step(self, netM, batch, optimizer, ctx) -> StepOutput:
        cfg = self.cfg
        x1 = batch.x
        x2 = self.partners(len(x1), x1.device)
        m1, m2 = netM(x1), netM(x2)
        loss = (cfg.lambda_norm * F.relu(m1 - cfg.mask_density).mean()
                + cfg.lambda_div * diversity_loss(x1, x2, m1, m2, cfg.EPSILON))
        ctx.backward_step(loss, optimizer)
        return StepOutput(loss.detach())

    def poison_batch(self, x, y):
        cfg = self.cfg
        num_bd, num_cross = self.split(len(x))
        end = num_bd + num_cross
        others = self.partners(num_cross, x.device)
        patterns_bd, patterns_cross = self.netG(x[:num_bd]), self.netG(others)
        with torch.no_grad():
            masks_bd, masks_cross = self.netM(x[:num_bd]), self.netM(others)
        bd = compose(x[:num_bd], patterns_bd, masks_bd)
        crossed = compose(x[num_bd:end], patterns_cross, masks_cross)
        pairs = min(num_bd, num_cross)
        div = diversity_loss(x[:pairs], others[:pairs], patterns_bd[:pairs], patterns_cross[:pairs], cfg.EPSILON)
        inputs = torch.cat([bd, crossed, x[end:]])
        labels = torch.cat([self.target_labels(y[:num_bd]), y[num_bd:]])
        return inputs, labels, num_bd, num_cross, cfg.lambda_div * div

    def extra_optimizers(self):
        return [self.optG]

    def on_epoch_end(self, epoch):
        self.schedG.step()

    def train_config(self):
        cfg = self.cfg
        return cfg.train_config(augment=False, epochs=cfg.epochs - cfg.clean_train_epochs, lr=cfg.lr_C,
                                client_optimizer="sgd", sgd_momentum=0.9, wd=5e-4, lr_scheduler="MultiStepLR",
                                steplr_milestones=list(cfg.schedulerC_milestones), steplr_gamma=cfg.schedulerC_lambda)

    def provenance(self):
        return {"trigger": "per-image pattern (netG) and mask (netM), not stored",
                "classifier_epochs": self.cfg.epochs - self.cfg.clean_train_epochs}
