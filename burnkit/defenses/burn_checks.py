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
                     augment=None, seed: int = 0, step=None) -> dict:
    """Fine-tune a copy of ``model`` on half of ``far_pos`` (relabelled with ``relabel``) and report
    the share of the other half (``leave_far``) and of ``near_pos`` (``leave_near``) that no longer
    predict ``suspect``; ``model`` itself is not changed.

    The halves are a seeded split of ``far_pos``, so the probe is reproducible. ``train_cfg`` should be
    Phase 1's fine-tuning, so the probe tries what Phase 1 would do; ``step`` is the engine's step
    function (burn.frozen_bn_step keeps BatchNorm's running statistics, which a few steps on a handful
    of samples otherwise move enough to change most predictions by themselves)."""
    order = far_pos[torch.randperm(len(far_pos), generator=torch.Generator().manual_seed(seed))]
    tuned_on, held_out = order[: len(order) // 2], order[len(order) // 2:]
    probe = copy.deepcopy(model)
    tune = train.subset(tuned_on).with_labels(relabel[tuned_on])
    if len(tune) >= 2:
        fit(probe, tune, dataclasses.replace(train_cfg, drop_last=len(tune) % train_cfg.batch_size == 1), device=device,
            augment=augment, seed=seed, progress=False, step=step)
    leave = {}
    for name, pos in (("far", held_out), ("near", near_pos)):
        preds = predict(probe, train.subset(pos), device).argmax(1) if len(pos) else torch.empty(0, dtype=torch.long)
        leave[name] = float((preds != suspect).double().mean()) if len(pos) else None
    return {"leave_far": leave["far"], "leave_near": leave["near"], "n_tuned": len(tuned_on),
            "n_far_held_out": len(held_out), "n_near": len(near_pos)}


# --------------------------------------------------------------------------- the premise test


def premise_test(l2: torch.Tensor, crossed: torch.Tensor, labels: torch.Tensor, num_classes: int, share: float,
                 min_enrichment: float, max_adv_share: float = 1.0, min_inflation: float | None = None) -> dict:
    """Which class, if any, is the suspected target: BURN's premise tested before Phase 1.

    Every class whose label is at least ``min_enrichment`` times as frequent among the farthest
    ``share`` of samples as in the whole set is a candidate, most enriched first; the first whose
    farthest samples do not cross to one class more than ``max_adv_share`` of the time is the
    suspected target (poison crosses back to the many classes it came from; an easy class to one
    neighbour). Testing every enriched class, not only the top one, lets a target that piles up
    behind an easy class still be found. ``class`` is None when none qualifies; ``reason`` says why.

    ``min_inflation``: when exactly one class's label is carried by at least this many times as many
    samples as the median class (``label_inflation``), that class is the only candidate. All-to-one
    dirty-label poison relabels its images to the target, so on a class-balanced training set the
    target's label count stands out (about 2x at a 10 % poison rate); an easy class that lies far from
    the boundary does not. On the calibration corpus this told the target apart where the farthest
    samples did not (BPP, seed 2: an easy class 3.9x enriched, crossing to many classes). On a
    naturally imbalanced set several classes stand out, or none, and the rule does not apply.

    The returned dict keeps the top candidate's numbers under the keys reports have always used
    (``candidate``, ``enrichment``, ``share_in_top``, ``share_overall``, ``n_top``, ``adv_label``,
    ``adv_share``) and every tested class under ``tested``."""
    rows = class_signatures(l2, crossed, labels, num_classes, share)
    n_top = int(farthest_mask(l2, share).sum())
    inflated = [r for r in rows if min_inflation is not None and r["label_inflation"] >= min_inflation]
    candidates = inflated if len(inflated) == 1 else rows  # one class stands out: the poison's label
    enriched = [r for r in candidates if r["enrichment"] >= min_enrichment]
    chosen = next((r for r in enriched if r["max_share"] is not None and r["max_share"] <= max_adv_share), None)
    shown = chosen or candidates[0]
    out = {"class": chosen["class"] if chosen else None, "candidate": shown["class"],
           "enrichment": shown["enrichment"], "share_in_top": shown["n_far"] / n_top,
           "share_overall": shown["label_share"], "n_top": n_top,
           "adv_label": shown["max_share_class"], "adv_share": shown["max_share"],
           "tested": [{k: r[k] for k in ("class", "enrichment", "max_share", "max_share_class", "entropy")}
                      for r in enriched]}
    out["inflated"] = inflated[0]["class"] if len(inflated) == 1 else None
    if chosen:
        out["reason"] = None
    elif len(inflated) == 1 and not enriched:
        top = inflated[0]
        out["reason"] = (f"class {top['class']}'s label is carried by {top['label_inflation']:.2f}x as many training "
                         f"samples as the median class - the mark of all-to-one poison relabelled to it - but it is "
                         f"only {top['enrichment']:.2f}x as frequent among the farthest {n_top} samples by boundary "
                         f"distance (needed: {min_enrichment:g}x): the poison is not far from the boundary, so "
                         "relabelling the farthest samples would fine-tune clean images onto wrong labels")
    else:
        out["reason"] = _premise_reason(candidates[0], enriched, n_top, min_enrichment, max_adv_share)
    return out


def _premise_reason(top: dict, enriched: list[dict], n_top: int, min_enrichment: float, max_adv_share: float) -> str:
    if not enriched:
        return (f"the farthest {n_top} samples by boundary distance carry no label above {min_enrichment:g}x its "
                f"overall share (largest: class {top['class']}, {top['enrichment']:.2f}x): the poison is not far from "
                "the boundary, so relabelling the farthest samples would fine-tune clean images onto wrong labels")
    listed = "; ".join(f"class {r['class']} ({r['enrichment']:.2f}x): {100 * (r['max_share'] or 0):.0f}% cross to "
                       f"class {r['max_share_class']}" for r in enriched)
    return (f"every class piling up among the farthest {n_top} samples crosses the boundary mostly towards one class "
            f"(limit {100 * max_adv_share:.0f}%; {listed}): easy classes, not poison that crosses back to the classes "
            "it came from, so the farthest samples are not the poison")


# --------------------------------------------------------------------------- checks after each fine-tuning


def touched_mask(n: int, poison_sets: list, clean_sets: list) -> torch.Tensor:
    """Samples that any fine-tuning so far trained on (D_poison or D_clean of some iteration)."""
    mask = torch.zeros(n, dtype=torch.bool)
    for positions in (*poison_sets, *clean_sets):
        mask[positions] = True
    return mask


def training_signals(preds0: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor, target: int | None,
                     untouched: torch.Tensor | None = None) -> dict:
    """What the fine-tunings did to the training set, against θ0 (no test data, no flags).

    ``retention``: the share of θ0's correct predictions, on samples no fine-tuning trained on and θ0
    does not predict as the suspected target, that the model still gets right (poison carries the
    target label, so these are clean samples θ0 fits; samples it trained on would flatter it);
    ``target_share``: the share of all training samples predicted as the suspected target;
    ``target_left``: the share of the untouched samples that carry the target's label and that θ0
    predicts as the target which the model no longer does - the poison among them leaving the
    target is the backdoor being unlearnt, so a fall of this share is the backdoor coming back."""
    untouched = torch.ones(len(labels), dtype=torch.bool) if untouched is None else untouched
    reference = (preds0 == labels) & untouched
    out = {"retention": None, "target_share": None, "target_left": None}
    if target is not None:
        reference &= preds0 != target
        out["target_share"] = _share(preds == target)
        backdoored = untouched & (labels == target) & (preds0 == target)
        out["target_left"] = _share(preds[backdoored] != target) if bool(backdoored.any()) else None
    out["retention"] = _share(preds[reference] == labels[reference]) if bool(reference.any()) else None
    return out


def _share(mask: torch.Tensor) -> float:
    """An exact ratio (k / n as Python floats), so reports show the number as computed."""
    return int(mask.sum()) / max(len(mask), 1)


def training_failure(signals: dict, signals0: dict, collapse_retention_drop: float, max_target_rise: float) -> str | None:
    """Why a fine-tuning failed, from :func:`training_signals` (``signals0``: θ0's own), or None.

    A collapse loses θ0's correct predictions on samples no fine-tuning touched; a fine-tuning that
    teaches the backdoor's label predicts more samples as the target than θ0 did. (A drift to clean
    samples, which lets the backdoor come back, needs no stop: BURN returns the model that moved the
    most target-labelled samples off the target - see ``keep`` in burnkit/defenses/burn.py.)"""
    if signals["retention"] is not None and signals0["retention"] - signals["retention"] > collapse_retention_drop:
        return (f"the fine-tunings lost {100 * (signals0['retention'] - signals['retention']):.1f}% of θ0's correct "
                f"predictions on the training samples they did not train on (limit "
                f"{100 * collapse_retention_drop:.1f}%): a collapse, not unlearning")
    if signals["target_share"] is not None and signals["target_share"] - signals0["target_share"] > max_target_rise:
        return (f"the share of training samples predicted as the suspected target rose from "
                f"{100 * signals0['target_share']:.1f}% to {100 * signals['target_share']:.1f}% "
                f"(limit +{100 * max_target_rise:.1f} points): the fine-tuning teaches the backdoor's label")
    return None
