"""Attack records as BackdoorBench writes them: its poison draw, drop_last training, float64 CSV
values, a readable ``info.pickle``, and ``--train_subset`` records every consumer reads correctly
(spec §1.2-1.4, §1.8, §6, §6.1)."""
from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from burnkit.attack import get_attack
from burnkit.data import ImageSet
from burnkit.datasets import dataset_info
from burnkit.engine import TrainConfig, fit
from burnkit.errors import BurnError
from burnkit.models import build_classifier
from burnkit.records import read_attack_record
from burnkit.safe_load import NUMPY_SAFE_GLOBALS
from conftest import DIGITS_TRAINING, FIXTURE_SEED

N_TRAIN, N_TEST = 1437, 360  # the digits splits of the session records (pratio 0.1, seed 0)


def documented_draw(n: int, pratio: float, seed: int, pool=None) -> np.ndarray:
    """Spec §6, written out as BackdoorBench's code does it: the legacy global generator."""
    np.random.seed(seed)
    candidates = np.arange(n) if pool is None else pool
    return np.sort(np.random.choice(candidates, round(pratio * n), replace=False))


def _raw(record_dir):
    with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
        return torch.load(record_dir / "attack_result.pt", weights_only=True)


@pytest.mark.parametrize("name", ["badnet_digits", "blended_digits"])
def test_poisoned_indices_equal_backdoorbench_draw_at_the_records_seed(digits_workdir, name):
    record_dir = digits_workdir / "record" / name
    expected = documented_draw(N_TRAIN, 0.1, FIXTURE_SEED)
    assert len(expected) == 144
    raw = _raw(record_dir)
    np.testing.assert_array_equal(np.flatnonzero(raw["bd_train"]["poison_indicator"] == 1), expected)
    assert sorted(int(k) for k in raw["bd_train"]["bd_data_container"]["data_dict"]) == expected.tolist()
    with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
        indicator = torch.load(record_dir / "train_poison_index_list.pickle", weights_only=True)
    assert indicator.dtype == np.float64 and np.array_equal(np.flatnonzero(indicator), expected)


@pytest.mark.parametrize("attack,seed,pratio", [("badnet", 0, 0.1), ("blended", 3, 0.05), ("sig", 0, 0.1),
                                                 ("sig", 7, 0.02)])
def test_plan_reproduces_the_draw_at_cifar_scale(attack, seed, pratio):
    """50,000 labels as CIFAR-10's; clean-label SIG draws from the target class only."""
    y_train = np.tile(np.arange(10), 5000)
    y_test = np.tile(np.arange(10), 1000)
    cls = get_attack(attack)
    cfg, _ = cls.parse(["--dataset", "cifar10", "--random_seed", str(seed), "--pratio", str(pratio)])
    plan = cls(cfg, dataset_info("cifar10")).plan(y_train, y_test, np.random.default_rng(seed))
    pool = np.flatnonzero(y_train == 0) if attack == "sig" else None
    np.testing.assert_array_equal(plan.train_poison, documented_draw(50000, pratio, seed, pool))
    np.testing.assert_array_equal(plan.test_poison, np.flatnonzero(y_test != 0))


def test_attack_training_drops_the_last_partial_batch(digits_workdir):
    frame = pd.read_csv(digits_workdir / "record" / "badnet_digits" / "attack_df.csv", index_col=0)
    assert (frame["batch"] == N_TRAIN // 128).all()  # 11 full batches; the 29 left over are dropped


def test_drop_last_with_less_than_one_batch_is_refused():
    data = ImageSet.from_numpy(np.zeros((5, 8, 8, 1), np.uint8), np.zeros(5, int))
    clf = build_classifier("smallcnn", dataset_info("digits"))
    with pytest.raises(BurnError, match="5 samples, fewer than one batch of 8"):
        fit(clf, data, TrainConfig(epochs=1, batch_size=8, drop_last=True), device=torch.device("cpu"),
            progress=False)


def test_csv_metric_values_are_float64_fractions(digits_workdir):
    """Every accuracy in the CSV is exactly k/n written by Python's float repr (0.145, never float32's
    0.14499999582767487)."""
    frame = pd.read_csv(digits_workdir / "record" / "badnet_digits" / "attack_df.csv", index_col=0, dtype=str)
    record = read_attack_record(digits_workdir / "record" / "badnet_digits")
    denominators = {"test_acc": N_TEST, "test_asr": len(record.bd_test.original_index),
                    "test_ra": len(record.bd_test.original_index)}
    for column, n in denominators.items():
        for text in frame[column]:
            k = round(float(text) * n)
            assert text == repr(k / n), (column, text)


def test_info_pickle_reads_weights_only_and_names_the_trigger(digits_workdir):
    record_dir = digits_workdir / "record" / "badnet_digits"
    info = torch.load(record_dir / "info.pickle", weights_only=True)  # builtins only
    assert None not in info.values()  # BackdoorBench tests keys for presence (cos_t_max -> T_max)
    assert "cos_t_max" not in info or info["cos_t_max"] == 20
    assert {k: info[k] for k in ("attack", "dataset", "model", "pratio", "attack_target", "attack_label_trans",
                                 "num_classes", "input_height", "input_width", "input_channel", "img_size",
                                 "dataset_path", "save_path", "device")} == {
        "attack": "badnet", "dataset": "digits", "model": "smallcnn", "pratio": 0.1, "attack_target": 0,
        "attack_label_trans": "all2one", "num_classes": 10, "input_height": 8, "input_width": 8, "input_channel": 1,
        "img_size": (8, 8, 1), "dataset_path": "./data/digits", "save_path": "./record/badnet_digits", "device": "cpu"}
    assert info["patch_mask_path"] == "./record/badnet_digits/trigger_image.png"
    trigger = np.asarray(Image.open(record_dir / "trigger_image.png"))
    poisoned = read_attack_record(record_dir).load_data().bd_test.numpy_images()[..., 0]
    assert ((poisoned == trigger) | (trigger == 0)).all() and (trigger > 0).sum() == 4  # the 2x2 square it stamped
    blended = torch.load(digits_workdir / "record" / "blended_digits" / "info.pickle", weights_only=True)
    assert blended["attack_trigger_img_path"] == "./record/blended_digits/blended_trigger.png"
    assert (digits_workdir / "record" / "blended_digits" / "blended_trigger.png").is_file()


@pytest.fixture(scope="module")
def subset_record(tmp_path_factory):
    """A 500-sample --train_subset BadNets record on digits (pratio 0.1, seed 0: the draw the tests check)."""
    work = tmp_path_factory.mktemp("subset_work")
    cls = get_attack("badnet")
    with contextlib.chdir(work):
        cfg, _ = cls.parse([*DIGITS_TRAINING, "--epochs", "1", "--train_subset", "500", "--random_seed", "0",
                            "--save_folder_name", "badnet_subset"])
        cls.run(cfg)
    return work / "record" / "badnet_subset"


def test_train_subset_record_is_a_whole_split_record_for_backdoorbench(subset_record):
    raw = _raw(subset_record)
    state = raw["bd_train"]
    # what BackdoorBench's detection scripts and MCR assume: position i is original index i
    np.testing.assert_array_equal(state["original_index_array"], np.arange(N_TRAIN))
    indicator = state["poison_indicator"]
    flagged_by_position = [i for i in range(len(state["original_index_array"])) if indicator[i] == 1]
    assert flagged_by_position == sorted(int(k) for k in state["bd_data_container"]["data_dict"])
    trained = raw["train_subset_index"]
    assert trained.dtype == np.int64 and len(trained) == 500 and len(flagged_by_position) == 50
    np.testing.assert_array_equal(flagged_by_position, np.sort(np.random.RandomState(0).choice(trained, 50, replace=False)))
    for label, (bd_label, orig) in ((k, v["other_info"]) for k, v in state["bd_data_container"]["data_dict"].items()):
        assert bd_label == 0 and (subset_record / "bd_train_dataset" / str(orig) / f"{label}.png").is_file()


def test_train_subset_record_reads_back_as_the_trained_subset(subset_record):
    record = read_attack_record(subset_record)
    trained = _raw(subset_record)["train_subset_index"]
    np.testing.assert_array_equal(record.bd_train.original_index, trained)
    data = record.load_data()
    assert len(data.bd_train) == 500 and int(data.bd_train.poison.sum()) == 50
    assert (data.bd_train.labels[data.bd_train.poison] == 0).all()
    assert len(data.clean_train) == N_TRAIN  # the defender's clean pool is the whole split, as in BackdoorBench
