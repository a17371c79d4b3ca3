"""In-memory image sets and the tensor batch pipeline.

A dataset is one uint8 tensor plus label/flag tensors (airbench's design): batches are slices of a
``randperm``, augmentation is batch tensor math, and on CUDA the whole set moves to the device once.
No DataLoader, workers or PIL in the training loop.

An :class:`ImageSet` carries BackdoorBench's sample semantics (spec §1.5) as columns: the label a
sample carries (``labels``: the backdoor label for poisoned samples), its pre-attack label
(``original_labels``), BackdoorBench's poison indicator (``poison``) and its index in the clean
split (``index``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Batch:
    """One batch on the device. ``x`` is float32 in [0, 1], NCHW."""

    x: torch.Tensor
    y: torch.Tensor
    original_y: torch.Tensor
    poison: torch.Tensor
    index: torch.Tensor
    position: torch.Tensor  # positions of these samples inside their ImageSet

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class ImageSet:
    """uint8 images ``N x C x H x W`` with per-sample labels and flags."""

    images: torch.Tensor
    labels: torch.Tensor
    original_labels: torch.Tensor
    poison: torch.Tensor
    index: torch.Tensor

    def __post_init__(self):
        n = self.images.shape[0]
        for name in ("labels", "original_labels", "poison", "index"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"ImageSet.{name} has {getattr(self, name).shape[0]} entries, images {n}")
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError("ImageSet.images must be a uint8 N x C x H x W tensor")

    @classmethod
    def from_numpy(cls, images_nhwc: np.ndarray, labels, original_labels=None, poison=None,
                   index=None) -> "ImageSet":
        """Build from ``N x H x W x C`` uint8 arrays (the on-disk/cache layout)."""
        images = torch.from_numpy(np.ascontiguousarray(images_nhwc, dtype=np.uint8)).permute(0, 3, 1, 2)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        n = labels.shape[0]
        return cls(
            images=images.contiguous(),
            labels=labels,
            original_labels=labels.clone() if original_labels is None
            else torch.as_tensor(np.asarray(original_labels), dtype=torch.long),
            poison=torch.zeros(n, dtype=torch.bool) if poison is None
            else torch.as_tensor(np.asarray(poison)).bool(),
            index=torch.arange(n) if index is None else torch.as_tensor(np.asarray(index), dtype=torch.long),
        )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def subset(self, positions) -> "ImageSet":
        pos = torch.as_tensor(np.asarray(positions) if not torch.is_tensor(positions) else positions,
                              dtype=torch.long, device=self.images.device)
        return ImageSet(self.images[pos], self.labels[pos], self.original_labels[pos],
                        self.poison[pos], self.index[pos])

    def with_labels(self, labels: torch.Tensor) -> "ImageSet":
        """The same images carrying other labels (e.g. BURN's relabelled samples)."""
        return ImageSet(self.images, torch.as_tensor(labels, dtype=torch.long, device=self.images.device),
                        self.original_labels, self.poison, self.index)

    def to(self, device) -> "ImageSet":
        device = torch.device(device)
        if self.images.device == device:
            return self
        return ImageSet(*(t.to(device, non_blocking=True) for t in
                          (self.images, self.labels, self.original_labels, self.poison, self.index)))

    def batch(self, positions: torch.Tensor, device=None, augment: "Augment | None" = None,
              generator: torch.Generator | None = None) -> Batch:
        device = torch.device(device) if device is not None else self.images.device
        pos = positions.to(self.images.device)
        imgs = self.images[pos].to(device, non_blocking=True)
        if augment is not None:
            imgs = augment(imgs, generator=generator)
        return Batch(
            x=imgs.float().div_(255.0),
            y=self.labels[pos].to(device), original_y=self.original_labels[pos].to(device),
            poison=self.poison[pos].to(device), index=self.index[pos].to(device), position=pos.to(device),
        )

    def numpy_images(self) -> np.ndarray:
        """Images as ``N x H x W x C`` uint8 (for PNG writing and trigger functions)."""
        return self.images.permute(0, 2, 3, 1).cpu().numpy()


def tensors_digest(tensors) -> str:
    """SHA-1 over ``tensors`` (tensors, or ``(name, tensor)`` pairs): each name, shape and the raw
    bytes. Hashing what a run read once per run is cheap (about a second per GB) and identifies it
    exactly, where a path or a sample count does not: a checkpoint must only be resumed on the
    data and weights it was made from."""
    import hashlib

    digest = hashlib.sha1()
    for item in tensors:
        name, tensor = item if isinstance(item, tuple) else (None, item)
        if name is not None:
            digest.update(name.encode() + b"\0")
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def imageset_digest(imageset: ImageSet) -> str:
    """The identity of an image set: its images, labels, original labels, poison flags and indices."""
    return tensors_digest((imageset.images, imageset.labels, imageset.original_labels, imageset.poison,
                           imageset.index))


def concat(sets: list[ImageSet]) -> ImageSet:
    return ImageSet(*(torch.cat([getattr(s, f) for s in sets]) for f in
                      ("images", "labels", "original_labels", "poison", "index")))


def batches(n: int, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
            drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Yield position tensors that cover ``range(n)`` in batches (a seeded permutation if shuffled)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        chunk = order[start:start + batch_size]
        if len(chunk):
            yield chunk


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


class Augment:
    """BackdoorBench's train transform as batch tensor ops (spec §2.2).

    ``RandomCrop(size, padding=4)`` with zero fill, then ``RandomHorizontalFlip`` for cifar10 only.
    Works on uint8 or float NCHW batches on any device; randomness comes from ``generator`` (or
    the global RNG) on the CPU so that runs are reproducible across devices.
    """

    def __init__(self, padding: int = 4, flip: bool = False):
        self.padding = padding
        self.flip = flip

    def __call__(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, c, h, w = imgs.shape
        p = self.padding
        if p > 0:
            padded = F.pad(imgs, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(imgs.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(imgs.device)
            rows = (dy[:, None] + torch.arange(h, device=imgs.device))  # n x h
            cols = (dx[:, None] + torch.arange(w, device=imgs.device))  # n x w
            imgs = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * p))
            imgs = imgs.gather(3, cols[:, None, None, :].expand(n, c, h, w))
        if self.flip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(imgs.device)
            imgs = torch.where(flip[:, None, None, None], imgs.flip(3), imgs)
        return imgs

    def __repr__(self) -> str:
        return f"Augment(padding={self.padding}, flip={self.flip})"


def class_balanced_subset(labels: np.ndarray, n_total: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``n_total`` samples drawn without replacement, as equal per class as possible."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if n_total >= len(labels):
        return np.arange(len(labels))
    per_class = np.full(len(classes), n_total // len(classes))
    per_class[: n_total - per_class.sum()] += 1
    chosen = []
    for cls, k in zip(classes, per_class):
        members = np.flatnonzero(labels == cls)
        chosen.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))
