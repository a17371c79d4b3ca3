"""One metric code for every poison detector: threshold-free ranking measures from a per-sample score,
and BackdoorBench's confusion counts from a detector's own flags.

Convention: a higher score means "more likely poisoned" for every method (a detector whose statistic
points the other way - STRIP's entropy, ABL's loss - negates it before it gets here), and positives
are the samples the record marks as poisoned (BackdoorBench's ``poison_indicator``).

* ``auroc``: area under the ROC curve (scikit-learn; tied scores count half).
* ``tpr_at_fpr(x)``: the largest true-positive rate among the ROC's operating points whose
  false-positive rate is <= x (no interpolation between points; a tie group enters whole).
* ``precision_at_poison_rate``: precision when the k = #poisoned highest scores are flagged, i.e.
  the flag budget a defender who knew the poisoning rate would spend; equal to the recall at that
  budget. A tie group straddling rank k contributes its poison share (the expectation under
  random tie-breaking), so the value does not depend on the order of the samples.
* From flags (``confusion``): BackdoorBench's TN/FP/FN/TP, TPR = TP/(TP+FN), FPR = FP/(FP+TN) and
  its ``weight_F_score``: F1 with precision TP/(TP+FP) and recall TP/(TP+9·FN) (spec §12).
"""
from __future__ import annotations

import numpy as np

FPR_POINTS = (0.01, 0.05)


def _arrays(scores, is_poison) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(is_poison).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores for {len(y)} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (a detector must map undefined values to a number)")
    return s, y


def _both_classes(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < len(y)


def auroc(scores, is_poison) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    s, y = _arrays(scores, is_poison)
    return float(roc_auc_score(y.astype(int), s)) if _both_classes(y) else float("nan")


def roc_points(scores, is_poison) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of every distinct threshold, starting at (0, 0)."""
    from sklearn.metrics import roc_curve

    s, y = _arrays(scores, is_poison)
    fpr, tpr, _ = roc_curve(y.astype(int), s, drop_intermediate=False)
    return fpr, tpr


def tpr_at_fpr(scores, is_poison, max_fpr: float) -> float:
    """Largest TPR among the ROC points with FPR <= ``max_fpr``."""
    s, y = _arrays(scores, is_poison)
    if not _both_classes(y):
        return float("nan")
    fpr, tpr = roc_points(s, y)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def precision_at_k(scores, is_poison, k: int) -> float:
    """Precision of the ``k`` highest scores, ties at the cut counted by their poison share."""
    s, y = _arrays(scores, is_poison)
    if k <= 0:
        return float("nan")
    k = min(k, len(s))
    cut = np.sort(s)[::-1][k - 1]
    above = s > cut
    tied = s == cut
    taken_from_ties = k - int(above.sum())
    hits = float(y[above].sum()) + taken_from_ties * float(y[tied].mean())
    return hits / k


def precision_at_poison_rate(scores, is_poison) -> float:
    s, y = _arrays(scores, is_poison)
    return precision_at_k(s, y, int(y.sum())) if _both_classes(y) else float("nan")


def ranking_metrics(scores, is_poison) -> dict:
    """The threshold-free measures every detector is compared on."""
    s, y = _arrays(scores, is_poison)
    out = {"auroc": auroc(s, y)}
    for x in FPR_POINTS:
        out[f"tpr_at_{round(100 * x)}fpr"] = tpr_at_fpr(s, y, x)
    out["precision_at_poison_rate"] = precision_at_poison_rate(s, y)
    return out


def confusion(flagged, is_poison) -> dict:
    """BackdoorBench's counts and rates from a detector's own decisions (positive = poisoned)."""
    f = np.asarray(flagged).astype(bool).reshape(-1)
    y = np.asarray(is_poison).astype(bool).reshape(-1)
    if f.shape != y.shape:
        raise ValueError(f"{len(f)} flags for {len(y)} labels")
    tp = int((f & y).sum())
    fp = int((f & ~y).sum())
    fn = int((~f & y).sum())
    tn = int((~f & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    weighted_recall = tp / (tp + 9 * fn) if tp + 9 * fn else 0.0
    weighted_f = (2 * precision * weighted_recall / (precision + weighted_recall)
                  if precision + weighted_recall else 0.0)
    return {"TN": tn, "FP": fp, "FN": fn, "TP": tp,
            "TPR": tp / (tp + fn) if tp + fn else 0.0, "FPR": fp / (fp + tn) if fp + tn else 0.0,
            "precision": precision, "weight_F_score": weighted_f, "flagged": int(f.sum())}


def detection_metrics(scores, is_poison, flagged=None) -> dict:
    """Ranking measures, plus the confusion counts when the detector's flags are given."""
    out = ranking_metrics(scores, is_poison)
    if flagged is not None:
        out.update(confusion(flagged, is_poison))
    return out
