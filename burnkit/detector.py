"""The poison-detector base: BackdoorBench's ``detection_pretrain/<m>.py`` lifecycle, once, for every
detector (spec §12-13).

A detector module defines a config dataclass (subclass of :class:`DetectorConfig`) and a
:class:`Detector` subclass whose :meth:`Detector.detect` takes ``(model, data, cfg, run)`` and
returns a :class:`DetectionResult`: one score per training sample (higher = more suspicious, for
every method) and the method's own flags. Everything else happens here, the same way for all:

1. flags generated from the config; the one YAML (``--yaml_path``, default
   ``config/detection/<name>/<dataset>.yaml``, else ``config.yaml``) merged under the CLI;
2. the record read once; the inspected set is all of ``bd_train`` (test transform: no augmentation);
3. a detector that needs clean samples gets a **class-balanced reserve from the clean training
   split**, drawn without replacement (``--clean_sample_num``, default 100, or ``--index``), from the
   clean-train images the record did not inspect when the record used a subset of the split, else
   from the whole split (BackdoorBench draws from the test split, with replacement: spec §12 defects);
   the indices go to ``log/index.txt``;
4. ``detect``; then, in BackdoorBench's folder (``record/<rf>/detection/<m>_pretrain/`` or
   ``record/<rf>/detection_pretrain/<m>/``, spec §13.4):

   * ``detection_info.csv``: BackdoorBench's header (``record,TN,FP,FN,TP,TPR,FPR`` + the method's
     columns) and one row, appended per run, ``\\r\\n`` endings; integer counts, FP and FN not swapped,
     an empty detection written as TP = FP = 0 (BackdoorBench's defects fixed, spec §12);
   * the sidecar ``detection_scores.npy`` (float64, ``bd_train`` order) + ``detection_scores.json``
     (threshold, flags, AUROC, TPR at 1 %/5 % FPR, precision at the poison rate, weighted F, clean
     samples used, compute) and ``detection_samples.csv`` (one row per sample);
   * ``detection_roc.png``, ``cost.json`` (wall time per phase, device), ``log/``.

The record's poison flags are read for scoring only; no detector sees them. A finished output is
refused unless ``--overwrite true`` (the old folder is kept, renamed; its ``detection_info.csv`` rows
are carried into the new one, as BackdoorBench's append mode keeps them). A run holds the record's
lock, and those of the outputs it reads (:meth:`Detector.reads`), shared and its own folder's lock
exclusively (:mod:`burnkit.locks`). Whatever a run reuses - a checkpoint, another run's output - must
agree with its fingerprint (every result-changing setting, digests of the weights and data read),
checked before anything is written (:meth:`Detector.check_reads`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from .config import as_dict, find_config_file, option, parse_config
from .data import ImageSet, imageset_digest, tensors_digest
from .datasets import DATASETS, DatasetInfo, dataset_info
from .defense import (READ_SELECTION_KEYS, _close_logger, _make_logger, choose_clean_indices, open_record,
                      record_read_lock, resolve_record_dir)
from .detection_metrics import detection_metrics, roc_points
from .engine import check_checkpoints, plain_fingerprint, resolve_device, seed_everything
from .errors import BurnError, cli_errors
from .fileio import atomic_write_bytes
from .locks import folder_lock
from .models import Classifier, build_classifier, load_bb_state_dict
from .options import IO_GROUP, OPTIMISER_FLAGS, SCHEDULE_FLAGS, TrainingOptions, result_settings
from .records import AttackRecord, read_attack_record
from .registry import Registry
from .results import (RunStart, atomic_write_text, check_output_folders, check_writable_folder, move_aside,
                      portable_config, run_environment, write_json)

_REGISTRY = Registry("detector", "burnkit.detectors")
register_detector = _REGISTRY.register
get_detector = _REGISTRY.get
list_detectors = _REGISTRY.names

BASE_HEADER = ("record", "TN", "FP", "FN", "TP", "TPR", "FPR")
SCORES_NPY = "detection_scores.npy"
SCORES_JSON = "detection_scores.json"
SAMPLES_CSV = "detection_samples.csv"
INFO_CSV = "detection_info.csv"


@dataclass
class DetectorConfig(TrainingOptions):
    """Flags every detector accepts; the device, seed and training keys come from
    :class:`~burnkit.options.TrainingOptions` (only ABL trains)."""

    result_file: str | None = option(None, "the attack record folder under record/ (or a path to it)", required=True)
    output_name: str | None = option(None, "method folder name; lets variants of one detector share a record",
                                     cli_only=True, default_help="the detector's name", group=IO_GROUP)
    yaml_path: str | None = option(None, "the one YAML of defaults",
                                   default_help="config/detection/<name>/<dataset>.yaml", group=IO_GROUP)
    dataset: str | None = option(None, "dataset of the record", choices=tuple(DATASETS), default_help="the record's",
                                 group=IO_GROUP)
    dataset_path: str | None = option(None, "clean data: <path>/<dataset>, the dataset folder, or an image-folder archive",
                                      default_help="the data folder the record names, beside record/",
                                      group=IO_GROUP)
    download: bool = option(False, "let torchvision download a missing clean dataset (needs internet)",
                            group=IO_GROUP)
    log: str | None = option(None, "log folder; receives index.txt", default_help="<output>/log/", group=IO_GROUP)
    model: str | None = option(None, "model name; must match the record's when given", default_help="the record's",
                               group=IO_GROUP)
    batch_size: int = option(256, "batch size of the forward passes", low=1)
    clean_sample_num: int = option(100, "clean training images for detectors that need them (class-balanced, "
                                        "without replacement)", low=1)
    index: str | None = option(None, "file of clean-train indices (one per line) instead of --clean_sample_num",
                               default_help="a seeded class-balanced draw")
    csv_save_path: str | None = option(None, "also append BackdoorBench's headerless summary row to this CSV",
                                       group=IO_GROUP)


@dataclass
class FeatureConfig(DetectorConfig):
    """Detectors that read an intermediate representation."""

    target_layer: str | None = option(None, "feature point: a module name of the network, NAME:input for that "
                                            "module's input", default_help="the last stage before the classifier, "
                                            "found generically (layer4 on PreAct-ResNet18)")


def input_shape(record: AttackRecord) -> tuple[int, int, int]:
    """(C, H, W) of the record's images."""
    h, w, c = record.img_size
    return (c, h, w)


@dataclass
class DetectionData:
    """What a detector may use: the inspected set (``bd_train``, its flags unread) and the clean
    reserve (empty unless the detector needs one)."""

    info: DatasetInfo
    num_classes: int
    inspected: ImageSet
    clean: ImageSet
    clean_indices: np.ndarray
    clean_source: str
    record: AttackRecord

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return input_shape(self.record)


@dataclass
class DetectionResult:
    """A detector's answer. ``scores``: one finite float per inspected sample, higher = more
    suspicious; ``flagged``: the method's own decision; ``threshold``: the score cut it used (None
    when it decides otherwise); ``target``: BackdoorBench's ``target`` column; ``notes``: facts for
    the JSON sidecar (feature point, rule, per-class statistics)."""

    scores: np.ndarray
    flagged: np.ndarray
    threshold: float | None = None
    target: str = "None"
    notes: dict = field(default_factory=dict)


class DetectionRun:
    """Services a ``detect`` function uses: device, folders, logger, timing."""

    def __init__(self, name: str, cfg: DetectorConfig, out_dir: Path, device: torch.device, logger,
                 fingerprint: dict | None = None):
        self.name = name
        self.cfg = cfg
        self.out_dir = out_dir
        self.device = device
        self.logger = logger
        self.fingerprint = fingerprint or {}  # what a checkpoint of this run must agree with (Detector.fingerprint)
        self.timings: dict[str, float] = {}
        self.extra_cost: dict = {}  # e.g. the compute of a run whose output a detector reads

    @contextlib.contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start


class Detector:
    """Base class: subclasses set ``name``, ``config_cls``, ``header`` (the columns after
    ``record,TN,FP,FN,TP,TPR,FPR``) and implement :meth:`detect`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[DetectorConfig]] = DetectorConfig
    header: ClassVar[tuple[str, ...]] = ("target",)
    needs_clean: ClassVar[bool] = False
    # flags of config_cls this detector accepts but never reads (listed apart in --help): the
    # training keys TrainingOptions brings, as detectors do not train through train_config
    unused_flags: ClassVar[tuple[str, ...]] = ("epochs", "lr", *OPTIMISER_FLAGS, *SCHEDULE_FLAGS, "test_every")
    folder: ClassVar[str] = "detection/{}_pretrain"  # BackdoorBench's pattern; abl: detection_pretrain/{}
    description: ClassVar[str] = ""

    def detect(self, model: Classifier, data: DetectionData, cfg: DetectorConfig,
               run: DetectionRun) -> DetectionResult:
        raise NotImplementedError(f"{type(self).__name__} must implement detect()")

    def preflight(self, cfg: DetectorConfig, record: AttackRecord, model: Classifier) -> None:
        """Checks that need the record or the network (a ``--target_layer``, a class number, a
        BURN output to read) and must fail before anything is written."""

    def clean_count(self, cfg: DetectorConfig) -> int:
        return cfg.clean_sample_num

    def reads(self, cfg: DetectorConfig, record: AttackRecord) -> list[Path]:
        """Output folders of other runs this run reads besides the record (BURN's detectors: a BURN
        run); they are locked shared for the run, so they are not replaced under it."""
        return []

    def read_digests(self, weights: str, data: DetectionData) -> dict:
        """Digests of what a run reads (:func:`~burnkit.data.tensors_digest`): the record's weights,
        the inspected set and the clean reserve."""
        return {"weights": weights, "bd_train": imageset_digest(data.inspected), "clean": imageset_digest(data.clean)}

    def fingerprint(self, cfg: DetectorConfig, weights: str, data: DetectionData) -> dict:
        """What a checkpoint of this run must agree with (as :meth:`burnkit.defense.Defense.fingerprint`):
        the detector, every setting but the run-only ones, and :meth:`read_digests`."""
        return plain_fingerprint({"detector": self.name, **result_settings(cfg, READ_SELECTION_KEYS),
                                  "data": self.read_digests(weights, data)})

    def check_reads(self, cfg: DetectorConfig, record: AttackRecord, fingerprint: dict) -> None:
        """Before anything is written, refuse an output of another run (:meth:`reads`) that was not
        made from this run's weights and data or contradicts a setting of this run."""

    @classmethod
    def output_dir(cls, record_dir: Path, name: str | None = None) -> Path:
        return Path(record_dir) / cls.folder.format(name or cls.name)

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def ignored_flags(cls) -> tuple[str, ...]:
        """:attr:`unused_flags`, and the clean-reserve flags of a detector that needs no clean data."""
        return (*cls.unused_flags, *(() if cls.needs_clean else ("clean_sample_num", "index")))

    @classmethod
    def parse(cls, argv=None, prog: str | None = None, loaded: dict | None = None):
        """CLI + YAML -> config; without ``--dataset``/``--yaml_path`` the record is read here to pick
        its dataset's YAML and kept in ``loaded["record"]``."""
        import sys

        prog = prog or f"detection_pretrain/{cls.name}.py"
        loaded = {} if loaded is None else loaded

        def default_yaml(cli: dict):
            dataset = cli.get("dataset")
            if not dataset and cli.get("result_file"):
                record_dir = resolve_record_dir(cli["result_file"])
                if (record_dir / "attack_result.pt").is_file():
                    with contextlib.suppress(BurnError):
                        loaded["record"] = read_attack_record(record_dir)
                        dataset = loaded["record"].clean_data
            names = [f"config/detection/{cls.name}/{dataset}.yaml"] if dataset else []
            return find_config_file(*names, f"config/detection/{cls.name}/config.yaml")

        return parse_config(cls.config_cls, sys.argv[1:] if argv is None else argv, prog,
                            cls.description or (cls.__doc__ or "").strip().split("\n")[0], default_yaml,
                            unused=cls.ignored_flags(), method=cls.name)

    @classmethod
    def main(cls, argv=None) -> dict:
        """The CLI entry point: errors become one line and exit code 2."""
        with cli_errors(f"detection_pretrain/{cls.name}.py"):
            loaded: dict = {}
            cfg, _, ignored = cls.parse(argv, None, loaded)
            return cls().run(cfg, ignored_keys=ignored, record=loaded.get("record"))

    def run(self, cfg: DetectorConfig, ignored_keys=(), record: AttackRecord | None = None) -> dict:
        """The lifecycle, holding the record's lock shared and the output folder's exclusively."""
        with contextlib.ExitStack() as held:
            held.enter_context(record_read_lock(cfg))
            return self._run(cfg, ignored_keys, record, held)

    def _run(self, cfg: DetectorConfig, ignored_keys, record: AttackRecord | None, held: contextlib.ExitStack) -> dict:
        started, start = time.perf_counter(), RunStart()
        record_dir, record = open_record(cfg, record)
        name = cfg.output_name or self.name
        if record.bd_train is None:
            raise BurnError(f"record {record_dir} has no poisoned training set (bd_train); detectors inspect it")
        out_dir = self.output_dir(record_dir, name)
        check_writable_folder(out_dir, "the output folder")
        held.enter_context(folder_lock(out_dir, "the output folder"))
        finished = (out_dir / SCORES_JSON).exists()
        if finished and not cfg.overwrite:
            raise BurnError(f"{out_dir} already holds a finished {self.name} detection; pass --overwrite true to "
                            "replace it (the old folder is kept, renamed) or --output_name NEW for a second one")
        log_dir = Path(cfg.log) if cfg.log else out_dir / "log"
        folders = {"the log folder (--log)": log_dir}
        if cfg.csv_save_path:
            folders["--csv_save_path's folder"] = Path(cfg.csv_save_path).parent
        check_output_folders(out_dir, folders, moved_aside=finished)
        device = resolve_device(cfg.device)
        info = dataset_info(record.clean_data)
        seed_everything(cfg.random_seed)
        model = build_classifier(record.model_name, info, record.num_classes)
        load_bb_state_dict(model, record.state_dict)
        for folder in self.reads(cfg, record):
            held.enter_context(folder_lock(folder, "the output", shared=True))
        self.preflight(cfg, record, model)
        loaded = record.load_data(cfg.dataset_path, download=cfg.download)
        if self.needs_clean:
            clean_idx, source = choose_clean_reserve(loaded.clean_train, loaded.bd_train.index.numpy(),
                                                     self.clean_count(cfg), cfg.random_seed, cfg.index)
        else:
            clean_idx, source = np.zeros(0, dtype=np.int64), "none"
        data = DetectionData(info, record.num_classes, loaded.bd_train, loaded.clean_train.subset(clean_idx),
                             clean_idx, source, record)
        weights = tensors_digest(record.state_dict.items())
        fingerprint = self.fingerprint(cfg, weights, data)
        if not finished and getattr(cfg, "resume", False) and (out_dir / "checkpoint").is_dir():
            check_checkpoints(out_dir / "checkpoint", fingerprint)  # ABL's isolation training
        self.check_reads(cfg, record, fingerprint)

        # -- inputs are valid: from here on we write ------------------------------------------
        history = (out_dir / INFO_CSV).read_text() if finished and (out_dir / INFO_CSV).is_file() else ""
        replaced = move_aside(out_dir) if finished else None
        out_dir.mkdir(parents=True, exist_ok=True)
        logger = _make_logger(self.name, log_dir)
        np.savetxt(log_dir / "index.txt", clean_idx, fmt="%d")
        if replaced is not None:
            logger.warning("--overwrite: the previous result was moved to %s", replaced)
        if ignored_keys:
            logger.info("BackdoorBench YAML keys accepted but not used by %s: %s", self.name, ", ".join(ignored_keys))
        if not self.needs_clean and cfg.index:
            logger.warning("%s uses no clean data: --index %s is ignored", self.name, cfg.index)
        logger.info("detector %s on %s (%s, %s) device %s", self.name, record_dir, record.model_name,
                    record.clean_data, device)
        logger.info("config: %s", as_dict(cfg))
        logger.info("inspected: %d training samples (bd_train); clean reserve: %d (%s)", len(loaded.bd_train),
                    len(clean_idx), source)
        run = DetectionRun(self.name, cfg, out_dir, device, logger, fingerprint)
        seed_everything(cfg.random_seed)
        with run.timed("detect"):
            result = self.detect(model, data, cfg, run)
        result = check_result(result, len(loaded.bd_train), self.name)
        wall = time.perf_counter() - started
        environment = run_environment(device, start, cfg, fingerprint["data"], record_digest=weights)
        summary = write_outputs(self, out_dir, cfg, record_dir, data, result, run, wall, environment, history)
        logger.info("AUROC %.4f, TPR@1%%FPR %.4f, TPR@5%%FPR %.4f, precision at the poison rate %.4f; flagged %d "
                    "(TP %d, FP %d) in %.1fs -> %s", summary["auroc"], summary["tpr_at_1fpr"], summary["tpr_at_5fpr"],
                    summary["precision_at_poison_rate"], summary["flagged"], summary["TP"], summary["FP"], wall, out_dir)
        _close_logger(logger)
        return {"out_dir": out_dir, "result": result, "summary": summary}


class FeatureDetector(Detector):
    """A detector reading the representation at ``--target_layer`` (checked before anything is written)."""

    config_cls: ClassVar[type[DetectorConfig]] = FeatureConfig

    def feature_point(self, model: Classifier, record: AttackRecord, cfg: FeatureConfig) -> str:
        from .feature_points import resolve_feature_point

        return resolve_feature_point(model.net, cfg.target_layer, input_shape(record))

    def preflight(self, cfg, record, model):
        self.feature_point(model, record, cfg)


# --------------------------------------------------------------------------- clean reserve


def choose_clean_reserve(clean_train: ImageSet, inspected_index: np.ndarray, count: int, seed: int,
                         index_file: str | None = None) -> tuple[np.ndarray, str]:
    """Clean-train indices for a detector: ``--index``, else ``count`` drawn class-balanced without
    replacement (``count // K`` per class, the remainder to randomly chosen classes).

    When the record inspected only part of the clean training split (a subset attack), the draw is
    from the images it did not inspect, so the reserve and the inspected set share no image;
    otherwise (a full-split record, as in BackdoorBench) from the whole split - the defender's
    clean copy of some training images, BackdoorBench's assumption for its defenses.
    """
    n = len(clean_train)
    if index_file:
        return choose_clean_indices(n, 1.0, index_file, seed), f"--index {index_file}"
    labels = clean_train.labels.numpy()
    classes = np.unique(labels)
    outside = np.setdiff1d(np.arange(n), inspected_index)
    per_class = count // len(classes)
    extra = count - per_class * len(classes)
    rng = np.random.default_rng(seed)
    bonus = set(rng.choice(classes, size=extra, replace=False).tolist()) if extra else set()
    need = {c: per_class + (c in bonus) for c in classes}
    pool, source = outside, "clean training images outside the inspected subset"
    if any((labels[outside] == c).sum() < k for c, k in need.items()):
        pool, source = np.arange(n), "the whole clean training split"
    if any((labels[pool] == c).sum() < k for c, k in need.items()):
        raise BurnError(f"--clean_sample_num {count} needs {max(need.values())} clean images per class, more than "
                        "the clean training split holds; lower it")
    chosen = [rng.choice(pool[labels[pool] == c], size=k, replace=False) for c, k in need.items() if k]
    out = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return out.astype(np.int64), f"{source}, class-balanced, seed {seed}"


# --------------------------------------------------------------------------- outputs


def check_result(result: DetectionResult, n: int, name: str) -> DetectionResult:
    scores = np.asarray(result.scores, dtype=np.float64).reshape(-1)
    flags = np.asarray(result.flagged).astype(bool).reshape(-1)
    if len(scores) != n or len(flags) != n:
        raise RuntimeError(f"detector {name} returned {len(scores)} scores / {len(flags)} flags for {n} samples")
    if not np.isfinite(scores).all():
        raise RuntimeError(f"detector {name} returned non-finite scores")
    result.scores, result.flagged = scores, flags
    return result


def info_row(header: tuple[str, ...], record: str, metrics: dict, target: str) -> list:
    """One ``detection_info.csv`` row under ``record,TN,FP,FN,TP,TPR,FPR`` + ``header``."""
    values = {"record": record, **{k: metrics[k] for k in ("TN", "FP", "FN", "TP", "TPR", "FPR")},
              "weight_F_score": metrics["weight_F_score"], "AUC": metrics["auroc"], "target": target}
    return [values[k] for k in (*BASE_HEADER, *header)]


def _csv_lines(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)  # csv's default line ending is \r\n, as BackdoorBench's files
    return buffer.getvalue()


def write_outputs(detector: Detector, out_dir: Path, cfg: DetectorConfig, record_dir: Path, data: DetectionData,
                  result: DetectionResult, run: DetectionRun, wall: float, environment: dict, history: str = "") -> dict:
    """Every output file of a run; returns the JSON sidecar's content. ``environment``: the run's
    :func:`~burnkit.results.run_environment` (device, CPU time, stamp) for ``cost.json``."""
    truth = data.inspected.poison.numpy().astype(bool)
    metrics = detection_metrics(result.scores, truth, result.flagged)
    relabelled = truth & (data.inspected.labels.numpy() != data.inspected.original_labels.numpy())
    keep = relabelled | ~truth
    if 0 < relabelled.sum() < truth.sum():  # cross/target-class samples left out, as BURN's report does
        metrics["auroc_relabelled_only"] = detection_metrics(result.scores[keep], relabelled[keep])["auroc"]
    header = (*BASE_HEADER, *detector.header)
    record_name = str(cfg.result_file)
    row = info_row(detector.header, record_name, metrics, result.target)
    atomic_write_text(out_dir / INFO_CSV, history + _csv_lines([list(header), row]))
    if cfg.csv_save_path:
        path = Path(cfg.csv_save_path)
        before = path.read_text() if path.is_file() else ""
        atomic_write_text(path, before + _csv_lines([[record_name, detector.name, None, None, metrics["TN"],
                                                      metrics["FP"], metrics["FN"], metrics["TP"], metrics["TPR"],
                                                      metrics["FPR"], metrics["weight_F_score"], metrics["auroc"],
                                                      wall / 60.0, result.target]]))
    buffer = io.BytesIO()
    np.save(buffer, result.scores)
    atomic_write_bytes(out_dir / SCORES_NPY, buffer.getvalue())
    inspected = data.inspected
    frame = pd.DataFrame({"index": inspected.index.numpy(), "label": inspected.labels.numpy(),
                          "original_label": inspected.original_labels.numpy(), "is_poison": truth.astype(int),
                          "score": result.scores, "flagged": result.flagged.astype(int)})
    atomic_write_text(out_dir / SAMPLES_CSV, frame.to_csv(index=False))
    # the detection's own compute (loading the record and the images is the same for every method),
    # plus that of a run whose output it reads (BURN's score)
    compute = run.timings.get("detect", wall) + float(run.extra_cost.get("reused_compute_s", 0.0))
    summary = {
        "method": detector.name, "output_name": cfg.output_name or detector.name, "record": record_name,
        "model": data.record.model_name, "dataset": data.record.clean_data, "n_samples": int(len(truth)),
        "n_poison": int(truth.sum()), "poison_rate": float(truth.mean()) if len(truth) else 0.0,
        "score_direction": "higher = more suspicious", "threshold": result.threshold, "target": result.target,
        **metrics, "clean_samples_used": int(len(data.clean_indices)), "clean_source": data.clean_source,
        "wall_time_s": wall, "compute_s": compute, "phases_s": run.timings, **run.extra_cost,
        "device": environment["device"], "random_seed": cfg.random_seed,
        "notes": result.notes, "config": portable_config(as_dict(cfg)),
        "files": {"scores": SCORES_NPY, "samples": SAMPLES_CSV, "info": INFO_CSV},
    }
    plot_roc(out_dir / "detection_roc.png", {detector.name: result.scores}, truth, f"{detector.name} on {record_name}")
    write_json(out_dir / "cost.json", {"detector": detector.name, "result_file": record_name, "wall_time_s": wall,
                                       "compute_s": compute, "phases_s": run.timings, **run.extra_cost,
                                       **environment,
                                       "clean_subset_size": int(len(data.clean_indices))})
    write_json(out_dir / SCORES_JSON, summary)  # last: its presence marks the run finished
    return summary


def plot_roc(path: Path, curves: dict[str, np.ndarray], truth: np.ndarray, title: str) -> bool:
    """ROC curves of several score vectors against the same flags, with their AUROCs in the legend."""
    if not 0 < int(truth.sum()) < len(truth):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .detection_metrics import auroc

    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for label, scores in curves.items():
        fpr, tpr = roc_points(scores, truth)
        ax.plot(fpr, tpr, label=f"{label} ({auroc(scores, truth):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (poison found)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, title="AUROC", title_fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def read_scores(out_dir: Path) -> tuple[np.ndarray, dict]:
    """A finished detection's scores and sidecar (for compare); raises BurnError if incomplete."""
    out_dir = Path(out_dir)
    try:
        summary = json.loads((out_dir / SCORES_JSON).read_text())
        scores = np.load(out_dir / SCORES_NPY, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BurnError(f"{out_dir} holds no complete detection ({err}); run the detector again") from None
    return scores, summary
