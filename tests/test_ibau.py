"""I-BAU: the implicit hypergradient against its analytic value, the inner maximisation, and an
end-to-end run on the digits record with BackdoorBench-format output."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from burnkit.defense import get_defense
from burnkit.defenses.ibau import IBAU, IBAUConfig, fixed_point_hypergradient, gradient_descent_map, universal_perturbation
from burnkit.errors import BurnError
from burnkit.records import read_attack_record

from defense_checks import check_defense_result, check_index_file

BB_COLUMNS = ["epoch", "clean_test_loss_avg_over_batch", "bd_test_loss_avg_over_batch",
              "ra_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra"]


def _quadratic_problem():
    """Inner ``L_in(d, t) = ½ dᵀAd - dᵀBt`` (minimiser ``d* = A⁻¹Bt``), outer
    ``L_out = ½||d - c||² + ½||t||²``; analytic ``dL_out(d*(t), t)/dt = t + BᵀA⁻¹(d* - c)``."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([1.0, 2.0, 2.5, 3.0], dtype=torch.float64)) @ q.T
    b = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    c = torch.randn(4, generator=gen, dtype=torch.float64)
    theta = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    inner_loss = lambda d, t: 0.5 * d[0] @ a @ d[0] - d[0] @ b @ t[0]  # noqa: E731
    outer_loss = lambda d, t: 0.5 * ((d[0] - c) ** 2).sum() + 0.5 * (t[0] ** 2).sum()  # noqa: E731
    d_star = torch.linalg.solve(a, b @ theta.detach())
    return a, b, c, theta, inner_loss, outer_loss, d_star


def test_fixed_point_hypergradient_matches_the_implicit_gradient():
    a, b, c, theta, inner_loss, outer_loss, d_star = _quadratic_problem()
    fp_map = gradient_descent_map(inner_loss, 0.3)  # contraction: |1 - 0.3 λ| <= 0.7 for λ in [1, 3]
    grad, = fixed_point_hypergradient([d_star], [theta], fp_map, outer_loss, K=100)
    analytic = theta.detach() + b.T @ torch.linalg.solve(a, d_star - c)
    torch.testing.assert_close(grad, analytic, rtol=1e-9, atol=1e-9)


def test_one_fixed_point_iteration_is_the_first_neumann_term():
    # v_1 = ∂_d L_out, so the gradient is ∂_t L_out + (∂_t Φ)ᵀ v_1 = t + 0.1 Bᵀ (d - c).
    _, b, c, theta, inner_loss, outer_loss, d_star = _quadratic_problem()
    grad, = fixed_point_hypergradient([d_star], [theta], gradient_descent_map(inner_loss, 0.1), outer_loss, K=1)
    torch.testing.assert_close(grad, theta.detach() + 0.1 * b.T @ (d_star - c))
    grad0, = fixed_point_hypergradient([d_star], [theta], gradient_descent_map(inner_loss, 0.1), outer_loss, K=0)
    torch.testing.assert_close(grad0, theta.detach())  # no iterations: only the direct term


def test_universal_perturbation_finds_the_backdoor_target(digits_workdir):
    # I-BAU's premise: the loss-maximising universal perturbation of a backdoored model acts like
    # its trigger. On the BadNets digits record (target 0) it sends almost everything to class 0.
    from burnkit.models import build_classifier, load_bb_state_dict

    record = read_attack_record(digits_workdir / "record" / "badnet_digits")
    model = build_classifier(record.model_name, record.info, record.num_classes).eval()
    load_bb_state_dict(model, record.state_dict)
    clean = record.load_data().clean_train.subset(np.arange(256))
    cfg = IBAUConfig(pert_norm_bound=3.0, batch_size=16)
    delta = universal_perturbation(model, clean, cfg, torch.device("cpu"), torch.Generator().manual_seed(0), None)
    assert delta.shape == (1, *clean.shape)
    assert float(delta.norm()) == pytest.approx(3.0, rel=1e-5)  # projected onto the L2 ball
    with torch.no_grad():
        z = model.normalize(clean.batch(torch.arange(len(clean))).x)
        own = model.net(z).argmax(1)
        perturbed = model.net(z + delta)
    assert F.cross_entropy(perturbed, own) > F.cross_entropy(model.net(z), own) + 1.0
    assert (perturbed.argmax(1) == 0).float().mean() > 0.8


def test_ibau_end_to_end_on_digits(digits_copy):
    """Five rounds at lr 0.001 with half the clean training split: I-BAU unlearns most of the digits
    BadNets backdoor (ASR 1.00 -> 0.34-0.73, ACC 0.87-0.94 on records of attack seeds 0, 1, 2 when
    written; 20 % of the clean data or two rounds leave it at 0.76-1.00)."""
    result = IBAU.main(["--result_file", "badnet_digits", "--n_rounds", "5", "--ratio", "0.5", "--lr", "0.001",
                        "--progress", "false"])
    out = digits_copy / "record" / "badnet_digits" / "defense" / "i-bau"
    assert get_defense("i-bau") is IBAU
    frame = pd.read_csv(out / "i-bau_df.csv", index_col=0)
    assert list(frame.columns) == BB_COLUMNS
    assert list(frame["epoch"]) == [0, 1, 2, 3, 4]
    summary = pd.read_csv(out / "i-bau_df_summary.csv", index_col=0)
    assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]
    check_index_file(out / "log" / "index.txt", expected_len=int(1437 * 0.5))
    state = check_defense_result(out / "defense_result.pt", "smallcnn", 10)
    # the saved weights are the repaired model's, and they differ from the attacked ones
    before = read_attack_record(digits_copy / "record" / "badnet_digits").state_dict
    assert any(not torch.equal(state[k], before[k]) for k in state)
    torch.testing.assert_close(result["model"].net.state_dict()["classifier.weight"], state["classifier.weight"])
    assert result["before"].asr > 0.95
    assert result["final"]["test_acc"] > 0.8
    assert result["final"]["test_asr"] < result["before"].asr - 0.2


def test_perturbation_is_unbounded_by_default_as_in_backdoorbench(digits_workdir):
    from burnkit.models import build_classifier, load_bb_state_dict

    record = read_attack_record(digits_workdir / "record" / "badnet_digits")
    model = build_classifier(record.model_name, record.info, record.num_classes).eval()
    load_bb_state_dict(model, record.state_dict)
    clean = record.load_data().clean_train.subset(np.arange(64))
    assert IBAUConfig().pert_norm_bound == 0.0
    free = universal_perturbation(model, clean, IBAUConfig(batch_size=16), torch.device("cpu"),
                                  torch.Generator().manual_seed(0), None)
    bounded = universal_perturbation(model, clean, IBAUConfig(batch_size=16, pert_norm_bound=1.0),
                                     torch.device("cpu"), torch.Generator().manual_seed(0), None)
    assert float(free.norm()) > 1.5  # lr 10 for 4 steps: far outside a unit ball, and kept so
    torch.testing.assert_close(bounded, free / free.norm())


def test_ibau_scores_the_test_sets_every_n_rounds(digits_copy):
    IBAU.main(["--result_file", "badnet_digits", "--n_rounds", "3", "--ratio", "0.1", "--test_every", "2",
               "--progress", "false"])
    out = digits_copy / "record" / "badnet_digits" / "defense" / "i-bau"
    frame = pd.read_csv(out / "i-bau_df.csv", index_col=0)
    assert list(frame.columns) == [*BB_COLUMNS, "tested"]  # BackdoorBench's columns, then the marker
    assert frame["tested"].tolist() == [False, True, True]
    assert frame["test_acc"].isna().tolist() == [True, False, False]
    summary = pd.read_csv(out / "i-bau_df_summary.csv", index_col=0)
    assert float(summary.loc["last", "test_acc"]) == pytest.approx(frame["test_acc"].iloc[-1])
    assert summary.loc["exist_nan_value", "test_acc"] in (False, "False")  # skipped is not NaN


def test_ibau_rejects_a_bad_portion():
    with pytest.raises(BurnError, match="portion"):
        IBAU.parse(["--portion", "1.5"])
