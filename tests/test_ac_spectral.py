"""AC and Spectral as defenses: the detection cores on planted data, the features they read, and
both end to end on a digits record (detect, then retrain a fresh model on what is kept)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from baseline_checks import FT_COLUMNS, load_defended, random_net, score
from burnkit import records
from burnkit.datasets import dataset_info
from burnkit.defenses.ac import ActivationClustering, activation_clusters, poison_clusters
from burnkit.defenses.spectral import SpectralSignatures, spectral_keep_mask, spectral_scores
from burnkit.errors import BurnError
from burnkit.models import build_classifier
from burnkit.network_surgery import feature_layer, layer_outputs, penultimate_features


def _planted(n=200, d=20, planted=30, strength=10.0, seed=0):
    """Gaussian rows (std 1) around a common offset; the last ``planted`` rows also carry ``strength``
    along a hidden unit direction ``u``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) + 3.0
    u = torch.randn(d, generator=gen)
    u = u / u.norm()
    x[-planted:] += strength * u
    return x, u


def test_spectral_finds_the_planted_direction_and_removes_exactly_the_planted_rows():
    x, u = _planted()
    centred = x.double() - x.double().mean(0)
    _, _, vh = np.linalg.svd(centred.numpy(), full_matrices=False)
    assert abs(float(vh[0] @ u.double().numpy())) > 0.95  # the top singular direction is the planted one
    scores = spectral_scores(x)
    assert torch.allclose(scores, torch.as_tensor(np.abs(centred.numpy() @ vh[0])))
    keep = spectral_keep_mask(scores, 85)  # drops the top 15 % = 30 rows
    assert (~keep).sum() == 30 and (~keep[-30:]).all()


def test_spectral_scores_are_centred_not_bb_uncentred():
    x, _ = _planted()
    x = x.double()
    shifted = x + 100.0  # a common offset changes nothing for centred scores
    assert torch.allclose(spectral_scores(x), spectral_scores(shifted), atol=1e-6)


def test_spectral_keep_mask_uses_numpy_percentile():
    scores = torch.arange(1, 21, dtype=torch.float64)  # percentile(1..20, 85) = 17.15
    assert spectral_keep_mask(scores, 85).tolist() == [True] * 17 + [False] * 3


def test_ac_marks_the_small_cluster_of_a_class():
    gen = np.random.default_rng(0)
    feats = np.concatenate([gen.normal(0, 1, (90, 32)), gen.normal(6, 1, (10, 32))])
    ids = activation_clusters(feats, nb_dims=10, nb_clusters=2, seed=0)
    marked = poison_clusters(ids, 2, "smaller")
    assert marked.tolist() == [False] * 90 + [True] * 10


def test_cluster_analyses_by_hand():
    ids = np.array([0, 0, 0, 1, 1, 2, 0, 0, 0, 0])  # sizes 7, 2, 1
    assert np.flatnonzero(poison_clusters(ids, 3, "smaller")).tolist() == [5]
    assert np.flatnonzero(poison_clusters(ids, 3, "relative-size", 0.35)).tolist() == [3, 4, 5]
    assert np.flatnonzero(poison_clusters(np.array([1, 1, 0, 0]), 2, "smaller")).tolist() == [2, 3]  # tie: lowest id
    assert not poison_clusters(np.zeros(5, dtype=np.int64), 2, "smaller").any()  # one cluster: nothing stands out
    with pytest.raises(BurnError):
        poison_clusters(ids, 3, "distance")


def test_features_are_what_the_layers_produce():
    torch.manual_seed(0)
    clf = build_classifier("smallcnn", dataset_info("digits"), 10).eval()
    from burnkit.data import ImageSet
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    data = ImageSet(images, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long),
                    torch.zeros(5, dtype=torch.bool), torch.arange(5))
    x = clf.normalize(images.float() / 255)
    with torch.no_grad():
        maps = clf.net.features(x)
        pooled = torch.flatten(clf.net.pool(maps), 1)
    assert feature_layer(clf.net) == "features"
    assert torch.allclose(layer_outputs(clf, clf.net, "features", data, torch.device("cpu"), 2), maps.flatten(1), atol=1e-6)
    assert torch.allclose(penultimate_features(clf, clf.net, data, torch.device("cpu"), 2), pooled, atol=1e-6)
    assert feature_layer(random_net("preactresnet18")) == "layer4"
    assert feature_layer(random_net("vgg19_bn")) == "features"
    with pytest.raises(BurnError, match="not a layer"):
        feature_layer(clf.net, "layer9")


FAST = ["--epochs", "3", "--batch_size", "64", "--lr", "0.05", "--progress", "false"]


@pytest.mark.parametrize("defense,extra", [(ActivationClustering, []), (SpectralSignatures, ["--percentile", "80"])])
def test_end_to_end_on_digits(defense, extra, digits_copy):
    result = defense.main(["--result_file", "badnet_digits", *FAST, *extra])
    out = digits_copy / "record" / "badnet_digits" / "defense" / defense.name
    for name in ("defense_result.pt", f"{defense.name}_df.csv", f"{defense.name}_df_summary.csv",
                 f"{defense.name}_samples.csv", f"{defense.name}_report.json", "cost.json", "checkpoint/retrain.pt"):
        assert (out / name).exists(), name
    cost = json.loads((out / "cost.json").read_text())
    assert cost["clean_subset_size"] == 0  # no test data in any decision: tests/test_scramble.py
    samples = pd.read_csv(out / f"{defense.name}_samples.csv")
    record = records.read_attack_record(digits_copy / "record" / "badnet_digits")
    assert len(samples) == len(record.bd_train.original_index)
    report = json.loads((out / f"{defense.name}_report.json").read_text())
    assert report["n_flagged"] == samples["flagged"].sum() and report == cost[defense.name]
    if defense is SpectralSignatures:  # 20 % of every class (rounded by the percentile's interpolation)
        per_class = samples.groupby("label")["flagged"].mean()
        assert ((per_class > 0.17) & (per_class < 0.23)).all()
    else:  # AC: in every class exactly the smaller of two clusters
        assert all(0 < g["flagged"].sum() <= len(g) / 2 for _, g in samples.groupby("label"))
    df = pd.read_csv(out / f"{defense.name}_df.csv", index_col=0)
    assert list(df.columns) == FT_COLUMNS and len(df) == 3
    clf, rec = load_defended(out, digits_copy / "record" / "badnet_digits")
    assert score(clf, rec).acc == pytest.approx(result["final"]["test_acc"], abs=1e-6)


def test_retraining_uses_only_the_kept_samples(digits_copy, monkeypatch):
    from burnkit.defenses import retraining

    seen = {}
    real = retraining.fit_phase

    def spy(run, model, train_set, *a, **kw):
        seen["index"] = set(train_set.index.tolist())
        return real(run, model, train_set, *a, **kw)

    monkeypatch.setattr(retraining, "fit_phase", spy)
    SpectralSignatures.main(["--result_file", "badnet_digits", *FAST, "--epochs", "1"])
    samples = pd.read_csv(digits_copy / "record/badnet_digits/defense/spectral/spectral_samples.csv")
    assert seen["index"] == set(samples.loc[samples["flagged"] == 0, "index"])
