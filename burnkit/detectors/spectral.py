"""``detection_pretrain/spectral.py``: Spectral Signatures on the poisoned training set
(algorithm: :mod:`burnkit.detection.spectral`; BackdoorBench folder ``detection/spectral_pretrain/``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..detection.features import extract
from ..detection.spectral import percentile_flags, spectral_scores
from ..detector import DetectionResult, FeatureConfig, FeatureDetector, register_detector
from ..errors import BurnError


@dataclass
class SpectralConfig(FeatureConfig):
    percentile: float = option(85.0, "flag scores above this percentile of their class (BackdoorBench)",
                               low=0, high=100)
    centered: bool = option(True, "project centred features (Tran et al.); false = BackdoorBench's uncentred projection")
    target_label: int | None = option(None, "analyse only this class (default: every class)", low=0)


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
