"""Attack resources generated here, never downloaded: clean models, LF patterns, LC adversarial
images and SSBA replacement arrays.

BackdoorBench ships (or links) these files under ``resource/``; we make every one with a committed
command and keep it in a cache folder outside git (default ``resource_cache/`` under the working
directory, key/flag ``resource_cache``)::

    python -m burnkit.resources clean_model --dataset cifar10 --model smallcnn
    python -m burnkit.resources lf_pattern  --dataset cifar10 --model smallcnn
    python -m burnkit.resources lc_adv      --dataset cifar10 --model smallcnn
    python -m burnkit.resources ssba        --dataset cifar10

Cache layout (file names follow BackdoorBench's where it has one, spec §6.2)::

    clean_model/<dataset>_<model>/clean_model.pth        bare state dict (BackdoorBench's prototype)
    lowFrequency/<dataset>_<model>_0_255.npy             uint8 H x W x C, added to the image
    label-consistent/<model>_<dataset>_train.npy         uint8 N_train x H x W x C (PGD images)
    label-consistent/<model>_<dataset>_train_crafted.npy bool N_train: which entries are adversarial
    ssba/<dataset>_ssba_{train,test}_b1.npy              uint8 N x H x W x C replacement images
    ssba/<dataset>_codec.pt                              the encoder/decoder that made them

This module holds the paths, the "missing resource" errors (one line naming the command that
creates the file) and the loaders the attacks use; the generators live in the submodules.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..datasets import DatasetInfo
from ..errors import BurnError
from ..models import Classifier, build_classifier, load_bb_state_dict
from ..safe_load import safe_torch_load

DEFAULT_CACHE = "resource_cache"
DEFAULT_DATASET_PATH = "./data"


def clean_model_path(cache: str | Path, dataset: str, model: str) -> Path:
    return Path(cache) / "clean_model" / f"{dataset}_{model}" / "clean_model.pth"


def lf_pattern_path(cache: str | Path, dataset: str, model: str) -> Path:
    return Path(cache) / "lowFrequency" / f"{dataset}_{model}_0_255.npy"


def lc_adv_path(cache: str | Path, dataset: str, model: str) -> Path:
    return Path(cache) / "label-consistent" / f"{model}_{dataset}_train.npy"


def crafted_path(adv_path: str | Path) -> Path:
    """Sidecar of an LC array: which original indices hold adversarial images."""
    adv_path = Path(adv_path)
    return adv_path.with_name(adv_path.stem + "_crafted.npy")


def ssba_paths(cache: str | Path, dataset: str) -> tuple[Path, Path]:
    folder = Path(cache) / "ssba"
    return folder / f"{dataset}_ssba_train_b1.npy", folder / f"{dataset}_ssba_test_b1.npy"


def ssba_codec_path(cache: str | Path, dataset: str) -> Path:
    return Path(cache) / "ssba" / f"{dataset}_codec.pt"


def resource_command(what: str, dataset: str, model: str | None = None, cache: str | Path = DEFAULT_CACHE,
                     dataset_path: str = DEFAULT_DATASET_PATH) -> str:
    """The exact command that creates a missing resource (printed in errors)."""
    parts = ["python -m burnkit.resources", what, "--dataset", dataset]
    if model is not None:
        parts += ["--model", model]
    if str(cache) != DEFAULT_CACHE:
        parts += ["--resource_cache", str(cache)]
    if dataset_path != DEFAULT_DATASET_PATH and dataset != "digits":
        parts += ["--dataset_path", dataset_path]
    return " ".join(parts)


def missing(what_file: str, path: Path, command: str, flag: str | None = None) -> BurnError:
    alternative = f", or pass --{flag} with an existing file" if flag else ""
    return BurnError(f"{what_file} {path} not found; create it with `{command}`{alternative}")


def load_clean_model(info: DatasetInfo, model: str, cache: str | Path = DEFAULT_CACHE,
                     path: str | Path | None = None, dataset_path: str = DEFAULT_DATASET_PATH) -> Classifier:
    """The clean classifier LF, LC and TrojanNN start from (a bare state dict, like BackdoorBench's
    ``clean_model.pth``)."""
    file = Path(path) if path else clean_model_path(cache, info.name, model)
    if not file.is_file():
        raise missing("clean model", file, resource_command("clean_model", info.name, model, cache, dataset_path),
                      "clean_model_path")
    clf = build_classifier(model, info)
    state = safe_torch_load(file, what="clean model")
    if isinstance(state, dict) and "model" in state and not torch.is_tensor(state["model"]):
        state = state["model"]  # a record-like dict: take its state dict
    load_bb_state_dict(clf, state, source=f"clean model {file}")
    clf.eval()
    return clf


def load_image_array(path: Path, info: DatasetInfo, n: int | None, what: str) -> np.ndarray:
    """Load an ``N x H x W x C`` uint8 replacement array (memory-mapped) and check its shape."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BurnError(f"{what} {path} is not a readable .npy array ({err}); regenerate it") from None
    h, w, c = info.img_size
    if arr.ndim == 3 and c == 1:
        arr = arr[..., None]
    if arr.ndim != 4 or tuple(arr.shape[1:]) != (h, w, c) or (n is not None and len(arr) != n):
        want = f"{n if n is not None else 'N'} x {h} x {w} x {c}"
        raise BurnError(f"{what} {path} has shape {tuple(arr.shape)} but {info.name} needs {want}; "
                        "regenerate it for this dataset")
    if arr.dtype != np.uint8:
        raise BurnError(f"{what} {path} holds {arr.dtype}, expected uint8 images (0..255); regenerate it")
    return arr


def check_length(array: np.ndarray, n: int, path: Path, command: str) -> None:
    """A replacement array is indexed by original index, so it must cover the whole split."""
    if len(array) != n:
        raise BurnError(f"{path} holds {len(array)} images but the split has {n}; it was made for other data - "
                        f"regenerate it with `{command}`")
