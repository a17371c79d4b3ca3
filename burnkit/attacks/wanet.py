"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warping backdoor.

A fixed random warping field is drawn once: a ``k x k x 2`` field uniform in [-1, 1], divided by
its mean absolute value and upsampled bicubically to ``H x W``. The backdoor grid is
``clamp((identity + s * field / H) * grid_rescale, -1, 1)`` and the image is resampled at it with
``grid_sample(align_corners=True)`` (spec §6.2). "Cross" (noise-mode) samples use the same grid
plus fresh uniform noise in ``[-1/H, 1/H]`` per pixel; they keep their label, so the network learns
that only the exact warp is the trigger.

Warping runs in pixel space: with the grid clamped to [-1, 1] every sample point lies inside the
image, so the bilinear weights sum to 1 and the result equals BackdoorBench's warp of the
normalised tensor followed by denormalisation. The field is drawn from a generator seeded with
``random_seed``. Training poisons every batch on the fly (:mod:`burnkit.attacks.dynamic`);
the record is rebuilt afterwards as BackdoorBench does (spec §1.4, §9.5).

Example:
    python attack/wanet.py --dataset cifar10 --model preactresnet18 --save_folder_name wanet_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attack import register_attack
from ..config import option
from ..errors import BurnError
from .dynamic import DynamicAttack, DynamicConfig


def identity_grid(height: int, width: int) -> torch.Tensor:
    """``1 x H x W x 2`` sampling grid that reproduces the image: ``[..., 0]`` is the column
    coordinate, ``[..., 1]`` the row coordinate, both from -1 to 1 (``align_corners=True``)."""
    rows = torch.linspace(-1, 1, height)
    cols = torch.linspace(-1, 1, width)
    row_grid, col_grid = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([col_grid, row_grid], dim=-1)[None]


def random_warp_field(k: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """WaNet's field: ``k x k x 2`` uniform in [-1, 1], divided by its mean absolute value,
    bicubically upsampled to ``1 x H x W x 2``."""
    field = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    field = field / field.abs().mean()
    return F.interpolate(field, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def warp_grid(field: torch.Tensor, s: float, grid_rescale: float = 1.0) -> torch.Tensor:
    """The backdoor grid ``clamp((identity + s * field / H) * grid_rescale, -1, 1)``."""
    height, width = field.shape[1:3]
    grid = (identity_grid(height, width).to(field.device) + s * field / height) * grid_rescale
    return grid.clamp(-1, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample every image of ``x`` (NCHW) at ``grid`` (``1 x H x W x 2`` or ``N x H x W x 2``)."""
    if len(x) == 0:
        return x
    grid = grid.to(x.device, x.dtype).expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def noisy_grids(grid: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-sample grids: the backdoor grid plus uniform noise in [-1/H, 1/H] per sample and pixel."""
    height, width = grid.shape[1:3]
    noise = (torch.rand(n, height, width, 2, generator=generator) * 2 - 1).to(grid.device)
    return (grid + noise / height).clamp(-1, 1)


@dataclass
class WaNetConfig(DynamicConfig):
    cross_ratio: float = option(2.0, "cross (noise-mode) samples per backdoored sample")
    s: float = option(0.5, "warping strength")
    k: int = option(4, "size of the random warping field before upsampling")
    grid_rescale: float = option(1.0, "scale applied to the warped grid before clamping")

    def validate(self):
        super().validate()
        if self.k < 2:
            raise BurnError(f"k must be >= 2 (the field is k x k before upsampling), got {self.k}")
        if self.cross_ratio < 0:
            raise BurnError(f"cross_ratio must be >= 0, got {self.cross_ratio}")


@register_attack
class WaNet(DynamicAttack):
    """WaNet: warping-based backdoor with noise-mode cross samples, all-to-one by default."""

    name = "wanet"
    config_cls = WaNetConfig

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        h, w, _ = info.img_size
        if cfg.k > min(h, w):
            raise BurnError(f"k {cfg.k} is larger than the {h}x{w} image; use --k {min(h, w)} or less")
        self.field = random_warp_field(cfg.k, h, w, torch.Generator().manual_seed(cfg.random_seed))
        self.grid = warp_grid(self.field, cfg.s, cfg.grid_rescale)

    def backdoor(self, x):
        return warp(x, self.grid)

    def cross(self, x, partners, generator=None):
        return warp(x, noisy_grids(self.grid, len(x), generator))

    def num_cross(self, num_bd, n):
        return int(num_bd * self.cfg.cross_ratio)

    def provenance(self):
        return {"trigger": f"random warping field k={self.cfg.k}, s={self.cfg.s}, grid_rescale={self.cfg.grid_rescale},"
                           f" seed {self.cfg.random_seed}",
                "warp_field_abs_mean_px": float(self.cfg.s * self.field.abs().mean() / self.info.img_size[0]
                                                * (self.info.img_size[1] - 1) / 2)}
