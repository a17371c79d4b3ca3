"""STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019,
https://arxiv.org/abs/1902.06531).

Each inspected image is superimposed on ``N`` clean images; the mean Shannon entropy (bits) of the
model's predictions over the N blends is low for a trigger-carrying input, whose trigger keeps
winning whatever it is blended with. Two blends (``--blend``):

* ``backdoorbench`` (the default): BackdoorBench adds the two *normalised* tensors,
  ``norm(x) + α norm(x_clean)``; in pixel space that is ``x + α (x_clean - mean)`` (``mean`` the
  dataset's normalisation mean), not clipped. :func:`superimpose` computes it in pixel space and the
  classifier normalises it, so the network sees exactly BackdoorBench's sum.
* ``saturating``: ``clip(x + α x_clean, 0, 1)``, the authors' OpenCV addition, which saturates at 255.

Decision: flag entropies below the clean reserve's ``frr`` quantile, BackdoorBench's
``sorted(clean)[int(frr * n)]`` (each clean image blended with the other reserve images; BackdoorBench
also blends it with itself); the per-sample score is ``-entropy``, so higher means more suspicious
(BackdoorBench computes its AUC with the entropy as the positive score, which inverts it: spec §12).

``detection_pretrain/strip.py`` runs it on a record's poisoned training set with a clean reserve
(BackdoorBench folder ``detection/strip_pretrain/``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import option
from ..detector import DetectionResult, Detector, DetectorConfig, register_detector
from ..engine import eval_mode


BLENDS = ("backdoorbench", "saturating")


def superimpose(images: torch.Tensor, overlays: torch.Tensor, alpha: float, blend: str,
                mean: torch.Tensor | None = None) -> torch.Tensor:
    """Every image (B x C x H x W, [0, 1]) blended with every overlay (O x C x H x W): B x O x C x H x W.
    ``backdoorbench``: ``x + α (x_clean - mean)`` (the sum of the normalised tensors, in pixel space);
    ``saturating``: ``clip(x + α x_clean, 0, 1)``."""
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    x, over = images.unsqueeze(1), overlays.unsqueeze(0)
    if blend == "saturating":
        return (x + alpha * over).clamp_(0.0, 1.0)
    if mean is None:
        raise ValueError("the backdoorbench blend needs the normalisation mean")
    return x + alpha * (over - mean.view(1, 1, -1, 1, 1).to(over))


@torch.no_grad()
def strip_entropy(model, images: torch.Tensor, overlays: torch.Tensor, device: torch.device, alpha: float = 1.0,
                  blend: str = "backdoorbench", batch_size: int = 1024, self_overlay: np.ndarray | None = None,
                  amp: bool = False, progress=None, mean: torch.Tensor | None = None) -> np.ndarray:
    """Mean prediction entropy (bits) of every image over its blends with ``overlays``.

    Args:
        model: takes float images in [0, 1] (a ``burnkit.models.Classifier``).
        images, overlays: uint8 N x C x H x W and O x C x H x W.
        blend: see :func:`superimpose`; ``mean`` (default: ``model.mean``) is its normalisation mean.
        batch_size: blended images per forward pass.
        self_overlay: per image, the position of the overlay that is the image itself (-1: none);
            that blend is left out of its mean.
        progress: optional callable receiving the number of images done.
    """
    model.to(device)
    n, o = len(images), len(overlays)
    if o == 0:
        raise ValueError("STRIP needs at least one overlay image")
    mean = getattr(model, "mean", None) if mean is None else mean
    over = overlays.to(device).float().div_(255)
    per_block = max(1, batch_size // o)
    out = np.zeros(n)
    with eval_mode(model):
        for start in range(0, n, per_block):
            block = images[start:start + per_block].to(device).float().div_(255)
            blended = superimpose(block, over, alpha, blend, mean)
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                logits = model(blended.flatten(0, 1))
            logp = torch.log_softmax(logits.float(), 1)
            entropy = -(logp.exp() * logp).sum(1).view(len(block), o) / np.log(2.0)
            keep = torch.ones_like(entropy, dtype=torch.bool)
            if self_overlay is not None:
                own = torch.as_tensor(self_overlay[start:start + len(block)], device=device)
                rows = torch.nonzero(own >= 0).flatten()
                keep[rows, own[rows]] = False
            out[start:start + len(block)] = ((entropy * keep).sum(1) / keep.sum(1).clamp_min(1)).cpu().numpy()
            if progress is not None:
                progress(len(block))
    return out


def entropy_threshold(clean_entropy: np.ndarray, frr: float) -> float:
    """BackdoorBench's threshold, ``sorted(clean_entropy)[int(frr * n)]``: clean inputs below it are
    the false rejections, ``int(frr * n)`` of the ``n``."""
    ordered = np.sort(np.asarray(clean_entropy, dtype=np.float64))
    return float(ordered[min(len(ordered) - 1, int(frr * len(ordered)))])


# --------------------------------------------------------------------------- the detector


@dataclass
class StripConfig(DetectorConfig):
    num_overlays: int = option(100, "clean images blended with every inspected image (N of the paper; at most "
                                    "the clean reserve)", low=1)
    alpha: float = option(1.0, "weight of the clean overlay: x + alpha x_clean", above=0)
    blend: str = option("backdoorbench", "backdoorbench: the sum of the normalised tensors, x + alpha (x_clean - "
                                         "mean) in pixels, unclipped (BackdoorBench); saturating: clip(x + alpha "
                                         "x_clean), the authors' OpenCV addition", choices=BLENDS)
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
                return strip_entropy(model, images, overlays, run.device, cfg.alpha, cfg.blend, cfg.blend_batch_size,
                                     self_overlay, cfg.amp, bar.update)

        with run.timed("clean_entropy"):
            clean_h = entropies(data.clean.images, "clean reserve", own)
        threshold = entropy_threshold(clean_h, cfg.frr)
        with run.timed("inspected_entropy"):
            h = entropies(data.inspected.images, "inspected")
        return DetectionResult(-h, h < threshold, threshold=-threshold, target="None", notes={
            "blend": cfg.blend, "overlays": int(n_over), "entropy_threshold_bits": threshold,
            "clean_entropy_mean_bits": float(clean_h.mean()), "score": "minus the mean entropy (bits)",
            "rule": f"entropy < the {cfg.frr} quantile of the clean reserve's entropies"})
