"""SCAn, the Statistical Contamination Analyzer (Tang et al., "Demon in the Variant: Statistical Analysis
of DNNs for Robust Backdoor Contamination Detection", USENIX Security 2021,
https://arxiv.org/abs/1908.00686).

A representation is modelled as ``r = μ_class + ε`` with ``μ ~ N(0, S_u)`` and a within-class
variation ``ε ~ N(0, S_e)`` shared by all classes.

1. Global model: ``S_u`` and ``S_e`` are fitted by EM on the defender's clean samples (their labels
   known), as in joint-Bayesian face verification.
2. Local model, per class: the class is split into two subgroups with means u1, u2 and the shared
   S_e (an EM that assigns each sample to the nearer mean in the metric F = S_e^-1); the test
   statistic ``J`` is the mean reduction of the squared F-distance when the two means replace the
   class's one mean.
3. ``J`` of every class is turned into an anomaly index ``(J - median) / (1.4826 MAD)`` (J scaled by
   its maximum first, as the authors do); a class with index >= e² is contaminated.
4. Inside a contaminated class the subgroup holding fewer of the clean samples is the poison.

Two variants (:data:`VARIANTS`, ``--variant``), differing in five places:

================================  ======================================  ==================================
                                  ``backdoorbench`` (the default)         ``paper``
================================  ======================================  ==================================
class mean in J                   ``S_e (n S_u + S_e)^-1 Σx``             the posterior mean
                                  (BackdoorBench's ``calc_test`` and the  ``S_e (n S_u + S_e)^-1 S_u F Σx``
                                  authors' public code)                   ``= S_u (n S_u + S_e)^-1 Σx``
start of the two-subgroup EM      uniform random soft labels              the sign of the projection on
                                                                          the top principal direction
clean reserve                     inside the split and J (the local       assigned to the subgroups after
                                  model runs on inspected + clean)        the split of the inspected samples
anomaly index                     absolute: ``|a - median| / MAD``        signed: only a large J is anomalous
no clean sample decides           the subgroup the EM labelled 1          the smaller subgroup
================================  ======================================  ==================================

The posterior mean is what the global model's own EM uses (:func:`global_model`); BackdoorBench's
statistic leaves ``S_u F`` out, so where S_u is small or rank-deficient (S_u has rank <= K - 1) its
"mean" is not near the class's samples and J measures the class size and mean more than a split.

SCAn decides per class and subgroup, so its per-sample score is class-level: the anomaly index of
the sample's class for the suspicious subgroup, and one common value below every index for the
other subgroups. BackdoorBench compares the index with ``>``; the paper's rule is ``>=`` (used by both
variants: the two differ only on a tie). Everything is vectorised (the reference loops over samples).

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
EM_TOL = 1e-5  # the authors' and BackdoorBench's EPS: both EMs stop below this change (or after 100 steps)


@dataclass(frozen=True)
class ScanVariant:
    """Where BackdoorBench's SCAn and the paper's differ (see the module docstring)."""

    posterior_mean: bool  # J measures against the posterior class mean (else BackdoorBench's S_e (n S_u + S_e)^-1 Σx)
    principal_start: bool  # the split starts from the top principal direction (else from random soft labels)
    clean_in_split: bool  # the clean reserve takes part in the split and J (BackdoorBench)
    signed_index: bool  # only a large J is anomalous (else the absolute deviation from the median)
    ties_to_smaller: bool  # equal clean counts: the smaller subgroup (else the one the EM labelled 1)


VARIANTS = {"backdoorbench": ScanVariant(False, False, True, False, False),
            "paper": ScanVariant(True, True, False, True, True)}


@dataclass
class ScanResult:
    scores: np.ndarray
    flagged: np.ndarray
    anomaly_index: dict = field(default_factory=dict)  # class -> index
    flagged_classes: list = field(default_factory=list)
    subgroup_sizes: dict = field(default_factory=dict)  # class -> sizes, clean counts, suspicious subgroup
    statistic: dict = field(default_factory=dict)  # class -> J


def _cov(x: np.ndarray) -> np.ndarray:
    return np.atleast_2d(np.cov(x.T)) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))


def global_model(x: np.ndarray, y: np.ndarray, max_iter: int = 100, tol: float = EM_TOL) -> tuple[np.ndarray, np.ndarray]:
    """``(S_u, S_e)`` by EM on centred clean representations ``x`` with labels ``y``."""
    classes, inverse = np.unique(y, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, inverse, x)
    means = sums / counts[:, None]
    s_u, s_e = _cov(means[inverse]), _cov(x - means[inverse])
    for _ in range(max_iter):
        f = np.linalg.pinv(s_e)
        mu = np.stack([class_mean(sums[k], counts[k], s_u, s_e, f, posterior=True) for k in range(len(classes))])
        new_u, new_e = _cov(mu[inverse]), _cov(x - mu[inverse])
        change = np.linalg.norm(new_u - s_u) + np.linalg.norm(new_e - s_e)
        s_u, s_e = new_u, new_e
        if change <= tol:
            break
    return s_u, s_e


def class_mean(total: np.ndarray, n: float, s_u: np.ndarray, s_e: np.ndarray, f: np.ndarray,
               posterior: bool) -> np.ndarray:
    """The class mean from the sum ``total`` of its ``n`` representations.

    ``posterior``: ``E[μ | x_1..x_n] = S_e (n S_u + S_e)^-1 S_u F Σx`` (F = S_e^-1; this equals
    ``S_u (n S_u + S_e)^-1 Σx``), the joint-Bayesian estimate both EMs of the paper use. Otherwise
    BackdoorBench's test statistic: ``S_e (n S_u + S_e)^-1 Σx``, the same product without ``S_u F``.
    """
    shrink = s_e @ np.linalg.pinv(n * s_u + s_e)
    return shrink @ (s_u @ (f @ total)) if posterior else shrink @ total


def split_start(x: np.ndarray, f: np.ndarray, principal: bool, rng: np.random.Generator) -> np.ndarray:
    """The first assignment of the two-subgroup EM (True: subgroup 1). ``principal``: the sign of the
    projection on the top principal direction in the ``f`` metric; else BackdoorBench's start,
    uniform random soft labels thresholded at 0.5, with sample 0 moved when a subgroup is empty."""
    if principal:
        centred = x - x.mean(0)
        vals, vecs = np.linalg.eigh(f)
        root = vecs @ np.diag(np.sqrt(np.clip(vals, 0, None))) @ vecs.T
        _, _, vt = np.linalg.svd(centred @ root, full_matrices=False)
        return (centred @ root @ vt[0]) > 0
    first = rng.random(len(x)) >= 0.5
    if not first.any():
        first[0] = True
    if first.all():
        first[0] = False
    return first


def split_two(x: np.ndarray, f: np.ndarray, start: np.ndarray | None = None,
              max_iter: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two subgroups of ``x`` sharing the metric ``f``: ``(in_first, u1, u2)``. From ``start`` (default:
    the principal start), alternates subgroup means and nearest-mean assignment until the assignment
    stops changing."""
    if len(x) < 2:
        return np.ones(len(x), dtype=bool), x.mean(0), x.mean(0)
    first = split_start(x, f, True, np.random.default_rng(0)) if start is None else np.asarray(start, dtype=bool)
    u1 = u2 = x.mean(0)
    for _ in range(max_iter):
        if first.all() or not first.any():
            break
        u1, u2 = x[first].mean(0), x[~first].mean(0)
        new = assign(x, f, u1, u2)
        if np.array_equal(new, first):
            break
        first = new
    return first, u1, u2


def assign(x: np.ndarray, f: np.ndarray, u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """True where ``x`` is nearer to ``u1`` than to ``u2`` in the ``f`` metric."""
    return 2 * (x @ f @ (u1 - u2)) > (u1 @ f @ u1 - u2 @ f @ u2)


def split_statistic(x: np.ndarray, mean: np.ndarray, f: np.ndarray, first: np.ndarray, u1: np.ndarray,
                   u2: np.ndarray) -> float:
    """Mean reduction of ``(x - m)^T F (x - m)`` when the subgroup means replace the class mean ``m``."""
    means = np.where(first[:, None], u1, u2)
    one = np.einsum("ij,jk,ik->i", x - mean, f, x - mean)
    two = np.einsum("ij,jk,ik->i", x - means, f, x - means)
    return float((one - two).mean())


def suspicious_is_first(clean_counts: tuple[int, int], sizes: tuple[int, int], ties_to_smaller: bool) -> bool:
    """Whether subgroup 1 is the suspicious one: the subgroup holding fewer clean samples; on equal
    clean counts the smaller subgroup (``ties_to_smaller``) or, as BackdoorBench, subgroup 1."""
    if clean_counts[0] != clean_counts[1]:
        return clean_counts[0] < clean_counts[1]
    return sizes[0] < sizes[1] if ties_to_smaller else True


def anomaly_index(values: np.ndarray, signed: bool = False) -> np.ndarray:
    """``(a - median) / (1.4826 MAD)`` of ``a = values / max |values|``; ``signed`` False takes the
    absolute deviation (BackdoorBench), so an unusually small value is as anomalous as a large one."""
    a = values / max(np.abs(values).max(), 1e-300)
    med = np.median(a)
    mad = np.median(np.abs(a - med)) * MAD_SCALE
    deviation = a - med if signed else np.abs(a - med)
    return deviation / max(mad, 1e-12)


def scan(features, labels, clean_features, clean_labels, threshold: float = THRESHOLD,
         variant: str | ScanVariant = "backdoorbench", seed: int = 0) -> ScanResult:
    """SCAn on inspected representations (N, d) with the labels they carry, given clean ones.
    ``variant``: a name of :data:`VARIANTS` or a :class:`ScanVariant`; ``seed`` draws the random starts."""
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    x, y = as_numpy(features), np.asarray(labels)
    xc, yc = as_numpy(clean_features), np.asarray(clean_labels)
    s_u, s_e = global_model(xc - xc.mean(0), yc)
    f = np.linalg.pinv(s_e)
    rng = np.random.default_rng(seed)
    if v.clean_in_split:  # BackdoorBench: the local model runs on the inspected and the clean samples together
        pool, pool_y = np.concatenate([x, xc]), np.concatenate([y, yc])
    else:
        pool, pool_y = x, y
    is_clean = np.arange(len(pool)) >= len(x)
    centre = pool.mean(0)
    centred, clean_centred = pool - centre, xc - centre
    classes = np.unique(pool_y)
    stats, splits = {}, {}
    for c in classes:
        members = np.flatnonzero(pool_y == c)
        part = centred[members]
        first, u1, u2 = split_two(part, f, split_start(part, f, v.principal_start, rng))
        mean = class_mean(part.sum(0), len(part), s_u, s_e, f, v.posterior_mean)
        stats[int(c)] = split_statistic(part, mean, f, first, u1, u2)
        splits[int(c)] = (members, first, u1, u2)
    index = anomaly_index(np.array([stats[int(c)] for c in classes]), v.signed_index)
    out = ScanResult(np.zeros(len(x)), np.zeros(len(x), dtype=bool), statistic=stats)
    floor = float(index.min()) - 1.0
    out.scores[:] = floor
    for c, value in zip(classes, index):
        members, first, u1, u2 = splits[int(c)]
        if v.clean_in_split:
            clean_first = first[is_clean[members]]
        else:
            clean_first = assign(clean_centred[yc == c], f, u1, u2)
        clean_counts = (int(clean_first.sum()), int((~clean_first).sum()))
        inspected = ~is_clean[members]
        sizes = (int((first & inspected).sum()), int((~first & inspected).sum()))
        poison_first = suspicious_is_first(clean_counts, sizes, v.ties_to_smaller)
        chosen = first if poison_first else ~first
        suspicious = members[chosen & inspected]
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
    variant: str = option("backdoorbench", "backdoorbench: BackdoorBench's SCAn (its class mean, random split start, "
                                           "clean samples inside the split, absolute anomaly index); paper: the "
                                           "paper's posterior mean, principal start, clean samples after the split, "
                                           "signed index (docs/detection.md)", choices=tuple(VARIANTS))


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
            res = scan(feats, data.inspected.labels.numpy(), clean, data.clean.labels.numpy(), cfg.threshold,
                       cfg.variant, cfg.random_seed)
        return DetectionResult(res.scores, res.flagged, threshold=cfg.threshold, target=str(res.flagged_classes),
                               notes={"variant": cfg.variant, "feature_point": point, "representation": "spatial sum",
                                      "feature_dim": int(feats.shape[1]), "statistic_J": res.statistic,
                                      "anomaly_index": res.anomaly_index,
                                      "subgroups": res.subgroup_sizes, "flagged_classes": res.flagged_classes,
                                      "score": "anomaly index of the class for its suspicious subgroup, "
                                               "min(index) - 1 elsewhere",
                                      "rule": f"classes with anomaly index >= {cfg.threshold:.4f}: the subgroup "
                                              "holding fewer clean samples"})
