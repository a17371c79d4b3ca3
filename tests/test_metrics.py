"""ACC / ASR / RA / DER / RIR exactly as spec §3.6 and §4, checked by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from burnkit.data import ImageSet
from burnkit.engine import EvalSuite, evaluate
from burnkit.metrics import (accuracy, attack_success_rate, auroc, defense_effectiveness_rate,
                             robust_accuracy, robust_improvement_rate)


def test_rates_by_hand():
    preds = torch.tensor([0, 0, 3, 2])
    assert accuracy(preds, torch.tensor([0, 1, 3, 3])) == 0.5
    assert attack_success_rate(preds, torch.tensor([0, 0, 0, 0])) == 0.5
    assert robust_accuracy(preds, torch.tensor([1, 2, 3, 2])) == 0.5
    assert accuracy(torch.tensor([]), torch.tensor([])) is None


def test_der_and_rir_by_hand():
    # ASR 0.95 -> 0.05 (gain 0.90), ACC 0.91 -> 0.89 (drop 0.02): (0.90 - 0.02 + 1) / 2 = 0.94
    assert defense_effectiveness_rate(0.91, 0.95, 0.89, 0.05) == pytest.approx(0.94)
    # an accuracy *gain* is not rewarded, an ASR increase is not penalised below 0
    assert defense_effectiveness_rate(0.80, 0.10, 0.90, 0.50) == pytest.approx(0.5)
    assert robust_improvement_rate(0.91, 0.05, 0.89, 0.85) == pytest.approx((0.80 - 0.02 + 1) / 2)


def test_auroc_perfect_and_inverted():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0


class _Lookup(nn.Module):
    """Predicts the class written in the first pixel (times 10), so metrics are known exactly."""

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 255 / 10).round().long()
        return torch.nn.functional.one_hot(cls, 10).float() * 5


def test_evaluate_acc_on_clean_and_asr_ra_on_bd_test():
    def make(first_pixels, labels, original):
        imgs = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
        imgs[:, 0, 0, 0] = torch.tensor(first_pixels) * 10
        return ImageSet(imgs, torch.tensor(labels), torch.tensor(original), torch.ones(len(labels), dtype=torch.bool),
                        torch.arange(len(labels)))

    clean = make([1, 2, 3, 4], [1, 2, 0, 0], [1, 2, 0, 0])  # 2 of 4 right
    bd = make([0, 0, 5, 6, 7], [0, 0, 0, 0, 0], [1, 2, 5, 9, 9])  # ASR 2/5, RA 1/5
    metrics = evaluate(_Lookup(), EvalSuite(clean, bd), torch.device("cpu"))
    assert metrics.acc == 0.5 and metrics.asr == pytest.approx(0.4) and metrics.ra == pytest.approx(0.2)
    row = metrics.row()
    assert list(row) == ["clean_test_loss_avg_over_batch", "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra"]
