"""Spectral Signatures (Tran, Li and Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018,
https://arxiv.org/abs/1811.00636).

Per class (the label each training sample carries), the feature vectors are centred and projected
on their top right singular vector v; the outlier score is ``((x - mean) · v)^2``. Poison that the
network separates from the clean samples of its (target) label dominates that direction.

Decisions: BackdoorBench's rule, every class's scores above the class's ``percentile`` (85: the top
15 % of every class) are flagged; with ``target_label`` only that class is analysed. BackdoorBench
projects the *uncentred* features (spec §11.7, a defect); ``centered=False`` reproduces it. Scores
of different classes are pooled as they are (squared projections in the same feature space), so a
class whose top direction carries a large separated group ranks above the others.

``detection_pretrain/spectral.py`` runs it on a record's poisoned training set
(BackdoorBench folder ``detection/spectral_pretrain/``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import option
from ..detector import DetectionResult, FeatureConfig, FeatureDetector, register_detector
from ..errors import BurnError
from ..feature_points import as_numpy, extract


def top_direction(centred: np.ndarray) -> np.ndarray:
    """Unit top right singular vector of ``centred`` (n x d), from the smaller Gram matrix."""
    n, d = centred.shape
    if d <= n:
        _, vecs = np.linalg.eigh(centred.T @ centred)
        v = vecs[:, -1]
    else:
        _, vecs = np.linalg.eigh(centred @ centred.T)
        v = centred.T @ vecs[:, -1]
    return v / max(np.linalg.norm(v), 1e-300)


def spectral_scores(features, labels, centered: bool = True, classes=None) -> np.ndarray:
    """Outlier score of every sample within its class (0 for classes not analysed or of one sample).

    Args:
        features: (N, d) representations.
        labels: (N,) the label each sample carries.
        centered: project ``x - mean`` (Tran et al.); False projects ``x`` (BackdoorBench's code).
        classes: classes to analyse (default: all present).
    """
    x = as_numpy(features, dtype=None)  # upcast per class: N x d can be large
    y = np.asarray(labels)
    scores = np.zeros(len(x))
    for c in (np.unique(y) if classes is None else classes):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            continue
        xc = x[idx].astype(np.float64)
        mean = xc.mean(0)
        v = top_direction(xc - mean)
        proj = (xc - mean) @ v if centered else xc @ v
        scores[idx] = proj ** 2
    return scores


def percentile_flags(scores: np.ndarray, labels, percentile: float, classes=None) -> np.ndarray:
    """Flag, per class, the scores above that class's ``percentile`` (numpy's linear percentile)."""
    y = np.asarray(labels)
    flags = np.zeros(len(scores), dtype=bool)
    for c in (np.unique(y) if classes is None else classes):
        idx = np.flatnonzero(y == c)
        if len(idx):
            flags[idx] = scores[idx] > np.percentile(scores[idx], percentile)
    return flags


# --------------------------------------------------------------------------- the detector


@dataclass
class SpectralConfig(FeatureConfig):
    percentile: float = option(85.0, "flag scores above this percentile of their class (BackdoorBench)",
                               low=0, high=100)
    centered: bool = option(True, "project centred features (Tran et al.); false = BackdoorBench's uncentred projection")
    target_label: int | None = option(None, "analyse only this class", low=0, default_help="every class")


@register_detector
class Spectral(FeatureDetector):
    """Spectral Signatures: per-class top singular direction of the features."""

    name = "spectral"
    config_cls = SpectralConfig
    header = ("target",)

    def preflight(self, cfg, record, model):
        super().preflight(cfg, record, model)
        if cfg.target_label is not None and cfg.target_label >= record.num_classes:
            raise BurnError(f"--target_label {cfg.target_label} is not a class (0..{record.num_classes - 1})")

    def detect(self, model, data, cfg, run):
        point = self.feature_point(model, data.record, cfg)
        labels = data.inspected.labels.numpy()
        classes = None if cfg.target_label is None else [cfg.target_label]
        with run.timed("features"):
            feats, _ = extract(model, data.inspected, point, run.device, cfg.batch_size, amp=cfg.amp)
        with run.timed("scores"):
            scores = spectral_scores(feats, labels, cfg.centered, classes)
            flags = percentile_flags(scores, labels, cfg.percentile, classes)
        return DetectionResult(scores, flags, target=str(cfg.target_label), notes={
            "feature_point": point, "feature_dim": int(feats.shape[1]), "centered": cfg.centered,
            "rule": f"per class, score > its {cfg.percentile}th percentile"})
