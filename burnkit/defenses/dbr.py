"""D-BR: sample distinction, then backdoor removal (Chen, Wu & Wang, "Effective Backdoor Defense by
Exploiting Sensitivity of Poisoned Samples", NeurIPS 2022), as BackdoorBench runs it
(extra-defenses §11.5). No clean data. The sample distinction is shared with D-ST (``dst.py``).

**Sample distinction** (SD), on the record's poisoned training set only:

1. train a fresh model ``epochs`` (2) without augmentation (SGD ``lr``, momentum, ``wd``, cosine with
   BackdoorBench's T_max 100);
2. drop its classification layer and train the features ``epochs_intra`` (10) more on L_intra, the
   mean of the off-diagonal cosine similarities of each batch's normalised class centroids (the same
   optimiser and schedule go on);
3. FCT score of a sample = ``mean((f(v1) - f(v3))^2)`` over the feature dimensions, ``v1`` the image,
   ``v3`` the image rotated by up to +-180 degrees and shifted by up to 20 % (eval mode). The paper's
   observation: poisoned samples' features move much more under such a transformation than clean
   ones' (the transformation breaks the trigger the features rely on);
4. ``gamma_low = sorted[int(clean_ratio N)]``, ``gamma_high = sorted[N - int(poison_ratio N)]``;
   score <= gamma_low: clean, >= gamma_high: poisoned, else suspicious.

BackdoorBench takes the thresholds and the assignment from two different random passes (§11.5
pitfall); here one pass of scores gives both. It also normalises its training inputs with other
constants than its evaluation (not copied: one normalisation everywhere).

**D-BR** then reloads the **backdoored** model and, for ``epochs_relearn`` (20) epochs, does one
pass of gradient ascent on the poisoned set followed by one pass of cross-entropy on the clean set
(SGD ``lr_relearn`` 1e-4, momentum 0.9, wd 5e-4, batch ``batch_size``, the train augmentation). The
last model is exported.

Files: ``log/train_notrans_df.csv``, ``log/finetune_notrans_df.csv``, ``data_produce/all.txt`` (every
score, in training-set order) and ``{clean,poison,suspicious}_samples.npy`` (original indices),
``d-br_df.csv`` / ``_summary`` (one row per epoch; ``unlearn_loss`` is the ascent pass's loss),
``d-br_samples.csv`` / ``d-br_report.json`` (score, set, ground-truth flag; report only).

Example:
    python defense/d-br.py --result_file badnet_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..config import option
from ..data import ImageSet
from ..defense import Defense, DefenseData, DefenseRun, register_defense
from ..engine import StepContext, StepOutput, TrainConfig, eval_mode, iterate, make_optimizer, make_scheduler
from ..errors import BurnError
from ..fileio import atomic_write_bytes
from ..models import Classifier
from ..network_surgery import detach_head
from ..results import MetricLog, atomic_write_text
from ..views import rotate_and_translate
from .retraining import (NoCleanDataConfig, fit_phase, fresh_classifier, poisoned_train,
                         poisoned_train_size, write_sample_flags)

CLEAN, SUSPICIOUS, POISON = 0, 1, 2
BB_UNUSED_KEYS = ("data_root", "seed", "poison_rate", "target_type", "target_label", "num_classes", "input_height",
                  "input_width", "input_channel", "momentum", "weight_decay", "trans1", "trans2", "schedule", "gamma",
                  "warm", "debug", "print_freq", "save_all_process", "continue_step")


@dataclass
class SampleDistinctionConfig(NoCleanDataConfig):
    """BackdoorBench's D-BR/D-ST keys of the sample distinction (cifar10 YAML)."""

    YAML_COMPAT_KEYS: ClassVar[tuple[str, ...]] = BB_UNUSED_KEYS
    epochs: int = option(2, "epochs of the separation model, trained without augmentation (BackdoorBench: 2)", low=1)
    epochs_intra: int = option(10, "epochs of L_intra on its features (BackdoorBench: hard-coded 10)", low=0)
    batch_size: int = option(128, "batch size")
    lr: float = option(0.01, "learning rate of the separation model")
    clean_ratio: float = option(0.2, "share of samples taken as clean (lowest FCT)", above=0, high=1)
    poison_ratio: float = option(0.05, "share of samples taken as poisoned (highest FCT)", above=0, high=1)
    gamma_low: float | None = option(None, "FCT threshold of the clean set",
                                     default_help="from clean_ratio")
    gamma_high: float | None = option(None, "FCT threshold of the poisoned set",
                                      default_help="from poison_ratio")
    amp: bool = option(False, "mixed precision on CUDA")

    def validate(self) -> None:
        super().validate()
        if self.clean_ratio + self.poison_ratio > 1:
            raise BurnError(f"--clean_ratio + --poison_ratio must not exceed 1, got {self.clean_ratio + self.poison_ratio}")


# --------------------------------------------------------------------------- sample distinction


def intra_class_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_intra: the mean over the C x C matrix of cosine similarities between the batch's normalised
    class centroids, its diagonal set to 0 (C = classes present in the batch)."""
    classes = torch.unique(labels)
    centres = torch.stack([features[labels == c].mean(0) for c in classes])
    centres = F.normalize(centres, dim=1)
    similarity = centres @ centres.T
    return (similarity * (1 - torch.eye(len(classes), device=similarity.device))).mean()


def intra_class_step(model, batch, optimizer, ctx: StepContext) -> StepOutput:
    with ctx.autocast():
        loss = intra_class_loss(model(batch.x).flatten(1).float(), batch.y)
    ctx.backward_step(loss, optimizer)
    return StepOutput(loss.detach())


@torch.no_grad()
def fct_scores(encoder: torch.nn.Module, train: ImageSet, device: torch.device, seed: int,
               batch_size: int = 256) -> torch.Tensor:
    """``mean((f(v1) - f(v3))^2)`` per sample; ``encoder`` returns features, ``v3`` is a random
    rotation + translation drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    scores = []
    encoder.to(device)
    with eval_mode(encoder):
        for batch in iterate(train, batch_size, device):
            moved = rotate_and_translate(batch.x.cpu(), generator).to(device)
            f1, f3 = encoder(batch.x).flatten(1).float(), encoder(moved).flatten(1).float()
            scores.append(((f1 - f3) ** 2).mean(1).cpu())
    return torch.cat(scores).double()


def fct_thresholds(scores: torch.Tensor, clean_ratio: float, poison_ratio: float) -> tuple[float, float]:
    """BackdoorBench's ``gamma_low = sorted[int(clean_ratio N)]``, ``gamma_high = sorted[N - int(poison_ratio N)]``."""
    ordered = torch.sort(scores).values
    n = len(ordered)
    low = ordered[min(int(n * clean_ratio), n - 1)]
    high = ordered[min(n - int(n * poison_ratio), n - 1)]
    return float(low), float(high)


def split_by_fct(scores: torch.Tensor, gamma_low: float, gamma_high: float) -> torch.Tensor:
    """0 clean (score <= gamma_low), 2 poisoned (>= gamma_high), 1 suspicious (between)."""
    flags = torch.full((len(scores),), SUSPICIOUS, dtype=torch.long)
    flags[scores >= gamma_high] = POISON
    flags[scores <= gamma_low] = CLEAN
    return flags


def sample_distinction(run: DefenseRun, train: ImageSet, cfg: SampleDistinctionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """SD (see the module docstring): returns the clean / suspicious / poisoned flag and the FCT
    score of every training sample, and writes BackdoorBench's ``data_produce/`` files."""
    model = fresh_classifier(run)
    train_cfg = TrainConfig.from_config(cfg, augment=False)
    optimizer = make_optimizer(model.parameters(), train_cfg)
    scheduler = make_scheduler(optimizer, train_cfg)
    log = MetricLog(run.log_dir, "train_notrans")
    fit_phase(run, model, train, replace(train_cfg, epochs=cfg.epochs), "sd_train",
              optimizer=optimizer, scheduler=scheduler, log=False, on_row=_saver(log))
    log.finish()
    detach_head(model.net, "the sample distinction")  # the features are trained from here on (linear dropped)
    log = MetricLog(run.log_dir, "finetune_notrans")
    fit_phase(run, model, train, replace(train_cfg, epochs=cfg.epochs_intra), "sd_intra",
              optimizer=optimizer, scheduler=scheduler, step=intra_class_step, eval_suite=None, log=False,
              on_row=_saver(log))
    log.finish()
    with run.timed("fct"):
        scores = fct_scores(model, train, run.device, cfg.random_seed, cfg.batch_size)
    low, high = fct_thresholds(scores, cfg.clean_ratio, cfg.poison_ratio)
    low = cfg.gamma_low if cfg.gamma_low is not None else low
    high = cfg.gamma_high if cfg.gamma_high is not None else high
    flags = split_by_fct(scores, low, high)
    _write_data_produce(run.out_dir / "data_produce", train, scores, flags)
    counts = {name: int((flags == v).sum()) for name, v in (("clean", CLEAN), ("suspicious", SUSPICIOUS),
                                                            ("poison", POISON))}
    run.extra_results["sample_distinction"] = {"gamma_low": low, "gamma_high": high, **counts}
    run.logger.info("sample distinction: gamma_low %.6g, gamma_high %.6g; clean %d, suspicious %d, poisoned %d",
                    low, high, counts["clean"], counts["suspicious"], counts["poison"])
    return flags, scores


def _saver(log: MetricLog):
    def on_row(row):
        log.append({k: v for k, v in row.items() if k != "batch"})
        log.save()
    return on_row


def _write_data_produce(folder: Path, train: ImageSet, scores: torch.Tensor, flags: torch.Tensor) -> None:
    import io

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "all.txt", "\n".join(f"{s:.18e}" for s in scores.tolist()) + "\n")
    index = train.index.cpu().numpy()
    for name, value in (("clean", CLEAN), ("poison", POISON), ("suspicious", SUSPICIOUS)):
        buffer = io.BytesIO()
        np.save(buffer, index[(flags == value).numpy()].astype(np.int64), allow_pickle=False)
        atomic_write_bytes(folder / f"{name}_samples.npy", buffer.getvalue())


def report_distinction(run: DefenseRun, train: ImageSet, flags: torch.Tensor, scores: torch.Tensor) -> None:
    """The per-sample file and the report (poisoned set vs ground truth; the flags are read here only)."""
    clean = flags == CLEAN
    write_sample_flags(run, train, flags == POISON, scores, run.name,
                       extra={"clean_set_size": int(clean.sum()),
                              "clean_set_poison": int((clean & train.poison.cpu()).sum())})


# --------------------------------------------------------------------------- D-BR


@dataclass
class DBRConfig(SampleDistinctionConfig):
    epochs_relearn: int = option(20, "epochs of unlearning (poisoned set) + relearning (clean set)", low=1)
    lr_relearn: float = option(1e-4, "learning rate of unlearning and relearning (BackdoorBench: hard-coded 1e-4)",
                               low=0)


def unlearn_relearn_step(model, batch, optimizer, ctx: StepContext) -> StepOutput:
    """Even engine epochs: gradient ascent on the poisoned set; odd ones: cross-entropy on the clean set."""
    with ctx.autocast():
        logits = model(batch.x)
        ce = F.cross_entropy(logits, batch.y)
    ctx.backward_step(-ce if ctx.epoch % 2 == 0 else ce, optimizer)
    return StepOutput(ce.detach(), logits.detach())


def backdoor_removal(run: DefenseRun, model: Classifier, train: ImageSet, flags: torch.Tensor,
                     cfg: DBRConfig) -> Classifier:
    """D-BR's second stage on the backdoored ``model``: one engine epoch per half (ascent, relearn)."""
    poison_set = train.subset(torch.nonzero(flags == POISON).flatten())
    clean_set = train.subset(torch.nonzero(flags == CLEAN).flatten())
    if len(poison_set) == 0 or len(clean_set) == 0:
        raise BurnError("the sample distinction left the poisoned or the clean set empty; check --clean_ratio, "
                        "--poison_ratio, --gamma_low and --gamma_high")
    train_cfg = TrainConfig(epochs=2 * cfg.epochs_relearn, batch_size=cfg.batch_size, lr=cfg.lr_relearn,
                            sgd_momentum=0.9, wd=5e-4, lr_scheduler=None, amp=cfg.amp)
    ascent_loss: dict[str, float] = {}

    def on_row(row):
        if row["epoch"] % 2 == 0:
            ascent_loss["last"] = row["train_epoch_loss_avg_over_batch"]
            return
        run.metrics.append({"epoch": row["epoch"] // 2, "unlearn_loss": ascent_loss.get("last"),
                            **{k: v for k, v in row.items() if k not in ("epoch", "batch")}})
        run.metrics.save()

    fit_phase(run, model, clean_set, train_cfg, "unlearn_relearn", step=unlearn_relearn_step,
              epoch_begin=lambda epoch, _m: poison_set if epoch % 2 == 0 else clean_set,
              eval_every=2 * cfg.test_every, log=False, on_row=on_row,
              fingerprint={"poison_set": _digest(poison_set)})
    return model


def _digest(imageset: ImageSet) -> str:
    from ..data import imageset_digest

    return imageset_digest(imageset)


def dbr(model: Classifier, data: DefenseData, cfg: DBRConfig, run: DefenseRun) -> Classifier:
    train = poisoned_train(data, "D-BR")
    flags, scores = sample_distinction(run, train, cfg)
    report_distinction(run, train, flags, scores)
    run.extra_results["test_data_for_decisions"] = False
    return backdoor_removal(run, model, train, flags, cfg)


@register_defense
class DBR(Defense):
    """D-BR: separate samples by their feature sensitivity, then unlearn the poisoned and relearn the clean."""

    name = "d-br"
    config_cls = DBRConfig
    needs_clean_subset = False
    budget_keys: ClassVar[tuple[str, ...]] = ("epochs", "epochs_intra", "epochs_relearn")

    def repair(self, model, data, cfg, run):
        return dbr(model, data, cfg, run)

    def preflight(self, cfg, record, out_dir):
        poisoned_train_size(record, "D-BR")

