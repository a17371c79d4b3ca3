"""Behaviour of the batched DeepFool boundary attack (burnkit.boundary)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from burnkit.boundary import BoundaryResult, boundary_attack, scan


def _linear(num_classes: int, dim: int, seed: int = 0) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(dim, num_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(num_classes, dim, generator=gen))
        layer.bias.copy_(torch.randn(num_classes, generator=gen))
    return layer


def _analytic_nearest(layer: nn.Linear, x: torch.Tensor, classes: torch.Tensor | None = None):
    """Distance to, and class of, the nearest boundary of a linear classifier (paper §2.3).

    ``classes`` (n, C) restricts the search to candidate classes (column 0 = predicted class).
    """
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    logits = x.double() @ w.T + b
    k_hat = logits.argmax(1)
    dist = (logits - logits.gather(1, k_hat[:, None])).abs() / (w[None] - w[k_hat][:, None]).norm(dim=2)
    dist[torch.arange(len(x)), k_hat] = float("inf")
    if classes is not None:
        mask = torch.ones_like(dist, dtype=torch.bool)
        mask.scatter_(1, classes, False)
        dist[mask] = float("inf")
    d, k_star = dist.min(1)
    normal = (w[k_star] - w[k_hat]).norm(dim=1)
    return d, k_star, normal


def _assert_deepfool_distance(l2, d, normal, overshoot):
    """One DeepFool step lands exactly on the nearest boundary plus DeepFool's 1e-4 logit margin;
    the overshoot scales it by (1 + η). Within 1% of the analytic distance wherever the margin is
    negligible, i.e. for every sample not already within 1e-3 of its boundary."""
    l2 = l2.double() / (1 + overshoot)
    assert torch.allclose(l2, d + 1e-4 / normal, rtol=1e-4, atol=1e-6)  # fp32 iterate
    far = d > 1e-3
    assert far.float().mean() > 0.9
    assert ((l2[far] - d[far]).abs() <= 0.01 * d[far]).all()


def _small_cnn(seed: int = 0, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, num_classes))
    with torch.no_grad():  # non-trivial running statistics, so eval and train mode differ
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("overshoot", [1e-4, 0.02])
@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_linear_l2_is_analytic_distance(overshoot, num_classes):
    layer = _linear(num_classes, dim=20, seed=num_classes)
    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(1))
    res = boundary_attack(layer, x, overshoot=overshoot, candidates=10)
    d, k_star, normal = _analytic_nearest(layer, x)
    _assert_deepfool_distance(res.l2, d, normal, overshoot)
    assert torch.equal(res.adv_label, k_star)
    assert res.converged.all()
    assert torch.equal(res.iterations, torch.ones(64, dtype=torch.long))
    assert torch.equal(res.clean_label, layer(x).argmax(1))


def test_linear_with_more_classes_than_candidates_searches_top_candidates():
    layer = _linear(30, dim=16, seed=3)
    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(2))
    res = boundary_attack(layer, x, overshoot=1e-4, candidates=5)
    top5 = layer(x).topk(5, dim=1).indices
    d, k_star, normal = _analytic_nearest(layer, x, classes=top5)
    _assert_deepfool_distance(res.l2, d, normal, 1e-4)
    assert torch.equal(res.adv_label, k_star)
    assert (res.adv_label[:, None] == top5[:, 1:]).any(1).all()


def test_paper_step_rule_scales_each_step_without_deepfools_margin():
    """The BURN paper's update (§2.3) lands at (1 + η) times the exact distance on a linear classifier;
    DeepFool's reference update adds its 1e-4 logit margin before the overshoot. With a unit normal
    and distance 1 the two differ by 1.02e-4, far above float error, so each assertion fails on the
    other rule."""
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, 0.0, 0.0, 0.0], [-0.5, 0.0, 0.0, 0.0]]))  # ||w1 - w0|| = 1
        layer.bias.zero_()
    x = torch.tensor([[-1.0, 0.3, -0.2, 0.7]], dtype=torch.float64)  # f1 - f0 = 1: distance exactly 1
    paper = boundary_attack(layer.double(), x, overshoot=0.02, step_rule="step", grad_dtype=torch.float64)
    reference = boundary_attack(layer.double(), x, overshoot=0.02, step_rule="total", grad_dtype=torch.float64)
    assert paper.l2.item() == pytest.approx(1.02, abs=1e-6)
    assert reference.l2.item() == pytest.approx(1.02 * (1 + 1e-4), abs=1e-6)
    assert paper.converged.all() and reference.converged.all()


def test_every_class_search_finds_a_boundary_the_top_logits_miss():
    """Three classes; x is predicted 0 with class 1 second by logit, but the boundary with class 2 -
    the lowest logit, left out of a top-2 search - is much closer (its weight differs most)."""
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]]))
        layer.bias.copy_(torch.tensor([1.0, 0.9, -4.0]))
    x = torch.tensor([[0.1, 0.0]])  # logits 1.0, 0.9, -3.5: gap to class 1 only 0.1 but ||w1 - w0|| = 0
    every = boundary_attack(layer, x, candidates=None, overshoot=0.02)
    top2 = boundary_attack(layer, x, candidates=2, overshoot=0.02, max_iter=5)
    assert every.adv_label.tolist() == [2] and every.converged.all()
    assert every.l2.item() == pytest.approx(1.02 * (4.5 / 5 + 1e-4 / 5), rel=1e-4)  # |f2 - f0| / ||w2 - w0||
    assert not top2.converged.any()  # the top-2 search only sees the boundary it cannot cross


def test_adversarial_points_are_classified_as_adv_label():
    net = _small_cnn().eval()
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    res = boundary_attack(net, x, return_perturbation=True, max_iter=50)
    assert res.converged.all()
    with torch.no_grad():
        assert torch.equal(net(x).argmax(1), res.clean_label)
        assert torch.equal(net(x + res.perturbation).argmax(1), res.adv_label)
    assert (res.adv_label != res.clean_label).all()
    assert torch.allclose(res.l2, res.perturbation.flatten(1).norm(dim=1))


class _CountingForward:
    """Records the batch size of every forward call."""

    def __init__(self, net: nn.Module):
        self.net, self.sizes = net, []

    def __call__(self, x):
        self.sizes.append(len(x))
        return self.net(x)


def test_finished_samples_leave_the_batch():
    net = _small_cnn().eval()
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    x[:8] *= 0.05  # a few very different inputs, so iteration counts vary
    counter = _CountingForward(net)
    res = boundary_attack(counter, x, module=net, max_iter=50)
    assert res.iterations.unique().numel() > 1
    # every sample is forwarded once per step plus the check that finds it flipped; when most of the
    # batch has just finished, the samples still running get a forward pass of their own (C - 1 = 9
    # input-only backward passes, each about one forward, through the finished ones would cost more)
    expected = []
    for step in range(int(res.iterations.max()) + 1):
        running, still = int((res.iterations >= step).sum()), int((res.iterations > step).sum())
        expected.append(running)
        if still and running > still and still < 9 * (running - still):
            expected.append(still)
    assert counter.sizes == expected
    assert len(counter.sizes) > int(res.iterations.max()) + 1  # the re-forward did happen
    assert counter.sizes[0] == 32


def test_max_iter_limits_steps_and_marks_unconverged():
    net = _small_cnn().eval()
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    # bounds that allow almost no movement: nothing can flip
    res = boundary_attack(net, x, max_iter=3, lower=x - 1e-6, upper=x + 1e-6)
    assert not res.converged.any()
    assert torch.equal(res.iterations, torch.full((16,), 3))
    assert torch.equal(res.adv_label, res.clean_label)
    assert (res.l2 <= 2e-6 * (3 * 16 * 16) ** 0.5).all()


def test_unflipped_samples_report_the_nearest_boundary_class_and_clean_logits():
    layer = _linear(10, dim=20, seed=7)
    x = torch.randn(40, 20, generator=torch.Generator().manual_seed(8))
    # bounds that hold every iterate next to x: nothing flips, but each step still aims at a boundary
    res = boundary_attack(layer, x, max_iter=4, lower=x - 1e-6, upper=x + 1e-6)
    _, k_star, _ = _analytic_nearest(layer, x)
    assert not res.converged.any()
    assert torch.equal(res.adv_label, res.clean_label)  # the prediction at the last iterate
    assert torch.equal(res.nearest_label, k_star)  # the class of the nearest boundary
    assert (res.nearest_label != res.clean_label).all()
    with torch.no_grad():
        assert torch.allclose(res.clean_logits, layer(x), atol=1e-6)
    free = boundary_attack(layer, x, overshoot=1e-4)  # unbounded: one step lands past that same boundary
    assert torch.equal(free.nearest_label, k_star) and torch.equal(free.adv_label, k_star)
    none = boundary_attack(layer, x, max_iter=0)  # no step taken: the runner-up class
    assert torch.equal(none.nearest_label, layer(x).topk(2, dim=1).indices[:, 1])


def test_clipping_respects_per_channel_bounds():
    net = _small_cnn().eval()
    x = torch.rand(20, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 0.5 + 0.25
    lower = torch.tensor([0.2, 0.0, 0.1]).view(3, 1, 1)
    upper = torch.tensor([0.8, 0.9, 0.85]).view(3, 1, 1)
    res = boundary_attack(net, x, lower=lower, upper=upper, return_perturbation=True, max_iter=10,
                          overshoot=0.5)
    x_adv = x + res.perturbation
    assert (x_adv >= lower - 1e-6).all() and (x_adv <= upper + 1e-6).all()
    unclipped = boundary_attack(net, x, overshoot=0.5, max_iter=10,
                               return_perturbation=True).perturbation
    assert ((x + unclipped < lower) | (x + unclipped > upper)).any(), "bounds never active"


def test_no_parameter_grads_and_modes_restored():
    net = _small_cnn()
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a training model must stay frozen
    net[0].weight.requires_grad_(False)  # and a frozen parameter must stay frozen
    seen_modes = []
    net.register_forward_hook(lambda m, i, o: seen_modes.append(m.training))
    x = torch.rand(8, 3, 16, 16)
    boundary_attack(net, x, max_iter=5)
    assert seen_modes and not any(seen_modes)  # ran in eval mode
    assert net.training and not net[1].training and net[4].training
    assert all(p.grad is None for p in net.parameters())
    assert not net[0].weight.requires_grad and net[4].weight.requires_grad


def test_state_restored_when_forward_raises():
    net = _small_cnn().train()
    calls = []

    def failing(x):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return net(x)

    with pytest.raises(RuntimeError, match="boom"):
        boundary_attack(failing, torch.rand(4, 3, 16, 16), module=net)
    assert all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())


def test_fp32_gradients_under_autocast():
    net = _small_cnn().eval()
    x = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    dtypes = []

    def forward(z):
        out = net(z)
        dtypes.append(out.dtype)
        return out

    reference = boundary_attack(forward, x, module=net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():  # callers may also have autograd off
            assert net(x).dtype == torch.bfloat16  # autocast is really active out here
            res = boundary_attack(forward, x, module=net)
    assert set(dtypes) == {torch.float32}
    assert torch.equal(res.adv_label, reference.adv_label)
    assert torch.allclose(res.l2, reference.l2)


def test_batched_equals_per_sample():
    net = _small_cnn(seed=1).double().eval()
    x = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    together = boundary_attack(net, x, grad_dtype=torch.float64)
    alone = BoundaryResult.cat([boundary_attack(net, x[i:i + 1], grad_dtype=torch.float64)
                                for i in range(len(x))])
    assert torch.equal(together.adv_label, alone.adv_label)
    assert torch.equal(together.iterations, alone.iterations)
    assert torch.allclose(together.l2, alone.l2, rtol=1e-6)


def test_backward_modes_agree():
    net = _small_cnn(seed=2).double().eval()
    x = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    a = boundary_attack(net, x, grad_dtype=torch.float64, backward="per_class")
    b = boundary_attack(net, x, grad_dtype=torch.float64, backward="batched")
    assert torch.equal(a.adv_label, b.adv_label)
    assert torch.allclose(a.l2, b.l2, rtol=1e-9)


def test_scan_matches_direct_attack_for_tensors_and_iterables():
    net = _small_cnn(seed=3).double().eval()
    u8 = torch.randint(0, 256, (23, 3, 16, 16), dtype=torch.uint8,
                       generator=torch.Generator().manual_seed(10))
    to_float = lambda b: b.double() / 255  # noqa: E731
    direct = boundary_attack(net, to_float(u8), grad_dtype=torch.float64)
    by_tensor = scan(net, u8, batch_size=5, transform=to_float, progress=False,
                     grad_dtype=torch.float64)
    by_iter = scan(net, [(u8[:11], None), (u8[11:], None)], transform=to_float, progress=False,
                   grad_dtype=torch.float64)
    for res in (by_tensor, by_iter):
        assert len(res) == 23
        assert torch.equal(res.adv_label, direct.adv_label)
        assert torch.allclose(res.l2, direct.l2, rtol=1e-9)


def test_rejects_bad_arguments():
    net = _linear(3, 4)
    with pytest.raises(ValueError, match="backward"):
        boundary_attack(net, torch.randn(2, 4), backward="loop")
    with pytest.raises(ValueError, match="candidates"):
        boundary_attack(net, torch.randn(2, 4), candidates=1)


def test_attack_space_input_vs_pixel_scale_by_std():
    from burnkit.boundary import attack_space
    from burnkit.models import Classifier

    clf = Classifier(_small_cnn(seed=4).double(), mean=(0.4, 0.5, 0.6), std=(0.5, 0.5, 0.5)).eval()
    clf.mean, clf.std = clf.mean.double(), clf.std.double()
    u8 = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(11))
    results = {}
    for space in ("input", "pixel"):
        forward, transform, lower, upper = attack_space(clf, space)
        x = transform(u8).double()
        results[space] = boundary_attack(forward, x, module=clf, lower=lower, upper=upper,
                                         grad_dtype=torch.float64, return_perturbation=True)
        x_adv = x + results[space].perturbation
        low = torch.as_tensor(lower, dtype=torch.float64)
        assert (x_adv >= low - 1e-9).all() and (x_adv <= torch.as_tensor(upper, dtype=torch.float64) + 1e-9).all()
    # normalisation with one std is a uniform scaling: same iterates, distances scale by 1/std
    assert torch.equal(results["input"].adv_label, results["pixel"].adv_label)
    assert torch.allclose(results["input"].l2 * 0.5, results["pixel"].l2, rtol=1e-5)
    with pytest.raises(ValueError, match="space"):
        attack_space(clf, "latent")
