"""ANP: Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Perturbations Purify
Backdoored Deep Neural Networks", NeurIPS 2021), as BackdoorBench runs it (spec §7.4).

1. Every ``nn.BatchNorm2d`` of a copy of the backdoored network becomes a
   :class:`NoisyBatchNorm2d`: channel c gets a mask ``m_c`` (init 1) and noises ``eps_w, eps_b``.
   Perturbed, the channel uses ``gamma*(m + eps_w)`` and ``beta*(1 + eps_b)``; clean, ``gamma*m``
   and ``beta``.
2. For ``ceil(nb_iter / print_every)`` rounds of ``print_every`` batches drawn with replacement
   from the clean subset (train mode, so BN uses batch statistics): draw the noises uniformly in
   ``[-anp_eps, anp_eps]``, take ``anp_steps`` signed-gradient ascent steps on them (step
   ``anp_eps/anp_steps``, no re-clipping), then one SGD step (lr ``lr``, momentum 0.9) on the masks
   for ``anp_alpha*CE(clean) + (1-anp_alpha)*CE(perturbed)``, and clip the masks to [0, 1].
3. Write every mask value (4 decimals) to ``checkpoint/mask_values.txt``; prune by those values.
4. On the original model, sweep thresholds ``0, pruning_step, ..., pruning_max``: at each, zero the
   BN weight gamma (not beta) of every channel whose mask is <= the threshold, and score the model
   (``threshold_df.csv``). ``pruning_by number`` sweeps counts ``0 .. pruning_number`` of the
   lowest-mask channels instead (``number_df.csv``).
5. Choose the model (``--select_on``). By default (``heldout``) a share ``--heldout_ratio`` (10 %)
   of the defender's clean subset is kept out of the mask optimisation, and the most-pruned step
   whose *held-out* accuracy has fallen by less than ``acc_ratio`` (relative; a rise does not count)
   is kept (the unpruned model if none): no test sample is read for the decision, and the test sets are scored only every
   ``--test_every`` sweep steps and for the kept model. ``--select_on test`` reproduces
   BackdoorBench: every step is scored, and the lowest-ASR step whose relative clean-*test*
   accuracy drop is below ``acc_ratio`` is kept (the unpruned model if none beats its ASR). The kept
   model is saved; its metrics are ``anp_df.csv``.

BatchNorms are found generically (every ``nn.BatchNorm2d``), so every zoo model with BN works;
models without BN (``vgg19``) are refused with a clear error. The sweep CSV carries an ``epoch``
column (the sweep step) besides its threshold/number key; the summary CSV is the usual
``last``/``valid_max``/``exist_nan_value`` table.

Example:
    python defense/anp.py --result_file badnet_cifar10 --yaml_path config/defense/anp/cifar10.yaml --dataset cifar10
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import option
from ..data import ImageSet
from ..defense import Defense, DefenseData, DefenseRun, SelectionConfig, register_defense, split_heldout
from ..engine import Metrics, eval_mode, predict, test_due
from ..errors import BurnError
from ..models import Classifier, architecture_name
from ..options import OPTIMISER_FLAGS, SCHEDULE_FLAGS
from ..metrics import accuracy
from ..results import NOT_SCORED, MetricLog, atomic_write_text, plot_metrics


@dataclass
class ANPConfig(SelectionConfig):
    lr: float = option(0.01, "learning rate of the mask optimiser (SGD, momentum 0.9)")
    batch_size: int = option(256, "batch size of the mask optimisation")
    amp: bool = option(False, "mixed precision on CUDA for scoring (BackdoorBench's ANP forces False)")
    nb_iter: int = option(2000, "mask optimisation iterations (rounded up to whole rounds)")
    print_every: int = option(500, "batches per round (one progress line and log entry per round)")
    anp_eps: float = option(0.4, "noise bound of the adversarial neuron perturbation")
    anp_steps: int = option(1, "signed-gradient ascent steps on the noise per batch")
    anp_alpha: float = option(0.2, "weight of the clean loss (1 - anp_alpha weighs the perturbed loss)")
    pruning_by: str = option("threshold", "threshold or number", choices=("threshold", "number"))
    pruning_max: float = option(0.90, "largest mask threshold of the sweep")
    pruning_step: float = option(0.05, "threshold step (for 'number': share of pruning_number per step)")
    pruning_number: int | None = option(None, "largest number of channels pruned ('number' sweep)")
    acc_ratio: float = option(0.1, "largest allowed relative clean-accuracy drop of the kept model")

    def validate(self) -> None:
        super().validate()
        if self.pruning_by not in ("threshold", "number"):
            raise BurnError(f"--pruning_by must be threshold or number, got {self.pruning_by!r}")
        if self.pruning_by == "number" and (self.pruning_number is None or self.pruning_number < 0):
            raise BurnError("--pruning_by number needs --pruning_number N (channels to prune at most)")
        if self.pruning_step <= 0:
            raise BurnError(f"--pruning_step must be positive, got {self.pruning_step}")
        for key in ("nb_iter", "print_every", "anp_steps"):
            if getattr(self, key) <= 0:
                raise BurnError(f"--{key} must be positive, got {getattr(self, key)}")
        if self.anp_eps < 0 or not 0.0 <= self.anp_alpha <= 1.0:
            raise BurnError("--anp_eps must be >= 0 and --anp_alpha in [0, 1]")


# --------------------------------------------------------------------------- noisy BatchNorm


class NoisyBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose channels carry ANP's mask and adversarial noises."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.neuron_mask = nn.Parameter(torch.ones(num_features))
        self.neuron_noise = nn.Parameter(torch.zeros(num_features))
        self.neuron_noise_bias = nn.Parameter(torch.zeros(num_features))
        self.perturbed = False

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "NoisyBatchNorm2d":
        if not bn.affine:
            raise BurnError("ANP prunes BatchNorm weights, but this model has a BatchNorm2d without affine weights")
        noisy = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        noisy.load_state_dict(bn.state_dict(), strict=False)
        noisy.train(bn.training)
        return noisy.to(bn.weight.device)

    @torch.no_grad()
    def draw_noise(self, eps: float, generator: torch.Generator | None = None) -> None:
        """Noises uniform in [-eps, eps] (drawn on the CPU from ``generator``)."""
        for noise in (self.neuron_noise, self.neuron_noise_bias):
            fresh = torch.rand(noise.shape, generator=generator) * (2 * eps) - eps
            noise.copy_(fresh.to(noise.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perturbed:
            weight = self.weight * (self.neuron_mask + self.neuron_noise)
            bias = self.bias * (1.0 + self.neuron_noise_bias)
        else:
            weight = self.weight * self.neuron_mask
            bias = self.bias
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        return F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                            self.running_var if not self.training or self.track_running_stats else None,
                            weight, bias, use_batch_stats, momentum, self.eps)


def batchnorm_layers(net: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BatchNorm2d of ``net`` (module order), with its name."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]


def make_noisy(net: nn.Module) -> list[tuple[str, NoisyBatchNorm2d]]:
    """Replace every BatchNorm2d of ``net`` in place by a NoisyBatchNorm2d with the same state."""
    layers = batchnorm_layers(net)
    if not layers:
        raise BurnError(f"ANP prunes BatchNorm channels, but model {architecture_name(net)} has no BatchNorm2d; "
                        "use another defense for this model")
    noisy = []
    for name, bn in layers:
        parent_name, _, attr = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        replacement = NoisyBatchNorm2d.from_batchnorm(bn)
        setattr(parent, attr, replacement)
        noisy.append((name, replacement))
    return noisy


def set_perturbed(layers, on: bool) -> None:
    for _, layer in layers:
        layer.perturbed = on


# --------------------------------------------------------------------------- mask optimisation


def optimize_masks(model: Classifier, clean: ImageSet, cfg: ANPConfig, run: DefenseRun | None = None,
                   device: torch.device | None = None) -> list[tuple[str, int, float]]:
    """ANP's mask optimisation on a noisy copy of ``model``; returns (layer, channel, mask) rows."""
    device = device or run.device
    noisy_model = copy.deepcopy(model).to(device)
    layers = make_noisy(noisy_model.net)
    for param in noisy_model.parameters():
        param.requires_grad_(False)
    masks = [layer.neuron_mask for _, layer in layers]
    noises = [p for _, layer in layers for p in (layer.neuron_noise, layer.neuron_noise_bias)]
    for p in masks + noises:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(masks, lr=cfg.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(cfg.random_seed)
    augment = run.augment if run is not None else None
    rounds = math.ceil(cfg.nb_iter / cfg.print_every)
    noise_lr = cfg.anp_eps / cfg.anp_steps
    with eval_mode(noisy_model, train=True):
        for rnd in range(rounds):
            total_loss, correct, seen = 0.0, 0, 0
            draws = torch.randint(0, len(clean), (cfg.print_every, cfg.batch_size), generator=generator)
            for positions in draws:
                batch = clean.batch(positions, device, augment, generator)
                if cfg.anp_eps > 0:
                    for _, layer in layers:
                        layer.draw_noise(cfg.anp_eps, generator)
                    set_perturbed(layers, True)
                    for _ in range(cfg.anp_steps):
                        loss_noise = F.cross_entropy(noisy_model(batch.x), batch.y)
                        # allow_unused: BNs off the forward path (GoogLeNet's aux heads) get no gradient
                        grads = torch.autograd.grad(loss_noise, noises, allow_unused=True)
                        with torch.no_grad():
                            for noise, grad in zip(noises, grads):
                                if grad is not None:
                                    noise.add_(noise_lr * grad.sign())  # ascent on the loss
                    loss_robust = F.cross_entropy(noisy_model(batch.x), batch.y)
                else:
                    loss_robust = torch.zeros((), device=device)
                set_perturbed(layers, False)
                logits = noisy_model(batch.x)
                loss_natural = F.cross_entropy(logits, batch.y)
                loss = cfg.anp_alpha * loss_natural + (1 - cfg.anp_alpha) * loss_robust
                optimizer.zero_grad(set_to_none=True)
                for mask, grad in zip(masks, torch.autograd.grad(loss, masks, allow_unused=True)):
                    mask.grad = grad if grad is not None else torch.zeros_like(mask)
                optimizer.step()
                with torch.no_grad():
                    for mask in masks:
                        mask.clamp_(0.0, 1.0)
                total_loss += float(loss.detach()) * len(batch)
                correct += int((logits.argmax(1) == batch.y).sum())
                seen += len(batch)
            if run is not None:
                run.logger.info("ANP round %d/%d: loss %.4f, clean train acc %.4f, mean mask %.4f",
                                rnd + 1, rounds, total_loss / seen, correct / seen,
                                float(torch.cat([m.detach() for m in masks]).mean()))
    return [(name, idx, round(float(v), 4)) for name, layer in layers
            for idx, v in enumerate(layer.neuron_mask.detach().cpu())]


def write_mask_values(path, rows: list[tuple[str, int, float]]) -> None:
    lines = ["No \t Layer Name \t Neuron Idx \t Mask Score"]
    lines += [f"{i} \t {name} \t {idx} \t {value:.4f}" for i, (name, idx, value) in enumerate(rows)]
    atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- pruning


@torch.no_grad()
def prune_channels(net: nn.Module, channels) -> None:
    """Zero the BatchNorm weight gamma of every ``(layer_name, channel)`` (beta is kept)."""
    modules = dict(net.named_modules())
    for name, idx in channels:
        bn = modules[name]
        if not isinstance(bn, nn.BatchNorm2d):
            raise BurnError(f"ANP mask entry {name} is not a BatchNorm2d of this model")
        bn.weight[idx] = 0.0


def channels_up_to_threshold(ranked: list[tuple[str, int, float]], threshold: float) -> int:
    """How many of the ascending-ranked channels have mask value <= threshold."""
    return sum(1 for _, _, v in ranked if v <= threshold + 1e-12)


def sweep_points(cfg: ANPConfig, ranked: list[tuple[str, int, float]]) -> list[tuple[float, int]]:
    """(key, number of channels pruned) for every sweep step, key = threshold or count."""
    if cfg.pruning_by == "threshold":
        steps = int(math.floor(cfg.pruning_max / cfg.pruning_step + 1e-9))
        thresholds = [round(i * cfg.pruning_step, 10) for i in range(steps + 1)]
        return [(t, channels_up_to_threshold(ranked, t)) for t in thresholds]
    top = min(cfg.pruning_number, len(ranked))
    stride = max(1, math.ceil(top * cfg.pruning_step))
    counts = list(range(0, top, stride)) + [top]
    return [(c, c) for c in counts]


def prune_sweep(model: Classifier, ranked: list[tuple[str, int, float]], cfg: ANPConfig,
                evaluate, on_row=None, heldout_accuracy=None, test_every: int = 1) -> tuple[list[dict], int]:
    """Score the pruning sweep on a copy of ``model``; returns the rows and the last count.

    ``evaluate(model) -> Metrics`` scores the test sets; with ``heldout_accuracy(model) -> float``
    every step also gets a ``heldout_acc`` column and the test sets are scored only every
    ``test_every`` steps and on the last (they decide nothing then). ``on_row`` receives every row as
    it is scored (so a killed sweep leaves its CSV).
    """
    work = copy.deepcopy(model)
    key = cfg.pruning_by
    points = sweep_points(cfg, ranked)
    rows: list[dict] = []
    pruned = 0
    last: Metrics | None = None
    last_count = None  # channels pruned when ``last`` was scored
    held = None
    for step, (value_key, count) in enumerate(points):
        if count > pruned or held is None and heldout_accuracy is not None:
            prune_channels(work.net, [(n, i) for n, i, _ in ranked[pruned:count]])
            pruned = count
            if heldout_accuracy is not None:
                held = heldout_accuracy(work)
        due = heldout_accuracy is None or test_due(step, len(points), test_every)
        if due and last_count != count:
            last, last_count = evaluate(work), count
        row = {"epoch": step, key: value_key, "value": ranked[count - 1][2] if count else float("nan"),
               "num_pruned": count, **(last.row() if due else Metrics.skipped_row())}
        if heldout_accuracy is not None:
            row["heldout_acc"] = held
        rows.append(row)
        if on_row is not None:
            on_row(rows[-1])
    return rows, pruned


def select_row(rows: list[dict], before: Metrics, acc_ratio: float) -> dict | None:
    """BackdoorBench's choice (test data): the lowest-ASR row whose relative clean-test accuracy drop
    is below ``acc_ratio``; None if no row beats the unpruned model's ASR."""
    best, best_asr = None, before.asr if before.asr is not None else float("inf")
    for row in rows:
        drop = abs(row["test_acc"] - before.acc) / before.acc if before.acc else 0.0
        if drop < acc_ratio and row.get("test_asr") is not None and row["test_asr"] < best_asr:
            best, best_asr = row, row["test_asr"]
    return best


def select_row_heldout(rows: list[dict], heldout_acc0: float, acc_ratio: float) -> dict | None:
    """The choice without test data: the most-pruned row whose held-out accuracy has fallen by less
    than ``acc_ratio`` (relative; a rise is no fall - one held-out sample moves it by several percent)
    - pruning more removes more of what the noise exposed; None if only the unpruned model qualifies."""
    best = None
    for row in rows:
        drop = (heldout_acc0 - row["heldout_acc"]) / heldout_acc0 if heldout_acc0 else 0.0  # a fall only
        if drop < acc_ratio and row["num_pruned"] > 0 and (best is None or row["num_pruned"] > best["num_pruned"]):
            best = row
    return best


def adversarial_neuron_pruning(model: Classifier, data: DefenseData, cfg: ANPConfig, run: DefenseRun) -> Classifier:
    mask_set, heldout = data.clean_subset, None
    if cfg.select_on == "heldout":
        mask_set, heldout = split_heldout(data.clean_subset, cfg.heldout_ratio, cfg.random_seed)
    run.record_decision(cfg.select_on, len(heldout) if heldout is not None else 0)
    with run.timed("mask_optimization"):
        mask_rows = optimize_masks(model, mask_set, cfg, run)
    write_mask_values(run.checkpoint_dir / "mask_values.txt", mask_rows)
    ranked = sorted(mask_rows, key=lambda r: r[2])  # stable: ties keep layer order
    sweep = MetricLog(run.out_dir, cfg.pruning_by)

    def on_row(row):
        sweep.append(row)
        sweep.save()

    def scored(work):
        with run.timed("evaluate"):
            return run.evaluate(work)

    held_acc = None
    if heldout is not None:
        def held_acc(work):
            return accuracy(predict(work, heldout, run.device).argmax(1), heldout.labels)

    with run.timed("prune"):
        rows, _ = prune_sweep(model, ranked, cfg, scored, on_row, held_acc, cfg.test_every)
    sweep.finish()
    plot_metrics(sweep.rows, run.out_dir, prefix=f"{cfg.pruning_by}_", x_key=cfg.pruning_by)

    if heldout is None:
        chosen = select_row(rows, run.before, cfg.acc_ratio)
    else:
        chosen = select_row_heldout(rows, rows[0]["heldout_acc"], cfg.acc_ratio)
    count = chosen["num_pruned"] if chosen else 0
    prune_channels(model.net, [(n, i) for n, i, _ in ranked[:count]])
    if chosen is None:
        metrics = run.before.row()
    elif chosen.get("test_acc") == NOT_SCORED:  # the chosen step was between two test scorings
        metrics = scored(model).row()
    else:
        metrics = {k: chosen[k] for k in run.before.row() if k in chosen}
    run.metrics.append({"epoch": 0, **metrics})
    run.extra_results.update({"anp_num_pruned": int(count), "anp_channels": len(ranked),
                              f"anp_{cfg.pruning_by}": chosen[cfg.pruning_by] if chosen else None})
    run.logger.info("ANP: pruned %d of %d BN channels (%s %s, chosen on %s)", count, len(ranked), cfg.pruning_by,
                    chosen[cfg.pruning_by] if chosen else "none: unpruned model kept",
                    f"{len(heldout)} held-out clean samples" if heldout is not None else "the test sets")
    return model


@register_defense
class AdversarialNeuronPruning(Defense):
    """ANP: prune the BN channels most sensitive to adversarial neuron perturbations."""

    name = "anp"
    # flags it accepts but does not read: the mask optimiser is SGD with momentum 0.9 for nb_iter steps
    unused_flags = ("epochs", *OPTIMISER_FLAGS, *SCHEDULE_FLAGS, "progress")
    config_cls = ANPConfig
    budget_keys = ("nb_iter",)

    def repair(self, model, data, cfg, run):
        return adversarial_neuron_pruning(model, data, cfg, run)
