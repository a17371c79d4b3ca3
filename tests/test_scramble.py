"""Every method that claims to decide without test data and without the record's ground truth, checked
by behaviour: run on the digits record as it is, then on a copy whose test sets are shuffled apart (no
test image keeps its label) and whose ``bd_train`` poison flags and original labels are scrambled. Each
no-clean-data defense must export a bit-identical model and identical per-sample decisions; each
detector must write bit-identical scores and flags. The lists come from the registries, so a new
method is covered (or this file fails until it is given a budget)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from baseline_checks import scramble_test_sets_and_poison_flags
from burnkit.defense import get_defense, list_defenses
from burnkit.detector import SCORES_JSON, SCORES_NPY, get_detector, list_detectors

RECORD = "badnet_digits"
SD = ["--epochs", "1", "--epochs_intra", "1", "--batch_size", "64"]
DEFENSE_BUDGETS = {  # the smallest runs that still go through every phase
    "abl": ["--tuning_epochs", "1", "--finetuning_epochs", "1", "--unlearning_epochs", "1", "--batch_size", "64",
            "--isolation_ratio", "0.05"],
    "ac": ["--epochs", "1", "--batch_size", "64"],
    "burn": ["--iterations", "1", "--epochs", "1", "--batch_size", "64", "--max_iter", "5", "--candidates", "2"],
    "clp": ["--u_num", "2"],
    "d-br": [*SD, "--epochs_relearn", "1"],
    "d-st": [*SD, "--epochs_extractor", "1", "--epochs_classifier", "1", "--warm_epochs", "1"],
    "dbd": ["--epoch_self", "1", "--epoch_warmup", "1", "--epochs", "1", "--train_iteration", "2",
            "--batch_size_self", "128"],
    "ep": ["--u_num", "2"],
    "spectral": ["--epochs", "1", "--batch_size", "64"],
}
DETECTOR_BUDGETS = {
    "abl": ["--tuning_epochs", "1"],
    "ac": [],
    "beatrix": ["--powers", "1,2"],
    "burn": ["--max_iter", "5", "--candidates", "2"],
    "burn_s": [],  # reads the BURN run made first (budget above)
    "scan": [],
    "spectral": [],
    "spectre": ["--ks", "1,4"],
    "strip": ["--num_overlays", "10"],
}
NO_CLEAN_DATA_DEFENSES = sorted(name for name in list_defenses() if not get_defense(name).needs_clean_subset)
SKIPPED_COLUMNS = {"is_poison", "original_label"}  # the ground truth, written for reports only


def test_every_registered_method_has_a_budget_here():
    assert NO_CLEAN_DATA_DEFENSES == sorted(DEFENSE_BUDGETS)
    assert list_detectors() == sorted(DETECTOR_BUDGETS)


def _workdir(digits_workdir: Path, tmp_path: Path, name: str, monkeypatch) -> Path:
    work = tmp_path / name
    shutil.copytree(digits_workdir, work)
    monkeypatch.chdir(work)
    return work


def _samples(folder: Path) -> dict:
    """The decisions of every ``*_samples.csv`` (the ground-truth columns left out) and the sample
    sets a defense writes as NumPy files."""
    out = {}
    for path in sorted(folder.rglob("*_samples.csv")):
        frame = pd.read_csv(path)
        out[str(path.relative_to(folder))] = frame.drop(columns=[c for c in frame if c in SKIPPED_COLUMNS])
    for path in sorted(folder.rglob("*.npy")):
        out[str(path.relative_to(folder))] = np.load(path, allow_pickle=False)
    return out


def _defense_outputs(work: Path, name: str) -> tuple[dict, dict]:
    folder = work / "record" / RECORD / "defense" / name
    model = torch.load(folder / "defense_result.pt", map_location="cpu", weights_only=True)["model"]
    return model, _samples(folder)


def _run_defense(name: str) -> None:
    get_defense(name).main(["--result_file", RECORD, "--progress", "false", *DEFENSE_BUDGETS[name]])


def _assert_same_decisions(reference: dict, other: dict) -> None:
    assert reference.keys() == other.keys()
    for key, value in reference.items():
        if isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(value, other[key], check_exact=True, obj=key)
        else:
            assert np.array_equal(value, other[key]), key


@pytest.mark.parametrize("name", NO_CLEAN_DATA_DEFENSES)
def test_defense_decides_without_test_data_or_poison_flags(name, digits_workdir, tmp_path, monkeypatch):
    _workdir(digits_workdir, tmp_path, "as_is", monkeypatch)
    _run_defense(name)
    reference_model, reference_samples = _defense_outputs(tmp_path / "as_is", name)
    _workdir(digits_workdir, tmp_path, "scrambled", monkeypatch)
    scramble_test_sets_and_poison_flags(monkeypatch)
    _run_defense(name)
    model, samples = _defense_outputs(tmp_path / "scrambled", name)
    assert reference_model.keys() == model.keys()
    assert all(torch.equal(reference_model[k], model[k]) for k in reference_model), name
    _assert_same_decisions(reference_samples, samples)


def _detection_outputs(work: Path, name: str) -> dict:
    folder = get_detector(name).output_dir(work / "record" / RECORD)
    summary = json.loads((folder / SCORES_JSON).read_text())
    samples = pd.read_csv(folder / "detection_samples.csv")
    return {"scores": np.load(folder / SCORES_NPY, allow_pickle=False), "flagged": samples["flagged"].to_numpy(),
            "threshold": summary["threshold"], "target": summary["target"]}


def _run_detector(name: str) -> None:
    if name == "burn_s":
        _run_defense("burn")
    get_detector(name).main(["--result_file", RECORD, "--progress", "false", *DETECTOR_BUDGETS[name]])


@pytest.mark.parametrize("name", list_detectors())
def test_detector_decides_without_test_data_or_poison_flags(name, digits_workdir, tmp_path, monkeypatch):
    _workdir(digits_workdir, tmp_path, "as_is", monkeypatch)
    _run_detector(name)
    reference = _detection_outputs(tmp_path / "as_is", name)
    _workdir(digits_workdir, tmp_path, "scrambled", monkeypatch)
    scramble_test_sets_and_poison_flags(monkeypatch)
    _run_detector(name)
    other = _detection_outputs(tmp_path / "scrambled", name)
    assert np.array_equal(reference["scores"], other["scores"]) and reference["scores"].dtype == other["scores"].dtype
    assert np.array_equal(reference["flagged"], other["flagged"])
    assert (reference["threshold"], reference["target"]) == (other["threshold"], other["target"])
