"""Poison detectors: the metric code checked by hand, every algorithm against a planted answer, the
generic feature points of the zoo, and the BackdoorBench-style CLIs on real records (ours on digits,
and a BackdoorBench record built by hand over real CIFAR-10 images)."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from burnkit import detection_metrics as metrics
from burnkit.detectors.abl import guarded_step, lowest_share
from burnkit.detectors.ac import activation_clustering
from burnkit.detectors.beatrix import BeatrixModel, GramStatistics, gram_features
from burnkit.detectors.scan import (THRESHOLD, VARIANTS as SCAN_VARIANTS, anomaly_index, class_mean, global_model,
                                    scan, split_start, split_statistic, split_two, suspicious_is_first)
from burnkit.detectors.spectral import percentile_flags, spectral_scores, top_direction
from burnkit.detectors.spectre import (SpectreVariant, class_budget, que_quality, que_weights, spectre,
                                       spectre_class)
from burnkit.detectors.strip import entropy_threshold, strip_entropy, superimpose
from burnkit.feature_points import default_feature_point, extract, final_layer, resolve_feature_point
from burnkit.detector import choose_clean_reserve, get_detector, list_detectors
from burnkit.data import ImageSet
from burnkit.errors import BurnError

# ----------------------------------------------------------------------------- metrics by hand

SCORES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
TRUTH = [1, 0, 1, 0, 0, 0]


def test_ranking_metrics_match_hand_computation():
    # positive 0.9 beats 4 negatives, 0.7 beats 3 of 4: AUROC 7/8
    assert metrics.auroc(SCORES, TRUTH) == pytest.approx(0.875)
    # ROC points (FPR, TPR): (0, .5) at 0.9, (.25, .5) at 0.8, (.25, 1) at 0.7
    assert metrics.tpr_at_fpr(SCORES, TRUTH, 0.0) == 0.5
    assert metrics.tpr_at_fpr(SCORES, TRUTH, 0.2) == 0.5
    assert metrics.tpr_at_fpr(SCORES, TRUTH, 0.25) == 1.0
    # two poisoned: the top two are 0.9 (poison) and 0.8 (clean)
    assert metrics.precision_at_poison_rate(SCORES, TRUTH) == 0.5
    assert metrics.precision_at_k(SCORES, TRUTH, 3) == pytest.approx(2 / 3)


def test_ties_count_by_their_share_and_order_does_not_matter():
    # k = 2 poisoned; three samples tie at the cut, one of them poisoned: 2 x 1/3 hits
    assert metrics.precision_at_poison_rate([1, 1, 1, 0], [1, 0, 0, 1]) == pytest.approx(1 / 3)
    assert metrics.precision_at_poison_rate([0, 1, 1, 1], [1, 1, 0, 0]) == pytest.approx(1 / 3)
    assert metrics.auroc([1, 1], [1, 0]) == 0.5
    # a tie group enters the ROC whole: no point between (0, 0) and (1, 1)
    assert metrics.tpr_at_fpr([1, 1, 1, 1], [1, 0, 1, 0], 0.5) == 0.0


def test_confusion_counts_and_weighted_f_by_hand():
    out = metrics.confusion([1, 1, 0, 0, 0, 0], TRUTH)
    assert (out["TP"], out["FP"], out["FN"], out["TN"]) == (1, 1, 1, 3)
    assert (out["TPR"], out["FPR"], out["precision"]) == (0.5, 0.25, 0.5)
    # recall weighted as TP / (TP + 9 FN) = 0.1; F = 2 * 0.5 * 0.1 / 0.6
    assert out["weight_F_score"] == pytest.approx(1 / 6)
    empty = metrics.confusion([0] * 6, TRUTH)  # BackdoorBench's empty case, fixed: no swapped FP/FN
    assert (empty["TP"], empty["FP"], empty["FN"], empty["TN"]) == (0, 0, 2, 4)
    assert empty["weight_F_score"] == 0.0 and empty["TPR"] == 0.0 and empty["FPR"] == 0.0


def test_metrics_reject_bad_scores_and_report_nan_without_both_classes():
    with pytest.raises(ValueError):
        metrics.auroc([0.1, math.nan], [0, 1])
    assert math.isnan(metrics.auroc([0.1, 0.2], [0, 0]))
    assert math.isnan(metrics.tpr_at_fpr([0.1, 0.2], [1, 1], 0.05))


# ----------------------------------------------------------------------------- planted answers


def _blobs(rng, n, d, shift=None, scale=1.0):
    x = rng.normal(0, scale, (n, d))
    return x if shift is None else x + shift


def test_spectral_finds_a_planted_direction():
    rng = np.random.default_rng(0)
    d = 20
    direction = np.zeros(d)
    direction[3] = 8.0
    clean0, poison0, clean1 = _blobs(rng, 450, d), _blobs(rng, 50, d, direction), _blobs(rng, 500, d)
    x = np.vstack([clean0, poison0, clean1])
    y = np.array([0] * 500 + [1] * 500)
    truth = np.zeros(1000, dtype=bool)
    truth[450:500] = True
    scores = spectral_scores(x, y)
    assert metrics.auroc(scores, truth) > 0.99
    assert metrics.precision_at_poison_rate(scores, truth) >= 0.96
    flags = percentile_flags(scores, y, 85)
    assert flags[:500].sum() == 75 and flags[500:].sum() == 75  # the top 15 % of every class
    assert flags[450:500].sum() == 50  # every planted sample is among class 0's top 15 %
    only0 = spectral_scores(x, y, classes=[0])
    assert (only0[500:] == 0).all() and np.allclose(only0[:500], scores[:500])


def test_top_direction_is_the_first_singular_vector_both_ways():
    rng = np.random.default_rng(1)
    for shape in ((40, 6), (6, 40)):  # d <= n and d > n take different Gram matrices
        a = rng.normal(size=shape) * np.linspace(3, 1, shape[1])
        a -= a.mean(0)
        expected = np.linalg.svd(a, full_matrices=False)[2][0]
        assert abs(top_direction(a) @ expected) == pytest.approx(1.0, abs=1e-9)


def test_centred_and_uncentred_projections_rank_a_planted_outlier_differently():
    """Samples at offsets t = -5, -1, 0, 1, 2 along the top direction v of a class whose mean lies 10
    along v: the centred score t^2 (Tran et al.) ranks the far outlier at -5 first; BackdoorBench's
    uncentred ``(x . v)^2 = (10 + t)^2`` ranks it last and the +2 sample first."""
    rng = np.random.default_rng(2)
    v = np.array([0.6, 0.8, 0.0])
    t = np.array([-5.0, -1.0, 0.0, 1.0, 2.0])
    x = 10 * v + t[:, None] * v + rng.normal(0, 1e-3, (5, 3)) * np.array([0.8, -0.6, 1.0])  # noise off v
    y = np.zeros(5, dtype=int)
    centred, uncentred = spectral_scores(x, y, centered=True), spectral_scores(x, y, centered=False)
    assert np.allclose(centred, (t - t.mean()) ** 2, atol=1e-2)
    assert np.allclose(uncentred, (10 + t) ** 2, rtol=1e-3)
    assert int(np.argmax(centred)) == 0 and int(np.argmin(uncentred)) == 0


@pytest.mark.parametrize("reducer", ["ica", "pca"])
def test_activation_clustering_flags_the_small_planted_cluster(reducer):
    rng = np.random.default_rng(3)
    d = 16
    far = np.full(d, 4.0)
    x = np.vstack([_blobs(rng, 160, d), _blobs(rng, 40, d, far), _blobs(rng, 200, d)])
    y = np.array([0] * 200 + [1] * 200)
    res = activation_clustering(x, y, nb_dims=5, reducer=reducer, seed=0)
    planted = np.zeros(400, dtype=bool)
    planted[160:200] = True
    assert np.array_equal(res.flagged, planted)  # class 1 splits about evenly: nothing flagged there
    assert res.flagged_classes == [0]
    assert res.scores[160:200] == pytest.approx(0.8) and res.scores[:160] == pytest.approx(0.2)
    assert sorted(res.sizes[0]) == [0.2, 0.8]


@pytest.mark.parametrize("diverging, used", [({0}, "ica (seed 1)"), ({0, 1, 2}, "pca (ica diverged)")])
def test_activation_clustering_survives_a_diverging_ica(diverging, used, monkeypatch):
    """FastICA returning NaN sources (it did on a digits class) is rerun from the next seed, then
    replaced by PCA after three failures; the class is still clustered and the switch reported."""
    import sklearn.decomposition

    real = sklearn.decomposition.FastICA
    seeds = []

    class Diverging(real):
        def fit_transform(self, x, y=None):
            seeds.append(self.random_state)
            out = super().fit_transform(x)
            return np.full_like(out, np.nan) if self.random_state in diverging else out

    monkeypatch.setattr(sklearn.decomposition, "FastICA", Diverging)
    rng = np.random.default_rng(3)
    x = np.vstack([_blobs(rng, 160, 16), _blobs(rng, 40, 16, np.full(16, 4.0))])
    res = activation_clustering(x, np.zeros(200, dtype=int), nb_dims=5, reducer="ica", seed=0)
    assert seeds == list(range(min(3, max(diverging) + 2)))
    assert res.reductions == {0: used} and res.flagged_classes == [0]
    assert np.array_equal(res.flagged, np.arange(200) >= 160)


@pytest.mark.parametrize("variant", ["backdoorbench", "paper"])
def test_spectre_finds_planted_poison(variant):
    rng = np.random.default_rng(4)
    d = 24
    shift = np.zeros(d)
    shift[:3] = 2.5
    x = np.vstack([_blobs(rng, 950, d), _blobs(rng, 50, d, shift), _blobs(rng, 1000, d)])
    y = np.array([0] * 1000 + [1] * 1000)
    truth = np.zeros(2000, dtype=bool)
    truth[950:1000] = True
    res = spectre(x, y, percentile=0.025, pca_dims=16, ks=(1, 4, 9, 16), variant=variant)  # ε = 50 per class
    assert res.per_class[0]["eps"] == 50
    assert res.flagged[:1000].sum() == 75 and res.flagged[1000:].sum() == 75  # top 1.5 ε of each class
    assert res.flagged[truth].mean() >= 0.9
    assert metrics.auroc(res.scores, truth) > 0.97


SIGMA = np.array([[3.0, 0.0], [0.0, 1.0]])  # covariance of whitened data: one direction at 3, ||Σ'|| = 3


def test_que_weights_elementwise_exp_is_backdoorbench_and_expm_the_paper():
    # α (Σ' - I) / (||Σ'|| - 1) with α = 4: [[4, 0], [0, 0]]
    paper = que_weights(SIGMA, 4.0, elementwise=False)  # expm: diag(e^4, 1) / (e^4 + 1)
    bb = que_weights(SIGMA, 4.0, elementwise=True)  # np.exp of every entry: [[e^4, 1], [1, 1]] / (e^4 + 1)
    e4 = math.exp(4)
    assert np.allclose(paper, np.diag([e4, 1.0]) / (e4 + 1))
    assert np.allclose(bb, np.array([[e4, 1.0], [1.0, 1.0]]) / (e4 + 1))
    w = np.array([1.0, 1.0])  # the QUE score w^T M w of one sample
    assert w @ paper @ w == pytest.approx(1.0)
    assert w @ bb @ w == pytest.approx((e4 + 3) / (e4 + 1))


def test_que_quality_elementwise_trace_ignores_the_off_diagonal():
    sigma = np.array([[2.0, 1.0], [1.0, 2.0]])
    m = np.array([[0.5, 0.25], [0.25, 0.5]])
    assert que_quality(sigma, m, elementwise=False) == pytest.approx((1.0 + 0.25 + 0.25 + 1.0) / 1.0)  # tr(Σ'M)
    assert que_quality(sigma, m, elementwise=True) == pytest.approx((1.0 + 1.0) / 1.0)  # Σ'_ii M_ii only


def test_spectre_budget_backdoorbench_caps_small_classes_at_a_tenth():
    # ε = 0.05 x 2,000 = 100 assumed poisoned in a class of 300
    assert class_budget(0.05, 2000, 300, small_class_cap=True) == 30  # BackdoorBench: round(0.1 n) below 500
    assert class_budget(0.05, 2000, 300, small_class_cap=False) == 100  # n / 3 = 100 is no cap here
    assert class_budget(0.05, 2000, 600, small_class_cap=True) == 100  # 500 samples or more: round(0.33 n) = 198
    assert class_budget(0.5, 2000, 600, small_class_cap=True) == 198
    assert class_budget(0.5, 2000, 600, small_class_cap=False) == 200


def test_spectre_backdoorbench_scores_around_the_class_mean_the_paper_around_the_robust_one():
    """One dimension, 90 samples near 0 and 10 far at 20 (ε = 10): the plain class mean sits at 2, the
    robust (MCD) location near 0. At k = 1 the QUE score is the squared whitened value, so a sample at 0
    scores about 0 in the paper's variant and (2 / σ)^2 in BackdoorBench's."""
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.normal(0, 1, 89), [0.0], np.full(10, 20.0)])[:, None]
    x = np.hstack([x, rng.normal(0, 1e-3, (100, 1))])  # a second, negligible dimension (PCA keeps 1)
    at_zero = 89
    for name, centre_at_mean in (("paper", False), ("backdoorbench", True)):
        variant = SpectreVariant(elementwise=name == "backdoorbench", centre_at_mean=centre_at_mean,
                                 small_class_cap=False)
        scores, flags, facts = spectre_class(x, 10, pca_dims=1, ks=(1,), variant=variant)
        if centre_at_mean:
            assert scores[at_zero] > 2.0  # (x - 2)^2 / σ^2 with σ about 1
        else:
            assert scores[at_zero] < 0.1
        assert flags[90:].all()  # the far samples are the top 1.5 ε either way


def _scan_planted(seed=5):
    """Ten classes of 100 representations (d = 12) around random means; 40 samples of class 3, shifted,
    carry label 0; 20 clean samples per class."""
    rng = np.random.default_rng(seed)
    k, d = 10, 12
    means = rng.normal(0, 3, (k, d))

    def sample(c, n):
        return means[c] + rng.normal(0, 1, (n, d))

    clean = np.vstack([sample(c, 20) for c in range(k)])
    clean_y = np.repeat(np.arange(k), 20)
    inspected = [sample(c, 100) for c in range(k)]
    poison = sample(3, 40) + 0.5  # other-class representations carried under label 0
    x = np.vstack([*inspected, poison])
    y = np.concatenate([np.repeat(np.arange(k), 100), np.zeros(40, dtype=int)])
    truth = np.zeros(len(x), dtype=bool)
    truth[-40:] = True
    return x, y, clean, clean_y, truth


@pytest.mark.parametrize("seed", [5, 6])
def test_scan_paper_variant_flags_the_contaminated_class_and_its_poison_subgroup(seed):
    x, y, clean, clean_y, truth = _scan_planted(seed)
    res = scan(x, y, clean, clean_y, variant="paper")
    assert res.flagged_classes == [0]
    assert res.anomaly_index[0] >= THRESHOLD > max(v for c, v in res.anomaly_index.items() if c != 0)
    assert np.array_equal(res.flagged, truth)
    assert metrics.auroc(res.scores, truth) == 1.0


@pytest.mark.parametrize("seed", [5, 6])
def test_scan_backdoorbench_variant_misses_the_planted_class_because_of_its_class_mean(seed):
    """BackdoorBench's statistic measures against ``S_e (n S_u + S_e)^-1 Σx``; with S_u of rank K - 1 = 9
    in 12 dimensions that "mean" lies far from the class, and the term ``(x̄ - m)^T F (x̄ - m)`` it adds to
    every class's J dwarfs what the split explains. The same data with only the posterior mean put back
    flags the contaminated class (docs/detection.md, "SCAn")."""
    x, y, clean, clean_y, truth = _scan_planted(seed)
    res = scan(x, y, clean, clean_y, variant="backdoorbench")
    assert res.flagged_classes == [] and not res.flagged.any()
    fixed = scan(x, y, clean, clean_y, variant=replace(SCAN_VARIANTS["backdoorbench"], posterior_mean=True))
    assert fixed.flagged_classes == [0]
    s_u, s_e = global_model(clean - clean.mean(0), clean_y)
    assert np.linalg.matrix_rank(s_u) == 9
    f = np.linalg.pinv(s_e)
    pool = np.concatenate([x, clean])
    part = (pool - pool.mean(0))[np.concatenate([y, clean_y]) == 0]
    first, u1, u2 = split_two(part, f)
    for posterior in (False, True):
        m = class_mean(part.sum(0), len(part), s_u, s_e, f, posterior)
        xbar = part.mean(0)
        mean_term = (xbar - m) @ f @ (xbar - m)  # J = mean_term + the split's gain
        share = mean_term / split_statistic(part, m, f, first, u1, u2)
        assert (share > 0.8) if not posterior else (share < 0.05)


def test_scan_class_mean_by_hand():
    # S_u = diag(1, 0) (no class variation along the second axis), S_e = I, n = 2 samples summing to (2, 2)
    s_u, s_e, f = np.diag([1.0, 0.0]), np.eye(2), np.eye(2)
    total = np.array([2.0, 2.0])
    # posterior S_u (n S_u + S_e)^-1 Σx = diag(1, 0) diag(1/3, 1) (2, 2): the second axis shrinks to the prior 0
    assert class_mean(total, 2, s_u, s_e, f, posterior=True) == pytest.approx([2 / 3, 0.0])
    # BackdoorBench S_e (n S_u + S_e)^-1 Σx: the second axis keeps the sum, twice the samples' mean of 1
    assert class_mean(total, 2, s_u, s_e, f, posterior=False) == pytest.approx([2 / 3, 2.0])


def test_scan_split_starts_random_in_backdoorbench_and_principal_in_the_paper():
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    principal = split_start(x, np.eye(1), True, np.random.default_rng(0))
    assert principal.tolist() in ([False, False, True, True], [True, True, False, False])  # by the sign
    random_start = split_start(x, np.eye(1), False, np.random.default_rng(0))
    assert random_start.tolist() == (np.random.default_rng(0).random(4) >= 0.5).tolist() == [True, False, False, False]
    seed = next(s for s in range(100) if (np.random.default_rng(s).random(4) >= 0.5).all())
    assert split_start(x, np.eye(1), False, np.random.default_rng(seed)).tolist() == [False, True, True, True]


def test_scan_clean_samples_inside_the_split_in_backdoorbench_only():
    """Class 0's inspected samples form one tight group, its clean samples another, far away. Inside the
    split (BackdoorBench) the clean group becomes a subgroup of its own; after the split (paper) the
    inspected samples are split among themselves and the clean ones are only assigned."""
    rng = np.random.default_rng(8)
    x = np.vstack([rng.normal(0, 1, (50, 3)), rng.normal(8, 1, (50, 3))])
    y = np.repeat([0, 1], 50)
    clean = np.vstack([rng.normal(6, 1, (10, 3)) * np.array([1, -1, 1]), rng.normal(8, 1, (10, 3))])
    clean_y = np.repeat([0, 1], 10)
    base = SCAN_VARIANTS["backdoorbench"]
    inside = scan(x, y, clean, clean_y, variant=base).subgroup_sizes[0]
    after = scan(x, y, clean, clean_y, variant=replace(base, clean_in_split=False)).subgroup_sizes[0]
    assert sorted(inside["clean"]) == [0, 10] and sorted(inside["sizes"]) == [0, 50]  # clean apart from inspected
    assert min(after["sizes"]) > 0  # the 50 inspected samples split in two


def test_scan_anomaly_index_absolute_in_backdoorbench_signed_in_the_paper():
    # values / max = [.1, .2, .3, 1.]; median .25; |dev| = [.15, .05, .05, .75], MAD .1
    values = np.array([1.0, 2.0, 3.0, 10.0])
    assert anomaly_index(values, signed=True) == pytest.approx(np.array([-0.15, -0.05, 0.05, 0.75]) / (0.1 * 1.4826))
    assert anomaly_index(values, signed=False) == pytest.approx(np.array([0.15, 0.05, 0.05, 0.75]) / (0.1 * 1.4826))
    # a class whose J is unusually SMALL: anomalous (index 12.1 > e^2) only for the absolute index
    low = np.array([10.0, 10.5, 9.5, 10.2, 1.0])
    assert anomaly_index(low, signed=False)[4] > THRESHOLD > anomaly_index(low, signed=True)[4]


def test_scan_tie_of_clean_counts():
    assert suspicious_is_first((3, 5), (40, 60), ties_to_smaller=True)  # fewer clean samples: subgroup 1
    assert not suspicious_is_first((5, 3), (40, 60), ties_to_smaller=False)
    assert suspicious_is_first((2, 2), (60, 40), ties_to_smaller=False)  # BackdoorBench: subgroup 1
    assert not suspicious_is_first((2, 2), (60, 40), ties_to_smaller=True)  # paper variant: the smaller one


def test_gram_features_of_the_paper_raise_the_features_to_the_power_p():
    maps = torch.tensor([[2.0, -3.0]])  # one sample, two channels, a 1 x 1 map
    g = gram_features(maps, powers=(1, 2, 3), raise_features=True)
    # p=1: [a², ab, b²]; p=2: sqrt of [a⁴, a²b², b⁴]; p=3: signed cube root of [a⁶, a³b³, b⁶]
    assert torch.allclose(g[0], torch.tensor([[4.0, -6.0, 9.0], [4.0, 6.0, 9.0], [4.0, -6.0, 9.0]]))


def test_gram_features_of_backdoorbench_root_one_gram_matrix():
    maps = torch.tensor([[2.0, -3.0]])
    g = gram_features(maps, powers=(1, 2, 3), raise_features=False)
    # G = [a², ab, b²] = [4, -6, 9] for every order, then its signed p-th root
    root = [[4.0, -6.0, 9.0], [2.0, -math.sqrt(6), 3.0], [4 ** (1 / 3), -(6 ** (1 / 3)), 9 ** (1 / 3)]]
    assert torch.allclose(g[0], torch.tensor(root), atol=1e-6)


def test_gram_deviation_by_hand():
    stats = GramStatistics(low=torch.tensor([[1.0, -2.0]]), high=torch.tensor([[2.0, 4.0]]))
    # entry 0: 0.5 below low 1 -> 0.5 / 1; entry 1: 6 above high 4 -> 2 / 4; mean over 2 entries
    dev = stats.deviation(torch.tensor([[[0.5, 6.0]], [[1.5, 0.0]]]))
    assert dev.tolist() == pytest.approx([(0.5 / (1 + 1e-6) + 2 / (4 + 1e-6)) / 2, 0.0])


def test_beatrix_flags_planted_feature_correlations():
    gen = torch.Generator().manual_seed(6)

    def maps(n, planted=False):
        m = torch.relu(torch.randn(n, 6, 4, 4, generator=gen))
        if planted:  # channels 0 and 1 fire together, strongly
            m[:, 0] += 3.0
            m[:, 1] = m[:, 0]
        return m

    clean = gram_features(maps(60))
    labels = np.repeat([0, 1], 30)
    model = BeatrixModel.fit(clean, labels)
    inspected = torch.cat([gram_features(maps(100)), gram_features(maps(20, planted=True))])
    groups = np.concatenate([np.repeat([0, 1], 50), np.zeros(20, dtype=int)])
    scores, flags = model.score(inspected, groups)
    truth = np.zeros(120, dtype=bool)
    truth[100:] = True
    assert flags[truth].all() and flags[~truth].mean() < 0.15
    assert metrics.auroc(scores, truth) == 1.0


class TriggerNet(nn.Module):
    """Class 0 whenever pixel (0, 0) is bright in every channel; otherwise nearly uniform logits."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 4, 10)
        nn.init.normal_(self.linear.weight, std=0.01)

    def forward(self, x):
        trigger = (x[:, :, 0, 0] > 0.9).all(1).float()
        logits = self.linear(x.flatten(1))
        logits[:, 0] = logits[:, 0] + 20 * trigger
        return logits


def test_strip_entropy_separates_trigger_inputs_and_skips_self_blends():
    gen = torch.Generator().manual_seed(7)
    clean = torch.randint(0, 100, (12, 3, 4, 4), generator=gen, dtype=torch.uint8)
    poison = clean[:4].clone()
    poison[:, :, 0, 0] = 255
    net = TriggerNet()
    h_clean = strip_entropy(net, clean, clean, torch.device("cpu"), blend="saturating")
    h_poison = strip_entropy(net, poison, clean, torch.device("cpu"), blend="saturating")
    assert h_poison.max() < 0.01 and h_clean.min() > 3.0  # log2(10) = 3.32 for uniform logits
    # self blends left out: the mean over the other 11 overlays, computed directly
    own = np.arange(12)
    h_self = strip_entropy(net, clean, clean, torch.device("cpu"), blend="saturating", self_overlay=own, batch_size=5)
    with torch.no_grad():
        x = clean.float() / 255
        blends = (x[:, None] + x[None]).clamp(0, 1).flatten(0, 1)
        p = torch.softmax(net(blends), 1)
        h = (-(p * p.log2()).sum(1)).view(12, 12)
    expected = (h.sum(1) - h.diagonal()) / 11
    assert h_self == pytest.approx(expected.numpy(), abs=1e-5)


def test_strip_blend_of_backdoorbench_is_the_sum_of_normalised_tensors():
    """BackdoorBench blends the normalised tensors: norm(x) + α norm(x_c). The pixel-space blend
    x + α (x_c - mean) fed to a normalising classifier gives the network exactly that; the authors'
    saturating blend does not (it also clips: 0.8 + 0.6 -> 1.0)."""
    from burnkit.models import Classifier

    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.1])
    clf = Classifier(nn.Identity(), tuple(mean.tolist()), tuple(std.tolist()))
    x = torch.full((1, 3, 2, 2), 0.8)
    xc = torch.full((1, 3, 2, 2), 0.6)
    bb = superimpose(x, xc, 1.0, "backdoorbench", clf.mean)[0, 0]
    assert torch.allclose(bb[:, 0, 0], 0.8 + (0.6 - mean))  # 0.9, 1.0, 1.1: not clipped
    assert torch.allclose(clf.normalize(bb), clf.normalize(x[0]) + clf.normalize(xc[0]), atol=1e-6)
    saturating = superimpose(x, xc, 1.0, "saturating")[0, 0]
    assert torch.allclose(saturating, torch.ones_like(saturating))
    assert not torch.allclose(clf.normalize(saturating), clf.normalize(x[0]) + clf.normalize(xc[0]), atol=1e-3)


def test_strip_threshold_is_backdoorbench_sorted_index():
    clean = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert entropy_threshold(clean, 0.1) == 2.0  # sorted[int(0.1 x 10)]: one clean entropy below it
    assert entropy_threshold(clean, 0.25) == 3.0  # sorted[2], no interpolation


def test_abl_loss_guards_and_isolation_share():
    logits = torch.tensor([[2.0, 0.0]])
    model = nn.Identity()

    class Ctx:
        def autocast(self):
            import contextlib
            return contextlib.nullcontext()

        def backward_step(self, loss, optimizer):
            self.loss = float(loss.detach())

    batch = type("B", (), {"x": logits.clone().requires_grad_(True), "y": torch.tensor([0])})()
    ce = float(torch.nn.functional.cross_entropy(logits, torch.tensor([0])))  # 0.127 < 0.5
    for kind, expected in (("lga", -ce), ("flooding", abs(ce - 0.5) + 0.5)):
        ctx = Ctx()
        guarded_step(kind, 0.5)(model, batch, None, ctx)
        assert ctx.loss == pytest.approx(expected)
    flags = lowest_share(np.array([0.3, 0.1, 0.2, 0.9, 0.05]), 0.4)
    assert flags.tolist() == [False, True, False, False, True]


# ----------------------------------------------------------------------------- feature points


ZOO_POINTS = {"preactresnet18": "layer4", "preactresnet34": "layer4", "smallcnn": "features.14",
              "vgg19": "features.35", "vgg19_bn": "features.51", "resnet18": "layer4", "resnet50": "layer4",
              "densenet121": "features", "mobilenet_v2": "features", "convnext_tiny": "features",
              "googlenet": "inception5b", "squeezenet1_0": "features", "vit_b_16": "1.heads.head:input"}


def _zoo():
    import attack_models

    return attack_models.list_models()


@pytest.mark.parametrize("name", _zoo())
def test_every_zoo_model_has_a_default_feature_point(name):
    import attack_models

    size = max(32, getattr(attack_models, "min_input_size", lambda n: 1)(name))
    net = attack_models.create_model(name, num_classes=10, image_size=size)
    point = default_feature_point(net, (3, size, size))
    assert point == ZOO_POINTS.get(name, point)
    assert resolve_feature_point(net, None, (3, size, size)) == point
    feats, logits = extract(_wrap(net), _images(2, size), point, torch.device("cpu"), reduce=lambda t: t)
    assert logits.shape == (2, 10)
    # a 4-D map the classifier comes after, or (no such map: ViTs) the final layer's 2-D input
    assert feats.dim() == 4 or (point.endswith(":input") and feats.dim() == 2), point


class HeadConvNet(nn.Module):
    """SqueezeNet's layout: the classifier is a 1 x 1 convolution inside a flat Sequential."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(8, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.classifier(self.features(x)).flatten(1)


class TokenNet(nn.Module):
    """No 4-D output anywhere (a ViT-like network): the default is the head's input."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(48, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.embed(x.flatten(1))))


def test_feature_points_of_unusual_layouts():
    shape = (3, 4, 4)
    assert final_layer(HeadConvNet(), shape) == "classifier.1"
    assert default_feature_point(HeadConvNet(), shape) == "features.1"  # the ReLU before pooling
    assert default_feature_point(TokenNet(), shape) == "head:input"
    net = TokenNet()
    feats, _ = extract(_wrap(net), _images(3, 4), "head:input", torch.device("cpu"))
    with torch.no_grad():
        expected = torch.relu(net.embed(_images(3, 4).images.float().div(255).flatten(1)))
    assert torch.allclose(feats, expected, atol=1e-6)
    with pytest.raises(BurnError, match="not a module"):
        resolve_feature_point(net, "layer4", shape)


def _wrap(net):
    from burnkit.models import Classifier

    return Classifier(net, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _images(n, size=32) -> ImageSet:
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(0, 256, (n, size, size, 3), generator=gen, dtype=torch.uint8).numpy()
    return ImageSet.from_numpy(x, np.zeros(n, dtype=np.int64))


# ----------------------------------------------------------------------------- clean reserve


def test_clean_reserve_is_balanced_without_replacement_and_outside_a_subset():
    labels = np.repeat(np.arange(4), 30)
    clean = ImageSet.from_numpy(np.zeros((120, 2, 2, 3), dtype=np.uint8), labels)
    inspected = np.arange(0, 120, 2)  # a subset record: every second image
    idx, source = choose_clean_reserve(clean, inspected, 10, seed=0)
    assert len(idx) == 10 == len(set(idx.tolist()))
    assert not set(idx.tolist()) & set(inspected.tolist()) and "outside" in source
    counts = np.bincount(labels[idx], minlength=4)
    assert sorted(counts.tolist()) == [2, 2, 3, 3]  # 10 // 4 each, the remainder to two classes
    full, source = choose_clean_reserve(clean, np.arange(120), 8, seed=0)
    assert np.bincount(labels[full]).tolist() == [2, 2, 2, 2] and "whole" in source
    assert np.array_equal(full, choose_clean_reserve(clean, np.arange(120), 8, seed=0)[0])  # seeded
    with pytest.raises(BurnError, match="per class"):
        choose_clean_reserve(clean, np.arange(120), 200, seed=0)


# ----------------------------------------------------------------------------- CLIs on real records

RECORD = "badnet_digits"
HEADERS = {"spectral": "record,TN,FP,FN,TP,TPR,FPR,target", "ac": "record,TN,FP,FN,TP,TPR,FPR,weight_F_score,target",
           "spectre": "record,TN,FP,FN,TP,TPR,FPR,target", "scan": "record,TN,FP,FN,TP,TPR,FPR,target",
           "beatrix": "record,TN,FP,FN,TP,TPR,FPR,target", "strip": "record,TN,FP,FN,TP,TPR,FPR,AUC,target",
           "abl": "record,TN,FP,FN,TP,TPR,FPR,AUC,target", "burn": "record,TN,FP,FN,TP,TPR,FPR,AUC,target",
           "burn_s": "record,TN,FP,FN,TP,TPR,FPR,AUC,target"}
FAST = {"abl": ["--tuning_epochs", "2"], "strip": ["--num_overlays", "20"], "burn": ["--max_iter", "5", "--candidates", "3"],
        "spectre": ["--ks", "1,4"]}
# Detectors whose defaults find the digits BadNets poison better than chance. Measured at these budgets on
# the records of seeds 0, 1, 2 (experiments/results/digits_detection_both_forms/, each detector seeded with
# its record's seed): SCAn 0.97-1.00, ABL 0.67-0.94, SPECTRE 0.59-0.71, Spectral 0.65-0.69, AC 0.56-0.72
# (AC is 0.70 on the seed-2 record with this test's detector seed 0); Beatrix's and STRIP's BackdoorBench
# forms and BURN's one-pass distance do not: 0.44-0.61, 0.44-0.57, 0.39-0.63.
BEATS_CHANCE = {"spectral", "ac", "spectre", "scan", "abl"}


def folder_of(work: Path, method: str) -> Path:
    base = work / "record" / RECORD
    return base / ("detection_pretrain/abl" if method == "abl" else f"detection/{method}_pretrain")


def test_every_detector_is_registered_with_a_script():
    assert list_detectors() == sorted(HEADERS)
    root = Path(__file__).resolve().parents[1]
    for name in HEADERS:
        assert (root / "detection_pretrain" / f"{name}.py").is_file()
        assert get_detector(name).name == name


@pytest.mark.parametrize("method", [m for m in HEADERS if m != "burn_s"])
def test_detector_cli_writes_backdoorbench_outputs(method, digits_copy):
    work = digits_copy
    out = get_detector(method).main(["--result_file", RECORD, "--progress", "false", *FAST.get(method, [])])
    folder = folder_of(work, method)
    assert out["out_dir"] == Path("record") / RECORD / folder.relative_to(work / "record" / RECORD)
    raw = (folder / "detection_info.csv").read_bytes()
    lines = raw.split(b"\r\n")
    assert lines[0].decode() == HEADERS[method] and lines[2] == b"" and len(lines) == 3
    row = next(csv.DictReader([lines[0].decode(), lines[1].decode()]))
    summary = json.loads((folder / "detection_scores.json").read_text())
    scores = np.load(folder / "detection_scores.npy")
    samples = (folder / "detection_samples.csv").read_text().splitlines()
    n = summary["n_samples"]
    assert scores.shape == (n,) and scores.dtype == np.float64 and len(samples) == n + 1
    assert [int(row[k]) for k in ("TN", "FP", "FN", "TP")] == [summary[k] for k in ("TN", "FP", "FN", "TP")]
    assert summary["TN"] + summary["FP"] + summary["FN"] + summary["TP"] == n
    assert summary["TP"] + summary["FN"] == summary["n_poison"] > 0
    # the AUROC recomputed independently: the truth from the record itself, scikit-learn's own AUROC
    truth = _record_truth(work / "record" / RECORD)
    assert summary["auroc"] == pytest.approx(roc_auc_score(truth, scores))
    assert _truth(folder).tolist() == truth.tolist()
    if method in BEATS_CHANCE:
        assert summary["auroc"] > 0.58, summary["auroc"]
    assert summary["clean_samples_used"] == (100 if method in ("scan", "beatrix", "strip") else 0)
    index = (folder / "log" / "index.txt").read_text().split()
    assert len(index) == summary["clean_samples_used"]
    assert (folder / "cost.json").is_file() and (folder / "detection_roc.png").is_file()


def _record_truth(record_dir: Path) -> np.ndarray:
    """BackdoorBench's poison indicator of the inspected samples, read from the record's own file."""
    from burnkit.records import read_attack_record

    state = read_attack_record(record_dir).bd_train
    return state.poison_indicator[state.original_index] == 1


def _truth(folder: Path) -> np.ndarray:
    import pandas as pd

    return pd.read_csv(folder / "detection_samples.csv")["is_poison"].to_numpy().astype(bool)


VARIANT_FLAGS = {"scan": ["--variant", "paper"], "spectre": ["--variant", "paper"], "beatrix": ["--variant", "paper"],
                 "strip": ["--blend", "saturating"]}


def test_backdoorbench_variants_are_the_defaults():
    for method, flags in VARIANT_FLAGS.items():
        cfg = get_detector(method).config_cls()
        assert getattr(cfg, flags[0][2:]) == "backdoorbench", method


@pytest.mark.parametrize("method", list(VARIANT_FLAGS))
def test_variant_flag_is_recorded_and_changes_the_scores(method, digits_copy):
    detector = get_detector(method)
    base = ["--result_file", RECORD, "--progress", "false", *FAST.get(method, []),
            *(["--powers", "1,2"] if method == "beatrix" else [])]  # the variants differ from p = 2 on
    default = detector.main(base)["summary"]
    other = detector.main([*base, *VARIANT_FLAGS[method], "--output_name", f"{method}-variant"])["summary"]
    key = VARIANT_FLAGS[method][0][2:]
    assert default["config"][key] == "backdoorbench" and other["config"][key] == VARIANT_FLAGS[method][1]
    folder = digits_copy / "record" / RECORD / "detection"
    a = np.load(folder / f"{method}_pretrain" / "detection_scores.npy")
    b = np.load(folder / f"{method}-variant_pretrain" / "detection_scores.npy")
    assert not np.allclose(a, b)
    if method == "strip":  # the normalised-tensor sum hides the digits trigger; the saturating blend keeps it
        # 0.97-1.00 against 0.42-0.57 on the six records of experiments/results/digits_detection_both_forms
        assert other["auroc"] > default["auroc"] + 0.2


def test_burn_detector_scans_with_defense_burn_settings_unless_told_otherwise(digits_copy):
    from burnkit.defenses.burn import Burn
    from burnkit.detectors.burn import SCAN_KEYS, BurnDistance, burn_scan_config

    defense_cfg, _, _ = Burn.parse(["--result_file", RECORD])
    detector_cfg, _, _ = BurnDistance.parse(["--result_file", RECORD])
    assert all(getattr(detector_cfg, k) is None for k in SCAN_KEYS)  # its YAML restates none of them
    resolved = burn_scan_config(detector_cfg, "digits")
    assert {k: getattr(resolved, k) for k in SCAN_KEYS} == {k: getattr(defense_cfg, k) for k in SCAN_KEYS}
    told, _, _ = BurnDistance.parse(["--result_file", RECORD, "--candidates", "7", "--max_iter", "9"])
    resolved = burn_scan_config(told, "digits")
    assert (resolved.candidates, resolved.max_iter) == (7, 9) and resolved.overshoot == defense_cfg.overshoot


def test_finished_detection_is_refused_then_overwritten_with_history(digits_copy, capsys):
    work = digits_copy
    spectral = get_detector("spectral")
    spectral.main(["--result_file", RECORD, "--progress", "false"])
    folder = folder_of(work, "spectral")
    before = (folder / "detection_scores.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        spectral.main(["--result_file", RECORD, "--progress", "false"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite true" in err[0]
    assert (folder / "detection_scores.json").read_bytes() == before
    spectral.main(["--result_file", RECORD, "--progress", "false", "--overwrite", "true", "--percentile", "50"])
    lines = (folder / "detection_info.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0] == lines[2] == HEADERS["spectral"]  # header + row per run, appended
    assert len(list(folder.parent.glob("spectral_pretrain.replaced-*"))) == 1


def _foreign_burn_run(work: Path):
    """A 'finished' BURN output whose samples are another record's."""
    folder = work / "record" / RECORD / "defense" / "burn"
    folder.mkdir(parents=True)
    torch.save({"model_name": "smallcnn", "num_classes": 10, "model": {}}, folder / "defense_result.pt")
    (folder / "burn_samples.csv").write_text("index,boundary_l2,S\n0,1.0,0.5\n1,2.0,0.7\n")


BAD = [  # (id, detector, argv, setup, message)
    ("no-record-flag", "spectral", [], None, "--result_file is required"),
    ("unknown-record", "spectral", ["--result_file", "nope"], None, "nope"),
    ("unknown-flag", "spectral", ["--result_file", RECORD, "--percentil", "50"], None, "did you mean '--percentile'"),
    ("bad-layer", "spectral", ["--result_file", RECORD, "--target_layer", "layer9"], None, "not a module"),
    ("bad-ac-layer", "ac", ["--result_file", RECORD, "--target_layer", "fc:input"], None, "not a module"),
    ("bad-class", "spectral", ["--result_file", RECORD, "--target_label", "12"], None, "not a class"),
    ("percentile-range", "spectral", ["--result_file", RECORD, "--percentile", "120"], None, "<= 100"),
    ("bad-reducer", "ac", ["--result_file", RECORD, "--reducer", "tsne"], None, "must be one of ica, pca"),
    ("bad-guard", "abl", ["--result_file", RECORD, "--gradient_ascent_type", "ascent"], None, "LGA"),
    ("too-many-clean", "scan", ["--result_file", RECORD, "--clean_sample_num", "5000"], None, "per class"),
    ("missing-index", "strip", ["--result_file", RECORD, "--index", "no_such_file.txt"], None, "not found"),
    ("bad-output-name", "spectral", ["--result_file", RECORD, "--output_name", "../x"], None, "plain folder name"),
    ("yaml-unknown-key", "spectre", ["--result_file", RECORD, "--yaml_path", "bad.yaml"],
     lambda work: (work / "bad.yaml").write_text("percentile: 0.1\nalpah: 4\n"), "unknown key 'alpah'"),
    ("no-burn-run", "burn_s", ["--result_file", RECORD], None, "defense/burn.py"),
    ("foreign-burn-run", "burn", ["--result_file", RECORD, "--burn_output", "defense/burn"], _foreign_burn_run,
     "other samples"),
    ("no-bd-train", "spectral", ["--result_file", RECORD], "no_bd_train", "no poisoned training set"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_detector_input_is_one_line_exit_2_and_changes_nothing(case, digits_copy, capsys):
    from test_bad_inputs import set_key, snapshot

    _, detector, argv, setup, message = case
    work = digits_copy
    if setup == "no_bd_train":
        set_key("bd_train", None)(work)
    elif setup is not None:
        setup(work)
    before = snapshot(work)
    with pytest.raises(SystemExit) as exc:
        get_detector(detector).main([*argv, "--progress", "false"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert message in err[0], err[0]
    assert snapshot(work) == before


def test_burn_detectors_agree_with_a_burn_run(digits_copy, capsys):
    from burnkit.defense import get_defense

    work = digits_copy
    with pytest.raises(SystemExit):  # no BURN run yet: one line, nothing written
        get_detector("burn_s").main(["--result_file", RECORD, "--progress", "false"])
    assert "defense/burn.py" in capsys.readouterr().err
    assert not (work / "record" / RECORD / "detection").exists()
    scan_flags = ["--max_iter", "5", "--candidates", "3"]
    get_defense("burn").main(["--result_file", RECORD, "--iterations", "1", "--epochs", "1", "--progress", "false",
                              *scan_flags])
    report = json.loads((work / "record" / RECORD / "defense" / "burn" / "burn_detection.json").read_text())
    s = get_detector("burn_s").main(["--result_file", RECORD, "--progress", "false"])["summary"]
    assert s["auroc"] == pytest.approx(report["auroc_final_score_after_finetuning"], abs=1e-9)
    read = get_detector("burn").main(["--result_file", RECORD, "--progress", "false", "--burn_output", "defense/burn",
                                      "--output_name", "burn_read"])["summary"]
    assert read["auroc"] == pytest.approx(report["auroc_l2"], abs=1e-9)
    scanned = get_detector("burn").main(["--result_file", RECORD, "--progress", "false", *scan_flags])
    assert np.allclose(scanned["result"].scores, np.load(folder_of(work, "burn_read") / "detection_scores.npy"),
                       rtol=1e-5, atol=1e-6)  # the same scan as BURN's Phase 1


@pytest.mark.parametrize("layout", ["subset", "whole-split"])
def test_scan_on_an_independent_backdoorbench_subset_record(layout, cifar_root, tmp_path, monkeypatch):
    """A record written by hand (BackdoorBench's layout, plain torch.save) whose model trained on 200 of
    the 300 real CIFAR-10 training images, in both layouts: ``bd_train`` listing only those 200, or
    covering the whole split with the 200 in ``train_subset_index`` (issue 12's --train_subset records;
    a BackdoorBench consumer reads position = original index). Either way SCAn scores exactly the 200
    trained samples, the truth is the record's poison indicator at their original indices, and the
    class-balanced reserve comes from the other 100."""
    import collections
    import shutil

    import pandas as pd

    from attack_models import create_model
    from burnkit.compare.detection import record_truth
    from burnkit.datasets import load_split
    from test_records import _bb_split

    base = tmp_path / "bb"
    (base / "data").mkdir(parents=True)
    shutil.copytree(cifar_root, base / "data" / "cifar10")
    train_x, train_y = load_split("cifar10", base / "data" / "cifar10", train=True, cache=False)
    test_x, test_y = load_split("cifar10", base / "data" / "cifar10", train=False, cache=False)
    positions = np.sort(np.random.default_rng(0).choice(len(train_y), 200, replace=False))
    poisoned = {}
    for idx in positions[:20]:
        img = train_x[idx].copy()
        img[-3:, -3:] = 255
        poisoned[int(idx)] = (img, 0, int(train_y[idx]))
    test_idx = np.flatnonzero(test_y != 0)[:10]
    net = create_model("smallcnn", num_classes=10)
    listed = positions if layout == "subset" else np.arange(len(train_y))
    record = {"model_name": "smallcnn", "num_classes": 10,
              "model": collections.OrderedDict((k, v) for k, v in net.state_dict().items()),
              "data_path": "./data/cifar10", "img_size": (32, 32, 3), "clean_data": "cifar10",
              "bd_train": _bb_split("bb", "bd_train_dataset", len(train_y), poisoned, listed, base),
              "bd_test": _bb_split("bb", "bd_test_dataset", len(test_y),
                                   {int(i): (test_x[i], 0, int(test_y[i])) for i in test_idx}, test_idx, base)}
    if layout == "whole-split":
        record["train_subset_index"] = positions.astype(np.int64)
    torch.save(record, base / "record" / "bb" / "attack_result.pt")
    monkeypatch.chdir(base)
    out = get_detector("scan").main(["--result_file", "bb", "--progress", "false", "--clean_sample_num", "50"])
    folder = base / "record" / "bb" / "detection" / "scan_pretrain"
    index = np.loadtxt(folder / "log" / "index.txt", dtype=np.int64)
    assert len(index) == 50 and not set(index.tolist()) & set(positions.tolist())
    assert np.bincount(train_y[index], minlength=10).tolist() == [5] * 10
    assert out["summary"]["n_samples"] == 200 and out["summary"]["n_poison"] == 20
    assert "outside the inspected subset" in out["summary"]["clean_source"]
    samples = pd.read_csv(folder / "detection_samples.csv")
    indicator = record["bd_train"]["poison_indicator"]  # BackdoorBench's reading: position = original index
    np.testing.assert_array_equal(samples["index"], positions)
    np.testing.assert_array_equal(samples["is_poison"], indicator[positions].astype(int))
    np.testing.assert_array_equal(samples["original_label"], train_y[positions])
    assert (samples.loc[samples["is_poison"] == 1, "label"] == 0).all()
    s = out["summary"]
    assert s["TN"] + s["FP"] + s["FN"] + s["TP"] == 200 and s["TP"] + s["FN"] == 20
    assert s["auroc"] == pytest.approx(metrics.auroc(np.load(folder / "detection_scores.npy"), indicator[positions] == 1))
    truth, relabelled = record_truth(base / "record" / "bb")  # burn-compare's truth: the same 200
    np.testing.assert_array_equal(truth, indicator[positions] == 1)
    np.testing.assert_array_equal(relabelled, truth & (train_y[positions] != 0))  # class-0 poison keeps its label


def test_detectors_score_the_trained_samples_of_our_train_subset_record(tmp_path, monkeypatch):
    """Our attack's --train_subset record (whole split in bd_train, the 500 trained indices in
    ``train_subset_index``): a detector without clean data (Spectral) and one with (STRIP) score the
    500 trained samples in the record's order, their truth is BackdoorBench's indicator at those
    indices (the 50 poisoned ones), and STRIP's clean reserve avoids them."""
    import contextlib

    import pandas as pd

    from burnkit.attack import get_attack
    from burnkit.safe_load import safe_torch_load
    from conftest import DIGITS_TRAINING

    cls = get_attack("badnet")
    with contextlib.chdir(tmp_path):
        cfg, _ = cls.parse([*DIGITS_TRAINING, "--epochs", "2", "--train_subset", "500", "--save_folder_name", "sub"])
        cls.run(cfg)
    raw = safe_torch_load(tmp_path / "record" / "sub" / "attack_result.pt")
    trained, indicator = raw["train_subset_index"], raw["bd_train"]["poison_indicator"]
    assert len(raw["bd_train"]["original_index_array"]) == len(indicator) > 500 == len(trained)
    monkeypatch.chdir(tmp_path)
    for method, extra in (("spectral", []), ("strip", ["--num_overlays", "5"])):
        out = get_detector(method).main(["--result_file", "sub", "--progress", "false", *extra])
        folder = tmp_path / "record" / "sub" / "detection" / f"{method}_pretrain"
        samples = pd.read_csv(folder / "detection_samples.csv")
        np.testing.assert_array_equal(samples["index"], trained)
        np.testing.assert_array_equal(samples["is_poison"], indicator[trained].astype(int))
        assert out["summary"]["n_samples"] == 500 and out["summary"]["n_poison"] == 50 == int(indicator.sum())
        reserve = np.array((folder / "log" / "index.txt").read_text().split(), dtype=np.int64)
        assert len(reserve) == (100 if method == "strip" else 0) and not set(reserve.tolist()) & set(trained.tolist())
