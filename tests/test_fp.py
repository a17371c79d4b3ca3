"""FP (Fine-Pruning): known answers for the pruning algebra and an end-to-end run on digits."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from baseline_checks import check_common, load_defended, random_net, read_csv, score
from burnkit.data import ImageSet
from burnkit.datasets import dataset_info
from burnkit.defense import split_heldout
from burnkit.defenses.fp import (FinePruning, final_layer_inputs, final_linear, fold_mask, frozen_columns,
                                 mean_activation_order, prune_mask, pruned_logits, relative_drop)
from burnkit.errors import BurnError
from burnkit.models import build_classifier


def test_order_mask_and_pruned_logits_by_hand():
    feats = torch.tensor([[1.0, 5.0, 0.0, 2.0],
                          [3.0, 1.0, 0.0, 4.0]])  # means 2, 3, 0, 3
    order = mean_activation_order(feats)
    assert order.tolist() == [2, 0, 1, 3]  # ties keep index order
    mask = prune_mask(order, 2, 4)
    assert mask.tolist() == [0.0, 1.0, 0.0, 1.0]  # features 2 and 0 pruned
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 2.0, 1.0]]))
        linear.bias.copy_(torch.tensor([0.5, -0.5]))
    # by hand: row 0 keeps x1, x3 -> [2*5 + 4*2 + .5, .5*5 + 1*2 - .5] = [18.5, 4.0]
    #          row 1 -> [2*1 + 4*4 + .5, .5*1 + 1*4 - .5] = [18.5, 4.0]
    expected = torch.tensor([[18.5, 4.0], [18.5, 4.0]])
    assert torch.allclose(pruned_logits(feats, linear, mask), expected)
    fold_mask(linear, mask)
    assert linear.weight.tolist() == [[0.0, 2.0, 0.0, 4.0], [0.0, 0.5, 0.0, 1.0]]
    assert torch.allclose(linear(feats), expected)


def test_pruned_columns_stay_zero_under_sgd_with_momentum_and_weight_decay():
    linear = nn.Linear(6, 3)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    before = linear.weight.detach().clone()
    opt = torch.optim.SGD(linear.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    with frozen_columns(linear, mask):
        for _ in range(5):
            opt.zero_grad()
            linear(torch.randn(8, 6)).pow(2).sum().backward()
            opt.step()
    w = linear.weight.detach()
    assert torch.all(w[:, [1, 3]] == 0)
    assert not torch.allclose(w[:, [0, 2, 4, 5]], before[:, [0, 2, 4, 5]])  # the others did train
    assert not linear.weight._backward_hooks  # the gradient hook was removed


@pytest.mark.parametrize("model_name,expected_layer,width", [
    ("smallcnn", "classifier", 128), ("preactresnet18", "linear", 512), ("preactresnet34", "linear", 512),
    ("vgg19_bn", "classifier.6", 4096), ("vgg19", "classifier.6", 4096)])
def test_final_linear_is_found_in_every_zoo_model(model_name, expected_layer, width):
    name, linear = final_linear(random_net(model_name))
    assert (name, linear.in_features, linear.out_features) == (expected_layer, width, 10)


@pytest.mark.parametrize("model_name,input_hw,expected_layer,width", [
    ("smallcnn", 8, "classifier", 128), ("preactresnet18", 8, "linear", 512)])
def test_final_layer_found_and_pruning_matches_full_forward(model_name, input_hw, expected_layer, width):
    torch.manual_seed(0)
    info = dataset_info("cifar10")
    clf = build_classifier(model_name, info)
    name, linear = final_linear(clf.net)
    assert (name, linear.in_features) == (expected_layer, width)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, input_hw, input_hw), dtype=torch.uint8, generator=gen)
    n = images.shape[0]
    imageset = ImageSet(images, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                        torch.zeros(n, dtype=torch.bool), torch.arange(n))
    feats, logits = final_layer_inputs(clf, imageset, torch.device("cpu"))
    assert feats.shape == (n, width)
    order = mean_activation_order(feats)
    # prune the most active third (the least active ones of a random net may be exactly zero)
    mask = prune_mask(order.flip(0), width // 3, width)
    pruned = copy.deepcopy(clf)
    fold_mask(final_linear(pruned.net)[1], mask)
    pruned.eval()
    with torch.no_grad():
        full = pruned(images.float() / 255)
    assert torch.allclose(pruned_logits(feats, linear, mask), full, atol=1e-5)
    assert not torch.allclose(full, logits, atol=1e-5)  # pruning a third of the features changed them


def test_fp_end_to_end_on_digits_with_backdoorbench_test_selection(digits_copy):
    record_dir = digits_copy / "record" / "badnet_digits"
    index = np.arange(0, 1400, 7)  # a defender-chosen subset: --index must be honoured
    np.savetxt(digits_copy / "idx.txt", index, fmt="%d")
    out = FinePruning.main(["--result_file", "badnet_digits", "--epochs", "2", "--index", "idx.txt",
                            "--select_on", "test", "--progress", "false"])
    out_dir = record_dir / "defense" / "fp"
    cost = check_common(out_dir, index)
    assert cost["select_on"] == "test" and cost["test_data_for_decisions"] is True and cost["heldout_size"] == 0
    assert np.array_equal(np.loadtxt(out_dir / "index.txt", dtype=int), index)  # BB's FP copy = the set used

    prune = read_csv(out_dir / "prune_log.csv")
    assert list(prune.columns) == ["epoch", "num_pruned", "all_filter_num", "test_acc", "test_asr", "test_ra"]
    assert prune["epoch"].tolist() == list(range(len(prune)))
    assert (prune["all_filter_num"] == 128).all() and prune["num_pruned"].diff().dropna().eq(2).all()
    acc0 = prune["test_acc"].iloc[0]
    drops = (prune["test_acc"] - acc0).abs() / acc0
    accepted = cost["fp_num_pruned"]
    if drops.iloc[-1] >= 0.1:  # the sweep stopped: the last step is the rejected one
        assert (drops.iloc[:-1] < 0.1).all() and accepted == prune["num_pruned"].iloc[-2]
    else:
        assert accepted == prune["num_pruned"].iloc[-1]
    assert accepted > 0
    assert (out_dir / "prune_log_summary.csv").is_file() and (out_dir / "prune_log_plot.jpg").is_file()

    for name in ("finetune_df.csv", "fp_df.csv"):
        df = read_csv(out_dir / name)
        assert df["epoch"].tolist() == [0, 1]
        assert {"train_acc_clean_only", "test_acc", "test_asr", "test_ra"} <= set(df.columns)

    clf, record = load_defended(out_dir, record_dir)
    pruned_idx = np.loadtxt(out_dir / "checkpoint" / "pruned_feature_index.txt", dtype=int, ndmin=1)
    assert len(pruned_idx) == accepted  # exactly num_pruned, not num_pruned - 1
    weight = clf.net.classifier.weight.detach()
    assert torch.all(weight[:, pruned_idx] == 0)
    assert int((weight.abs().sum(0) == 0).sum()) == accepted  # only those columns are zero
    metrics = score(clf, record)
    last = read_csv(out_dir / "fp_df.csv").iloc[-1]
    assert metrics.acc == pytest.approx(last["test_acc"]) and metrics.asr == pytest.approx(last["test_asr"])
    assert out["final"]["test_acc"] == pytest.approx(metrics.acc)


def test_fp_decides_on_held_out_clean_samples_by_default(digits_copy):
    record_dir = digits_copy / "record" / "badnet_digits"
    FinePruning.main(["--result_file", "badnet_digits", "--epochs", "1", "--ratio", "0.2", "--acc_ratio", "0.05",
                      "--progress", "false"])
    out_dir = record_dir / "defense" / "fp"
    cost = check_common(out_dir)
    subset = int(1438 * 0.2)
    assert cost["select_on"] == "heldout" and cost["test_data_for_decisions"] is False
    assert cost["heldout_size"] == math.ceil(subset * 0.1) and cost["clean_subset_size"] == subset
    prune = read_csv(out_dir / "prune_log.csv")
    assert list(prune.columns) == ["epoch", "num_pruned", "all_filter_num", "test_acc", "test_asr", "test_ra",
                                   "heldout_acc"]
    counts = prune["heldout_acc"] * cost["heldout_size"]  # shares of the 29 held-out samples
    assert np.allclose(counts, counts.round(), atol=1e-6)
    acc0 = prune["heldout_acc"].iloc[0]
    drops = (acc0 - prune["heldout_acc"]) / acc0  # the held-out accuracy decides, not test_acc; a fall only
    if drops.iloc[-1] >= 0.05:
        assert (drops.iloc[:-1] < 0.05).all() and cost["fp_num_pruned"] == prune["num_pruned"].iloc[-2]
    else:
        assert cost["fp_num_pruned"] == prune["num_pruned"].iloc[-1]


def test_backdoorbench_prune_quirks_are_one_flag_away(digits_copy):
    record_dir = digits_copy / "record" / "badnet_digits"
    FinePruning.main(["--result_file", "badnet_digits", "--epochs", "0", "--select_on", "test", "--acc_ratio", "0.02",
                      "--bb_prune_quirks", "true", "--progress", "false"])
    out_dir = record_dir / "defense" / "fp"
    cost = check_common(out_dir)
    prune = read_csv(out_dir / "prune_log.csv")
    last_scored = int(prune["num_pruned"].iloc[-1])
    assert cost["fp_num_pruned"] == last_scored - 1  # the rejected step's mask, num_pruned - 1 features
    clf, _ = load_defended(out_dir, record_dir)
    zero_columns = int((clf.net.classifier.weight.detach().abs().sum(0) == 0).sum())
    assert zero_columns == last_scored - 1


def test_relative_drop_is_two_sided_only_for_backdoorbenchs_test_rule():
    assert relative_drop(0.45, 0.5, two_sided=True) == pytest.approx(0.1)
    assert relative_drop(0.55, 0.5, two_sided=True) == pytest.approx(0.1)  # a rise stops BackdoorBench's sweep
    assert relative_drop(0.55, 0.5, two_sided=False) == pytest.approx(-0.1)  # not the held-out one


def test_split_heldout_is_seeded_disjoint_and_complete():
    images = torch.zeros(50, 1, 2, 2, dtype=torch.uint8)
    labels = torch.arange(50) % 10
    clean = ImageSet(images, labels, labels, torch.zeros(50, dtype=torch.bool), torch.arange(100, 150))
    rest, held = split_heldout(clean, 0.1, seed=3)
    assert len(held) == 5 and len(rest) == 45
    assert sorted(rest.index.tolist() + held.index.tolist()) == list(range(100, 150))
    assert split_heldout(clean, 0.1, seed=3)[1].index.tolist() == held.index.tolist()
    assert split_heldout(clean, 0.1, seed=4)[1].index.tolist() != held.index.tolist()
    with pytest.raises(BurnError, match="heldout_ratio"):
        FinePruning.parse(["--result_file", "x", "--heldout_ratio", "1"])
    with pytest.raises(BurnError, match="select_on"):
        FinePruning.parse(["--result_file", "x", "--select_on", "train"])


def test_fp_rejects_bad_prune_ratio():
    with pytest.raises(BurnError, match="once_prune_ratio"):
        FinePruning.parse(["--result_file", "x", "--once_prune_ratio", "0"])
