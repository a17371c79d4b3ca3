"""ANP: the noisy BatchNorm, pruning by threshold/number on hand-set masks, end-to-end on digits."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from baseline_checks import check_common, load_defended, random_net, read_csv, score
from burnkit.defenses.anp import (AdversarialNeuronPruning, ANPConfig, NoisyBatchNorm2d, batchnorm_layers,
                                  make_noisy, prune_sweep, select_row, select_row_heldout, sweep_points)
from burnkit.engine import Metrics
from burnkit.errors import BurnError


def _trained_bn(channels: int = 4) -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels) + 0.5)
        bn.bias.copy_(torch.randn(channels))
        bn.running_mean.copy_(torch.randn(channels))
        bn.running_var.copy_(torch.rand(channels) + 0.5)
    return bn


@pytest.mark.parametrize("train", [False, True])
def test_noisy_bn_with_zero_noise_equals_plain_bn(train):
    bn = _trained_bn()
    noisy = NoisyBatchNorm2d.from_batchnorm(bn)
    bn.train(train)
    noisy.train(train)
    noisy.perturbed = True  # zero noise and mask 1: perturbed or not, it is the plain BN
    x = torch.randn(5, 4, 3, 3)
    assert torch.allclose(noisy(x), bn(x), atol=1e-6)
    assert torch.allclose(noisy.running_mean, bn.running_mean) and torch.allclose(noisy.running_var, bn.running_var)
    assert int(noisy.num_batches_tracked) == int(bn.num_batches_tracked)


def test_noisy_bn_applies_mask_and_noise_as_in_the_paper():
    bn = _trained_bn().eval()
    noisy = NoisyBatchNorm2d.from_batchnorm(bn).eval()
    m, ew, eb = torch.tensor([1.0, 0.5, 0.0, 0.8]), torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([0.4, 0.0, -0.1, 0.2])
    with torch.no_grad():
        noisy.neuron_mask.copy_(m)
        noisy.neuron_noise.copy_(ew)
        noisy.neuron_noise_bias.copy_(eb)
    x = torch.randn(3, 4, 2, 2)
    z = (x - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
    g, b = bn.weight.detach()[None, :, None, None], bn.bias.detach()[None, :, None, None]
    view = lambda t: t[None, :, None, None]  # noqa: E731
    noisy.perturbed = True
    assert torch.allclose(noisy(x), z * g * view(m + ew) + b * view(1 + eb), atol=1e-5)
    noisy.perturbed = False
    assert torch.allclose(noisy(x), z * g * view(m) + b, atol=1e-5)
    gen = torch.Generator().manual_seed(0)
    noisy.draw_noise(0.4, gen)
    assert noisy.neuron_noise.abs().max() <= 0.4 and noisy.neuron_noise_bias.abs().max() <= 0.4
    assert noisy.neuron_noise.abs().max() > 0


@pytest.mark.parametrize("model_name,hw,n_bn", [("smallcnn", 8, 4), ("preactresnet18", 8, 16), ("vgg19_bn", 32, 16)])
def test_make_noisy_replaces_every_batchnorm_and_keeps_the_function(model_name, hw, n_bn):
    net = random_net(model_name)
    assert len(batchnorm_layers(net)) == n_bn
    if model_name == "vgg19_bn":
        return  # copying VGG's 140M parameters is too slow for a unit test; counting suffices
    noisy_net = copy.deepcopy(net)
    layers = make_noisy(noisy_net)
    assert [n for n, _ in layers] == [n for n, _ in batchnorm_layers(net)]
    assert all(isinstance(m, NoisyBatchNorm2d) for _, m in batchnorm_layers(noisy_net))
    x = torch.randn(2, 3, hw, hw)
    with torch.no_grad():
        assert torch.allclose(noisy_net.eval()(x), net(x), atol=1e-5)


def test_model_without_batchnorm_is_refused():
    with pytest.raises(BurnError, match="no BatchNorm2d"):
        make_noisy(copy.deepcopy(random_net("smallcnn").classifier))  # a Linear: nothing to prune


class _TwoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(2)
        nn.init.constant_(self.bn_b.bias, 0.5)


class _Wrapped(nn.Module):  # stands in for a Classifier: the network is .net
    def __init__(self):
        super().__init__()
        self.net = _TwoBN()


def test_threshold_pruning_zeroes_exactly_the_expected_gammas():
    ranked = sorted([("bn_a", 0, 0.9), ("bn_a", 1, 0.03), ("bn_a", 2, 0.5),
                     ("bn_b", 0, 0.0), ("bn_b", 1, 0.12)], key=lambda r: r[2])
    cfg = ANPConfig(pruning_max=0.3, pruning_step=0.1)
    assert sweep_points(cfg, ranked) == [(0.0, 1), (0.1, 2), (0.2, 3), (0.3, 3)]
    model = _Wrapped()
    seen, biases = [], []

    def fake_evaluate(m):  # records the gammas at every scored step
        seen.append((m.net.bn_a.weight.tolist(), m.net.bn_b.weight.tolist()))
        biases[:] = m.net.bn_b.bias.tolist()
        return Metrics(acc=1.0, asr=1.0 - 0.1 * len(seen), ra=0.0, clean_loss=0.0, bd_loss=0.0)

    rows, pruned = prune_sweep(model, ranked, cfg, fake_evaluate)
    assert pruned == 3 and len(seen) == 3  # threshold 0.3 prunes nothing new: no extra evaluation
    assert seen[0] == ([1.0, 1.0, 1.0], [0.0, 1.0])  # mask 0.0 <= 0.0
    assert seen[1] == ([1.0, 0.0, 1.0], [0.0, 1.0])  # + mask 0.03
    assert seen[2] == ([1.0, 0.0, 1.0], [0.0, 0.0])  # + mask 0.12; 0.5 and 0.9 stay
    assert biases == [0.5, 0.5]  # beta of pruned channels is kept
    assert [r["num_pruned"] for r in rows] == [1, 2, 3, 3] and [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert [r["value"] for r in rows] == [0.0, 0.03, 0.12, 0.12]
    assert model.net.bn_a.weight.tolist() == [1.0, 1.0, 1.0]  # the sweep worked on a copy


def test_number_sweep_and_model_selection():
    ranked = [("bn", i, i / 10) for i in range(10)]
    cfg = ANPConfig(pruning_by="number", pruning_number=7, pruning_step=0.3)
    assert sweep_points(cfg, ranked) == [(0, 0), (3, 3), (6, 6), (7, 7)]
    before = Metrics(acc=0.9, asr=0.95, ra=0.05, clean_loss=0, bd_loss=0)
    rows = [{"num_pruned": 1, "test_acc": 0.89, "test_asr": 0.5},
            {"num_pruned": 2, "test_acc": 0.85, "test_asr": 0.1},
            {"num_pruned": 3, "test_acc": 0.80, "test_asr": 0.0}]  # drop 11% >= 10%: not allowed
    assert select_row(rows, before, 0.1)["num_pruned"] == 2
    assert select_row([{"num_pruned": 1, "test_acc": 0.9, "test_asr": 0.99}], before, 0.1) is None
    with pytest.raises(BurnError, match="pruning_number"):
        ANPConfig(pruning_by="number").validate()


def test_heldout_selection_keeps_the_most_pruned_step_within_the_accuracy_allowance():
    rows = [{"num_pruned": 0, "heldout_acc": 0.80}, {"num_pruned": 4, "heldout_acc": 0.92},  # a rise is no drop
            {"num_pruned": 9, "heldout_acc": 0.73}, {"num_pruned": 15, "heldout_acc": 0.70}]  # 12.5% drop
    assert select_row_heldout(rows, 0.80, 0.1)["num_pruned"] == 9
    assert select_row_heldout(rows[:1] + [{"num_pruned": 3, "heldout_acc": 0.5}], 0.80, 0.1) is None


def test_anp_end_to_end_on_digits_with_backdoorbench_test_selection(digits_copy):
    record_dir = digits_copy / "record" / "badnet_digits"
    out = AdversarialNeuronPruning.main(["--result_file", "badnet_digits", "--nb_iter", "30", "--print_every", "15",
                                         "--batch_size", "32", "--lr", "0.2", "--pruning_step", "0.15",
                                         "--select_on", "test", "--test_every", "4", "--progress", "false"])
    out_dir = record_dir / "defense" / "anp"
    cost = check_common(out_dir)
    lines = (out_dir / "checkpoint" / "mask_values.txt").read_text().splitlines()
    assert lines[0] == "No \t Layer Name \t Neuron Idx \t Mask Score"
    assert len(lines) - 1 == 32 + 64 + 128 + 128 == cost["anp_channels"]
    first = lines[1].split(" \t ")
    assert first[:3] == ["0", "features.1", "0"] and len(first[3].split(".")[1]) == 4
    masks = [float(line.split(" \t ")[3]) for line in lines[1:]]
    assert min(masks) >= 0.0 and max(masks) <= 1.0 and min(masks) < 1.0

    sweep = read_csv(out_dir / "threshold_df.csv")
    assert list(sweep.columns) == ["epoch", "threshold", "value", "num_pruned", "clean_test_loss_avg_over_batch",
                                   "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra"]
    assert sweep["threshold"].tolist() == pytest.approx([0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9])
    assert sweep["num_pruned"].tolist() == [sum(v <= t + 1e-12 for v in masks) for t in sweep["threshold"]]
    summary = read_csv(out_dir / "anp_df_summary.csv")
    assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]

    clf, record = load_defended(out_dir, record_dir)
    gammas = torch.cat([m.weight.detach() for _, m in batchnorm_layers(clf.net)])
    assert int((gammas == 0).sum()) == cost["anp_num_pruned"]
    kept = read_csv(out_dir / "anp_df.csv").iloc[-1]
    metrics = score(clf, record)
    assert metrics.acc == pytest.approx(kept["test_acc"]) and metrics.asr == pytest.approx(kept["test_asr"])
    assert metrics.asr <= out["before"].asr
    if cost["anp_num_pruned"]:
        chosen = sweep[sweep["num_pruned"] == cost["anp_num_pruned"]].iloc[0]
        assert chosen["test_asr"] == pytest.approx(metrics.asr)
    assert cost["test_data_for_decisions"] is True and cost["budget"] == {"nb_iter": [30, 2000]}


def test_anp_decides_on_held_out_samples_and_scores_tests_every_n_steps(digits_copy):
    record_dir = digits_copy / "record" / "badnet_digits"
    AdversarialNeuronPruning.main(["--result_file", "badnet_digits", "--nb_iter", "30", "--print_every", "15",
                                   "--batch_size", "32", "--lr", "0.2", "--pruning_step", "0.15", "--ratio", "0.2",
                                   "--test_every", "3", "--progress", "false"])
    out_dir = record_dir / "defense" / "anp"
    cost = check_common(out_dir)
    assert cost["select_on"] == "heldout" and cost["test_data_for_decisions"] is False
    assert cost["heldout_size"] == math.ceil(int(1438 * 0.2) * 0.1)
    sweep = read_csv(out_dir / "threshold_df.csv")
    assert list(sweep.columns) == ["epoch", "threshold", "value", "num_pruned", "clean_test_loss_avg_over_batch",
                                   "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra", "heldout_acc",
                                   "tested"]
    # 7 steps, test sets scored at steps 3, 6 and the last (index 2, 5, 6); the rest are marked
    assert sweep["tested"].tolist() == [False, False, True, False, False, True, True]
    assert sweep.loc[~sweep["tested"], "test_acc"].isna().all() and sweep.loc[sweep["tested"], "test_acc"].notna().all()
    assert sweep["heldout_acc"].notna().all()
    acc0 = sweep["heldout_acc"].iloc[0]
    allowed = sweep[((acc0 - sweep["heldout_acc"]) / acc0 < 0.1) & (sweep["num_pruned"] > 0)]
    expected = int(allowed["num_pruned"].max()) if len(allowed) else 0
    assert cost["anp_num_pruned"] == expected
    clf, record = load_defended(out_dir, record_dir)
    kept = read_csv(out_dir / "anp_df.csv").iloc[-1]
    metrics = score(clf, record)  # the kept model is scored on the test sets even between scorings
    assert metrics.acc == pytest.approx(kept["test_acc"]) and metrics.asr == pytest.approx(kept["test_asr"])
