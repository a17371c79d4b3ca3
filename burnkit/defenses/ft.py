"""FT: fine-tuning the backdoored model on the defender's clean subset (spec §7.1).

BackdoorBench's baseline: cross-entropy on the 5% clean subset with the train-time augmentation,
the configured optimiser and scheduler, scored after every epoch.

Example:
    python defense/ft.py --result_file badnet_cifar10 --yaml_path config/defense/ft/cifar10.yaml
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..defense import Defense, DefenseConfig, DefenseData, DefenseRun, register_defense
from ..models import Classifier


@dataclass
class FineTuneConfig(DefenseConfig):
    epochs: int = option(100, "fine-tuning epochs")
    batch_size: int = option(256, "batch size")
    lr: float = option(0.01, "learning rate")
    amp: bool = option(True, "mixed precision on CUDA")


def fine_tune(model: Classifier, data: DefenseData, cfg: FineTuneConfig, run: DefenseRun) -> Classifier:
    run.fit(model, data.clean_subset, cfg.train_config(), phase="finetune")
    return model


@register_defense
class FineTune(Defense):
    """FT: fine-tune on the clean subset."""

    name = "ft"
    config_cls = FineTuneConfig

    def repair(self, model, data, cfg, run):
        return fine_tune(model, data, cfg, run)
