"""EP: Entropy-based Pruning (Zheng et al., "Pre-activation Distributions Expose Backdoor Neurons",
NeurIPS 2022), as BackdoorBench runs it (extra-defenses §11.3; its leaderboard says "DDE").

No clean data: one batch of ``batch_size`` (256) images drawn from the record's poisoned training
set with the train transform. A backdoor neuron's pre-activation over such a batch is bimodal (the
poisoned samples fire it far more), so its distribution has a low entropy. For every ``BatchNorm2d``:

1. record, per channel, the spatial **max** of the BN input for each image (model in eval mode);
2. standardise each channel over the batch (unbiased std);
3. entropy ``H = -sum p ln p`` over bins 0.1 wide starting at the layer-**global** minimum,
   ``int((max - min) / 0.1)`` bins, open intervals (a value on a bin edge, such as the minimum
   itself, is counted in no bin), ``p`` = count / batch size;
4. zero the BN weight and bias of every channel with ``H < mean - u * std`` (per layer).

BackdoorBench draws a fresh batch at every call, so its exported model depends on the sweep that
ran before it (§11.3 pitfall); here the batch is drawn once, seeded, and serves the sweep and the
export. Files as CLP: ``ep_df.csv``/summary, ``u_step_df.csv``, ``ep_channels.csv``.

Example:
    python defense/ep.py --result_file badnet_cifar10
"""
from __future__ import annotations

from typing import ClassVar

import pandas as pd
import torch
import torch.nn as nn

from ..data import ImageSet
from ..defense import Defense, DefenseData, DefenseRun, register_defense
from ..engine import eval_mode
from ..errors import BurnError
from ..models import Classifier
from ..options import OPTIMISER_FLAGS, SCHEDULE_FLAGS
from ..results import atomic_write_text
from .clp import PruneByUConfig, log_u_sweep, outliers, prune_by_table
from .retraining import poisoned_train, poisoned_train_size

BIN_WIDTH = 0.1


def draw_batch(train: ImageSet, size: int, seed: int, run: DefenseRun | None = None):
    """``size`` samples of ``train`` in a seeded random order, with the train transform."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(len(train), generator=generator)[:size]
    device = run.device if run is not None else torch.device("cpu")
    return train.batch(positions, device, run.augment if run is not None else None, generator)


@torch.no_grad()
def bn_input_maxima(model: Classifier, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per BatchNorm2d: the spatial max of its input, ``batch x channels`` (eval mode)."""
    maxima: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=name: maxima.__setitem__(
        n, args[0].detach().amax(dim=(2, 3)).float().cpu()))
        for name, m in model.net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not handles:
        raise BurnError(f"EP prunes BatchNorm channels; model {type(model.net).__name__} has none")
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return maxima


def channel_entropies(maxima: torch.Tensor, bin_width: float = BIN_WIDTH) -> torch.Tensor:
    """EP's entropy per channel of a ``batch x channels`` matrix (see the module docstring)."""
    n = maxima.shape[0]
    std = maxima.std(0, keepdim=True)
    z = (maxima - maxima.mean(0, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))
    z = z.double()
    low, high = z.min(), z.max()
    n_bins = int((high - low) / bin_width)
    if n_bins == 0:
        return torch.zeros(maxima.shape[1], dtype=torch.float64)
    edges = low + bin_width * torch.arange(n_bins + 1, dtype=torch.float64)
    left, right = edges[:-1], edges[1:]
    inside = (z[:, :, None] > left) & (z[:, :, None] < right)  # batch x channels x bins, open intervals
    p = inside.sum(0).double() / n
    return -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(1)


def ep_channel_table(maxima: dict[str, torch.Tensor], u: float) -> pd.DataFrame:
    rows = []
    for layer, values in maxima.items():
        entropy = channel_entropies(values)
        prune = outliers(entropy, u, low=True)
        threshold = float(entropy.mean() - u * entropy.std()) if entropy.numel() > 1 else float("nan")
        rows += [{"layer": layer, "channel": k, "entropy": float(h), "threshold": threshold, "pruned": bool(p)}
                 for k, (h, p) in enumerate(zip(entropy.tolist(), prune.tolist()))]
    return pd.DataFrame(rows, columns=["layer", "channel", "entropy", "threshold", "pruned"])


def ep_prune_with(maxima: dict[str, torch.Tensor]):
    """A ``prune(net, u) -> count`` function over fixed BN-input maxima (one batch for all u)."""
    def prune(net: nn.Module, u: float) -> int:
        return prune_by_table(net, ep_channel_table(maxima, u))
    return prune


def entropy_pruning(model: Classifier, data: DefenseData, cfg: PruneByUConfig, run: DefenseRun) -> Classifier:
    train = poisoned_train(data, "EP")
    batch = draw_batch(train, cfg.batch_size, cfg.random_seed, run)
    model.to(run.device)
    maxima = bn_input_maxima(model, batch.x)
    log_u_sweep(model, cfg, run, lambda _net, u: ep_channel_table(maxima, u))
    table = ep_channel_table(maxima, cfg.u)
    atomic_write_text(run.out_dir / "ep_channels.csv", table.to_csv(index=False))
    pruned = prune_by_table(model.net, table)
    run.metrics.append({"u": cfg.u, "num_pruned": pruned, **run.evaluate(model).row()})
    run.extra_results.update({"ep_num_pruned": pruned, "ep_channels": int(len(table)), "ep_u": cfg.u,
                              "ep_batch": int(len(batch)), "ep_batch_poison": int(batch.poison.sum()),
                              "test_data_for_decisions": False})
    run.logger.info("EP: pruned %d of %d BN channels at u = %g (one batch of %d poisoned-set images)",
                    pruned, len(table), cfg.u, len(batch))
    return model


@register_defense
class EntropyPruning(Defense):
    """EP (leaderboard: DDE): prune BN channels whose pre-activation entropy over one poisoned batch is low."""

    name = "ep"
    # flags it accepts but does not read: nothing is trained
    unused_flags = ("epochs", "lr", *OPTIMISER_FLAGS, *SCHEDULE_FLAGS, "test_every", "progress")
    config_cls = PruneByUConfig
    needs_clean_subset = False
    budget_keys: ClassVar[tuple[str, ...]] = ("u", "batch_size")

    def repair(self, model, data, cfg, run):
        return entropy_pruning(model, data, cfg, run)

    def preflight(self, cfg, record, out_dir):
        poisoned_train_size(record, "EP")
