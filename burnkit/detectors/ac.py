"""``detection_pretrain/ac.py``: Activation Clustering on the poisoned training set
(algorithm: :mod:`burnkit.detection.ac`; BackdoorBench folder ``detection/ac_pretrain/``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..detection.ac import REDUCERS, activation_clustering
from ..detection.features import INPUT_SUFFIX, extract, final_layer
from ..detector import DetectionResult, FeatureConfig, FeatureDetector, input_shape, register_detector


@dataclass
class ACConfig(FeatureConfig):
    target_layer: str | None = option(None, "feature point (module name, NAME:input for its input); default: the "
                                            "input of the final layer, the last hidden activations the paper clusters")
    nb_dims: int = option(10, "dimensions after the reduction", low=1)
    nb_clusters: int = option(2, "k-means clusters per class", low=2)
    reducer: str = option("ica", "reduction: ica (the paper, BackdoorBench's detector) or pca", choices=REDUCERS)
    cluster_analysis: str = option("smaller", "which cluster is poison: smaller (relative size, BackdoorBench's "
                                              "detector; the only analysis implemented)", choices=("smaller",))
    size_threshold: float = option(0.35, "flag a class's smallest cluster when it holds less than this share",
                                   above=0, high=1)


@register_detector
class ActivationClustering(FeatureDetector):
    """Activation Clustering: per-class 2-means of the reduced last hidden activations."""

    name = "ac"
    config_cls = ACConfig
    header = ("weight_F_score", "target")

    def feature_point(self, model, record, cfg):
        if cfg.target_layer in (None, "", "None", "none"):  # the last hidden activations
            return final_layer(model.net, input_shape(record)) + INPUT_SUFFIX
        return super().feature_point(model, record, cfg)

    def detect(self, model, data, cfg, run):
        point = self.feature_point(model, data.record, cfg)
        labels = data.inspected.labels.numpy()
        with run.timed("features"):
            feats, _ = extract(model, data.inspected, point, run.device, cfg.batch_size, amp=cfg.amp)
        with run.timed("clustering"):
            res = activation_clustering(feats, labels, cfg.nb_dims, cfg.nb_clusters, cfg.reducer,
                                        cfg.size_threshold, cfg.random_seed)
        if res.warnings:
            run.logger.warning("%d reductions did not converge (scikit-learn ConvergenceWarning)", res.warnings)
        if res.reductions:
            run.logger.warning("FastICA diverged (non-finite sources) on classes %s; reduced with: %s",
                               sorted(res.reductions), res.reductions)
        return DetectionResult(res.scores, res.flagged, threshold=1.0 - cfg.size_threshold,
                               target=str(res.flagged_classes), notes={
                                   "feature_point": point, "feature_dim": int(feats.shape[1]),
                                   "cluster_shares": res.sizes, "flagged_classes": res.flagged_classes,
                                   "reductions_replaced": res.reductions,
                                   "rule": f"per class, the smallest cluster if its share < {cfg.size_threshold}",
                                   "score": "1 - share of the sample's cluster in its class"})
