"""What the defenses that need no clean data share: resumable training phases, a fresh model, the
"detect, then retrain on what is kept" recipe (AC, Spectral) and the report of a sample filter.

A phase is one :meth:`DefenseRun.fit` call with its own checkpoint ``checkpoint/<phase>.pt``, whose
fingerprint is the run's (every setting that changes the result and digests of the record's weights
and data, :meth:`burnkit.defense.Defense.fingerprint`) plus the phase's name and a digest of its
training set. A killed run, started again with the same command, skips the finished phases (their
checkpoints end at their last epoch: the model and the CSV rows are restored) and continues the
interrupted one; a checkpoint of other settings or other data is refused with one line before
anything is written (``Defense.check_resume``; ``--resume false`` starts over).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import option
from ..data import ImageSet, imageset_digest
from ..defense import DefenseConfig, DefenseData, DefenseRun
from ..engine import FitResult, TrainConfig, seed_everything
from ..errors import BurnError
from ..models import Classifier, build_classifier
from ..results import write_json


@dataclass
class NoCleanDataConfig(DefenseConfig):
    """Flags of the defenses that read only the poisoned training set and retrain or fine-tune for
    many epochs: ``--resume`` continues a killed run from its last finished epoch."""

    resume: bool = option(True, "continue an interrupted run from its checkpoints (false: start over)")


def phase_checkpoint(run: DefenseRun, phase: str) -> Path:
    return run.checkpoint_dir / f"{phase}.pt"


def fit_phase(run: DefenseRun, model: torch.nn.Module, train_set: ImageSet, train_cfg: TrainConfig, phase: str,
              **kwargs) -> FitResult:
    """``run.fit`` with a resumable checkpoint for ``phase`` (see the module docstring)."""
    fingerprint = {**run.fingerprint, "phase": phase, **kwargs.pop("fingerprint", {})}
    fingerprint["data"] = {**run.fingerprint.get("data", {}), "train_set": imageset_digest(train_set)}
    resume = bool(getattr(run.cfg, "resume", False))
    return run.fit(model, train_set, train_cfg, phase=phase, checkpoint=phase_checkpoint(run, phase),
                   resume=resume, fingerprint=fingerprint, **kwargs)


def fresh_classifier(run: DefenseRun, seed_offset: int = 0) -> Classifier:
    """A newly initialised network of the record's architecture (seeded by ``--random_seed``)."""
    seed_everything(run.cfg.random_seed + seed_offset)
    return build_classifier(run.record.model_name, run.data.info, run.record.num_classes)


def poisoned_train_size(record, who: str) -> int:
    """Preflight: the number of samples in the record's poisoned training set (an error when the
    record has none: these defenses read nothing else)."""
    if record.bd_train is None or len(record.bd_train.original_index) == 0:
        raise BurnError(f"{who} reads the record's poisoned training set (bd_train), but this record has none")
    return int(len(record.bd_train.original_index))


def require_share(n: int, share: float, flag: str, what: str) -> None:
    """Preflight: ``int(n * share)`` must select at least one of the ``n`` training samples."""
    if int(n * share) == 0:
        raise BurnError(f"{flag} {share} of {n} training samples {what} nothing; raise it")


def poisoned_train(data: DefenseData, who: str) -> ImageSet:
    """The record's poisoned training set, the only data these defenses read."""
    if data.poisoned_train is None or len(data.poisoned_train) == 0:
        raise BurnError(f"{who} reads the record's poisoned training set (bd_train), but this record has none")
    return data.poisoned_train


def filter_report(flagged: torch.Tensor, poison: torch.Tensor) -> dict:
    """How a sample filter did against the record's ground-truth poison flags (report only; the
    algorithms never read the flags): counts, precision and recall of the flagged set."""
    flagged = torch.as_tensor(flagged).bool().cpu()
    poison = torch.as_tensor(poison).bool().cpu()
    tp = int((flagged & poison).sum())
    n_flagged, n_poison = int(flagged.sum()), int(poison.sum())
    return {"n_samples": int(len(flagged)), "n_flagged": n_flagged, "n_poison": n_poison,
            "poison_flagged": tp, "clean_flagged": n_flagged - tp,
            "precision": tp / n_flagged if n_flagged else None,
            "recall": tp / n_poison if n_poison else None}


def write_sample_flags(run: DefenseRun, train: ImageSet, flagged: torch.Tensor, scores: torch.Tensor | None,
                       name: str, extra: dict | None = None) -> dict:
    """``<name>_samples.csv`` (original index, label, score, flagged, ground-truth poison flag) and
    the filter report into ``cost.json`` (``run.extra_results[name]``) and ``<name>_report.json``."""
    import pandas as pd

    from ..results import atomic_write_text

    frame = pd.DataFrame({"index": train.index.cpu().numpy(), "label": train.labels.cpu().numpy(),
                          "score": (scores.cpu().numpy() if scores is not None else np.full(len(train), np.nan)),
                          "flagged": torch.as_tensor(flagged).cpu().numpy().astype(int),
                          "is_poison": train.poison.cpu().numpy().astype(int)})
    atomic_write_text(run.out_dir / f"{name}_samples.csv", frame.to_csv(index=False))
    report = {**filter_report(flagged, train.poison), **(extra or {})}
    write_json(run.out_dir / f"{name}_report.json", report)
    run.extra_results[name] = report
    run.logger.info("%s: flagged %d of %d samples (poison among them %d of %d; precision %s, recall %s)", name,
                    report["n_flagged"], report["n_samples"], report["poison_flagged"], report["n_poison"],
                    _fmt(report["precision"]), _fmt(report["recall"]))
    return report


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


@dataclass
class RetrainConfig(NoCleanDataConfig):
    """BackdoorBench's retraining keys of AC and Spectral (cifar10 YAML): a fresh model, 100 epochs,
    SGD 0.01 / 0.9 / 5e-4, cosine, batch 256."""

    epochs: int = option(100, "epochs of the retraining from scratch on the kept samples", low=1)
    batch_size: int = option(256, "batch size of the retraining (and of feature extraction)")
    lr: float = option(0.01, "learning rate of the retraining")
    amp: bool = option(False, "mixed precision on CUDA")


def retrain_on_kept(run: DefenseRun, kept: ImageSet, cfg: RetrainConfig) -> Classifier:
    """A fresh model trained on ``kept`` with the run's schedule and BackdoorBench's augmentation;
    its per-epoch rows are the defense's ``<name>_df.csv``."""
    if len(kept) == 0:
        raise BurnError(f"{run.name} removed every training sample; nothing is left to retrain on")
    model = fresh_classifier(run)
    fit_phase(run, model, kept, cfg.train_config(), "retrain")
    return model
