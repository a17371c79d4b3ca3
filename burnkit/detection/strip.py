"""STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019,
https://arxiv.org/abs/1902.06531).

Each inspected image is superimposed on ``N`` clean images (``x + α x_clean``, α = 1; the authors'
OpenCV addition saturates at 255, so the sum is clipped to valid pixels - BackdoorBench leaves it
unclipped); the mean Shannon entropy (bits) of the model's predictions over the N blends is low for
a trigger-carrying input, whose trigger keeps winning whatever it is blended with.

Decision: flag entropies below the ``frr`` quantile of the clean reserve's own entropies (each
clean image blended with the other reserve images); the per-sample score is ``-entropy``, so
higher means more suspicious (BackdoorBench computes its AUC with the entropy as the positive
score, which inverts it: spec §12).
"""
from __future__ import annotations

import numpy as np
import torch

from ..engine import eval_mode


@torch.no_grad()
def strip_entropy(model, images: torch.Tensor, overlays: torch.Tensor, device: torch.device, alpha: float = 1.0,
                  clip: bool = True, batch_size: int = 1024, self_overlay: np.ndarray | None = None,
                  amp: bool = False, progress=None) -> np.ndarray:
    """Mean prediction entropy (bits) of every image over its blends with ``overlays``.

    Args:
        model: takes float images in [0, 1] (a ``burnkit.models.Classifier``).
        images, overlays: uint8 N x C x H x W and O x C x H x W.
        batch_size: blended images per forward pass.
        self_overlay: per image, the position of the overlay that is the image itself (-1: none);
            that blend is left out of its mean.
        progress: optional callable receiving the number of images done.
    """
    model.to(device)
    n, o = len(images), len(overlays)
    if o == 0:
        raise ValueError("STRIP needs at least one overlay image")
    over = overlays.to(device).float().div_(255).unsqueeze(0)
    per_block = max(1, batch_size // o)
    out = np.zeros(n)
    with eval_mode(model):
        for start in range(0, n, per_block):
            block = images[start:start + per_block].to(device).float().div_(255).unsqueeze(1)
            blended = block + alpha * over
            if clip:
                blended = blended.clamp_(0.0, 1.0)
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
    """The ``frr`` quantile of the clean entropies: clean inputs below it are false rejections."""
    return float(np.quantile(clean_entropy, frr))
