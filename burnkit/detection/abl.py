"""ABL's loss-based isolation (Li et al., "Anti-Backdoor Learning: Training Clean Models on Poisoned Data",
NeurIPS 2021, https://arxiv.org/abs/2110.11571), steps 1-2 of ``defense/abl.py`` (spec §11.1).

A fresh model is trained on the poisoned training set for a few epochs with a loss that stops the
descent once a sample's loss falls under a floor: the backdoor is learnt much faster than the clean
task, so after these epochs the poisoned samples are the ones with the lowest cross-entropy.

* ``lga`` (the paper's local gradient ascent): ``sign(CE - γ) · CE``;
* ``flooding`` (BackdoorBench's default): ``|CE - b| + b``;
both on the batch-mean CE, as BackdoorBench computes them.

The per-sample score is ``-CE`` of the isolation model (higher = more suspicious). The flags are the
``isolation_ratio`` share with the lowest CE (1 %, the paper's value; BackdoorBench's detector flags
exactly the true poisoning rate, an oracle: spec §12).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import StepOutput, predict

LOSS_GUARDS = ("lga", "flooding")


def guarded_step(kind: str, gamma: float):
    """An ``engine.fit`` step applying ABL's loss guard to the batch-mean cross-entropy."""
    if kind not in LOSS_GUARDS:
        raise ValueError(f"kind must be one of {LOSS_GUARDS}, got {kind!r}")

    def step(model, batch, optimizer, ctx) -> StepOutput:
        with ctx.autocast():
            logits = model(batch.x)
            ce = F.cross_entropy(logits, batch.y)
        loss = torch.sign(ce - gamma) * ce if kind == "lga" else (ce - gamma).abs() + gamma
        ctx.backward_step(loss, optimizer)
        return StepOutput(ce.detach(), logits.detach())

    return step


def per_sample_loss(model, images, device: torch.device, batch_size: int = 512, amp: bool = False) -> np.ndarray:
    """Cross-entropy of every sample against the label it carries (eval mode, no augmentation)."""
    logits = predict(model, images, device, batch_size, amp)
    return F.cross_entropy(logits, images.labels.cpu(), reduction="none").double().numpy()


def lowest_share(values: np.ndarray, share: float) -> np.ndarray:
    """Flags of the ``share`` of samples with the lowest values (at least one when share > 0)."""
    flags = np.zeros(len(values), dtype=bool)
    k = 0 if share <= 0 else min(len(values), max(1, int(round(share * len(values)))))
    flags[np.argsort(values, kind="stable")[:k]] = True
    return flags
