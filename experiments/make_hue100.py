"""A CIFAR-100-sized synthetic dataset from CIFAR-10, for measuring BURN's boundary search with 100
classes where CIFAR-100 itself is not at hand (issue 16, point 3).

Class ``10 c + h`` is a CIFAR-10 image of class ``c`` whose hue is rotated by ``36 h`` degrees; ``h``
cycles over the images of each class, so every class has 500 training and 100 test images, as in
CIFAR-100. Hue-neighbour classes are close and object classes far apart, so the 100-class decision
boundaries have near and distant neighbours as CIFAR-100's fine classes do. Written in torchvision's
``cifar-100-python`` layout (pickled dicts of NumPy arrays, read by burnkit's restricted unpickler).

    PYTHONPATH=. python experiments/make_hue100.py --cifar10 ./data --out ./data_hue100
    python attack/blended.py --dataset cifar100 --dataset_path ./data_hue100 --model smallcnn ...
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

from burnkit.datasets import load_split, resolve_data_root

BINS = 10


def hue_classes(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotate the hue of the i-th image of every class by ``36 (i mod 10)`` degrees; label ``10 c + h``."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    shift = rank % BINS
    hsv = rgb_to_hsv(images.astype(np.float32) / 255.0)
    hsv[..., 0] = (hsv[..., 0] + shift[:, None, None] / BINS) % 1.0
    out = np.clip(np.rint(hsv_to_rgb(hsv) * 255.0), 0, 255).astype(np.uint8)
    return out, labels * BINS + shift


def write_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR's row layout: R, G, B planes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // BINS).tolist()}, f)
    tmp.replace(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cifar10", default="./data", help="CIFAR-10 (any layout burnkit reads)")
    p.add_argument("--out", default="./data_hue100", help="writes <out>/cifar100/cifar-100-python/")
    args = p.parse_args(argv)
    root = resolve_data_root(args.cifar10, "cifar10")
    folder = Path(args.out) / "cifar100" / "cifar-100-python"
    for split, train in (("train", True), ("test", False)):
        images, labels = load_split("cifar10", root, train=train)
        out, fine = hue_classes(images, labels)
        write_split(folder / split, out, fine)
        print(f"{split}: {len(out)} images, {len(np.unique(fine))} classes -> {folder / split}")


if __name__ == "__main__":
    main()
