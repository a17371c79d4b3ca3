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
   ``log/`` and ``cost.json`` (wall time per phase, device) in ``record/<result_file>/defense/<name>/``.

All input checks happen before anything is written, so a bad flag or record leaves the disk as it
was.
"""
from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .config import as_dict, find_config_file, option, parse_config
from .data import Augment, ImageSet
from .datasets import DATASETS, DatasetInfo, dataset_info
from .engine import (EvalSuite, FitResult, Metrics, TrainConfig, evaluate, fit, out_of_memory_as_error,
                     resolve_device, seed_everything)
from .errors import BurnError, cli_errors
from .registry import Registry
from .models import Classifier, build_classifier, load_bb_state_dict
from .options import TrainingOptions
from .records import AttackRecord, read_attack_record, write_defense_result
from .results import MetricLog, check_writable_folder, move_aside, plot_metrics, run_environment, write_json

_REGISTRY = Registry("defense", "burnkit.defenses")
register_defense = _REGISTRY.register  # class decorator
get_defense = _REGISTRY.get
list_defenses = _REGISTRY.names


# --------------------------------------------------------------------------- configuration


@dataclass
class DefenseConfig(TrainingOptions):
    """Flags every BackdoorBench defense accepts (spec §3.3), under the same names; the training,
    device and compatibility flags come from :class:`~burnkit.options.TrainingOptions`."""

    result_file: str | None = option(None, "attack record folder under record/ (or a path to it)")
    output_name: str | None = option(None, "output folder under record/<result_file>/defense/ (default: the defense's name); lets variants of one defense share a record", cli_only=True)
    yaml_path: str | None = option(None, "the one YAML of defaults (default config/defense/<name>/<dataset>.yaml)")
    dataset: str | None = option(None, "cifar10, cifar100, gtsrb, tiny, mnist, fashion-mnist, digits (default: the record's)",
                                 choices=tuple(DATASETS))
    dataset_path: str | None = option(None, "clean data: <path>/<dataset>, the dataset folder, or an image-folder archive")
    download: bool = option(False, "let torchvision download a missing clean dataset (needs internet)")
    checkpoint_load: str | None = option(None, "accepted for BackdoorBench compatibility (unused, as there)")
    checkpoint_save: str | None = option(None, "checkpoint folder (default <output>/checkpoint/)")
    log: str | None = option(None, "log folder (default <output>/log/); receives index.txt")
    model: str | None = option(None, "model name; must match the record's when given")
    batch_size: int = option(256, "batch size")
    random_seed: int = option(0, "seed for the clean subset, shuffling and augmentation")
    ratio: float = option(0.05, "share of the clean training split given to the defender", above=0, high=1)
    index: str | None = option(None, "file of clean-train indices (one per line); overrides --ratio")

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.ratio <= 1.0:
            raise BurnError(f"--ratio must be in (0, 1], got {self.ratio}")


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
                 data: DefenseData, record: AttackRecord, logger: logging.Logger):
        self.name = name
        self.cfg = cfg
        self.out_dir = out_dir
        self.log_dir = Path(cfg.log) if cfg.log else out_dir / "log"
        self.checkpoint_dir = Path(cfg.checkpoint_save) if cfg.checkpoint_save else out_dir / "checkpoint"
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
    description: ClassVar[str] = ""

    def repair(self, model: Classifier, data: DefenseData, cfg: DefenseConfig, run: DefenseRun) -> Classifier:
        raise NotImplementedError(f"{type(self).__name__} must implement repair()")

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
                            cls.description or (cls.__doc__ or "").strip().split("\n")[0], default_yaml)

    @classmethod
    def main(cls, argv=None) -> dict:
        """The CLI entry point: errors become one line and exit code 2."""
        prog = f"defense/{cls.name}.py"
        with cli_errors(prog):
            loaded: dict = {}
            cfg, yaml_path, ignored = cls.parse(argv, prog, loaded)
            return cls().run(cfg, ignored_keys=ignored, record=loaded.get("record"))

    def run(self, cfg: DefenseConfig, ignored_keys=(), record: AttackRecord | None = None) -> dict:
        started = time.perf_counter()
        if not cfg.result_file:
            raise BurnError("--result_file is required: the attack record folder under record/")
        if cfg.output_name is not None and (not cfg.output_name.strip() or Path(cfg.output_name).name != cfg.output_name
                                           or cfg.output_name in (".", "..")):
            raise BurnError(f"--output_name must be a plain folder name, got {cfg.output_name!r}")
        record_dir = resolve_record_dir(cfg.result_file)
        if record is None or record.record_dir != record_dir:
            record = read_attack_record(record_dir, dataset=cfg.dataset)
        elif cfg.dataset is not None and cfg.dataset != record.clean_data:
            raise BurnError(f"--dataset {cfg.dataset} contradicts the record, which was made on {record.clean_data}; "
                            f"pass --dataset {record.clean_data}")
        cfg.dataset = record.clean_data
        if cfg.model and cfg.model != record.model_name:
            raise BurnError(f"--model {cfg.model} contradicts the record's model {record.model_name}; drop --model")
        out_dir = record_dir / "defense" / (cfg.output_name or self.name)
        finished = (out_dir / "defense_result.pt").exists()
        if finished and not cfg.overwrite:
            raise BurnError(f"{out_dir} already holds a finished {self.name} result; pass --overwrite true to "
                            "replace it (the old folder is kept, renamed) or --output_name NEW for a second one")
        check_writable_folder(out_dir, "the output folder")
        if cfg.log:
            check_writable_folder(cfg.log, "--log")
        if cfg.checkpoint_save:
            check_writable_folder(cfg.checkpoint_save, "--checkpoint_save")
        device = resolve_device(cfg.device)
        info = dataset_info(record.clean_data)
        seed_everything(cfg.random_seed)
        model = build_classifier(record.model_name, info, record.num_classes)
        load_bb_state_dict(model, record.state_dict)
        loaded = record.load_data(cfg.dataset_path, download=cfg.download)
        if self.needs_clean_subset:
            subset_idx = self.choose_subset(loaded.clean_train, cfg)
        else:  # e.g. BURN: the algorithm gets no clean sample at all; index.txt is written empty
            subset_idx = np.zeros(0, dtype=np.int64)
        data = DefenseData(info, loaded.clean_train.subset(subset_idx), loaded.bd_train,
                           loaded.clean_test, loaded.bd_test, subset_idx)

        # -- inputs are valid: from here on we write ------------------------------------------
        replaced = move_aside(out_dir) if finished else None
        out_dir.mkdir(parents=True, exist_ok=True)
        logger = _make_logger(self.name, Path(cfg.log) if cfg.log else out_dir / "log")
        run = DefenseRun(self.name, cfg, out_dir, device, data, record, logger)
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
        with run.timed("evaluate_attacked"):
            run.before = run.evaluate(model)
        logger.info("attacked model: acc %s asr %s ra %s", _pct(run.before.acc), _pct(run.before.asr), _pct(run.before.ra))

        seed_everything(cfg.random_seed)
        with run.timed("repair"), out_of_memory_as_error(f"{self.name} on {record.model_name}", device, cfg):
            model = self.repair(model, data, cfg, run)
        if not run.metrics.rows:  # defenses that do not train still report their final metrics
            run.metrics.append({"epoch": 0, **run.evaluate(model).row()})
        run.metrics.save()
        plot_metrics([r for r in run.metrics.rows], out_dir, prefix="")
        write_defense_result(out_dir, record.model_name, record.num_classes, model.bb_state_dict())
        final = run.metrics.last()
        cost = {"defense": self.name, "result_file": cfg.result_file, "wall_time_s": time.perf_counter() - started,
                "phases_s": run.timings, **run_environment(device),
                **({"wall_time_s_all_sessions": time.perf_counter() - started + run.previous_sessions_s}
                   if run.previous_sessions_s else {}),
                "attacked": run.before.row(), "final": {k: final.get(k) for k in ("test_acc", "test_asr", "test_ra")},
                "clean_subset_size": int(len(subset_idx)), **run.extra_results}
        write_json(out_dir / "cost.json", cost)
        logger.info("final: acc %s asr %s ra %s (wall %.1fs) -> %s", _pct(final.get("test_acc")),
                    _pct(final.get("test_asr")), _pct(final.get("test_ra")), cost["wall_time_s"], out_dir)
        _close_logger(logger)
        return {"model": model, "out_dir": out_dir, "final": final, "before": run.before, "cost": cost}


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
            idx = np.loadtxt(path, dtype=np.int64, ndmin=1)
        except ValueError:
            raise BurnError(f"--index file {path} must hold one integer per line") from None
        if idx.size == 0:
            raise BurnError(f"--index file {path} is empty")
        if idx.min() < 0 or idx.max() >= n:
            raise BurnError(f"--index file {path} has indices outside 0..{n - 1} (the clean training split)")
        return idx
    count = int(n * ratio)
    if count == 0:
        raise BurnError(f"--ratio {ratio} of {n} training samples selects nothing; raise --ratio")
    rng = random.Random(seed)
    return np.asarray(rng.sample(range(n), count), dtype=np.int64)


def _make_logger(name: str, log_dir: Path) -> logging.Logger:
    log_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"burnkit.{name}.{time.time_ns()}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s")
    fh = logging.FileHandler(log_dir / f"{time.strftime('%Y_%m_%d_%H_%M_%S')}.log")
    fh.setFormatter(fmt)
    fh.setLevel(logging.DEBUG)
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(logging.Formatter(f"[{name}] %(message)s"))
    sh.setLevel(logging.INFO)
    logger.addHandler(fh)
    logger.addHandler(sh)
    return logger


def _close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"
