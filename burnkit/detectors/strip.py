"""``detection_pretrain/strip.py``: STRIP on the poisoned training set with a clean reserve
(algorithm: :mod:`burnkit.detection.strip`; BackdoorBench folder ``detection/strip_pretrain/``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import option
from ..detection.strip import entropy_threshold, strip_entropy
from ..detector import DetectionResult, Detector, DetectorConfig, register_detector


@dataclass
class StripConfig(DetectorConfig):
    num_overlays: int = option(100, "clean images blended with every inspected image (N of the paper; at most "
                                    "the clean reserve)", low=1)
    alpha: float = option(1.0, "weight of the clean overlay: x + alpha x_clean", above=0)
    clip: bool = option(True, "clip blends to valid pixels (the authors' saturating addition); false: BackdoorBench")
    frr: float = option(0.1, "threshold: this quantile of the clean entropies (the false rejection rate)",
                        above=0, high=1)
    blend_batch_size: int = option(2048, "blended images per forward pass", low=1)


@register_detector
class Strip(Detector):
    """STRIP: prediction entropy under superimposition with clean images."""

    name = "strip"
    config_cls = StripConfig
    header = ("AUC", "target")
    needs_clean = True

    def detect(self, model, data, cfg, run):
        n_over = min(cfg.num_overlays, len(data.clean))
        rng = np.random.default_rng(cfg.random_seed)
        chosen = np.sort(rng.choice(len(data.clean), size=n_over, replace=False))
        overlays = data.clean.images[torch.as_tensor(chosen)]
        own = np.full(len(data.clean), -1)
        own[chosen] = np.arange(n_over)

        def entropies(images, what, self_overlay=None):
            with tqdm(total=len(images), desc=f"strip: {what}", disable=not cfg.progress, leave=False) as bar:
                return strip_entropy(model, images, overlays, run.device, cfg.alpha, cfg.clip, cfg.blend_batch_size,
                                     self_overlay, cfg.amp, bar.update)

        with run.timed("clean_entropy"):
            clean_h = entropies(data.clean.images, "clean reserve", own)
        threshold = entropy_threshold(clean_h, cfg.frr)
        with run.timed("inspected_entropy"):
            h = entropies(data.inspected.images, "inspected")
        return DetectionResult(-h, h < threshold, threshold=-threshold, target="None", notes={
            "overlays": int(n_over), "entropy_threshold_bits": threshold,
            "clean_entropy_mean_bits": float(clean_h.mean()), "score": "minus the mean entropy (bits)",
            "rule": f"entropy < the {cfg.frr} quantile of the clean reserve's entropies"})
