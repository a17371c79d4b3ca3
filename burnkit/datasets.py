"""Clean datasets on disk, decoded once into uint8 arrays.

BackdoorBench re-reads its clean datasets with torchvision readers from ``<root>/data/<name>``
(spec §2). This module reads the same layouts (plus CIFAR-10 as an image folder, Fashion-MNIST as
IDX files and scikit-learn's digits for tests) and returns ``(images uint8 N x H x W x C, labels
int64 N)``, resized to BackdoorBench's ``img_size`` the way its ``Resize`` transform would. Decoded
arrays are cached as ``.npy`` files next to the data (or under ``~/.cache/burnkit`` when that folder
is read-only), so a run does not decode 60,000 files again.

No checksum rejects a re-encoded copy: a JPEG re-encoding of CIFAR-10 is as good as the pickles.

Nothing half-made is used as complete: an archive is unpacked into a temporary folder that is
renamed into place only after every member was checked (names, sizes, count), with a marker that
ties the folder to the archive's SHA-256; caches are keyed on the files they were decoded from
(names, sizes, modification times), so a changed folder is decoded again; a listed file that is
missing or unreadable is an error, never a smaller dataset.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import BurnError
from .fileio import atomic_write

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class DatasetInfo:
    """BackdoorBench's facts about one dataset (spec §2.1, §2.2)."""

    name: str
    num_classes: int
    img_size: tuple[int, int, int]  # (H, W, C), as stored in a record
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_flip: bool  # RandomHorizontalFlip is used for cifar10 only
    train_size: int | None = None
    test_size: int | None = None
    crop_padding: int = 4  # RandomCrop padding of the train transform


    @property
    def channels(self) -> int:
        return self.img_size[2]


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo("mnist", 10, (28, 28, 1), (0.5,), (0.5,), False, 60000, 10000),
        DatasetInfo("fashion-mnist", 10, (28, 28, 1), (0.5,), (0.5,), False, 60000, 10000),
        DatasetInfo("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261),
                    True, 50000, 10000),
        DatasetInfo("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409),
                    (0.2673, 0.2564, 0.2762), False, 50000, 10000),
        DatasetInfo("gtsrb", 43, (32, 32, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False, 39209, 12630),
        DatasetInfo("tiny", 200, (64, 64, 3), (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
                    False, 100000, 10000),
        # Not a BackdoorBench dataset: scikit-learn's 8x8 digits, shipped with sklearn, for tests.
        DatasetInfo("digits", 10, (8, 8, 1), (0.5,), (0.5,), False, 1437, 360, crop_padding=1),
    ]
}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise BurnError(f"unknown dataset '{name}'; use one of: {', '.join(DATASETS)}") from None


# --------------------------------------------------------------------------- entry point

def load_split(name: str, root: str | Path | None, train: bool, download: bool = False,
               cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 N x H x W x C, labels int64 N)`` of one split of a clean dataset.

    Args:
        name: dataset name (``cifar10``, ``cifar100``, ``gtsrb``, ``tiny``, ``mnist``,
            ``fashion-mnist``, ``digits``).
        root: the dataset folder, BackdoorBench's ``<dataset_path>/<name>`` (ignored for digits).
        train: training split if True, else the test split.
        download: let torchvision download a missing standard dataset (needs internet).
        cache: keep the decoded arrays as ``.npy`` files, keyed on the source files' names, sizes
            and modification times (a changed folder is decoded again).
    """
    info = dataset_info(name)
    if name == "digits":
        return _digits(train)
    if root is None:
        raise BurnError(f"no data folder given for {name}; pass --dataset_path")
    root = Path(root)
    if root.is_file() and _is_archive(root):
        root = extract_archive(root, Path("data") / name)
    if not root.exists() and not download:
        raise BurnError(f"{name} not found: {root} does not exist; pass --dataset_path (the folder holding "
                        f"{name}, the dataset folder itself or an image-folder archive), or --download true "
                        "with internet")
    reader, source, inputs = _find_layout(name, root, train, download)
    split = "train" if train else "test"
    if cache:
        cached = _read_cache(root, name, split, source, inputs)
        if cached is not None:
            return cached
    images, labels = reader()
    images = _to_size(images, info.img_size)
    labels = np.asarray(labels, dtype=np.int64)
    _check_labels(labels, info, root, split)
    if cache:  # keyed on the files as they are now (a download may just have made them)
        _write_cache(root, name, split, source, inputs, images, labels)
    return images, labels


def _check_labels(labels: np.ndarray, info: DatasetInfo, root: Path, split: str) -> None:
    if len(labels) == 0:
        raise BurnError(f"the {split} split of {info.name} under {root} is empty")
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise BurnError(f"the {split} split under {root} has labels {int(labels.min())}..{int(labels.max())}, "
                        f"but {info.name} has classes 0..{info.num_classes - 1}; check --dataset and --dataset_path")


def resolve_data_root(dataset_path: str | Path, name: str) -> Path:
    """BackdoorBench's ``<dataset_path>/<dataset>`` rule, also accepting the dataset folder itself
    or an image-folder archive (unpacked once into ``./data/<dataset>``)."""
    given = Path(dataset_path)
    if given.is_file():
        if not _is_archive(given):
            raise BurnError(f"--dataset_path {given} is a file but not a .tar/.tar.gz/.tgz archive")
        return extract_archive(given, Path("data") / name)
    nested = given / name
    if nested.exists():
        return nested
    if given.is_dir() and given.name == name:
        return given
    if given.is_dir() and any((given / sub).exists() for sub in ("train", "Train", "tiny-imagenet-200",
                                                                  "cifar-10-batches-py", "cifar-100-python")):
        return given
    return nested


# --------------------------------------------------------------------------- layouts

def _find_layout(name: str, root: Path, train: bool, download: bool):
    """Pick the reader for whatever layout is under ``root``; return (reader, source-id, inputs):
    ``inputs`` are the files/folders the reader decodes (the cache key is taken over them)."""
    split = "train" if train else "test"
    if name in ("cifar10", "cifar100"):
        folder = _image_folder_split(root, train)
        if folder is not None:
            return (lambda: _read_image_folder(folder, dataset_info(name))), f"folder:{folder}", [folder]
        return ((lambda: _torchvision(name, root, train, download)), f"torchvision:{root}",
                [root / CIFAR_FOLDERS[name]])
    if name in ("mnist", "fashion-mnist"):
        idx = _find_idx(root, name, train)
        if idx is not None:
            return (lambda: _read_idx_pair(*idx)), f"idx:{idx[0]}", list(idx)
        folder = _image_folder_split(root, train)
        if folder is not None:
            return (lambda: _read_image_folder(folder, dataset_info(name))), f"folder:{folder}", [folder]
        return (lambda: _torchvision(name, root, train, download)), f"torchvision:{root}", [root]
    if name == "gtsrb":
        return (lambda: _read_gtsrb(root, train)), f"gtsrb:{root}:{split}", [root / ("Train" if train else "Test")]
    if name == "tiny":
        return (lambda: _read_tiny(root, train, download)), f"tiny:{root}:{split}", [root]
    raise BurnError(f"no reader for dataset '{name}'")  # pragma: no cover


def _image_folder_split(root: Path, train: bool) -> Path | None:
    names = ("train",) if train else ("test", "val")
    for candidate in names:
        folder = root / candidate
        if folder.is_dir() and any(p.is_dir() for p in folder.iterdir()):
            return folder
    return None


def _read_image_folder(folder: Path, info: DatasetInfo | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class sub-folders in sorted order are labels 0..K-1 (torchvision ImageFolder's rule); with
    ``info``, the folder must hold exactly that dataset's number of classes, each non-empty (a
    partial copy is an error, not a smaller dataset)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if info is not None and len(classes) != info.num_classes:
        raise BurnError(f"{folder} has {len(classes)} class folders but {info.name} has {info.num_classes}; "
                        "the copy is incomplete or --dataset is wrong")
    images, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (folder / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if info is not None and not files:
            raise BurnError(f"class folder {folder / cls} holds no images; the copy is incomplete")
        for path in files:
            images.append(_open_rgb_or_l(path))
            labels.append(label)
    if not images:
        raise BurnError(f"no images found under {folder}; expected <class>/<image> files")
    return _stack(images), np.asarray(labels, dtype=np.int64)


CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _torchvision(name: str, root: Path, train: bool, download: bool):
    """Standard torchvision layouts, read here; torchvision itself is used only to download."""
    if name in CIFAR_FOLDERS and (root / CIFAR_FOLDERS[name]).is_dir():
        return _read_cifar_batches(root / CIFAR_FOLDERS[name], name, train)
    idx = _find_idx(root, name, train) if name in ("mnist", "fashion-mnist") else None
    if idx is not None:
        return _read_idx_pair(*idx)
    if not download:
        raise BurnError(f"{name} not found under {root}: expected torchvision's layout "
                        f"({CIFAR_FOLDERS.get(name, 'raw IDX files')}) or an image folder (train/<class>/, "
                        "test/<class>/); pass --dataset_path, or --download true with internet")
    try:
        import torchvision.datasets as tvd

        cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
               "fashion-mnist": tvd.FashionMNIST}[name]
        cls(str(root), train=train, download=True)
    except Exception as err:  # no internet, broken torchvision build, disk full...
        raise BurnError(f"could not download {name} into {root} ({str(err).splitlines()[0][:160]}); "
                        "put the data there by hand or pass --dataset_path") from None
    return _torchvision(name, root, train, download=False)


class _CifarUnpickler:
    """CIFAR batches are pickles of dicts of bytes/lists/NumPy arrays: read them with an
    unpickler that builds nothing else (no arbitrary globals)."""

    @staticmethod
    def load(path: Path) -> dict:
        import pickle

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
                    from .safe_load import _multiarray

                    return getattr(_multiarray, name)
                if module == "numpy" and name in ("ndarray", "dtype"):
                    return getattr(np, name)
                if module == "_codecs" and name == "encode":
                    import codecs

                    return codecs.encode
                raise pickle.UnpicklingError(f"{path}: refusing to load global {module}.{name}")

        with open(path, "rb") as f:
            return Restricted(f, encoding="latin1").load()


def _read_cifar_batches(folder: Path, name: str, train: bool):
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key = "labels"
    else:
        files = ["train"] if train else ["test"]
        label_key = "fine_labels"
    images, labels = [], []
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise BurnError(f"{path} is missing; the CIFAR folder {folder} is incomplete")
        try:
            entry = _CifarUnpickler.load(path)
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            batch_labels = list(entry.get(label_key, entry.get("labels", [])))
        except Exception as err:  # truncated pickle, refused global, wrong shapes: all mean a bad file
            raise BurnError(f"{path} is not a readable CIFAR batch ({str(err).splitlines()[0][:120] if str(err) else type(err).__name__}); "
                            "download or copy it again") from None
        if len(batch_labels) != len(data):
            raise BurnError(f"{path} holds {len(data)} images but {len(batch_labels)} labels; the file is damaged")
        images.append(data)
        labels.extend(batch_labels)
    return np.concatenate(images), np.asarray(labels, dtype=np.int64)


def _find_idx(root: Path, name: str, train: bool):
    """IDX files, gzipped or not, flat (Debian's fashion-mnist) or under torchvision's raw/."""
    prefix = "train" if train else "t10k"
    sub = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    for folder in (root, root / sub / "raw", root / "raw"):
        for ext in (".gz", ""):
            imgs = folder / f"{prefix}-images-idx3-ubyte{ext}"
            labs = folder / f"{prefix}-labels-idx1-ubyte{ext}"
            if imgs.exists() and labs.exists():
                return imgs, labs
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format): magic, dims as big-endian int32, then uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise BurnError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise BurnError(f"{path} is truncated: expected {int(np.prod(dims))} bytes of data")
    return data.reshape(tuple(int(d) for d in dims)).copy()  # writable (frombuffer's view is read-only)


def _read_idx_pair(images_path: Path, labels_path: Path):
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if len(images) != len(labels):
        raise BurnError(f"{images_path} and {labels_path} hold different sample counts")
    return images[..., None], labels


def _read_gtsrb(root: Path, train: bool):
    """BackdoorBench's GTSRB layout: Train/<c:05d>/GT-<c:05d>.csv, Test/GT-final_test.csv."""
    images, labels = [], []
    if train:
        base = root / "Train"
        if not base.is_dir():
            raise BurnError(f"GTSRB training folder {base} not found; build it with the official "
                            "GTSRB_Final_Training_Images.zip (BackdoorBench layout) or pass --dataset_path")
        for c in range(43):
            csv = base / f"{c:05d}" / f"GT-{c:05d}.csv"
            for fname, cid in _gtsrb_rows(csv):
                images.append(_open_rgb_or_l(csv.parent / fname, mode="RGB", size=(32, 32)))
                labels.append(cid)
    else:
        csv = root / "Test" / "GT-final_test.csv"
        if not csv.exists():
            raise BurnError(f"GTSRB test annotations {csv} not found; unpack GTSRB_Final_Test_Images.zip "
                            "and GTSRB_Final_Test_GT.zip there or pass --dataset_path")
        for fname, cid in _gtsrb_rows(csv):
            images.append(_open_rgb_or_l(csv.parent / fname, mode="RGB", size=(32, 32)))
            labels.append(cid)
    return _stack(images), np.asarray(labels, dtype=np.int64)


def _gtsrb_rows(csv: Path):
    if not csv.exists():
        raise BurnError(f"GTSRB annotation file {csv} is missing")
    lines = csv.read_text().splitlines()[1:]
    for line in lines:
        cols = line.split(";")
        if len(cols) >= 8:
            yield cols[0], int(cols[7])


def _read_tiny(root: Path, train: bool, download: bool):
    """Tiny-ImageNet as BackdoorBench reads it: ImageFolder on tiny-imagenet-200/{train,val}.

    The val split must already be sorted into class folders (BackdoorBench does that after its
    download); the flat official ``val/images`` + ``val_annotations.txt`` layout is also read, in
    the order ImageFolder gives the sorted folders (class by class, file names sorted), so test
    indices are BackdoorBench's. Labels follow the sorted wnid order of the train folder
    (ImageFolder's rule; ``wnids.txt``'s own order is not used).
    """
    base = root / "tiny-imagenet-200"
    if not base.is_dir() and (root / "train").is_dir():
        base = root  # data/tiny/{train,val} as sh/timagenet_download.sh leaves it
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise BurnError(f"Tiny-ImageNet not found under {root} (expected tiny-imagenet-200/train); "
                        "unpack tiny-imagenet-200.zip there or pass --dataset_path")
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if train:
        return _read_image_folder(train_dir)
    val = base / "val"
    annotations = val / "val_annotations.txt"
    if annotations.exists() and (val / "images").is_dir():
        lookup = {w: i for i, w in enumerate(wnids)}
        rows = [parts[:2] for parts in (line.split("\t") for line in annotations.read_text().splitlines())
                if len(parts) >= 2]
        rows = sorted((lookup[wnid], fname) for fname, wnid in rows if wnid in lookup)
        images = [_open_rgb_or_l(val / "images" / fname, mode="RGB") for _, fname in rows]
        return _stack(images), np.asarray([label for label, _ in rows], dtype=np.int64)
    return _read_image_folder(val)


def _digits(train: bool):
    """scikit-learn's 8x8 digits scaled to 0..255; every 5th sample is the test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    test = np.arange(len(labels)) % 5 == 0
    keep = ~test if train else test
    return images[keep], labels[keep]


# --------------------------------------------------------------------------- helpers

def _open_rgb_or_l(path: Path, mode: str | None = None, size: tuple[int, int] | None = None):
    try:
        with Image.open(path) as img:
            if mode is None:
                mode = "L" if img.mode in ("L", "1", "I;16", "I") else "RGB"
            img = img.convert(mode)
            if size is not None and img.size != size:
                img = img.resize(size, Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise BurnError(f"image {path} is listed by the dataset but missing; the copy is incomplete") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BurnError(f"image {path} is unreadable ({str(err).splitlines()[0][:120]}); the copy is damaged") from None


def _stack(images: list[np.ndarray]) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) > 1:  # variable sizes: resize later; keep a list-compatible object array
        arr = np.empty(len(images), dtype=object)
        arr[:] = images
        return arr
    arr = np.stack(images)
    return arr[..., None] if arr.ndim == 3 else arr


def _to_size(images: np.ndarray, img_size: tuple[int, int, int]) -> np.ndarray:
    """Resize to (H, W) with PIL bilinear, as BackdoorBench's ``Resize`` does; fix channels."""
    h, w, c = img_size
    if images.dtype != object and images.shape[1:3] == (h, w) and images.shape[3] == c:
        return np.ascontiguousarray(images, dtype=np.uint8)
    out = np.empty((len(images), h, w, c), dtype=np.uint8)
    for i, im in enumerate(images):
        pil = Image.fromarray(im.squeeze(-1) if im.ndim == 3 and im.shape[-1] == 1 else im)
        pil = pil.convert("L" if c == 1 else "RGB")
        if pil.size != (w, h):
            pil = pil.resize((w, h), Image.BILINEAR)
        arr = np.asarray(pil, dtype=np.uint8)
        out[i] = arr[..., None] if arr.ndim == 2 else arr
    return out


CACHE_VERSION = "2"  # bump when decoding changes


def _content_signature(inputs: list[Path]) -> str:
    """SHA-1 over (relative name, size, mtime) of every file under ``inputs``: a cache built from
    other files (a folder completed since, a replaced batch) gets another key."""
    digest = hashlib.sha1(CACHE_VERSION.encode())
    for base in inputs:
        if base.is_file():
            st = base.stat()
            digest.update(f"{base.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            continue
        if not base.is_dir():
            digest.update(f"{base}\0absent\n".encode())
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if fname.startswith("."):
                    continue
                path = Path(dirpath) / fname
                st = path.stat()
                rel = path.relative_to(base).as_posix()
                digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _cache_folders(root: Path, name: str) -> list[Path]:
    return [root / ".burnkit_cache", Path.home() / ".cache" / "burnkit" / name]


def _cache_stem(name: str, split: str, source: str, inputs: list[Path]) -> str:
    tag = hashlib.sha1(source.encode()).hexdigest()[:10]
    return f"{name}-{split}-{tag}-{_content_signature(inputs)}"


def _read_cache(root: Path, name: str, split: str, source: str, inputs: list[Path]):
    stem = _cache_stem(name, split, source, inputs)
    for folder in _cache_folders(root, name):
        images_file, labels_file = folder / f"{stem}.images.npy", folder / f"{stem}.labels.npy"
        if not labels_file.exists():
            continue
        try:  # plain arrays only: a cache file cannot carry code
            images = np.load(images_file, allow_pickle=False)
            labels = np.load(labels_file, allow_pickle=False)
        except (OSError, ValueError):
            continue  # a broken cache is rebuilt
        if images.ndim == 4 and images.dtype == np.uint8 and len(images) == len(labels):
            return images, labels.astype(np.int64, copy=False)
    return None


def _write_cache(root: Path, name: str, split: str, source: str, inputs: list[Path], images: np.ndarray,
                 labels: np.ndarray) -> None:
    """Write both arrays through temporary names so a killed run leaves no half cache; the labels
    file, which a reader looks for first, is written last. Older caches of this split are removed."""
    stem = _cache_stem(name, split, source, inputs)
    prefix = stem.rsplit("-", 1)[0] + "-"
    for folder in _cache_folders(root, name):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for suffix, arr in ((".images.npy", images), (".labels.npy", labels)):
                atomic_write(folder / f"{stem}{suffix}", lambda f, arr=arr: np.save(f, arr, allow_pickle=False))
        except OSError:
            continue  # read-only data folder: try the user cache
        for old in folder.glob(f"{prefix}*.npy"):
            if not old.name.startswith(stem):
                old.unlink(missing_ok=True)
        return


def _is_archive(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz", ".tar"))


UNPACK_MARKER = ".burnkit_unpacked.json"


def extract_archive(archive: Path, dest: Path) -> Path:
    """Unpack an image-folder archive (``train/<class>/*``, ``test/<class>/*``) into ``dest``, once.

    Every member is checked before anything is written (members that would land outside ``dest``,
    absolute paths, ``..`` and links are refused), the archive is unpacked into a hidden temporary
    folder, each file's size is verified, and only then is the folder renamed to ``dest`` with a
    marker holding the archive's SHA-256 and file count. A run killed while unpacking leaves only
    the temporary folder, which the next run removes; a ``dest`` made from another archive, or one
    that lost files since, is an error, never a smaller dataset. Returns the folder holding
    ``train/`` (``dest`` or its single wrapping sub-folder).
    """
    archive, dest = Path(archive), Path(dest)
    identity = {"archive_sha256": _sha256(archive)}
    found = _unpacked_root(dest, identity, archive)
    if found is not None:
        return found
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BurnError(f"cannot create {dest.parent} to unpack {archive}: {err.strerror or err}") from None
    try:
        with _locked(dest.parent):  # the processes of one compare unpack it once
            found = _unpacked_root(dest, identity, archive)
            if found is not None:
                return found
            if dest.exists():
                _adopt_existing(dest, archive, identity)
                return _unpacked_root(dest, identity, archive)
            for stale in dest.parent.glob(f".{dest.name}.partial-*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
            tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
            try:
                files = _unpack_verified(archive, tmp)
                _write_marker(tmp, identity, files, _train_root(tmp, archive))
                os.rename(tmp, dest)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    except BurnError:
        for folder in made:  # a refused archive leaves no trace (only folders this call made, if empty)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return _unpacked_root(dest, identity, archive)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise BurnError(f"cannot read archive {path}: {err.strerror or err}") from None
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive advisory lock on ``folder`` itself (no lock file left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_marker(dest: Path) -> dict | None:
    marker = dest / UNPACK_MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _unpacked_root(dest: Path, identity: dict, archive: Path) -> Path | None:
    """``dest``'s train root when it is a complete unpack of this archive; None when it is absent
    or has no marker; an error when it came from another archive or lost files."""
    marker = _read_marker(dest)
    if marker is None:
        return None
    if marker.get("archive_sha256") != identity["archive_sha256"]:
        raise BurnError(f"{dest} was unpacked from another archive than {archive}; delete {dest} to unpack "
                        f"this one, or pass --dataset_path {dest} to use the folder")
    count = 0
    for _, dirnames, filenames in os.walk(dest):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # our caches live in .burnkit_cache
        count += sum(1 for f in filenames if not f.startswith("."))
    if count < int(marker.get("files", 0)):
        raise BurnError(f"{dest} holds {count} files but {archive} has {marker.get('files')}; files were "
                        f"removed since it was unpacked - delete {dest} to unpack the archive again")
    return dest / marker.get("root", ".")


def _safe_members(tar: tarfile.TarFile, archive: Path, dest: Path) -> list[tarfile.TarInfo]:
    members, base = [], dest.resolve()
    for m in tar.getmembers():
        target = (dest / m.name).resolve()
        inside = target == base or base in target.parents
        if not (m.isfile() or m.isdir()) or not inside or Path(m.name).is_absolute():
            raise BurnError(f"archive {archive} has an unsafe member '{m.name}'; refusing to unpack it")
        members.append(m)
    return members


# what a damaged archive raises while being read
TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def _unpack_verified(archive: Path, tmp: Path) -> int:
    """Unpack into ``tmp``; check every file's size against its member; return the file count."""
    try:
        with tarfile.open(archive) as tar:
            members = _safe_members(tar, archive, tmp)  # reads the whole archive: truncation shows here
            tmp.mkdir(parents=True)
            tar.extractall(tmp, members=members, filter="data")
    except TAR_ERRORS as err:
        raise BurnError(f"archive {archive} is truncated or corrupt ({str(err).splitlines()[0][:120] or type(err).__name__}); "
                        "copy or download it again") from None
    except OSError as err:
        raise BurnError(f"could not unpack {archive} into {tmp.parent}: {err.strerror or err}") from None
    files = 0
    for m in members:
        if m.isfile():
            path = tmp / m.name
            if not path.is_file() or path.stat().st_size != m.size:
                raise BurnError(f"unpacking {archive} produced a wrong {m.name}; copy the archive again")
            files += 1
    return files


def _train_root(folder: Path, archive: Path) -> str:
    """``.`` when ``folder/train`` exists, else the single wrapping folder that has ``train/``."""
    if (folder / "train").is_dir():
        return "."
    subs = [p for p in folder.iterdir() if p.is_dir() and (p / "train").is_dir()]
    if len(subs) == 1:
        return subs[0].name
    raise BurnError(f"archive {archive} has no train/<class>/ folder; expected an image-folder archive")


def _write_marker(folder: Path, identity: dict, files: int, root: str) -> None:
    (folder / UNPACK_MARKER).write_text(json.dumps({**identity, "files": files, "root": root}) + "\n")


def _adopt_existing(dest: Path, archive: Path, identity: dict) -> None:
    """A ``dest`` without a marker (unpacked by hand, or by an older burnkit): use it only if it
    holds every file of the archive with the right size."""
    try:
        with tarfile.open(archive) as tar:
            expected = {m.name: m.size for m in _safe_members(tar, archive, dest) if m.isfile()}
    except TAR_ERRORS as err:
        raise BurnError(f"archive {archive} is truncated or corrupt ({str(err).splitlines()[0][:120] or type(err).__name__}); "
                        "copy or download it again") from None
    wrong = [n for n, size in expected.items() if not (dest / n).is_file() or (dest / n).stat().st_size != size]
    if wrong:
        raise BurnError(f"{dest} exists but does not match {archive} ({len(wrong)} of {len(expected)} files missing "
                        f"or different, e.g. {wrong[0]}); delete {dest} so the archive is unpacked again")
    _write_marker(dest, identity, len(expected), _train_root(dest, archive))
