"""Low-frequency universal trigger for LF (Zeng et al., "Rethinking the Backdoor Attacks' Triggers:
A Frequency Perspective", ICCV 2021).

The LF trigger is a universal adversarial perturbation of a clean model whose spectrum is confined to
low frequencies, so it is smooth and survives low-pass defenses. We search it by projected gradient
ascent: ``v`` lives in the span of the 2-D DFT coefficients with radius <= ``cutoff`` (a fraction of
Nyquist); every step adds the low-passed, max-normalised gradient of the clean model's loss over a
batch of training images and rescales ``v`` into the L-inf ball of radius ``eps`` (rescaling, not
clipping, so ``v`` stays exactly low-frequency). Untargeted by default (maximise the loss of the
true label, "flip predictions"); ``--target`` makes it targeted.

A uint8 pattern can only brighten, and BackdoorBench adds its ``*_0_255.npy`` pattern to the 0..255
image. We therefore store ``v - min(v)``: the shift is a constant, i.e. a pure DC (lowest frequency)
term, and the stored range is ``0..2 eps 255`` (0..51 for eps 0.1, BackdoorBench's range).

Example:
    python -m burnkit.resources lf_pattern --dataset cifar10 --model smallcnn
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import option
from ..engine import eval_mode, iterate
from ..errors import BurnError
from . import lf_pattern_path
from .base import FromCleanModelConfig, Session, imageset, save_npy


@dataclass
class LfPatternConfig(FromCleanModelConfig):
    eps: float = option(0.1, "L-inf bound of the perturbation in [0, 1] pixel units")
    cutoff: float = option(0.25, "keep DFT frequencies up to this fraction of Nyquist")
    iters: int = option(300, "gradient steps (one batch each)")
    step: float = option(0.01, "step size in [0, 1] pixel units")
    target: int | None = option(None, "target class for a targeted search",
                                default_help="untargeted")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.eps <= 0.5 or not 0 < self.cutoff <= 1 or self.iters <= 0 or self.step <= 0:
            raise BurnError("need 0 < eps <= 0.5, 0 < cutoff <= 1, iters > 0 and step > 0")


def frequency_radius(h: int, w: int) -> torch.Tensor:
    """Radius of every 2-D DFT coefficient as a fraction of Nyquist (0 = DC, 1 = Nyquist on an axis)."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.fftfreq(w)[None, :]
    return torch.sqrt(fy ** 2 + fx ** 2) / 0.5


def low_pass(v: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Zero every DFT coefficient of the last two dims with radius > ``cutoff``.

    The kept set is symmetric under k -> -k (the unpaired Nyquist row/column has radius >= 1 and is
    dropped for cutoff < 1), so the inverse transform is real.
    """
    keep = (frequency_radius(v.shape[-2], v.shape[-1]) <= cutoff).to(v.device)
    return torch.fft.ifft2(torch.fft.fft2(v) * keep).real


def high_frequency_energy(pattern: np.ndarray, cutoff: float) -> float:
    """Fraction of the non-DC spectral energy of an ``H x W x C`` pattern above ``cutoff``."""
    v = torch.as_tensor(np.asarray(pattern, dtype=np.float64)).permute(2, 0, 1)
    power = torch.fft.fft2(v).abs() ** 2
    radius = frequency_radius(*v.shape[-2:])
    non_dc = power[:, radius > 0].sum()
    return float(power[:, radius > cutoff].sum() / non_dc) if non_dc > 0 else 0.0


def search_low_frequency_perturbation(model, images, labels, *, eps: float, cutoff: float, iters: int,
                                      step: float, batch_size: int, device, generator: torch.Generator,
                                      target: int | None = None) -> torch.Tensor:
    """Universal low-frequency perturbation ``v`` (C x H x W, [0, 1] units, ``max|v| <= eps``)."""
    data = imageset(images, labels)
    v = torch.zeros(data.shape, device=device)
    done = 0
    with eval_mode(model):
        while done < iters:
            for batch in iterate(data, batch_size, device, shuffle=True, generator=generator):
                v.requires_grad_(True)
                logits = model((batch.x + v).clamp(0, 1))
                if target is None:
                    objective = F.cross_entropy(logits, batch.y)  # move away from the true label
                else:
                    objective = -F.cross_entropy(logits, torch.full_like(batch.y, target))
                grad, = torch.autograd.grad(objective, v)
                with torch.no_grad():
                    direction = low_pass(grad, cutoff)
                    v = v.detach() + step * direction / direction.abs().max().clamp_min(1e-12)
                    v = v * (eps / v.abs().max()).clamp(max=1.0)
                done += 1
                if done >= iters:
                    break
    return v.detach()


def fooling_rate(model, images, labels, v: torch.Tensor, device, batch_size: int = 512) -> tuple[float, float]:
    """(clean accuracy, fraction of correctly classified images whose prediction ``v`` changes)."""
    data = imageset(images, labels)
    correct = flipped = 0
    with eval_mode(model), torch.no_grad():
        for batch in iterate(data, batch_size, device):
            clean = model(batch.x).argmax(1)
            pert = model((batch.x + v).clamp(0, 1)).argmax(1)
            ok = clean == batch.y
            correct += int(ok.sum())
            flipped += int((ok & (pert != clean)).sum())
    return correct / max(1, len(data)), flipped / max(1, correct)


def to_pattern_0_255(v: torch.Tensor) -> np.ndarray:
    """``v - min(v)`` as uint8 ``H x W x C`` on the 0..255 scale (a DC shift keeps it low-frequency)."""
    shifted = (v - v.min()) * 255.0
    return shifted.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def generate_lf_pattern(cfg: LfPatternConfig) -> dict:
    run = Session(cfg)
    model = run.clean_model(cfg.clean_model_path)
    train_x, train_y = run.split(train=True)
    test_x, test_y = run.split(train=False)
    v = search_low_frequency_perturbation(model, train_x, train_y, eps=cfg.eps, cutoff=cfg.cutoff, iters=cfg.iters,
                                          step=cfg.step, batch_size=cfg.batch_size, device=run.device,
                                          generator=run.generator, target=cfg.target)
    pattern = to_pattern_0_255(v)
    shift = float(-v.min())  # the DC term removed again when measuring the search's own effect
    acc, fooled = fooling_rate(model, test_x, test_y, v, run.device)
    stored = torch.as_tensor(pattern, dtype=torch.float32, device=run.device).permute(2, 0, 1) / 255.0
    _, fooled_stored = fooling_rate(model, test_x, test_y, stored, run.device)
    path = save_npy(lf_pattern_path(cfg.resource_cache, cfg.dataset, cfg.model), pattern)
    return run.finish([path], "lf_pattern", clean_test_acc=acc, test_fooling_rate=fooled,
                      test_fooling_rate_stored_pattern=fooled_stored, dc_shift=shift,
                      pattern_max=int(pattern.max()), high_frequency_energy=high_frequency_energy(pattern, cfg.cutoff))
