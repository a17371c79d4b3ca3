"""Clean model: BackdoorBench's ``attack/prototype.py`` (plain training, no poison), as a resource.

LF, LC and TrojanNN all start from a clean classifier of the victim's architecture. It is trained by
the engine with the prototype YAML's settings (``config/attack/prototype/<dataset>.yaml``) and saved
as a bare state dict, BackdoorBench's ``clean_model.pth``.

Example:
    python -m burnkit.resources clean_model --dataset cifar10 --model smallcnn --epochs 10 --train_subset 10000
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import option
from ..data import Augment, ImageSet
from ..engine import EvalSuite, TrainConfig, evaluate, fit
from ..errors import BurnError
from ..fileio import atomic_torch_save
from ..models import build_classifier
from . import clean_model_path
from .base import ResourceConfig, Session


@dataclass
class CleanModelConfig(ResourceConfig):
    # the prototype YAML's loader keys (no DataLoader here): accepted, unused
    YAML_COMPAT_KEYS: ClassVar[tuple[str, ...]] = ("num_workers", "pin_memory", "non_blocking", "prefetch",
                                                   "frequency_save")

    epochs: int = option(100, "training epochs")
    lr: float = option(0.01, "learning rate")
    client_optimizer: str = option("sgd", "sgd, adam or adadelta")
    sgd_momentum: float = option(0.9, "SGD momentum")
    wd: float = option(5e-4, "weight decay")
    lr_scheduler: str | None = option("CosineAnnealingLR", "scheduler (BackdoorBench's names)")
    cos_t_max: int | None = option(None, "CosineAnnealingLR T_max", default_help="--epochs")
    train_subset: int = option(0, "train on a class-balanced subset of this many samples (0 = all)")
    amp: bool = option(False, "mixed precision on CUDA")

    def validate(self) -> None:
        super().validate()
        if self.epochs <= 0 or self.train_subset < 0:
            raise BurnError("epochs must be > 0 and train_subset >= 0")


def generate_clean_model(cfg: CleanModelConfig) -> dict:
    """Train a clean classifier with the engine and save its state dict to the cache."""
    run = Session(cfg)
    train_x, train_y = run.split(train=True)
    test_x, test_y = run.split(train=False)
    keep = run.subset(train_y, cfg.train_subset)
    model = build_classifier(cfg.model, run.info)
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            client_optimizer=cfg.client_optimizer, sgd_momentum=cfg.sgd_momentum, wd=cfg.wd,
                            lr_scheduler=cfg.lr_scheduler, cos_t_max=cfg.cos_t_max or cfg.epochs, amp=cfg.amp)
    suite = EvalSuite(ImageSet.from_numpy(test_x, test_y))
    result = fit(model, ImageSet.from_numpy(train_x[keep], train_y[keep]), train_cfg, device=run.device,
                 eval_suite=suite, augment=Augment(run.info.crop_padding, run.info.train_flip),
                 seed=cfg.random_seed, desc="clean_model", progress=cfg.progress)
    acc = evaluate(model, suite, run.device).acc
    path = clean_model_path(cfg.resource_cache, cfg.dataset, cfg.model)
    atomic_torch_save(model.bb_state_dict(), path)
    return run.finish([path], "clean_model", clean_test_acc=acc, train_samples=int(len(keep)),
                      train_time_s=round(result.wall_time_s, 2))
