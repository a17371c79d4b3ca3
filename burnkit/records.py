"""BackdoorBench attack records and defense results, read and written in its exact format.

An attack record is ``record/<name>/attack_result.pt``: a plain dict (spec §1.3) whose ``bd_train`` /
``bd_test`` entries describe poisoned splits (spec §1.4), with every poisoned image stored as a PNG
under ``record/<name>/bd_{train,test}_dataset/<original_label>/<index>.png``. Clean images are never
stored; they are re-read from the clean dataset.

Reading is safe (weights-only unpickling, :mod:`burnkit.safe_load`) and robust where BackdoorBench's
own loader is not (spec §9.2): PNG paths are rebuilt from the record folder, so a record works
wherever it is moved and whatever the working directory; ``int`` and ``numpy.int64`` keys are both
accepted; ``bd_train`` may be ``None``.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import ImageSet
from .datasets import DatasetInfo, dataset_info, load_split, resolve_data_root
from .errors import BurnError, brief
from .fileio import atomic_torch_save  # noqa: F401  (re-exported: callers import it from here)
from .safe_load import first_nonfinite, safe_torch_load

RECORD_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
DEFENSE_KEYS = ("model_name", "num_classes", "model")
SPLIT_FOLDERS = {"bd_train": "bd_train_dataset", "bd_test": "bd_test_dataset"}
TRAIN_SUBSET_KEY = "train_subset_index"  # burnkit's extra key: the indices a --train_subset model trained on


# --------------------------------------------------------------------------- reading

@dataclass
class PoisonEntry:
    path: Path | None  # the PNG on disk inside the record folder; None if it is not there
    stored_path: str
    bd_label: int
    original_label: int
    expected: Path | None = None  # where the record's layout puts it (spec §9.2)


@dataclass
class PoisonState:
    """One poisoned split as stored in a record (``prepro_cls_DatasetBD_v2.retrieve_state``)."""

    original_index: np.ndarray  # int64, dataset position -> index in the clean split
    poison_indicator: np.ndarray  # float64, full clean-split length, indexed by original index
    entries: dict[int, PoisonEntry]
    save_folder_path: str

    @property
    def poisoned_indices(self) -> np.ndarray:
        return np.flatnonzero(self.poison_indicator == 1)


@dataclass
class RecordData:
    """The record's data as ImageSets, with BackdoorBench's sample semantics."""

    info: DatasetInfo
    clean_train: ImageSet
    clean_test: ImageSet
    bd_train: ImageSet | None
    bd_test: ImageSet


@dataclass
class AttackRecord:
    record_dir: Path
    model_name: str
    num_classes: int
    state_dict: "OrderedDict[str, torch.Tensor]"
    data_path: str
    img_size: tuple[int, int, int]
    clean_data: str
    bd_train: PoisonState | None
    bd_test: PoisonState
    extra: dict = field(default_factory=dict)

    @property
    def info(self) -> DatasetInfo:
        return dataset_info(self.clean_data)

    def default_data_root(self) -> Path:
        """Where BackdoorBench would look for the clean data (spec §1.6 step 3, made robust).

        The folder that contains ``record/`` plus the stored ``data_path`` from its ``data`` part
        on (``./data/cifar10`` -> ``<base>/data/cifar10``).
        """
        record_dir = self.record_dir.resolve()
        base = record_dir.parent.parent if record_dir.parent.name == "record" else record_dir.parent
        stored = self.data_path.replace("\\", "/")
        cut = stored.find("data")
        tail = stored[cut:] if cut >= 0 else f"data/{self.clean_data}"
        return base / tail

    def data_root(self, dataset_path: str | Path | None = None) -> Path:
        """The clean-data folder: ``--dataset_path`` (BackdoorBench's ``<path>/<dataset>`` rule, or
        the dataset folder itself, or an archive) when given, else :meth:`default_data_root`."""
        if dataset_path is None:
            return self.default_data_root()
        return resolve_data_root(dataset_path, self.clean_data)

    def load_data(self, dataset_path: str | Path | None = None, download: bool = False) -> RecordData:
        info = self.info
        root = self.data_root(dataset_path)
        train_x, train_y = load_split(self.clean_data, root, train=True, download=download)
        test_x, test_y = load_split(self.clean_data, root, train=False, download=download)
        for split, (x, n) in {"train": (train_x, len(train_x)), "test": (test_x, len(test_x))}.items():
            state = self.bd_train if split == "train" else self.bd_test
            if state is not None and len(state.poison_indicator) != n:
                raise BurnError(
                    f"record {self.record_dir} was made on a {split} split of {len(state.poison_indicator)} "
                    f"images but {root} holds {n}; point --dataset_path at the dataset the attack used")
        clean_train = ImageSet.from_numpy(train_x, train_y)
        clean_test = ImageSet.from_numpy(test_x, test_y)
        bd_train = None if self.bd_train is None else materialize(train_x, train_y, self.bd_train, info)
        bd_test = materialize(test_x, test_y, self.bd_test, info)
        return RecordData(info, clean_train, clean_test, bd_train, bd_test)


def read_attack_record(record_dir: str | Path, dataset: str | None = None) -> AttackRecord:
    """Read ``<record_dir>/attack_result.pt`` and check it against ``dataset`` (``--dataset``)."""
    record_dir = Path(record_dir)
    path = record_dir / "attack_result.pt"
    if not path.is_file():
        raise BurnError(f"no attack record at {path}; check --result_file (a folder under record/) "
                        "or create it with an attack script, e.g. python attack/badnet.py --save_folder_name NAME")
    raw = safe_torch_load(path, what="attack record")
    if not isinstance(raw, dict):
        raise BurnError(f"{path} is not a BackdoorBench attack record (it holds a {type(raw).__name__}, "
                        "not a dict); re-create it with an attack script")
    missing = [k for k in RECORD_KEYS if k not in raw]
    if missing:
        raise BurnError(f"{path} is not a complete BackdoorBench attack record: missing {', '.join(missing)}; "
                        "re-create it with an attack script")
    check = _FieldCheck(path)
    clean_data = check.text(raw["clean_data"], "clean_data")
    info = dataset_info(clean_data)
    if dataset is not None and dataset != clean_data:
        raise BurnError(f"--dataset {dataset} contradicts the record, which was made on {clean_data}; "
                        f"pass --dataset {clean_data}")
    num_classes = check.integer(raw["num_classes"], "num_classes")
    if num_classes != info.num_classes:
        raise BurnError(f"the record says {num_classes} classes but {clean_data} has {info.num_classes}; "
                        "the record is inconsistent - check clean_data/num_classes or re-create it")
    img_size = check.int_tuple(raw["img_size"], "img_size", 3)
    if img_size != info.img_size:
        raise BurnError(f"the record's image size {img_size} contradicts {clean_data} {info.img_size}; "
                        f"check --dataset (the record says {clean_data})")
    model_name = check.text(raw["model_name"], "model_name")
    data_path = check.text(raw["data_path"], "data_path")
    state = raw["model"]
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and torch.is_tensor(v)
                                                           for k, v in state.items()):
        raise BurnError(f"{path}: 'model' is not a state dict of tensors; re-create the record")
    if raw["bd_test"] is None:
        raise BurnError(f"{path} has no bd_test split, so ASR cannot be measured; re-create the record")
    return AttackRecord(
        record_dir=record_dir,
        model_name=model_name,
        num_classes=num_classes,
        state_dict=OrderedDict(state),
        data_path=data_path,
        img_size=img_size,
        clean_data=clean_data,
        bd_train=None if raw["bd_train"] is None else restrict_to_trained(
            _parse_state(raw["bd_train"], "bd_train", record_dir, num_classes), raw.get(TRAIN_SUBSET_KEY), record_dir),
        bd_test=_parse_state(raw["bd_test"], "bd_test", record_dir, num_classes),
        extra={k: v for k, v in raw.items() if k not in RECORD_KEYS},
    )


class _FieldCheck:
    """Type checks of a record's top-level fields, each failure one line naming the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, want: str, value) -> BurnError:
        shown = type(value).__name__ if torch.is_tensor(value) else brief(value)
        return BurnError(f"{self.path}: '{field}' must be {want}, got {shown}; the record is corrupt, re-create it")

    def text(self, value, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(field, "a non-empty string", value)
        return value

    def integer(self, value, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise self.fail(field, "an integer", value)
        return int(value)

    def int_tuple(self, value, field: str, length: int) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple, torch.Size, np.ndarray)) or len(value) != length or \
                any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in value):
            raise self.fail(field, f"{length} integers", value)
        return tuple(int(v) for v in value)


def _int_array(value, split: str, key: str, bad) -> np.ndarray:
    """A 1-D array of integers (``original_index_array``), whatever sequence type holds it."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        raise bad(f"'{key}' is not an array") from None
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or (arr.size == 0 and arr.dtype != object)):
        raise bad(f"'{key}' must be a 1-D array of integers, got {arr.dtype} with shape {arr.shape}")
    return arr.astype(np.int64)


def _parse_state(state, split: str, record_dir: Path, num_classes: int) -> PoisonState:
    def bad(what: str):
        return BurnError(f"record {record_dir}: {split} {what}; the record is corrupt, re-create it")

    if not isinstance(state, dict):
        raise bad("is not a dict")
    for key in ("bd_data_container", "original_index_array", "poison_indicator"):
        if key not in state:
            raise bad(f"lacks '{key}'")
    container = state["bd_data_container"]
    if not isinstance(container, dict) or not isinstance(container.get("data_dict"), dict):
        raise bad("has no bd_data_container.data_dict")
    original_index = _int_array(state["original_index_array"], split, "original_index_array", bad)
    if len(original_index) == 0:
        raise bad("holds no samples (its original_index_array is empty)")
    try:
        indicator = np.asarray(state["poison_indicator"], dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise bad("'poison_indicator' is not numeric") from None
    if np.asarray(state["poison_indicator"]).ndim != 1 or not np.isin(indicator, (0.0, 1.0)).all():
        raise bad("'poison_indicator' must be a 1-D array of 0/1 values")
    save_folder = state.get("save_folder_path") or container.get("save_folder_path") or ""
    if not isinstance(save_folder, str):
        raise bad("'save_folder_path' is not a string")
    folder_name = Path(save_folder.replace("\\", "/")).name or SPLIT_FOLDERS[split]
    if folder_name in ("..", ".") or folder_name != Path(folder_name).name:
        folder_name = SPLIT_FOLDERS[split]
    entries: dict[int, PoisonEntry] = {}
    for key, value in container["data_dict"].items():
        try:
            if isinstance(key, bool):
                raise TypeError
            idx = int(key)
            if idx != key:
                raise ValueError
            stored = value["path"]
            other = list(value["other_info"])[:2]
            if not isinstance(stored, str) or len(other) != 2 or any(
                    isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in other):
                raise TypeError
            bd_label, original_label = (int(v) for v in other)
        except (TypeError, KeyError, ValueError):
            raise bad(f"has a malformed data_dict entry for key {key!r} (RAM-mode records are not supported)") from None
        if not 0 <= idx < len(indicator):
            raise bad(f"has a data_dict entry for index {idx}, outside the {len(indicator)} samples of the split")
        for name, label in (("backdoor", bd_label), ("original", original_label)):
            if not 0 <= label < num_classes:
                raise bad(f"gives sample {idx} the {name} label {label}, outside the {num_classes} classes")
        expected = record_dir / folder_name / str(original_label) / f"{idx}.png"
        entries[idx] = PoisonEntry(_resolve_png(record_dir, folder_name, original_label, idx, stored),
                                   stored, bd_label, original_label, expected)
    if original_index.min() < 0 or original_index.max() >= len(indicator):
        raise bad("has original indices outside the poison indicator")
    values, counts = np.unique(original_index, return_counts=True)
    if (counts > 1).any():  # the sample would be trained on, scanned and counted in every metric repeatedly
        repeated = int(np.flatnonzero(counts > 1)[0])
        raise bad(f"repeats original index {int(values[repeated])} ({int(counts[repeated])} times)")
    missing = [int(i) for i in np.flatnonzero(indicator == 1) if int(i) not in entries]
    if missing:
        raise bad(f"flags {len(missing)} samples as poisoned without a stored image (e.g. index {missing[0]})")
    return PoisonState(original_index, indicator, entries, save_folder)


def restrict_to_trained(state: PoisonState, trained, record_dir: Path) -> PoisonState:
    """``bd_train`` limited to the ``train_subset_index`` a burnkit ``--train_subset`` record stores
    (the samples the model was trained on); unchanged when the record has none (BackdoorBench's)."""
    if trained is None:
        return state
    trained = np.asarray(trained)
    n = len(state.poison_indicator)
    if trained.ndim != 1 or trained.dtype.kind not in "iu" or not len(trained) or trained.min() < 0 \
            or trained.max() >= n or len(np.unique(trained)) != len(trained):
        raise BurnError(f"record {record_dir}: {TRAIN_SUBSET_KEY} is not a non-empty list of distinct training indices "
                        f"in 0..{n - 1}; the record is corrupt, re-create it")
    outside = np.setdiff1d(state.poisoned_indices, trained)
    if len(outside):
        raise BurnError(f"record {record_dir}: sample {int(outside[0])} is poisoned but not in {TRAIN_SUBSET_KEY}; "
                        "the record is corrupt, re-create it")
    return PoisonState(trained.astype(np.int64), state.poison_indicator, state.entries, state.save_folder_path)


def _resolve_png(record_dir: Path, folder: str, original_label: int, idx: int, stored: str) -> Path | None:
    """The sample's PNG, read only from the record's own files: the path rebuilt from the record
    folder (spec §9.2), else the stored path when it leads into the record folder too (BackdoorBench
    stores it relative to the folder holding ``record/``). A link, or a file outside the record folder
    (another record's image, any absolute path), is never read: a record is shared as a whole, so a
    stored path cannot make it read someone else's files."""
    root = record_dir.resolve()
    stored_path = Path(stored.replace("\\", "/")).expanduser()
    candidates = [record_dir / folder / str(original_label) / f"{idx}.png",
                  stored_path if stored_path.is_absolute() else root.parent.parent / stored_path]
    for candidate in candidates:
        if candidate.is_file() and not candidate.is_symlink() and candidate.resolve().is_relative_to(root):
            return candidate
    return None


def materialize(clean_x: np.ndarray, clean_y: np.ndarray, state: PoisonState, info: DatasetInfo) -> ImageSet:
    """Apply BackdoorBench's ``__getitem__`` rule (spec §1.5) to every position at once."""
    positions = state.original_index
    images = clean_x[positions].copy()
    labels = clean_y[positions].copy()
    original = clean_y[positions].copy()
    flags = state.poison_indicator[positions] == 1
    h, w, c = info.img_size
    for pos in np.flatnonzero(flags):
        entry = state.entries[int(positions[pos])]
        if entry.path is None:
            shown = entry.expected or entry.stored_path
            if entry.expected is not None and entry.expected.is_symlink():
                raise BurnError(f"poisoned image {shown} is a link; a record's images are read only from its own "
                                "files - copy the record with the images themselves (cp -rL)")
            raise BurnError(f"poisoned image {shown} is missing (a record's images are read only from its own "
                            "folder); copy the whole record folder")
        images[pos] = read_png(entry.path, (h, w, c))
        labels[pos] = entry.bd_label
        original[pos] = entry.original_label
    return ImageSet.from_numpy(images, labels, original, flags, positions)


def read_png(path: Path, img_size: tuple[int, int, int]) -> np.ndarray:
    h, w, c = img_size
    try:
        with Image.open(path) as img:
            if img.size[0] * img.size[1] > 64 * w * h:  # checked before decoding: no memory bomb
                raise BurnError(f"poisoned image {path} is {img.size[0]}x{img.size[1]} pixels, far larger than the "
                                f"dataset's {w}x{h}; the record is corrupt, re-create it")
            img = img.convert("L" if c == 1 else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # a record is untrusted input
        raise BurnError(f"poisoned image {path} is unreadable ({err}); copy the record again") from None
    return arr[..., None] if arr.ndim == 2 else arr


# --------------------------------------------------------------------------- writing

@dataclass
class PoisonedSplit:
    """What an attack hands to :func:`write_attack_record` for one split.

    ``images`` maps an original index to its poisoned ``H x W x C`` uint8 image; ``bd_labels`` and
    ``original_labels`` map the same indices to labels.
    """

    original_index: np.ndarray
    poison_indicator: np.ndarray
    images: dict[int, np.ndarray]
    bd_labels: dict[int, int]
    original_labels: dict[int, int]


def write_attack_record(record_dir: str | Path, *, model_name: str, num_classes: int, state_dict,
                        clean_data: str, bd_train: PoisonedSplit | None, bd_test: PoisonedSplit,
                        data_path: str | None = None, extra: dict | None = None) -> Path:
    """Write PNGs and ``attack_result.pt`` in exactly BackdoorBench's layout (spec §1.3-1.4, §10).

    Stored paths are the relative strings BackdoorBench writes (``./record/<name>/bd_..._dataset/
    <label>/<idx>.png``), keys are Python ints (equivalent to ``numpy.int64`` for lookups), arrays
    are int64/float64. The file is written through a temporary name, so a crash never leaves a
    half record. ``extra`` adds top-level keys (BackdoorBench's ``**kwargs``, spec §1.3; its loader
    ignores them), e.g. ``train_subset_index``.
    """
    require_finite_weights(state_dict, "attack record")
    record_dir = Path(record_dir)
    record_dir.mkdir(parents=True, exist_ok=True)
    info = dataset_info(clean_data)
    name = record_dir.name
    save = {
        "model_name": model_name,
        "num_classes": int(num_classes),
        "model": cpu_state_dict(state_dict),
        "data_path": data_path or f"./data/{clean_data}",
        "img_size": tuple(int(v) for v in info.img_size),
        "clean_data": clean_data,
        "bd_train": None if bd_train is None else _write_split(record_dir, name, "bd_train", bd_train),
        "bd_test": _write_split(record_dir, name, "bd_test", bd_test),
        **(extra or {}),
    }
    atomic_torch_save(save, record_dir / "attack_result.pt")
    return record_dir / "attack_result.pt"


def _write_split(record_dir: Path, name: str, split: str, data: PoisonedSplit) -> dict:
    folder = SPLIT_FOLDERS[split]
    stored_folder = f"./record/{name}/{folder}"
    data_dict = {}
    for idx in sorted(data.images):
        orig = int(data.original_labels[idx])
        target = record_dir / folder / str(orig)
        target.mkdir(parents=True, exist_ok=True)
        img = np.asarray(data.images[idx], dtype=np.uint8)
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(target / f"{idx}.png")
        data_dict[int(idx)] = {"path": f"{stored_folder}/{orig}/{idx}.png",
                               "other_info": [int(data.bd_labels[idx]), orig]}
    return {
        "bd_data_container": {"save_folder_path": stored_folder, "save_file_format": ".png",
                              "data_dict": data_dict},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": np.asarray(data.original_index, dtype=np.int64),
        "poison_indicator": np.asarray(data.poison_indicator, dtype=np.float64),
        "save_folder_path": stored_folder,
    }


def write_defense_result(out_dir: str | Path, model_name: str, num_classes: int, state_dict) -> Path:
    """``defense_result.pt`` with exactly ``model_name``, ``num_classes`` and ``model`` (spec §3.7)."""
    require_finite_weights(state_dict, "defense result")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"model_name": model_name, "num_classes": int(num_classes),
               "model": cpu_state_dict(state_dict)}
    path = out_dir / "defense_result.pt"
    atomic_torch_save(payload, path)
    return path


def require_finite_weights(state_dict, what: str) -> None:
    """Refuse to write a model whose weights hold NaN/Inf: the file marks its output as finished,
    and scores from such a model are artefacts. :func:`burnkit.engine.fit` stops a diverging
    training earlier with the flag to change; this catches every other way a model can diverge
    (an algorithm's own optimisation loop)."""
    bad = first_nonfinite(state_dict, "model")
    if bad is not None:
        raise BurnError(f"the final model's weights hold {bad}: its training diverged, so no {what} was written; "
                        "lower the learning rate and run again")


def read_defense_result(path: str | Path) -> dict:
    """Read a ``defense_result.pt`` (ours or BackdoorBench's). FP's pruning reparametrisation
    (``*.weight_orig`` x ``*.weight_mask``, spec §9.3) is folded into a plain ``*.weight``."""
    raw = safe_torch_load(path, what="defense result")
    if not isinstance(raw, dict) or any(k not in raw for k in DEFENSE_KEYS):
        raise BurnError(f"{path} is not a BackdoorBench defense result (needs {', '.join(DEFENSE_KEYS)})")
    state = OrderedDict()
    for key, value in raw["model"].items():
        if key.endswith(".weight_orig"):
            base = key[: -len("_orig")]
            state[base] = value * raw["model"].get(base + "_mask", torch.ones_like(value))
        elif not key.endswith(".weight_mask"):
            state[key] = value
    return {"model_name": str(raw["model_name"]), "num_classes": int(raw["num_classes"]), "model": state}


def cpu_state_dict(state_dict, clone: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """A copy of ``state_dict`` with detached CPU tensors and the same ``_metadata``: some modules
    (torchvision's MNASNet) refuse a state dict without their version number."""
    out = OrderedDict((k, v.detach().cpu().clone() if clone else v.detach().cpu()) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = copy.deepcopy(metadata)
    return out
