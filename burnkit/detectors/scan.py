"""``detection_pretrain/scan.py``: SCAn on the poisoned training set with a clean reserve
(algorithm: :mod:`burnkit.detection.scan`; BackdoorBench folder ``detection/scan_pretrain/``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..detection.features import extract, spatial_sum
from ..detection.scan import THRESHOLD, scan
from ..detector import DetectionResult, FeatureConfig, FeatureDetector, register_detector


@dataclass
class ScanConfig(FeatureConfig):
    threshold: float = option(THRESHOLD, "anomaly index from which a class is contaminated (e^2, the paper's)", above=0)


@register_detector
class Scan(FeatureDetector):
    """SCAn: two-subgroup decomposition per class against a clean global model."""

    name = "scan"
    config_cls = ScanConfig
    header = ("target",)
    needs_clean = True

    def detect(self, model, data, cfg, run):
        point = self.feature_point(model, data.record, cfg)
        with run.timed("features"):
            feats, _ = extract(model, data.inspected, point, run.device, cfg.batch_size, spatial_sum, cfg.amp)
            clean, _ = extract(model, data.clean, point, run.device, cfg.batch_size, spatial_sum, cfg.amp)
        with run.timed("scores"):
            res = scan(feats, data.inspected.labels.numpy(), clean, data.clean.labels.numpy(), cfg.threshold)
        return DetectionResult(res.scores, res.flagged, threshold=cfg.threshold, target=str(res.flagged_classes),
                               notes={"feature_point": point, "representation": "spatial sum", "feature_dim":
                                      int(feats.shape[1]), "anomaly_index": res.anomaly_index,
                                      "subgroups": res.subgroup_sizes, "flagged_classes": res.flagged_classes,
                                      "score": "anomaly index of the class for its suspicious subgroup, "
                                               "min(index) - 1 elsewhere",
                                      "rule": f"classes with anomaly index >= {cfg.threshold:.4f}: the subgroup "
                                              "holding fewer clean samples"})
