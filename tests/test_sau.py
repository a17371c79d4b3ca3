"""SAU: JS divergence, PGD masks and objective, the shared unlearning term on hand-made logits,
the perturbation's bounds, and an end-to-end run on the digits record."""
from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from burnkit.defenses.sau import (SAU, SAUConfig, js_divergence, make_sau_step, pgd_masks, pgd_objective,
                                  shared_pgd, shared_unlearning_term)
from burnkit.engine import StepContext
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
    labels = torch.tensor([0, 0, 0, 1, 2])
    clean_pred = torch.tensor([0, 0, 0, 1, 2])
    clean_pred_ref = torch.tensor([0, 0, 2, 1, 1])
    pred = torch.tensor([0, 2, 2, 1, 1])  # samples 1, 2, 4 flipped for the model
    pred_ref = torch.tensor([0, 2, 2, 0, 1])  # samples 1, 3 flipped for the reference (2 and 4 kept theirs)
    masks = pgd_masks(pred, pred_ref, clean_pred, clean_pred_ref)
    assert masks.model_unflipped.tolist() == [True, False, False, True, False]
    assert masks.ref_unflipped.tolist() == [True, False, True, False, True]
    # shared = both flipped from their own clean prediction, to the same class. Sample 2 and 4: same
    # wrong class for both, but the reference already predicted it on the clean image -> not shared
    # (BackdoorBench's definition; "same label != y" would count them).
    assert masks.shared.tolist() == [False, True, False, False, False]

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    logits_ref = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    ce = F.cross_entropy(logits, labels, reduction="none")
    ce_ref = F.cross_entropy(logits_ref, labels, reduction="none")
    js = js_divergence(logits, logits_ref)
    l_adv = -(ce[0] + ce[3] + ce_ref[0] + ce_ref[2] + ce_ref[4]) / 2 / 5  # the /2 averages the two models
    l_share = (js[0] + js[2] + js[3] + js[4]) / 5
    got = pgd_objective(logits, logits_ref, labels, masks, beta_1=0.01, beta_2=1.0)
    assert float(got) == pytest.approx(float(0.01 * l_adv + l_share), rel=1e-6)


def test_js_divergence_floors_probabilities_as_backdoorbench():
    # p = (1, ~e^-60) vs q = uniform: the tiny probability is floored at 1e-8 before the logs
    logits_p, logits_q = torch.tensor([[60.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p = torch.tensor([1.0, 1e-8])
    q = torch.tensor([0.5, 0.5])
    m = (p + q) / 2
    expected = 0.5 * (p * p.log() + q * q.log() - p * m.log() - q * m.log()).sum()
    assert float(js_divergence(logits_p, logits_q)[0]) == pytest.approx(float(expected), rel=1e-5)


def _shared_term_and_grad(logits_row: torch.Tensor, batch: int = 4):
    logits = torch.zeros(batch, logits_row.shape[0])
    logits[0] = logits_row
    logits.requires_grad_(True)
    ref_pred = torch.ones(batch, dtype=torch.long)
    fooled = torch.tensor([True] + [False] * (batch - 1))
    value = shared_unlearning_term(logits, ref_pred, fooled)
    grad, = torch.autograd.grad(value, logits)
    return float(value.detach()), grad


def test_shared_unlearning_term_keeps_the_gradient_of_confidently_backdoored_samples():
    # p(class 1) = 0.99994 on a fooled sample in a batch of 4 (the example). BackdoorBench's
    # two-term loss: -(log(1e-6 + q) + log(1 + 1e-6 - p)) / 2 with q = 1 - p summed from the other
    # class. d/dz_1 of either term is p * q / (1e-6 + q), so the batch-mean gradient is that / 4.
    p = 0.99994
    z = math.log(p / (1 - p))  # two classes: softmax([0, z])[1] = p
    value, grad = _shared_term_and_grad(torch.tensor([0.0, z]))
    q = 1 - p
    assert value == pytest.approx(-(math.log(1e-6 + q) + math.log(1 + 1e-6 - p)) / 2 / 4, rel=1e-3)
    expected = p * q / (1e-6 + q) / 4
    assert expected == pytest.approx(0.246, abs=5e-4)
    assert float(grad[0, 1]) == pytest.approx(expected, rel=1e-3)
    assert float(grad[0, 0]) == pytest.approx(-expected, rel=1e-3)
    assert float(grad[1:].abs().sum()) == 0.0  # samples that were not fooled contribute nothing
    # a clamp of p at 0.999 (the former form) would give exactly 0 here


def test_shared_unlearning_term_by_hand_and_flat_below_one_per_mille():
    value, _ = _shared_term_and_grad(torch.tensor([0.0, 0.0]), batch=2)  # p = 0.5
    assert value == pytest.approx(-(math.log(1e-6 + 0.5) + math.log(1 + 1e-6 - 0.5)) / 2 / 2, rel=1e-6)
    value, grad = _shared_term_and_grad(torch.tensor([0.0, -10.0]), batch=2)  # p = 4.5e-5 < 0.001
    assert value == pytest.approx(-(math.log(1e-6 + 0.999) + math.log(1 + 1e-6 - 0.001)) / 2 / 2, rel=1e-5)
    assert float(grad.abs().sum()) == 0.0


class _Tiny(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_shared_pgd_bounds_delta_only_and_starts_at_max():
    x = torch.rand(6, 3, 2, 2)
    x[0] = 0.95  # near the top: +0.2 goes past 1, as BackdoorBench allows
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model, ref = _Tiny(0), _Tiny(1)
    start = shared_pgd(model, ref, x, y, SAUConfig(adv_steps=0))
    torch.testing.assert_close(start, torch.full_like(x, 0.2))
    delta = shared_pgd(model, ref, x, y, SAUConfig(adv_steps=5, adv_lr=0.05))
    assert delta.abs().max() <= 0.2 + 1e-6
    assert not torch.equal(delta, start)
    assert all(p.grad is None for p in model.parameters())  # PGD does not touch the weights
    clipped = shared_pgd(model, ref, x, y, SAUConfig(adv_steps=5, adv_lr=0.05, clip_image=True))
    assert (x + clipped).min() >= 0 and (x + clipped).max() <= 1
    torch.testing.assert_close(shared_pgd(model, ref, x, y, SAUConfig(adv_steps=0, clip_image=True)),
                               (x + 0.2).clamp(max=1.0) - x)


def test_random_init_is_backdoorbenchs_uniform_zero_one_clipped_to_the_bound():
    x = torch.zeros(64, 3, 4, 4)
    model = _Tiny(0)
    start = shared_pgd(model, model, x.flatten(1)[:, :12].reshape(64, 3, 2, 2), torch.zeros(64, dtype=torch.long),
                       SAUConfig(adv_steps=0, pgd_init="random"), torch.Generator().manual_seed(0))
    assert start.min() >= 0 and start.max() <= 0.2  # rand in [0, 1) clipped at +0.2
    assert 0.7 < float((start == 0.2).float().mean()) < 0.9  # P(U > 0.2) = 0.8


def test_train_mode_normalises_clean_and_perturbed_images_as_one_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    ref = copy.deepcopy(model).eval()
    x, y = torch.rand(8, 3, 2, 2), torch.randint(0, 3, (8,))
    cfg = SAUConfig(train_mode=True, adv_steps=2)
    delta = shared_pgd(model, ref, x, y, cfg)  # deterministic (init max)
    with torch.no_grad():
        feats = model[0](torch.cat([x, x + delta]))
    expected = 0.9 * model[1].running_mean + 0.1 * feats.mean((0, 2, 3))
    step = make_sau_step(ref, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    class _Batch:
        pass

    batch = _Batch()
    batch.x, batch.y = x, y
    step(model, batch, opt, StepContext(torch.device("cpu"), False, None))
    torch.testing.assert_close(model[1].running_mean, expected)


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


def test_sau_scores_the_test_sets_every_n_rounds(digits_copy):
    SAU.main(["--result_file", "badnet_digits", "--n_rounds", "2", "--ratio", "0.05", "--test_every", "5",
              "--progress", "false"])
    frame = pd.read_csv(digits_copy / "record" / "badnet_digits" / "defense" / "sau" / "sau_df.csv", index_col=0)
    assert frame["tested"].tolist() == [False, True]  # only the last round (2 < 5)
    assert frame["test_acc"].isna().tolist() == [True, False]
    assert frame["ra_test_loss_avg_over_batch"].isna().tolist() == [True, False]


def test_sau_rejects_unknown_options():
    with pytest.raises(BurnError, match="pgd_init"):
        SAU.parse(["--pgd_init", "middle"])
    with pytest.raises(BurnError, match="norm_type"):
        SAU.parse(["--norm_type", "L2"])


def test_bare_train_mode_flag_switches_it_on():
    # BackdoorBench's --train_mode is a store_true flag: given without a value it means true.
    assert SAU.parse(["--train_mode", "--n_rounds", "3"])[0].train_mode is True
    assert SAU.parse([])[0].train_mode is False
