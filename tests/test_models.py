"""The model zoo: BackdoorBench's exact state-dict names and shapes (spec §5)."""
from __future__ import annotations

import pytest
import torch

import attack_models
from attack_models import create_model, last_layer_name, list_models


def _preact18_keys(num_classes: int) -> list[tuple[str, tuple]]:
    """The 102 keys of spec §5.1, enumerated from the architecture description."""
    keys = [("conv1.weight", (64, 3, 3, 3))]

    def bn(prefix, c):
        return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
                (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]

    cin = 64
    for layer, planes in zip(range(1, 5), (64, 128, 256, 512)):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys += bn(f"{p}.bn1", cin)
            keys.append((f"{p}.conv1.weight", (planes, cin, 3, 3)))
            keys += bn(f"{p}.bn2", planes)
            keys.append((f"{p}.conv2.weight", (planes, planes, 3, 3)))
            if block == 0 and layer > 1:
                keys.append((f"{p}.shortcut.0.weight", (planes, cin, 1, 1)))
            cin = planes
    keys += [("linear.weight", (num_classes, 512)), ("linear.bias", (num_classes,))]
    return keys


def test_preactresnet18_has_backdoorbench_102_keys_in_order():
    state = create_model("preactresnet18", num_classes=10).state_dict()
    expected = _preact18_keys(10)
    assert len(expected) == 102
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected
    assert state["layer1.0.bn1.num_batches_tracked"].dtype == torch.int64
    assert list(state)[99:] == ["layer4.1.conv2.weight", "linear.weight", "linear.bias"]


def test_preactresnet18_forward_32_and_64_and_one_channel():
    net = create_model("preactresnet18", num_classes=200).eval()
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 200)
    gray = create_model("preactresnet18", num_classes=10, in_channels=1).eval()
    assert gray(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert gray.state_dict()["conv1.weight"].shape == (64, 1, 3, 3)


def test_preactresnet34_block_counts():
    state = create_model("preactresnet34", num_classes=100).state_dict()
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in state if k.startswith("layer")}
    assert sorted(b for b in blocks) == sorted([f"layer1.{i}" for i in range(3)] + [f"layer2.{i}" for i in range(4)]
                                               + [f"layer3.{i}" for i in range(6)] + [f"layer4.{i}" for i in range(3)])
    assert state["linear.weight"].shape == (100, 512)


def test_vgg19_bn_has_torchvision_names():
    state = create_model("vgg19_bn", num_classes=10).state_dict()
    convs = [0, 3, 7, 10, 14, 17, 20, 23, 27, 30, 33, 36, 40, 43, 46, 49]  # spec §5.2
    for i in convs:
        assert f"features.{i}.weight" in state and f"features.{i}.bias" in state
        assert f"features.{i + 1}.running_var" in state
    assert {k for k in state if k.startswith("classifier")} == {
        "classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias",
        "classifier.6.weight", "classifier.6.bias"}
    assert state["classifier.0.weight"].shape == (4096, 25088)
    assert state["classifier.6.weight"].shape == (10, 4096)
    assert len(state) == 16 * 2 + 16 * 5 + 6


@pytest.mark.parametrize("name", list_models())
def test_every_model_runs_forward_and_backward(name):
    torch.manual_seed(0)
    net = create_model(name, num_classes=7, in_channels=3)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = net(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters() if p.requires_grad)
    layer = last_layer_name(name)
    assert f"{layer}.weight" in net.state_dict()


def test_unknown_model_fails_fast():
    with pytest.raises(attack_models.UnknownModelError, match="unknown model 'resnext29'"):
        create_model("resnext29")
