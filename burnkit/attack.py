"""The attack base: poison a dataset, train the victim with the engine, write a BackdoorBench record.

An attack module defines a config dataclass (subclass of :class:`AttackConfig`) and an
:class:`Attack` subclass with :meth:`Attack.apply_trigger` (clean uint8 images -> poisoned uint8
images). Everything else follows BackdoorBench's BadNets-family semantics (spec §1.4, §6):

* args: prototype YAML (``--yaml_path``, default ``config/attack/prototype/<dataset>.yaml``) <
  attack YAML (``--bd_yaml_path``, default ``config/attack/<name>/default.yaml``) < CLI;
* training poison set: ``round(pratio * N)`` indices drawn uniformly without replacement from the
  whole training set (target-class images included), or - for clean-label attacks - from the
  target class only; test poison set: every test sample whose label is not the target (all2one),
  or all of them (all2all);
* labels: all2one -> ``attack_target``; all2all -> ``(y + attack_label_shift_amount) % K``;
* optional ``--train_subset N``: train on a class-balanced, seeded subset of N training samples
  (CPU-scale experiments). The record stays a whole-split record for BackdoorBench's consumers
  (``bd_train.original_index_array`` = ``arange(N_train)``, the poison indicator flags exactly the
  poisoned samples, all of them inside the subset), because its detection scripts and MCR assume
  that position = original index. The subset the model was trained on is the extra top-level key
  ``train_subset_index`` (BackdoorBench's loader ignores extra keys); burnkit's reader restricts
  ``bd_train`` to it, so BURN and detection reports see the training set the model saw.

Output: ``record/<save_folder_name>/`` with ``attack_result.pt``, the PNG folders,
``attack_df.csv`` + summary, ``info.pickle``, ``train_poison_index_list.pickle``, a log, plots and
``provenance.json`` (config, seed, git revision, wall time, device). Training checkpoints every
epoch; re-running the same command after a kill resumes. The run holds the record folder's lock
exclusively (:mod:`burnkit.locks`): a second attack on the same folder is refused, and so is
``--overwrite`` while a defense or detector reads the record.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from .config import as_dict, build_parser, check_yaml_keys, find_config_file, load_yaml, merge, option, parse_cli
from .data import Augment, ImageSet, class_balanced_subset, imageset_digest, tensors_digest
from .datasets import DATASETS, DatasetInfo, dataset_info, load_split, resolve_data_root
from .defense import _close_logger, _make_logger, _pct, attach_log_file
from .engine import (EvalSuite, FitResult, TrainConfig, check_trainable, cpu_memory_warning, fit, load_checkpoint,
                     out_of_memory_as_error, plain_fingerprint, resolve_device, seed_everything)
from .errors import BurnError, cli_errors
from .locks import folder_lock
from .registry import Registry
from .models import Classifier, build_classifier
from .options import IO_GROUP, TrainingOptions, result_settings
from .records import PoisonedSplit, atomic_torch_save, write_attack_record
from .results import (MetricLog, RunStart, check_output_folders, move_aside, plot_metrics, portable_config, portable_path,
                      run_environment, write_json)

_REGISTRY = Registry("attack", "burnkit.attacks")
register_attack = _REGISTRY.register  # class decorator
get_attack = _REGISTRY.get
list_attacks = _REGISTRY.names


@dataclass
class AttackConfig(TrainingOptions):
    """BackdoorBench's prototype + attack keys (spec §6.1); the training, device and compatibility
    flags come from :class:`~burnkit.options.TrainingOptions`."""

    yaml_path: str | None = option(None, "prototype YAML", cli_only=True,
                                   default_help="config/attack/prototype/<dataset>.yaml", group=IO_GROUP)
    bd_yaml_path: str | None = option(None, "attack YAML", cli_only=True,
                                      default_help="config/attack/<attack>/default.yaml", group=IO_GROUP)
    save_folder_name: str | None = option(None, "record folder name under record/",
                                          default_help="<time>_<attack>_<dataset>_<model>", group=IO_GROUP)
    dataset: str = option("cifar10", "cifar10, cifar100, gtsrb, tiny, mnist, fashion-mnist, digits", choices=tuple(DATASETS))
    dataset_path: str = option("./data", "clean data: <path>/<dataset>, the dataset folder, or an image-folder archive",
                               group=IO_GROUP)
    download: bool = option(False, "let torchvision download a missing clean dataset (needs internet)", group=IO_GROUP)
    model: str = option("preactresnet18", "victim architecture (attack_models zoo)")
    epochs: int = option(100, "training epochs")
    random_seed: int = option(0, "seed for poison selection, subset, init and training")
    attack: str | None = option(None, "BackdoorBench's attack name key; the script's name is what counts",
                                unused=True)
    attack_label_trans: str = option("all2one", "all2one or all2all", choices=("all2one", "all2all"))
    attack_target: int = option(0, "target class (all2one)", low=0)
    attack_label_shift_amount: int = option(1, "label shift (all2all)")
    pratio: float = option(0.1, "poisoning ratio", low=0, high=1)
    train_subset: int = option(0, "train on a class-balanced subset of this many samples (0 = all)", low=0)
    resume: bool = option(True, "resume an interrupted training from its checkpoint")

    def validate(self) -> None:
        super().validate()
        name = self.save_folder_name
        if name is not None and (not name.strip() or Path(name).name != name or name in (".", "..")
                                 or "\\" in name):
            raise BurnError(f"--save_folder_name must be a plain folder name (the record goes to record/<name>), "
                            f"got {name!r}")
        if self.attack_label_trans not in ("all2one", "all2all"):
            raise BurnError(f"attack_label_trans must be all2one or all2all, got {self.attack_label_trans!r}")
        if not 0.0 <= self.pratio <= 1.0:
            raise BurnError(f"pratio must be in [0, 1], got {self.pratio}")
        if self.train_subset < 0:
            raise BurnError(f"--train_subset must be >= 0, got {self.train_subset}")


@dataclass
class PoisonPlan:
    """Which samples are poisoned and which labels they get."""

    train_positions: np.ndarray  # original train indices in the (sub)set that is trained on
    train_poison: np.ndarray  # original train indices that are poisoned
    test_poison: np.ndarray  # original test indices in bd_test


@dataclass
class PoisonedData:
    """The clean splits, the plan and the statically poisoned images, as ``run`` holds them."""

    train_x: np.ndarray  # N_train x H x W x C uint8, the whole clean split
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    plan: PoisonPlan
    train_bd: np.ndarray  # images of plan.train_poison after apply_trigger
    train_bd_labels: np.ndarray
    test_bd: np.ndarray  # images of plan.test_poison after apply_trigger
    test_bd_labels: np.ndarray


class Attack:
    """Base class; subclasses set ``name``/``config_cls`` and implement :meth:`apply_trigger`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[AttackConfig]] = AttackConfig
    clean_label: ClassVar[bool] = False
    resumable: ClassVar[bool] = True  # False: the attack has state the engine's checkpoint lacks
    # flags of config_cls this attack accepts but never reads (listed apart in --help), e.g. the
    # optimiser flags of an attack whose classifier's optimiser is fixed
    unused_flags: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    logger: logging.Logger = logging.getLogger("burnkit")  # the run's logger once ``run`` starts

    def __init__(self, cfg: AttackConfig, info: DatasetInfo):
        self.cfg = cfg
        self.info = info

    # -- what an attack defines ----------------------------------------------------------------

    def apply_trigger(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, train: bool) -> np.ndarray:
        """Poison ``images`` (``n x H x W x C`` uint8, already at the dataset's size); return uint8."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply_trigger()")

    def target_labels(self, labels: np.ndarray) -> np.ndarray:
        if self.cfg.attack_label_trans == "all2one":
            return np.full_like(labels, self.cfg.attack_target)
        return (labels + self.cfg.attack_label_shift_amount) % self.info.num_classes

    def plan(self, train_y: np.ndarray, test_y: np.ndarray, rng: np.random.Generator) -> PoisonPlan:
        cfg = self.cfg
        if cfg.train_subset:
            positions = class_balanced_subset(train_y, cfg.train_subset, rng)
        else:
            positions = np.arange(len(train_y))
        if self.clean_label:
            pool = positions[train_y[positions] == cfg.attack_target]
        else:
            pool = positions
        count = int(round(cfg.pratio * len(positions)))
        if count > len(pool):
            raise BurnError(f"pratio {cfg.pratio} asks for {count} poisoned samples but only {len(pool)} "
                            f"{'target-class ' if self.clean_label else ''}samples are available; lower pratio to at most "
                            f"{len(pool) / max(1, len(positions)):.4f}")
        train_poison = np.sort(backdoorbench_poison_draw(pool, count, cfg.random_seed))
        if cfg.attack_label_trans == "all2one":
            test_poison = np.flatnonzero(test_y != cfg.attack_target)
        else:
            test_poison = np.arange(len(test_y))
        return PoisonPlan(positions.astype(np.int64), train_poison.astype(np.int64), test_poison.astype(np.int64))

    def train(self, model: Classifier, train_set: ImageSet, suite: EvalSuite, device: torch.device,
              log: MetricLog, checkpoint: Path) -> FitResult:
        """Train the victim on the poisoned set (the engine's plain cross-entropy loop)."""
        cfg = self.cfg

        def on_row(row):
            log.append(row)
            log.save()

        return fit(model, train_set, self.train_config(), device=device, eval_suite=suite,
                   augment=Augment(self.info.crop_padding, self.info.train_flip), seed=cfg.random_seed,
                   attack_columns=True, checkpoint=checkpoint, resume=cfg.resume, on_row=on_row,
                   desc=self.name, progress=cfg.progress, eval_every=cfg.test_every,
                   fingerprint=self.fingerprint(train_set), flags=cfg)

    def train_config(self) -> TrainConfig:
        """The victim's training settings; BackdoorBench's BadNets-family trainer drops the last partial
        batch (spec §6.1)."""
        return self.cfg.train_config(drop_last=True)

    def fingerprint(self, train_set: ImageSet) -> dict:
        """What a training checkpoint must agree with to be resumed: every setting but the run-only
        ones (:func:`~burnkit.options.result_settings`: not the device, paths, progress or scoring
        cadence) and a digest of the poisoned training set, so a changed --epochs/--lr/--pratio/--model
        is refused, not continued."""
        return {"attack": self.name, **result_settings(self.cfg), "train_set": imageset_digest(train_set)}

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def ignored_flags(cls) -> tuple[str, ...]:
        """The flags ``--help`` lists as accepted but unused (as :meth:`burnkit.defense.Defense.ignored_flags`)."""
        return cls.unused_flags

    @classmethod
    def parse(cls, argv=None):
        prog = f"attack/{cls.name}.py"
        parser = build_parser(cls.config_cls, prog, cls.description or (cls.__doc__ or "").strip().split("\n")[0],
                              unused=cls.ignored_flags(), method=cls.name)
        cli = parse_cli(parser, cls.config_cls, sys.argv[1:] if argv is None else argv, prog)
        dataset = cli.get("dataset") or "cifar10"
        proto = cli.get("yaml_path") or find_config_file(f"config/attack/prototype/{dataset}.yaml")
        values = load_yaml(proto) if proto else {}
        check_yaml_keys(cls.config_cls, values, str(proto))
        so_far = {**values, **{k: v for k, v in cli.items() if v is not None}}
        attack_yaml = cli.get("bd_yaml_path") or find_config_file(*cls.attack_yaml_candidates(so_far))
        if attack_yaml:  # prototype < attack YAML (< CLI, in merge)
            attack_values = load_yaml(attack_yaml)
            check_yaml_keys(cls.config_cls, attack_values, str(attack_yaml))
            values.update(attack_values)
        cfg, ignored = merge(cls.config_cls, values, cli, yaml_source=f"{proto} + {attack_yaml}")
        cfg.yaml_path, cfg.bd_yaml_path = (str(proto) if proto else None), (str(attack_yaml) if attack_yaml else None)
        return cfg, ignored

    @classmethod
    def attack_yaml_candidates(cls, values: dict) -> list[str]:
        """Default attack YAMLs, first existing wins; ``values`` = prototype YAML + CLI so far
        (TrojanNN picks ``config/attack/trojannn/<model>.yaml``)."""
        return [f"config/attack/{cls.name}/default.yaml"]

    @classmethod
    def main(cls, argv=None) -> dict:
        with cli_errors(f"attack/{cls.name}.py"):
            cfg, ignored = cls.parse(argv)
            return cls.run(cfg, ignored)

    @classmethod
    def run(cls, cfg: AttackConfig, ignored=()) -> dict:
        """Write ``record/<save_folder_name>``, holding its lock from the first check to the last file."""
        started, start = time.perf_counter(), RunStart()
        name = cfg.save_folder_name or f"{time.strftime('%Y%m%d_%H%M%S')}_{cls.name}_{cfg.dataset}_{cfg.model}"
        record_dir = Path("record") / name
        with folder_lock(record_dir, "the record"):
            return cls._write_record(cfg, ignored, record_dir, started, start)

    @classmethod
    def _write_record(cls, cfg: AttackConfig, ignored, record_dir: Path, started: float, start: RunStart) -> dict:
        name = record_dir.name
        info = dataset_info(cfg.dataset)
        attack = cls(cfg, info)
        cfg.attack = cls.name
        replace_old = (record_dir / "attack_result.pt").exists()
        if replace_old and not cfg.overwrite:
            raise BurnError(f"{record_dir} already holds an attack record; choose another --save_folder_name, or pass "
                            "--overwrite true to replace it (the old folder, defenses included, is kept, renamed)")
        check_output_folders(record_dir, {"the checkpoint folder": record_dir / "checkpoint"}, moved_aside=replace_old,
                             what="the record folder")
        device = resolve_device(cfg.device)
        root = resolve_data_root(cfg.dataset_path, cfg.dataset)
        train_x, train_y = load_split(cfg.dataset, root, train=True, download=cfg.download)
        test_x, test_y = load_split(cfg.dataset, root, train=False, download=cfg.download)
        if cfg.attack_label_trans == "all2one" and not 0 <= cfg.attack_target < info.num_classes:
            raise BurnError(f"attack_target {cfg.attack_target} is not a class of {cfg.dataset} (0..{info.num_classes - 1})")
        seed_everything(cfg.random_seed)
        model = build_classifier(cfg.model, info)

        logger = _make_logger(cls.name, None)  # the log file is opened once the inputs are valid
        if ignored:
            logger.info("BackdoorBench YAML keys accepted but not used by %s: %s", cls.name, ", ".join(ignored))
        logger.info("attack %s -> %s on %s, model %s, device %s", cls.name, record_dir, cfg.dataset, cfg.model, device)
        logger.info("clean data: %d training and %d test images from %s", len(train_y), len(test_y), root)
        attack.logger = logger
        rng = np.random.default_rng(cfg.random_seed)
        plan = attack.plan(train_y, test_y, rng)
        with _Timer() as poison_time:
            train_bd = attack.apply_trigger(train_x[plan.train_poison], train_y[plan.train_poison], plan.train_poison, True)
            test_bd = attack.apply_trigger(test_x[plan.test_poison], test_y[plan.test_poison], plan.test_poison, False)
        _check_poisoned(train_bd, len(plan.train_poison), info, "training")
        _check_poisoned(test_bd, len(plan.test_poison), info, "test")
        train_bd_labels = attack.target_labels(train_y[plan.train_poison])
        test_bd_labels = attack.target_labels(test_y[plan.test_poison])

        images = train_x[plan.train_positions].copy()
        labels = train_y[plan.train_positions].copy()
        where = {int(idx): pos for pos, idx in enumerate(plan.train_positions)}
        poison_pos = np.asarray([where[int(i)] for i in plan.train_poison], dtype=np.int64)
        flags = np.zeros(len(plan.train_positions), dtype=bool)
        if len(poison_pos):
            images[poison_pos] = train_bd
            labels[poison_pos] = train_bd_labels
            flags[poison_pos] = True
        train_set = ImageSet.from_numpy(images, labels, train_y[plan.train_positions], flags, plan.train_positions)
        bd_test = ImageSet.from_numpy(test_bd, test_bd_labels, test_y[plan.test_poison],
                                      np.ones(len(plan.test_poison), bool), plan.test_poison)
        suite = EvalSuite(ImageSet.from_numpy(test_x, test_y), bd_test)
        checkpoint = record_dir / "checkpoint" / "train_state.pt"
        check_trainable(len(train_set), attack.train_config())  # refused here, before the log file is opened
        if attack.resumable and cfg.resume and checkpoint.exists() and not replace_old:
            load_checkpoint(checkpoint, plain_fingerprint(attack.fingerprint(train_set)))  # refuse before writing

        # -- inputs are valid: from here on we write --------------------------------------------
        replaced = move_aside(record_dir) if replace_old else None
        record_dir.mkdir(parents=True, exist_ok=True)
        attach_log_file(logger, record_dir)
        if replaced is not None:
            logger.warning("--overwrite: the previous record was moved to %s", replaced)
        log = MetricLog(record_dir, "attack")
        warning = cpu_memory_warning(model, device, f"{cls.name} training {cfg.model}", cfg)
        if warning:
            logger.warning(warning)
        with _Timer() as train_time, out_of_memory_as_error(f"{cls.name} training {cfg.model}", device, cfg):
            fit_result = attack.train(model, train_set, suite, device, log, checkpoint)
        log.finish()
        plot_metrics(log.rows, record_dir)

        data = PoisonedData(train_x, train_y, test_x, test_y, plan, train_bd, train_bd_labels, test_bd, test_bd_labels)
        bd_train_split, bd_test_split = attack.record_splits(model, data, device, record_dir)
        bd_train_split, extra = whole_split_record(bd_train_split, len(train_y))
        if extra:
            logger.info("--train_subset: bd_train covers all %d training indices for BackdoorBench's consumers; the %d "
                        "trained on are stored as train_subset_index", len(train_y), len(extra["train_subset_index"]))
        indicator_train = bd_train_split.poison_indicator
        args = as_dict(cfg)
        args.update({"num_classes": info.num_classes, "input_height": info.img_size[0], "input_width": info.img_size[1],
                     "input_channel": info.img_size[2], "img_size": tuple(info.img_size),
                     "dataset_path": f"./data/{cfg.dataset}", "save_path": f"./record/{name}",
                     "terminal_info": list(sys.argv), "device": str(device)})
        for key, (filename, image) in attack.trigger_images().items():
            if args.get(key) is None:  # BackdoorBench's code opens this path: point it at a copy in the record
                save_png(record_dir / filename, image)
                args[key] = f"./record/{name}/{filename}"
        atomic_torch_save(backdoorbench_info(args), record_dir / "info.pickle")
        atomic_torch_save(indicator_train, record_dir / "train_poison_index_list.pickle")
        final = log.last()
        weights = model.bb_state_dict()
        provenance = {"attack": cls.name, "record": portable_path(str(record_dir), Path.cwd()),
                      "config": portable_config(args),
                      "train_subset_size": int(len(plan.train_positions)),
                      "poisoned_train": int(indicator_train.sum()), "bd_test_size": len(bd_test_split.original_index),
                      "wall_time_s": time.perf_counter() - started, "poison_time_s": poison_time.seconds,
                      "train_time_s": train_time.seconds, **_resume_facts(fit_result),
                      **run_environment(device, start, cfg, {"train_set": imageset_digest(train_set)},
                                        record_digest=tensors_digest(weights.items())),
                      "final": {k: final.get(k) for k in ("test_acc", "test_asr", "test_ra")}}
        if fit_result is not None and fit_result.resumed_from_epoch:
            provenance["wall_time_s_all_sessions"] = (provenance["wall_time_s"] + provenance["train_time_s_all_sessions"]
                                                      - fit_result.wall_time_s)
        provenance.update(attack.provenance())
        attack.save_artifacts(record_dir)
        write_json(record_dir / "provenance.json", provenance)
        # attack_result.pt marks the record as finished (defenses, compare, resume), so it is written last
        write_attack_record(record_dir, model_name=cfg.model, num_classes=info.num_classes,
                            state_dict=weights, clean_data=cfg.dataset,
                            bd_train=bd_train_split, bd_test=bd_test_split, extra=extra)
        shutil.rmtree(record_dir / "checkpoint", ignore_errors=True)
        logger.info("record written: acc %s asr %s ra %s (wall %.1fs) -> %s", _pct(final.get("test_acc")),
                    _pct(final.get("test_asr")), _pct(final.get("test_ra")), provenance["wall_time_s"], record_dir)
        _close_logger(logger)
        return {"record_dir": record_dir, "model": model, "final": final, "provenance": provenance}

    def provenance(self) -> dict:
        """Attack-specific facts for ``provenance.json`` (e.g. the trigger's source)."""
        return {}

    def record_splits(self, model: Classifier, data: PoisonedData, device: torch.device,
                      record_dir: Path) -> tuple[PoisonedSplit, PoisonedSplit]:
        """The ``bd_train``/``bd_test`` splits written to the record, after training.

        By default they are the statically poisoned samples of the plan. Attacks that poison
        on the fly during training (WaNet, InputAware, BPP) override this to rebuild them as
        BackdoorBench does (spec §1.4) and may write extra folders into ``record_dir``.
        """
        plan = data.plan
        indicator_train = np.zeros(len(data.train_y), dtype=np.float64)
        indicator_train[plan.train_poison] = 1.0
        indicator_test = np.zeros(len(data.test_y), dtype=np.float64)
        indicator_test[plan.test_poison] = 1.0
        train = PoisonedSplit(plan.train_positions, indicator_train,
                              {int(i): img for i, img in zip(plan.train_poison, data.train_bd)},
                              {int(i): int(b) for i, b in zip(plan.train_poison, data.train_bd_labels)},
                              {int(i): int(data.train_y[i]) for i in plan.train_poison})
        test = PoisonedSplit(plan.test_poison, indicator_test,
                             {int(i): img for i, img in zip(plan.test_poison, data.test_bd)},
                             {int(i): int(b) for i, b in zip(plan.test_poison, data.test_bd_labels)},
                             {int(i): int(data.test_y[i]) for i in plan.test_poison})
        return train, test

    def save_artifacts(self, record_dir: Path) -> None:
        """Write attack-specific extra files into the record (e.g. ``trojannn_trigger.png``)."""

    def trigger_images(self) -> dict[str, tuple[str, np.ndarray]]:
        """``{info key: (file name, H x W x C uint8 image)}`` for triggers BackdoorBench's attack code
        reads from a path argument (``patch_mask_path``, ``attack_trigger_img_path``). When the
        argument was not given, the trigger is saved in the record and ``info.pickle`` names it."""
        return {}


def backdoorbench_info(args: dict) -> dict:
    """``info.pickle``'s dict as BackdoorBench's attack code reads it: no ``None`` values, because its
    merge drops unset flags and its code tests presence (``cos_t_max`` present means ``T_max``);
    only builtins, so ``torch.load(weights_only=True)`` reads it. burnkit's extra keys
    (``train_subset``, ``test_every``, ...) stay for provenance; BackdoorBench ignores them."""
    return {k: v for k, v in args.items() if v is not None}


def save_png(path: Path, image: np.ndarray) -> None:
    image = np.asarray(image, dtype=np.uint8)
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)


def whole_split_record(split: PoisonedSplit, n_train: int) -> tuple[PoisonedSplit, dict]:
    """``bd_train`` over the whole training split, plus ``{"train_subset_index": ...}`` when the model
    was trained on a subset (``--train_subset``; see the module docstring)."""
    full = np.arange(n_train, dtype=np.int64)
    trained = np.asarray(split.original_index, dtype=np.int64)
    if np.array_equal(trained, full):
        return split, {}
    return dataclasses.replace(split, original_index=full), {"train_subset_index": trained}


def backdoorbench_poison_draw(pool: np.ndarray, count: int, seed: int) -> np.ndarray:
    """BackdoorBench's poison draw (spec §6): ``np.random.seed(seed)`` then
    ``np.random.choice(pool, count, replace=False)`` with NumPy's legacy generator. A private
    ``RandomState`` seeded alike gives the same stream without touching global state, so a record
    of ours poisons the same indices as BackdoorBench's for the same seed, attack and ratio."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    return np.random.RandomState(seed % 2**32).choice(np.asarray(pool, dtype=np.int64), size=count, replace=False)


def _check_poisoned(images: np.ndarray, n: int, info: DatasetInfo, split: str) -> None:
    h, w, c = info.img_size
    if images.dtype != np.uint8 or images.shape != (n, h, w, c):
        raise RuntimeError(f"apply_trigger returned {images.dtype} {images.shape} for the {split} split; "
                           f"expected uint8 {(n, h, w, c)}")


class _Timer:
    def __enter__(self):
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        return False


logging.getLogger("burnkit").addHandler(logging.NullHandler())


def _resume_facts(result: FitResult | None) -> dict:
    """Training time over every session of a resumed run (``train_time_s`` is this process's only)."""
    if result is None:
        return {}
    return {"resumed_from_epoch": result.resumed_from_epoch,
            "train_time_s_all_sessions": result.extra.get("train_s_all_sessions", result.wall_time_s)}
