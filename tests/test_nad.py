"""NAD: attention maps and AT loss by hand, generic feature points, end-to-end run on digits."""
from __future__ import annotations

import math

import pytest
import torch

from baseline_checks import FT_COLUMNS, check_common, load_defended, random_net, read_csv, score
from burnkit.defenses.nad import (NeuralAttentionDistillation, attention_loss, attention_map,
                                  attention_points, student_lr)


def test_attention_map_by_hand():
    # one sample, two channels, a 2x2 map
    f = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]],
                       [[-1.0, 0.0], [2.0, 1.0]]]])
    # sum_c |f_c|^2 = [[2, 4], [4, 10]] -> flattened [2, 4, 4, 10], norm sqrt(136)
    expected = torch.tensor([[2.0, 4.0, 4.0, 10.0]]) / math.sqrt(136.0)
    assert torch.allclose(attention_map(f, p=2.0), expected, atol=1e-6)
    # p = 1: [[2, 2], [2, 4]] -> norm sqrt(28)
    assert torch.allclose(attention_map(f, p=1.0), torch.tensor([[2.0, 2.0, 2.0, 4.0]]) / math.sqrt(28.0), atol=1e-6)


def test_attention_loss_by_hand():
    s = torch.tensor([[[[3.0, 0.0], [0.0, 4.0]]]])  # map [9, 0, 0, 16] / sqrt(337)
    t = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])  # map [0, 1, 0, 0]
    a = torch.tensor([9.0, 0.0, 0.0, 16.0]) / math.sqrt(337.0)
    b = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert attention_loss(s, t).item() == pytest.approx(((a - b) ** 2).mean().item(), abs=1e-6)
    assert attention_loss(s, s).item() == 0.0
    # a 1x1 map (pooled features) normalises to 1 for both: the AT term vanishes, as in BackdoorBench
    pooled_s, pooled_t = torch.rand(4, 8, 1, 1) + 0.1, torch.rand(4, 8, 1, 1) + 0.1
    assert attention_loss(pooled_s, pooled_t).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("model_name,hw,expected", [
    ("preactresnet18", 32, ["layer3", "layer4", "avgpool"]),  # BackdoorBench's points
    ("preactresnet34", 16, ["layer3", "layer4", "avgpool"]),
    ("smallcnn", 32, ["features.10", "features.14", "pool"]),  # conv stages at 8x8 and 4x4, global pool
    ("smallcnn", 8, ["features.6", "features.10", "pool"]),  # digits: 4x4, 2x2, then the 1x1 stage
    ("vgg19_bn", 32, ["features.51", "features.52", "avgpool"]),  # last conv stage (2x2), last max-pool, avgpool
    ("vgg19", 32, ["features.35", "features.36", "avgpool"]),
])
def test_attention_points_are_found_generically(model_name, hw, expected):
    assert attention_points(random_net(model_name), (3, hw, hw)) == expected


def test_student_lr_rule():
    assert [student_lr(e, 0.05) for e in (0, 1, 2, 19, 20, 30)] == [0.05, 0.05, 0.01, 0.01, 1e-4, 1e-4]


def test_nad_end_to_end_on_digits(digits_copy):
    record_dir = digits_copy / "record" / "blended_digits"
    out = NeuralAttentionDistillation.main(["--result_file", "blended_digits", "--te_epochs", "2", "--ratio", "0.2",
                                            "--progress", "false"])
    out_dir = record_dir / "defense" / "nad"
    cost = check_common(out_dir)
    assert cost["nad_points"] == ["features.6", "features.10", "pool"]
    assert cost["clean_subset_size"] == int(1438 * 0.2)
    for name in ("nad_te_df.csv", "nad_df.csv"):
        df = read_csv(out_dir / name)
        assert list(df.columns) == FT_COLUMNS
        assert df["epoch"].tolist() == [0, 1]  # real epoch numbers (BackdoorBench writes 0, 0)
        assert (df["batch"] == 2).all()  # 287 samples in batches of 256
        assert (out_dir / name.replace("_df.csv", "_df_summary.csv")).is_file()
    assert (out_dir / "nad_te_acc_like_metric_plots.png").is_file()
    clf, record = load_defended(out_dir, record_dir)
    attacked = {k: v for k, v in record.state_dict.items()}
    changed = [k for k, v in clf.net.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, attacked[k])]
    assert changed  # the student was trained
    metrics = score(clf, record)
    assert metrics.acc == pytest.approx(read_csv(out_dir / "nad_df.csv")["test_acc"].iloc[-1])
    assert out["final"]["test_asr"] == pytest.approx(metrics.asr)


def test_nad_with_given_teacher_skips_teacher_training(digits_copy):
    record_dir = digits_copy / "record" / "badnet_digits"
    from burnkit.records import read_attack_record

    torch.save(dict(read_attack_record(record_dir).state_dict), digits_copy / "teacher.pt")
    NeuralAttentionDistillation.main(["--result_file", "badnet_digits", "--te_epochs", "1",
                                      "--teacher_model_loc", "teacher.pt", "--progress", "false"])
    out_dir = record_dir / "defense" / "nad"
    assert not (out_dir / "nad_te_df.csv").exists()
    assert read_csv(out_dir / "nad_df.csv")["epoch"].tolist() == [0]
    load_defended(out_dir, record_dir)


def test_student_step_runs_in_float32_even_with_amp():
    # BackdoorBench's student loop has no autocast: the step must not enter the AMP context
    from burnkit.data import Batch
    from burnkit.datasets import dataset_info
    from burnkit.defenses.nad import distillation_step, tapped
    from burnkit.engine import StepContext
    from burnkit.models import build_classifier

    class _NoAutocast(StepContext):
        def autocast(self):
            raise AssertionError("the NAD student must not use autocast")

    student = build_classifier("smallcnn", dataset_info("digits"), 10)
    teacher = build_classifier("smallcnn", dataset_info("digits"), 10).eval()
    points = ["features.6", "features.10", "pool"]
    with tapped(student.net, points) as s_tap, tapped(teacher.net, points) as t_tap:
        step = distillation_step(teacher, s_tap, t_tap, (500.0, 1000.0, 1000.0), 2.0)
        batch = Batch(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]),
                      torch.zeros(4, dtype=torch.bool), torch.arange(4), torch.arange(4))
        opt = torch.optim.SGD(student.parameters(), lr=0.01)
        out = step(student, batch, opt, _NoAutocast(torch.device("cpu"), True, None))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
