"""Checks shared by the FP/NAD/ANP tests: the BackdoorBench output contract of a defense run."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from burnkit.datasets import dataset_info
from burnkit.engine import evaluate, EvalSuite
from burnkit.models import build_classifier
from burnkit.records import read_attack_record

FT_COLUMNS = ["epoch", "batch", "train_epoch_loss_avg_over_batch", "train_acc", "clean_test_loss_avg_over_batch",
              "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra"]


def load_defended(out_dir: Path, record_dir: Path):
    """Load ``defense_result.pt`` exactly as a BackdoorBench user would, strictly, into a fresh model."""
    raw = torch.load(out_dir / "defense_result.pt", map_location="cpu", weights_only=True)
    assert set(raw) == {"model_name", "num_classes", "model"}
    record = read_attack_record(record_dir)
    assert raw["model_name"] == record.model_name and raw["num_classes"] == record.num_classes
    assert not any(k.endswith(("_orig", "_mask")) for k in raw["model"])
    clf = build_classifier(raw["model_name"], dataset_info(record.clean_data), raw["num_classes"])
    clf.net.load_state_dict(raw["model"], strict=True)
    assert list(raw["model"]) == list(clf.net.state_dict())  # BackdoorBench's key names and order
    return clf, record


def score(clf, record):
    data = record.load_data()
    return evaluate(clf, EvalSuite(data.clean_test, data.bd_test), torch.device("cpu"))


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, index_col=0)


def check_common(out_dir: Path, expected_index: np.ndarray | None = None) -> dict:
    """index.txt, summary CSV and cost.json are present and consistent; returns cost.json."""
    index = np.loadtxt(out_dir / "log" / "index.txt", dtype=int, ndmin=1)
    if expected_index is not None:
        assert np.array_equal(index, expected_index)
    cost = json.loads((out_dir / "cost.json").read_text())
    assert cost["clean_subset_size"] == len(index)
    assert cost["wall_time_s"] > 0 and cost["phases_s"]["repair"] > 0
    return cost


@functools.lru_cache(maxsize=None)
def random_net(model_name: str, num_classes: int = 10, in_channels: int = 3):
    """One randomly initialised zoo network per name for the whole session (VGG takes seconds to
    build); callers must not modify it."""
    import attack_models

    torch.manual_seed(0)
    return attack_models.create_model(model_name, num_classes=num_classes, in_channels=in_channels).eval()


def scramble_poison_flags(monkeypatch) -> None:
    """From now on records load with the poison flags and original labels of ``bd_train`` shuffled
    (a fixed permutation): a defense that never reads them exports the same model as before."""
    from burnkit import records

    original_load = records.AttackRecord.load_data

    def scrambled(self, *a, **kw):
        data = original_load(self, *a, **kw)
        perm = torch.randperm(len(data.bd_train), generator=torch.Generator().manual_seed(1))
        data.bd_train.poison = data.bd_train.poison[perm]
        data.bd_train.original_labels = data.bd_train.original_labels[perm]
        return data

    monkeypatch.setattr(records.AttackRecord, "load_data", scrambled)


def scramble_test_sets_and_poison_flags(monkeypatch) -> None:
    """From now on records load with their test sets shuffled apart (the clean and the backdoor test
    set's images, labels, original labels and flags each under its own permutation, so no image keeps
    its label) and with ``bd_train``'s poison flags and original labels scrambled: a method that decides
    without test data and without the record's ground truth produces bit-identical outputs."""
    from burnkit import records

    original_load = records.AttackRecord.load_data

    def scrambled(self, *a, **kw):
        data = original_load(self, *a, **kw)
        gen = torch.Generator().manual_seed(3)
        train = data.bd_train
        perm = torch.randperm(len(train), generator=gen)
        train.poison, train.original_labels = train.poison[perm], train.original_labels[perm]
        for split in (data.clean_test, data.bd_test):
            if split is None or len(split) == 0:
                continue
            for name in ("images", "labels", "original_labels", "poison"):
                setattr(split, name, getattr(split, name)[torch.randperm(len(split), generator=gen)])
        return data

    monkeypatch.setattr(records.AttackRecord, "load_data", scrambled)
