"""BURN (burnkit.defenses.burn): schedules, scores, selection sets, outputs, resume, no flag use."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from burnkit import records
from burnkit.data import ImageSet
from burnkit.defenses import burn as burn_mod
from burnkit.boundary import BoundaryResult
from burnkit.defenses.burn import (Burn, BurnConfig, composite_score, detection_summary, finetune_set,
                                   linear_schedule, prediction_divergence, schedule, select, selection_quality,
                                   share_count)
from burnkit.errors import BurnError
from burnkit.safe_load import safe_torch_load

FAST = ["--iterations", "2", "--epochs", "1", "--batch_size", "64", "--max_iter", "20", "--candidates", "4",
        "--progress", "false", "--kp_start", "0.02", "--kp_end", "0.04", "--kc_start", "0.1",
        "--kc_end", "0.2"]


def _run(*extra):
    return Burn.main(["--result_file", "badnet_digits", *FAST, *extra])


def _net_state(result):
    return {k: v.clone() for k, v in result["model"].net.state_dict().items()}


def test_linear_schedules_follow_the_paper():
    cfg = BurnConfig(iterations=20)
    assert schedule(cfg, 0) == pytest.approx((0.005, 0.025, 0.3))
    assert schedule(cfg, 20) == pytest.approx((0.01, 0.05, 0.6))
    assert schedule(cfg, 10) == pytest.approx((0.0075, 0.0375, 0.45))
    assert linear_schedule(0.3, 0.6, 0, 0) == 0.3


def test_selection_takes_top_poison_and_bottom_clean_shares():
    score = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.2, 0.8, 0.0, 0.6, 0.4])
    poison, clean = select(score, kp=0.2, kc=0.3)
    assert poison.tolist() == [1, 6]
    assert clean.tolist() == [7, 2, 5]
    assert share_count(0.005, 1438) == 7 and share_count(0.0, 100) == 0 and share_count(1e-6, 10) == 1
    poison, clean = select(score, kp=0.6, kc=0.6)  # never overlapping
    assert not set(poison.tolist()) & set(clean.tolist())


def test_scores_bd_pd_and_s():
    l2 = torch.tensor([1.0, 2.0, 4.0])
    same = torch.randn(3, 5)
    assert torch.allclose(prediction_divergence(same, same), torch.zeros(3), atol=1e-6)
    a, b = torch.eye(3), torch.eye(3).roll(1, 1)
    assert torch.allclose(prediction_divergence(a, b), torch.ones(3))
    assert torch.allclose(prediction_divergence(a, -a), torch.full((3,), 2.0))
    assert prediction_divergence(a, -a, "probs").max() < 1.0  # softmax outputs are never opposed
    pd = torch.tensor([0.0, 1.0, 0.5])
    bd, s = composite_score(l2, pd, omega=0.25)
    assert torch.allclose(bd, torch.tensor([0.25, 0.5, 1.0]))
    assert torch.allclose(s, 0.75 * bd + 0.25 * pd)


def test_finetune_set_relabels_poison_with_adversarial_labels_only():
    n = 6
    train = ImageSet(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n), torch.arange(n),
                     torch.zeros(n, dtype=torch.bool), torch.arange(n))
    adv = torch.tensor([9, 8, 7, 6, 5, 4])
    ft = finetune_set(train, torch.tensor([1, 3]), adv, torch.tensor([0, 5]))
    assert ft.index.tolist() == [1, 3, 0, 5]
    assert ft.labels.tolist() == [8, 6, 0, 5]


def _flagged_set():
    """8 samples: 0-3 clean; 4-6 poison relabelled to class 0; 7 poison from the target class itself."""
    labels = torch.tensor([1, 2, 3, 0, 0, 0, 0, 0])
    original = torch.tensor([1, 2, 3, 0, 5, 6, 7, 0])
    poison = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    return ImageSet(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), labels, original, poison, torch.arange(8))


def test_selection_quality_by_hand():
    train = _flagged_set()
    adv = torch.tensor([4, 4, 4, 4, 5, 9, 7, 3])
    q = selection_quality(train, poison_pos=torch.tensor([4, 5, 7, 0]), clean_pos=torch.tensor([1, 6]), adv_label=adv)
    assert q["poison_precision"] == 0.75 and q["poison_recall"] == 0.75
    # relabelled poison selected: 4 (adv 5 = original 5) and 5 (adv 9 != 6); 7 keeps its label, left out
    assert q["relabel_acc"] == 0.5
    assert q["clean_set_poison_rate"] == 0.5
    assert selection_quality(train, torch.tensor([7]), torch.tensor([0]), adv)["relabel_acc"] is None


def test_detection_summary_by_hand():
    train = _flagged_set()
    l2 = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8, 1.0, 0.25, 2.0])
    result = BoundaryResult(l2, torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long),
                            torch.ones(8, dtype=torch.bool), torch.zeros(8, dtype=torch.long))
    det = detection_summary(train, result, score=-l2)
    # poison {0.8, 1.0, 0.25, 2.0} vs clean {0.1, 0.2, 0.3, 0.9}: pairs won 3+4+2+4 = 13 of 16
    assert det["auroc_l2"] == pytest.approx(13 / 16) and det["auroc_score"] == pytest.approx(3 / 16)
    assert det["mean_l2_clean"] == pytest.approx(0.375) and det["mean_l2_poison"] == pytest.approx(1.0125)
    # relabelled poison {0.8, 1.0, 0.25} vs the same clean: 3 + 4 + 2 = 9 of 12
    assert det["n_poison_relabelled"] == 3 and det["auroc_l2_relabelled"] == pytest.approx(9 / 12)


def test_config_validation():
    with pytest.raises(BurnError, match="overlap"):
        BurnConfig(kp_end=0.6, kc_end=0.5).validate()
    with pytest.raises(BurnError, match="pd_output"):
        BurnConfig(pd_output="features").validate()
    with pytest.raises(BurnError, match="attack_space"):
        BurnConfig(attack_space="latent").validate()


def test_end_to_end_outputs_and_selection_sets(digits_copy):
    result = _run()
    out = digits_copy / "record" / "badnet_digits" / "defense" / "burn"
    for name in ("defense_result.pt", "burn_df.csv", "burn_df_summary.csv", "burn_samples.csv",
                 "burn_detection.json", "burn_roc.png", "burn_l2_hist.png", "burn_iterations.png",
                 "cost.json", "log/index.txt"):
        assert (out / name).exists(), name
    assert (out / "log" / "index.txt").read_text().strip() == ""  # no clean sample is handed to BURN
    assert json.loads((out / "cost.json").read_text())["clean_subset_size"] == 0
    df = pd.read_csv(out / "burn_df.csv")
    assert df["iteration"].tolist() == [0, 1, 2]
    assert {"test_acc", "test_asr", "test_ra", "poison_precision", "poison_recall", "relabel_acc"} <= set(df)
    samples = pd.read_csv(out / "burn_samples.csv", keep_default_na=False)
    n = len(samples)
    cfg = BurnConfig(iterations=2, kp_start=0.02, kp_end=0.04, kc_start=0.1, kc_end=0.2)
    for t in range(3):
        kp, kc, _ = schedule(cfg, t)
        assert df["n_poison"][t] == share_count(kp, n)
        assert df["n_clean"][t] == (0 if t == 0 else share_count(kc, n))  # Phase 1: poison set only
        chosen = samples["selected_poison_iters"].str.split(";").apply(lambda v: str(t) in v)
        assert chosen.sum() == share_count(kp, n)
    # Phase 1 picks the largest boundary distances
    top = samples.nlargest(share_count(0.02, n), "boundary_l2")
    assert top["selected_poison_iters"].str.startswith("0").all()
    detection = json.loads((out / "burn_detection.json").read_text())
    assert {"auroc_l2", "auroc_score", "mean_l2_clean", "mean_l2_poison"} <= set(detection)
    assert detection["mean_l2_poison"] > detection["mean_l2_clean"]  # the paper's observation
    assert result["cost"]["burn"]["timings_s"]["scan"] > 0
    assert {"is_poison", "original_label"} <= set(samples)


def test_algorithm_never_reads_the_poison_flags(digits_copy, monkeypatch):
    reference = _net_state(_run("--resume", "false"))
    original_load = records.AttackRecord.load_data

    def scrambled(self, *a, **kw):
        data = original_load(self, *a, **kw)
        perm = torch.randperm(len(data.bd_train), generator=torch.Generator().manual_seed(1))
        data.bd_train.poison = data.bd_train.poison[perm]
        data.bd_train.original_labels = data.bd_train.original_labels[perm]
        return data

    monkeypatch.setattr(records.AttackRecord, "load_data", scrambled)
    other = _net_state(_run("--resume", "false", "--overwrite", "true"))
    assert all(torch.equal(reference[k], other[k]) for k in reference)


def test_resume_after_kill_ends_with_the_same_model(digits_copy, monkeypatch):
    uninterrupted = _net_state(_run())
    calls = []
    real = burn_mod.finetune_set

    def killed_at_iteration_2(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(burn_mod, "finetune_set", killed_at_iteration_2)
    with pytest.raises(SystemExit):
        _run("--resume", "false", "--overwrite", "true")  # the finished output is moved aside
    state = safe_torch_load(digits_copy / "record/badnet_digits/defense/burn/checkpoint/burn_state.pt")
    assert state["completed"] == 1
    monkeypatch.setattr(burn_mod, "finetune_set", real)
    calls.clear()
    counting = []
    monkeypatch.setattr(burn_mod, "finetune_set", lambda *a, **kw: counting.append(1) or real(*a, **kw))
    resumed_run = _run()
    resumed = _net_state(resumed_run)
    assert len(counting) == 1  # only iteration 2 was left
    cost = resumed_run["cost"]  # the scan and iterations 0-1 of the killed process count too
    assert cost["wall_time_s_all_sessions"] > cost["wall_time_s"] + cost["burn"]["timings_s"]["scan"] * 0.99
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    df = pd.read_csv(digits_copy / "record/badnet_digits/defense/burn/burn_df.csv")
    assert df["iteration"].tolist() == [0, 1, 2]
    counting.clear()
    fresh = _run("--resume", "false", "--overwrite", "true")  # starts over: all three fine-tunings again
    assert len(counting) == 3
    assert "wall_time_s_all_sessions" not in fresh["cost"]


def test_resume_refuses_a_checkpoint_of_other_settings(digits_copy, capsys):
    _run()
    (digits_copy / "record/badnet_digits/defense/burn/defense_result.pt").unlink()  # as if killed at the end
    with pytest.raises(SystemExit) as exit_info:
        _run("--kp_end", "0.05")
    assert exit_info.value.code == 2
    assert "--resume false" in capsys.readouterr().err


def test_frozen_bn_step_trains_weights_but_keeps_running_statistics():
    from burnkit.data import Batch
    from burnkit.defenses.burn import frozen_bn_step
    from burnkit.engine import StepContext

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).train()
    stats = net[1].running_mean.clone(), net[1].running_var.clone()
    weight = net[0].weight.detach().clone()
    x = torch.rand(8, 3, 6, 6) * 5  # far from the running statistics (0, 1)
    y = torch.randint(0, 3, (8,))
    batch = Batch(x, y, y, torch.zeros(8, dtype=torch.bool), torch.arange(8), torch.arange(8))
    frozen_bn_step(net, batch, torch.optim.SGD(net.parameters(), lr=0.1), StepContext(torch.device("cpu"), False, None))
    assert torch.equal(net[1].running_mean, stats[0]) and torch.equal(net[1].running_var, stats[1])
    assert not torch.equal(net[0].weight, weight)
