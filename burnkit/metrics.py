"""BackdoorBench's metrics (spec §3.6 and §4). All values are fractions in [0, 1].

* ACC: accuracy on the whole clean test split.
* ASR: on ``bd_test`` (poisoned test samples whose original label is not the target), the share
  predicted as their backdoor label.
* RA: on the same samples, the share predicted as their original label.
* DER = (max(0, ASR_bd - ASR_def) - max(0, ACC_bd - ACC_def) + 1) / 2 (BackdoorBench's simplified
  form; its other helper adds the accuracy drop, which contradicts the definition, spec §9.7).
* RIR = (max(0, RA_def - RA_bd) - max(0, ACC_bd - ACC_def) + 1) / 2.
"""
from __future__ import annotations

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Share of ``predictions == labels``; ``None`` on an empty set (BackdoorBench's ``all_acc``)."""
    if labels.numel() == 0:
        return None
    # counted in integers and divided in float64: 29/200 is written 0.145, not float32's 0.14499999582767487
    return int((predictions.cpu() == labels.cpu()).sum()) / labels.numel()


def attack_success_rate(predictions: torch.Tensor, bd_labels: torch.Tensor) -> float | None:
    return accuracy(predictions, bd_labels)


def robust_accuracy(predictions: torch.Tensor, original_labels: torch.Tensor) -> float | None:
    return accuracy(predictions, original_labels)


def defense_effectiveness_rate(acc_bd: float, asr_bd: float, acc_def: float, asr_def: float) -> float:
    return (max(0.0, asr_bd - asr_def) - max(0.0, acc_bd - acc_def) + 1.0) / 2.0


def robust_improvement_rate(acc_bd: float, ra_bd: float, acc_def: float, ra_def: float) -> float:
    return (max(0.0, ra_def - ra_bd) - max(0.0, acc_bd - acc_def) + 1.0) / 2.0


def auroc(scores, is_positive) -> float:
    """Area under the ROC curve (scikit-learn), positives = poisoned samples."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(torch.as_tensor(is_positive).cpu().numpy().astype(int),
                               torch.as_tensor(scores).cpu().double().numpy()))
