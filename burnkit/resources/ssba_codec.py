"""SSBA replacement images (Li et al., "Invisible Backdoor Attack with Sample-Specific Triggers",
ICCV 2021), made with a small StegaStamp-like encoder/decoder trained here.

SSBA's trigger is an invisible, image-dependent residual produced by a steganography encoder that
hides a fixed bit string in the image. BackdoorBench expects the result as two uint8 arrays
(``<dataset>_ssba_{train,test}_b1.npy``, ``N x H x W x C``, entry ``i`` = poisoned version of clean
image ``i``). We train our own codec (no pretrained StegaStamp weights exist here):

* encoder ``E(x, bits) -> x + r``: the bits (as +-1) go through a linear map to a C x H x W code,
  concatenated with the image; a small conv net adds an image-dependent term to the code and
  ``r = eps * tanh(code + conv(x, code))``, so the change is bounded by ``eps`` (0..255 units) per
  pixel - the invisibility budget - and depends on the image. The code's skip connection makes the
  bits readable from the first step, which keeps the residual from collapsing to 0 under the penalty;
* decoder ``D(x') -> bit logits``: a small strided conv net plus a linear read-out of the pixels;
* loss: bit cross-entropy of ``D(quantise(E(x, b)))`` with random bits ``b`` per sample (so the
  decoder must read the residual, not memorise one string) + ``l2_weight * mean((r / eps)^2)``,
  that weight ramped up from 0 after the first third of training (StegaStamp ramps its image loss).

The codec is trained with ``engine.fit`` and a custom step function (its two networks are one
``nn.Module``, updated by one optimiser), so seeding, batching, AMP and progress are the engine's.
Then one fixed bit string (seeded) is embedded into every train and test image.

Example:
    python -m burnkit.resources ssba --dataset cifar10 --train_subset 10000 --epochs 5
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fileio import atomic_torch_save
from ..config import option
from ..engine import StepOutput, TrainConfig, eval_mode, fit, iterate
from ..errors import BurnError
from . import ssba_codec_path, ssba_paths
from .base import ResourceConfig, Session, imageset, save_npy, to_uint8_nhwc

SECRET_SEED = 20211011  # fixed: the embedded bit string is the same on every machine


@dataclass
class SsbaConfig(ResourceConfig):
    n_bits: int = option(16, "length of the hidden bit string")
    eps: float = option(16.0, "per-pixel bound of the residual in 0..255 units (invisibility budget)")
    width: int = option(16, "conv width of encoder and decoder")
    epochs: int = option(10, "codec training epochs")
    lr: float = option(3e-3, "Adam learning rate")
    l2_weight: float = option(0.01, "weight of the residual-energy penalty (0.01: PSNR about 26 dB on CIFAR-10, SSBA's ~27 dB)")
    train_subset: int = option(10000, "train the codec on a class-balanced subset of this size (0 = all)")
    batch_size: int = option(128, "batch size")

    def validate(self) -> None:
        super().validate()
        if self.n_bits <= 0 or not 0 < self.eps <= 255 or self.width <= 0 or self.epochs <= 0:
            raise BurnError("need n_bits > 0, 0 < eps <= 255, width > 0 and epochs > 0")


def secret_bits(n_bits: int, seed: int = SECRET_SEED) -> torch.Tensor:
    """The fixed bit string SSBA hides in every poisoned image (float 0/1)."""
    return torch.randint(0, 2, (n_bits,), generator=torch.Generator().manual_seed(seed)).float()


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(inplace=True))


class StegaCodec(nn.Module):
    """Encoder/decoder pair; images are float NCHW in [0, 1], bits float 0/1 of shape (N, n_bits)."""

    def __init__(self, channels: int, size: int, n_bits: int, eps: float, width: int = 16):
        super().__init__()
        self.size, self.eps = size, eps / 255.0
        self.channels = channels
        self.secret = nn.Linear(n_bits, channels * size * size)
        self.encoder = nn.Sequential(_conv(2 * channels, width), _conv(width, width),
                                     nn.Conv2d(width, channels, 3, 1, 1))
        reduced = max(1, size // 4)
        self.decoder = nn.Sequential(_conv(channels, width), _conv(width, width, 2), _conv(width, 2 * width, 2),
                                     nn.AdaptiveAvgPool2d(reduced), nn.Flatten(),
                                     nn.Linear(2 * width * reduced * reduced, n_bits))
        self.readout = nn.Linear(channels * size * size, n_bits)  # a linear path learns the code fast

    def residual(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        code = self.secret(bits * 2 - 1).view(-1, self.channels, self.size, self.size)
        # the code also skips past the conv net, so the bits are readable from the first step on
        return self.eps * torch.tanh(code + self.encoder(torch.cat([x - 0.5, code], 1)))

    def encode(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return (x + self.residual(x, bits)).clamp(0, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x - 0.5) + self.readout((x - 0.5).flatten(1))


def l2_ramp(epoch: int, epochs: int) -> float:
    """Residual-penalty scale: 0 for the first third of training, then linear up to 1 (as StegaStamp
    ramps its image loss), so the decoder learns to read the residual before it is shrunk."""
    start = epochs / 3
    return min(1.0, max(0.0, (epoch + 1 - start) / max(1.0, epochs - start)))


def codec_step(l2_weight: float, generator: torch.Generator):
    """Engine step: random secrets, encode, simulate uint8 rounding, decode, one Adam step."""

    def step(codec: StegaCodec, batch, optimizer, ctx) -> StepOutput:
        n_bits = codec.secret.in_features
        weight = l2_weight * l2_ramp(ctx.epoch, ctx.cfg.epochs)
        bits = torch.randint(0, 2, (len(batch), n_bits), generator=generator).float().to(batch.x.device)
        with ctx.autocast():
            r = codec.residual(batch.x, bits)
            encoded = (batch.x + r).clamp(0, 1)
            rounding = (torch.rand(encoded.shape, generator=generator).to(encoded.device) - 0.5) / 255.0
            logits = codec.decode(encoded + rounding)
            loss = F.binary_cross_entropy_with_logits(logits, bits) + weight * (r / codec.eps).pow(2).mean()
        ctx.backward_step(loss, optimizer)
        return StepOutput(loss.detach())

    return step


def train_codec(images: np.ndarray, labels: np.ndarray, cfg: SsbaConfig, device, generator) -> StegaCodec:
    h, w, c = images.shape[1:]
    if h != w:
        raise BurnError(f"the SSBA codec needs square images, got {h}x{w}")
    codec = StegaCodec(c, h, cfg.n_bits, cfg.eps, cfg.width)
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, client_optimizer="adam",
                            wd=0.0, lr_scheduler=None, augment=False)
    fit(codec, imageset(images, labels), train_cfg, device=device, step=codec_step(cfg.l2_weight, generator),
        seed=cfg.random_seed, desc="ssba_codec", progress=cfg.progress)
    return codec


@torch.no_grad()
def embed(codec: StegaCodec, images: np.ndarray, bits: torch.Tensor, device, batch_size: int = 512) -> np.ndarray:
    """Hide ``bits`` in every image; uint8 ``N x H x W x C``."""
    data = imageset(images, np.zeros(len(images), np.int64))
    out = []
    with eval_mode(codec):
        for batch in iterate(data, batch_size, device):
            out.append(to_uint8_nhwc(codec.encode(batch.x, bits.to(device).expand(len(batch), -1))))
    return np.concatenate(out)


@torch.no_grad()
def bit_accuracy(codec: StegaCodec, images_uint8: np.ndarray, bits: torch.Tensor, device, batch_size: int = 512) -> float:
    """Fraction of ``bits`` the decoder recovers from uint8 (already embedded) images."""
    data = imageset(images_uint8, np.zeros(len(images_uint8), np.int64))
    hits = total = 0
    with eval_mode(codec):
        for batch in iterate(data, batch_size, device):
            pred = (codec.decode(batch.x) > 0).float().cpu()
            hits += int((pred == bits.cpu()).sum())
            total += pred.numel()
    return hits / max(1, total)


def psnr(clean: np.ndarray, poisoned: np.ndarray) -> float:
    mse = float(np.mean((clean.astype(np.float64) - poisoned.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def generate_ssba(cfg: SsbaConfig) -> dict:
    run = Session(cfg)
    train_x, train_y = run.split(train=True)
    test_x, _ = run.split(train=False)
    keep = run.subset(train_y, cfg.train_subset)
    codec = train_codec(train_x[keep], train_y[keep], cfg, run.device, run.generator)
    bits = secret_bits(cfg.n_bits)
    train_bd = embed(codec, train_x, bits, run.device)
    test_bd = embed(codec, test_x, bits, run.device)
    train_path, test_path = ssba_paths(cfg.resource_cache, cfg.dataset)
    save_npy(train_path, train_bd)
    save_npy(test_path, test_bd)
    codec_path = ssba_codec_path(cfg.resource_cache, cfg.dataset)
    atomic_torch_save({"state_dict": codec.cpu().state_dict(), "bits": bits,
                "shape": list(train_x.shape[1:]), "n_bits": cfg.n_bits, "eps": cfg.eps, "width": cfg.width},
               codec_path)
    codec.to(run.device)
    change = np.abs(train_bd.astype(np.int16) - train_x.astype(np.int16))
    return run.finish([train_path, test_path, codec_path], "ssba", bits="".join(str(int(b)) for b in bits),
                      bit_acc_train=bit_accuracy(codec, train_bd[keep], bits, run.device),
                      bit_acc_test=bit_accuracy(codec, test_bd, bits, run.device),
                      max_abs_change_0_255=int(change.max()), mean_abs_change_0_255=float(change.mean()),
                      psnr_train_db=psnr(train_x, train_bd))
