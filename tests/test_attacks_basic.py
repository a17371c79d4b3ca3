"""BadNets and Blended: trigger pixels, poison selection, label modes, records (spec §6)."""
from __future__ import annotations

import numpy as np
import pytest

from burnkit.attack import get_attack, list_attacks
from burnkit.attacks.badnet import BadNet, white_square_trigger
from burnkit.attacks.blended import Blended, noise_trigger
from burnkit.attacks.triggers import blend, stamp
from burnkit.datasets import dataset_info
from burnkit.records import read_attack_record
from burnkit.safe_load import safe_torch_load


def _attack(cls, dataset="cifar10", **cli):
    argv = ["--dataset", dataset]
    for k, v in cli.items():
        argv += [f"--{k}", str(v)]
    cfg, _ = cls.parse(argv)
    return cls(cfg, dataset_info(dataset))


def test_badnet_trigger_is_the_bottom_right_white_square():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 200, (4, 32, 32, 3), dtype=np.uint8)
    out = _attack(BadNet).apply_trigger(imgs, np.zeros(4, int), np.arange(4), True)
    assert (out[:, 29:32, 29:32, :] == 255).all()
    untouched = np.ones((32, 32), bool)
    untouched[29:32, 29:32] = False
    np.testing.assert_array_equal(out[:, untouched], imgs[:, untouched])
    assert white_square_trigger().sum() == 9 * 3 * 255


def test_blended_is_the_alpha_mix_truncated():
    imgs = np.full((2, 32, 32, 3), 100, np.uint8)
    trigger = noise_trigger(32, 32, 3)
    out = _attack(Blended).apply_trigger(imgs, np.zeros(2, int), np.arange(2), False)
    expected = np.floor(0.8 * 100 + 0.2 * trigger.astype(float))
    np.testing.assert_array_equal(out[0], expected.astype(np.uint8))
    np.testing.assert_array_equal(noise_trigger(32, 32, 3), trigger)  # the default trigger is fixed
    assert blend(np.zeros((1, 1, 1, 1), np.uint8), np.full((1, 1, 1), 255, np.uint8), 0.5)[0, 0, 0, 0] == 127


def test_stamp_rule_only_overwrites_positive_trigger_values():
    imgs = np.full((1, 2, 2, 1), 7, np.uint8)
    trig = np.array([[[0], [9]], [[0], [0]]], np.uint8)
    assert stamp(imgs, trig)[0, :, :, 0].tolist() == [[7, 9], [7, 7]]


def test_poison_plan_counts_and_label_modes():
    y_train = np.repeat(np.arange(10), 100)
    y_test = np.repeat(np.arange(10), 20)
    atk = _attack(BadNet, pratio=0.1)
    plan = atk.plan(y_train, y_test, np.random.default_rng(0))
    assert len(plan.train_poison) == 100 and len(set(plan.train_poison)) == 100
    assert (y_test[plan.test_poison] != 0).all() and len(plan.test_poison) == 180
    assert (atk.target_labels(np.array([3, 5])) == 0).all()
    all2all = _attack(BadNet, attack_label_trans="all2all")
    assert all2all.target_labels(np.array([0, 8, 9])).tolist() == [1, 9, 0]
    assert len(all2all.plan(y_train, y_test, np.random.default_rng(0)).test_poison) == 200
    subset = _attack(BadNet, train_subset=200).plan(y_train, y_test, np.random.default_rng(0))
    assert len(subset.train_positions) == 200 and np.bincount(y_train[subset.train_positions]).tolist() == [20] * 10
    assert set(subset.train_poison) <= set(subset.train_positions) and len(subset.train_poison) == 20


def test_registry_lists_builtin_attacks():
    assert {"badnet", "blended"} <= set(list_attacks())
    assert get_attack("badnet") is BadNet


@pytest.mark.parametrize("name", ["badnet_digits", "blended_digits"])
def test_digits_records_are_backdoored_and_read_back(digits_workdir, name):
    record = read_attack_record(digits_workdir / "record" / name)
    data = record.load_data()
    summary = (digits_workdir / "record" / name / "attack_df_summary.csv").read_text()
    assert "last" in summary
    import pandas as pd

    last = pd.read_csv(digits_workdir / "record" / name / "attack_df.csv").iloc[-1]
    assert last["test_acc"] > 0.9 and last["test_asr"] > 0.9  # a working backdoor
    assert data.bd_train.poison.sum().item() == round(0.1 * 1437)
    poisoned = data.bd_train.poison
    assert (data.bd_train.labels[poisoned] == 0).all()
    assert (data.bd_train.labels[~poisoned] == data.bd_train.original_labels[~poisoned]).all()
    if name.startswith("badnet"):
        assert (data.bd_train.images[poisoned][:, 0, 6:, 6:] == 255).all()


def test_cifar_subset_attack_writes_a_loadable_record(cifar_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar10").symlink_to(cifar_root)
    cfg, _ = BadNet.parse(["--dataset", "cifar10", "--model", "smallcnn", "--epochs", "1", "--batch_size", "64",
                           "--save_folder_name", "bn_c10", "--progress", "false"])
    result = BadNet.run(cfg)
    data = read_attack_record(result["record_dir"]).load_data()
    assert len(data.bd_train) == 300 and data.bd_train.poison.sum().item() == 30
    assert (data.bd_train.images[data.bd_train.poison][:, :, 29:, 29:] == 255).all()
    assert len(data.bd_test) == 90
    with pytest.raises(Exception, match="already holds an attack record"):
        BadNet.run(cfg)


def test_killed_attack_resumes_to_the_same_record(tmp_path, monkeypatch):
    """An attack killed after an epoch, re-run with the same command, ends with the model and the
    per-epoch CSV of an uninterrupted run, and its provenance counts the training time of both sessions."""
    import json

    import pandas as pd
    import torch

    from burnkit import engine
    from conftest import make_record

    short = ["--epochs", "3", "--cos_t_max", "3"]
    for work in ("a", "b"):
        (tmp_path / work).mkdir()
    straight = make_record(tmp_path / "a", "badnet", "r", short)
    real_save = engine._save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        if args[7] == 1:  # the epoch argument: "killed" after the second epoch's checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_record(tmp_path / "b", "badnet", "r", short)
    assert not (tmp_path / "b" / "record" / "r" / "attack_result.pt").exists()
    monkeypatch.setattr(engine, "_save_checkpoint", real_save)
    resumed = make_record(tmp_path / "b", "badnet", "r", short)

    a = safe_torch_load(straight / "attack_result.pt")["model"]
    b = safe_torch_load(resumed / "attack_result.pt")["model"]
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    csv_a, csv_b = pd.read_csv(straight / "attack_df.csv"), pd.read_csv(resumed / "attack_df.csv")
    assert csv_b["epoch"].tolist() == [0, 1, 2]
    pd.testing.assert_series_equal(csv_a["test_acc"], csv_b["test_acc"])
    prov = json.loads((resumed / "provenance.json").read_text())
    assert prov["resumed_from_epoch"] == 2
    assert prov["train_time_s_all_sessions"] > prov["train_time_s"] > 0
    assert prov["wall_time_s_all_sessions"] > prov["wall_time_s"]
    assert "wall_time_s_all_sessions" not in json.loads((straight / "provenance.json").read_text())
    assert not (resumed / "checkpoint").exists()


def test_test_every_scores_only_every_nth_and_the_last_epoch(tmp_path):
    """--test_every 2 over 3 epochs scores epochs 2 and 3; the skipped row keeps its training columns,
    and the record's final metrics are the last epoch's."""
    import json

    import pandas as pd

    from conftest import make_record

    record = make_record(tmp_path, "badnet", "r", ["--epochs", "3", "--cos_t_max", "3", "--test_every", "2"])
    csv = pd.read_csv(record / "attack_df.csv")
    assert csv["epoch"].tolist() == [0, 1, 2]
    assert csv["test_acc"].isna().tolist() == [True, False, False]
    assert csv["train_acc"].notna().all()
    with pytest.raises(Exception, match="test_every must be >= 1"):
        BadNet.parse(["--test_every", "0"])[0].validate()
