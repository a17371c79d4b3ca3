"""BURN's label-free checks: is the premise true on this record, and did a fine-tuning go wrong?

BURN (burnkit/defenses/burn.py) relabels the samples farthest from θ0's decision boundary. That
helps only if those samples are the poison; on a record where an easy class, not the poison, lies
farthest, it fine-tunes clean images onto wrong labels and can raise the ASR. Nothing here reads the
record's poison flags, original labels or test data: only θ0's boundary scan, the labels the training
set carries, and the models' predictions on the training set.

Signals of the premise (before Phase 1), per class ``c`` whose carried label piles up among the
farthest samples (all-to-one poison carries the target label):

* ``enrichment``: ``c``'s share among the farthest samples over its share of the whole set;
* the *crossing* of those samples: the classes the boundary attack takes them to. Poison crosses back
  to the classes its images came from (many); a naturally easy class crosses to its neighbours, in
  the same proportions as the rest of its class. ``max_share`` is the largest share of one class,
  ``tv_far_rest`` the total-variation distance between where ``c``'s farthest samples cross and where
  ``c``'s other samples cross;
* the unlearning probe (:func:`probe_unlearning`): fine-tune a copy of θ0, as Phase 1 would, on half of
  ``c``'s farthest samples relabelled with their adversarial labels, and see what it does to the other
  half and to ``c``'s samples near the boundary. Unlearning a trigger carries over to the other
  triggered samples and leaves clean images of ``c`` alone; relabelling an easy class's most typical
  images drags its other images along, the near ones first.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch

from ..data import ImageSet
from ..engine import TrainConfig, fit, predict


def farthest_mask(l2: torch.Tensor, share: float) -> torch.Tensor:
    """The ``share`` of samples with the largest boundary distance (at least one; ties by order)."""
    n_top = min(len(l2), max(1, int(round(share * len(l2)))))
    mask = torch.zeros(len(l2), dtype=torch.bool)
    mask[torch.argsort(l2, descending=True, stable=True)[:n_top]] = True
    return mask


def crossing(crossed: torch.Tensor, mask: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, int]:
    """Distribution of the classes the samples in ``mask`` crossed to (``-1``: not flipped, left out)."""
    values = crossed[mask]
    values = values[values >= 0]
    counts = torch.bincount(values, minlength=num_classes).double()
    return counts / counts.sum().clamp_min(1.0), len(values)


def class_signatures(l2: torch.Tensor, crossed: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     share: float) -> list[dict]:
    """Per class: enrichment among the farthest ``share`` and the crossing of its farthest samples
    (see the module docstring), sorted by enrichment, largest first."""
    far = farthest_mask(l2, share)
    n_far = int(far.sum())
    counts = torch.bincount(labels, minlength=num_classes).double()
    median_count = float(counts[counts > 0].median()) if bool((counts > 0).any()) else 1.0
    rows = []
    for c in range(num_classes):
        own = labels == c
        base = float(own.double().mean())
        p_far, n_cross_far = crossing(crossed, far & own, num_classes)
        p_rest, n_cross_rest = crossing(crossed, ~far & own, num_classes)
        nonzero = p_far[p_far > 0]
        rows.append({
            "class": c, "n_far": int((far & own).sum()), "label_share": base,
            "label_inflation": float(counts[c]) / median_count,
            "enrichment": float((far & own).sum()) / n_far / base if base > 0 else 0.0,
            "max_share": float(p_far.max()) if n_cross_far else None,
            "max_share_class": int(p_far.argmax()) if n_cross_far else None,
            "entropy": float(-(nonzero * nonzero.log()).sum() / math.log(num_classes - 1)) if n_cross_far else None,
            "tv_far_rest": float(0.5 * (p_far - p_rest).abs().sum()) if n_cross_far and n_cross_rest else None})
    return sorted(rows, key=lambda r: -r["enrichment"])


def probe_unlearning(model, train: ImageSet, far_pos: torch.Tensor, near_pos: torch.Tensor,
                     relabel: torch.Tensor, suspect: int, train_cfg: TrainConfig, device: torch.device,
                     augment=None, seed: int = 0) -> dict:
    """Fine-tune a copy of ``model`` on half of ``far_pos`` (relabelled with ``relabel``) and report
    the share of the other half (``leave_far``) and of ``near_pos`` (``leave_near``) that no longer
    predict ``suspect``; ``model`` itself is not changed.

    The halves are a seeded split of ``far_pos``, so the probe is reproducible. ``train_cfg`` should be
    Phase 1's fine-tuning, so the probe tries what Phase 1 would do."""
    order = far_pos[torch.randperm(len(far_pos), generator=torch.Generator().manual_seed(seed))]
    tuned_on, held_out = order[: len(order) // 2], order[len(order) // 2:]
    probe = copy.deepcopy(model)
    tune = train.subset(tuned_on).with_labels(relabel[tuned_on])
    if len(tune) >= 2:
        fit(probe, tune, dataclasses.replace(train_cfg, drop_last=len(tune) % train_cfg.batch_size == 1), device=device,
            augment=augment, seed=seed, progress=False)
    leave = {}
    for name, pos in (("far", held_out), ("near", near_pos)):
        preds = predict(probe, train.subset(pos), device).argmax(1) if len(pos) else torch.empty(0, dtype=torch.long)
        leave[name] = float((preds != suspect).double().mean()) if len(pos) else None
    return {"leave_far": leave["far"], "leave_near": leave["near"], "n_tuned": len(tuned_on),
            "n_far_held_out": len(held_out), "n_near": len(near_pos)}
