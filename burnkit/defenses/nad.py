"""NAD: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention
Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021), as BackdoorBench
runs it (spec §7.3).

1. Teacher: a copy of the backdoored model fine-tuned on the clean subset for ``te_epochs`` with
   cross-entropy and the configured optimiser/scheduler (``nad_te_df.csv``), or loaded from
   ``teacher_model_loc``.
2. Student: the backdoored model trained for ``te_epochs`` on the clean subset with
   ``CE + beta1*AT(l1) + beta2*AT(l2) + beta3*AT(l3)`` against the frozen teacher (``nad_df.csv``).
   The student's learning rate follows NAD's hand-written rule: ``lr`` for epochs 0-1, 0.01 up to
   epoch 19, 1e-4 afterwards (BackdoorBench's; with 10 epochs it is 0.01 throughout).

Attention map of a feature map ``f`` (N x C x H x W): ``a = sum_c |f_c|^p``, flattened over H*W and
L2-normalised per sample; ``AT(fs, ft) = mean((a(fs) - a(ft))^2)``.

Feature points, found generically (:func:`attention_points`): walk the network's top-level
children, expanding a child that is an ``nn.Sequential`` whose children change the spatial size (a
VGG-, DenseNet-, EfficientNet- or SqueezeNet-style ``features`` block) into its children; among the
modules whose output is a 4-D map, group
consecutive ones with the same spatial size into a stage and take the output of each stage's last
module; l1, l2, l3 are the last three stages. For PreActResNet-18 this gives ``layer3``, ``layer4``
and ``avgpool``, BackdoorBench's points; for the small CNN the last two conv stages and the global
pool; for VGG the last conv stage, the last max-pool and ``avgpool``. A network without three
convolutional stages (a ViT's token sequence) is refused in one line. As in BackdoorBench, a
1x1 point (the pooled features) has a constant normalised attention map, so its AT term is 0.

Unlike BackdoorBench (spec §9.3), both CSVs carry real epoch numbers. As there, ``--amp`` applies to
the teacher's fine-tuning only; the student is trained in float32.

Example:
    python defense/nad.py --result_file badnet_cifar10 --yaml_path config/defense/nad/cifar10.yaml --dataset cifar10
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import option
from ..data import Batch
from ..defense import Defense, DefenseConfig, DefenseData, DefenseRun, register_defense
from ..engine import StepContext, StepOutput, eval_mode, make_optimizer
from ..errors import BurnError
from ..models import Classifier, architecture_name, load_bb_state_dict
from ..records import read_defense_result
from ..results import MetricLog, plot_metrics
from ..safe_load import safe_torch_load

ATTENTION_EPS = 1e-6  # NAD's guard against an all-zero attention map


@dataclass
class NADConfig(DefenseConfig):
    # BackdoorBench's NAD YAMLs carry these keys without reading them (spec §7.3): accepted, unused
    YAML_COMPAT_KEYS: ClassVar[tuple[str, ...]] = ("momentum", "weight_decay")
    te_epochs: int = option(10, "epochs of the teacher fine-tuning and of the student distillation")
    epochs: int = option(100, "BackdoorBench's key; NAD trains for te_epochs", unused=True)
    batch_size: int = option(256, "batch size")
    lr: float = option(0.01, "learning rate (teacher; student epochs 0-1)")
    amp: bool = option(True, "mixed precision on CUDA")
    beta1: float = option(500.0, "weight of the AT loss at the first feature point")
    beta2: float = option(1000.0, "weight of the AT loss at the second feature point")
    beta3: float = option(1000.0, "weight of the AT loss at the third feature point")
    p: float = option(2.0, "power of the attention map")
    teacher_model_loc: str | None = option(None, "a teacher's defense_result.pt or state dict; skips teacher training")

    def validate(self) -> None:
        super().validate()
        if self.te_epochs < 0:
            raise BurnError(f"--te_epochs must be non-negative, got {self.te_epochs}")
        if self.p <= 0:
            raise BurnError(f"--p must be positive, got {self.p}")


# --------------------------------------------------------------------------- attention


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """NAD's spatial attention: ``sum_c |f_c|^p`` flattened and L2-normalised per sample.

    Shapes: features N x C x H x W -> N x (H*W).
    """
    am = features.abs().pow(p).sum(1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + ATTENTION_EPS)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT loss: mean squared difference of the two attention maps."""
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def _stage_candidates(net: nn.Module, shapes: dict[str, tuple]) -> list[tuple[str, nn.Module]]:
    """Top-level children; a top-level ``nn.Sequential`` whose children change the spatial size (a
    VGG/DenseNet/EfficientNet-style ``features`` block) is replaced by its children, while one that
    stays at one size (a ResNet ``layer3``) is kept whole, under its own name."""
    out = []
    for name, child in net.named_children():
        subs = [(f"{name}.{sub}", m) for sub, m in child.named_children()] if isinstance(child, nn.Sequential) else []
        sizes = {shapes[n][2:] for n, _ in subs if len(shapes.get(n, ())) == 4}
        out.extend(subs if len(sizes) > 1 else [(name, child)])
    return out


@torch.no_grad()
def attention_points(net: nn.Module, input_shape: tuple[int, int, int], count: int = 3) -> list[str]:
    """Names of the modules whose outputs are NAD's feature points (see the module docstring).

    Args:
        input_shape: (C, H, W) of one network input.
    """
    shapes: dict[str, tuple] = {}
    hooked = [(name, m) for name, m in net.named_modules() if name and name.count(".") <= 1]
    handles = [m.register_forward_hook(
        lambda _m, _i, o, n=name: shapes.__setitem__(n, tuple(o.shape)) if torch.is_tensor(o) else None)
        for name, m in hooked]
    try:
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with eval_mode(net):
            net(torch.zeros(2, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    candidates = _stage_candidates(net, shapes)
    stage_ends: list[str] = []
    last_hw = None
    for name, _ in candidates:
        shape = shapes.get(name)
        if shape is None or len(shape) != 4:
            continue
        if shape[2:] == last_hw:
            stage_ends[-1] = name
        else:
            stage_ends.append(name)
            last_hw = shape[2:]
    if len(stage_ends) < count:
        raise BurnError(f"NAD distils attention maps of {count} convolutional stages but {architecture_name(net)} has "
                        f"{len(stage_ends)} (4-D outputs of different spatial sizes among its top-level layers); "
                        "NAD does not apply to this model")
    return stage_ends[-count:]


class FeatureTap:
    """Records the outputs of named modules during a forward pass."""

    def __init__(self, net: nn.Module, names: list[str]):
        modules = dict(net.named_modules())
        self.names = names
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name] = output.clone()  # later in-place ops (ReLU) must not change it
        return hook

    def features(self) -> list[torch.Tensor]:
        return [self.outputs[n] for n in self.names]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def tapped(net: nn.Module, names: list[str]):
    tap = FeatureTap(net, names)
    try:
        yield tap
    finally:
        tap.close()


# --------------------------------------------------------------------------- the algorithm


def student_lr(epoch: int, base_lr: float) -> float:
    """NAD's learning-rate rule for the student (BackdoorBench keeps it)."""
    if epoch < 2:
        return base_lr
    if epoch < 20:
        return 0.01
    return 1e-4


def distillation_step(teacher: Classifier, student_tap: FeatureTap, teacher_tap: FeatureTap,
                      betas: tuple[float, float, float], p: float):
    """A step function: CE on the batch plus the weighted AT losses against the frozen teacher, in
    float32 (BackdoorBench's student loop has no AMP; ``--amp`` applies to the teacher only)."""

    def step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, ctx: StepContext) -> StepOutput:
        logits = model(batch.x)
        with torch.no_grad():
            teacher(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        for beta, fs, ft in zip(betas, student_tap.features(), teacher_tap.features()):
            loss = loss + beta * attention_loss(fs.float(), ft.float(), p)
        ctx.backward_step(loss, optimizer)
        return StepOutput(loss.detach(), logits.detach())

    return step


def load_teacher(model: Classifier, path: str) -> Classifier:
    """A copy of ``model`` with weights from a defense result or a plain state dict."""
    teacher = copy.deepcopy(model)
    raw = safe_torch_load(path, what="--teacher_model_loc")
    if isinstance(raw, dict) and "model" in raw and "model_name" in raw:
        state = read_defense_result(path)["model"]
    elif isinstance(raw, dict) and all(torch.is_tensor(v) for v in raw.values()):
        state = raw
    else:
        raise BurnError(f"--teacher_model_loc {path} holds neither a defense_result.pt nor a state dict")
    load_bb_state_dict(teacher, state, source="teacher")
    return teacher


def neural_attention_distillation(model: Classifier, data: DefenseData, cfg: NADConfig,
                                  run: DefenseRun) -> Classifier:
    c, (h, w) = data.info.channels, data.info.img_size[:2]
    points = attention_points(model.net.to(run.device), (c, h, w))
    run.logger.info("NAD feature points: %s", ", ".join(points))
    run.extra_results["nad_points"] = points
    train_cfg = cfg.train_config(epochs=cfg.te_epochs)

    if cfg.teacher_model_loc:
        teacher = load_teacher(model, cfg.teacher_model_loc)
    else:
        teacher = copy.deepcopy(model)
        teacher_log = MetricLog(run.out_dir, "nad_te")

        def on_row(row):
            teacher_log.append(row)
            teacher_log.save()

        run.fit(teacher, data.clean_subset, train_cfg, log=False, phase="teacher", on_row=on_row)
        teacher_log.finish()
        plot_metrics(teacher_log.rows, run.out_dir, prefix="nad_te_")
    teacher.to(run.device)
    for param in teacher.parameters():
        param.requires_grad_(False)

    student_cfg = replace(train_cfg, lr=student_lr(0, cfg.lr), lr_scheduler=None, amp=False)
    optimizer = make_optimizer(model.parameters(), student_cfg)

    def set_next_lr(epoch, _model, _row):
        for group in optimizer.param_groups:
            group["lr"] = student_lr(epoch + 1, cfg.lr)

    betas = (cfg.beta1, cfg.beta2, cfg.beta3)
    with tapped(model.net, points) as student_tap, tapped(teacher.net, points) as teacher_tap, \
            eval_mode(teacher):
        step = distillation_step(teacher, student_tap, teacher_tap, betas, cfg.p)
        run.fit(model, data.clean_subset, student_cfg, phase="student", step=step,
                optimizer=optimizer, epoch_end=set_next_lr)
    return model


@register_defense
class NeuralAttentionDistillation(Defense):
    """NAD: distil a fine-tuned teacher's attention into the backdoored model."""

    name = "nad"
    config_cls = NADConfig
    budget_keys = ("te_epochs",)

    def repair(self, model, data, cfg, run):
        return neural_attention_distillation(model, data, cfg, run)
