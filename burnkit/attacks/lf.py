"""LF, low-frequency trigger (Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency
Perspective", ICCV 2021): add a smooth universal pattern, all-to-one by default.

Poisoned image = ``clip(x + pattern, 0, 255)`` on the uint8 0..255 scale (spec §6.2). The pattern is
a low-frequency universal adversarial perturbation of a clean model, generated here (never
downloaded) by ``python -m burnkit.resources lf_pattern`` into
``<resource_cache>/lowFrequency/<dataset>_<model>_0_255.npy``; ``--lowFrequencyPatternPath`` takes
any BackdoorBench-style pattern file instead.

Pattern files are read as BackdoorBench reads them: 4-D (the first entry is used), 3-D ``H x W x C``
or 2-D (replicated over the channels). Unlike BackdoorBench, a float pattern with values <= 1 is read
as a [0, 1]-scale pattern and multiplied by 255: BackdoorBench adds such files (its vgg19_bn,
vit_b_16 and convnext_tiny patterns) unscaled to 0..255 images, so the trigger vanishes (spec §9.5).

Example:
    python -m burnkit.resources clean_model --dataset cifar10 --model preactresnet18
    python -m burnkit.resources lf_pattern --dataset cifar10 --model preactresnet18
    python attack/lf.py --dataset cifar10 --model preactresnet18 --save_folder_name lf_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..attack import Attack, AttackConfig, register_attack
from ..config import option
from ..datasets import DatasetInfo
from ..errors import BurnError
from ..resources import DEFAULT_CACHE, lf_pattern_path, missing, resource_command
from ..safe_load import first_nonfinite


@dataclass
class LowFrequencyConfig(AttackConfig):
    lowFrequencyPatternPath: str | None = option(
        None, "pattern .npy", default_help="<resource_cache>/lowFrequency/<dataset>_<model>_0_255.npy")
    resource_cache: str = option(DEFAULT_CACHE, "folder of generated attack resources")


def load_lf_pattern(path: str | Path, info: DatasetInfo) -> np.ndarray:
    """Read a pattern file as float ``H x W x C`` on the 0..255 scale (BackdoorBench's shapes)."""
    try:
        raw = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BurnError(f"LF pattern {path} is not a readable .npy array ({err}); regenerate it") from None
    bad = first_nonfinite(raw, "the pattern")
    if bad is not None:  # NaN would turn into arbitrary pixel values in the poisoned images
        raise BurnError(f"LF pattern {path} holds {bad}; regenerate it")
    pattern = np.asarray(raw, dtype=np.float64)
    if pattern.ndim == 4:
        pattern = pattern[0]
    h, w, c = info.img_size
    if pattern.ndim == 2:
        pattern = np.repeat(pattern[..., None], c, axis=2)
    if pattern.ndim != 3 or pattern.shape[:2] != (h, w) or pattern.shape[2] not in (1, c):
        raise BurnError(f"LF pattern {path} has shape {raw.shape}; {info.name} needs {h} x {w} x {c}; "
                        "generate one for this dataset")
    if pattern.shape[2] != c:
        pattern = np.repeat(pattern, c, axis=2)
    if not np.issubdtype(raw.dtype, np.integer) and np.abs(pattern).max() <= 1.0:
        pattern = pattern * 255.0  # a [0, 1]-scale float pattern (BackdoorBench would add it unscaled)
    return pattern


def add_pattern(images: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """``clip(x + pattern, 0, 255)`` truncated to uint8 (BackdoorBench's additive rule)."""
    return np.clip(images.astype(np.float64) + pattern[None], 0, 255).astype(np.uint8)


@register_attack
class LowFrequency(Attack):
    """LF: additive low-frequency universal pattern, all-to-one by default."""

    name = "lf"
    config_cls = LowFrequencyConfig

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        path = Path(cfg.lowFrequencyPatternPath) if cfg.lowFrequencyPatternPath else \
            lf_pattern_path(cfg.resource_cache, cfg.dataset, cfg.model)
        if not path.is_file():
            raise missing("LF pattern", path, resource_command("lf_pattern", cfg.dataset, cfg.model,
                                                               cfg.resource_cache, cfg.dataset_path),
                          "lowFrequencyPatternPath")
        self.pattern_path = path
        self.pattern = load_lf_pattern(path, info)

    def apply_trigger(self, images, labels, indices, train):
        return add_pattern(images, self.pattern)

    def provenance(self):
        return {"trigger": f"low-frequency pattern {self.pattern_path}",
                "pattern_max_0_255": float(self.pattern.max())}
