"""SCAn, the Statistical Contamination Analyzer (Tang et al., "Demon in the Variant: Statistical Analysis
of DNNs for Robust Backdoor Contamination Detection", USENIX Security 2021,
https://arxiv.org/abs/1908.00686).

A representation is modelled as ``r = μ_class + ε`` with ``μ ~ N(0, S_u)`` and a within-class
variation ``ε ~ N(0, S_e)`` shared by all classes.

1. Global model: ``S_u`` and ``S_e`` are fitted by EM on the defender's clean samples (their labels
   known), as in joint-Bayesian face verification.
2. Local model, per class of the inspected set: the class is split into two subgroups with means
   u1, u2 and the shared S_e (an EM that assigns each sample to the nearer mean in the metric
   F = S_e^-1); the test statistic ``J`` is the mean reduction of the squared F-distance when the
   two means replace the class's one (posterior) mean.
3. ``J`` of every class is turned into an anomaly index ``(J - median) / (1.4826 MAD)`` (J scaled by
   its maximum first, as the authors do); a class with index >= e² is contaminated.
4. Inside a contaminated class the subgroup holding fewer of the clean samples is the poison.

SCAn decides per class and subgroup, so its per-sample score is class-level: the anomaly index of
the sample's class for the suspicious subgroup, and one common value below every index for the
other subgroups. BackdoorBench compares the index with ``>``; the paper's rule is ``>=``.
Everything is vectorised (the reference loops over samples).

``detection_pretrain/scan.py`` runs it on a record's poisoned training set with a clean reserve
(BackdoorBench folder ``detection/scan_pretrain/``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..config import option
from ..detector import DetectionResult, FeatureConfig, FeatureDetector, register_detector
from ..feature_points import as_numpy, extract, spatial_sum


THRESHOLD = math.e ** 2
MAD_SCALE = 1.4826


@dataclass
class ScanResult:
    scores: np.ndarray
    flagged: np.ndarray
    anomaly_index: dict = field(default_factory=dict)  # class -> index
    flagged_classes: list = field(default_factory=list)
    subgroup_sizes: dict = field(default_factory=dict)  # class -> (n1, n2, clean1, clean2)


def _cov(x: np.ndarray) -> np.ndarray:
    return np.atleast_2d(np.cov(x.T)) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))


def global_model(x: np.ndarray, y: np.ndarray, max_iter: int = 100, tol: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """``(S_u, S_e)`` by EM on centred clean representations ``x`` with labels ``y``."""
    classes, inverse = np.unique(y, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, inverse, x)
    means = sums / counts[:, None]
    s_u, s_e = _cov(means[inverse]), _cov(x - means[inverse])
    for _ in range(max_iter):
        f = np.linalg.pinv(s_e)
        su_f = s_u @ f
        mu = np.stack([s_e @ np.linalg.pinv(counts[k] * s_u + s_e) @ su_f @ sums[k] for k in range(len(classes))])
        new_u, new_e = _cov(mu[inverse]), _cov(x - mu[inverse])
        change = np.linalg.norm(new_u - s_u) + np.linalg.norm(new_e - s_e)
        s_u, s_e = new_u, new_e
        if change < tol:
            break
    return s_u, s_e


def split_two(x: np.ndarray, f: np.ndarray, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two subgroups of ``x`` sharing the metric ``f``: ``(in_first, u1, u2)``. Starts from the sign
    of the projection on the top principal direction in the ``f`` metric, then alternates means and
    nearest-mean assignment until the assignment stops changing."""
    if len(x) < 2:
        return np.ones(len(x), dtype=bool), x.mean(0), x.mean(0)
    centred = x - x.mean(0)
    vals, vecs = np.linalg.eigh(f)
    root = vecs @ np.diag(np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    _, _, vt = np.linalg.svd(centred @ root, full_matrices=False)
    first = (centred @ root @ vt[0]) > 0
    u1 = u2 = x.mean(0)
    for _ in range(max_iter):
        if first.all() or not first.any():
            break
        u1, u2 = x[first].mean(0), x[~first].mean(0)
        bias = u1 @ f @ u1 - u2 @ f @ u2
        new = 2 * (x @ f @ (u1 - u2)) > bias
        if np.array_equal(new, first):
            break
        first = new
    return first, u1, u2


def assign(x: np.ndarray, f: np.ndarray, u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """True where ``x`` is nearer to ``u1`` than to ``u2`` in the ``f`` metric."""
    return 2 * (x @ f @ (u1 - u2)) > (u1 @ f @ u1 - u2 @ f @ u2)


def test_statistic(x: np.ndarray, s_u: np.ndarray, s_e: np.ndarray, f: np.ndarray, first: np.ndarray,
                   u1: np.ndarray, u2: np.ndarray) -> float:
    """Mean reduction of ``(x - m)^T F (x - m)`` when the subgroup means replace the class mean."""
    n = len(x)
    mu = s_e @ np.linalg.pinv(n * s_u + s_e) @ s_u @ f @ x.sum(0)
    means = np.where(first[:, None], u1, u2)
    one = np.einsum("ij,jk,ik->i", x - mu, f, x - mu)
    two = np.einsum("ij,jk,ik->i", x - means, f, x - means)
    return float((one - two).mean())


def anomaly_index(values: np.ndarray) -> np.ndarray:
    """``(a - median) / (1.4826 MAD)`` of ``a = values / max(values)`` (signed: large = anomalous)."""
    a = values / max(np.abs(values).max(), 1e-300)
    med = np.median(a)
    mad = np.median(np.abs(a - med)) * MAD_SCALE
    return (a - med) / max(mad, 1e-12)


def scan(features, labels, clean_features, clean_labels, threshold: float = THRESHOLD) -> ScanResult:
    """SCAn on inspected representations (N, d) with the labels they carry, given clean ones."""
    x = as_numpy(features)
    y = np.asarray(labels)
    xc = as_numpy(clean_features)
    yc = np.asarray(clean_labels)
    s_u, s_e = global_model(xc - xc.mean(0), yc)
    f = np.linalg.pinv(s_e)
    centred, clean_centred = x - x.mean(0), xc - x.mean(0)
    classes = np.unique(y)
    stats, splits = {}, {}
    for c in classes:
        idx = np.flatnonzero(y == c)
        first, u1, u2 = split_two(centred[idx], f)
        stats[int(c)] = test_statistic(centred[idx], s_u, s_e, f, first, u1, u2)
        splits[int(c)] = (idx, first, u1, u2)
    index = anomaly_index(np.array([stats[int(c)] for c in classes]))
    out = ScanResult(np.zeros(len(x)), np.zeros(len(x), dtype=bool))
    floor = float(index.min()) - 1.0
    out.scores[:] = floor
    for c, value in zip(classes, index):
        idx, first, u1, u2 = splits[int(c)]
        clean_first = assign(clean_centred[yc == c], f, u1, u2)
        clean_counts = (int(clean_first.sum()), int((~clean_first).sum()))
        sizes = (int(first.sum()), int((~first).sum()))
        if clean_counts[0] != clean_counts[1]:
            poison_first = clean_counts[0] < clean_counts[1]
        else:  # no clean evidence either way: the smaller subgroup
            poison_first = sizes[0] < sizes[1]
        suspicious = idx[first] if poison_first else idx[~first]
        out.scores[suspicious] = value
        out.anomaly_index[int(c)] = float(value)
        out.subgroup_sizes[int(c)] = {"sizes": sizes, "clean": clean_counts, "suspicious": 0 if poison_first else 1}
        if value >= threshold:
            out.flagged[suspicious] = True
            out.flagged_classes.append(int(c))
    return out


# --------------------------------------------------------------------------- the detector
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
