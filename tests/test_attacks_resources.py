"""LF, LC, SSBA and TrojanNN: trigger functions against their definitions, resource generators on
real (digits) data, records read back by our loader, and one-line errors for missing resources.

All resources are generated in the test session by the committed generators (tiny settings).
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from burnkit.attacks.lc import add_corner_trigger, corner_signs
from burnkit.attacks.lf import add_pattern, load_lf_pattern
from burnkit.attacks.trojannn import (add_trigger, default_mask_image, neuron_activations, optimise_trigger,
                                      select_neurons)
from burnkit.datasets import dataset_info, load_split
from burnkit.records import read_attack_record
from burnkit.safe_load import safe_torch_load
from burnkit.resources import (crafted_path, lc_adv_path, lf_pattern_path, load_clean_model, ssba_codec_path,
                               ssba_paths)
from burnkit.resources.__main__ import main as resources_main
from burnkit.resources.ssba_codec import StegaCodec, bit_accuracy
from conftest import make_record

DIGITS = dataset_info("digits")
LF_EPS, LF_CUTOFF, SSBA_EPS = 0.2, 0.5, 16
ONE_EPOCH = ["--epochs", "1", "--cos_t_max", "1"]


@pytest.fixture(scope="session")
def resource_workdir(tmp_path_factory):
    """A working directory whose resource_cache/ holds every digits resource, made by the CLI."""
    work = tmp_path_factory.mktemp("atk2_resources")
    common = ["--dataset", "digits", "--model", "smallcnn", "--progress", "false"]
    with contextlib.chdir(work):
        resources_main(["clean_model", *common, "--epochs", "4", "--lr", "0.05"])
        resources_main(["lf_pattern", *common, "--iters", "40", "--eps", str(LF_EPS), "--cutoff", str(LF_CUTOFF)])
        resources_main(["lc_adv", *common, "--steps", "5", "--eps", "32", "--step_size", "8", "--classes", "0"])
        resources_main(["ssba", *common, "--epochs", "12", "--n_bits", "8", "--batch_size", "32",
                        "--eps", str(SSBA_EPS), "--train_subset", "0"])
    return work


@pytest.fixture(scope="session")
def digits_split():
    return load_split("digits", None, train=True), load_split("digits", None, train=False)


# --------------------------------------------------------------------------- trigger definitions

def test_four_corner_pattern_pixels():
    signs = corner_signs(32, 32)
    checker = np.array([[1, -1, 1], [-1, 1, -1], [1, -1, 1]])
    for rows in (slice(0, 3), slice(29, 32)):
        for cols in (slice(0, 3), slice(29, 32)):
            assert (signs[rows, cols] == checker).all()
    assert np.count_nonzero(signs) == 36
    grey = np.full((2, 32, 32, 3), 100, np.uint8)
    full = add_corner_trigger(grey, 1.0)
    assert full[0, 0, 0, 0] == 255 and full[0, 0, 1, 2] == 0 and full[1, 31, 31, 1] == 255 and full[1, 30, 31, 0] == 0
    assert (full[:, 3:29] == 100).all() and (full[:, :, 3:29] == 100).all()
    half = add_corner_trigger(grey, 0.5)  # 100 +- 127.5, clipped, truncated
    assert half[0, 0, 0, 0] == 227 and half[0, 0, 1, 0] == 0
    pasted = add_corner_trigger(grey, None)
    assert (pasted == full).all()
    # 8x8, nearest from 32x32: output pixel i samples canvas pixel floor((i + 0.5) * 4), i.e. 0 -> 2 and
    # 7 -> 30, so the corners show checker cells (2, 2), (2, 30), (30, 2), (30, 30) = +1, -1, -1, +1
    tiny = corner_signs(8, 8)
    assert set(zip(*np.nonzero(tiny))) == {(0, 0), (0, 7), (7, 0), (7, 7)}
    assert tiny[[0, 0, 7, 7], [0, 7, 0, 7]].tolist() == [1, -1, -1, 1]


def test_lf_add_clips_and_float_patterns_do_not_vanish(tmp_path):
    pattern = np.zeros((8, 8, 1)); pattern[0, 0, 0] = 10
    imgs = np.full((1, 8, 8, 1), 250, np.uint8); imgs[0, 1, 1, 0] = 100
    out = add_pattern(imgs, pattern)
    assert out[0, 0, 0, 0] == 255 and out[0, 1, 1, 0] == 100 and out[0, 2, 2, 0] == 250
    np.save(tmp_path / "float.npy", np.full((1, 8, 8, 1), 0.1, np.float32))  # BackdoorBench's 4-D float format
    assert np.allclose(load_lf_pattern(tmp_path / "float.npy", DIGITS), 25.5)
    np.save(tmp_path / "flat.npy", np.full((8, 8), 7, np.uint8))  # 2-D: replicated over channels
    assert load_lf_pattern(tmp_path / "flat.npy", DIGITS).shape == (8, 8, 1)


def test_lf_pattern_is_low_frequency(resource_workdir, digits_split):
    pattern = np.load(lf_pattern_path(resource_workdir / "resource_cache", "digits", "smallcnn"))
    assert pattern.dtype == np.uint8 and pattern.shape == (8, 8, 1)
    assert pattern.min() == 0 and 0 < pattern.max() <= round(2 * LF_EPS * 255)
    spectrum = np.abs(np.fft.fft2(pattern[..., 0].astype(np.float64))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(8), np.fft.fftfreq(8), indexing="ij")
    radius = np.hypot(fy, fx) / 0.5
    assert spectrum[radius > LF_CUTOFF].sum() < 1e-2 * spectrum[radius > 0].sum()


def test_ssba_codec_is_invisible_and_decodable(resource_workdir, digits_split):
    (train_x, _), (test_x, _) = digits_split
    cache = resource_workdir / "resource_cache"
    train_path, test_path = ssba_paths(cache, "digits")
    bd_train, bd_test = np.load(train_path), np.load(test_path)
    assert bd_train.shape == train_x.shape and bd_test.shape == test_x.shape and bd_train.dtype == np.uint8
    change = bd_train.astype(int) - train_x.astype(int)
    assert np.abs(change).max() <= SSBA_EPS + 1  # budget, plus rounding
    assert np.abs(change).mean() > 0.5  # something is embedded
    saved = torch.load(ssba_codec_path(cache, "digits"), weights_only=True)
    codec = StegaCodec(1, 8, saved["n_bits"], saved["eps"], saved["width"])
    codec.load_state_dict(saved["state_dict"])
    assert bit_accuracy(codec, bd_train, saved["bits"], torch.device("cpu")) >= 0.9
    assert bit_accuracy(codec, train_x, saved["bits"], torch.device("cpu")) < 0.9  # clean images do not carry it


def test_trojannn_trigger_excites_neurons_within_mask(resource_workdir):
    model = load_clean_model(DIGITS, "smallcnn", resource_workdir / "resource_cache")
    importance = model.net.classifier.weight.detach().abs().sum(0)
    assert set(select_neurons(model.net, "classifier.weight", 2).tolist()) == \
        set(importance.argsort(descending=True)[:2].tolist())
    mask_img = default_mask_image(8, 8, 1)
    assert np.argwhere(mask_img[..., 0]).min(0).tolist() == [4, 4] and np.argwhere(mask_img[..., 0]).max(0).tolist() == [7, 6]
    start = torch.as_tensor(mask_img, dtype=torch.float32).permute(2, 0, 1) / 255
    mask = (start > 0).float()
    every = neuron_activations(model, "classifier", torch.arange(len(importance)), start[None])[0]
    neurons = select_neurons(model.net, "classifier.weight", 2, every > 0)
    ranked = [int(i) for i in importance.argsort(descending=True) if every[i] > 0][:2]
    assert sorted(neurons.tolist()) == sorted(ranked)
    trigger = optimise_trigger(model, "classifier", neurons, start, mask, target_value=100, iters=30, step=0.1, eps=0.3)
    before = neuron_activations(model, "classifier", neurons, start[None])
    after = neuron_activations(model, "classifier", neurons, trigger[None])
    assert (after > before).all()
    assert (trigger[mask == 0] == 0).all() and (trigger[mask == 1] >= 0.7 - 1e-6).all()
    # added and clipped, never wrapped modulo 256 (BackdoorBench's uint8 bug would give 194 here)
    assert add_trigger(np.full((1, 8, 8, 1), 250, np.uint8), np.full((8, 8, 1), 200, np.uint8))[0, 0, 0, 0] == 255


# --------------------------------------------------------------------------- records

def _record(work, attack, name, extra=()):
    record_dir = make_record(work, attack, name, [*ONE_EPOCH, *extra])
    return read_attack_record(record_dir), record_dir


def _check_common(record, record_dir, train_y, test_y, target=0, all2all=False):
    data = record.load_data()
    flags = safe_torch_load(record_dir / "train_poison_index_list.pickle")
    poisoned = np.flatnonzero(flags == 1)
    assert (data.bd_train.poison.numpy() == (flags == 1)).all()
    expected = (train_y[poisoned] + 1) % 10 if all2all else np.full(len(poisoned), target)
    assert (data.bd_train.labels.numpy()[poisoned] == expected).all()
    assert (data.bd_train.original_labels.numpy()[poisoned] == train_y[poisoned]).all()
    test_index = data.bd_test.index.numpy()
    assert (test_index == (np.arange(len(test_y)) if all2all else np.flatnonzero(test_y != target))).all()
    return data, poisoned, test_index


def test_lf_record_all2all(resource_workdir, digits_split):
    (train_x, train_y), (test_x, test_y) = digits_split
    record, record_dir = _record(resource_workdir, "lf", "lf_digits", ["--attack_label_trans", "all2all"])
    data, poisoned, test_index = _check_common(record, record_dir, train_y, test_y, all2all=True)
    assert len(poisoned) == round(0.1 * len(train_y))
    pattern = np.load(lf_pattern_path(resource_workdir / "resource_cache", "digits", "smallcnn")).astype(float)
    assert (data.bd_train.numpy_images()[poisoned] == add_pattern(train_x[poisoned], pattern)).all()
    assert (data.bd_test.numpy_images() == add_pattern(test_x[test_index], pattern)).all()


def test_lc_record_is_clean_label(resource_workdir, digits_split):
    (train_x, train_y), (test_x, test_y) = digits_split
    record, record_dir = _record(resource_workdir, "lc", "lc_digits", ["--pratio", "0.05"])
    data, poisoned, test_index = _check_common(record, record_dir, train_y, test_y)
    assert len(poisoned) == round(0.05 * len(train_y))  # the ratio is over ALL training samples
    assert (train_y[poisoned] == 0).all()  # drawn from the target class, labels unchanged
    adv = np.load(lc_adv_path(resource_workdir / "resource_cache", "digits", "smallcnn"))
    assert (np.load(crafted_path(lc_adv_path(resource_workdir / "resource_cache", "digits", "smallcnn")))
            == (train_y == 0)).all()
    assert (adv[poisoned] != train_x[poisoned]).any()
    assert (data.bd_train.numpy_images()[poisoned] == add_corner_trigger(adv[poisoned])).all()
    assert (data.bd_test.numpy_images() == add_corner_trigger(test_x[test_index])).all()  # no adversarial part


def test_ssba_record_replaces_by_original_index(resource_workdir, digits_split):
    (train_x, train_y), (test_x, test_y) = digits_split
    record, record_dir = _record(resource_workdir, "ssba", "ssba_digits")
    data, poisoned, test_index = _check_common(record, record_dir, train_y, test_y)
    train_arr, test_arr = (np.load(p) for p in ssba_paths(resource_workdir / "resource_cache", "digits"))
    assert (data.bd_train.numpy_images()[poisoned] == train_arr[poisoned]).all()
    assert (data.bd_test.numpy_images() == test_arr[test_index]).all()


def test_trojannn_record_uses_model_yaml_and_saves_trigger(resource_workdir, digits_split):
    from PIL import Image

    (train_x, train_y), (test_x, test_y) = digits_split
    record, record_dir = _record(resource_workdir, "trojannn", "trojannn_digits", ["--mask_update_iters", "20"])
    data, poisoned, test_index = _check_common(record, record_dir, train_y, test_y)
    info = safe_torch_load(record_dir / "info.pickle")
    assert info["bd_yaml_path"].endswith("trojannn/smallcnn.yaml") and info["selected_layer_name"] == "classifier"
    trigger = np.asarray(Image.open(record_dir / "trojannn_trigger.png"))[..., None]
    assert (data.bd_test.numpy_images() == add_trigger(test_x[test_index], trigger)).all()


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("attack, command", [
    ("lf", "python -m burnkit.resources lf_pattern --dataset digits --model smallcnn"),
    ("lc", "python -m burnkit.resources lc_adv --dataset digits --model smallcnn --classes 0"),
    ("ssba", "python -m burnkit.resources ssba --dataset digits"),
    ("trojannn", "python -m burnkit.resources clean_model --dataset digits --model smallcnn"),
])
def test_missing_resource_names_the_command(attack, command, tmp_path, monkeypatch, capsys):
    from burnkit.attack import get_attack

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        get_attack(attack).main(["--dataset", "digits", "--model", "smallcnn", "--save_folder_name", "x"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert f"`{command}`" in err and "resource_cache/" in err and "not found" in err
    assert not (tmp_path / "record").exists()  # nothing written


def test_resource_generator_needs_clean_model_and_lc_refuses_all2all(tmp_path, monkeypatch, capsys):
    from burnkit.attacks.lc import LabelConsistent

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        resources_main(["lf_pattern", "--dataset", "digits", "--model", "smallcnn"])
    assert "`python -m burnkit.resources clean_model --dataset digits --model smallcnn`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        LabelConsistent.main(["--dataset", "digits", "--attack_label_trans", "all2all"])
    assert "all2one" in capsys.readouterr().err
