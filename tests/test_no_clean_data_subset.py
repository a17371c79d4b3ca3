"""The no-clean-data defenses on a ``--train_subset`` record: ``bd_train`` covers the whole training split
(BackdoorBench's consumers read it so), ``train_subset_index`` lists the samples the attack trained on,
and every defense must read exactly those (the poisoned training set the model saw), never the rest."""
from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import DIGITS_TRAINING
from burnkit.attack import get_attack
from burnkit.defense import DefenseRun
from burnkit.defenses import ep as ep_mod
from burnkit.defenses.abl import AntiBackdoorLearning
from burnkit.defenses.ac import ActivationClustering
from burnkit.defenses.clp import ChannelLipschitzPruning
from burnkit.defenses.dbd import Decoupling
from burnkit.defenses.dbr import DBR
from burnkit.defenses.dst import DST
from burnkit.defenses.ep import EntropyPruning
from burnkit.defenses.spectral import SpectralSignatures
from burnkit.safe_load import safe_torch_load

SD = ["--epochs", "1", "--epochs_intra", "1", "--batch_size", "64"]
CASES = {
    "abl": (AntiBackdoorLearning, ["--tuning_epochs", "1", "--finetuning_epochs", "1", "--unlearning_epochs", "1",
                                   "--batch_size", "64", "--isolation_ratio", "0.05"]),
    "ac": (ActivationClustering, ["--epochs", "1", "--batch_size", "64"]),
    "spectral": (SpectralSignatures, ["--epochs", "1", "--batch_size", "64"]),
    "d-br": (DBR, [*SD, "--epochs_relearn", "1"]),
    "d-st": (DST, [*SD, "--epochs_extractor", "1", "--epochs_classifier", "1", "--warm_epochs", "1"]),
    "dbd": (Decoupling, ["--epoch_self", "1", "--epoch_warmup", "1", "--epochs", "1", "--train_iteration", "2",
                         "--batch_size_self", "128"]),
    "ep": (EntropyPruning, ["--u_num", "2"]),
    "clp": (ChannelLipschitzPruning, ["--u_num", "2"]),
}


@pytest.fixture(scope="module")
def subset_work(tmp_path_factory):
    """A 500-of-1,437-sample ``--train_subset`` BadNets record on digits (pratio 0.1: 50 poisoned)."""
    work = tmp_path_factory.mktemp("subset_work")
    cls = get_attack("badnet")
    with contextlib.chdir(work):
        cfg, _ = cls.parse([*DIGITS_TRAINING, "--epochs", "2", "--train_subset", "500",
                            "--save_folder_name", "badnet_subset"])
        cls.run(cfg)
    return work


@pytest.mark.parametrize("name", list(CASES))
def test_reads_only_the_samples_the_attack_trained_on(name, subset_work, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(subset_work, work)
    monkeypatch.chdir(work)
    raw = safe_torch_load(work / "record/badnet_subset/attack_result.pt")
    trained = set(raw["train_subset_index"].tolist())
    poisoned = set(np.flatnonzero(np.asarray(raw["bd_train"]["poison_indicator"]) == 1).tolist())
    assert len(raw["bd_train"]["original_index_array"]) == 1437 and len(trained) == 500 and len(poisoned) == 50
    assert poisoned <= trained

    seen: list[tuple[str, set, set]] = []  # (what, indices read, indices flagged as poison in that set)
    real_fit = DefenseRun.fit

    def fit_spy(self, model, train_set, *a, **kw):
        seen.append((kw.get("phase", "train"), set(train_set.index.tolist()),
                     set(train_set.index[train_set.poison].tolist())))
        return real_fit(self, model, train_set, *a, **kw)

    real_draw = ep_mod.draw_batch

    def draw_spy(train, *a, **kw):
        seen.append(("ep_pool", set(train.index.tolist()), set(train.index[train.poison].tolist())))
        return real_draw(train, *a, **kw)

    monkeypatch.setattr(DefenseRun, "fit", fit_spy)
    monkeypatch.setattr(ep_mod, "draw_batch", draw_spy)
    defense, argv = CASES[name]
    defense.main(["--result_file", "badnet_subset", *argv, "--progress", "false"])
    out = work / "record" / "badnet_subset" / "defense" / name
    assert json.loads((out / "cost.json").read_text())["clean_subset_size"] == 0
    samples = out / f"{name}_samples.csv" if name not in ("abl",) else out / "abl_isolation_samples.csv"
    if samples.exists():  # the per-sample filter report lists the trained samples, each once, with their flags
        frame = pd.read_csv(samples)
        assert sorted(frame["index"].tolist()) == sorted(trained)
        assert set(frame.loc[frame["is_poison"] == 1, "index"]) == poisoned
        seen.append(("samples.csv", set(frame["index"].tolist()), set()))
    if name == "clp":  # data-free: it reads no sample at all
        assert seen == []
        return
    assert seen, "the defense read no training data through the engine"
    for what, indices, flagged in seen:
        assert indices <= trained, f"{what} read samples the attack never trained on"
        assert flagged == (indices & poisoned) or what == "samples.csv"
    whole = [what for what, indices, _ in seen if indices == trained]
    assert whole, f"no phase read the whole trained subset: {[(w, len(i)) for w, i, _ in seen]}"


def test_subset_record_and_a_whole_split_record_of_the_same_samples_give_the_same_abl_model(subset_work, tmp_path,
                                                                                               monkeypatch):
    """Rewriting the record as BackdoorBench's own layout would hold a subset (``original_index_array`` = the
    trained indices, no ``train_subset_index``) changes nothing for the defense: same data, same model."""
    models = []
    for variant in ("whole_split", "subset_layout"):
        work = tmp_path / variant
        shutil.copytree(subset_work, work)
        monkeypatch.chdir(work)
        if variant == "subset_layout":
            path = work / "record/badnet_subset/attack_result.pt"
            raw = safe_torch_load(path)
            raw["bd_train"]["original_index_array"] = np.asarray(raw.pop("train_subset_index"), dtype=np.int64)
            torch.save(raw, path)
        result = AntiBackdoorLearning.main(["--result_file", "badnet_subset", *CASES["abl"][1], "--progress", "false"])
        models.append(result["model"].net.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
