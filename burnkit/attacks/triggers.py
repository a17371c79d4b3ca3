"""Trigger images shared by attacks: loading, resizing, and the two pixel rules.

Every trigger works on ``n x H x W x C`` uint8 arrays at the dataset's size, the way BackdoorBench
poisons the resized HWC image before it is saved as PNG (spec §6.1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import BurnError


def load_trigger_image(path: str | Path, size_hw: tuple[int, int], channels: int) -> np.ndarray:
    """Read an image and resize it to ``size_hw`` with bilinear interpolation (BackdoorBench
    resizes its trigger images this way); returns ``H x W x C`` uint8."""
    path = Path(path)
    if not path.is_file():
        raise BurnError(f"trigger image {path} not found; pass an existing image path")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size_hw[1], size_hw[0]):
                img = img.resize((size_hw[1], size_hw[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as err:  # refused before decoding: a trigger path is user input
        raise BurnError(f"trigger image {path} is too large to decode safely ({err}); pass a smaller image (it is "
                        f"resized to {size_hw[1]}x{size_hw[0]} anyway)") from None
    except (OSError, ValueError) as err:
        raise BurnError(f"trigger image {path} is unreadable: {err}") from None
    return arr[..., None] if arr.ndim == 2 else arr


def resize_pattern(pattern: np.ndarray, size_hw: tuple[int, int], channels: int) -> np.ndarray:
    """Resize an ``h x w x c`` uint8 pattern to the dataset's size (bilinear, like a trigger file)."""
    pil = Image.fromarray(pattern.squeeze(-1) if pattern.shape[-1] == 1 else pattern)
    pil = pil.convert("L" if channels == 1 else "RGB")
    if pil.size != (size_hw[1], size_hw[0]):
        pil = pil.resize((size_hw[1], size_hw[0]), Image.BILINEAR)
    arr = np.asarray(pil, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def stamp(images: np.ndarray, trigger: np.ndarray) -> np.ndarray:
    """BackdoorBench's patch rule: every value where the trigger is > 0 is replaced by it."""
    mask = trigger > 0
    out = images.copy()
    out[:, mask] = np.broadcast_to(trigger, images.shape)[:, mask]
    return out


def blend(images: np.ndarray, trigger: np.ndarray, alpha: float) -> np.ndarray:
    """BackdoorBench's blend rule: ``(1 - alpha) x + alpha t``, clipped, truncated to uint8."""
    mixed = (1.0 - alpha) * images.astype(np.float64) + alpha * trigger.astype(np.float64)[None]
    return np.clip(mixed, 0, 255).astype(np.uint8)
