"""experiments/burn_corpus/analyse.py replays BURN's checks and ``keep: best`` from a run's trace. The
calibration tables are only worth reading if that replay returns what BURN itself returns: these tests
hold it to a hand-made table (with the cases a looser rule gets wrong) and to a real BURN run."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from burnkit.defenses.burn import Burn, BurnConfig
from burnkit.safe_load import safe_torch_load

ROOT = Path(__file__).resolve().parents[1]


def _analyse():
    spec = importlib.util.spec_from_file_location("burn_corpus_analyse", ROOT / "experiments/burn_corpus/analyse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(*rows):
    """iteration, retention on untouched samples, target share, θ0's target share, target-labelled left."""
    return pd.DataFrame([{"iteration": i, "retention_untouched": r, "target_share": s, "target_share0": s0,
                          "target_labelled_left": left} for i, r, s, s0, left in rows])


def test_keep_replay_follows_burns_rules_by_hand():
    analyse = _analyse()
    cfg = BurnConfig()  # max_retention_drop 0.08, min_unlearning_ratio 4, collapse 0.25, target rise 0.02
    rows = _rows((0, 0.70, 0.20, 0.10, 0.95),   # Phase 1: neither judged nor returned
                 (1, 0.90, 0.10, 0.10, 0.90),   # the most left, but 10 % retention lost: not eligible
                 (2, 0.95, 0.11, 0.10, 0.50),   # 0.50 >= 4 x 0.05
                 (3, 0.93, 0.10, 0.10, 0.50),   # a tie with 2: the later one (0.50 >= 4 x 0.07)
                 (4, 0.99, 0.10, 0.10, 0.40),
                 (5, 0.97, 0.10, 0.10, 0.10))   # 0.10 < 4 x 0.03: damage, not unlearning
    assert analyse.keep_outcome(rows, cfg) == {"stop": None, "returned": 3}
    # a target-share rise of 3 points stops the run at 3; the best model before it is returned
    risen = rows.copy()
    risen.loc[3, "target_share"] = 0.13
    assert analyse.keep_outcome(risen, cfg) == {"stop": 3, "returned": 2}
    # a collapse (retention 0.70) at 1: the run stops before any model is eligible -> θ0 (None)
    collapsed = rows.copy()
    collapsed.loc[1, "retention_untouched"] = 0.70
    assert analyse.keep_outcome(collapsed, cfg) == {"stop": 1, "returned": None}
    # the ratio floors the loss at 1 %: 0.03 left with no loss is below 4 x 0.01
    assert analyse.keep_outcome(_rows((0, 1.0, 0.1, 0.1, 0.0), (1, 1.0, 0.1, 0.1, 0.03)), cfg)["returned"] is None


def test_premise_verdict_scores_the_named_class_against_the_true_target():
    analyse = _analyse()
    assert analyse.premise_outcome({"premise_named": 0, "true_target": 0})["verdict"] == "names the target"
    assert analyse.premise_outcome({"premise_named": 3, "true_target": 0})["verdict"] == "names a wrong class"
    assert analyse.premise_outcome({"premise_named": float("nan"), "true_target": 0})["verdict"] == "stops"


def test_keep_replay_returns_what_a_burn_run_returned(digits_copy):
    """A real run with the checks on (thresholds that let some fine-tunings through and not others) and
    its trace: replaying the trace with the run's own suspected class gives the run's returned model."""
    analyse = _analyse()
    out = digits_copy / "record" / "badnet_digits" / "defense" / "burn"
    args = ["--result_file", "badnet_digits", "--iterations", "4", "--epochs", "1", "--batch_size", "64",
            "--max_iter", "20", "--candidates", "4", "--progress", "false", "--kp_start", "0.02", "--kp_end",
            "0.04", "--kc_start", "0.1", "--kc_end", "0.2", "--lr", "0.005", "--trace", "true",
            "--premise_check", "true", "--premise_min_enrichment", "1", "--premise_max_adv_share", "1",
            "--collapse_retention_drop", "1", "--max_target_rise", "1"]
    Burn.main([*args, "--max_retention_drop", "1"])
    trace = safe_torch_load(out / "burn_trace.pt", "trace")
    suspect = trace["target"]["class"]
    rows = pd.DataFrame(analyse.iteration_rows(trace, suspect))
    drops = sorted(1 - rows["retention_untouched"])
    assert drops[0] < drops[-1], "the fine-tunings must differ in what they lose for the test to mean anything"
    # a limit between the smallest and the largest drop: some models eligible, some not
    limit = (drops[0] + drops[-1]) / 2
    Burn.main([*args, "--max_retention_drop", str(limit), "--output_name", "limited"])
    returned = json.loads((out.parent / "limited" / "burn_detection.json").read_text())["returned"]["iteration"]
    trace = safe_torch_load(out.parent / "limited" / "burn_trace.pt", "trace")
    rows = pd.DataFrame(analyse.iteration_rows(trace, trace["target"]["class"]))
    replayed = analyse.keep_outcome(rows, BurnConfig(max_retention_drop=limit, collapse_retention_drop=1,
                                                     max_target_rise=1))
    assert (-1 if replayed["returned"] is None else replayed["returned"]) == returned
    assert replayed["stop"] is None



def test_the_unlearning_probe_leaves_the_model_alone_and_at_lr_0_with_frozen_batchnorm_is_theta0(digits_copy):
    """probe_unlearning fine-tunes a copy: the model passed in keeps its weights. With lr 0 and
    BatchNorm's running statistics frozen the copy is θ0 itself, so what "leaves" the class is exactly
    what θ0 already predicts elsewhere (counted by hand here)."""
    from burnkit.defenses.burn import frozen_bn_step
    from burnkit.defenses.burn_checks import probe_unlearning
    from burnkit.engine import predict, resolve_device
    from burnkit.models import build_classifier, load_bb_state_dict
    from burnkit.records import read_attack_record

    record = read_attack_record(digits_copy / "record" / "badnet_digits")
    train = record.load_data(digits_copy / "data").bd_train
    model = build_classifier(record.model_name, record.info, record.num_classes)
    load_bb_state_dict(model, record.state_dict)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    device = resolve_device("cpu")
    preds0 = predict(model, train, device).argmax(1)
    suspect = 0
    far_pos = torch.arange(0, 40)
    near_pos = torch.arange(40, 80)
    relabel = torch.full((len(train),), 1)
    cfg = BurnConfig(lr=0.0, epochs=2).train_config()
    out = probe_unlearning(model, train, far_pos, near_pos, relabel, suspect, cfg, device, seed=3, step=frozen_bn_step)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert out["n_tuned"] == 20 and out["n_far_held_out"] == 20 and out["n_near"] == 40
    assert out["leave_near"] == pytest.approx(float((preds0[near_pos] != suspect).double().mean()))
    order = far_pos[torch.randperm(40, generator=torch.Generator().manual_seed(3))]
    assert out["leave_far"] == pytest.approx(float((preds0[order[20:]] != suspect).double().mean()))


def test_burn_defaults_are_the_settings_the_heldout_corpus_was_frozen_with():
    """The held-out corpus judges settings committed before any of its records was scanned
    (docs/burn-corpus.md). A change to BURN's CIFAR-10 defaults is a new rule: it needs a new held-out
    corpus, and only then a new frozen copy, so this test fails until both are done."""
    live = yaml.safe_load((ROOT / "config/defense/burn/cifar10.yaml").read_text())
    frozen = yaml.safe_load((ROOT / "experiments/burn_corpus/frozen/burn_cifar10.yaml").read_text())
    changed = sorted(k for k in set(live) | set(frozen) if live.get(k, "<absent>") != frozen.get(k, "<absent>"))
    assert not changed, (f"BURN's defaults differ from the held-out corpus's frozen copy in {changed}: "
                         "a rule change needs a new held-out corpus (docs/burn-corpus.md)")


def _judge():
    spec = importlib.util.spec_from_file_location("burn_corpus_judge", ROOT / "experiments/burn_corpus/judge_heldout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_heldout_goals_are_counted_as_defined_by_hand():
    """Made worse = ASR up by more than 2 points or ACC down by more than 5; the ASR goal applies only
    where θ0's distance AUROC is at least 0.8."""
    judge = _judge()
    before = {"acc": 0.60, "asr": 0.90, "ra": 0.08}
    assert judge.judge_row(before, {"acc": 0.549, "asr": 0.03}, 0.9)["made_worse"]  # 5.1 ACC points lost
    assert not judge.judge_row(before, {"acc": 0.551, "asr": 0.03}, 0.9)["made_worse"]  # 4.9
    assert judge.judge_row(before, {"acc": 0.60, "asr": 0.921}, 0.9)["made_worse"]  # ASR +2.1
    assert not judge.judge_row(before, {"acc": 0.60, "asr": 0.919}, 0.9)["made_worse"]
    assert judge.judge_row(before, {"acc": 0.58, "asr": 0.05}, 0.85)["asr_goal_met"] is True
    assert judge.judge_row(before, {"acc": 0.58, "asr": 0.051}, 0.85)["asr_goal_met"] is False
    assert judge.judge_row(before, {"acc": 0.58, "asr": 0.9}, 0.79)["asr_goal_met"] is None
    df = pd.DataFrame({"iteration": [0, 1, 2, 3]})
    assert judge.returned_iteration({"iteration": 1, "why": "best"}, {"iteration": 3}, df) == 1
    assert judge.returned_iteration({}, {"iteration": 3}, df) == 2  # keep: last after a stop: the last that passed
    assert judge.returned_iteration({}, {"iteration": 1}, df) == -1  # ... θ0 for a stop at iteration 0 or 1
    assert judge.returned_iteration({}, {}, df) == 3


def test_the_heldout_judge_reads_what_a_real_burn_run_returned(digits_copy):
    """A real BURN run on the digits record: the judge's 'before' is the attack's last summary row,
    its 'after' the model BURN returned (burn_df.csv's last scored row), its verdict the run's
    suspected class against the label the record's relabelled poison carries."""
    judge = _judge()
    args = ["--result_file", "badnet_digits", "--iterations", "2", "--epochs", "1", "--batch_size", "64",
            "--max_iter", "20", "--candidates", "4", "--progress", "false", "--kp_start", "0.02",
            "--kp_end", "0.04", "--kc_start", "0.1", "--kc_end", "0.2", "--lr", "0.005"]
    Burn.main(args)  # the premise test stops this one before any fine-tuning
    Burn.main([*args, "--premise_check", "false", "--max_retention_drop", "1", "--min_unlearning_ratio", "0",
               "--output_name", "burn-paper-exact"])  # this one returns a fine-tuned model
    stopped = judge.read_run(digits_copy, "badnet_digits", "burn")
    assert stopped["returned_iteration"] == -1 and stopped["acc_after"] == stopped["acc_before"]
    row = judge.read_run(digits_copy, "badnet_digits", "burn-paper-exact")
    assert row["returned_iteration"] == 2 and row["returned_why"] == "last"
    provenance = json.loads((digits_copy / "record" / "badnet_digits" / "provenance.json").read_text())
    assert row["attack_wall_time_s"] == provenance["wall_time_s"] and row["attack_cpu_time_s"] == provenance["cpu_time_s"]
    run = digits_copy / "record" / "badnet_digits" / "defense" / "burn-paper-exact"
    detection = json.loads((run / "burn_detection.json").read_text())
    last = pd.read_csv(digits_copy / "record" / "badnet_digits" / "attack_df_summary.csv", index_col=0).loc["last"]
    assert row["acc_before"] == pytest.approx(float(last["test_acc"]))
    assert row["asr_before"] == pytest.approx(float(last["test_asr"]))
    df = pd.read_csv(run / "burn_df.csv")
    scored = df[df["test_acc"].notna()]
    if len(scored):
        assert row["acc_after"] == pytest.approx(scored["test_acc"].iloc[-1])
        assert row["asr_after"] == pytest.approx(scored["test_asr"].iloc[-1])
    else:  # stopped before any fine-tuning: θ0 is what the user gets
        assert row["acc_after"] == row["acc_before"] and row["asr_after"] == row["asr_before"]
    samples = pd.read_csv(run / "burn_samples.csv")
    poison = samples[(samples["is_poison"] == 1) & (samples["label"] != samples["original_label"])]
    assert row["true_target"] == int(poison["label"].mode().iloc[0])
    named = detection["suspected_target"]["class"]
    assert row["verdict"] == ("stops" if named is None else
                              "names the target" if named == row["true_target"] else "names a wrong class")
    # made worse, from the files themselves (on this machine the open run lost about 76 ACC points)
    final = scored.iloc[-1]
    worse = float(last["test_acc"]) - final["test_acc"] > 0.05 or final["test_asr"] - float(last["test_asr"]) > 0.02
    assert bool(row["made_worse"]) == bool(worse)
    table = pd.DataFrame([{"attack": "badnet", "model": "smallcnn", "seed": 0, **r} for r in (stopped, row)])
    text = judge.summary_markdown(table, ["--workdir", str(digits_copy)], str(digits_copy))
    assert text.count("| badnet_digits |") == 1 and str(digits_copy) not in text
    assert "| burn | 1 | 0 |" in text and "| burn-paper-exact | 1 |" in text


if __name__ == "__main__":
    pytest.main([__file__])


def test_corpus_scripts_say_in_one_line_when_nothing_is_finished(tmp_path, capsys):
    """Both scripts run unattended after a GPU call that may have been cut short (gpu_preact.sh): with no
    finished run they exit with one line naming what is missing, not a traceback, and write no table."""
    calibration = ROOT / "experiments/burn_corpus/calibration_preact.yaml"
    with pytest.raises(SystemExit, match="no finished burn-observe-kc2 run under"):
        _analyse().main(["--workdir", str(tmp_path), "--experiments", str(calibration),
                         "--out", str(tmp_path / "cal"), "--output_name", "burn-observe-kc2"])
    with pytest.raises(SystemExit, match="no finished held-out run"):
        heldout = ROOT / "experiments/burn_corpus/heldout_preact.yaml"
        _judge().main(["--workdir", str(tmp_path), "--experiments", str(heldout), "--out", str(tmp_path / "held")])
    assert not list(tmp_path.rglob("*.csv")) and not list(tmp_path.rglob("summary.md"))


def test_gpu_preact_script_refuses_a_missing_tarball_in_one_line(tmp_path):
    import subprocess

    script = ROOT / "experiments/burn_corpus/gpu_preact.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path / "missing.tar.gz"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no CIFAR-10 tarball" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing written
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage:" in usage.stderr
