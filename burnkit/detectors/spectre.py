"""``detection_pretrain/spectre.py``: SPECTRE on the poisoned training set
(algorithm: :mod:`burnkit.detection.spectre`; BackdoorBench folder ``detection/spectre_pretrain/``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..detection.features import extract
from ..detection.spectre import DEFAULT_KS, spectre
from ..detector import DetectionResult, FeatureConfig, FeatureDetector, register_detector


@dataclass
class SpectreConfig(FeatureConfig):
    percentile: float = option(0.01, "ε = percentile x N poisoned samples assumed per class, capped at a third of "
                                     "the class (BackdoorBench's rule and value)", above=0, high=1)
    alpha: float = option(4.0, "QUE temperature α", above=0)
    pca_dims: int = option(64, "principal components kept before the search over k", low=1)
    ks: list[int] = option(list(DEFAULT_KS), "candidate numbers of components k", low=1)


@register_detector
class Spectre(FeatureDetector):
    """SPECTRE: robust whitening and QUantum Entropy scores per class."""

    name = "spectre"
    config_cls = SpectreConfig
    header = ("target",)

    def detect(self, model, data, cfg, run):
        point = self.feature_point(model, data.record, cfg)
        with run.timed("features"):
            feats, _ = extract(model, data.inspected, point, run.device, cfg.batch_size, amp=cfg.amp)
        with run.timed("scores"):
            res = spectre(feats, data.inspected.labels.numpy(), cfg.percentile, cfg.alpha, cfg.pca_dims,
                          tuple(cfg.ks), cfg.random_seed)
        strongest = max(res.per_class, key=lambda c: res.per_class[c]["quality"]) if res.per_class else None
        return DetectionResult(res.scores, res.flagged, target=str(strongest), notes={
            "feature_point": point, "feature_dim": int(feats.shape[1]), "per_class": res.per_class,
            "target": "the class whose chosen k leaves the largest QUE quality",
            "rule": "per class, the top 1.5 ε QUE scores at the chosen k"})
