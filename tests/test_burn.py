"""BURN (burnkit.defenses.burn): schedules, scores, selection sets, outputs, resume, no flag use."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from baseline_checks import scramble_poison_flags
from burnkit import records
from burnkit.data import ImageSet
from burnkit.defenses import burn as burn_mod
from burnkit.defenses import burn_checks
from burnkit.boundary import BoundaryResult
from burnkit.defenses.burn import (Burn, BurnConfig, composite_score, detection_summary, finetune_set,
                                   linear_schedule, prediction_divergence, schedule, select, selection_quality,
                                   share_count)
from burnkit.errors import BurnError
from burnkit.safe_load import safe_torch_load

FAST = ["--iterations", "2", "--epochs", "1", "--batch_size", "64", "--max_iter", "20", "--candidates", "4",
        "--progress", "false", "--kp_start", "0.02", "--kp_end", "0.04", "--kc_start", "0.1",
        "--kc_end", "0.2"]
# The digits record's poison is not far from the boundary (distance AUROC about 0.5), so whether BURN's
# premise test passes on it hangs on the trained model's exact floats (one CPU stops at iteration 0,
# another goes on). Tests of the pipeline switch the checks off; tests of the checks say so explicitly.
CHECKS_OFF = ["--premise_check", "false"]
CHECKS_ON = ["--premise_check", "true"]
# the checks run after every step but cannot fire: any enrichment passes, any share, any drop, any rise
CHECKS_THAT_CANNOT_FIRE = [*CHECKS_ON, "--premise_min_enrichment", "1", "--premise_max_adv_share", "1",
                           "--collapse_retention_drop", "1", "--max_target_rise", "1", "--max_retention_drop", "1",
                           "--min_unlearning_ratio", "0"]


def _run(*extra):
    return Burn.main(["--result_file", "badnet_digits", *FAST, *CHECKS_OFF, *extra])


def _stops(folder) -> list:
    """The ``stopped`` column of a run's burn_df.csv (empty cells: the run went on)."""
    frame = pd.read_csv(folder / "burn_df.csv")
    return frame["stopped"].dropna().tolist() if "stopped" in frame else []


def _net_state(result):
    return {k: v.clone() for k, v in result["model"].net.state_dict().items()}


def test_linear_schedules_follow_the_paper():
    cfg = BurnConfig(iterations=20, kc_factor=1.0)  # the paper's k_c; kc_factor is tested below
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
    assert det["auroc_l2"] == pytest.approx(13 / 16) and det["auroc_final_score_after_finetuning"] == pytest.approx(3 / 16)
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
    with pytest.raises(BurnError, match="premise_share"):
        BurnConfig(premise_share=0.0).validate()
    with pytest.raises(BurnError, match="premise_min_enrichment"):
        BurnConfig(premise_min_enrichment=0.5).validate()
    with pytest.raises(BurnError, match="max_retention_drop"):
        BurnConfig(max_retention_drop=1.5).validate()


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
    skipped = df[["n_skipped_unflipped", "n_skipped_own_label", "n_skipped_target"]].sum(axis=1)
    for t in range(3):
        kp, kc, _ = schedule(cfg, t)
        assert df["n_ranked_poison"][t] == share_count(kp, n)
        assert df["n_poison"][t] + skipped[t] == share_count(kp, n)
        assert df["n_clean"][t] == (0 if t == 0 else share_count(kc, n))  # Phase 1: poison set only
        chosen = samples["selected_poison_iters"].str.split(";").apply(lambda v: str(t) in v)
        assert chosen.sum() == df["n_poison"][t]
        assert (samples["relabel_rule"][chosen] == "relabel").all()
    # Phase 1 picks the largest boundary distances, less the samples a safeguard leaves out
    top = samples.nlargest(share_count(0.02, n), "boundary_l2")
    phase1 = top["selected_poison_iters"].str.split(";").apply(lambda v: "0" in v)
    assert phase1.equals(top["relabel_rule"] == "relabel")
    assert not ((samples["relabel"] == samples["label"]) & (samples["relabel_rule"] == "relabel")).any()
    detection = json.loads((out / "burn_detection.json").read_text())
    assert {"auroc_l2", "auroc_final_score_after_finetuning", "mean_l2_clean", "mean_l2_poison"} <= set(detection)
    # the digits record's poison is not far from the boundary (AUROC about 0.5, either side by seed): the
    # paper's observation is asserted on the CIFAR-10 fixture (test_burn_removes_a_backdoor_...) instead
    assert detection["mean_l2_poison"] > 0 and detection["mean_l2_clean"] > 0
    assert result["cost"]["burn"]["timings_s"]["scan"] > 0
    assert {"is_poison", "original_label"} <= set(samples)
    # shares are written as the exact ratio k/n (0.2, never float32's 0.20000000298023224)
    text = pd.read_csv(out / "burn_df.csv", dtype=str, keep_default_na=False)
    denominators = {"poison_precision": df["n_poison"], "clean_set_poison_rate": df["n_clean"],
                    "poison_recall": [int(samples["is_poison"].sum())] * 3, "train_target_share": [n] * 3}
    checked = 0
    for column, counts in denominators.items():
        for value, count in zip(text[column], counts):
            if value:
                assert value == repr(round(float(value) * int(count)) / int(count)), (column, value, count)
                checked += 1
    assert checked >= 8


def test_algorithm_never_reads_the_poison_flags(digits_copy, monkeypatch):
    # the checks at their defaults: whether or not they stop BURN on this record, the flags must not matter
    reference = _net_state(_run("--resume", "false", *CHECKS_ON))
    scramble_poison_flags(monkeypatch)
    other = _net_state(_run("--resume", "false", "--overwrite", "true", *CHECKS_ON))
    assert all(torch.equal(reference[k], other[k]) for k in reference)


@pytest.mark.parametrize("extra", [CHECKS_THAT_CANNOT_FIRE, CHECKS_OFF], ids=["checks-on", "checks-off"])
def test_resume_after_kill_ends_with_the_same_model(digits_copy, monkeypatch, extra):
    """With the checks on, the last good model is kept in memory for a fall-back; off, only on disk."""
    uninterrupted = _net_state(_run(*extra))
    assert _stops(digits_copy / "record/badnet_digits/defense/burn") == []  # all three fine-tunings ran
    calls = []
    real = burn_mod.finetune_set

    def killed_at_iteration_2(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(burn_mod, "finetune_set", killed_at_iteration_2)
    with pytest.raises(SystemExit):
        _run("--resume", "false", "--overwrite", "true", *extra)  # the finished output is moved aside
    state = safe_torch_load(digits_copy / "record/badnet_digits/defense/burn/checkpoint/burn_state.pt")
    assert state["completed"] == 1
    monkeypatch.setattr(burn_mod, "finetune_set", real)
    calls.clear()
    counting = []
    monkeypatch.setattr(burn_mod, "finetune_set", lambda *a, **kw: counting.append(1) or real(*a, **kw))
    resumed_run = _run(*extra)
    resumed = _net_state(resumed_run)
    assert len(counting) == 1  # only iteration 2 was left
    cost = resumed_run["cost"]  # the scan and iterations 0-1 of the killed process count too
    assert cost["wall_time_s_all_sessions"] > cost["wall_time_s"] + cost["burn"]["timings_s"]["scan"] * 0.99
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    df = pd.read_csv(digits_copy / "record/badnet_digits/defense/burn/burn_df.csv")
    assert df["iteration"].tolist() == [0, 1, 2]
    counting.clear()
    fresh = _run("--resume", "false", "--overwrite", "true", *extra)  # starts over: all three fine-tunings again
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


# --------------------------------------------------------------------------- safeguards (issue 16)


def _result(l2, adv, clean, converged, nearest=None):
    n = len(l2)
    return BoundaryResult(torch.as_tensor(l2, dtype=torch.float), torch.as_tensor(adv), torch.ones(n, dtype=torch.long),
                          torch.as_tensor(converged), torch.as_tensor(clean),
                          nearest_label=None if nearest is None else torch.as_tensor(nearest))


def test_finetune_set_uses_adversarial_labels_not_the_carried_or_original_ones():
    # carried labels (what the record trained on) differ from the original labels for the poison (4-5)
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 2).clone()
    carried, original = torch.tensor([1, 2, 3, 0, 0, 0]), torch.tensor([1, 2, 3, 0, 5, 6])
    train = ImageSet(images, carried, original, torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool), torch.arange(6))
    relabel = torch.tensor([7, 7, 7, 7, 8, 9])
    ft = finetune_set(train, torch.tensor([5, 4]), relabel, torch.tensor([0, 2]))
    assert ft.labels.tolist() == [9, 8, 1, 3]  # D_poison: adversarial labels; D_clean: carried labels
    assert ft.original_labels.tolist() == [6, 5, 1, 3]  # untouched, for reporting
    assert ft.images[:, 0, 0, 0].tolist() == [5, 4, 0, 2]
    assert ft.poison.tolist() == [True, True, False, False]


def test_relabel_plan_never_relabels_with_the_own_label_or_towards_the_target():
    # 0: flipped to 2; 1: not flipped (adv = clean prediction 0 = target), nearest boundary class 4;
    # 2: flipped to its carried label 5; 3: flipped to the target 0; 4: not flipped, clean prediction 3
    carried = torch.tensor([1, 0, 5, 6, 3])
    res = _result([1, 2, 3, 4, 5], adv=[2, 0, 5, 0, 3], clean=[1, 0, 7, 6, 3],
                  converged=[True, False, True, True, False], nearest=[2, 4, 5, 0, 9])
    paper = BurnConfig(paper_exact=True).safeguards()
    relabel, reason = burn_mod.relabel_plan(res, carried, paper, target=0)
    assert relabel.tolist() == [2, 0, 5, 0, 3] and (reason == burn_mod.RELABEL).all()  # Algorithm 1 literally
    relabel, reason = burn_mod.relabel_plan(res, carried, BurnConfig().safeguards(), target=0)
    R, U, O, T = burn_mod.RELABEL, burn_mod.UNFLIPPED, burn_mod.OWN_LABEL, burn_mod.TARGET
    assert reason.tolist() == [R, U, O, T, U]
    relabel, reason = burn_mod.relabel_plan(res, carried, BurnConfig(unflipped="nearest").safeguards(), target=0)
    assert relabel.tolist() == [2, 4, 5, 0, 9] and reason.tolist() == [R, R, O, T, R]
    relabel, reason = burn_mod.relabel_plan(res, carried, BurnConfig(unflipped="prediction").safeguards(), target=None)
    # no suspected target: only the own-label rule; sample 1's own prediction is its carried label 0
    assert reason.tolist() == [R, O, O, R, O]
    # suspect_label_only: only samples carrying the suspected target's label (0) may be relabelled
    only = BurnConfig(unflipped="nearest", suspect_label_only=True).safeguards()
    relabel, reason = burn_mod.relabel_plan(res, carried, only, target=0)
    assert reason.tolist() == [burn_mod.OTHER_LABEL, R, O, T, burn_mod.OTHER_LABEL]
    assert burn_mod.relabel_plan(res, carried, only, target=None)[1].tolist() == [R, R, O, R, R]  # no suspect: no rule


def test_clean_shares_are_doubled_by_default_and_the_papers_under_paper_exact():
    """kc_factor 2 keeps 5 -> 10 % as clean (the paper's §6.3 ablation); paper_exact runs the paper's 2.5 -> 5 %."""
    T = 20
    default = BurnConfig(iterations=T)
    paper = BurnConfig(iterations=T, paper_exact=True, kc_factor=3.0)  # paper_exact wins over the key
    assert [round(schedule(default, t)[1], 6) for t in (0, 10, 20)] == [0.05, 0.075, 0.1]
    assert [round(schedule(paper, t)[1], 6) for t in (0, 10, 20)] == [0.025, 0.0375, 0.05]
    assert schedule(BurnConfig(iterations=T, kc_factor=1.0), T)[1] == pytest.approx(0.05)
    assert schedule(default, T)[0] == pytest.approx(0.01) and schedule(paper, T)[0] == pytest.approx(0.01)
    with pytest.raises(BurnError, match="overlap"):  # 0.9 x 2 clean + 0.01 poison > the whole set
        BurnConfig(kc_end=0.5).validate()
    BurnConfig(kc_end=0.5, kc_factor=1.0).validate()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(BurnError, match="kc_factor"):
            BurnConfig(kc_factor=bad).validate()


def test_paper_exact_switches_every_safeguard_off():
    cfg = BurnConfig(paper_exact=True, unflipped="nearest", avoid_target=True)
    assert cfg.safeguards() == {"unflipped": "prediction", "skip_own_label": False, "avoid_target": False,
                                "suspect_label_only": False, "premise_check": False, "keep": "last"}
    assert BurnConfig().safeguards() == {"unflipped": "skip", "skip_own_label": True, "avoid_target": True,
                                         "suspect_label_only": False, "premise_check": True, "keep": "best"}
    with pytest.raises(BurnError, match="unflipped"):
        BurnConfig(unflipped="closest").validate()
    # the paper's boundary attack: every class (argmin over k != k̂), its per-step update, no clipping
    assert BurnConfig(paper_exact=True, candidates=3, clip=True).scan_settings() == {
        "candidates": None, "clip": False, "step_rule": "step"}
    assert BurnConfig().scan_settings() == {"candidates": 3, "clip": True, "step_rule": "total"}
    assert BurnConfig(candidates=0).scan_settings()["candidates"] is None


def test_paper_exact_scans_with_the_papers_attack(digits_copy, monkeypatch):
    """What reaches the scan, not only the config: every class, the per-step rule, no bounds."""
    seen = {}
    real = burn_mod.scan

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(burn_mod, "scan", spy)
    _run("--paper_exact", "true", "--iterations", "0", "--candidates", "3")
    assert seen["candidates"] is None and seen["step_rule"] == "step"
    assert seen["lower"] is None and seen["upper"] is None
    detection = json.loads((digits_copy / "record/badnet_digits/defense/burn/burn_detection.json").read_text())
    assert detection["scan"] == {"candidates": None, "clip": False, "step_rule": "step"}
    seen.clear()
    _run("--iterations", "0", "--candidates", "3", "--output_name", "defaults")
    assert seen["candidates"] == 3 and seen["step_rule"] == "total" and seen["lower"] is not None


def _premise(l2, labels, crossed, num_classes=4, share=0.25, min_enrichment=1.5, max_adv_share=0.5):
    return burn_checks.premise_test(torch.as_tensor(l2, dtype=torch.float), torch.as_tensor(crossed),
                                    torch.as_tensor(labels), num_classes, share, min_enrichment, max_adv_share)


def test_suspected_target_is_the_label_enriched_among_the_farthest_samples():
    # 20 samples; base shares: class 0 carries 8 (0.4), classes 1-3 four each (0.2)
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 4 + [3] * 4)
    l2 = torch.arange(20, dtype=torch.float)  # the farthest five: positions 15-19 (class 3 x4, class 2 x1)
    spread = torch.tensor([0] * 16 + [0, 1, 2, 0])  # class 3's farthest cross to 0, 1, 2, 0: top share 2 of 4
    found = _premise(l2, labels, spread)
    # class 3: 4 of 5 = 0.8 of the top over 0.2 overall = 4x
    assert found["class"] == 3 and found["enrichment"] == pytest.approx(4.0) and found["n_top"] == 5
    assert found["share_in_top"] == pytest.approx(0.8) and found["share_overall"] == pytest.approx(0.2)
    assert found["adv_label"] == 0 and found["adv_share"] == pytest.approx(0.5) and found["reason"] is None
    # the farthest samples carry the labels in proportion to the whole set: no suspect, the premise fails
    l2 = torch.tensor([float(i in (0, 1, 8, 12, 16)) for i in range(20)])  # top five: 0, 0, 1, 2, 3
    found = _premise(l2, labels, spread)
    assert found["class"] is None and found["enrichment"] == pytest.approx(1.0)
    assert "no label above 1.5x" in found["reason"]


def test_premise_test_refuses_an_easy_class_that_crosses_to_one_neighbour():
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 4 + [3] * 4)
    l2 = torch.arange(20, dtype=torch.float)
    one_way = torch.zeros(20, dtype=torch.long)
    one_way[16:20] = torch.tensor([1, 1, 1, 2])  # an easy class: 3 of 4 cross to class 1
    found = _premise(l2, labels, one_way)
    assert found["class"] is None and found["candidate"] == 3 and found["enrichment"] == pytest.approx(4.0)
    assert found["adv_label"] == 1 and found["adv_share"] == pytest.approx(0.75)
    assert "75% cross to class 1" in found["reason"] and "limit 50%" in found["reason"]
    # the sample at position 15 (class 2, also among the farthest five) does not count: only class 3's do
    one_way[15] = 1
    assert _premise(l2, labels, one_way)["adv_share"] == pytest.approx(0.75)
    # samples the attack did not flip (-1) do not count: 2 of the 3 flipped ones cross to class 1
    one_way[16] = -1
    unflipped = _premise(l2, labels, one_way)
    assert unflipped["adv_share"] == pytest.approx(2 / 3) and unflipped["class"] is None
    # with the check off (max share 1) the class stays suspected, for avoid_target
    assert _premise(l2, labels, one_way, max_adv_share=1.0)["class"] == 3


def test_premise_test_finds_a_target_enriched_behind_an_easy_class():
    """Class 3 (easy) is the most enriched among the farthest eight but crosses one way; class 0 (the
    target) is enriched too and crosses to many classes: it is the suspect, found second."""
    labels = torch.tensor([0] * 12 + [1] * 12 + [2] * 12 + [3] * 4)
    l2 = torch.zeros(40)
    far = [36, 37, 38, 39, 8, 9, 10, 11]  # class 3 x4 (0.5 / 0.1: 5x), class 0 x4 (0.5 / 0.3: 1.67x)
    l2[far] = torch.arange(1, 9, dtype=torch.float)
    crossed = torch.zeros(40, dtype=torch.long)
    crossed[[36, 37, 38, 39]] = 2  # the easy class: all to class 2
    crossed[[8, 9, 10, 11]] = torch.tensor([1, 2, 3, 1])  # the target's far samples: back to several classes
    found = _premise(l2, labels, crossed, share=0.2)
    assert [r["class"] for r in found["tested"]] == [3, 0]
    assert found["class"] == 0 and found["candidate"] == 0 and found["adv_share"] == pytest.approx(0.5)
    only_top = _premise(l2, labels, crossed, share=0.2, min_enrichment=2.0)  # class 0 is no longer a candidate
    assert only_top["class"] is None and "class 3 (5.00x): 100% cross to class 2" in only_top["reason"]


def test_training_signals_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    preds0 = torch.tensor([0, 0, 1, 1, 2, 0, 3, 1])  # 5 correct; 2 of them predicted as the target 0
    preds = torch.tensor([0, 3, 0, 1, 2, 0, 0, 0])
    s = burn_checks.training_signals(preds0, preds, labels, target=0)
    # reference: samples 2, 3, 4, 6 (correct, not target); still right: 3, 4
    assert s["retention"] == 2 / 4 and s["target_share"] == 5 / 8
    # target-labelled and predicted as the target by θ0: samples 0 and 1; sample 1 left the target
    assert s["target_left"] == 1 / 2
    untouched = torch.tensor([True, True, False, True, True, True, True, True])  # sample 2 was trained on
    s_untouched = burn_checks.training_signals(preds0, preds, labels, 0, untouched)
    assert s_untouched["retention"] == 2 / 3  # samples 3, 4, 6: 3 and 4 right
    s0 = burn_checks.training_signals(preds0, preds0, labels, target=0)
    assert s0["retention"] == 1.0 and s0["target_share"] == 3 / 8 and s0["target_left"] == 0.0
    fail = burn_checks.training_failure
    assert fail(s, s0, 0.6, 0.4) is None
    assert "lost 50.0%" in fail(s, s0, 0.4, 0.4)
    assert "37.5% to 62.5%" in fail(s, s0, 0.6, 0.2)


def test_test_labels_do_not_influence_the_repaired_model(digits_copy, monkeypatch):
    reference = _net_state(_run("--resume", "false", *CHECKS_ON))
    original_load = records.AttackRecord.load_data

    def scrambled(self, *a, **kw):
        data = original_load(self, *a, **kw)
        gen = torch.Generator().manual_seed(2)
        for split in (data.clean_test, data.bd_test):
            split.labels = split.labels[torch.randperm(len(split), generator=gen)]
            split.original_labels = split.original_labels[torch.randperm(len(split), generator=gen)]
        return data

    monkeypatch.setattr(records.AttackRecord, "load_data", scrambled)
    other = _run("--resume", "false", "--overwrite", "true", *CHECKS_ON)
    assert all(torch.equal(reference[k], v) for k, v in _net_state(other).items())
    assert other["final"]["test_acc"] < 0.5  # the scrambled labels were in use for the scores


def test_unflipped_samples_are_never_relabelled_with_their_own_prediction(digits_copy):
    out = digits_copy / "record" / "badnet_digits" / "defense"
    # max_iter 1: the attack leaves many samples unflipped, some of them among the farthest (with 3 steps
    # whether any unflipped sample ranks among the chosen hangs on the record's seed)
    _run("--max_iter", "1", "--output_name", "safe")
    _run("--max_iter", "1", "--paper_exact", "true", "--output_name", "paper")
    safe = pd.read_csv(out / "safe" / "burn_samples.csv", keep_default_na=False)
    paper = pd.read_csv(out / "paper" / "burn_samples.csv", keep_default_na=False)
    stuck = ~safe["attack_converged"].astype(bool)
    assert stuck.sum() > 10
    chosen_safe = safe["selected_poison_iters"] != ""
    chosen_paper = paper["selected_poison_iters"] != ""
    assert not (stuck & chosen_safe).any()  # left out of every D_poison
    stuck_paper = ~paper["attack_converged"].astype(bool)  # the paper's own attack: every class, no clipping
    assert (stuck_paper & chosen_paper).sum() > 0  # Algorithm 1 literally relabels some of them ...
    detection = lambda name: json.loads((out / name / "burn_detection.json").read_text())  # noqa: E731
    assert detection("paper")["kc_factor"] == 1.0 and detection("safe")["kc_factor"] == 2.0  # the factor in force
    literal = paper[stuck_paper & chosen_paper]
    assert (literal["relabel"] == literal["clean_pred"]).all()  # ... with their own prediction
    df = pd.read_csv(out / "safe" / "burn_df.csv")
    assert df["n_skipped_unflipped"].sum() > 0
    assert (df["n_poison"] + df["n_skipped_unflipped"] + df["n_skipped_own_label"] + df["n_skipped_target"]
            == df["n_ranked_poison"]).all()


def test_a_failing_premise_stops_burn_and_keeps_the_model_it_was_given(digits_copy):
    from burnkit.models import build_classifier, load_bb_state_dict
    from burnkit.records import read_attack_record

    result = _run(*CHECKS_ON, "--premise_min_enrichment", "100")  # no label can be that enriched: fails before Phase 1
    record = read_attack_record(digits_copy / "record" / "badnet_digits")
    theta0 = build_classifier(record.model_name, record.info, record.num_classes)
    load_bb_state_dict(theta0, record.state_dict)
    assert all(torch.equal(theta0.net.state_dict()[k], v) for k, v in _net_state(result).items())
    out = digits_copy / "record" / "badnet_digits" / "defense" / "burn"
    df = pd.read_csv(out / "burn_df.csv")
    assert df["iteration"].tolist() == [0] and "poison is not far from the boundary" in df["stopped"][0]
    assert df["finetune_s"][0] == 0 and df["test_asr"][0] == pytest.approx(result["before"].asr)
    detection = json.loads((out / "burn_detection.json").read_text())
    assert detection["stopped"]["iteration"] == 0 and detection["stopped"]["kept"].startswith("θ0")
    assert "defense/sau.py" in detection["stopped"]["advice"]  # what the user can do instead
    assert result["cost"]["burn"]["stopped"]["reason"] == df["stopped"][0]
    logs = "".join(log.read_text() for log in (out / "log").glob("*.log"))
    assert "stopped at iteration 0" in logs and "keeps θ0" in logs and "Alternatives:" in logs
    (out / "defense_result.pt").unlink()  # as if killed at the end: the resumed run stops again
    again = _run(*CHECKS_ON, "--premise_min_enrichment", "100")
    assert all(torch.equal(theta0.net.state_dict()[k], v) for k, v in _net_state(again).items())
    # a run that stops early writes the columns of one that does not, in the same order, left empty
    _run(*CHECKS_THAT_CANNOT_FIRE, "--output_name", "full")
    full = pd.read_csv(out.parent / "full" / "burn_df.csv")
    assert list(df.columns) == list(full.columns)
    assert df[["omega", "train_retention", "train_target_share", "clean_set_poison_rate"]].isna().all(axis=None)


def test_keep_best_returns_theta0_when_no_fine_tuned_model_keeps_its_training_predictions(digits_copy):
    """--max_retention_drop 0: no fine-tuned model may lose a single correct training prediction of θ0, so
    BURN returns θ0 itself and says so; a last burn_df.csv row scores it for readers of the last row."""
    from burnkit.models import build_classifier, load_bb_state_dict
    from burnkit.records import read_attack_record

    result = _run(*CHECKS_THAT_CANNOT_FIRE, "--max_retention_drop", "0", "--test_every", "1", "--lr", "0.01")  # lr: every fine-tuning moves
    out = digits_copy / "record" / "badnet_digits" / "defense" / "burn"
    record = read_attack_record(digits_copy / "record" / "badnet_digits")
    theta0 = build_classifier(record.model_name, record.info, record.num_classes)
    load_bb_state_dict(theta0, record.state_dict)
    assert all(torch.equal(theta0.net.state_dict()[k], v) for k, v in _net_state(result).items())
    df = pd.read_csv(out / "burn_df.csv")
    assert (df["train_retention"].dropna() < 1).all()  # every fine-tuning lost some: none eligible
    assert df["iteration"].tolist()[:3] == [0, 1, 2] and pd.isna(df["iteration"].iloc[-1])
    assert df["returned_from"].iloc[-1] == -1 and df["test_asr"].iloc[-1] == pytest.approx(result["before"].asr)
    assert df["test_acc"].iloc[-1] == pytest.approx(result["before"].acc)
    assert json.loads((out / "burn_detection.json").read_text())["returned"]["iteration"] == -1
    logs = "".join(log.read_text() for log in (out / "log").glob("*.log"))
    assert "BURN returns θ0" in logs and "Alternatives:" in logs


def test_keep_best_returns_the_eligible_model_that_moved_most_target_samples_off_the_target(digits_copy):
    """Every Phase 2 model eligible: the returned one is the row with the largest train_target_left
    (the later one on a tie; Phase 1's model, iteration 0, is never returned), and its weights are
    those of that iteration's checkpoint."""
    result = _run(*CHECKS_THAT_CANNOT_FIRE, "--iterations", "3", "--test_every", "1")
    out = digits_copy / "record" / "badnet_digits" / "defense" / "burn"
    df = pd.read_csv(out / "burn_df.csv")
    tuned = df[df["iteration"].notna()]
    left = tuned["train_target_left"].tolist()
    best = max(i for i, v in enumerate(left) if i >= 1 and v == max(left[1:]))
    returned = json.loads((out / "burn_detection.json").read_text())["returned"]
    assert returned["iteration"] == best
    if best == len(left) - 1:  # the last model: no extra row
        assert len(df) == len(tuned)
    else:
        assert len(df) == len(tuned) + 1 and df["returned_from"].iloc[-1] == best
        assert df["test_acc"].iloc[-1] == pytest.approx(tuned["test_acc"].iloc[best])
        assert df["test_asr"].iloc[-1] == pytest.approx(tuned["test_asr"].iloc[best])
    assert result["final"]["test_acc"] == pytest.approx(tuned["test_acc"].iloc[best])
    # keep: last returns the last model whatever the rows say
    last = _run(*CHECKS_THAT_CANNOT_FIRE, "--iterations", "3", "--test_every", "1", "--keep", "last",
                "--output_name", "last")
    df_last = pd.read_csv(out.parent / "last" / "burn_df.csv")
    assert df_last["iteration"].notna().all() and last["final"]["test_acc"] == pytest.approx(df_last["test_acc"].iloc[-1])


def test_test_every_scores_the_test_sets_every_nth_iteration_and_the_last(digits_copy):
    _run("--iterations", "5", "--test_every", "2")
    df = pd.read_csv(digits_copy / "record/badnet_digits/defense/burn/burn_df.csv")
    assert df["iteration"].tolist() == [0, 1, 2, 3, 4, 5]
    assert df["test_acc"].notna().tolist() == [True, False, True, False, True, True]
    assert df["n_poison"].notna().all() and df["selection_auroc"].notna().all()  # the other columns stay
    cost = json.loads((digits_copy / "record/badnet_digits/defense/burn/cost.json").read_text())
    assert set(cost["burn"]["timings_s"]) == {"scan", "select", "finetune", "train_forward", "test_scoring"}


def test_selection_auroc_is_the_ranking_before_its_finetuning(digits_copy):
    _run()
    out = digits_copy / "record/badnet_digits/defense/burn"
    df = pd.read_csv(out / "burn_df.csv")
    samples = pd.read_csv(out / "burn_samples.csv", keep_default_na=False)
    from burnkit.metrics import auroc

    flags = torch.tensor(samples["is_poison"].to_numpy()).bool()
    assert df["selection_auroc"][0] == pytest.approx(auroc(torch.tensor(samples["boundary_l2"].to_numpy()), flags))
    # the last iteration's ranking is the S written to burn_samples.csv
    assert df["selection_auroc"].iloc[-1] == pytest.approx(auroc(torch.tensor(samples["S"].to_numpy()), flags))
    detection = json.loads((out / "burn_detection.json").read_text())
    assert [r["selection_auroc"] for r in detection["iterations"]] == pytest.approx(df["selection_auroc"].tolist())


def test_burn_removes_a_backdoor_where_its_premise_holds(cifar_blended_workdir, tmp_path, monkeypatch):
    """End to end on a real CIFAR-10 Blended record: the ASR must fall and the clean accuracy stay.

    Test-sized schedule (T = 3 x 5 epochs, k_p 5 -> 10 %, k_c 20 -> 40 %, lr 1e-4) on 2,000 images;
    the paper's shares and lr are for 50,000 images. Measured when written: ASR 100 -> 4.4 %, ACC 48.6 -> 48.8 %."""
    work = tmp_path / "work"
    shutil.copytree(cifar_blended_workdir, work)
    monkeypatch.chdir(work)
    # the crossing test (premise_max_adv_share) is switched off: on this 2,000-image fixture the target's
    # farthest samples cross to one class 54 % and 60 % of the time when it is trained with seeds 1 and 2,
    # above the 50 % limit, so the true target is refused (evidence against that rule); the test is
    # about removal, and the crossing test has its own tests on planted data above
    result = Burn.main(["--result_file", "blended_cifar_smallcnn", "--progress", "false", "--iterations", "3",
                        "--epochs", "5", "--lr", "1e-4", "--kp_start", "0.05", "--kp_end", "0.1", "--kc_start", "0.2",
                        "--kc_end", "0.4", "--test_every", "3", "--premise_max_adv_share", "1"])
    before, final = result["before"], result["final"]
    burn = result["cost"]["burn"]
    # the fixture first: its poison must lie far from the boundary, by a wide margin, or the test says so
    suspect = burn["suspected_target"]
    assert burn["auroc_l2"] > 0.85 and suspect["candidate"] == 0 and suspect["enrichment"] > 3, (
        f"the CIFAR-10 Blended fixture no longer has BURN's premise by a wide margin: {burn}")
    assert before.asr > 0.95
    assert final["test_asr"] < 0.5  # the backdoor is mostly removed (fixture seed 0: under 25 %, seed 2: 30 %) ...
    assert final["test_acc"] > before.acc - 0.05  # ... at little cost in clean accuracy
    assert final["test_ra"] > 0.2  # poisoned test images get their true class back
    assert burn["stopped"] is None and burn["suspected_target"]["class"] == 0  # the premise test found the target
    # Phase 1's D_poison is mostly poison: over 3x the 10 % poison rate (measured 0.475 on an Intel Xeon
    # with AVX-512, above 0.5 on an AMD EPYC; the scan's float sums differ between the two)
    assert burn["iterations"][0]["poison_precision"] > 0.3


def test_finetune_sets_with_a_single_sample_batch_or_a_single_sample(digits_copy):
    # Phase 1 only, Algorithm 1 exactly: k_p^0 2 % of 1,437 = 29 samples, batch 28 -> a last batch of one,
    # which BatchNorm cannot train on: it is dropped, the run goes through
    result = _run("--paper_exact", "true", "--iterations", "0", "--batch_size", "28")
    df = pd.read_csv(digits_copy / "record/badnet_digits/defense/burn/burn_df.csv")
    assert df["n_poison"].tolist() == [29] and df["finetune_s"][0] > 0
    # one sample left (k_p^0 = 1 of 1,437): nothing to fine-tune, the model stays θ0
    again = _run("--paper_exact", "true", "--iterations", "0", "--kp_start", "0.0005", "--overwrite", "true")
    df = pd.read_csv(digits_copy / "record/badnet_digits/defense/burn/burn_df.csv")
    assert df["n_poison"].tolist() == [1] and df["finetune_s"][0] == 0
    assert again["final"]["test_acc"] == pytest.approx(again["before"].acc)
    assert result["final"]["test_acc"] is not None


def test_a_train_subset_record_is_scanned_and_tuned_on_the_trained_samples_only(tmp_path, monkeypatch):
    """A ``--train_subset`` record stores ``bd_train`` over the whole split (BackdoorBench's layout) and
    the indices the model trained on as ``train_subset_index``: BURN must work on those alone."""
    from conftest import make_record

    record_dir = make_record(tmp_path, "badnet", "badnet_subset", ["--train_subset", "600", "--epochs", "5"])
    raw = safe_torch_load(record_dir / "attack_result.pt", "record")
    trained = raw["train_subset_index"]
    assert len(raw["bd_train"]["original_index_array"]) == 1437 and len(trained) == 600  # whole split stored
    monkeypatch.chdir(tmp_path)
    Burn.main(["--result_file", "badnet_subset", *FAST, *CHECKS_OFF])
    out = record_dir / "defense" / "burn"
    samples = pd.read_csv(out / "burn_samples.csv", keep_default_na=False)
    assert sorted(samples["index"]) == sorted(int(i) for i in trained)
    assert samples["is_poison"].sum() == 60 == int((raw["bd_train"]["poison_indicator"] == 1).sum())
    selected = samples[(samples["selected_poison_iters"] != "") | (samples["selected_clean_iters"] != "")]
    assert len(selected) > 0 and set(selected["index"]) <= {int(i) for i in trained}
    df = pd.read_csv(out / "burn_df.csv")
    assert df["n_ranked_poison"].tolist() == [share_count(k, 600) for k in (0.02, 0.03, 0.04)]
    logs = "".join(p.read_text() for p in (out / "log").glob("*.log"))
    assert "boundary scan of 600 samples" in logs


def test_phase_one_is_neither_judged_nor_returned_and_unlearning_must_be_specific():
    """check_failure skips iteration 0 (Phase 1's warm start on D_poison alone); _eligible never takes
    it, and takes a Phase 2 model only if it moved the target-labelled samples off the target at least
    min_unlearning_ratio times as fast as it lost θ0's other correct predictions (loss floored at 1 %)."""
    cfg = BurnConfig()
    signals0 = {"retention": 1.0, "target_share": 0.10, "target_left": 0.0}
    collapsed = {"retention": 0.5, "target_share": 0.30, "target_left": 0.9}
    assert burn_mod.check_failure(0, collapsed, signals0, cfg) is None
    assert "lost 50.0%" in burn_mod.check_failure(1, collapsed, signals0, cfg)
    unlearning = {"retention": 0.95, "target_share": 0.10, "target_left": 0.30}  # 0.30 >= 4 x 0.05
    assert not burn_mod._eligible(0, unlearning, signals0, cfg)
    assert burn_mod._eligible(1, unlearning, signals0, cfg)
    damage = {"retention": 0.95, "target_share": 0.10, "target_left": 0.19}  # 0.19 < 4 x 0.05
    assert not burn_mod._eligible(1, damage, signals0, cfg)
    assert burn_mod._eligible(1, damage, signals0, BurnConfig(min_unlearning_ratio=3.0))
    untouched = {"retention": 1.0, "target_share": 0.10, "target_left": 0.03}  # 0.03 < 4 x 0.01 (the floor)
    assert not burn_mod._eligible(1, untouched, signals0, cfg)
    with pytest.raises(BurnError, match="min_unlearning_ratio"):
        BurnConfig(min_unlearning_ratio=float("inf")).validate()


def test_a_failure_at_the_first_judged_fine_tuning_falls_back_to_theta0(digits_copy):
    """--collapse_retention_drop 0: the first Phase 2 fine-tuning (iteration 1) loses some correct
    training prediction and stops the run; BURN keeps θ0, not Phase 1's model, and says so."""
    from burnkit.models import build_classifier, load_bb_state_dict
    from burnkit.records import read_attack_record

    result = _run(*CHECKS_THAT_CANNOT_FIRE, "--collapse_retention_drop", "0", "--lr", "0.01", "--iterations", "3")
    out = digits_copy / "record" / "badnet_digits" / "defense" / "burn"
    df = pd.read_csv(out / "burn_df.csv")
    assert df["iteration"].tolist() == [0, 1] and pd.isna(df["stopped"][0]) and "lost" in df["stopped"][1]
    detection = json.loads((out / "burn_detection.json").read_text())
    assert detection["stopped"]["iteration"] == 1 and detection["stopped"]["kept"].startswith("θ0")
    assert detection["returned"]["iteration"] == -1
    record = read_attack_record(digits_copy / "record" / "badnet_digits")
    theta0 = build_classifier(record.model_name, record.info, record.num_classes)
    load_bb_state_dict(theta0, record.state_dict)
    assert all(torch.equal(theta0.net.state_dict()[k], v) for k, v in _net_state(result).items())
    assert df["test_acc"].iloc[-1] == pytest.approx(result["before"].acc)


def test_premise_test_tries_only_the_one_inflated_label_when_there_is_one():
    """Class 0 carries twice the median label count (all-to-one poison relabelled to it) but is not far
    from the boundary; class 3 (an easy class) is the most enriched and crosses to many classes. Without
    the inflation rule class 3 is suspected; with it only class 0 is tried, and the premise fails,
    saying why. With two inflated classes (a naturally imbalanced set) the rule does not apply."""
    labels = torch.tensor([0] * 16 + [1] * 8 + [2] * 8 + [3] * 8)
    l2 = torch.zeros(40)
    far = [32, 33, 34, 35, 36, 0, 17, 25]  # farthest 8: class 3 x5, class 0 x1, class 1 x1, class 2 x1
    l2[far] = torch.arange(8, 0, -1, dtype=torch.float)
    crossed = torch.tensor([1, 2, 3, 1] * 10)  # every class crosses to several classes
    crossed[[32, 33, 34, 35, 36]] = torch.tensor([0, 1, 2, 0, 1])  # class 3's farthest: at most 40 % to one
    plain = burn_checks.premise_test(l2, crossed, labels, 4, 0.2, 1.5, 0.5)
    assert plain["class"] == 3 and plain["inflated"] is None
    ruled = burn_checks.premise_test(l2, crossed, labels, 4, 0.2, 1.5, 0.5, min_inflation=1.5)
    assert ruled["class"] is None and ruled["inflated"] == 0 and ruled["candidate"] == 0
    assert "class 0's label is carried by 2.00x" in ruled["reason"] and "not far from the boundary" in ruled["reason"]
    # the inflated class far from the boundary: it is the suspect
    l2_target = torch.zeros(40)
    l2_target[[1, 2, 3, 4, 5, 32, 17, 25]] = torch.arange(8, 0, -1, dtype=torch.float)
    assert burn_checks.premise_test(l2_target, crossed, labels, 4, 0.2, 1.5, 0.5, min_inflation=1.5)["class"] == 0
    # two classes at twice the median: no single poison label stands out, the rule does not apply
    imbalanced = torch.tensor([0] * 12 + [1] * 6 + [2] * 6 + [3] * 12 + [1] * 4)
    assert burn_checks.premise_test(l2, crossed, imbalanced, 4, 0.2, 1.5, 0.5, min_inflation=1.5)["inflated"] is None
    with pytest.raises(BurnError, match="premise_min_inflation"):
        BurnConfig(premise_min_inflation=-1).validate()


def test_after_a_late_stop_the_report_names_the_model_keep_best_returned():
    """A stop at iteration 4 loads iteration 3's model, but keep: best may return another (θ0 on the
    held-out SSBA record): burn_detection.json's stopped.kept must name the model returned."""
    state = {"stopped": {"iteration": 4, "reason": "r", "kept": "the model keep: best picks among those before it"},
             "returned": {"iteration": -1, "why": "no fine-tuned model kept θ0's training predictions"}}
    burn_mod._name_the_kept_model(state)
    assert state["stopped"]["kept"].startswith("θ0")
    state["returned"] = {"iteration": 2, "why": "best"}
    burn_mod._name_the_kept_model(state)
    assert state["stopped"]["kept"] == "the model of iteration 2"
    unstopped = {"stopped": None, "returned": {"iteration": 2, "why": "best"}}
    burn_mod._name_the_kept_model(unstopped)
    assert unstopped["stopped"] is None
