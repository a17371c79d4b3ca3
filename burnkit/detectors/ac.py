"""Activation Clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by Activation
Clustering", AAAI SafeAI 2019, https://arxiv.org/abs/1811.03728).

Per class (the label each sample carries): the last hidden layer's activations are centred, reduced
to ``nb_dims`` dimensions (FastICA, as in the paper and BackdoorBench's detector; PCA optional) and
split by k-means into ``nb_clusters`` clusters. Poison forms its own, smaller cluster: a cluster
holding less than ``size_threshold`` of its class (BackdoorBench's detector: 35 %) is flagged,
the paper's "relative size" analysis.

Per-sample score: ``1 - relative size of the sample's cluster`` - the statistic the decision
thresholds, so the ranking puts samples of small clusters first. It is constant within a cluster.

BackdoorBench's defect list (spec §11.6) is not copied: clustering is per class over all samples
(not per mini-batch), the reduction really runs, features come without augmentation, and cluster
ids stay attached to their samples.

``detection_pretrain/ac.py`` runs it on a record's poisoned training set
(BackdoorBench folder ``detection/ac_pretrain/``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..config import option
from ..detector import DetectionResult, FeatureConfig, FeatureDetector, input_shape, register_detector
from ..feature_points import INPUT_SUFFIX, as_numpy, extract, final_layer


REDUCERS = ("ica", "pca")


@dataclass
class ClusterResult:
    scores: np.ndarray  # 1 - relative size of each sample's cluster
    flagged: np.ndarray
    cluster: np.ndarray  # cluster id within the sample's class (-1: class not clustered)
    sizes: dict = field(default_factory=dict)  # class -> relative cluster sizes
    flagged_classes: list = field(default_factory=list)
    warnings: int = 0
    reductions: dict = field(default_factory=dict)  # class -> reduction used, where not the one asked for


ICA_TRIES = 3  # FastICA seeds tried (seed, seed + 1, ...) before falling back to PCA


def reduce_dims(x: np.ndarray, nb_dims: int, reducer: str, seed: int) -> tuple[np.ndarray, str]:
    """``x`` (already centred) reduced to at most ``nb_dims`` dimensions, and the reduction used.

    FastICA can diverge on a class's activations (a source with zero variance, which scikit-learn's
    unit-variance scaling turns into NaN); it is then rerun from the next seeds, and after
    ``ICA_TRIES`` failures the class is reduced with PCA instead (reported, never silent)."""
    from sklearn.decomposition import PCA, FastICA

    if reducer not in REDUCERS:
        raise ValueError(f"reducer must be one of {REDUCERS}, got {reducer!r}")
    dims = max(1, min(nb_dims, x.shape[1], x.shape[0] - 1))
    if reducer == "ica":
        for attempt in range(ICA_TRIES):
            with np.errstate(invalid="ignore", divide="ignore"):
                try:
                    out = FastICA(n_components=dims, random_state=seed + attempt, whiten="unit-variance",
                                  max_iter=1000).fit_transform(x)
                except (ValueError, np.linalg.LinAlgError):
                    continue
            if np.isfinite(out).all():
                return out, "ica" if attempt == 0 else f"ica (seed {seed + attempt})"
    return PCA(n_components=dims, random_state=seed).fit_transform(x), "pca" if reducer == "pca" else "pca (ica diverged)"


def activation_clustering(features, labels, nb_dims: int = 10, nb_clusters: int = 2, reducer: str = "ica",
                          size_threshold: float = 0.35, seed: int = 0) -> ClusterResult:
    """Cluster each class's activations and flag its smallest cluster if it is small enough.

    Args:
        features: (N, d) activations; labels: (N,) the label each sample carries.
        nb_dims: dimensions after the reduction; nb_clusters: k of k-means.
        size_threshold: a class's smallest cluster is flagged when it holds less than this share.
        seed: seeds the reduction and k-means.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    x = as_numpy(features)
    y = np.asarray(labels)
    n = len(x)
    out = ClusterResult(np.zeros(n), np.zeros(n, dtype=bool), -np.ones(n, dtype=np.int64))
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) <= nb_clusters:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            reduced, used = reduce_dims(x[idx] - x[idx].mean(0), nb_dims, reducer, seed)
            ids = KMeans(n_clusters=nb_clusters, n_init=10, random_state=seed).fit_predict(reduced)
        out.warnings += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        if used != reducer:
            out.reductions[int(c)] = used
        share = np.bincount(ids, minlength=nb_clusters) / len(idx)
        out.cluster[idx] = ids
        out.scores[idx] = 1.0 - share[ids]
        out.sizes[int(c)] = share.round(6).tolist()
        smallest = int(np.argmin(share))
        if share[smallest] < size_threshold:
            out.flagged[idx[ids == smallest]] = True
            out.flagged_classes.append(int(c))
    return out


# --------------------------------------------------------------------------- the detector


@dataclass
class ACConfig(FeatureConfig):
    target_layer: str | None = option(None, "feature point (module name, NAME:input for its input)",
                                      default_help="the input of the final layer, the last hidden activations "
                                                   "the paper clusters")
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
