"""BackdoorBench's datasets in their official on-disk layouts (spec §2.3): small fixtures written
byte-format-faithfully here (CIFAR-100 pickles, GTSRB's Train/<class>/GT-*.csv with .ppm images and
Test/GT-final_test.csv, Tiny-ImageNet's wnids.txt and val/val_annotations.txt, MNIST's idx files),
read through the readers, attacked into a record, and defended by BURN for one iteration."""
from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from burnkit.attack import get_attack
from burnkit.datasets import dataset_info, load_split
from burnkit.defenses.burn import Burn
from burnkit.records import read_attack_record

GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def _resized(path: Path, size: tuple[int, int], mode: str = "RGB") -> np.ndarray:
    """What BackdoorBench's ``Resize`` makes of an image file (PIL bilinear)."""
    with Image.open(path) as img:
        img = img.convert(mode)
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        return np.asarray(img)


def write_cifar100(root: Path, rng) -> dict:
    """``cifar-100-python/{train,test,meta}``: protocol-2 pickles of dicts whose ``data`` is an
    N x 3072 uint8 array, with the NumPy-1 global names the distributed files carry."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    expected = {}
    for split, n in (("train", 60), ("test", 20)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        payload = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{split} batch 1 of 1",
                   "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": data}
        raw = pickle.dumps(payload, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / split).write_bytes(raw)
        expected[split] = (data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(fine))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)],
                                                "coarse_label_names": [f"s{i}" for i in range(20)]}, protocol=2))
    assert b"numpy.core.multiarray" in (folder / "train").read_bytes()
    return expected


def _gtsrb_image(folder: Path, name: str, class_id: int, rng, expected: tuple[list, list]) -> str:
    """One variable-size ``.ppm`` and its GT-csv row; its 32-px version goes to ``expected``."""
    w, h = (int(v) for v in rng.integers(25, 48, 2))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    expected[0].append(_resized(folder / name, (32, 32)))
    expected[1].append(class_id)
    return f"{name};{w};{h};5;5;{w - 5};{h - 5};{class_id}"


def write_gtsrb(root: Path, rng) -> dict:
    """``Train/<c:05d>/GT-<c:05d>.csv`` + variable-size ``.ppm`` images for all 43 classes, and
    ``Test/*.ppm`` + ``Test/GT-final_test.csv`` (';'-separated, ClassId in column 7)."""
    expected = {"train": ([], []), "test": ([], [])}
    for c in range(43):
        folder = root / "Train" / f"{c:05d}"
        folder.mkdir(parents=True)
        rows = [_gtsrb_image(folder, f"{track:05d}_00000.ppm", c, rng, expected["train"]) for track in range(2)]
        (folder / f"GT-{c:05d}.csv").write_text("\n".join([GT_HEADER, *rows]) + "\n")
    test = root / "Test"
    test.mkdir()
    rows = [_gtsrb_image(test, f"{i:05d}.ppm", c, rng, expected["test"])
            for i, c in enumerate(rng.permutation(43).tolist() + [0, 5, 9])]
    (test / "GT-final_test.csv").write_text("\n".join([GT_HEADER, *rows]) + "\n")
    return {k: (np.stack(x), np.asarray(y)) for k, (x, y) in expected.items()}


TINY_WNIDS = ["n04067472", "n01443537", "n09256479", "n02124075", "n07747607", "n01629819"]  # wnids.txt order


def write_tiny(root: Path, rng) -> dict:
    """``tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG, train/<wnid>/<wnid>_boxes.txt,
    val/images/*.JPEG, val/val_annotations.txt}``, as the official zip unpacks."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (base / "words.txt").write_text("\n".join(f"{w}\tthing {i}" for i, w in enumerate(TINY_WNIDS)) + "\n")
    label = {w: i for i, w in enumerate(sorted(TINY_WNIDS))}  # ImageFolder's sorted-folder rule
    train_x, train_y = [], []
    for wnid in sorted(TINY_WNIDS):
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        boxes = []
        for j in range(8):
            name = f"{wnid}_{j}.JPEG"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / name, format="JPEG")
            boxes.append(f"{name}\t0\t0\t63\t63")
            train_x.append(_resized(images / name, (64, 64)))
            train_y.append(label[wnid])
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    val = base / "val" / "images"
    val.mkdir(parents=True)
    rows = []
    for i in range(18):
        wnid = TINY_WNIDS[int(rng.integers(0, len(TINY_WNIDS)))]
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(val / f"val_{i}.JPEG", format="JPEG")
        rows.append((f"val_{i}.JPEG", wnid))
    (base / "val" / "val_annotations.txt").write_text("".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in rows))
    # BackdoorBench's order: ImageFolder over val/<wnid>/ after its move - class by class, names sorted
    ordered = sorted((label[w], f) for f, w in rows)
    test_x = np.stack([_resized(val / f, (64, 64)) for _, f in ordered])
    return {"train": (np.stack(train_x), np.asarray(train_y)), "test": (test_x, np.asarray([y for y, _ in ordered]))}


def write_mnist(root: Path, rng) -> dict:
    """torchvision's ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (big-endian IDX)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    expected = {}
    for split, prefix, n in (("train", "train", 80), ("test", "t10k", 30)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 0x803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 0x801, n) + labels.tobytes())
        expected[split] = (images[..., None], labels.astype(np.int64))
    return expected


WRITERS = {"cifar100": write_cifar100, "gtsrb": write_gtsrb, "tiny": write_tiny, "mnist": write_mnist}


@pytest.fixture(params=sorted(WRITERS))
def official_layout(request, tmp_path):
    name = request.param
    root = tmp_path / "data" / name
    root.mkdir(parents=True)
    expected = WRITERS[name](root, np.random.default_rng(7))
    return name, tmp_path, root, expected


def test_official_layout_is_read_recorded_and_defended(official_layout, monkeypatch):
    name, work, root, expected = official_layout
    info = dataset_info(name)
    for split in ("train", "test"):
        x, y = load_split(name, root, train=split == "train", cache=False)
        assert x.shape[1:] == info.img_size and x.dtype == np.uint8
        np.testing.assert_array_equal(x, expected[split][0])
        np.testing.assert_array_equal(y, expected[split][1])

    monkeypatch.chdir(work)
    attack = get_attack("badnet")
    cfg, _ = attack.parse(["--dataset", name, "--model", "smallcnn", "--epochs", "1", "--batch_size", "16",
                           "--pratio", "0.2", "--save_folder_name", f"badnet_{name}", "--progress", "false"])
    attack.run(cfg)
    record_dir = work / "record" / f"badnet_{name}"
    record = read_attack_record(record_dir)
    assert (record.clean_data, record.num_classes, record.img_size) == (name, info.num_classes, info.img_size)
    data = record.load_data()  # the clean data found again at ./data/<name> beside record/
    np.testing.assert_array_equal(data.clean_test.numpy_images(), expected["test"][0])
    n_train = len(expected["train"][1])
    assert len(data.bd_train) == n_train and int(data.bd_train.poison.sum()) == round(0.2 * n_train)
    assert (expected["test"][1][data.bd_test.index.numpy()] != 0).all()

    out = Burn.main(["--result_file", f"badnet_{name}", "--iterations", "1", "--epochs", "1", "--batch_size", "16",
                     "--max_iter", "5", "--candidates", "4", "--kp_start", "0.1", "--kp_end", "0.2",
                     "--kc_start", "0.2", "--kc_end", "0.4", "--progress", "false",
                     "--premise_check", "false", "--keep", "last"])  # a 1-epoch toy model: the pipeline, not the checks, is tested
    out_dir = record_dir / "defense" / "burn"
    assert Path(out["out_dir"]).resolve() == out_dir.resolve() and (out_dir / "defense_result.pt").is_file()
    rows = pd.read_csv(out_dir / "burn_df.csv", index_col=0)
    assert len(rows) == 2  # Phase 1 and one Phase-2 iteration
    assert json.loads((out_dir / "cost.json").read_text())["final"]["test_acc"] is not None


def test_tiny_val_in_backdoorbench_sorted_folders_reads_the_same(tmp_path):
    """BackdoorBench moves val images into val/<wnid>/ after downloading; both layouts give the
    same arrays in the same order."""
    flat = tmp_path / "flat"
    expected = write_tiny(flat, np.random.default_rng(3))
    sorted_root = tmp_path / "sorted"
    shutil.copytree(flat, sorted_root)
    val = sorted_root / "tiny-imagenet-200" / "val"
    for line in (val / "val_annotations.txt").read_text().splitlines():
        fname, wnid = line.split("\t")[:2]
        (val / wnid).mkdir(exist_ok=True)
        shutil.move(val / "images" / fname, val / wnid / fname)
    (val / "images").rmdir()
    (val / "val_annotations.txt").unlink()
    for root in (flat, sorted_root):
        x, y = load_split("tiny", root, train=False, cache=False)
        np.testing.assert_array_equal(x, expected["test"][0])
        np.testing.assert_array_equal(y, expected["test"][1])
    train_x, train_y = load_split("tiny", sorted_root, train=True, cache=False)
    assert train_y.tolist() == sorted(train_y.tolist())  # n01443537 -> 0, ..., n09256479 -> 5
    assert train_y.max() == 5 and (train_y == 0).sum() == 8
