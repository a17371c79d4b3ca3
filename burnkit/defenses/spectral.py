"""Spectral Signatures as a defense (Tran et al., "Spectral Signatures in Backdoor Attacks", NeurIPS
2018; BackdoorBench's ``spectral``, its leaderboard's "SS"; extra-defenses §11.7). No clean data.

The poisoned samples of a class leave a trace in the covariance of the backdoored model's late
features: along the top singular direction of the class's centred features they sit far from the
others. For ``--target_label`` (else for **every** class, BackdoorBench's default):

1. take every sample's ``target_layer`` output (default ``layer4``, or the network's last feature
   map; eval mode, no augmentation), flattened;
2. centre the class's features, take the top right singular vector ``v``;
3. score ``|v . (x - mean)|`` and drop the samples scoring above ``percentile(scores, percentile)``;
4. retrain a **fresh** model on the kept samples for ``epochs``.

Tran et al. project centred features and remove 1.5 * eps * n samples from the suspected class only;
BackdoorBench cuts 15 % in every class (kept here: ``percentile`` 85) but projects *uncentred*
features and takes them under augmentation (not copied, contract §13.5).

:func:`spectral_scores` and :func:`spectral_keep_mask` are the reusable scoring parts (the poison
detectors use the same rule).

Files: ``spectral_df.csv`` / ``_summary`` (the retraining's epochs, FT columns),
``spectral_samples.csv`` (score, removed, ground-truth poison flag), ``spectral_report.json``.

Example:
    python defense/spectral.py --result_file badnet_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..config import option
from ..data import ImageSet
from ..defense import Defense, DefenseData, DefenseRun, register_defense
from ..datasets import dataset_info
from ..errors import BurnError
from ..models import Classifier, build_classifier
from ..network_surgery import feature_layer, layer_outputs
from .retraining import (RetrainConfig, poisoned_train, poisoned_train_size,
                         retrain_on_kept, write_sample_flags)

BB_UNUSED_KEYS = ("data_root", "seed", "poison_rate", "poison_rate_test", "target_type", "num_classes",
                  "input_height", "input_width", "input_channel")


@dataclass
class SpectralConfig(RetrainConfig):
    YAML_COMPAT_KEYS: ClassVar[tuple[str, ...]] = BB_UNUSED_KEYS
    percentile: float = option(85.0, "drop the samples of a class scoring above this percentile of its scores",
                               above=0, high=100)
    target_label: int | None = option(None, "filter only this class (an oracle input: the attack's target)",
                                      low=0, default_help="every class")
    target_layer: str | None = option(None, "layer whose outputs are the features",
                                      default_help="layer4, else the network's last feature map")


def spectral_scores(features: torch.Tensor) -> torch.Tensor:
    """``|v . (x - mean)|`` per row, ``v`` the top right singular vector of the centred rows
    (float64; the sign of ``v`` does not matter)."""
    x = features.double()
    centred = x - x.mean(0, keepdim=True)
    if len(x) < 2:
        return torch.zeros(len(x), dtype=torch.float64)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]).abs()


def spectral_keep_mask(scores: torch.Tensor, percentile: float) -> torch.Tensor:
    """True for the samples kept: score <= ``numpy.percentile(scores, percentile)``."""
    if len(scores) == 0:
        return torch.zeros(0, dtype=torch.bool)
    threshold = np.percentile(scores.cpu().numpy(), percentile)
    return scores <= torch.as_tensor(threshold, dtype=scores.dtype)


def spectral_filter(model: Classifier, train: ImageSet, cfg: SpectralConfig, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(removed mask, scores, layer) over ``train``: per class (or only ``target_label``), the top
    ``100 - percentile`` % by spectral score are removed. Features are taken class by class, so at
    most one class's features are in memory."""
    layer = feature_layer(model.net, cfg.target_layer)
    removed = torch.zeros(len(train), dtype=torch.bool)
    scores = torch.full((len(train),), float("nan"), dtype=torch.float64)
    labels = train.labels.cpu()
    classes = [cfg.target_label] if cfg.target_label is not None else sorted(set(labels.tolist()))
    for cls in classes:
        members = torch.nonzero(labels == cls).flatten()
        if len(members) == 0:
            continue
        feats = layer_outputs(model, model.net, layer, train.subset(members), device, cfg.batch_size, cfg.amp)
        cls_scores = spectral_scores(feats)
        scores[members] = cls_scores
        removed[members] = ~spectral_keep_mask(cls_scores, cfg.percentile)
    return removed, scores, layer


def spectral_defense(model: Classifier, data: DefenseData, cfg: SpectralConfig, run: DefenseRun) -> Classifier:
    train = poisoned_train(data, "Spectral")
    with run.timed("detect"):
        removed, scores, layer = spectral_filter(model, train, cfg, run.device)
    run.logger.info("Spectral: features of %s; classes filtered: %s", layer,
                    cfg.target_label if cfg.target_label is not None else "all")
    write_sample_flags(run, train, removed, scores, "spectral")
    run.extra_results.update({"spectral_layer": layer, "test_data_for_decisions": False,
                              "oracle_inputs": ["target_label"] if cfg.target_label is not None else []})
    return retrain_on_kept(run, train.subset(torch.nonzero(~removed).flatten()), cfg)


@register_defense
class SpectralSignatures(Defense):
    """Spectral: remove the samples with the largest spectral signature per class, retrain from scratch."""

    name = "spectral"
    config_cls = SpectralConfig
    needs_clean_subset = False
    budget_keys: ClassVar[tuple[str, ...]] = ("epochs",)

    def repair(self, model, data, cfg, run):
        return spectral_defense(model, data, cfg, run)

    def preflight(self, cfg, record, out_dir):
        poisoned_train_size(record, "Spectral")
        if cfg.target_layer:  # a wrong layer name fails here, not after the output folder exists
            feature_layer(build_classifier(record.model_name, dataset_info(record.clean_data), record.num_classes).net,
                          cfg.target_layer)
        if cfg.target_label is not None and cfg.target_label >= record.num_classes:
            raise BurnError(f"--target_label {cfg.target_label} is not a class of this record (0..{record.num_classes - 1})")
