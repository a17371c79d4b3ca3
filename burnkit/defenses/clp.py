"""CLP: Channel Lipschitzness-based Pruning (Zheng et al., "Data-Free Backdoor Removal Based on
Channel Lipschitzness", ECCV 2022), as BackdoorBench runs it (extra-defenses §11.2). Data-free.

Backdoor channels amplify a small trigger into a large activation, so their upper bound of the
channel Lipschitz constant (UCLC) is large. Every ``BatchNorm2d`` is paired with the most recently
*registered* ``Conv2d`` (``named_modules()`` order, as BackdoorBench pairs them: in PreAct-ResNet
``layerN.1.bn1`` meets the previous block's shortcut conv). For channel k of that pair::

    UCLC_k = sigma_max(W_k reshaped to in x (kh * kw)) * |gamma_k / sqrt(running_var_k)|   (no eps)

and the BN weight **and** bias of every channel with UCLC_k > mean + u * std (per layer, unbiased
std) are zeroed. The exported model uses the fixed ``u``; a sweep over ``linspace(u_min, u_max,
u_num)`` prunes copies only to log test metrics (``u_step_df.csv``; nothing is chosen from it).

Files: ``clp_df.csv`` / ``clp_df_summary.csv`` (the exported model's metrics), ``u_step_df.csv`` (+
summary and plots), ``clp_channels.csv`` (every channel's UCLC, its layer's threshold, pruned or not).

Example:
    python defense/clp.py --result_file badnet_cifar10
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..config import option
from ..defense import Defense, DefenseConfig, DefenseData, DefenseRun, register_defense
from ..errors import BurnError
from ..models import Classifier
from ..options import OPTIMISER_FLAGS, SCHEDULE_FLAGS
from ..results import MetricLog, atomic_write_text, plot_metrics

@dataclass
class PruneByUConfig(DefenseConfig):
    """The keys CLP and EP share: the pruning threshold ``u`` and the logged sweep over ``u``."""

    YAML_COMPAT_KEYS: ClassVar[tuple[str, ...]] = ("data_root", "seed", "poison_rate", "target_type", "target_label",
                                                   "trigger_type", "num_classes", "input_height", "input_width",
                                                   "input_channel")
    u: float = option(3.0, "threshold: prune channels beyond mean + u * std of their layer", low=0)
    u_min: float = option(0.0, "smallest u of the logged sweep", low=0)
    u_max: float = option(10.0, "largest u of the logged sweep", low=0)
    u_num: int = option(21, "points of the logged sweep (0: no sweep; BackdoorBench parses it as a float)", low=0)
    batch_size: int = option(256, "EP: the number of poisoned training images in its one batch")
    amp: bool = option(False, "mixed precision on CUDA for scoring")

    def validate(self) -> None:
        super().validate()
        if self.u_num and self.u_max < self.u_min:
            raise BurnError(f"--u_max ({self.u_max}) must not be below --u_min ({self.u_min})")


# --------------------------------------------------------------------------- the bound


def conv_bn_pairs(net: nn.Module) -> list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]]:
    """(conv name, conv, bn name, bn) for every BatchNorm2d that follows a registered Conv2d with as
    many output channels as the BN has features (``named_modules()`` order)."""
    pairs, conv = [], None
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = (name, module)
        elif isinstance(module, nn.BatchNorm2d) and conv is not None and conv[1].out_channels == module.num_features:
            pairs.append((conv[0], conv[1], name, module))
    return pairs


@torch.no_grad()
def channel_lipschitz_bounds(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC per output channel: the spectral norm of the channel's kernel (``in x kh*kw``) times
    ``|gamma / sqrt(running_var)|`` (BackdoorBench adds no eps)."""
    weight = conv.weight.detach().float().cpu()
    kernels = weight.reshape(weight.shape[0], weight.shape[1], -1)
    spectral = torch.linalg.matrix_norm(kernels, ord=2)
    scale = (bn.weight.detach().float().cpu() / bn.running_var.detach().float().cpu().sqrt()).abs()
    return spectral * scale


def outliers(values: torch.Tensor, u: float, low: bool = False) -> torch.Tensor:
    """``values > mean + u * std`` (``low``: ``values < mean - u * std``) with the unbiased std of the
    layer; nothing is an outlier in a one-channel layer (its std is undefined)."""
    if values.numel() < 2:
        return torch.zeros_like(values, dtype=torch.bool)
    mean, std = values.mean(), values.std()
    return values < mean - u * std if low else values > mean + u * std


@torch.no_grad()
def zero_bn_channels(bn: nn.BatchNorm2d, channels: torch.Tensor) -> None:
    """Switch channels off: BN weight and bias 0, so the channel outputs 0 whatever its input."""
    idx = torch.as_tensor(channels).to(bn.weight.device)
    bn.weight[idx] = 0.0
    bn.bias[idx] = 0.0


def clp_channel_table(net: nn.Module, u: float) -> pd.DataFrame:
    """One row per channel: layer, conv, channel, UCLC, the layer's threshold, pruned."""
    rows = []
    for conv_name, conv, bn_name, bn in conv_bn_pairs(net):
        bounds = channel_lipschitz_bounds(conv, bn)
        prune = outliers(bounds, u)
        threshold = float(bounds.mean() + u * bounds.std()) if bounds.numel() > 1 else float("nan")
        rows += [{"layer": bn_name, "conv": conv_name, "channel": k, "uclc": float(v), "threshold": threshold,
                  "pruned": bool(p)} for k, (v, p) in enumerate(zip(bounds.tolist(), prune.tolist()))]
    return pd.DataFrame(rows, columns=["layer", "conv", "channel", "uclc", "threshold", "pruned"])


def prune_by_table(net: nn.Module, table: pd.DataFrame) -> int:
    """Switch off the channels a CLP/EP channel table marks ``pruned``; returns their number."""
    modules = dict(net.named_modules())
    chosen = table[table["pruned"]]
    for layer, rows in chosen.groupby("layer"):
        zero_bn_channels(modules[layer], torch.tensor(rows["channel"].tolist()))
    return int(len(chosen))


def clp_prune(net: nn.Module, u: float) -> int:
    """CLP on ``net`` in place; returns the number of channels pruned."""
    if not conv_bn_pairs(net):
        raise BurnError(f"CLP prunes BatchNorm channels that follow a convolution; {type(net).__name__} has none")
    return prune_by_table(net, clp_channel_table(net, u))


# --------------------------------------------------------------------------- u sweep (shared with EP)


def sweep_values(cfg: PruneByUConfig) -> list[float]:
    return [float(v) for v in np.linspace(cfg.u_min, cfg.u_max, cfg.u_num)] if cfg.u_num else []


def log_u_sweep(model: Classifier, cfg: PruneByUConfig, run: DefenseRun,
                channel_table: Callable[[nn.Module, float], pd.DataFrame]) -> list[dict]:
    """Prune a copy of ``model`` at every sweep ``u`` and score it (``u_step_df.csv``). For the log
    only, as in BackdoorBench: nothing is chosen from these test metrics. A ``u`` that prunes the
    same channels as an earlier one (large ``u`` often prunes nothing) reuses that model's scores."""
    log = MetricLog(run.out_dir, "u_step")
    scored: dict[frozenset, dict] = {}
    with run.timed("u_sweep"):
        for u in sweep_values(cfg):
            table = channel_table(model.net, u)
            key = frozenset(map(tuple, table.loc[table["pruned"], ["layer", "channel"]].values.tolist()))
            if key not in scored:
                if not key and run.before is not None:
                    scored[key] = run.before.row()  # nothing pruned: the attacked model
                else:
                    work = copy.deepcopy(model)
                    prune_by_table(work.net, table)
                    scored[key] = run.evaluate(work).row()
            log.append({"u": u, "num_pruned": len(key), **scored[key]})
            log.save()
    if log.rows:
        log.finish()
        plot_metrics(log.rows, run.out_dir, prefix="u_step_", x_key="u")
    return log.rows


def clp(model: Classifier, data: DefenseData, cfg: PruneByUConfig, run: DefenseRun) -> Classifier:
    if not conv_bn_pairs(model.net):
        raise BurnError(f"CLP prunes BatchNorm channels that follow a convolution; {type(model.net).__name__} has none")
    log_u_sweep(model, cfg, run, clp_channel_table)
    table = clp_channel_table(model.net, cfg.u)
    atomic_write_text(run.out_dir / "clp_channels.csv", table.to_csv(index=False))
    pruned = prune_by_table(model.net, table)
    run.metrics.append({"u": cfg.u, "num_pruned": pruned, **run.evaluate(model).row()})
    run.extra_results.update({"clp_num_pruned": pruned, "clp_channels": int(len(table)), "clp_u": cfg.u,
                              "test_data_for_decisions": False})
    run.logger.info("CLP: pruned %d of %d BN channels at u = %g", pruned, len(table), cfg.u)
    return model


@register_defense
class ChannelLipschitzPruning(Defense):
    """CLP: prune the channels with the largest upper bound of their Lipschitz constant (data-free)."""

    name = "clp"
    # flags it accepts but does not read: CLP is data-free, nothing is trained or batched
    unused_flags = ("epochs", "lr", *OPTIMISER_FLAGS, *SCHEDULE_FLAGS, "batch_size", "test_every", "progress")
    config_cls = PruneByUConfig
    needs_clean_subset = False
    budget_keys: ClassVar[tuple[str, ...]] = ("u",)

    def repair(self, model, data, cfg, run):
        return clp(model, data, cfg, run)
