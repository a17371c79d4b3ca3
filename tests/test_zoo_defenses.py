"""Defenses on BackdoorBench's torchvision models: layers found generically, one-line refusals where
a method does not apply, memory failures as one-line errors (the full model x defense matrix is
``experiments/model_defense_matrix.py``, docs/model-defense-matrix.md)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import attack_models
from burnkit.data import ImageSet
from burnkit.datasets import dataset_info
from burnkit.defenses.anp import ANPConfig, optimize_masks
from burnkit.defenses.fp import final_linear
from burnkit.defenses.nad import attention_points
from burnkit.engine import available_memory_bytes, cpu_memory_warning, out_of_memory_as_error, predict
from burnkit.errors import BurnError
from burnkit.models import build_classifier


def _meta(name: str, size: int = 32) -> nn.Module:
    with torch.device("meta"):
        return attack_models.create_model(name, num_classes=10, image_size=size)


@pytest.mark.parametrize("name,expected", [
    ("resnet18", ["layer2", "layer3", "avgpool"]),  # layer4 is 1x1 at 32 px: one stage with avgpool
    ("densenet121", ["features.denseblock2", "features.denseblock3", "features.norm5"]),
    ("squeezenet1_0", ["features.5", "features.10", "classifier"]),  # Fire modules inside features
    ("efficientnet_b0", ["features.3", "features.5", "avgpool"]),
    ("mobilenet_v3_large", ["features.6", "features.12", "avgpool"]),
    ("convnext_tiny", ["features.3", "features.5", "avgpool"]),
    ("googlenet", ["inception3b", "inception4e", "avgpool"]),
    ("preactresnet18", ["layer3", "layer4", "avgpool"]),  # BackdoorBench's points, unchanged
])
def test_nad_points_in_torchvision_models(name, expected):
    net = _meta(name)
    points = attention_points(net, (3, 32, 32))
    assert points == expected
    modules = dict(net.named_modules())
    assert all(p in modules for p in points)


@pytest.mark.parametrize("name", ["vit_b_16", "vit_l_32"])
def test_nad_and_anp_refuse_a_vit_in_one_line(name):
    from burnkit.defenses.anp import make_noisy

    with pytest.raises(BurnError, match="NAD distils attention maps of 3 convolutional stages but VisionTransformer "
                                        "has 1 .* does not apply"):
        attention_points(_meta(name), (3, 32, 32))
    with pytest.raises(BurnError, match="ANP prunes BatchNorm channels, but model VisionTransformer has no BatchNorm2d"):
        make_noisy(_meta(name))


@pytest.mark.parametrize("name,layer,width", [("vit_b_16", "1.heads.head", 768), ("googlenet", "fc", 1024),
                                              ("convnext_tiny", "classifier.2", 768),
                                              ("mobilenet_v3_large", "classifier.3", 1280)])
def test_fp_finds_the_classification_layer(name, layer, width):
    found, linear = final_linear(_meta(name))
    assert (found, linear.in_features) == (layer, width)
    assert found == attack_models.last_layer_name(name)


def test_anp_masks_on_googlenet_skip_the_unused_aux_heads():
    """GoogLeNet's aux classifiers (kept for BackdoorBench's keys) are off the forward path: their
    BatchNorm masks get no gradient and stay 1; the others move."""
    torch.manual_seed(0)
    clf = build_classifier("googlenet", dataset_info("cifar10"))
    rng = np.random.default_rng(0)
    clean = ImageSet.from_numpy(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 8))
    cfg = ANPConfig(nb_iter=1, print_every=1, batch_size=4, anp_eps=0.4, lr=0.2)
    rows = optimize_masks(clf, clean, cfg, device=torch.device("cpu"))
    aux = [v for name, _, v in rows if name.startswith(("aux1.", "aux2."))]
    main = [v for name, _, v in rows if not name.startswith(("aux1.", "aux2."))]
    assert aux and all(v == 1.0 for v in aux)
    assert any(v < 1.0 for v in main)


class _Hungry(nn.Module):
    """Raises CUDA's out-of-memory error for batches above ``limit`` samples."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.linear = nn.Linear(3 * 4 * 4, 3)
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.linear(x.flatten(1))


def test_evaluation_halves_the_batch_until_it_fits():
    rng = np.random.default_rng(0)
    data = ImageSet.from_numpy(rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8), np.zeros(50, int))
    net = _Hungry(limit=13)
    logits = predict(net, data, torch.device("cpu"), batch_size=64)
    assert logits.shape == (50, 3)
    assert net.sizes[:4] == [50, 32, 16, 8] and set(net.sizes[4:]) == {8, 2}  # 64 -> 32 -> 16 -> 8 fits
    reference = torch.cat([net.linear(data.batch(torch.arange(i, min(i + 5, 50))).x.flatten(1)) for i in range(0, 50, 5)])
    torch.testing.assert_close(logits, reference.detach())


def test_training_out_of_memory_is_one_line_naming_the_flags():
    cfg = SimpleNamespace(batch_size=256, scan_batch_size=128, amp=False)
    with pytest.raises(BurnError) as err:
        with out_of_memory_as_error("burn on vit_l_16", torch.device("cpu"), cfg):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    assert str(err.value) == ("out of memory on cpu while running burn on vit_l_16 (--batch_size 256, "
                              "--scan_batch_size 128); lower --batch_size / --scan_batch_size")
    with pytest.raises(ValueError):  # anything else passes through untouched
        with out_of_memory_as_error("x", torch.device("cpu"), cfg):
            raise ValueError("not memory")


def test_cpu_memory_warning_when_the_weights_alone_do_not_fit(tmp_path):
    """The kernel kills a CPU process that exhausts memory without a Python error, so the warning
    comes before training: 5 copies of the parameters against MemAvailable."""
    net = nn.Linear(1000, 1000)  # 1,001,000 float32 parameters: 4,004,000 bytes, x 5 = 20,020,000
    cfg = SimpleNamespace(batch_size=8, scan_batch_size=8, lr=0.1)
    cpu = torch.device("cpu")
    assert cpu_memory_warning(net, cpu, "burn on x", cfg, available=20_020_000) is None
    assert cpu_memory_warning(net, cpu, "burn on x", cfg, available=2**30 // 1000) == (
        "burn on x needs at least 0.0 GB on the CPU (5 copies of its 0.00 GB of weights, before activations) and "
        "0.0 GB are available: if the kernel kills the process for memory, lower --batch_size / --scan_batch_size "
        "or free memory")
    assert cpu_memory_warning(net, torch.device("meta"), "x", cfg, available=1) is None  # not a CPU
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683520 kB\nMemFree:         2547000 kB\nMemAvailable:    7467000 kB\n")
    assert available_memory_bytes(meminfo) == 7467000 * 1024
    assert available_memory_bytes(tmp_path / "missing") is None


def test_state_dicts_keep_module_versions_mnasnet_needs(tmp_path):
    """torchvision's MNASNet refuses a state dict without its ``_metadata`` version; records and
    defense results keep it (as BackdoorBench's ``model.cpu().state_dict()`` does), and a state dict
    that lost it (a prefix stripped, keys renamed) is loaded with this build's versions."""
    from collections import OrderedDict

    from burnkit.models import load_bb_state_dict
    from burnkit.records import read_defense_result, write_defense_result

    torch.manual_seed(0)
    clf = build_classifier("mnasnet1_0", dataset_info("cifar10"))
    path = write_defense_result(tmp_path, "mnasnet1_0", 10, clf.bb_state_dict())
    raw = torch.load(path, weights_only=True)
    assert raw["model"]._metadata[""]["version"] == 2  # MNASNet._version
    fresh = attack_models.create_model("mnasnet1_0")
    fresh.load_state_dict(raw["model"])  # what a BackdoorBench consumer does
    bare = OrderedDict((f"module.{k}", v) for k, v in read_defense_result(path)["model"].items())  # no _metadata
    other = build_classifier("mnasnet1_0", dataset_info("cifar10"))
    load_bb_state_dict(other, bare)
    assert all(torch.equal(a, b) for a, b in zip(other.net.state_dict().values(), clf.net.state_dict().values()))


def test_burn_weight_snapshots_keep_module_versions(tmp_path):
    """BURN's checkpointed weights (its resume point and the premise check's fallback) load back
    into MNASNet, through the weights-only checkpoint too."""
    from burnkit.defenses.burn import _cpu_copy
    from burnkit.fileio import atomic_torch_save
    from burnkit.safe_load import safe_torch_load

    net = attack_models.create_model("mnasnet1_0")
    snapshot = _cpu_copy(net.state_dict())
    assert snapshot._metadata[""]["version"] == 2
    atomic_torch_save({"model": snapshot}, tmp_path / "state.pt")
    attack_models.create_model("mnasnet1_0").load_state_dict(safe_torch_load(tmp_path / "state.pt")["model"])
    with pytest.raises(ValueError, match="version"):  # what a plain dict of the same tensors does
        attack_models.create_model("mnasnet1_0").load_state_dict(dict(snapshot))


def test_twice_differentiable_mobilenet_v3_for_hypergradients():
    from burnkit.models import twice_differentiable

    torch.manual_seed(0)
    net = attack_models.create_model("mobilenet_v3_large").eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):
        g, = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), list(net.parameters())[-1])
    before = net(x).detach()
    gates = sum(isinstance(m, nn.Hardsigmoid) for m in net.modules())
    with twice_differentiable(net):
        assert gates == 8 and not any(isinstance(m, nn.Hardsigmoid) for m in net.modules())
        torch.testing.assert_close(net(x), before, rtol=0, atol=0)  # the same function
        g, = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
        second = torch.autograd.grad(g.sum(), list(net.parameters())[-1])[0]
        assert torch.isfinite(second).all()
    assert sum(isinstance(m, nn.Hardsigmoid) for m in net.modules()) == gates  # restored


def test_twice_differentiable_attention_for_hypergradients():
    """A small torchvision ViT (the zoo's architecture at toy width): the fused attention kernels
    have no second derivative; inside the block the math kernel computes the same logits and has."""
    from torchvision.models import VisionTransformer

    from burnkit.models import twice_differentiable

    torch.manual_seed(0)
    net = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=3).eval()
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    head = net.heads.head.weight

    def second_derivative():
        g, = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(g.sum(), head)[0]

    with pytest.raises(RuntimeError, match="derivative for .*scaled_dot_product.* is not implemented"):
        second_derivative()
    before = net(x).detach()
    with twice_differentiable(net):
        torch.testing.assert_close(net(x), before)
        assert torch.isfinite(second_derivative()).all()
