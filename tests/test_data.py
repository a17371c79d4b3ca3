"""Dataset readers, the uint8 cache, and the batch augmentation (spec §2)."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from burnkit.data import Augment, ImageSet, batches, class_balanced_subset
from burnkit.datasets import DATASETS, load_split, read_idx, resolve_data_root
from burnkit.errors import BurnError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_cifar_image_folder_labels_follow_sorted_classes(cifar_root):
    x, y = load_split("cifar10", cifar_root, train=True, cache=False)
    assert x.shape == (300, 32, 32, 3) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [30] * 10
    first_cat = sorted((cifar_root / "train" / "cat").iterdir())[0]
    np.testing.assert_array_equal(x[np.flatnonzero(y == CIFAR_CLASSES.index("cat"))[0]],
                                  np.asarray(Image.open(first_cat).convert("RGB")))


def test_cache_is_reused_and_equal(cifar_root, tmp_path):
    import shutil

    root = tmp_path / "cifar10"
    shutil.copytree(cifar_root / "test", root / "test")
    x1, y1 = load_split("cifar10", root, train=False)
    cache_files = list((root / ".burnkit_cache").glob("cifar10-test-*.images.npy"))
    assert len(cache_files) == 1
    written = cache_files[0].stat().st_mtime_ns
    x2, y2 = load_split("cifar10", root, train=False)
    assert cache_files[0].stat().st_mtime_ns == written  # read, not rebuilt
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_flat_layout(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28))
    labels = np.array([3, 1, 4, 1, 5])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    x, y = load_split("fashion-mnist", tmp_path, train=False, cache=False)
    assert x.shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(x[..., 0], imgs)
    assert y.tolist() == [3, 1, 4, 1, 5]
    (tmp_path / "bad-idx.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(BurnError, match="truncated"):
        read_idx(tmp_path / "bad-idx.gz")


def test_cifar_python_batches_are_read_without_torchvision(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": [9, 8, 7, 6]}, f, protocol=2)
    x, y = load_split("cifar10", tmp_path / "cifar10", train=False, cache=False)
    np.testing.assert_array_equal(x[2], data[2].reshape(3, 32, 32).transpose(1, 2, 0))
    assert y.tolist() == [9, 8, 7, 6]


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(BurnError, match="cifar100 not found"):
        load_split("cifar100", tmp_path / "nothing", train=True)
    with pytest.raises(BurnError, match="unknown dataset"):
        load_split("imagenet22k", tmp_path, train=True)


def test_archive_is_unpacked_once(cifar_root, tmp_path, monkeypatch):
    import tarfile

    archive = tmp_path / "c10.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_root / "train", arcname="train")
        tar.add(cifar_root / "test", arcname="test")
    monkeypatch.chdir(tmp_path)
    root = resolve_data_root(archive, "cifar10")
    assert root == tmp_path.joinpath("data", "cifar10").relative_to(tmp_path) or root.resolve() == (tmp_path / "data" / "cifar10")
    x, y = load_split("cifar10", root, train=False, cache=False)
    assert len(y) == 100


def test_digits_split_sizes_match_dataset_info():
    x, y = load_split("digits", None, train=True)
    xt, yt = load_split("digits", None, train=False)
    assert (len(y), len(yt)) == (DATASETS["digits"].train_size, DATASETS["digits"].test_size) == (1437, 360)
    assert x.dtype == np.uint8 and x.max() == 255 and x.shape[1:] == (8, 8, 1)


def test_augment_crop_is_a_zero_padded_shift_and_flip_only_when_asked():
    img = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1) + 1
    out = Augment(padding=1, flip=False)(img, generator=torch.Generator().manual_seed(0))
    assert out.shape == img.shape and out.dtype == torch.uint8
    for sample in out:  # each output is the padded image cropped somewhere: values shift, zeros fill
        nz = sample[0][sample[0] > 0]
        assert set(nz.tolist()) <= set(range(1, 17))
    assert any(torch.equal(s, img[0]) for s in out)  # the centred crop occurs
    flipped = Augment(padding=0, flip=True)(img, generator=torch.Generator().manual_seed(0))
    n_flipped = sum(torch.equal(s, img[0].flip(2)) for s in flipped)
    assert 10 < n_flipped < 54 and all(torch.equal(s, img[0]) or torch.equal(s, img[0].flip(2)) for s in flipped)


def test_batches_cover_everything_once_and_subset_is_balanced():
    seen = torch.cat(list(batches(103, 10, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert sorted(seen.tolist()) == list(range(103))
    labels = np.repeat(np.arange(10), 50)
    idx = class_balanced_subset(labels, 105, np.random.default_rng(0))
    counts = np.bincount(labels[idx])
    assert len(idx) == 105 and counts.max() - counts.min() <= 1 and len(set(idx)) == 105


def test_imageset_batch_scales_to_unit_range():
    s = ImageSet.from_numpy(np.full((3, 2, 2, 1), 255, np.uint8), [0, 1, 2])
    b = s.batch(torch.tensor([0, 2]))
    assert b.x.dtype == torch.float32 and b.x.max().item() == 1.0 and b.y.tolist() == [0, 2]
