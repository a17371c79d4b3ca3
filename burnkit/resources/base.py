"""What every resource generator shares: its config keys, data loading and atomic, documented output."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import as_dict, option
from ..data import ImageSet, class_balanced_subset
from ..fileio import publish, temp_path
from ..datasets import DatasetInfo, dataset_info, load_split, resolve_data_root
from ..engine import resolve_device, seed_everything
from ..errors import BurnError
from ..results import RunStart, portable_config, portable_path, run_environment, write_json
from . import DEFAULT_CACHE, load_clean_model


@dataclass
class ResourceConfig:
    """Keys shared by all generators (BackdoorBench's names where it has them)."""

    yaml_path: str | None = option(None, "YAML with these keys (CLI flags override it)", cli_only=True)
    dataset: str = option("cifar10", "cifar10, cifar100, gtsrb, tiny, mnist, fashion-mnist, digits")
    dataset_path: str = option("./data", "clean data: <path>/<dataset>, the dataset folder, or an archive")
    model: str = option("preactresnet18", "architecture of the clean model (attack_models zoo)")
    resource_cache: str = option(DEFAULT_CACHE, "folder the resources are written to (outside git)")
    device: str | None = option(None, "cpu, cuda or cuda:N", default_help="cuda if present")
    random_seed: int = option(0, "seed")
    batch_size: int = option(128, "batch size")
    progress: bool = option(True, "show progress bars")

    def validate(self) -> None:
        dataset_info(self.dataset)  # a clear error for an unknown name
        if self.batch_size <= 0:
            raise BurnError(f"batch_size must be > 0, got {self.batch_size}")


@dataclass
class FromCleanModelConfig(ResourceConfig):
    """Generators that start from the clean model (LF pattern, LC images)."""

    clean_model_path: str | None = option(None, "clean model state dict",
                                          default_help="the cache's clean_model.pth")


class Session:
    """One generator run: seeded, with its device, dataset facts and a wall clock."""

    def __init__(self, cfg: ResourceConfig):
        self.cfg = cfg
        self.info: DatasetInfo = dataset_info(cfg.dataset)
        self.device = resolve_device(cfg.device)
        self.started, self.start = time.perf_counter(), RunStart()
        seed_everything(cfg.random_seed)
        self.generator = torch.Generator().manual_seed(cfg.random_seed)

    def split(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        root = resolve_data_root(self.cfg.dataset_path, self.cfg.dataset)
        return load_split(self.cfg.dataset, root, train=train)

    def subset(self, labels: np.ndarray, size: int) -> np.ndarray:
        """Original indices of the seeded class-balanced subset an attack run with the same
        ``--train_subset size --random_seed`` trains on (all indices for size 0)."""
        if not size:
            return np.arange(len(labels))
        return class_balanced_subset(labels, size, np.random.default_rng(self.cfg.random_seed))

    def clean_model(self, path: str | None = None):
        cfg = self.cfg
        return load_clean_model(self.info, cfg.model, cfg.resource_cache, path, cfg.dataset_path).to(self.device)

    def finish(self, outputs: list[Path], what: str, **facts) -> dict:
        """Write ``<first output>.json`` (config, timing, environment) and return it."""
        summary = {"resource": what, "outputs": [portable_path(str(p), Path.cwd()) for p in outputs],
                   "config": portable_config(as_dict(self.cfg)),
                   "wall_time_s": round(time.perf_counter() - self.started, 2), **facts,
                   **run_environment(self.device, self.start, self.cfg)}
        write_json(outputs[0].with_suffix(".json"), summary)
        return summary


def imageset(images: np.ndarray, labels: np.ndarray) -> ImageSet:
    return ImageSet.from_numpy(images, labels)


def save_npy(path: Path, array: np.ndarray) -> Path:
    """``np.save`` through a temporary file, so a killed run never leaves a truncated array."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def to_uint8_nhwc(x01: torch.Tensor) -> np.ndarray:
    """Float NCHW in [0, 1] -> uint8 NHWC, rounded (what a PNG of the image would hold)."""
    return (x01.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
