"""Attack records: read records built independently of our writer, refuse unsafe pickles, and
write records in exactly BackdoorBench's layout (spec §1.3-1.6, §9.1, §9.2, §10)."""
from __future__ import annotations

import collections
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attack_models import create_model
from burnkit.errors import BurnError
from burnkit.records import read_attack_record, read_defense_result, write_defense_result
from burnkit.safe_load import NUMPY_SAFE_GLOBALS, safe_torch_load

# ---------------------------------------------------------------- an independent BackdoorBench record


def _bb_split(name: str, folder: str, n_split: int, poisoned: dict[int, tuple[np.ndarray, int, int]],
              positions: np.ndarray, base: Path) -> dict:
    """The nested dict of spec §1.4, written by hand: numpy.int64 keys, float64 indicator, PNGs
    under ./record/<name>/<folder>/<orig_label>/<idx>.png, stored as CWD-relative strings."""
    data_dict = {}
    for idx, (img, bd_label, orig_label) in poisoned.items():
        target = base / "record" / name / folder / str(orig_label)
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(target / f"{idx}.png")
        data_dict[np.int64(idx)] = {"path": f"./record/{name}/{folder}/{orig_label}/{idx}.png",
                                    "other_info": [bd_label, orig_label]}
    indicator = np.zeros(n_split, dtype=np.float64)
    indicator[list(poisoned)] = 1.0
    return {
        "bd_data_container": {"save_folder_path": f"./record/{name}/{folder}", "save_file_format": ".png",
                              "data_dict": data_dict},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": np.asarray(positions, dtype=np.int64),
        "poison_indicator": indicator,
        "save_folder_path": f"./record/{name}/{folder}",
    }


@pytest.fixture
def bb_cifar_record(cifar_root, tmp_path):
    """A BackdoorBench-style CIFAR-10 record over the real JPEG subset, built with plain torch.save."""
    from burnkit.datasets import load_split

    base = tmp_path / "bb_repo"
    (base / "data").mkdir(parents=True)
    shutil.copytree(cifar_root, base / "data" / "cifar10")
    train_x, train_y = load_split("cifar10", base / "data" / "cifar10", train=True, cache=False)
    test_x, test_y = load_split("cifar10", base / "data" / "cifar10", train=False, cache=False)
    rng = np.random.default_rng(0)
    poisoned_train = {}
    for idx in (3, 40, 41, 299):  # a 2x2 red patch, relabelled to class 0
        img = train_x[idx].copy()
        img[:2, :2] = (255, 0, 0)
        poisoned_train[idx] = (img, 0, int(train_y[idx]))
    test_idx = np.flatnonzero(test_y != 0)
    poisoned_test = {int(i): (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 0, int(test_y[i])) for i in test_idx}
    net = create_model("preactresnet18", num_classes=10)
    state = collections.OrderedDict(("module." + k, v) for k, v in net.state_dict().items())  # DataParallel keys
    record = {
        "model_name": "preactresnet18", "num_classes": 10, "model": state, "data_path": "./data/cifar10",
        "img_size": (32, 32, 3), "clean_data": "cifar10",
        "bd_train": _bb_split("bb_badnet", "bd_train_dataset", len(train_y), poisoned_train, np.arange(len(train_y)), base),
        "bd_test": _bb_split("bb_badnet", "bd_test_dataset", len(test_y), poisoned_test, test_idx, base),
    }
    torch.save(record, base / "record" / "bb_badnet" / "attack_result.pt")
    return base, train_x, train_y, test_x, test_y, poisoned_train, poisoned_test, net


def test_independent_record_loads_with_right_images_and_labels(bb_cifar_record, tmp_path, monkeypatch):
    base, train_x, train_y, test_x, test_y, p_train, p_test, net = bb_cifar_record
    monkeypatch.chdir(tmp_path)  # not the folder the record's relative paths assume
    record = read_attack_record(base / "record" / "bb_badnet", dataset="cifar10")
    assert record.model_name == "preactresnet18" and record.num_classes == 10
    assert record.default_data_root() == (base / "data" / "cifar10").resolve()
    data = record.load_data()
    bd_train = data.bd_train
    assert len(bd_train) == len(train_y) == 300
    assert bd_train.poison.sum().item() == 4
    for pos in range(len(train_y)):
        img = bd_train.images[pos].permute(1, 2, 0).numpy()
        if pos in p_train:
            expected, bd_label, orig = p_train[pos]
            np.testing.assert_array_equal(img, expected)
            assert bd_train.labels[pos].item() == 0 and bd_train.original_labels[pos].item() == orig
            assert bool(bd_train.poison[pos])
        else:
            np.testing.assert_array_equal(img, train_x[pos])
            assert bd_train.labels[pos].item() == bd_train.original_labels[pos].item() == train_y[pos]
    bd_test = data.bd_test
    assert bd_test.index.tolist() == sorted(p_test)
    assert set(bd_test.original_labels.tolist()) == set(range(1, 10))  # target class excluded
    assert (bd_test.labels == 0).all()
    first = sorted(p_test)[0]
    np.testing.assert_array_equal(bd_test.images[0].permute(1, 2, 0).numpy(), p_test[first][0])
    # the DataParallel prefix is stripped and the weights load strictly
    from burnkit.datasets import dataset_info
    from burnkit.models import build_classifier, load_bb_state_dict

    clf = build_classifier(record.model_name, dataset_info("cifar10"))
    load_bb_state_dict(clf, record.state_dict)
    for key, value in net.state_dict().items():
        assert torch.equal(clf.net.state_dict()[key], value)


def test_record_works_after_move_and_with_python_int_keys(bb_cifar_record, tmp_path, monkeypatch):
    base = bb_cifar_record[0]
    moved = tmp_path / "elsewhere" / "record" / "renamed"
    shutil.copytree(base / "record" / "bb_badnet", moved)
    raw = safe_torch_load(moved / "attack_result.pt")
    for split in ("bd_train", "bd_test"):  # WaNet-style records use Python int keys
        dd = raw[split]["bd_data_container"]["data_dict"]
        raw[split]["bd_data_container"]["data_dict"] = {int(k): v for k, v in dd.items()}
    torch.save(raw, moved / "attack_result.pt")
    monkeypatch.chdir(tmp_path)
    record = read_attack_record(moved)
    data = record.load_data(dataset_path=base / "data")  # BackdoorBench's <path>/<dataset> rule
    assert data.bd_train.poison.sum().item() == 4
    assert all(e.path is not None and moved in e.path.parents for e in record.bd_train.entries.values())


def test_record_without_bd_train_is_accepted(bb_cifar_record):
    base = bb_cifar_record[0]
    raw = safe_torch_load(base / "record" / "bb_badnet" / "attack_result.pt")
    raw["bd_train"] = None
    torch.save(raw, base / "record" / "bb_badnet" / "attack_result.pt")
    data = read_attack_record(base / "record" / "bb_badnet").load_data()
    assert data.bd_train is None and len(data.bd_test) == 90


def test_pickled_callable_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "record" / "evil" / "attack_result.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model_name": "preactresnet18", "payload": Exploit()}, path)
    with pytest.raises(BurnError, match=r"(system|posix).*not loaded"):
        read_attack_record(path.parent)
    assert not marker.exists()
    with pytest.raises(BurnError):
        safe_torch_load(path)
    assert not marker.exists()


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_allowlist_accepts_numpy1_and_numpy2_global_names(tmp_path, numpy_module):
    """A record written under NumPy 1.x names ``numpy.core.multiarray``; ours under NumPy 2 names
    ``numpy._core.multiarray``. Patch the pickle stream to the other name and load both."""
    path = tmp_path / "r.pt"
    torch.save({"a": np.arange(3, dtype=np.int64), np.int64(7): np.zeros(2)}, path)
    import zipfile

    with zipfile.ZipFile(path) as zin:
        items = {n: zin.read(n) for n in zin.namelist()}
    pkl = next(n for n in items if n.endswith("data.pkl"))
    other = "numpy._core.multiarray" if numpy_module == "numpy.core.multiarray" else "numpy.core.multiarray"
    items[pkl] = items[pkl].replace(other.encode(), numpy_module.encode())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for name, payload in items.items():
            zout.writestr(name, payload)
    loaded = safe_torch_load(path)
    assert loaded["a"].tolist() == [0, 1, 2] and loaded[7].tolist() == [0.0, 0.0]


def test_bad_records_give_clear_errors(bb_cifar_record, tmp_path):
    base = bb_cifar_record[0]
    rec = base / "record" / "bb_badnet"
    with pytest.raises(BurnError, match="no attack record"):
        read_attack_record(tmp_path / "record" / "missing")
    with pytest.raises(BurnError, match="contradicts the record"):
        read_attack_record(rec, dataset="cifar100")
    raw = safe_torch_load(rec / "attack_result.pt")
    bad = dict(raw, num_classes=43)
    torch.save(bad, rec / "attack_result.pt")
    with pytest.raises(BurnError, match="43 classes"):
        read_attack_record(rec)
    torch.save(dict(raw, img_size=(64, 64, 3)), rec / "attack_result.pt")
    with pytest.raises(BurnError, match="image size"):
        read_attack_record(rec)
    torch.save({k: v for k, v in raw.items() if k != "bd_test"}, rec / "attack_result.pt")
    with pytest.raises(BurnError, match="missing bd_test"):
        read_attack_record(rec)
    torch.save(raw, rec / "attack_result.pt")
    data = (rec / "attack_result.pt").read_bytes()
    (rec / "attack_result.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BurnError, match="corrupt"):
        read_attack_record(rec)


def test_unknown_model_and_class_mismatch_are_reported(tmp_path):
    from burnkit.datasets import dataset_info
    from burnkit.models import build_classifier, load_bb_state_dict

    with pytest.raises(BurnError, match="unknown model 'resnet9000'"):
        build_classifier("resnet9000", dataset_info("cifar10"))
    clf = build_classifier("preactresnet18", dataset_info("cifar10"))
    wrong = create_model("preactresnet18", num_classes=100).state_dict()
    with pytest.raises(BurnError, match=r"linear.weight has shape \(100, 512\)"):
        load_bb_state_dict(clf, wrong)


# ---------------------------------------------------------------- what we write


def test_our_attack_record_has_backdoorbench_layout(digits_workdir):
    """Read our record the way BackdoorBench would: weights-only torch.load with the NumPy
    allowlist, then walk the nested dict of spec §1.3-1.4."""
    rec = digits_workdir / "record" / "badnet_digits"
    with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
        raw = torch.load(rec / "attack_result.pt", weights_only=True)
    assert list(raw) == ["model_name", "num_classes", "model", "data_path", "img_size", "clean_data",
                         "bd_train", "bd_test"]
    assert raw["model_name"] == "smallcnn" and raw["num_classes"] == 10 and raw["clean_data"] == "digits"
    assert raw["data_path"] == "./data/digits" and raw["img_size"] == (8, 8, 1)
    assert isinstance(raw["model"], collections.OrderedDict)
    for split, folder, n in (("bd_train", "bd_train_dataset", 1437), ("bd_test", "bd_test_dataset", 360)):
        state = raw[split]
        assert set(state) == {"bd_data_container", "getitem_all", "getitem_all_switch", "original_index_array",
                              "poison_indicator", "save_folder_path"}
        assert state["getitem_all"] is True and state["getitem_all_switch"] is False
        assert state["original_index_array"].dtype == np.int64
        assert state["poison_indicator"].dtype == np.float64 and len(state["poison_indicator"]) == n
        assert state["save_folder_path"] == f"./record/badnet_digits/{folder}"
        container = state["bd_data_container"]
        assert set(container) == {"save_folder_path", "save_file_format", "data_dict"}
        assert container["save_file_format"] == ".png"
        flagged = set(np.flatnonzero(state["poison_indicator"] == 1).tolist())
        assert set(container["data_dict"]) == flagged
        for idx, entry in container["data_dict"].items():
            bd_label, orig = entry["other_info"]
            assert entry["path"] == f"./record/badnet_digits/{folder}/{orig}/{idx}.png"
            assert (rec / folder / str(orig) / f"{idx}.png").is_file()
            assert bd_label == 0
    assert int(raw["bd_train"]["poison_indicator"].sum()) == round(0.1 * 1437)
    test_labels = read_attack_record(rec).load_data().clean_test.labels.numpy()
    assert set(np.flatnonzero(raw["bd_test"]["poison_indicator"]).tolist()) == set(np.flatnonzero(test_labels != 0).tolist())
    for extra in ("info.pickle", "train_poison_index_list.pickle", "attack_df.csv", "attack_df_summary.csv",
                  "provenance.json"):
        assert (rec / extra).is_file()


def test_defense_result_has_exactly_three_keys_and_fp_masks_fold(tmp_path):
    net = create_model("smallcnn", num_classes=10)
    path = write_defense_result(tmp_path, "smallcnn", 10, net.state_dict())
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["model_name", "num_classes", "model"]
    # BackdoorBench's FP output: linear.weight_orig * linear.weight_mask (spec §9.3)
    state = collections.OrderedDict(net.state_dict())
    weight = state.pop("classifier.weight")
    mask = torch.ones_like(weight)
    mask[:, :5] = 0
    state["classifier.weight_orig"], state["classifier.weight_mask"] = weight, mask
    torch.save({"model_name": "smallcnn", "num_classes": 10, "model": state}, tmp_path / "fp.pt")
    folded = read_defense_result(tmp_path / "fp.pt")["model"]
    assert torch.equal(folded["classifier.weight"], weight * mask)
    assert "classifier.weight_mask" not in folded
    fresh = create_model("smallcnn", num_classes=10)
    fresh.load_state_dict(folded, strict=True)
