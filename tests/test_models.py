"""The model zoo: BackdoorBench's exact state-dict names and shapes (tests/data/bb-model-keys.json.gz)."""
from __future__ import annotations

import gzip
import json

import pytest
import torch

import attack_models
from attack_models import create_model, last_layer_name, list_models, min_input_size
from burnkit.datasets import dataset_info
from burnkit.errors import BurnError
from burnkit.models import build_classifier

from conftest import BB_MODEL_KEYS


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
    with torch.device("meta"):
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


# ------------------------------------------------------------------ BackdoorBench's manifest

MANIFEST = json.loads(gzip.decompress(BB_MODEL_KEYS.read_bytes()))
BUILDABLE = sorted(n for n, v in MANIFEST.items() if not n.startswith("_") and "error" not in v)
UNBUILDABLE = sorted(n for n, v in MANIFEST.items() if not n.startswith("_") and "error" in v)
SLOW = {"vit_l_16", "vit_l_32"}  # ~300M parameters at 224 px: about a minute each on 2 CPU cores


def test_manifest_is_read_and_every_name_is_in_the_zoo():
    assert len(BUILDABLE) == 27 and UNBUILDABLE == ["resnext29", "senet18"]
    assert list_models(backdoorbench=True) == BUILDABLE
    assert set(list_models(backdoorbench=False)) == {"smallcnn", "preactresnet34"}


@pytest.mark.parametrize("num_classes", ["10", "100"])
@pytest.mark.parametrize("name", BUILDABLE)
def test_keys_and_shapes_equal_backdoorbench_manifest(name, num_classes):
    with torch.device("meta"):  # shapes without allocating or initialising anything
        net = create_model(name, num_classes=int(num_classes), image_size=max(32, min_input_size(name)))
    ours = [[key, list(value.shape)] for key, value in net.state_dict().items()]
    assert ours == MANIFEST[name][num_classes]  # same names, same order, same shapes


@pytest.mark.parametrize("name", UNBUILDABLE)
def test_names_backdoorbench_cannot_build_are_refused_with_its_reason(name):
    with pytest.raises(attack_models.UnknownModelError, match=f"'{name}' cannot be built: BackdoorBench's own"):
        create_model(name)
    with pytest.raises(BurnError, match="no BackdoorBench record can name it"):
        build_classifier(name, dataset_info("cifar10"))


def _forward_names():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
            for n in list_models() if min_input_size(n) <= 32]


@pytest.mark.parametrize("name", _forward_names())
def test_every_model_runs_forward_and_backward_at_32px(name):
    torch.manual_seed(0)
    net = create_model(name, num_classes=7, in_channels=3, image_size=32)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = net(x)  # training mode: GoogLeNet/Inception return plain logits too
    assert out.shape == (2, 7)
    out.sum().backward()
    assert x.grad is not None
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert all(n.startswith(("aux1.", "aux2.", "AuxLogits.")) for n in unused), unused[:3]
    layer = last_layer_name(name)
    state = net.state_dict()
    assert f"{layer}.weight" in state and state[f"{layer}.weight"].shape[0] == 7
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 7)


@pytest.mark.parametrize("name", [n for n in list_models() if min_input_size(n) > 1])
def test_minimum_input_size_is_exact(name):
    """The declared minimum passes and one pixel less fails inside the network, so the zoo's
    up-front refusal rejects exactly the sizes the network cannot take."""
    size = min_input_size(name)
    with torch.device("meta"):
        net = create_model(name, image_size=size).eval()
        net(torch.zeros(1, 3, size, size))
        with pytest.raises(RuntimeError):
            net(torch.zeros(1, 3, size - 1, size - 1))
    with pytest.raises(attack_models.ModelInputError, match=f"at least {size}x{size} px"):
        create_model(name, image_size=size - 1)


@pytest.mark.parametrize("dataset,name,ok", [
    ("cifar10", "alexnet", False), ("tiny", "alexnet", True), ("gtsrb", "inception_v3", False),
    ("tiny", "inception_v3", False), ("mnist", "vgg19_bn", False), ("mnist", "densenet121", False),
    ("mnist", "convnext_tiny", False), ("mnist", "resnet18", True), ("mnist", "googlenet", True),
    ("mnist", "squeezenet1_0", True), ("mnist", "vit_b_32", True), ("cifar100", "vit_b_16", True)])
def test_dataset_fit_is_checked_with_a_clear_error(dataset, name, ok):
    info = dataset_info(dataset)
    if not ok:
        with pytest.raises(BurnError, match=f"model .{name}. cannot take {dataset}: .* images are {info.img_size[0]}x"):
            build_classifier(name, info)
        return
    with torch.device("meta"):
        clf = build_classifier(name, info)
        out = clf(torch.zeros(2, info.channels, *info.img_size[:2]))
    assert out.shape == (2, info.num_classes)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "gtsrb", "tiny", "mnist"])
def test_every_model_takes_every_dataset_it_can_and_refuses_the_others(dataset):
    """Shapes only (meta tensors): 32 px, 64 px and 28 px single-channel inputs."""
    info = dataset_info(dataset)
    taken = []
    for name in list_models():
        if min_input_size(name) > info.img_size[0]:
            with pytest.raises(BurnError, match=f"cannot take {dataset}"):
                build_classifier(name, info)
            continue
        with torch.device("meta"):
            clf = build_classifier(name, info)
            assert clf(torch.zeros(2, info.channels, *info.img_size[:2])).shape == (2, info.num_classes)
        taken.append(name)
    refused = {"cifar10": {"alexnet", "inception_v3"}, "tiny": {"inception_v3"},
               "mnist": {"alexnet", "inception_v3", "vgg11", "vgg16", "vgg19", "vgg19_bn", "densenet121",
                         "densenet161", "convnext_tiny"}}
    assert set(list_models()) - set(taken) == refused.get(dataset, refused["cifar10"])


def test_one_channel_adapts_only_the_stem():
    for name in ("resnet18", "googlenet", "mobilenet_v3_large", "vit_b_16", "squeezenet1_0"):
        with torch.device("meta"):
            gray = create_model(name, in_channels=1, image_size=28).state_dict()
            rgb = create_model(name, in_channels=3, image_size=28).state_dict()
        assert list(gray) == list(rgb)
        differ = [k for k in rgb if gray[k].shape != rgb[k].shape]
        assert len(differ) == 1 and gray[differ[0]].shape[1] == 1 and rgb[differ[0]].shape[1] == 3
    torch.manual_seed(0)
    assert create_model("googlenet", in_channels=1, image_size=28)(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model_fails_fast():
    with pytest.raises(attack_models.UnknownModelError, match="unknown model 'resnet19'"):
        create_model("resnet19")
