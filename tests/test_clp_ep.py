"""CLP and EP: the per-channel bound and entropy on hand-computed layers, the pairing BackdoorBench
uses, exactly which BN channels are switched off, and both end to end on a digits record."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from baseline_checks import load_defended, random_net, score
from burnkit.defenses.clp import (ChannelLipschitzPruning, channel_lipschitz_bounds, clp_channel_table, clp_prune,
                                  conv_bn_pairs, outliers)
from burnkit.defenses.ep import EntropyPruning, channel_entropies, ep_channel_table, ep_prune_with


def _conv_bn(kernels: list[list[list[float]]], gamma, beta, var):
    """A conv whose channel k has the 2 x 2 kernel matrix ``kernels[k]`` (in = 2, kernel 1 x 2),
    followed by a BN with the given weight, bias and running variance."""
    conv = nn.Conv2d(2, len(kernels), (1, 2), bias=False)
    bn = nn.BatchNorm2d(len(kernels))
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(kernels).view(len(kernels), 2, 1, 2))
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.tensor(beta))
        bn.running_var.copy_(torch.tensor(var))
    return conv, bn


def test_channel_bound_by_hand():
    # sigma_max: diag(3, 1) -> 3; all-ones 2 x 2 -> 2; [[0, 4], [0, 0]] -> 4
    conv, bn = _conv_bn([[[3, 0], [0, 1]], [[1, 1], [1, 1]], [[0, 4], [0, 0]]],
                        gamma=[1.0, 2.0, -0.5], beta=[0.1, 0.2, 0.3], var=[4.0, 1.0, 0.25])
    # |gamma / sqrt(var)| = 0.5, 2, 1 (no eps)
    assert torch.allclose(channel_lipschitz_bounds(conv, bn), torch.tensor([1.5, 4.0, 4.0]), atol=1e-6)


def test_outlier_rule_is_mean_plus_u_unbiased_std():
    values = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0])  # mean 1.8, unbiased std 1.78885
    assert outliers(values, 1.7).tolist() == [False, False, False, False, True]  # 1.8 + 3.041 = 4.84 < 5
    assert outliers(values, 1.8).tolist() == [False] * 5                          # 1.8 + 3.220 = 5.02 > 5
    assert outliers(values, 0.4, low=True).tolist() == [True, True, True, True, False]  # 1 < 1.8 - 0.716
    assert outliers(torch.tensor([7.0]), 0.0).tolist() == [False]  # one channel: no std, nothing pruned


class _Net(nn.Module):
    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn


def test_clp_zeroes_weight_and_bias_of_exactly_the_outlying_channel():
    torch.manual_seed(0)
    kernels = [[[1, 0], [0, 1]]] * 9 + [[[10, 0], [0, 0]]]  # channel 9: sigma 10 vs 1 for the others
    conv, bn = _conv_bn(kernels, gamma=[1.0] * 10, beta=[0.5] * 10, var=[1.0] * 10)
    net = _Net(conv, bn)
    table = clp_channel_table(net, u=2.0)
    assert table["uclc"].tolist() == pytest.approx([1.0] * 9 + [10.0])
    threshold = 1.9 + 2.0 * math.sqrt((9 * 0.9 ** 2 + 8.1 ** 2) / 9)  # mean 1.9, unbiased std
    assert table["threshold"].iloc[0] == pytest.approx(threshold)
    assert clp_prune(net, u=2.0) == 1
    assert bn.weight.tolist() == [1.0] * 9 + [0.0] and bn.bias.tolist() == [0.5] * 9 + [0.0]
    assert clp_prune(_Net(*_conv_bn(kernels, [1.0] * 10, [0.5] * 10, [1.0] * 10)), u=3.0) == 0  # 10 < 1.9 + 3 * 2.85


def test_pairing_follows_registration_order_as_in_backdoorbench():
    pairs = {bn: conv for conv, _, bn, _ in conv_bn_pairs(random_net("preactresnet18"))}
    assert pairs["layer1.0.bn1"] == "conv1"
    assert pairs["layer1.1.bn1"] == "layer1.0.conv2"
    assert pairs["layer2.1.bn1"] == "layer2.0.shortcut.0"  # the previous block's shortcut conv (§11.2)
    assert pairs["layer2.0.bn2"] == "layer2.0.conv1"
    assert len(pairs) == 16
    small = {bn: conv for conv, _, bn, _ in conv_bn_pairs(random_net("smallcnn"))}
    assert small == {"features.1": "features.0", "features.5": "features.4", "features.9": "features.8",
                     "features.13": "features.12"}


def test_entropy_by_hand():
    # channel A [0, 0, 0, 10] standardises to [-0.5, -0.5, -0.5, 1.5] (unbiased std 5);
    # channel B [0, 1, 2, 3] to [-1.1619, -0.3873, 0.3873, 1.1619] (std 1.2910).
    # Bins are 0.1 wide from the layer minimum -1.1619, int(2.6619 / 0.1) = 26 of them, open:
    # B's minimum sits on the first edge and A's 1.5 lies past the last bin, so neither is counted.
    maxima = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [10.0, 3.0]])
    entropy = channel_entropies(maxima)
    assert entropy[0].item() == pytest.approx(-0.75 * math.log(0.75))    # three of four in one bin
    assert entropy[1].item() == pytest.approx(3 * 0.25 * math.log(4))    # three bins of 1/4
    assert channel_entropies(torch.ones(5, 3)).tolist() == [0.0, 0.0, 0.0]  # nothing to bin


def test_ep_prunes_the_low_entropy_channel_of_each_layer():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(256, generator=gen)
    spread = torch.stack([base[torch.randperm(256, generator=gen)] for _ in range(19)], 1)  # equal entropies
    bimodal = torch.cat([torch.zeros(230), torch.full((26,), 8.0)])[:, None]  # a backdoor-like neuron
    maxima = {"a": torch.cat([spread, bimodal], 1), "b": spread[:, :5]}
    table = ep_channel_table(maxima, u=3.0)
    assert table[table["pruned"]][["layer", "channel"]].values.tolist() == [["a", 19]]
    net = nn.Module()
    net.a, net.b = nn.BatchNorm2d(20), nn.BatchNorm2d(5)
    nn.init.constant_(net.a.bias, 0.3)
    assert ep_prune_with(maxima)(net, 3.0) == 1
    assert net.a.weight[19].item() == 0.0 and net.a.bias[19].item() == 0.0
    assert net.a.weight[:19].eq(1).all() and net.a.bias[:19].eq(0.3).all() and net.b.weight.eq(1).all()


@pytest.mark.parametrize("defense", [ChannelLipschitzPruning, EntropyPruning])
def test_end_to_end_on_digits(defense, digits_copy):
    result = defense.main(["--result_file", "badnet_digits", "--u", "1", "--u_num", "3", "--progress", "false"])
    out = digits_copy / "record" / "badnet_digits" / "defense" / defense.name
    for name in ("defense_result.pt", f"{defense.name}_df.csv", f"{defense.name}_df_summary.csv", "u_step_df.csv",
                 "u_step_df_summary.csv", f"{defense.name}_channels.csv", "cost.json", "log/index.txt"):
        assert (out / name).exists(), name
    assert (out / "log" / "index.txt").read_text().strip() == ""  # no clean data
    cost = json.loads((out / "cost.json").read_text())
    assert cost["clean_subset_size"] == 0  # no test data in any decision: tests/test_scramble.py
    sweep = pd.read_csv(out / "u_step_df.csv", index_col=0)
    assert sweep["u"].tolist() == [0.0, 5.0, 10.0]
    unpruned = sweep[sweep["num_pruned"] == 0]  # scored as the attacked model, not evaluated again
    assert (unpruned["test_asr"] == cost["attacked"]["test_asr"]).all()
    channels = pd.read_csv(out / f"{defense.name}_channels.csv")
    n_pruned = int(channels["pruned"].sum())
    assert cost[f"{defense.name}_num_pruned"] == n_pruned > 0
    summary = pd.read_csv(out / f"{defense.name}_df_summary.csv", index_col=0)
    assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]
    clf, record = load_defended(out, digits_copy / "record" / "badnet_digits")
    zero = sum(int(((m.weight == 0) & (m.bias == 0)).sum()) for m in clf.net.modules() if isinstance(m, nn.BatchNorm2d))
    assert zero == n_pruned
    assert score(clf, record).acc == pytest.approx(float(summary.loc["last", "test_acc"]), abs=1e-6)
    assert np.isclose(result["final"]["test_acc"], float(summary.loc["last", "test_acc"]))
