"""SPECTRE (Hayase, Kong, Somani and Oh, "SPECTRE: Defending Against Backdoor Attacks Using Robust
Statistics", ICML 2021, https://arxiv.org/abs/2104.11315).

Per class (the label each sample carries), with ε the assumed number of poisoned samples:

1. centre the features and project them on their top ``pca_dims`` principal components;
2. for every k in ``ks`` (BackdoorBench: 1, 4, 9, ..., 64): estimate the covariance of the first k
   components robustly, ignoring up to ``2ε`` samples; whiten with it; compute the QUantum Entropy
   (QUE) score ``w^T M w`` with ``M = exp(α (Σ' - I) / (||Σ'|| - 1)) / tr(...)``, Σ' the covariance
   of the whitened data (α = 4); mark the top ``1.5ε`` scores;
3. keep the k whose marked samples, once removed, leave the data least "spiky": the largest
   ``tr(Σ' M) / tr(M)`` of the whole projection whitened with the kept samples' covariance.

The per-sample score is the QUE score at the chosen k; the flags are that k's top 1.5ε.

Two variants (:data:`VARIANTS`, ``--variant``):

* ``backdoorbench`` (the default), as BackdoorBench's ``detection_pretrain/spectre.py`` computes it:
  ``exp`` of M and the trace of ``Σ' M`` are NumPy's element-wise ``np.exp`` and ``Σ' * M`` (the
  trace then sums ``Σ'_ii M_ii``); the QUE scores are taken on the data centred at the class mean;
  ε per class is ``percentile * N`` (N = all inspected samples), at most ``round(0.33 n)`` and, for a
  class of fewer than 500 samples, at most ``round(0.1 n)``.
* ``paper``: M is the matrix exponential and the quality ``tr(Σ' M)`` a matrix product, as the
  paper's QUE score defines them; the scores are centred at the robust location; ε is
  ``min(percentile * N, n / 3)``.

The robust covariance: the paper and BackdoorBench filter with Diakonikolas et al.'s estimator; here
it is scikit-learn's Minimum Covariance Determinant with a support of ``n - 2ε`` samples (the same
budget of ignored samples; a standard robust estimator). k = 1 is whitened as well (BackdoorBench
scores the raw first component there), so scores of different classes are on the same scale when
they are pooled; within a class this changes no flag. The true poisoning rate is not read.

``detection_pretrain/spectre.py`` runs it on a record's poisoned training set
(BackdoorBench folder ``detection/spectre_pretrain/``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import expm

from ..config import option
from ..detector import DetectionResult, FeatureConfig, FeatureDetector, register_detector
from ..feature_points import as_numpy, extract

DEFAULT_KS = (1, 4, 9, 16, 25, 36, 49, 64)


@dataclass(frozen=True)
class SpectreVariant:
    """Where BackdoorBench's SPECTRE and the paper's differ (see the module docstring)."""

    elementwise: bool  # np.exp and Σ' * M element by element (BackdoorBench), else matrix exponential and product
    centre_at_mean: bool  # QUE scores of the data centred at the class mean (BackdoorBench), else the robust location
    small_class_cap: bool  # BackdoorBench's ε rule: <= round(0.33 n), and <= round(0.1 n) below 500 samples


VARIANTS = {"backdoorbench": SpectreVariant(True, True, True), "paper": SpectreVariant(False, False, False)}


@dataclass
class SpectreResult:
    scores: np.ndarray
    flagged: np.ndarray
    per_class: dict = field(default_factory=dict)  # class -> {k, eps, quality}


def _whitener(cov: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(cov)
    vals = np.clip(vals, max(vals.max(), 1e-12) * 1e-10, None)
    return vecs @ np.diag(vals ** -0.5) @ vecs.T


def que_weights(sigma: np.ndarray, alpha: float, elementwise: bool) -> np.ndarray:
    """M for the covariance ``sigma`` (k x k) of whitened data, normalised to trace 1:
    ``exp(α (Σ' - I) / (||Σ'||_2 - 1))``, the matrix exponential or (``elementwise``) NumPy's ``np.exp``
    of every entry; ``I / k`` when Σ' has no direction above 1 (or k = 1)."""
    k = sigma.shape[0]
    top = np.linalg.eigvalsh(sigma)[-1]
    if k == 1 or top - 1.0 <= 1e-9:
        m = np.eye(k)
    else:
        arg = alpha * (sigma - np.eye(k)) / (top - 1.0)
        m = np.exp(arg) if elementwise else expm(arg)
    return m / np.trace(m)


def que_matrix(white: np.ndarray, alpha: float, elementwise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(M, Σ')`` for whitened data (n x k)."""
    sigma = np.atleast_2d(np.cov(white.T, bias=True))
    return que_weights(sigma, alpha, elementwise), sigma


def que_scores(white: np.ndarray, alpha: float = 4.0, elementwise: bool = False) -> np.ndarray:
    m, _ = que_matrix(white, alpha, elementwise)
    return np.einsum("ij,jk,ik->i", white, m, white)


def que_quality(sigma: np.ndarray, m: np.ndarray, elementwise: bool) -> float:
    """``tr(Σ' M) / tr(M)``; ``elementwise``: BackdoorBench's ``trace(Σ' * M)``, the sum of
    ``Σ'_ii M_ii`` (the off-diagonal entries do not count)."""
    product = sigma * m if elementwise else sigma @ m
    return float(np.trace(product) / np.trace(m))


def class_budget(percentile: float, n_total: int, n_class: int, small_class_cap: bool) -> int:
    """ε of one class: ``percentile * n_total`` capped (at least 1). ``small_class_cap``: BackdoorBench's
    caps, ``round(0.33 n)`` and ``round(0.1 n)`` for a class below 500 samples; else ``n / 3``."""
    eps = percentile * n_total
    if not small_class_cap:
        return max(1, int(min(eps, n_class / 3)))
    if eps > 0.33 * n_class:
        eps = round(0.33 * n_class)
    if n_class < 500 and eps > 0.1 * n_class:
        eps = round(0.1 * n_class)
    return max(1, int(eps))


def robust_location_scatter(z: np.ndarray, ignore: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of ``z`` ignoring up to ``ignore`` samples (MCD with support n - ignore)."""
    from sklearn.covariance import MinCovDet

    n, k = z.shape
    if ignore <= 0 or n <= 2 * k + 1:
        return z.mean(0), np.atleast_2d(np.cov(z.T, bias=True))
    support = max(n - ignore, (n + k + 1) // 2 + 1) / n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # singular sub-covariances on tiny sets
        mcd = MinCovDet(support_fraction=min(support, 1.0), random_state=seed).fit(z)
    return mcd.location_, np.atleast_2d(mcd.covariance_)


def spectre_class(x: np.ndarray, eps: int, alpha: float = 4.0, pca_dims: int = 64, ks=DEFAULT_KS,
                  seed: int = 0, variant: str | SpectreVariant = "backdoorbench") -> tuple[np.ndarray, np.ndarray, dict]:
    """QUE scores, flags and the chosen k for one class's features ``x`` (n x d)."""
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    n = len(x)
    centred = x - x.mean(0)
    dims = max(1, min(pca_dims, n - 1, x.shape[1]))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    z = centred @ vt[:dims].T
    n_flag = min(n, int(round(1.5 * eps)))
    best = None
    for k in [k for k in ks if k <= dims] or [dims]:
        zk = z[:, :k]
        loc, cov = robust_location_scatter(zk, int(round(2 * eps)), seed)
        white = (zk if v.centre_at_mean else zk - loc) @ _whitener(cov)
        scores = que_scores(white, alpha, v.elementwise)
        flags = np.zeros(n, dtype=bool)
        flags[np.argsort(-scores, kind="stable")[:n_flag]] = True
        kept = z[~flags] if (~flags).sum() > 1 else z
        white_all = (z - kept.mean(0)) @ _whitener(np.atleast_2d(np.cov(kept.T, bias=True)))
        m, sigma = que_matrix(white_all, alpha, v.elementwise)
        quality = que_quality(sigma, m, v.elementwise)
        if best is None or quality > best[3]:
            best = (k, scores, flags, quality)
    k, scores, flags, quality = best
    return scores, flags, {"k": int(k), "eps": int(eps), "quality": quality, "pca_dims": int(dims)}


def spectre(features, labels, percentile: float = 0.01, alpha: float = 4.0, pca_dims: int = 64,
            ks=DEFAULT_KS, seed: int = 0, variant: str | SpectreVariant = "backdoorbench") -> SpectreResult:
    """SPECTRE over every class, ε per class by :func:`class_budget`."""
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    x = as_numpy(features, dtype=None)  # upcast per class: N x d can be large
    y = np.asarray(labels)
    out = SpectreResult(np.zeros(len(x)), np.zeros(len(x), dtype=bool))
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 3:
            continue
        eps = class_budget(percentile, len(x), len(idx), v.small_class_cap)
        scores, flags, facts = spectre_class(x[idx].astype(np.float64), eps, alpha, pca_dims, ks, seed, v)
        out.scores[idx] = scores
        out.flagged[idx] = flags
        out.per_class[int(c)] = facts
    return out


# --------------------------------------------------------------------------- the detector


@dataclass
class SpectreConfig(FeatureConfig):
    percentile: float = option(0.01, "ε = percentile x N poisoned samples assumed per class, capped per --variant "
                                     "(BackdoorBench's value)", above=0, high=1)
    alpha: float = option(4.0, "QUE temperature α", above=0)
    pca_dims: int = option(64, "principal components kept before the search over k", low=1)
    ks: list[int] = option(list(DEFAULT_KS), "candidate numbers of components k", low=1)
    variant: str = option("backdoorbench", "backdoorbench: BackdoorBench's SPECTRE (element-wise exp and trace, "
                                           "scores centred at the class mean, ε <= 0.1 n below 500 samples); paper: "
                                           "matrix exponential and product, robust centre, ε <= n / 3 "
                                           "(docs/detection.md)", choices=tuple(VARIANTS))


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
                          tuple(cfg.ks), cfg.random_seed, cfg.variant)
        strongest = max(res.per_class, key=lambda c: res.per_class[c]["quality"]) if res.per_class else None
        return DetectionResult(res.scores, res.flagged, target=str(strongest), notes={
            "variant": cfg.variant, "feature_point": point, "feature_dim": int(feats.shape[1]),
            "per_class": res.per_class,
            "target": "the class whose chosen k leaves the largest QUE quality",
            "rule": "per class, the top 1.5 ε QUE scores at the chosen k"})
