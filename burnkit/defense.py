"""The defense base: BackdoorBench's lifecycle and CLI, once, for every defense (spec §3).

A defense module defines a config dataclass (subclass of :class:`DefenseConfig`) and a
:class:`Defense` subclass whose :meth:`Defense.repair` takes ``(model, data, cfg, run)`` and returns
the repaired model. Everything around it is done here, the same way for all defenses:

1. flags generated from the config; YAML (``--yaml_path``, default
   ``config/defense/<name>/<dataset>.yaml``, else ``config.yaml``) merged under the CLI;
2. the record ``record/<result_file>/attack_result.pt`` loaded **once**, checked against
   ``--dataset`` (taken from the record when not given);
3. the defender's clean subset: ``--index`` file, or ``int(N * ratio)`` indices drawn with Python's
   ``random`` after seeding, as BackdoorBench draws them; written to ``log/index.txt``;
4. ``repair``; then ``defense_result.pt``, ``<name>_df.csv`` + summary, plots, a log file under
   ``log/`` and ``cost.json`` (wall time per phase, device, the run's fingerprint) in
   ``record/<result_file>/defense/<name>/``.

All input checks happen before anything is written, so a bad flag or record leaves the disk as it
was. A run holds the record's lock shared and its output folder's lock exclusively
(:mod:`burnkit.locks`): a second run on the same output is refused, and the record is not replaced
under it. A resumable defense resumes only from checkpoints whose fingerprint - every result-changing
setting and digests of the weights and data read (:meth:`Defense.fingerprint`) - is this run's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import logging.handlers
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .config import as_dict, find_config_file, option, parse_config
from .data import Augment, ImageSet, imageset_digest, tensors_digest
from .datasets import DATASETS, DatasetInfo, dataset_info
from .engine import (EvalSuite, FitResult, Metrics, TrainConfig, check_checkpoints, cpu_memory_warning, evaluate,
                     fit, out_of_memory_as_error, plain_fingerprint, resolve_device, seed_everything, test_due)
from .errors import BurnError, cli_errors
from .locks import folder_lock
from .registry import Registry
from .models import Classifier, build_classifier, load_bb_state_dict
from .options import IO_GROUP, TrainingOptions, result_settings
from .records import AttackRecord, read_attack_record, write_defense_result
from .results import (MetricLog, RunStart, check_output_folders, check_writable_folder, move_aside, plot_metrics,
                      run_environment, write_json)

_REGISTRY = Registry("defense", "burnkit.defenses")
# settings of a defense or detector that only name or select what it reads (the record, its model and
# dataset, the clean samples): the digests in its fingerprint cover what they select, so a record may
# be moved, or named by another path, between a kill and the resume
READ_SELECTION_KEYS = frozenset({"result_file", "model", "dataset", "ratio", "index", "clean_sample_num"})
register_defense = _REGISTRY.register  # class decorator
get_defense = _REGISTRY.get
list_defenses = _REGISTRY.names


# --------------------------------------------------------------------------- configuration


@dataclass
class DefenseConfig(TrainingOptions):
    """Flags every BackdoorBench defense accepts (spec §3.3), under the same names; the training,
    device and compatibility flags come from :class:`~burnkit.options.TrainingOptions`."""

    result_file: str | None = option(None, "the attack record folder under record/ (or a path to it)", required=True)
    output_name: str | None = option(None, "output folder under record/<result_file>/defense/; lets variants of one "
                                           "defense share a record", cli_only=True, default_help="the defense's name",
                                      group=IO_GROUP)
    yaml_path: str | None = option(None, "the one YAML of defaults",
                                   default_help="config/defense/<name>/<dataset>.yaml", group=IO_GROUP)
    dataset: str | None = option(None, "cifar10, cifar100, gtsrb, tiny, mnist, fashion-mnist, digits",
                                 choices=tuple(DATASETS), default_help="the record's", group=IO_GROUP)
    dataset_path: str | None = option(None, "clean data: <path>/<dataset>, the dataset folder, or an image-folder archive",
                                      default_help="the data folder the record names, beside record/",
                                      group=IO_GROUP)
    download: bool = option(False, "let torchvision download a missing clean dataset (needs internet)",
                            group=IO_GROUP)
    checkpoint_load: str | None = option(None, "BackdoorBench's flag, unused there too", unused=True)
    checkpoint_save: str | None = option(None, "checkpoint folder", default_help="<output>/checkpoint/",
                                         group=IO_GROUP)
    log: str | None = option(None, "log folder; receives index.txt", default_help="<output>/log/", group=IO_GROUP)
    model: str | None = option(None, "model name; must match the record's when given", default_help="the record's",
                               group=IO_GROUP)
    batch_size: int = option(256, "batch size")
    random_seed: int = option(0, "seed for the clean subset, shuffling and augmentation")
    ratio: float = option(0.05, "share of the clean training split given to the defender", above=0, high=1)
    index: str | None = option(None, "file of clean-train indices (one per line); overrides --ratio",
                               default_help="a seeded draw of --ratio")

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.ratio <= 1.0:
            raise BurnError(f"--ratio must be in (0, 1], got {self.ratio}")


SELECT_ON = ("heldout", "test")


@dataclass
class SelectionConfig(DefenseConfig):
    """Flags of a defense that chooses its final model among candidates (FP's pruning point, ANP's
    threshold). BackdoorBench decides on the test sets; by default here the decision reads only a
    held-out part of the defender's own clean subset, so no test sample influences the model."""

    select_on: str = option("heldout", "what decides the final model: heldout (a held-out share of the clean "
                                       "subset; no test data) or test (BackdoorBench: the clean and backdoor "
                                       "test sets)", choices=SELECT_ON)
    heldout_ratio: float = option(0.1, "share of the clean subset held out for that decision (select_on heldout)")

    def validate(self) -> None:
        super().validate()
        if self.select_on not in SELECT_ON:
            raise BurnError(f"--select_on must be heldout or test, got {self.select_on!r}")
        if not 0.0 < self.heldout_ratio < 1.0:
            raise BurnError(f"--heldout_ratio must be in (0, 1), got {self.heldout_ratio}")


def split_heldout(clean: ImageSet, ratio: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """``(rest, heldout)``: ``ceil(n * ratio)`` samples of ``clean`` drawn with a seeded permutation
    (at least one on each side)."""
    n = len(clean)
    if n < 2:
        raise BurnError(f"--select_on heldout needs at least 2 clean samples, the subset has {n}; "
                        "raise --ratio or use --select_on test")
    count = min(n - 1, max(1, math.ceil(n * ratio)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return clean.subset(order[count:].sort().values), clean.subset(order[:count].sort().values)


# --------------------------------------------------------------------------- run context


@dataclass
class DefenseData:
    """What a defense may use. ``clean_subset`` is the defender's clean data (``--ratio``/
    ``--index``); ``poisoned_train`` is the record's (poisoned) training set - BURN's only data.
    ``clean_test``/``bd_test`` are for scoring only."""

    info: DatasetInfo
    clean_subset: ImageSet
    poisoned_train: ImageSet | None
    clean_test: ImageSet
    bd_test: ImageSet
    subset_indices: np.ndarray

    @property
    def eval_suite(self) -> EvalSuite:
        return EvalSuite(self.clean_test, self.bd_test)


class DefenseRun:
    """Services a ``repair`` function uses: device, folders, logger, metric log, timing, fitting."""

    def __init__(self, name: str, cfg: DefenseConfig, out_dir: Path, device: torch.device,
                 data: DefenseData, record: AttackRecord, logger: logging.Logger, fingerprint: dict | None = None):
        self.name = name
        self.cfg = cfg
        self.out_dir = out_dir
        self.log_dir, self.checkpoint_dir = run_folders(cfg, out_dir).values()
        self.fingerprint = fingerprint or {}  # what a checkpoint of this run must agree with (Defense.fingerprint)
        self.device = device
        self.data = data
        self.record = record
        self.logger = logger
        self.metrics = MetricLog(out_dir, name)
        self.timings: dict[str, float] = {}
        self.extra_results: dict = {}
        self.previous_sessions_s = 0.0  # compute of interrupted earlier processes a resumed run continues
        self.before: Metrics | None = None

    @property
    def augment(self) -> Augment:
        """BackdoorBench's train transform for this dataset (crop + flip for cifar10)."""
        return Augment(padding=self.data.info.crop_padding, flip=self.data.info.train_flip)

    @contextlib.contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start

    def evaluate(self, model: Classifier) -> Metrics:
        return evaluate(model, self.data.eval_suite, self.device, amp=self.cfg.amp)

    def test_row(self, model: Classifier, index: int, total: int, ra_loss: bool = False) -> dict:
        """The test columns of row ``index`` (0-based) of ``total``: scored every ``--test_every``
        rows and on the last, marked not scored in between (for loops that do not use :meth:`fit`)."""
        if not test_due(index, total, self.cfg.test_every):
            return Metrics.skipped_row(ra_loss)
        with self.timed("evaluate"):
            return self.evaluate(model).row(ra_loss)

    def record_decision(self, select_on: str, heldout: int = 0) -> None:
        """Say in ``cost.json`` what chose the final model: the test sets or ``heldout`` clean samples."""
        self.extra_results.update({"select_on": select_on, "heldout_size": int(heldout),
                                   "test_data_for_decisions": select_on == "test"})

    def fit(self, model: Classifier, train_set: ImageSet, train_cfg: TrainConfig | None = None,
            log: bool = True, phase: str = "train", **kwargs) -> FitResult:
        """``engine.fit`` with this run's device, seed, augmentation and scoring; rows go to the
        defense's CSV (written after every epoch) unless ``log`` is False."""
        train_cfg = train_cfg or self.cfg.train_config()
        kwargs.setdefault("augment", self.augment)
        kwargs.setdefault("seed", self.cfg.random_seed)
        kwargs.setdefault("eval_suite", self.data.eval_suite)
        kwargs.setdefault("progress", self.cfg.progress)
        kwargs.setdefault("eval_every", self.cfg.test_every)
        kwargs.setdefault("desc", f"{self.name}:{phase}")
        kwargs.setdefault("flags", self.cfg)
        if log:
            user_on_row = kwargs.pop("on_row", None)

            def on_row(row):
                self.metrics.append(row)
                self.metrics.save()
                if user_on_row:
                    user_on_row(row)

            kwargs["on_row"] = on_row
        with self.timed(phase):
            result = fit(model, train_set, train_cfg, device=self.device, **kwargs)
        self.logger.info("%s: %d epochs in %.1fs", phase, result.epochs_run, result.wall_time_s)
        return result


# --------------------------------------------------------------------------- the base class


class Defense:
    """Base class: subclasses set ``name`` and ``config_cls`` and implement :meth:`repair`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[DefenseConfig]] = DefenseConfig
    needs_clean_subset: ClassVar[bool] = True
    # flags of config_cls this defense accepts (BackdoorBench's command lines and YAML files carry
    # them) but never reads, e.g. the optimiser flags of a defense that builds its own optimiser;
    # --help lists them apart so that nobody tunes a flag that changes nothing
    unused_flags: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # config keys that measure the defense's compute budget (cost.json "budget"); the default list
    # covers defenses that do not set their own (e.g. BURN: iterations and epochs per iteration)
    budget_keys: ClassVar[tuple[str, ...]] = ("iterations", "n_rounds", "nb_iter", "te_epochs", "epochs")

    def budget(self, cfg: DefenseConfig) -> dict:
        """``{key: (value, default)}`` for the budget keys this config has (default: the config's own,
        which is BackdoorBench's cifar10 value for the baselines)."""
        fields = {f.name: f for f in dataclasses.fields(cfg)}
        return {k: [getattr(cfg, k), fields[k].default] for k in self.budget_keys if k in fields}

    def repair(self, model: Classifier, data: DefenseData, cfg: DefenseConfig, run: DefenseRun) -> Classifier:
        raise NotImplementedError(f"{type(self).__name__} must implement repair()")

    def preflight(self, cfg: DefenseConfig, record: AttackRecord, out_dir: Path) -> None:
        """Checks that need the record and the output folder but must fail before anything is
        written (a flag that selects no sample, a layer the network lacks)."""

    def fingerprint(self, cfg: DefenseConfig, weights: str, data: DefenseData) -> dict:
        """What a checkpoint of this run must agree with to be resumed: the defense, every setting but
        the run-only ones (:func:`~burnkit.options.result_settings`; a new setting is covered by
        default) and digests of everything the run reads - the record's weights (``weights``, taken
        before the record's copy is dropped), its poisoned training set, the clean subset and the
        test sets. A record replaced by another with as many samples, or a changed setting, is
        refused instead of silently continued; the record's path is not part of it."""
        return plain_fingerprint({"defense": self.name, **result_settings(cfg, READ_SELECTION_KEYS),
                                  "data": self.read_digests(weights, data)})

    def check_resume(self, cfg: DefenseConfig, checkpoint_dir: Path, fingerprint: dict) -> None:
        """Before anything is written, refuse a checkpoint this run would resume from that another
        run made (other settings, another record's weights or data) or that cannot be read. The
        default checks the training checkpoints of :func:`burnkit.defenses.retraining.fit_phase`;
        a defense with checkpoints of its own (BURN) overrides it."""
        if checkpoint_dir.is_dir():
            check_checkpoints(checkpoint_dir, fingerprint)

    def read_digests(self, weights: str, data: DefenseData) -> dict:
        """Digests of everything a run reads (:func:`~burnkit.data.tensors_digest`): the record's
        weights (``weights``, taken before the record's copy is dropped), its poisoned training set,
        the clean subset and the test sets - the content the run's numbers depend on, whatever path
        named it."""
        sets = {"bd_train": data.poisoned_train, "clean_subset": data.clean_subset, "clean_test": data.clean_test,
                "bd_test": data.bd_test}
        return {"weights": weights, **{k: imageset_digest(v) if v is not None else None for k, v in sets.items()}}

    def choose_subset(self, clean_train: ImageSet, cfg: DefenseConfig) -> np.ndarray:
        """The defender's clean-train indices: ``--index`` or a seeded ``--ratio`` sample (spec §3.5).
        A defense with its own selection rule (FT-SAM) overrides this."""
        return choose_clean_indices(len(clean_train), cfg.ratio, cfg.index, cfg.random_seed)

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def default_yaml(cls, cli: dict, record: "AttackRecord | None" = None) -> Path | None:
        """``config/defense/<name>/<dataset>.yaml`` for ``--dataset``, else for the record's dataset
        (``record``, already read by :meth:`parse`), else ``config.yaml``."""
        dataset = cli.get("dataset") or (record.clean_data if record is not None else None)
        candidates = [f"config/defense/{cls.name}/{dataset}.yaml"] if dataset else []
        candidates.append(f"config/defense/{cls.name}/config.yaml")
        return find_config_file(*candidates)

    @classmethod
    def ignored_flags(cls) -> tuple[str, ...]:
        """:attr:`unused_flags`, and the clean-subset flags of a defense that gets no clean data."""
        return (*cls.unused_flags, *(() if cls.needs_clean_subset else ("ratio", "index")))

    @classmethod
    def parse(cls, argv=None, prog: str | None = None, loaded: dict | None = None):
        """CLI + YAML -> config. Without ``--dataset`` and ``--yaml_path`` the record is read here to
        pick its dataset's YAML; it is left in ``loaded["record"]`` so that :meth:`run` does not read
        it a second time. A record that cannot be read is left for :meth:`run` to report."""
        prog = prog or f"defense/{cls.name}.py"
        loaded = {} if loaded is None else loaded

        def default_yaml(cli: dict) -> Path | None:
            if not cli.get("dataset") and cli.get("result_file"):
                record_dir = resolve_record_dir(cli["result_file"])
                if (record_dir / "attack_result.pt").is_file():
                    try:
                        loaded["record"] = read_attack_record(record_dir)
                    except BurnError:
                        pass
            return cls.default_yaml(cli, loaded.get("record"))

        return parse_config(cls.config_cls, sys.argv[1:] if argv is None else argv, prog,
                            cls.description or (cls.__doc__ or "").strip().split("\n")[0], default_yaml,
                            unused=cls.ignored_flags(), method=cls.name)

    @classmethod
    def main(cls, argv=None) -> dict:
        """The CLI entry point: errors become one line and exit code 2."""
        prog = f"defense/{cls.name}.py"
        with cli_errors(prog):
            loaded: dict = {}
            cfg, yaml_path, ignored = cls.parse(argv, prog, loaded)
            return cls().run(cfg, ignored_keys=ignored, record=loaded.pop("record", None))

    def run(self, cfg: DefenseConfig, ignored_keys=(), record: AttackRecord | None = None) -> dict:
        """The lifecycle, holding the record's lock shared and the output folder's exclusively."""
        with contextlib.ExitStack() as held:
            held.enter_context(record_read_lock(cfg))
            return self._run(cfg, ignored_keys, record, held)

    def _run(self, cfg: DefenseConfig, ignored_keys, record: AttackRecord | None, held: contextlib.ExitStack) -> dict:
        started, start = time.perf_counter(), RunStart()
        record_dir, record = open_record(cfg, record)
        out_dir = record_dir / "defense" / (cfg.output_name or self.name)
        check_writable_folder(out_dir, "the output folder")
        held.enter_context(folder_lock(out_dir, "the output folder"))
        finished = (out_dir / "defense_result.pt").exists()
        if finished and not cfg.overwrite:
            raise BurnError(f"{out_dir} already holds a finished {self.name} result; pass --overwrite true to "
                            "replace it (the old folder is kept, renamed) or --output_name NEW for a second one")
        check_output_folders(out_dir, run_folders(cfg, out_dir), moved_aside=finished)
        if not finished:  # a finished output is moved aside with its checkpoints
            self.preflight(cfg, record, out_dir)
        device = resolve_device(cfg.device)
        info = dataset_info(record.clean_data)
        seed_everything(cfg.random_seed)
        model = build_classifier(record.model_name, info, record.num_classes)
        load_bb_state_dict(model, record.state_dict)
        weights = tensors_digest(record.state_dict.items())
        # the model holds the weights now: drop this run's reference to the record's copy (a
        # ViT-L's weights are 1.2 GB that would otherwise stay in memory beside the model's)
        record = dataclasses.replace(record, state_dict={})
        loaded = record.load_data(cfg.dataset_path, download=cfg.download)
        if self.needs_clean_subset:
            subset_idx = self.choose_subset(loaded.clean_train, cfg)
        else:  # e.g. BURN: the algorithm gets no clean sample at all; index.txt is written empty
            subset_idx = np.zeros(0, dtype=np.int64)
        data = DefenseData(info, loaded.clean_train.subset(subset_idx), loaded.bd_train,
                           loaded.clean_test, loaded.bd_test, subset_idx)
        fingerprint = self.fingerprint(cfg, weights, data)
        if not finished and getattr(cfg, "resume", False):  # a finished output is moved aside with its checkpoints
            self.check_resume(cfg, checkpoint_folder(cfg, out_dir), fingerprint)

        # -- inputs are valid: from here on we write ------------------------------------------
        replaced = move_aside(out_dir) if finished else None
        out_dir.mkdir(parents=True, exist_ok=True)
        logger = _make_logger(self.name, Path(cfg.log) if cfg.log else out_dir / "log")
        run = DefenseRun(self.name, cfg, out_dir, device, data, record, logger, fingerprint)
        run.log_dir.mkdir(parents=True, exist_ok=True)
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        np.savetxt(run.log_dir / "index.txt", subset_idx, fmt="%d")
        if replaced is not None:
            logger.warning("--overwrite: the previous result was moved to %s", replaced)
        if ignored_keys:
            logger.info("BackdoorBench YAML keys accepted but not used by %s: %s", self.name, ", ".join(ignored_keys))
        if not self.needs_clean_subset and cfg.index:
            logger.warning("%s uses no clean data: --index %s is ignored", self.name, cfg.index)
        logger.info("defense %s on %s (%s, %s) device %s", self.name, record_dir, record.model_name,
                    record.clean_data, device)
        logger.info("config: %s", as_dict(cfg))
        logger.info("clean data: %d training and %d test images (%s); the defender's clean subset: %d",
                    len(loaded.clean_train), len(loaded.clean_test), record.data_root(cfg.dataset_path)
                    if record.clean_data != "digits" else "scikit-learn", len(subset_idx))
        with run.timed("evaluate_attacked"):
            run.before = run.evaluate(model)
        logger.info("attacked model: acc %s asr %s ra %s", _pct(run.before.acc), _pct(run.before.asr), _pct(run.before.ra))

        warning = cpu_memory_warning(model, device, f"{self.name} on {record.model_name}", cfg)
        if warning:
            logger.warning(warning)
        seed_everything(cfg.random_seed)
        with run.timed("repair"), out_of_memory_as_error(f"{self.name} on {record.model_name}", device, cfg):
            model = self.repair(model, data, cfg, run)
        if not run.metrics.rows:  # defenses that do not train still report their final metrics
            run.metrics.append({"epoch": 0, **run.evaluate(model).row()})
        run.metrics.finish()
        plot_metrics([r for r in run.metrics.rows], out_dir, prefix="")
        final = run.metrics.last()
        cost = {"defense": self.name, "result_file": cfg.result_file, "wall_time_s": time.perf_counter() - started,
                "phases_s": run.timings, **run_environment(device, start, cfg, fingerprint["data"], record_digest=weights),
                **({"wall_time_s_all_sessions": time.perf_counter() - started + run.previous_sessions_s}
                   if run.previous_sessions_s else {}),
                "attacked": run.before.row(), "final": {k: final.get(k) for k in ("test_acc", "test_asr", "test_ra")},
                "clean_subset_size": int(len(subset_idx)), "train_set_size": _train_set_size(record),
                "budget": self.budget(cfg), "test_data_for_decisions": False, **run.extra_results,
                "fingerprint": fingerprint}
        write_json(out_dir / "cost.json", cost)
        # the result file marks the output as finished (compare, --overwrite), so it is written last
        write_defense_result(out_dir, record.model_name, record.num_classes, model.bb_state_dict())
        logger.info("final: acc %s asr %s ra %s (wall %.1fs) -> %s", _pct(final.get("test_acc")),
                    _pct(final.get("test_asr")), _pct(final.get("test_ra")), cost["wall_time_s"], out_dir)
        _close_logger(logger)
        return {"model": model, "out_dir": out_dir, "final": final, "before": run.before, "cost": cost}


def run_folders(cfg: DefenseConfig, out_dir: Path) -> dict[str, Path]:
    """The log and checkpoint folders of a run: ``--log`` / ``--checkpoint_save``, else inside ``out_dir``."""
    return {"the log folder (--log)": Path(cfg.log) if cfg.log else out_dir / "log",
            "the checkpoint folder (--checkpoint_save)": checkpoint_folder(cfg, out_dir)}


def checkpoint_folder(cfg: DefenseConfig, out_dir: Path) -> Path:
    """``--checkpoint_save``, else ``<output>/checkpoint``."""
    return Path(cfg.checkpoint_save) if cfg.checkpoint_save else out_dir / "checkpoint"


def _train_set_size(record: AttackRecord) -> int | None:
    """How many training samples the attacked model learnt from: the attack's ``train_subset_size``
    (our records' provenance.json), else the length of the record's training split."""
    try:
        facts = json.loads((record.record_dir / "provenance.json").read_text())
        if facts.get("train_subset_size"):
            return int(facts["train_subset_size"])
    except (OSError, ValueError, AttributeError):
        pass
    return None if record.bd_train is None else int(len(record.bd_train.original_index))


def open_record(cfg, record: AttackRecord | None = None) -> tuple[Path, AttackRecord]:
    """The record ``cfg`` names, checked against ``--output_name``, ``--dataset`` and ``--model``
    before anything is written (defenses and detectors share these checks). ``record`` is the one
    parsing already read for YAML defaults, reused when it is the same folder; ``cfg.dataset`` is
    set to the record's dataset."""
    if not cfg.result_file:
        raise BurnError("--result_file is required: the attack record folder under record/")
    name = cfg.output_name
    if name is not None and (not name.strip() or Path(name).name != name or name in (".", "..")):
        raise BurnError(f"--output_name must be a plain folder name, got {name!r}")
    record_dir = resolve_record_dir(cfg.result_file)
    if record is None or record.record_dir != record_dir:
        record = read_attack_record(record_dir, dataset=cfg.dataset)
    elif cfg.dataset is not None and cfg.dataset != record.clean_data:
        raise BurnError(f"--dataset {cfg.dataset} contradicts the record, which was made on {record.clean_data}; "
                        f"pass --dataset {record.clean_data}")
    cfg.dataset = record.clean_data
    if cfg.model and cfg.model != record.model_name:
        raise BurnError(f"--model {cfg.model} contradicts the record's model {record.model_name}; drop --model")
    return record_dir, record


def record_read_lock(cfg):
    """The lock of the record ``cfg`` names, shared (:mod:`burnkit.locks`), to hold from before the
    record is read to the end of the run, so that no attack replaces it meanwhile; nothing to hold
    when that folder does not exist (:func:`open_record` then says so)."""
    record_dir = resolve_record_dir(cfg.result_file) if cfg.result_file else None
    if record_dir is None or not record_dir.is_dir():
        return contextlib.nullcontext()
    return folder_lock(record_dir, "the record", shared=True)


def resolve_record_dir(result_file: str) -> Path:
    """``record/<result_file>`` relative to the CWD (BackdoorBench), or ``result_file`` itself
    when it is a path to a record folder."""
    given = Path(result_file)
    candidates = [Path("record") / result_file, given]
    for candidate in candidates:
        if (candidate / "attack_result.pt").is_file():
            return candidate
    return candidates[0]


def choose_clean_indices(n: int, ratio: float, index_file: str | None, seed: int) -> np.ndarray:
    """BackdoorBench's ``choose_index``: the ``--index`` file, else ``random.sample(range(n),
    int(n * ratio))`` with Python's RNG seeded by ``seed``."""
    if index_file:
        path = Path(index_file)
        if not path.is_file():
            raise BurnError(f"--index file {path} not found")
        try:
            with warnings.catch_warnings():  # NumPy warns about a file without data: that is reported below
                warnings.simplefilter("ignore", UserWarning)
                idx = np.loadtxt(path, dtype=np.int64, ndmin=1)
        except ValueError:
            raise BurnError(f"--index file {path} must hold one integer per line") from None
        if idx.size == 0:
            raise BurnError(f"--index file {path} is empty; list the clean training indices, one per line")
        if idx.ndim != 1:
            raise BurnError(f"--index file {path} must hold one integer per line")
        if idx.min() < 0 or idx.max() >= n:
            raise BurnError(f"--index file {path} has indices outside 0..{n - 1} (the clean training split)")
        values, counts = np.unique(idx, return_counts=True)
        if (counts > 1).any():  # a repeated sample would count several times in the defender's clean data
            repeated = int(np.flatnonzero(counts > 1)[0])
            raise BurnError(f"--index file {path} lists index {int(values[repeated])} {int(counts[repeated])} times; "
                            "list each index once")
        return idx
    count = int(n * ratio)
    if count == 0:
        raise BurnError(f"--ratio {ratio} of {n} training samples selects nothing; raise --ratio")
    rng = random.Random(seed)
    return np.asarray(rng.sample(range(n), count), dtype=np.int64)


LOG_FORMAT = "%(asctime)s [%(levelname)s] %(message)s"


def _make_logger(name: str, log_dir: Path | None) -> logging.Logger:
    """A run's logger: INFO to stdout, everything to ``<log_dir>/<time>.log``. With ``log_dir``
    None the file records are buffered until :func:`attach_log_file` (nothing is written while the
    inputs are still being checked)."""
    logger = logging.getLogger(f"burnkit.{name}.{time.time_ns()}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(logging.Formatter(f"[{name}] %(message)s"))
    sh.setLevel(logging.INFO)
    logger.addHandler(sh)
    if log_dir is None:
        logger.addHandler(logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
    else:
        attach_log_file(logger, log_dir)
    return logger


def attach_log_file(logger: logging.Logger, log_dir: Path) -> None:
    """Open the log file and write what was buffered so far into it."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    fh = _LogFile(log_dir / f"{time.strftime('%Y_%m_%d_%H_%M_%S')}.log")
    fh.setFormatter(logging.Formatter(LOG_FORMAT))
    fh.setLevel(logging.DEBUG)
    for handler in list(logger.handlers):
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.setTarget(fh)
            handler.flush()
            logger.removeHandler(handler)
            handler.close()
    logger.addHandler(fh)


class _LogFile(logging.FileHandler):
    """A run's log file. A write that fails (a full disk) stops the run with that error - one line at
    the command line - instead of logging's default: a traceback on stderr for every record, while
    the run goes on."""

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            raise err
        super().handleError(record)


def _close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"
