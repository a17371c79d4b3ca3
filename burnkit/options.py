"""The CLI/YAML keys every attack and defense shares: device, BackdoorBench's compatibility flags and
the training keys the engine's :class:`~burnkit.engine.TrainConfig` is built from (spec §3.3, §6.1).

One dataclass, so a flag is declared (and documented) once; :class:`burnkit.attack.AttackConfig` and
:class:`burnkit.defense.DefenseConfig` add their own keys and redeclare the defaults that differ.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import as_dict, option
from .engine import TrainConfig
from .errors import BurnError


GROUP = "training and device options"
IO_GROUP = "record, data and output options"  # the flags of a defense or detector that say what it reads and writes
OPTIMIZERS = ("sgd", "adam", "adadelta")  # BackdoorBench silently runs Adam for any other name; here it is an error
SCHEDULERS = ("CosineAnnealingLR", "StepLR", "MultiStepLR", "CyclicLR", "ReduceLROnPlateau")

# The keys only the engine's optimiser and scheduler read (through train_config): a method that
# builds its own optimiser or schedule lists them among the flags it does not use (``--help``).
OPTIMISER_FLAGS = ("client_optimizer", "sgd_momentum", "wd", "adam_betas")
SCHEDULE_FLAGS = ("lr_scheduler", "cos_t_max", "steplr_stepsize", "steplr_gamma", "steplr_milestones")

# The settings that do not change what a run computes, so a resumed run may change them. Every other
# setting of an attack, defense or detector is part of its resume fingerprint (result_settings), so a
# setting added later is covered without anyone remembering to list it.
RUN_ONLY_KEYS = frozenset({
    # how and where the run executes (a device changes floating-point noise, not the algorithm)
    "device", "progress", "pin_memory", "non_blocking", "prefetch", "num_workers", "frequency_save",
    # where settings and data are read from: the merged settings themselves, and digests of the data
    # and weights read, are in the fingerprint
    "yaml_path", "bd_yaml_path", "dataset_path", "download", "resource_cache",
    # where the outputs go, and what happens to an existing output
    "save_folder_name", "output_name", "log", "checkpoint_save", "checkpoint_load", "csv_save_path",
    "resume", "overwrite",
    # how often the test sets are scored (the model is the same; the last epoch is always scored)
    "test_every",
    # accepted for BackdoorBench compatibility, never read: the attack's name (the script decides),
    # FT-SAM's print_freq
    "attack", "print_freq",
})


def result_settings(cfg, also_run_only=frozenset()) -> dict:
    """Every setting of ``cfg`` except :data:`RUN_ONLY_KEYS` (and ``also_run_only``): the settings a
    checkpoint must agree with to be resumed."""
    skip = RUN_ONLY_KEYS | set(also_run_only)
    return {k: v for k, v in as_dict(cfg).items() if k not in skip}


@dataclass
class TrainingOptions:
    """Device, compatibility and training keys under BackdoorBench's names."""

    device: str | None = option(None, "cpu, cuda or cuda:N", group=GROUP, default_help="cuda if present")
    amp: bool = option(False, "mixed precision on CUDA", group=GROUP)
    pin_memory: bool = option(True, "BackdoorBench's DataLoader setting (no DataLoader is used here)", short="-pm",
                              group=GROUP, unused=True)
    non_blocking: bool = option(True, "BackdoorBench's host-to-device copy setting", short="-nb", group=GROUP,
                                unused=True)
    prefetch: bool = option(False, "BackdoorBench's DataLoader setting", short="-pf", group=GROUP, unused=True)
    num_workers: int = option(4, "BackdoorBench's DataLoader workers (batches are tensor slices here)", group=GROUP,
                              low=0, unused=True)
    frequency_save: int = option(0, "BackdoorBench's checkpoint interval", group=GROUP, low=0, unused=True)
    epochs: int = option(10, "training epochs", group=GROUP, low=0)
    batch_size: int = option(128, "batch size", group=GROUP, low=1)
    lr: float = option(0.01, "learning rate", group=GROUP, low=0)
    client_optimizer: str = option("sgd", "sgd, adam or adadelta", group=GROUP, choices=OPTIMIZERS)
    sgd_momentum: float = option(0.9, "momentum of --client_optimizer sgd", group=GROUP, low=0)
    wd: float = option(5e-4, "weight decay of --client_optimizer sgd or adam", group=GROUP, low=0)
    adam_betas: tuple[float, float] = option((0.9, 0.999), "betas of --client_optimizer adam", group=GROUP, low=0,
                                             high=1)
    lr_scheduler: str | None = option("CosineAnnealingLR", "CosineAnnealingLR, StepLR, MultiStepLR, CyclicLR, ReduceLROnPlateau or None",
                                      group=GROUP, choices=SCHEDULERS)
    cos_t_max: int | None = option(None, "T_max of --lr_scheduler CosineAnnealingLR", group=GROUP, low=1,
                                   default_help="100, as in BackdoorBench")
    steplr_stepsize: int = option(1, "step size of --lr_scheduler StepLR", group=GROUP, low=1)
    steplr_gamma: float = option(0.1, "decay of --lr_scheduler StepLR or MultiStepLR", group=GROUP, low=0)
    steplr_milestones: list[int] | None = option(None, "milestones of --lr_scheduler MultiStepLR, e.g. 30,60",
                                                 group=GROUP, low=0)
    random_seed: int = option(0, "seed", group=GROUP, low=0, high=2**63 - 1)
    progress: bool = option(True, "show progress bars", group=GROUP)
    overwrite: bool = option(False, "replace a finished output of the same name; the old folder is kept, renamed "
                                    "<name>.replaced-<time> (false: refuse, so nothing finished is lost)", group=GROUP)
    test_every: int = option(1, "score the test sets every N epochs/iterations and after the last (burnkit extra; "
                                "N > 1 saves CPU time, 1 is BackdoorBench's behaviour)", group=GROUP, low=1)

    def validate(self) -> None:
        if self.epochs < 0:
            raise BurnError(f"--epochs must be >= 0, got {self.epochs}")
        if self.batch_size <= 0:
            raise BurnError(f"--batch_size must be positive, got {self.batch_size}")
        if self.lr < 0:
            raise BurnError(f"--lr must be non-negative, got {self.lr}")
        if self.test_every < 1:
            raise BurnError(f"--test_every must be >= 1, got {self.test_every}")

    def train_config(self, **overrides) -> TrainConfig:
        """The engine's TrainConfig from the same-named keys of this config."""
        return TrainConfig.from_config(self, **overrides)
