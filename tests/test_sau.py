"""SAU: JS divergence, PGD masks and objective, the shared unlearning term on hand-made logits,
the perturbation's bounds, and an end-to-end run on the digits record."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from burnkit.defenses.sau import (SAU, SAUConfig, js_divergence, pgd_masks, pgd_objective, shared_pgd,
                                  shared_unlearning_term)
from burnkit.errors import BurnError

from defense_checks import check_defense_result, check_index_file


def test_js_divergence_by_hand():
    big = 50.0
    p = torch.tensor([[big, 0.0], [1.0, 2.0], [0.0, 0.0]])
    q = torch.tensor([[0.0, big], [1.0, 2.0], [3.0, 0.0]])
    js = js_divergence(p, q)
    assert float(js[0]) == pytest.approx(math.log(2), abs=1e-6)  # disjoint one-hots
    assert float(js[1]) == pytest.approx(0.0, abs=1e-7)  # identical
    pp, qq = torch.tensor([0.5, 0.5]), F.softmax(q[2], 0)
    m = (pp + qq) / 2
    expected = 0.5 * (pp * (pp / m).log()).sum() + 0.5 * (qq * (qq / m).log()).sum()
    assert float(js[2]) == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(js, js_divergence(q, p))  # symmetric


def test_pgd_masks_and_objective_by_hand():
    labels = torch.tensor([0, 0, 0, 1])
    clean_pred = torch.tensor([0, 0, 0, 1])
    clean_pred_ref = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 2, 1])  # sample 1, 2 flipped for the model
    pred_ref = torch.tensor([0, 2, 2, 0])  # samples 1-3 flipped for the reference
    masks = pgd_masks(pred, pred_ref, clean_pred, clean_pred_ref, labels)
    assert masks.model_unflipped.tolist() == [True, False, False, True]
    assert masks.ref_unflipped.tolist() == [True, False, False, False]
    assert masks.shared.tolist() == [False, True, True, False]  # same wrong class for both

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    logits_ref = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    ce = F.cross_entropy(logits, labels, reduction="none")
    ce_ref = F.cross_entropy(logits_ref, labels, reduction="none")
    js = js_divergence(logits, logits_ref)
    l_adv = -(ce[0] + ce[3] + ce_ref[0]) / 4
    l_share = (js[0] + js[3]) / 4
    got = pgd_objective(logits, logits_ref, labels, masks, beta_1=0.01, beta_2=1.0)
    assert float(got) == pytest.approx(float(0.01 * l_adv + l_share), rel=1e-6)


def test_shared_unlearning_term_by_hand():
    # p(class 1) = 0.5 for sample 0 -> -log(0.5); sample 1 is not fooled; sample 2 has p ~ 1,
    # clamped at 0.999 -> -log(0.001). Averaged over the batch of 3.
    logits = torch.tensor([[0.0, 0.0], [5.0, 0.0], [-40.0, 40.0]])
    ref_pred = torch.tensor([1, 1, 1])
    fooled = torch.tensor([True, False, True])
    got = shared_unlearning_term(logits, ref_pred, fooled)
    assert float(got) == pytest.approx((math.log(2) - math.log(0.001)) / 3, rel=1e-4)


class _Tiny(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_shared_pgd_stays_in_the_box_and_starts_at_max():
    x = torch.rand(6, 3, 2, 2)
    x[0] = 0.95  # near the top: +0.2 is clipped to 1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model, ref = _Tiny(0), _Tiny(1)
    start = shared_pgd(model, ref, x, y, SAUConfig(adv_steps=0))
    torch.testing.assert_close(start, (x + 0.2).clamp(max=1.0) - x)
    delta = shared_pgd(model, ref, x, y, SAUConfig(adv_steps=5, adv_lr=0.05))
    assert delta.abs().max() <= 0.2 + 1e-6
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert not torch.equal(delta, start)
    assert all(p.grad is None for p in model.parameters())  # PGD does not touch the weights


def test_sau_end_to_end_on_digits(digits_copy):
    result = SAU.main(["--result_file", "badnet_digits", "--n_rounds", "2", "--ratio", "0.2", "--lr", "0.001",
                       "--progress", "false"])
    out = digits_copy / "record" / "badnet_digits" / "defense" / "sau"
    frame = pd.read_csv(out / "sau_df.csv", index_col=0)
    assert list(frame["epoch"]) == [0, 1]
    assert {"clean_test_loss_avg_over_batch", "bd_test_loss_avg_over_batch", "ra_test_loss_avg_over_batch",
            "test_acc", "test_asr", "test_ra"} <= set(frame.columns)
    assert (out / "sau_df_summary.csv").is_file()
    check_index_file(out / "log" / "index.txt", expected_len=int(1438 * 0.2))
    check_defense_result(out / "defense_result.pt", "smallcnn", 10)
    assert result["before"].asr > 0.9
    assert frame["test_asr"].min() < 0.9  # unlearning the shared adversarial examples hits the backdoor


def test_sau_rejects_unknown_options():
    with pytest.raises(BurnError, match="pgd_init"):
        SAU.parse(["--pgd_init", "middle"])
    with pytest.raises(BurnError, match="norm_type"):
        SAU.parse(["--norm_type", "L2"])


def test_bare_train_mode_flag_switches_it_on():
    # BackdoorBench's --train_mode is a store_true flag: given without a value it means true.
    assert SAU.parse(["--train_mode", "--n_rounds", "3"])[0].train_mode is True
    assert SAU.parse([])[0].train_mode is False
