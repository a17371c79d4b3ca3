"""The engine: determinism, resumable checkpoints, BackdoorBench optimiser/scheduler semantics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from burnkit.data import Augment, ImageSet
from burnkit.datasets import dataset_info, load_split
from burnkit.engine import EvalSuite, TrainConfig, fit, make_optimizer, make_scheduler, resolve_device
from burnkit.errors import BurnError
from burnkit.models import build_classifier


@pytest.fixture(scope="module")
def digits_sets():
    x, y = load_split("digits", None, True)
    xt, yt = load_split("digits", None, False)
    return ImageSet.from_numpy(x[:400], y[:400]), EvalSuite(ImageSet.from_numpy(xt, yt))


def _train(sets, epochs, checkpoint=None, seed=0, on_row=None):
    torch.manual_seed(0)
    model = build_classifier("smallcnn", dataset_info("digits"))
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.05, cos_t_max=4)
    res = fit(model, sets[0], cfg, device=torch.device("cpu"), eval_suite=sets[1], augment=Augment(1),
              seed=seed, checkpoint=checkpoint, progress=False, on_row=on_row)
    return model, res


def test_same_seed_same_model_and_rows(digits_sets):
    m1, r1 = _train(digits_sets, 2)
    m2, r2 = _train(digits_sets, 2)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["test_acc"] for r in r1.rows] == [r["test_acc"] for r in r2.rows]
    assert list(r1.rows[0])[:4] == ["epoch", "batch", "train_epoch_loss_avg_over_batch", "train_acc"]
    assert r1.rows[-1]["test_acc"] > 0.25  # it learns (chance is 0.1)


def test_killed_run_resumes_to_the_same_model(digits_sets, tmp_path):
    straight, _ = _train(digits_sets, 4)
    ckpt = tmp_path / "state.pt"
    _train(digits_sets, 2, checkpoint=ckpt)  # "killed" after epoch 2
    seen = []  # what a CSV writer fed by on_row gets: the restored epochs, then the new ones
    resumed, res = _train(digits_sets, 4, checkpoint=ckpt, on_row=seen.append)
    assert res.resumed_from_epoch == 2 and res.epochs_run == 2 and len(res.rows) == 4
    assert [r["epoch"] for r in seen] == [0, 1, 2, 3] and seen == res.rows
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_optimizers_and_schedulers_follow_backdoorbench():
    params = [torch.nn.Parameter(torch.zeros(2))]
    adam = make_optimizer(params, TrainConfig(client_optimizer="adam", lr=1e-3, wd=0.0))
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["amsgrad"] is True
    sgd = make_optimizer(params, TrainConfig(client_optimizer="sgd", sgd_momentum=0.8, wd=1e-4))
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["weight_decay"] == 1e-4
    cos = make_scheduler(sgd, TrainConfig())
    assert cos.T_max == 100  # BackdoorBench's default T_max
    assert make_scheduler(sgd, TrainConfig(lr_scheduler=None)) is None
    with pytest.raises(BurnError, match="not supported"):
        make_scheduler(sgd, TrainConfig(lr_scheduler="Warp"))


def test_resolve_device_errors():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(BurnError, match="not a device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(BurnError, match="no GPU"):
            resolve_device("cuda")


def test_inference_batch_defaults_to_the_device_and_never_changes_the_logits(digits_sets):
    from burnkit.engine import eval_batch_size, evaluate, predict
    model, _ = _train(digits_sets, 1)
    cpu = torch.device("cpu")
    assert eval_batch_size(cpu) == 128 and eval_batch_size(torch.device("cuda")) == 512
    clean_test = digits_sets[1].clean_test
    by_default = predict(model, clean_test, cpu)
    assert not by_default.requires_grad and by_default.grad_fn is None  # inference keeps no graph
    assert by_default.shape == (len(clean_test), 10)
    for batch in (1, 7, 128, 512, 4096):
        assert torch.allclose(predict(model, clean_test, cpu, batch_size=batch), by_default, atol=1e-5, rtol=0)
    assert evaluate(model, digits_sets[1], cpu).acc == evaluate(model, digits_sets[1], cpu, batch_size=512).acc
