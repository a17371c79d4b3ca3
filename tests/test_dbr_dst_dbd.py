"""D-BR, D-ST and DBD: their losses and splits on hand-computed inputs, the random views, and all
three end to end on a digits record (outputs, plain layout, no clean data, no use of the flags)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from baseline_checks import load_defended, score
from burnkit.data import ImageSet
from burnkit.defenses import dbd as dbd_mod
from burnkit.defenses import dst as dst_mod
from burnkit.defenses.dbd import (DBDConfig, Decoupling, SemiSplit, linear_rampup, nt_xent, semi_optimizer, sharpen,
                                  split_losses, symmetric_cross_entropy, unlabelled_weight)
from burnkit.defenses.dbr import (CLEAN, DBR, POISON, SUSPICIOUS, fct_scores, fct_thresholds, intra_class_loss,
                                  split_by_fct)
from burnkit.defenses.dst import DST, consistency_contrastive_loss, mixed_cross_entropy, warmup_cosine
from burnkit.views import ContrastiveViews, gaussian_blur, resized_crop_and_flip, rotate_and_translate


# --------------------------------------------------------------------------- sample distinction


def test_intra_class_loss_by_hand():
    labels = torch.tensor([0, 0, 1, 1])
    orthogonal = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 3.0]])  # centroids (1, 0), (0, 2)
    assert intra_class_loss(orthogonal, labels).item() == pytest.approx(0.0)
    at_45 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # cosine 1/sqrt(2), diagonal zeroed
    assert intra_class_loss(at_45, labels).item() == pytest.approx(2 / math.sqrt(2) / 4)


def test_thresholds_and_split_follow_backdoorbench_indices():
    scores = torch.arange(20, dtype=torch.float64)[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    low, high = fct_thresholds(scores, 0.2, 0.05)
    assert (low, high) == (4.0, 19.0)  # sorted[int(0.2 * 20)], sorted[20 - int(0.05 * 20)]
    flags = split_by_fct(scores, low, high)
    assert sorted(scores[flags == CLEAN].tolist()) == [0, 1, 2, 3, 4]  # <= gamma_low: 5 samples
    assert scores[flags == POISON].tolist() == [19.0]
    assert (flags == SUSPICIOUS).sum() == 14


def test_fct_score_is_the_mean_squared_feature_change_under_the_drawn_transformation():
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=gen)
    data = ImageSet(images, torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long),
                    torch.zeros(6, dtype=torch.bool), torch.arange(6))
    encoder = torch.nn.Flatten()  # features = the pixels
    scores = fct_scores(encoder, data, torch.device("cpu"), seed=5, batch_size=4)
    replay = torch.Generator().manual_seed(5)
    x = images.float() / 255
    moved = torch.cat([rotate_and_translate(x[:4], replay), rotate_and_translate(x[4:], replay)])
    assert torch.allclose(scores, ((x - moved) ** 2).flatten(1).mean(1).double(), atol=1e-6)


def test_rotate_and_translate_is_identity_at_zero_and_an_integer_shift_without_rotation():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 10, 10, generator=gen)
    assert torch.equal(rotate_and_translate(x, gen, degrees=0.0, translate=0.0), x)
    out = rotate_and_translate(x, gen, degrees=0.0, translate=0.2)
    for i in range(5):
        padded = F.pad(x[i], (2, 2, 2, 2))
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(out[i], padded[:, 2 - dy:12 - dy, 2 - dx:12 - dx])]
        assert found, f"sample {i} is not a shift of at most 2 pixels"


def test_contrastive_views_are_valid_images_of_the_same_shape():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16, generator=gen)
    out = ContrastiveViews()(x, gen)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(resized_crop_and_flip(x, gen, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0), x, atol=1e-5)
    assert torch.allclose(gaussian_blur(x, gen, p=0.0), x, atol=1e-6)
    flat = torch.full((2, 1, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, gen, p=1.0), flat, atol=1e-6)  # a blur keeps a flat image


# --------------------------------------------------------------------------- D-ST


def _naive_contrastive(z1, z2, labels, clean, t, base):
    """The D-ST loss written out with Python loops."""
    z = torch.cat([z1, z2])
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        others = [j for j in range(2 * n) if j != i]
        denom = sum(math.exp(float(z[i] @ z[j]) / t) for j in others)
        if bool(clean[i % n]):
            pos = [j for j in others if labels[j % n] == labels[i % n]]
        else:
            pos = [j for j in others if j % n == i % n]
        total += sum(float(z[i] @ z[j]) / t - math.log(denom) for j in pos) / len(pos)
    return -(t / base) * total / (2 * n)


def test_consistency_contrastive_loss_matches_the_written_out_formula():
    gen = torch.Generator().manual_seed(0)
    z1, z2 = F.normalize(torch.randn(5, 4, generator=gen), dim=1), F.normalize(torch.randn(5, 4, generator=gen), dim=1)
    labels = torch.tensor([0, 1, 0, 1, 0])
    clean = torch.tensor([True, True, False, True, False])
    got = consistency_contrastive_loss(z1, z2, labels, clean, 0.1, 0.07).item()
    assert got == pytest.approx(_naive_contrastive(z1, z2, labels, clean, 0.1, 0.07), rel=1e-5)


def test_with_no_clean_sample_the_d_st_loss_is_simclr_nt_xent():
    gen = torch.Generator().manual_seed(1)
    z1, z2 = F.normalize(torch.randn(6, 8, generator=gen), dim=1), F.normalize(torch.randn(6, 8, generator=gen), dim=1)
    labels = torch.zeros(6, dtype=torch.long)  # labels are ignored for non-clean anchors
    d_st = consistency_contrastive_loss(z1, z2, labels, torch.zeros(6, dtype=torch.bool), 0.5, 0.5)
    assert d_st.item() == pytest.approx(nt_xent(z1, z2, 0.5, anchors="both").item(), rel=1e-5)


def test_mixed_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    flags = torch.tensor([CLEAN, POISON, SUSPICIOUS])
    ce = lambda i: F.cross_entropy(logits[i:i + 1], labels[i:i + 1]).item()  # noqa: E731
    assert mixed_cross_entropy(logits, labels, flags, 0.001).item() == pytest.approx(ce(0) - 0.001 * ce(1))
    assert mixed_cross_entropy(logits, labels, torch.tensor([SUSPICIOUS] * 3), 0.001).item() == 0.0
    # a batch of suspicious samples only still backpropagates (zero gradients), as in a training step
    trainable = logits.clone().requires_grad_(True)
    mixed_cross_entropy(trainable, labels, torch.tensor([SUSPICIOUS] * 3), 0.001).backward()
    assert torch.equal(trainable.grad, torch.zeros_like(trainable))


def test_warmup_cosine_schedule_points():
    m = warmup_cosine(0.5, epochs=20, iters_per_epoch=4, warm_epochs=2)
    cosine = lambda e: 5e-4 + (0.5 - 5e-4) * (1 + math.cos(math.pi * e / 20)) / 2  # noqa: E731
    assert m(0) * 0.5 == pytest.approx(0.01)                                  # starts at 0.01
    assert m(4) * 0.5 == pytest.approx(0.01 + 0.5 * (cosine(2) - 0.01))       # half-way through warm-up
    assert m(8) * 0.5 == pytest.approx(cosine(3))                             # epoch 3: the cosine
    assert m(79) * 0.5 == pytest.approx(5e-4)                                 # last epoch: lr * 1e-3
    constant = warmup_cosine(5.0, epochs=10, iters_per_epoch=2, warm_epochs=10, decay=None)
    assert constant(0) * 5 == pytest.approx(0.01) and constant(19) * 5 == pytest.approx(0.01 + 0.95 * 4.99)


# --------------------------------------------------------------------------- DBD


def test_nt_xent_by_hand():
    z = torch.eye(2)  # two images, identical views: positive similarity 1, negatives 0, T = 1
    for anchors in ("first", "both"):  # symmetric views: both losses agree
        assert nt_xent(z, z, 1.0, anchors).item() == pytest.approx(math.log((2 + math.e) / math.e))


def test_nt_xent_anchors_first_views_only_as_backdoorbench():
    """Views that differ: image 0's are (1, 0) and (1, 0), image 1's (0, 1) and (1, 0); T = 1. The anchor
    (1, 0) of image 0 has similarities 0, 1 (positive), 1: loss log((1 + 2e) / e); the anchor (0, 1) of
    image 1 has 0, 0, 0 (positive): log 3. The second views as anchors add log((1 + 2e) / e) (image 0) and,
    for image 1's (1, 0) with its positive (0, 1) at 0 against 1 and 1, log(1 + 2e)."""
    z1, z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    a, b = math.log((1 + 2 * math.e) / math.e), math.log(3)
    assert nt_xent(z1, z2, 1.0, "first").item() == pytest.approx((a + b) / 2)  # BackdoorBench, the DBD authors
    assert nt_xent(z1, z2, 1.0, "both").item() == pytest.approx((2 * a + b + math.log(1 + 2 * math.e)) / 4)


def test_symmetric_cross_entropy_by_hand():
    logits, labels = torch.zeros(1, 2), torch.tensor([0])
    expected = 0.1 * math.log(2) + 1.0 * (0.5 * -math.log(1e-4))  # RCE: the wrong class's log(1e-4)
    assert symmetric_cross_entropy(logits, labels, 0.1, 1.0).item() == pytest.approx(expected, rel=1e-5)


def test_sharpen_and_rampup():
    assert torch.allclose(sharpen(torch.tensor([[0.25, 0.75]]), 0.5), torch.tensor([[0.1, 0.9]]))
    assert [linear_rampup(p, 190) for p in (0, 95, 190, 300)] == [0.0, 0.5, 1.0, 1.0]


def test_unlabelled_weight_ramps_over_backdoorbench_global_epoch():
    """BackdoorBench passes its loop's epoch, warm-up epochs included, to the MixMatch loss: the first
    semi-supervised iteration after 10 warm-up epochs is already at 10 / 190 of lambda_u."""
    bb = DBDConfig(epoch_warmup=10, rampup_length=190, lambda_u=15.0)
    assert unlabelled_weight(bb, 0, 0, 1024) == pytest.approx(15 * 10 / 190)
    assert unlabelled_weight(bb, 2, 512, 1024) == pytest.approx(15 * 12.5 / 190)
    assert unlabelled_weight(bb, 180, 0, 1024) == pytest.approx(15.0)  # epoch 190: the ramp's end
    semi_only = DBDConfig(epoch_warmup=10, rampup_length=190, lambda_u=15.0, rampup_counts_warmup=False)
    assert unlabelled_weight(semi_only, 0, 0, 1024) == 0.0
    assert unlabelled_weight(semi_only, 2, 512, 1024) == pytest.approx(15 * 2.5 / 190)


class _Pixels(torch.nn.Module):
    """Logits = a fixed linear map of the pixels: any shift of the image changes them."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 3)
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.linear(x.flatten(1))


def test_split_losses_score_augmented_images_as_backdoorbench_train_transform():
    from burnkit.data import Augment

    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 3, (20,), generator=gen)
    data = ImageSet(images, labels, labels.clone(), torch.zeros(20, dtype=torch.bool), torch.arange(20))
    net, augment, cpu = _Pixels(), Augment(padding=2), torch.device("cpu")
    plain = symmetric_cross_entropy(net(images.float() / 255), labels, 0.1, 1.0, reduction="none").detach()
    as_is = split_losses(net, data, DBDConfig(split_scoring_augment=False), cpu, augment, epoch=3)
    assert torch.allclose(as_is, plain, atol=1e-6)
    cfg = DBDConfig(random_seed=7)  # BackdoorBench: one draw of the train augmentation per epoch, seeded
    first, again = split_losses(net, data, cfg, cpu, augment, 3), split_losses(net, data, cfg, cpu, augment, 3)
    replay = torch.Generator().manual_seed(7 * 1_000_003 + 3)
    moved = augment(images, replay).float() / 255
    expected = symmetric_cross_entropy(net(moved), labels, 0.1, 1.0, reduction="none").detach()
    assert torch.allclose(first, expected, atol=1e-6) and torch.equal(first, again)  # a resumed run draws the same
    assert not torch.allclose(first, plain, atol=1e-3)
    assert not torch.allclose(first, split_losses(net, data, cfg, cpu, augment, 4), atol=1e-3)  # a new draw per epoch


def test_semi_optimizer_continues_the_warmup_adam_or_starts_anew():
    model = torch.nn.Linear(2, 2)
    warm = torch.optim.Adam(model.parameters(), lr=0.002)
    model(torch.ones(1, 2)).sum().backward()
    warm.step()
    kept = semi_optimizer(model, warm, DBDConfig(lr_semi=0.001))
    assert kept is warm and kept.param_groups[0]["lr"] == 0.001 and len(kept.state) == 2  # moments kept
    fresh = semi_optimizer(model, warm, DBDConfig(lr_semi=0.001, semi_optimizer="fresh"))
    assert fresh is not warm and not fresh.state


def test_semi_split_labels_the_lowest_loss_share_and_repeats_it():
    n = 10
    data = ImageSet(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n) % 3, torch.arange(n) % 3,
                    torch.zeros(n, dtype=torch.bool), torch.arange(100, 100 + n))
    losses = torch.tensor([5.0, 0.1, 3.0, 0.2, 9.0, 0.3, 7.0, 8.0, 0.05, 6.0])
    split = SemiSplit(data)
    pool = split.update(losses, 0.4, iterations=3, batch=5)
    assert torch.nonzero(split.labelled_mask).flatten().tolist() == [1, 3, 5, 8]
    assert len(pool) == 15 and set(pool.index.tolist()) == {101, 103, 105, 108}
    assert sorted(split.unlabelled.index.tolist()) == [100, 102, 104, 106, 107, 109]


# --------------------------------------------------------------------------- end to end

SD = ["--epochs", "2", "--epochs_intra", "2", "--batch_size", "64", "--progress", "false"]
CASES = {
    "d-br": (DBR, [*SD, "--epochs_relearn", "2"]),
    "d-st": (DST, [*SD, "--epochs_extractor", "2", "--epochs_classifier", "2", "--warm_epochs", "1"]),
    "dbd": (Decoupling, ["--epoch_self", "2", "--epoch_warmup", "2", "--epochs", "2", "--train_iteration", "5",
                         "--batch_size_self", "128", "--progress", "false"]),
}
FILES = {
    "d-br": ["log/train_notrans_df.csv", "log/finetune_notrans_df.csv", "data_produce/all.txt",
             "data_produce/clean_samples.npy", "data_produce/poison_samples.npy", "data_produce/suspicious_samples.npy",
             "d-br_samples.csv", "d-br_report.json"],
    "d-st": ["log/train_extractor_df.csv", "data_produce/all.txt", "d-st_samples.csv", "d-st_report.json"],
    "dbd": ["self_df.csv", "checkpoint/self.pt", "checkpoint/warmup.pt", "checkpoint/semi.pt"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_end_to_end_on_digits(name, digits_copy):
    defense, argv = CASES[name]
    result = defense.main(["--result_file", "badnet_digits", *argv])
    out = digits_copy / "record" / "badnet_digits" / "defense" / name
    for f in ("defense_result.pt", f"{name}_df.csv", f"{name}_df_summary.csv", "cost.json", *FILES[name]):
        assert (out / f).exists(), f
    cost = json.loads((out / "cost.json").read_text())
    assert cost["clean_subset_size"] == 0  # no test data in any decision: tests/test_scramble.py
    clf, record = load_defended(out, digits_copy / "record" / "badnet_digits")  # the plain layout, strictly
    assert score(clf, record).acc == pytest.approx(result["final"]["test_acc"], abs=1e-6)
    summary = pd.read_csv(out / f"{name}_df_summary.csv", index_col=0)
    assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]
    df = pd.read_csv(out / f"{name}_df.csv", index_col=0)
    if name == "dbd":
        assert df["is_pretrain"].tolist() == [0, 0, 1, 1]
        assert (df.loc[df["is_pretrain"] == 1, "labeled"] == int(len(record.bd_train.original_index) * 0.5)).all()
        assert len(pd.read_csv(out / "self_df.csv")) == 2
    else:
        samples = pd.read_csv(out / f"{name}_samples.csv")
        n = len(samples)
        clean_idx = np.load(out / "data_produce" / "clean_samples.npy", allow_pickle=False)
        poison_idx = np.load(out / "data_produce" / "poison_samples.npy", allow_pickle=False)
        assert len(poison_idx) == int(samples["flagged"].sum()) >= int(n * 0.05)
        assert len(clean_idx) >= int(n * 0.2) and not set(clean_idx) & set(poison_idx)
        scores = np.loadtxt(out / "data_produce" / "all.txt")
        assert np.allclose(np.sort(scores)[::-1][:len(poison_idx)].min(), samples.loc[samples["flagged"] == 1, "score"].min())
        assert cost["sample_distinction"]["clean"] == len(clean_idx)
        if name == "d-br":
            assert df["epoch"].tolist() == [0, 1] and "unlearn_loss" in df


def _phases(monkeypatch, module):
    """Record ``(phase, optimizer, train_cfg)`` of every training phase ``module`` runs."""
    seen = []
    real = module.fit_phase

    def spy(run, model, train, train_cfg, phase, **kwargs):
        seen.append((phase, kwargs.get("optimizer"), train_cfg))
        return real(run, model, train, train_cfg, phase, **kwargs)

    monkeypatch.setattr(module, "fit_phase", spy)
    return seen


def test_dbd_semi_phase_goes_on_with_the_warmup_adam_by_default(digits_copy, monkeypatch):
    """BackdoorBench builds one Adam over the whole linear model before the warm-up and keeps it for the
    semi-supervised epochs: the first semi step meets the moments the warm-up left on the head."""
    seen = _phases(monkeypatch, dbd_mod)
    steps_at_semi = []
    real_step = dbd_mod.mixmatch_step

    def spying_step(cfg, split, augment, num_classes, iterations, state):
        step = real_step(cfg, split, augment, num_classes, iterations, state)

        def wrapped(model, batch, optimizer, ctx):
            if not steps_at_semi:
                steps_at_semi.append({id(p): s["step"].item() for p, s in optimizer.state.items()})
            return step(model, batch, optimizer, ctx)
        return wrapped

    monkeypatch.setattr(dbd_mod, "mixmatch_step", spying_step)
    Decoupling.main(["--result_file", "badnet_digits", *CASES["dbd"][1]])
    optimizers = {phase: opt for phase, opt, _ in seen}
    assert optimizers["semi"] is optimizers["warmup"]
    assert optimizers["semi"].param_groups[0]["lr"] == pytest.approx(0.002)
    head_steps = set(steps_at_semi[0].values())
    assert head_steps == {2 * math.ceil(1437 / 128)}  # the warm-up's 2 epochs of 12 batches, on the head only


def test_dst_trains_both_stages_with_backdoorbench_weight_decay_and_strong_views(digits_copy, monkeypatch):
    """BackdoorBench's ``set_optimizer`` (weight decay 5e-4) serves both stages, and its ``mixed_ce`` loader
    gives the head's stage the encoder stage's strong augmentation (one view), not the crop and flip."""
    seen = _phases(monkeypatch, dst_mod)
    calls = {"n": 0}
    real_call = dst_mod.ContrastiveViews.__call__

    def counting(self, x, *a, **kw):
        calls["n"] += 1
        return real_call(self, x, *a, **kw)

    monkeypatch.setattr(dst_mod.ContrastiveViews, "__call__", counting)
    DST.main(["--result_file", "badnet_digits", *CASES["d-st"][1], "--epochs_extractor", "1", "--epochs_classifier", "1"])
    stages = {phase: (opt, cfg) for phase, opt, cfg in seen if phase in ("extractor", "classifier")}
    for phase in ("extractor", "classifier"):
        assert stages[phase][0].param_groups[0]["weight_decay"] == 5e-4
    assert stages["classifier"][1].augment is False  # the engine's crop and flip are off ...
    batches = math.ceil(1437 / 64)
    assert calls["n"] == 2 * batches + batches  # ... the strong views run: 2 per extractor batch, 1 per head batch


def test_dbd_resumes_a_killed_semi_phase_to_the_same_model(digits_copy, monkeypatch):
    from burnkit.defenses import dbd as dbd_mod

    argv = ["--result_file", "badnet_digits", *CASES["dbd"][1]]
    uninterrupted = {k: v.clone() for k, v in Decoupling.main(argv)["model"].net.state_dict().items()}
    real = dbd_mod.SemiSplit.update
    calls = []

    def killed_in_second_epoch(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(dbd_mod.SemiSplit, "update", killed_in_second_epoch)
    with pytest.raises(SystemExit):
        Decoupling.main([*argv, "--overwrite", "true"])
    counted = []
    monkeypatch.setattr(dbd_mod.SemiSplit, "update", lambda self, *a, **kw: counted.append(1) or real(self, *a, **kw))
    resumed = Decoupling.main(argv)["model"].net.state_dict()
    assert len(counted) == 1  # SimCLR, warm-up and the first semi epoch came from their checkpoints
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    df = pd.read_csv(digits_copy / "record/badnet_digits/defense/dbd/dbd_df.csv", index_col=0)
    assert df["is_pretrain"].tolist() == [0, 0, 1, 1]
