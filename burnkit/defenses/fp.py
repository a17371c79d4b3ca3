"""FP: Fine-Pruning (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID 2018), as BackdoorBench runs it (spec §7.2).

1. Average the input features of the network's final ``nn.Linear`` over the clean subset (eval
   mode, one pass with BackdoorBench's train transform: random crop and flip) and sort them by mean
   activation, ascending.
2. Prune in steps of ``ceil(n_features * once_prune_ratio)``: step k removes the input columns of
   the final linear layer for exactly the ``k * step`` least active features. Stop at the first step
   whose relative clean-accuracy drop ``|acc - acc0| / acc0`` reaches ``acc_ratio``. That step is
   rejected; the previous one is kept.
3. Fine-tune the accepted pruned network on the clean subset for ``epochs`` (pruned columns stay
   zero) and save it with the mask folded into a plain ``weight`` (no ``weight_orig``/
   ``weight_mask``), so the state dict loads strictly into a fresh model.

**Which accuracy decides the stop** (``--select_on``): by default (``heldout``) the accuracy on a
held-out share ``--heldout_ratio`` (10 %) of the defender's clean subset, which is then left out of
the activation ranking, and only a *fall* of the held-out accuracy counts (BackdoorBench's rule takes
the absolute change, so on its 10,000 test images a rise ends the sweep too; on a few dozen held-out
images one sample moves the accuracy by several percent). The held-out samples join the fine-tuning
set once the decision is made, so fine-tuning uses the whole subset as in BackdoorBench. ``--select_on test`` reproduces BackdoorBench,
which stops on the clean *test* accuracy. Every step's test ACC/ASR/RA is logged either way
(``prune_log.csv``; ``heldout_acc`` is added with a held-out set).

Unlike BackdoorBench (spec §9.3) exactly ``num_pruned`` features are pruned (not ``num_pruned-1``),
the rejected step does not leak into the saved model, and the logged index set is the one used;
``--bb_prune_quirks true`` prunes as BackdoorBench's code does (``num_pruned-1`` per step, and the
model is fine-tuned with the pruning of the last scored step, the rejected one if the sweep stopped).
The final linear layer is found generically (the last ``nn.Linear`` in module order whose output
is the network's output); for PreActResNet and the small CNN its input is the pooled last-stage
feature vector, exactly BackdoorBench's hook. For VGG, BackdoorBench hooks the 25088-wide input
of the whole ``classifier`` block instead; here the 4096 inputs of ``classifier.6`` are pruned.

Since pruning only touches the final layer, the sweep scores each step from the cached
penultimate features (the same logits as a full forward pass, far cheaper).

Files (``record/<result_file>/defense/fp/``): ``prune_log.csv`` (+ summary, ``prune_log_plot.jpg``),
``finetune_df.csv`` and ``fp_df.csv`` (fine-tuning epochs), ``index.txt``, ``defense_result.pt``.

Example:
    python defense/fp.py --result_file badnet_cifar10 --yaml_path config/defense/fp/cifar10.yaml --dataset cifar10
"""
from __future__ import annotations

import contextlib
import math
import shutil
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import option
from ..data import Augment, ImageSet
from ..defense import (Defense, DefenseData, DefenseRun, SelectionConfig, register_defense,
                       split_heldout)
from ..engine import eval_mode, iterate
from ..errors import BurnError
from ..metrics import accuracy
from ..models import Classifier
from ..network_surgery import final_linear
from ..results import MetricLog, atomic_write_text


@dataclass
class FinePruningConfig(SelectionConfig):
    # BackdoorBench's FP YAMLs carry these keys without reading them (spec §7.2): accepted, unused
    YAML_COMPAT_KEYS: ClassVar[tuple[str, ...]] = ("poison_rate", "target_type", "target_label", "trigger_type")
    epochs: int = option(100, "fine-tuning epochs after pruning")
    batch_size: int = option(256, "batch size")
    lr: float = option(0.01, "fine-tuning learning rate")
    amp: bool = option(True, "mixed precision on CUDA")
    acc_ratio: float = option(0.1, "stop pruning once the relative clean-accuracy drop reaches this")
    once_prune_ratio: float = option(0.01, "share of the final layer's input features pruned per step")
    bb_prune_quirks: bool = option(False, "prune as BackdoorBench's code does: num_pruned-1 features per step, and "
                                          "fine-tune the model with the last scored (rejected) step's pruning")

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.once_prune_ratio <= 1.0:
            raise BurnError(f"--once_prune_ratio must be in (0, 1], got {self.once_prune_ratio}")
        if self.acc_ratio <= 0:
            raise BurnError(f"--acc_ratio must be positive, got {self.acc_ratio}")


# --------------------------------------------------------------------------- the final layer


@torch.no_grad()
def final_layer_inputs(model: Classifier, imageset: ImageSet, device: torch.device,
                       batch_size: int = 512, augment: Augment | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the final linear layer and the model's logits for every sample (eval mode), of the
    images as they are or, with ``augment``, of one augmented draw of each (``generator``).

    Raises BurnError if the final linear layer's output is not the network's output, because
    pruning its inputs would then not determine the logits.
    """
    _, linear = final_linear(model.net, "FP")
    captured: list[torch.Tensor] = []
    handle = linear.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().flatten(1)))
    feats, logits = [], []
    model.to(device)
    try:
        with eval_mode(model):
            for batch in iterate(imageset, batch_size, device, augment=augment, generator=generator):
                captured.clear()
                out = model(batch.x)
                feats.append(captured[-1].float().cpu())
                logits.append(out.float().cpu())
    finally:
        handle.remove()
    feats_t, logits_t = torch.cat(feats), torch.cat(logits)
    direct = F.linear(feats_t, linear.weight.detach().float().cpu(),
                      None if linear.bias is None else linear.bias.detach().float().cpu())
    if not torch.allclose(direct, logits_t, rtol=1e-3, atol=1e-3):
        raise BurnError("FP needs the final nn.Linear to produce the network's logits; this model "
                        "post-processes them, so FP cannot prune it")
    return feats_t, logits_t


def mean_activation_order(features: torch.Tensor) -> torch.Tensor:
    """Feature indices sorted by mean activation over the samples, ascending (least active first)."""
    return torch.argsort(features.mean(0), stable=True)


def prune_mask(order: torch.Tensor, num_pruned: int, n_features: int, quirks: bool = False) -> torch.Tensor:
    """A float mask over the final layer's inputs: 0 for the first ``num_pruned`` of ``order``
    (``num_pruned - 1`` with BackdoorBench's ``quirks``)."""
    mask = torch.ones(n_features)
    mask[order[:max(0, num_pruned - 1) if quirks else num_pruned]] = 0.0
    return mask


def pruned_logits(features: torch.Tensor, linear: nn.Linear, mask: torch.Tensor) -> torch.Tensor:
    """Logits of the final layer with the masked input columns removed: ``x @ (W * mask).T + b``."""
    weight = linear.weight.detach().float().cpu() * mask[None, :]
    bias = None if linear.bias is None else linear.bias.detach().float().cpu()
    return F.linear(features, weight, bias)


def fold_mask(linear: nn.Linear, mask: torch.Tensor) -> None:
    """Zero the pruned input columns of ``linear`` in place (the saved weight is plain)."""
    with torch.no_grad():
        linear.weight.mul_(mask.to(linear.weight.device, linear.weight.dtype)[None, :])


@contextlib.contextmanager
def frozen_columns(linear: nn.Linear, mask: torch.Tensor):
    """Keep the pruned columns of ``linear`` at zero while training: their gradient is masked,
    and with a zero weight neither weight decay nor momentum can move them."""
    fold_mask(linear, mask)
    keep = mask.to(linear.weight.device, linear.weight.dtype)[None, :]
    handle = linear.weight.register_hook(lambda grad: grad * keep.to(grad.dtype))
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------- the algorithm


def relative_drop(acc: float, acc0: float, two_sided: bool) -> float:
    """``(acc0 - acc) / acc0``; BackdoorBench's rule (``two_sided``) takes its absolute value, so a
    *rise* of the clean test accuracy also ends its sweep. On a small held-out set one or two
    samples move the accuracy by several percent either way, so there only a fall counts."""
    change = (acc0 - acc) / acc0
    return abs(change) if two_sided else change


@dataclass
class PruneStep:
    num_pruned: int
    acc: float | None
    asr: float | None
    ra: float | None
    heldout_acc: float | None = None


def prune_sweep(features_clean: torch.Tensor, features_bd: torch.Tensor, data: DefenseData,
                linear: nn.Linear, order: torch.Tensor, cfg: FinePruningConfig,
                heldout: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[list[PruneStep], int]:
    """Score pruning steps until the deciding clean accuracy drops by ``acc_ratio`` (relative).

    The deciding accuracy is the held-out one when ``heldout`` (features, labels) is given, else
    the clean test accuracy (BackdoorBench). Returns all scored steps (the last one may be the
    rejected step) and the accepted count.
    """
    n = len(order)
    step = max(1, math.ceil(n * cfg.once_prune_ratio))
    steps: list[PruneStep] = []
    acc0 = None
    accepted = 0
    for num_pruned in range(0, n, step):
        mask = prune_mask(order, num_pruned, n, cfg.bb_prune_quirks)
        preds = pruned_logits(features_clean, linear, mask).argmax(1)
        acc = accuracy(preds, data.clean_test.labels)
        asr = ra = heldout_acc = None
        if len(data.bd_test):
            bd_preds = pruned_logits(features_bd, linear, mask).argmax(1)
            asr = accuracy(bd_preds, data.bd_test.labels)
            ra = accuracy(bd_preds, data.bd_test.original_labels)
        if heldout is not None:
            heldout_acc = accuracy(pruned_logits(heldout[0], linear, mask).argmax(1), heldout[1])
        steps.append(PruneStep(num_pruned, acc, asr, ra, heldout_acc))
        deciding = acc if heldout is None else heldout_acc
        if acc0 is None:
            acc0 = deciding
        if acc0 and relative_drop(deciding, acc0, two_sided=heldout is None) >= cfg.acc_ratio:
            break
        accepted = num_pruned
    return steps, accepted


def fine_prune(model: Classifier, data: DefenseData, cfg: FinePruningConfig, run: DefenseRun) -> Classifier:
    layer_name, linear = final_linear(model.net, "FP")
    rank_set, heldout = data.clean_subset, None
    if cfg.select_on == "heldout":
        rank_set, heldout = split_heldout(data.clean_subset, cfg.heldout_ratio, cfg.random_seed)
    run.record_decision(cfg.select_on, len(heldout) if heldout is not None else 0)
    with run.timed("activations"):
        generator = torch.Generator().manual_seed(cfg.random_seed)
        subset_feats, _ = final_layer_inputs(model, rank_set, run.device, augment=run.augment, generator=generator)
        clean_feats, _ = final_layer_inputs(model, data.clean_test, run.device)
        bd_feats, _ = final_layer_inputs(model, data.bd_test, run.device)
        heldout_feats = None
        if heldout is not None:
            heldout_feats = (final_layer_inputs(model, heldout, run.device)[0], heldout.labels.cpu())
    order = mean_activation_order(subset_feats)
    n = len(order)
    with run.timed("prune"):
        steps, accepted = prune_sweep(clean_feats, bd_feats, data, linear, order, cfg, heldout_feats)
    run.logger.info("FP: %s has %d input features; %d steps scored; %d pruned (accepted on %s)",
                    layer_name, n, len(steps), accepted,
                    f"{len(heldout)} held-out clean samples" if heldout is not None else "the clean test set")
    write_prune_log(run, steps, n, with_heldout=heldout is not None)
    # BackdoorBench prunes in place, so its model keeps the last scored step's mask, rejected or not
    kept = max(0, steps[-1].num_pruned - 1) if cfg.bb_prune_quirks else accepted
    pruned_idx = order[:kept]
    np.savetxt(run.checkpoint_dir / "pruned_feature_index.txt", pruned_idx.numpy(), fmt="%d")
    run.extra_results.update({"fp_layer": layer_name, "fp_features": n, "fp_num_pruned": int(kept)})

    mask = prune_mask(order, kept, n)
    if cfg.epochs > 0:
        with frozen_columns(linear, mask):
            result = run.fit(model, data.clean_subset, cfg.train_config(), phase="finetune",
                             attack_columns=True)
        finetune_log = MetricLog(run.out_dir, "finetune")
        finetune_log.extend(result.rows)
        finetune_log.finish()
    else:
        fold_mask(linear, mask)
    # BackdoorBench's FP keeps index.txt next to its results (spec §3.7); this copy is the set used.
    shutil.copyfile(run.log_dir / "index.txt", run.out_dir / "index.txt")
    return model


def write_prune_log(run: DefenseRun, steps: list[PruneStep], n_features: int, with_heldout: bool) -> None:
    """``prune_log.csv``: BackdoorBench's columns, and ``heldout_acc`` when a held-out set decided."""
    rows = MetricLog(run.out_dir, "prune_log")
    for i, s in enumerate(steps):
        rows.append({"epoch": i, "num_pruned": s.num_pruned, "all_filter_num": n_features,
                     "test_acc": s.acc, "test_asr": s.asr, "test_ra": s.ra,
                     **({"heldout_acc": s.heldout_acc} if with_heldout else {})})
    # BackdoorBench's names: prune_log.csv / prune_log_summary.csv (no "_df")
    atomic_write_text(run.out_dir / "prune_log.csv", rows.frame().to_csv())
    atomic_write_text(run.out_dir / "prune_log_summary.csv", rows.summary().to_csv())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [s.num_pruned for s in steps]
    for key, label in (("acc", "test_acc"), ("asr", "test_asr"), ("ra", "test_ra")):
        ys = [getattr(s, key) for s in steps]
        if all(v is not None for v in ys):
            ax.plot(x, ys, marker=".", label=label)
    ax.set_xlabel(f"pruned features (of {n_features})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run.out_dir / "prune_log_plot.jpg", dpi=100)
    plt.close(fig)


@register_defense
class FinePruning(Defense):
    """FP: prune the least active final-layer input features, then fine-tune."""

    name = "fp"
    config_cls = FinePruningConfig
    budget_keys = ("epochs",)

    def repair(self, model, data, cfg, run):
        return fine_prune(model, data, cfg, run)
