"""``detection_pretrain/beatrix.py``: Beatrix on the poisoned training set with a clean reserve
(algorithm: :mod:`burnkit.detection.beatrix`; BackdoorBench folder ``detection/beatrix_pretrain/``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import option
from ..detection.beatrix import POWERS, BeatrixModel, gram_features
from ..detection.features import extract
from ..detector import DetectionResult, FeatureConfig, FeatureDetector, register_detector

GRAM_BYTES = 256 * 2**20  # Gram features held at once while scoring


@dataclass
class BeatrixConfig(FeatureConfig):
    powers: list[int] = option(list(POWERS), "orders p of the Gram matrices", low=1)
    mad_k: float = option(10.0, "bounds median ± k MAD per Gram entry", above=0)
    quantile: float = option(0.95, "threshold: this quantile of the 5-fold clean deviations", above=0, high=1)
    folds: int = option(5, "folds of the clean reserve for the threshold", low=2)


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
            return gram_features(maps, powers)

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
            "feature_point": point, "powers": list(powers), "thresholds": fitted.thresholds,
            "flagged_share_by_predicted_class": share,
            "grouping": "inspected samples by predicted class, clean reserve by label",
            "rule": f"deviation > the {cfg.quantile} quantile of {cfg.folds}-fold clean deviations of the class"})
