"""FT-SAM: SAM/ASAM perturbations and a full SAM step checked by hand, the GSAM decomposition,
the rho schedule under per-batch scheduling, YAML values reaching the optimiser, the subset rule
and an end-to-end run on the digits record."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import burnkit.defenses.ft_sam as ft_sam
from burnkit.data import Batch
from burnkit.engine import StepContext
from burnkit.errors import BurnError
from burnkit.records import read_attack_record
from burnkit.defenses.ft_sam import (FtSam, choose_by_class, frozen_bn_stats, make_sam_step, proportional_rho,
                                     remove_orthogonal_component, sam_perturbation, smooth_crossentropy)

from defense_checks import check_defense_result, check_index_file


def test_sam_perturbation_by_hand():
    w = [torch.tensor([1.0, 2.0]), torch.tensor([[-1.0]])]
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]  # ||g|| = 5
    e = sam_perturbation(w, g, rho=2.0, adaptive=False)
    torch.testing.assert_close(e[0], torch.tensor([1.2, 0.0]))
    torch.testing.assert_close(e[1], torch.tensor([[1.6]]))
    # adaptive: |w|⊙g = (3, 0, -4)·sign -> norm 5; e = ρ w²⊙g / 5 = 0.4 * (3, 0, 4)
    e = sam_perturbation(w, g, rho=2.0, adaptive=True)
    torch.testing.assert_close(e[0], torch.tensor([1.2, 0.0]))
    torch.testing.assert_close(e[1], torch.tensor([[1.6]]))
    w2 = [torch.tensor([2.0, 1.0])]
    g2 = [torch.tensor([1.0, 1.0])]  # |w|⊙g = (2, 1), norm sqrt(5); w²⊙g = (4, 1)
    torch.testing.assert_close(sam_perturbation(w2, g2, 1.0, True)[0], torch.tensor([4.0, 1.0]) / math.sqrt(5))


def test_remove_orthogonal_component_by_hand():
    out = remove_orthogonal_component([torch.tensor([2.0, 0.0])], [torch.tensor([1.0, 1.0])], alpha=0.5)
    torch.testing.assert_close(out[0], torch.tensor([2.0, -0.5]))  # g_⊥ = (0, 1)


def test_smooth_crossentropy_by_hand():
    logits = torch.zeros(1, 4)  # uniform prediction
    target = [0.7, 0.1, 0.1, 0.1]  # smoothing 0.3 spread over the 3 other classes
    expected = sum(t * math.log(t / 0.25) for t in target)
    assert float(smooth_crossentropy(logits, torch.tensor([0]), 0.3)) == pytest.approx(expected, rel=1e-6)
    assert float(smooth_crossentropy(logits, torch.tensor([2]), 0.0)) == pytest.approx(math.log(4), rel=1e-6)


class _LinearBN(nn.Module):
    """y = BN(x) @ w with a scalar output pair, so the loss and gradients are easy to follow."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(2, affine=False)
        self.fc = nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.fc(self.bn(x))


def test_sam_step_uses_the_gradient_at_the_perturbed_weights_and_keeps_bn_stats():
    torch.manual_seed(0)
    model = _LinearBN()
    x, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
    batch = Batch(x, y, y, torch.zeros(8, dtype=torch.bool), torch.arange(8), torch.arange(8))
    lr, rho = 0.1, 0.05
    # expected: w' = w - lr * ∇L(w + ρ g/||g||), BN stats updated by exactly one forward pass
    reference = _LinearBN()
    reference.load_state_dict(model.state_dict())
    loss = smooth_crossentropy(reference(x), y, 0.0).mean()
    g, = torch.autograd.grad(loss, reference.fc.weight)
    with torch.no_grad():
        reference.fc.weight += rho * g / g.norm()
    with frozen_bn_stats(reference):
        g_sam, = torch.autograd.grad(smooth_crossentropy(reference(x), y, 0.0).mean(), reference.fc.weight)
    expected_w = model.fc.weight.detach() - lr * g_sam
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    step = make_sam_step(base_lr=lr, rho_max=rho, rho_min=rho, adaptive=False, alpha=0.0, label_smoothing=0.0)
    step(model.train(), batch, opt, StepContext(torch.device("cpu"), False, None))
    torch.testing.assert_close(model.fc.weight.detach(), expected_w)
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)
    assert int(model.bn.num_batches_tracked) == 1
    torch.testing.assert_close(model.bn.running_mean, 0.1 * x.mean(0))  # one update with momentum 0.1


def test_proportional_rho():
    assert proportional_rho(0.005, 0.01, rho_max=2.0, rho_min=1.0) == pytest.approx(1.5)
    assert proportional_rho(0.01, 0.01, rho_max=8.0, rho_min=8.0) == pytest.approx(8.0)


def _spy_rho(monkeypatch) -> list[float]:
    seen: list[float] = []
    original = ft_sam.sam_perturbation

    def spy(params, grads, rho, adaptive):
        seen.append(rho)
        return original(params, grads, rho, adaptive)

    monkeypatch.setattr(ft_sam, "sam_perturbation", spy)
    return seen


def test_yaml_rho_reaches_the_optimiser_and_follows_the_per_batch_cosine(digits_copy, monkeypatch):
    # 4 batches (2 epochs of 2), cosine with T_max 4 counted in batches: lr_k = lr (1 + cos(πk/4)) / 2,
    # so ρ_k = rho_min + (rho_max - rho_min) (1 + cos(πk/4)) / 2 with the YAML's rho_max=7.5, rho_min=0.5.
    yaml_path = digits_copy / "ft_sam.yaml"
    yaml_path.write_text("rho_max: 7.5\nrho_min: 0.5\nlabel_smoothing: 0.0\nepochs: 2\nbatch_size: 64\n"
                         "lr_scheduler: CosineAnnealingLR\ncos_t_max: 4\n")
    seen = _spy_rho(monkeypatch)
    FtSam.main(["--result_file", "badnet_digits", "--yaml_path", str(yaml_path), "--ratio", "0.09",
                "--progress", "false"])
    expected = [0.5 + 7.0 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert seen == pytest.approx(expected)


def test_ft_sam_end_to_end_class_balanced_subset(digits_copy):
    FtSam.main(["--result_file", "badnet_digits", "--epochs", "2", "--ratio", "0.2", "--progress", "false"])
    out = digits_copy / "record" / "badnet_digits" / "defense" / "ft-sam"
    frame = pd.read_csv(out / "ft-sam_df.csv", index_col=0)
    assert list(frame["epoch"]) == [0, 1]
    assert {"train_epoch_loss_avg_over_batch", "test_acc", "test_asr", "test_ra"} <= set(frame.columns)
    assert (out / "ft-sam_df_summary.csv").is_file()
    check_defense_result(out / "defense_result.pt", "smallcnn", 10)
    idx = check_index_file(out / "log" / "index.txt", expected_len=10 * int(1438 * 0.2 / 10))
    labels = read_attack_record(digits_copy / "record" / "badnet_digits").load_data().clean_train.labels
    assert np.bincount(labels.numpy()[idx], minlength=10).tolist() == [28] * 10  # int(1438*0.2/10) each


def test_ft_sam_honours_index(digits_copy):
    index_file = digits_copy / "my_index.txt"
    chosen = np.arange(5, 205, 2)
    np.savetxt(index_file, chosen, fmt="%d")
    FtSam.main(["--result_file", "badnet_digits", "--epochs", "1", "--index", str(index_file), "--progress", "false"])
    idx = check_index_file(digits_copy / "record" / "badnet_digits" / "defense" / "ft-sam" / "log" / "index.txt")
    assert idx.tolist() == chosen.tolist()


def test_ft_sam_rejects_a_missing_checkpoint(digits_copy):
    with pytest.raises(BurnError, match="checkpoint_path"):
        FtSam.parse(["--checkpoint_path", "no_such_record"])


def test_bare_adaptive_flag_turns_adaptive_off_as_in_backdoorbench():
    assert FtSam.parse([])[0].adaptive is True  # default on
    assert FtSam.parse(["--adaptive"])[0].adaptive is False  # store_false there
    assert FtSam.parse(["--adaptive", "true"])[0].adaptive is True


def test_class_balanced_draw_is_backdoorbenchs_legacy_numpy_choice():
    labels = np.repeat(np.arange(10), 60)[np.random.default_rng(1).permutation(600)]
    got = choose_by_class(labels, 0.05, seed=7, num_classes=10)
    np.random.seed(7)  # BackdoorBench: fix_random(seed), then np.random.choice class by class
    expected = np.concatenate([np.random.choice(np.flatnonzero(labels == c), 3, replace=False) for c in range(10)])
    assert got.tolist() == expected.tolist()
    with pytest.raises(BurnError, match="class 3"):
        choose_by_class(np.where(labels == 3, 4, labels), 0.05, seed=7, num_classes=10)
