"""Random views of image batches for the self-supervised and sample-distinction defenses.

DBD's SimCLR stage and D-ST's contrastive stage train on two random views of every image
(SimCLR's recipe: random resized crop, horizontal flip, colour jitter, grayscale, Gaussian blur);
D-BR/D-ST score a sample by how much a strong rotation + translation moves its features. These are
batch tensor ops in [0, 1] pixel space with per-sample random parameters drawn on the CPU from the
caller's ``generator`` (reproducible, no PIL, no DataLoader), like :class:`burnkit.data.Augment`.

Differences from torchvision's PIL transforms, chosen for batch speed: crops are resampled bilinearly
(torchvision: bicubic in DBD's config), the four colour-jitter operations run in a fixed order
(brightness, contrast, saturation, hue) instead of a random one, and hue is rotated in YIQ space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _bernoulli(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def resized_crop_and_flip(x: torch.Tensor, generator: torch.Generator | None = None,
                          scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                          flip_p: float = 0.5) -> torch.Tensor:
    """``RandomResizedCrop(size, scale, ratio)`` + ``RandomHorizontalFlip(flip_p)`` per sample: a crop
    of area ``s`` (share of the image) and aspect ``r`` drawn uniformly (``r`` log-uniformly), resized
    back to the full size."""
    n = x.shape[0]
    area = _uniform(n, *scale, generator)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop size as a share of the width / height
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (_uniform(n, -1.0, 1.0, generator)) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (_uniform(n, -1.0, 1.0, generator)) * (1 - h)
    flip = torch.where(_bernoulli(n, flip_p, generator), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    return _warp(x, theta)


def rotate_and_translate(x: torch.Tensor, generator: torch.Generator | None = None, degrees: float = 180.0,
                         translate: float = 0.2) -> torch.Tensor:
    """``RandomRotation(degrees)`` then ``RandomAffine(0, translate=(t, t))`` per sample (nearest
    neighbour, zero fill): D-BR's strong transformation ``v3`` for its FCT score."""
    n = x.shape[0]
    angle = torch.deg2rad(_uniform(n, -degrees, degrees, generator))
    shift_x = torch.round(_uniform(n, -translate, translate, generator) * x.shape[3]) * 2 / x.shape[3]
    shift_y = torch.round(_uniform(n, -translate, translate, generator) * x.shape[2]) * 2 / x.shape[2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output pixel p reads input R^-1 (p - t): rotation about the centre, then the shift
    theta = torch.stack([torch.stack([cos, -sin, -(cos * shift_x - sin * shift_y)], 1),
                         torch.stack([sin, cos, -(sin * shift_x + cos * shift_y)], 1)], 1)
    return _warp(x, theta, mode="nearest")


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def colour_jitter(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.8,
                  brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                  hue: float = 0.1) -> torch.Tensor:
    """``RandomApply([ColorJitter(b, c, s, h)], p)`` per sample; saturation and hue only on RGB."""
    n = x.shape[0]
    on = _bernoulli(n, p, generator).to(x.device).view(n, 1, 1, 1)
    view = lambda t: t.to(x.device, x.dtype).view(n, 1, 1, 1)  # noqa: E731
    out = x * view(_uniform(n, 1 - brightness, 1 + brightness, generator))
    out = out.clamp(0, 1)
    mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * view(_uniform(n, 1 - contrast, 1 + contrast, generator)) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(out)
        out = ((out - gray) * view(_uniform(n, 1 - saturation, 1 + saturation, generator)) + gray).clamp(0, 1)
        out = _rotate_hue(out, _uniform(n, -hue, hue, generator).to(x.device, x.dtype))
    return torch.where(on, out, x)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma of RGB images by ``turns`` (fractions of a full turn) in YIQ space."""
    to_yiq = _RGB_TO_YIQ.to(x.device, x.dtype)
    yiq = torch.einsum("ij,njhw->nihw", to_yiq, x)
    angle = turns * 2 * math.pi
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)


def random_grayscale(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.2) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    on = _bernoulli(x.shape[0], p, generator).to(x.device).view(-1, 1, 1, 1)
    return torch.where(on, _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5,
                  sigma: tuple[float, float] = (0.1, 2.0), radius: int = 6) -> torch.Tensor:
    """Per-sample Gaussian blur with probability ``p`` and sigma uniform in ``sigma`` (a separable
    kernel of ``2 * radius + 1`` taps, reflected borders)."""
    n, c, h, w = x.shape
    on = _bernoulli(n, p, generator)
    sig = _uniform(n, *sigma, generator)
    radius = min(radius, (min(h, w) - 1))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps[None, :] ** 2) / (2 * sig[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    identity = (taps == 0).float().expand(n, -1)
    kernel = torch.where(on[:, None], kernel, identity).to(x.device, x.dtype)  # n x k
    k = kernel.repeat_interleave(c, 0)  # one kernel per (sample, channel)
    flat = x.reshape(1, n * c, h, w)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="reflect")
    flat = F.conv2d(flat, k.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.pad(flat, (0, 0, radius, radius), mode="reflect")
    flat = F.conv2d(flat, k.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


@dataclass
class ContrastiveViews:
    """SimCLR's augmentation (DBD: with blur; D-ST/SupCon: without): crop 0.2-1.0 + flip, colour
    jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, blur p 0.5 with sigma 0.1-2."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip: bool = True
    blur: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = resized_crop_and_flip(x, generator, self.crop_scale, flip_p=0.5 if self.flip else 0.0)
        x = colour_jitter(x, generator)
        x = random_grayscale(x, generator)
        if self.blur:
            x = gaussian_blur(x, generator)
        return x.clamp(0, 1)
