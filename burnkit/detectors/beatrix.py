"""Beatrix (Ma et al., "The Beatrix Resurrections: Robust Backdoor Detection via Gram Matrices",
NDSS 2023, https://arxiv.org/abs/2209.11715).

A feature map F (C x HW) is summarised by its Gram matrices of order p = 1..8, upper triangle:

* ``backdoorbench`` (``--variant``, the default): ``G_p = sign(F F^T) |F F^T|^(1/p)``, as BackdoorBench's
  ``Feature_Correlations.G_p`` computes it: the order only changes the root taken of one Gram matrix;
* ``paper``: ``G_p = sign(F^p F^pT) |F^p F^pT|^(1/p)``, the paper's p-th order Gram matrix of the
  features raised element-wise to the power p (higher orders weigh the strong activations).

The two are equal for p = 1. For every class, the clean samples give
each Gram entry a median and a median absolute deviation (MAD); a sample's deviation is its summed
relative excess outside ``median ± 10 MAD``, ``relu(lo - g) / |lo| + relu(g - hi) / |hi|``, averaged
over entries and orders. Poisoned inputs carry feature correlations that clean inputs of their
(predicted) class never show.

Decision per class: flag deviations above the 95th percentile of the clean deviations measured
5-fold (statistics fitted on four fifths of the class's clean samples, deviations of the fifth),
the authors' threshold. The per-sample score is the deviation itself.

Grouping: inspected samples by the class the model predicts (the input-level view Beatrix takes);
the clean reserve by its known label (the class-balanced reserve then always has every class; a
grouping by prediction could leave a class without statistics).

``detection_pretrain/beatrix.py`` runs it on a record's poisoned training set with a clean reserve
(BackdoorBench folder ``detection/beatrix_pretrain/``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import option
from ..detector import DetectionResult, FeatureConfig, FeatureDetector, register_detector
from ..feature_points import extract


POWERS = tuple(range(1, 9))
VARIANTS = ("backdoorbench", "paper")


def gram_features(maps: torch.Tensor, powers=POWERS, raise_features: bool = False) -> torch.Tensor:
    """(N, P, E): for each order p the upper triangle of ``sign(G) |G|^(1/p)``, ``G = F F^T``
    (BackdoorBench) or, with ``raise_features`` (the paper), ``G = F^p F^pT``. ``maps`` is
    N x C x H x W (or N x C, a 1 x 1 map). E = C (C + 1) / 2 entries per order, so callers score
    large sets in chunks."""
    f = maps.double().flatten(2) if maps.dim() > 2 else maps.double().unsqueeze(2)
    c = f.shape[1]
    rows, cols = torch.triu_indices(c, c)
    out = []
    for p in powers:
        fp = f ** p if raise_features else f
        g = torch.bmm(fp, fp.transpose(1, 2))[:, rows, cols]
        out.append((g.sign() * g.abs() ** (1.0 / p)).float())  # computed in float64, kept in float32
    return torch.stack(out, 1)


@dataclass
class GramStatistics:
    """Per-entry bounds ``median ± k MAD`` of clean Gram features (P x E each)."""

    low: torch.Tensor
    high: torch.Tensor

    @classmethod
    def fit(cls, grams: torch.Tensor, mad_k: float = 10.0) -> "GramStatistics":
        med = grams.median(0).values
        mad = (grams - med).abs().median(0).values
        return cls(med - mad_k * mad, med + mad_k * mad)

    def deviation(self, grams: torch.Tensor) -> torch.Tensor:
        """(N,) mean relative excess outside the bounds, over entries and orders."""
        below = torch.relu(self.low - grams) / (self.low.abs() + 1e-6)
        above = torch.relu(grams - self.high) / (self.high.abs() + 1e-6)
        return (below + above).flatten(1).mean(1)


def clean_threshold(grams: torch.Tensor, folds: int = 5, quantile: float = 0.95, mad_k: float = 10.0) -> float:
    """The ``quantile`` of held-out clean deviations over ``folds`` folds (the authors' rule:
    the sorted value at position ``int(n * quantile)``)."""
    n = len(grams)
    if n < 2:
        return float("inf")
    folds = min(folds, n)
    parts = np.array_split(np.arange(n), folds)
    devs = []
    for part in parts:
        rest = np.setdiff1d(np.arange(n), part)
        devs.append(GramStatistics.fit(grams[rest], mad_k).deviation(grams[part]))
    ordered = torch.sort(torch.cat(devs)).values
    return float(ordered[min(len(ordered) - 1, int(len(ordered) * quantile))])


@dataclass
class BeatrixModel:
    """Per-class statistics and thresholds fitted on clean Gram features."""

    stats: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, clean_grams: torch.Tensor, clean_labels, folds: int = 5, quantile: float = 0.95,
            mad_k: float = 10.0) -> "BeatrixModel":
        labels = np.asarray(clean_labels)
        model = cls()
        for c in np.unique(labels):
            grams = clean_grams[torch.as_tensor(labels == c)]
            model.stats[int(c)] = GramStatistics.fit(grams, mad_k)
            model.thresholds[int(c)] = clean_threshold(grams, folds, quantile, mad_k)
        return model

    def score(self, grams: torch.Tensor, groups) -> tuple[np.ndarray, np.ndarray]:
        """Deviations and flags of samples grouped by ``groups`` (predicted classes). A group the
        clean reserve has no statistics for is scored against the pooled statistics of all classes
        with the largest threshold."""
        groups = np.asarray(groups)
        dev = np.zeros(len(groups))
        flags = np.zeros(len(groups), dtype=bool)
        for g in np.unique(groups):
            mask = groups == g
            stats = self.stats.get(int(g))
            threshold = self.thresholds.get(int(g), max(self.thresholds.values(), default=float("inf")))
            if stats is None:
                stats = GramStatistics(torch.stack([s.low for s in self.stats.values()]).min(0).values,
                                       torch.stack([s.high for s in self.stats.values()]).max(0).values)
            d = stats.deviation(grams[torch.as_tensor(mask)]).numpy()
            dev[mask] = d
            flags[mask] = d > threshold
        return dev, flags


# --------------------------------------------------------------------------- the detector


GRAM_BYTES = 256 * 2**20  # Gram features held at once while scoring


@dataclass
class BeatrixConfig(FeatureConfig):
    powers: list[int] = option(list(POWERS), "orders p of the Gram matrices", low=1)
    mad_k: float = option(10.0, "bounds median ± k MAD per Gram entry", above=0)
    quantile: float = option(0.95, "threshold: this quantile of the 5-fold clean deviations", above=0, high=1)
    folds: int = option(5, "folds of the clean reserve for the threshold", low=2)
    variant: str = option("backdoorbench", "backdoorbench: Gram matrices of the features as they are, rooted per "
                                           "order (BackdoorBench); paper: of the features raised to the power p "
                                           "(docs/detection.md)", choices=VARIANTS)


@register_detector
class Beatrix(FeatureDetector):
    """Beatrix: Gram-matrix deviations from clean statistics, per predicted class."""

    name = "beatrix"
    config_cls = BeatrixConfig
    header = ("target",)
    needs_clean = True

    def detect(self, model, data, cfg, run):
        point = self.feature_point(model, data.record, cfg)
        powers = tuple(cfg.powers)

        def grams(maps):
            return gram_features(maps, powers, raise_features=cfg.variant == "paper")

        with run.timed("clean_statistics"):
            clean, _ = extract(model, data.clean, point, run.device, cfg.batch_size, grams, cfg.amp)
            fitted = BeatrixModel.fit(clean, data.clean.labels.numpy(), cfg.folds, cfg.quantile, cfg.mad_k)
        n = len(data.inspected)
        chunk = max(1, GRAM_BYTES // max(1, clean[0].numel() * 4))
        scores, flags, preds = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
        with run.timed("scores"), tqdm(total=n, desc="beatrix", disable=not cfg.progress, leave=False) as bar:
            for start in range(0, n, chunk):
                part = data.inspected.subset(torch.arange(start, min(n, start + chunk)))
                g, logits = extract(model, part, point, run.device, cfg.batch_size, grams, cfg.amp)
                pred = logits.argmax(1).numpy()
                scores[start:start + len(part)], flags[start:start + len(part)] = fitted.score(g, pred)
                preds[start:start + len(part)] = pred
                bar.update(len(part))
        share = {int(c): float(flags[preds == c].mean()) for c in np.unique(preds)}
        return DetectionResult(scores, flags, target="Unknown", notes={
            "variant": cfg.variant, "feature_point": point, "powers": list(powers), "thresholds": fitted.thresholds,
            "flagged_share_by_predicted_class": share,
            "grouping": "inspected samples by predicted class, clean reserve by label",
            "rule": f"deviation > the {cfg.quantile} quantile of {cfg.folds}-fold clean deviations of the class"})
