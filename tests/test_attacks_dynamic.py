"""SIG, WaNet, BPP and InputAware: trigger functions against their definitions, and the records
they write (digits, smallcnn, 1-2 epochs) read back through our loader with BackdoorBench's
poison semantics (spec §1.4, §9.5)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from burnkit.attack import get_attack
from burnkit.attacks.bpp import floyd_steinberg, squeeze_colors
from burnkit.attacks.dynamic import to_float, to_uint8
from burnkit.attacks.inputaware import MaskGenerator, PatternGenerator, compose, diversity_loss
from burnkit.attacks.sig import add_sinusoid
from burnkit.attacks.wanet import identity_grid, noisy_grids, random_warp_field, warp, warp_grid
from burnkit.datasets import dataset_info, load_split
from burnkit.errors import BurnError
from burnkit.records import read_attack_record
from conftest import FIXTURE_SEED, make_record

TARGET = 0


# --------------------------------------------------------------------------- trigger functions


def test_sig_adds_the_sinusoid_per_column_clips_and_truncates():
    images = np.full((2, 3, 32, 3), 100, dtype=np.uint8)
    images[1] = 250
    out = add_sinusoid(images, delta=40, freq=6)
    # column 1: 40 sin(2 pi 6/32) = 40 sin(3 pi / 8) = 36.955 -> 136.955 truncated to 136
    assert (out[0, :, 1, :] == 136).all()
    # column 4: 40 sin(3 pi / 2) = -40 -> 60; column 0: + 0
    assert (out[0, :, 4, :] == 60).all() and (out[0, :, 0, :] == 100).all()
    # 250 + 36.955 clips to 255; 250 - 40 = 210
    assert (out[1, :, 1, :] == 255).all() and (out[1, :, 4, :] == 210).all()
    expected = np.clip(100 + 40 * np.sin(2 * np.pi * np.arange(32) * 6 / 32), 0, 255).astype(np.uint8)
    assert (out[0] == expected[None, :, None]).all()  # the same in every row and channel


def test_wanet_identity_field_is_the_identity():
    x = torch.rand(3, 2, 6, 6)
    grid = warp_grid(torch.zeros(1, 6, 6, 2), s=0.5)
    assert torch.allclose(grid, identity_grid(6, 6))
    assert torch.allclose(warp(x, grid), x, atol=1e-6)
    images = np.random.default_rng(0).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    assert (to_uint8(warp(to_float(images), grid)) == images).all()


@pytest.mark.parametrize("sign", [1, -1])
def test_wanet_constant_field_shifts_by_the_computed_pixels(sign):
    h = w = 6
    s = 0.5
    # s * c / H normalised units = one pixel = 2 / (W - 1) (align_corners=True)  =>  c = 2H / (s (W - 1))
    c = 2 * h / (s * (w - 1))
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w) / (h * w)
    cols = torch.zeros(1, h, w, 2)
    cols[..., 0] = sign * c
    shifted = warp(x, warp_grid(cols, s))
    if sign > 0:  # output column j samples input column j + 1; the last column is clamped
        assert torch.allclose(shifted[..., :-1], x[..., 1:], atol=1e-5)
        assert torch.allclose(shifted[..., -1], x[..., -1], atol=1e-5)
    else:
        assert torch.allclose(shifted[..., 1:], x[..., :-1], atol=1e-5)
    rows = torch.zeros(1, h, w, 2)
    rows[..., 1] = c / 2  # half a pixel down: the mean of rows i and i + 1
    down = warp(x, warp_grid(rows, s))
    assert torch.allclose(down[..., :-1, :], (x[..., :-1, :] + x[..., 1:, :]) / 2, atol=1e-5)


def test_wanet_field_is_seeded_normalised_and_cross_noise_is_bounded():
    f1 = random_warp_field(4, 10, 10, torch.Generator().manual_seed(3))
    f2 = random_warp_field(4, 10, 10, torch.Generator().manual_seed(3))
    assert torch.equal(f1, f2) and f1.shape == (1, 10, 10, 2)
    # with align_corners=True the upsampled field passes through the k x k samples (every 3rd pixel
    # for 4 -> 10), whose mean absolute value is 1 after the normalisation
    assert math.isclose(f1[0, ::3, ::3].abs().mean().item(), 1.0, rel_tol=1e-5)
    grid = warp_grid(f1, 0.5)
    noisy = noisy_grids(grid, 5, torch.Generator().manual_seed(0))
    assert noisy.shape == (5, 10, 10, 2)
    assert (noisy - grid).abs().max() <= 1 / 10 + 1e-6 and noisy.abs().max() <= 1


def test_bpp_levels_are_the_nearest_multiples_of_255_over_levels_minus_one():
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    for levels in (8, 2, 5):
        out = to_uint8(squeeze_colors(to_float(values), levels)).ravel()
        step = 255 / (levels - 1)
        nearest = np.round(np.round(np.arange(256) / step) * step).astype(np.uint8)
        assert (out == nearest).all()
        assert len(np.unique(out)) == levels
    dithered = floyd_steinberg(torch.full((1, 3, 16, 16), 0.3), 8)
    levels8 = torch.arange(8) / 7
    assert torch.isclose(dithered[..., None], levels8).any(-1).all()  # only the 8 levels occur
    assert abs(dithered.mean().item() - 0.3) < 0.02  # error diffusion keeps the mean colour


def test_inputaware_composition_and_networks():
    x = torch.rand(4, 3, 8, 8)
    pattern = torch.rand(4, 3, 8, 8)
    assert torch.equal(compose(x, pattern, torch.zeros(4, 1, 8, 8)), x)
    assert torch.allclose(compose(x, pattern, torch.ones(4, 1, 8, 8)), pattern)
    assert torch.allclose(compose(x, pattern, torch.full((4, 1, 8, 8), 0.5)), (x + pattern) / 2)
    gen, masker = PatternGenerator(3, 3), MaskGenerator(3)
    p, m = gen(x), masker(x)
    assert p.shape == x.shape and m.shape == (4, 1, 8, 8)
    assert p.min() >= 0 and p.max() <= 1 and m.min() >= 0 and m.max() <= 1
    # different inputs with identical triggers are penalised; a finite loss and gradient even then
    t = torch.zeros(4, 3, 8, 8, requires_grad=True)
    loss = diversity_loss(x, x.flip(0), t, t.detach(), 1e-7)
    loss.backward()
    assert torch.isfinite(loss) and loss > 1e3 and torch.isfinite(t.grad).all()


# --------------------------------------------------------------------------- records


def _blocks(n: int, bs: int, pratio: float, cross):
    """Expected (bd, cross) positions of BackdoorBench's rebuilt bd_train (spec §9.5)."""
    bd, cr = [], []
    for start in range(0, n, bs):
        size = min(bs, n - start)
        nb = int(pratio * size)
        nc = min(cross(nb, size), size - nb)
        bd += range(start, start + nb)
        cr += range(start + nb, start + nb + nc)
    return np.asarray(bd), np.asarray(cr)


FAST = ["--epochs", "1", "--batch_size", "128"]
RUNS = {
    "wanet_digits": ("wanet", [*FAST, "--s", "2"], lambda nb, n: int(nb * 2)),
    "bpp_digits": ("bpp", FAST, lambda nb, n: int(n * 0.1)),
    "bpp_all2all_digits": ("bpp", [*FAST, "--attack_label_trans", "all2all"], lambda nb, n: int(n * 0.1)),
    "inputaware_digits": ("inputaware", ["--epochs", "2", "--clean_train_epochs", "1"], lambda nb, n: nb),
}


@pytest.fixture(scope="module")
def dynamic_records(tmp_path_factory):
    work = tmp_path_factory.mktemp("dynamic_attacks")
    for name, (attack, extra, _) in RUNS.items():
        make_record(work, attack, name, extra)
    make_record(work, "sig", "sig_digits", ["--epochs", "1", "--pratio", "0.05"])
    return work


@pytest.mark.parametrize("name", list(RUNS))
def test_dynamic_record_has_backdoorbench_poison_layout(dynamic_records, name):
    attack, _, cross = RUNS[name]
    record = read_attack_record(dynamic_records / "record" / name)
    data = record.load_data()
    train_x, train_y = load_split("digits", None, train=True)
    test_x, test_y = load_split("digits", None, train=False)
    bd_train = data.bd_train
    assert len(bd_train) == len(train_y) and torch.equal(bd_train.index, torch.arange(len(train_y)))
    bd_pos, cross_pos = _blocks(len(train_y), 128, 0.1, cross)
    assert len(cross_pos) > 0
    flagged = np.flatnonzero(bd_train.poison.numpy())
    assert np.array_equal(flagged, np.union1d(bd_pos, cross_pos))
    labels, original = bd_train.labels.numpy(), bd_train.original_labels.numpy()
    all2all = "all2all" in name
    assert np.array_equal(original, train_y)
    assert np.array_equal(labels[bd_pos], (train_y[bd_pos] + 1) % 10 if all2all else np.full(len(bd_pos), TARGET))
    assert np.array_equal(labels[cross_pos], train_y[cross_pos])  # cross/negative keep their label
    clean_pos = np.setdiff1d(np.arange(len(train_y)), flagged)
    images = bd_train.numpy_images()
    assert np.array_equal(images[clean_pos], train_x[clean_pos])
    changed = lambda pos: np.mean([not np.array_equal(images[i], train_x[i]) for i in pos])  # noqa: E731
    assert changed(bd_pos) > 0.9 and changed(cross_pos) > 0.5

    bd_test = data.bd_test
    if all2all:
        assert np.array_equal(bd_test.index.numpy(), np.arange(len(test_y)))
        assert np.array_equal(bd_test.labels.numpy(), (test_y + 1) % 10)
    else:  # all2one: only the non-target test images, relabelled to the target
        assert np.array_equal(bd_test.index.numpy(), np.flatnonzero(test_y != TARGET))
        assert (bd_test.labels == TARGET).all() and (bd_test.original_labels != TARGET).all()
    cross_pngs = list((dynamic_records / "record" / name / "cross_test_dataset").rglob("*.png"))
    assert len(cross_pngs) == len(test_y)
    frame = (dynamic_records / "record" / name / "attack_df.csv").read_text().splitlines()[0].split(",")
    for column in ("train_cross_acc_only", "cross_test_loss_avg_over_batch", "ra_test_loss_avg_over_batch",
                   "test_asr", "test_cross_acc"):
        assert column in frame


def test_record_images_are_the_trigger_functions_output(dynamic_records):
    test_x, test_y = load_split("digits", None, train=False)
    keep = test_y != TARGET
    wanet = read_attack_record(dynamic_records / "record" / "wanet_digits").load_data().bd_test.numpy_images()
    cfg, _ = get_attack("wanet").parse(["--dataset", "digits", "--s", "2", "--random_seed", str(FIXTURE_SEED)])
    attack = get_attack("wanet")(cfg, dataset_info("digits"))
    assert np.array_equal(wanet, attack.apply_trigger(test_x[keep], test_y[keep], None, False))
    bpp = read_attack_record(dynamic_records / "record" / "bpp_digits").load_data().bd_test.numpy_images()
    assert np.array_equal(bpp, to_uint8(squeeze_colors(to_float(test_x[keep]), 8)))
    assert set(np.unique(bpp)) <= {0, 36, 73, 109, 146, 182, 219, 255}


def test_sig_record_is_clean_label(dynamic_records):
    data = read_attack_record(dynamic_records / "record" / "sig_digits").load_data()
    train_x, train_y = load_split("digits", None, train=True)
    test_x, test_y = load_split("digits", None, train=False)
    poisoned = np.flatnonzero(data.bd_train.poison.numpy())
    assert len(poisoned) == round(0.05 * len(train_y))  # pratio counts ALL training samples
    assert (train_y[poisoned] == TARGET).all()  # drawn from the target class only
    assert (data.bd_train.labels[poisoned] == TARGET).all()  # label unchanged (clean-label)
    images = data.bd_train.numpy_images()
    assert np.array_equal(images[poisoned], add_sinusoid(train_x[poisoned], 40, 6))
    keep = test_y != TARGET
    assert np.array_equal(data.bd_test.index.numpy(), np.flatnonzero(keep))
    assert np.array_equal(data.bd_test.numpy_images(), add_sinusoid(test_x[keep], 40, 6))


@pytest.mark.parametrize("attack, args, message", [
    ("sig", ["--pratio", "0.2"], "target-class samples are available"),
    ("sig", ["--attack_label_trans", "all2all"], "clean-label"),
    ("wanet", ["--attack_label_trans", "all2all", "--attack_label_shift_amount", "2"], "+1 label shift"),
    ("inputaware", ["--epochs", "3", "--clean_train_epochs", "3"], "no classifier training"),
    ("bpp", ["--squeeze_num", "1"], "squeeze_num"),
])
def test_bad_settings_fail_with_one_clear_line(tmp_path, attack, args, message):
    with pytest.raises(BurnError, match=message.replace("+", r"\+")):
        make_record(tmp_path, attack, f"bad_{attack}", args)
