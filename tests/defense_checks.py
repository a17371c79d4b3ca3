"""Assertions on a defense's output files (spec §3.7), shared by the defense tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from burnkit.datasets import dataset_info
from burnkit.models import build_classifier


def check_defense_result(path: Path, model_name: str, num_classes: int, dataset: str = "digits") -> dict:
    """``defense_result.pt`` holds exactly model_name/num_classes/model, loads with
    ``weights_only=True`` and fits a fresh network strictly. Returns the state dict."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert set(payload) == {"model_name", "num_classes", "model"}
    assert payload["model_name"] == model_name and payload["num_classes"] == num_classes
    net = build_classifier(model_name, dataset_info(dataset), num_classes).net
    net.load_state_dict(payload["model"], strict=True)
    return payload["model"]


def check_index_file(path: Path, expected_len: int | None = None) -> np.ndarray:
    """``index.txt``: one integer per line, no repeats."""
    idx = np.loadtxt(path, dtype=np.int64, ndmin=1)
    assert len(np.unique(idx)) == len(idx)
    if expected_len is not None:
        assert len(idx) == expected_len
    return idx
