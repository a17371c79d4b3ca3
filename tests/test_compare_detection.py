"""burn-compare's detection table: detector cells run after their record (BURN's final score after the
BURN run it reads), the table's numbers equal the metric code applied to the saved scores and the
record's own poison flags, and one ROC overlay is drawn per record."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from burnkit.compare import main
from burnkit.compare.experiment import load_experiment
from burnkit.detection_metrics import auroc, precision_at_poison_rate, tpr_at_fpr
from burnkit.records import read_attack_record
from test_compare import BURN_FAST, copy_record

DETECTORS = {"spectral": {}, "spectral-bb": {"detector": "spectral", "overrides": {"centered": False}},
             "strip": {"overrides": {"num_overlays": 10, "clean_sample_num": 30}}, "burn_s": {},
             "burn-read": {"detector": "burn", "overrides": {"burn_output": "defense/burn"}}}


def spec(name: str) -> dict:
    return {"name": name, "seeds": [0], "datasets": ["digits"], "models": ["smallcnn"], "env": {"OMP_NUM_THREADS": 1},
            "attacks": {"badnet": {"record_name": "badnet_digits"}},
            "defense_overrides": {"progress": False}, "detector_overrides": {"progress": False},
            "defenses": {"burn": {"overrides": BURN_FAST}}, "detectors": DETECTORS}


def test_detection_cells_expand_with_overrides_and_dependencies(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(spec("det"), sort_keys=False))
    exp = load_experiment(path, str(tmp_path))
    cells = {c.detector: c for c in exp.detection_cells}
    assert list(cells) == list(DETECTORS)
    assert list(cells["spectral-bb"].args) == ["--result_file", "badnet_digits", "--dataset", "digits", "--random_seed",
                                               "0", "--output_name", "spectral-bb", "--progress", "false",
                                               "--centered", "false"]
    assert cells["burn_s"].after == cells["burn-read"].after == ("defense/badnet_digits/burn",)
    assert cells["spectral"].after == ()
    assert exp.command(cells["strip"])[1].endswith("detection_pretrain/strip.py")


def test_compare_runs_detectors_and_tabulates_them(digits_workdir, tmp_path):
    copy_record(digits_workdir, tmp_path, "badnet_digits")
    path = tmp_path / "det.yaml"
    path.write_text(yaml.safe_dump(spec("det"), sort_keys=False))
    assert main([str(path), "--workdir", str(tmp_path)]) == 0
    out = tmp_path / "compare" / "det"
    state = json.loads((out / "state.json").read_text())["cells"]
    assert all(state[f"detection/badnet_digits/{d}"]["status"] == "done" for d in DETECTORS)
    record_dir = tmp_path / "record" / "badnet_digits"
    assert (record_dir / "detection" / "spectral-bb_pretrain" / "detection_scores.npy").is_file()
    # burn_s read the BURN run, so it finished after it
    assert state["detection/badnet_digits/burn_s"]["finished_at"] >= state["defense/badnet_digits/burn"]["finished_at"]

    record = read_attack_record(record_dir)
    truth = record.bd_train.poison_indicator[record.bd_train.original_index] == 1
    changed = np.array([bool(t) and record.bd_train.entries[int(i)].bd_label != record.bd_train.entries[int(i)].original_label
                        for i, t in zip(record.bd_train.original_index, truth)])
    keep = changed | ~truth
    assert 0 < changed.sum() < truth.sum()  # target-class poison keeps its label
    cells = pd.read_csv(out / "detection_cells.csv").set_index("detector")
    for name, entry in DETECTORS.items():
        scores = np.load(record_dir / "detection" / f"{name}_pretrain" / "detection_scores.npy")
        row = cells.loc[name]
        assert row["auroc"] == pytest.approx(auroc(scores, truth))
        assert row["tpr_at_5fpr"] == pytest.approx(tpr_at_fpr(scores, truth, 0.05))
        assert row["precision_at_poison_rate"] == pytest.approx(precision_at_poison_rate(scores, truth))
        assert row["auroc_relabelled"] == pytest.approx(auroc(scores[keep], changed[keep]))
    assert cells.loc["strip", "clean_samples_used"] == 30 and cells.loc["burn_s", "clean_samples_used"] == 0
    burn_cost = json.loads((record_dir / "defense" / "burn" / "cost.json").read_text())
    assert cells.loc["burn_s", "compute_s"] >= burn_cost["wall_time_s"]  # BURN's run counts for its score
    assert cells.loc["burn-read", "compute_s"] >= burn_cost["burn"]["timings_s"]["scan"]  # its scan for the distance

    assert cells.loc["spectral", "variant"] == "paper (centred)"
    assert cells.loc["spectral-bb", "variant"] == "BackdoorBench (uncentred)"
    assert cells.loc["strip", "variant"] == "BackdoorBench (normalised-tensor blend)"
    assert cells["variant"].isna()["burn_s"]  # one form only: no label

    table = (out / "detection_cells.csv").read_text()
    board = (out / "leaderboard.md").read_text()
    assert "## Poison detection" in board and "| Detector | Variant | AUROC | TPR@1%FPR | TPR@5%FPR |" in board
    assert "| spectral-bb | BackdoorBench (uncentred) |" in board and "| burn_s | – |" in board
    assert "![roc_badnet_digits](plots/roc_badnet_digits.png)" in board
    assert (out / "plots" / "roc_badnet_digits.png").is_file()
    assert "<h2>Poison detection</h2>" in (out / "index.html").read_text()
    # a second run finds everything done and rewrites the same table
    assert main([str(path), "--workdir", str(tmp_path), "--collect-only"]) == 0
    assert (out / "detection_cells.csv").read_text() == table


def test_variant_labels_name_backdoorbench_and_the_paper():
    from burnkit.compare.detection import variant_label

    assert variant_label({"variant": "backdoorbench", "threshold": 7.39}) == "BackdoorBench"
    assert variant_label({"variant": "paper"}) == "paper"
    assert variant_label({"blend": "saturating"}) == "authors' saturating blend"
    assert variant_label({"percentile": 85.0}) == ""
    # sidecars written before the flags: STRIP's clip was its blend, the others ran the paper's form
    assert variant_label({"clip": True}, "strip") == "authors' saturating blend"
    assert variant_label({"threshold": 7.39}, "scan") == "paper (made before --variant)"
    # BURN's scan setting `clip` is not a form of the method
    assert variant_label({"clip": None, "max_iter": 50}, "burn") == ""
    assert variant_label({"centered": True}, "spectral") == "paper (centred)"
    assert variant_label({"percentile": 0.01}, "spectral") == ""


def test_auroc_matrix_names_each_detector_variant():
    from burnkit.compare.detection import auroc_matrix

    summary = pd.DataFrame([{"dataset": "cifar10", "model": "smallcnn", "attack": a, "detector": d, "variant": v,
                             "auroc_mean": m, "auroc_std": np.nan}
                            for a in ("badnet", "blended")
                            for d, v, m in (("scan", "BackdoorBench", 0.6), ("scan-paper", "paper", 0.9),
                                            ("abl", "", 0.7))])
    (_, table), = auroc_matrix(summary)
    assert list(table.columns)[0] == "Variant"
    assert table["Variant"].to_dict() == {"scan-paper": "paper", "abl": "–", "scan": "BackdoorBench"}


def test_burn_notes_name_the_winner_and_the_gaps():
    from burnkit.compare.detection import burn_notes

    block = pd.DataFrame({"detector": ["burn", "burn_s", "beatrix", "abl"],
                          "auroc_mean": [0.80, 0.90, 0.85, np.nan], "tpr_at_5fpr_mean": [0.40, 0.70, 0.60, 0.75],
                          "precision_at_poison_rate_mean": [0.50, 0.60, 0.45, 0.70]})
    notes = burn_notes(block, {"burn": "burn", "burn_s": "burn_s", "beatrix": "beatrix", "abl": "abl"})
    assert notes == ["Best AUROC: burn_s 0.900.",
                     "burn: AUROC 0.800, rank 3 of 3; AUROC -0.050 against the best other detector (beatrix 0.850); "
                     "TPR@5%FPR -0.200 against the best other detector (beatrix 0.600); "
                     "precision +0.050 against the best other detector (beatrix 0.450).",
                     "burn_s: AUROC 0.900, rank 1 of 3; AUROC +0.050 against the best other detector (beatrix 0.850); "
                     "TPR@5%FPR +0.100 against the best other detector (beatrix 0.600); "
                     "precision +0.150 against the best other detector (beatrix 0.450)."]


def test_auroc_matrix_ranks_detectors_over_the_attacks():
    from burnkit.compare.detection import auroc_matrix

    rows = [("badnet", "burn", 0.80), ("badnet", "abl", 0.88), ("badnet", "strip", 0.70),
            ("blended", "burn", 0.93), ("blended", "abl", 0.61), ("blended", "strip", 0.93),
            ("wanet", "burn", 0.55), ("wanet", "abl", np.nan), ("wanet", "strip", 0.60)]
    summary = pd.DataFrame([{"dataset": "cifar10", "model": "smallcnn", "attack": a, "detector": d,
                             "auroc_mean": v, "auroc_std": np.nan} for a, d, v in rows])
    summary.loc[0, "auroc_std"] = 0.05  # seeds > 1 on one cell: shown as mean ± std
    (title, table), = auroc_matrix(summary)
    assert title == "AUROC on every attack (cifar10 · smallcnn)"
    # ranks by hand: badnet abl 1, burn 2, strip 3; blended burn = strip 1 (tie), abl 3; wanet strip 1, burn 2
    # mean ranks: strip (3+1+1)/3 = 1.67, burn (2+1+2)/3 = 1.67, abl (1+3)/2 = 2.0 (no wanet result)
    assert list(table.index) == ["burn", "strip", "abl"]  # equal mean rank: the experiment's order decides
    assert table.loc["burn"].tolist() == ["0.800 ± 0.050", "0.930", "0.550", "0.760", "1.7", "blended"]
    assert table.loc["strip"].tolist() == ["0.700", "0.930", "0.600", "0.743", "1.7", "blended, wanet"]
    assert table.loc["abl"].tolist() == ["0.880", "0.610", "–", "0.745", "2.0", "badnet"]
    assert list(table.columns) == ["badnet", "blended", "wanet", "Mean AUROC", "Mean rank", "Best on"]
    assert auroc_matrix(summary[summary["attack"] == "badnet"]) == []  # one attack: the per-attack table says it all
