"""Attacks that poison every training batch on the fly: what WaNet, InputAware and BPP share.

BackdoorBench trains these three with loops of their own (spec §1.4, §6.2, §9.5). In every
shuffled batch of ``n`` samples

* the first ``num_bd = int(pratio * n)`` are backdoored and relabelled (all2one: the target;
  all2all: ``(y + 1) % K`` - the +1 shift is hard-coded, as in BackdoorBench);
* the next ``num_cross`` are "cross" (WaNet, InputAware) or "negative" (BPP) samples: they carry a
  perturbation that must *not* trigger the backdoor, and keep their label;
* the rest stay clean;

then the whole batch goes through a random crop (p 0.8) / rotation (p 0.5) / flip (cifar10 only)
transform. Here that is a step function for the one engine (:meth:`DynamicAttack.step`); the
per-epoch scores (BackdoorBench's WaNet/InputAware/BPP columns, spec §1.8) are added by ``fit``'s
``epoch_end`` hook.

After training, the record's ``bd_train`` is rebuilt as BackdoorBench does: the training set is
cut, unshuffled, into blocks of ``batch_size``; in every block the first ``num_bd`` samples are
stored backdoored, the next ``num_cross`` as cross/negative samples, and both groups are flagged
poisoned (spec §9.5). ``bd_test`` holds the backdoored non-target test images (all test images for
all2all) and ``cross_test_dataset/<label>/<index>.png`` the cross/negative version of every test
image.

Images are scored and stored as uint8 (rounded), so the per-epoch ASR is measured on exactly the
images a defense later reads from the record.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..attack import Attack, AttackConfig, PoisonPlan
from ..config import option
from ..data import Augment, ImageSet
from ..engine import EvalSuite, StepOutput, fit, predict
from ..errors import BurnError
from ..metrics import accuracy
from ..records import PoisonedSplit

CROSS_TEST_FOLDER = "cross_test_dataset"


@dataclass
class DynamicConfig(AttackConfig):
    random_rotation: float = option(10.0, "training batch transform: max rotation in degrees (applied with p 0.5)")
    random_crop: int = option(5, "training batch transform: random-crop padding in pixels (applied with p 0.8)")

    def validate(self):
        super().validate()
        if self.attack_label_trans == "all2all" and self.attack_label_shift_amount != 1:
            raise BurnError("this attack uses BackdoorBench's fixed +1 label shift for all2all; "
                            "drop --attack_label_shift_amount")
        if self.random_rotation < 0 or self.random_crop < 0:
            raise BurnError("random_rotation and random_crop must be >= 0")


# --------------------------------------------------------------------------- tensor helpers


def to_float(images_nhwc: np.ndarray, device="cpu") -> torch.Tensor:
    """``n x H x W x C`` uint8 -> float NCHW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).to(device).permute(0, 3, 1, 2).float().div(255.0)


def to_uint8(x01: torch.Tensor) -> np.ndarray:
    """float NCHW in [0, 1] -> ``n x H x W x C`` uint8, rounded to the nearest level."""
    return x01.detach().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def rotate(x: torch.Tensor, radians: torch.Tensor) -> torch.Tensor:
    """Rotate every image of ``x`` about its centre by its own angle (nearest neighbour, zero fill,
    as torchvision's ``RandomRotation`` default)."""
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class BatchTransform:
    """The training transform of the on-the-fly attacks, per sample: random crop with ``crop``-px
    zero padding (p 0.8), rotation by up to ``degrees`` (p 0.5), horizontal flip (p 0.5, cifar10).
    Randomness comes from the global torch RNG (CPU), which the engine's checkpoint restores."""

    def __init__(self, crop: int, degrees: float, flip: bool):
        self.crop = Augment(int(crop)) if crop > 0 else None
        self.degrees = float(degrees)
        self.flip = Augment(0, flip=True) if flip else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.crop is not None:
            chosen = (torch.rand(n) < 0.8).to(x.device)[:, None, None, None]
            x = torch.where(chosen, self.crop(x), x)
        if self.degrees > 0:
            angles = (torch.rand(n) * 2 - 1) * math.radians(self.degrees)
            angles = torch.where(torch.rand(n) < 0.5, angles, torch.zeros_like(angles))
            x = rotate(x, angles)
        if self.flip is not None:
            x = self.flip(x)
        return x


class _TrainTally:
    """Train accuracies of one epoch split into clean / backdoored / cross samples (spec §1.8)."""

    def __init__(self):
        self.n = self.ok = self.n_clean = self.ok_clean = self.n_bd = self.asr = self.ra = 0
        self.n_cross = self.ok_cross = 0

    def add(self, preds, labels, original, num_bd: int, num_cross: int) -> None:
        hit = preds == labels
        self.n += len(preds)
        self.ok += int(hit.sum())
        self.n_bd += num_bd
        self.asr += int(hit[:num_bd].sum())
        self.ra += int((preds[:num_bd] == original[:num_bd]).sum())
        end = num_bd + num_cross
        self.n_cross += num_cross
        self.ok_cross += int(hit[num_bd:end].sum())
        self.n_clean += len(preds) - end
        self.ok_clean += int(hit[end:].sum())

    def columns(self) -> dict:
        def frac(a, b):
            return a / b if b else None

        return {"train_acc": frac(self.ok, self.n), "train_acc_clean_only": frac(self.ok_clean, self.n_clean),
                "train_asr_bd_only": frac(self.asr, self.n_bd), "train_ra_bd_only": frac(self.ra, self.n_bd),
                "train_cross_acc_only": frac(self.ok_cross, self.n_cross)}


def score_sets(model, clean: ImageSet, bd: ImageSet, cross: ImageSet, device) -> dict:
    """BackdoorBench's per-epoch test columns of the on-the-fly attacks (spec §1.8)."""
    clean_logits = predict(model, clean, device)
    bd_logits = predict(model, bd, device)
    cross_logits = predict(model, cross, device)

    def loss(logits, labels):
        return F.cross_entropy(logits, labels.cpu()).item() if len(labels) else None

    def acc(logits, labels):
        return accuracy(logits.argmax(1), labels) if len(labels) else None

    return {"clean_test_loss_avg_over_batch": loss(clean_logits, clean.labels),
            "bd_test_loss_avg_over_batch": loss(bd_logits, bd.labels),
            "cross_test_loss_avg_over_batch": loss(cross_logits, cross.labels),
            "ra_test_loss_avg_over_batch": loss(bd_logits, bd.original_labels),
            "test_acc": acc(clean_logits, clean.labels), "test_asr": acc(bd_logits, bd.labels),
            "test_ra": acc(bd_logits, bd.original_labels), "test_cross_acc": acc(cross_logits, cross.labels)}


def write_pngs(folder: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    """``folder/<label>/<index>.png`` for every image, BackdoorBench's layout of an image folder."""
    for img, label, idx in zip(images, labels, indices):
        target = folder / str(int(label))
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(target / f"{int(idx)}.png")


# --------------------------------------------------------------------------- the attack base


@dataclass
class RecordLayout:
    """Which training indices the rebuilt ``bd_train`` stores as backdoored / cross (spec §9.5)."""

    bd: np.ndarray  # original indices stored backdoored and relabelled
    cross: np.ndarray  # original indices stored as cross/negative samples (label kept)
    partners: np.ndarray  # for every cross index, the other image whose trigger/residual it gets


class DynamicAttack(Attack):
    """Base of the attacks that poison each batch during training.

    Subclasses implement :meth:`backdoor` (the trigger on a float batch), :meth:`cross` (the
    cross/negative perturbation) and :meth:`num_cross`; InputAware also trains a generator and
    overrides :meth:`poison_batch`.
    """

    static_trigger: ClassVar[bool] = True  # False: the trigger changes while training (InputAware)
    chunk: ClassVar[int] = 1024  # images per chunk when a whole split is poisoned

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.device = torch.device("cpu")
        self.train_set: ImageSet | None = None
        self.tally = _TrainTally()
        self.transform = BatchTransform(cfg.random_crop, cfg.random_rotation, info.train_flip)

    # -- what a subclass defines -------------------------------------------------------------

    def backdoor(self, x: torch.Tensor) -> torch.Tensor:
        """Backdoored version of a float NCHW batch in [0, 1]."""
        raise NotImplementedError

    def cross(self, x: torch.Tensor, partners: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Cross/negative version of ``x``; ``partners`` are other images of the same shape."""
        raise NotImplementedError

    def num_cross(self, num_bd: int, n: int) -> int:
        raise NotImplementedError

    def extra_optimizers(self) -> list:
        """Optimisers stepped together with the classifier's (InputAware's generator)."""
        return []

    def prepare(self, device: torch.device) -> None:
        """Work before the classifier's training (InputAware's mask pre-training)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called after every classifier epoch (InputAware steps the generator's scheduler)."""

    # -- labels, counts, poisoning ---------------------------------------------------------------

    def target_labels(self, labels):
        if self.cfg.attack_label_trans == "all2one":
            return labels * 0 + self.cfg.attack_target
        return (labels + 1) % self.info.num_classes

    def split(self, n: int) -> tuple[int, int]:
        """``(num_bd, num_cross)`` for a batch of ``n`` samples."""
        num_bd = int(self.cfg.pratio * n)
        return num_bd, max(0, min(self.num_cross(num_bd, n), n - num_bd))

    def plan(self, train_y, test_y, rng) -> PoisonPlan:
        # Nothing is poisoned before training: the batches are (spec §1.4). Keep the subset and
        # the bd_test selection of the base plan.
        plan = super().plan(train_y, test_y, rng)
        return PoisonPlan(plan.train_positions, np.zeros(0, np.int64), plan.test_poison)

    def partners(self, n: int, device) -> torch.Tensor:
        """``n`` random training images (float, unaugmented): the 'other images' of cross samples."""
        pos = torch.randint(len(self.train_set), (n,))
        return self.train_set.images[pos.to(self.train_set.device)].to(device).float().div(255.0)

    def _map(self, fn, *arrays: np.ndarray) -> np.ndarray:
        """Apply a float-batch function to uint8 NHWC arrays chunk by chunk; return uint8 NHWC."""
        n = len(arrays[0])
        out = np.empty_like(arrays[0])
        with torch.no_grad():
            for start in range(0, n, self.chunk):
                parts = [to_float(a[start:start + self.chunk], self.device) for a in arrays]
                out[start:start + self.chunk] = to_uint8(fn(*parts))
        return out

    def apply_trigger(self, images, labels, indices, train):
        return self._map(self.backdoor, images)

    def cross_set(self, clean: ImageSet) -> ImageSet:
        """The cross/negative version of every image of ``clean`` (label kept, flagged poisoned);
        the partner of image i is image i+1 (cyclic), the noise is seeded."""
        images = clean.numpy_images()
        partners = np.roll(images, -1, axis=0)
        generator = torch.Generator().manual_seed(self.cfg.random_seed + 1)
        crossed = self._map(lambda x, p: self.cross(x, p, generator), images, partners)
        return ImageSet.from_numpy(crossed, clean.labels.cpu().numpy(), clean.labels.cpu().numpy(),
                                   np.ones(len(clean), bool), clean.index.cpu().numpy())

    def bd_test_set(self, suite: EvalSuite) -> ImageSet:
        """``bd_test`` with the current trigger (the static one already is)."""
        if self.static_trigger:
            return suite.bd_test
        bd = suite.bd_test
        clean = suite.clean_test.images[bd.index.to(suite.clean_test.device)].permute(0, 2, 3, 1).cpu().numpy()
        return ImageSet.from_numpy(self._map(self.backdoor, clean), bd.labels.cpu().numpy(),
                                   bd.original_labels.cpu().numpy(), np.ones(len(bd), bool), bd.index.cpu().numpy())

    # -- training ------------------------------------------------------------------------------

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor):
        """``(inputs, labels, num_bd, num_cross, extra_loss)`` for one clean batch."""
        num_bd, num_cross = self.split(len(x))
        end = num_bd + num_cross
        with torch.no_grad():
            bd = self.backdoor(x[:num_bd])
            crossed = self.cross(x[num_bd:end], self.partners(num_cross, x.device))
        inputs = torch.cat([bd, crossed, x[end:]])
        labels = torch.cat([self.target_labels(y[:num_bd]), y[num_bd:]])
        return inputs, labels, num_bd, num_cross, None

    def step(self, model, batch, optimizer, ctx) -> StepOutput:
        """One training step on a batch poisoned on the fly (the engine's step contract)."""
        inputs, labels, num_bd, num_cross, extra_loss = self.poison_batch(batch.x, batch.y)
        inputs = self.transform(inputs)
        with ctx.autocast():
            logits = model(inputs)
            loss = F.cross_entropy(logits, labels)
        if extra_loss is not None:
            loss = loss + extra_loss
        ctx.backward_step(loss, optimizer, *self.extra_optimizers())
        self.tally.add(logits.detach().argmax(1), labels, batch.y, num_bd, num_cross)
        return StepOutput(loss.detach(), None)  # train accuracies come from the tally

    def train_config(self):
        return self.cfg.train_config(augment=False)  # the step applies its own batch transform

    def train(self, model, train_set, suite, device, log, checkpoint):
        cfg = self.cfg
        self.device = device
        self.train_set = train_set
        self.prepare(device)
        static_cross = self.cross_set(suite.clean_test) if self.static_trigger else None

        epochs = self.train_config().epochs

        def epoch_end(epoch, model, row):
            row.update(self.tally.columns())
            self.tally = _TrainTally()
            if (epoch + 1) % cfg.test_every == 0 or epoch + 1 == epochs:
                cross = static_cross if static_cross is not None else self.cross_set(suite.clean_test)
                row.update(score_sets(model, suite.clean_test, self.bd_test_set(suite), cross, device))
            self.on_epoch_end(epoch)

        def on_row(row):
            log.append(row)
            log.save()

        return fit(model, train_set, self.train_config(), device=device, step=self.step, seed=cfg.random_seed,
                   epoch_end=epoch_end, on_row=on_row, checkpoint=checkpoint if self.resumable else None,
                   resume=cfg.resume, desc=self.name, progress=cfg.progress, fingerprint=self.fingerprint(train_set),
                   flags=cfg)

    # -- the record ----------------------------------------------------------------------------

    def record_layout(self, positions: np.ndarray) -> RecordLayout:
        """BackdoorBench's rebuilt poison pattern over the unshuffled training set (spec §9.5)."""
        bd, cross, partners = [], [], []
        bs = self.cfg.batch_size
        for start in range(0, len(positions), bs):
            block = positions[start:start + bs]
            num_bd, num_cross = self.split(len(block))
            bd.append(block[:num_bd])
            picked = np.arange(num_bd, num_bd + num_cross)
            cross.append(block[picked])
            partners.append(block[(picked + 1) % len(block)])
        cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
        return RecordLayout(cat(bd), cat(cross), cat(partners))

    def record_splits(self, model, data, device, record_dir):
        self.device = device
        plan = data.plan
        layout = self.record_layout(plan.train_positions)
        bd_images = self._map(self.backdoor, data.train_x[layout.bd])
        generator = torch.Generator().manual_seed(self.cfg.random_seed + 2)
        cross_images = self._map(lambda x, p: self.cross(x, p, generator), data.train_x[layout.cross],
                                 data.train_x[layout.partners])
        bd_labels = self.target_labels(data.train_y[layout.bd])
        indicator = np.zeros(len(data.train_y), dtype=np.float64)
        indicator[layout.bd] = 1.0
        indicator[layout.cross] = 1.0
        images = {int(i): img for i, img in zip(layout.bd, bd_images)}
        images.update({int(i): img for i, img in zip(layout.cross, cross_images)})
        labels = {int(i): int(b) for i, b in zip(layout.bd, bd_labels)}
        labels.update({int(i): int(data.train_y[i]) for i in layout.cross})
        original = {int(i): int(data.train_y[i]) for i in images}
        train = PoisonedSplit(plan.train_positions, indicator, images, labels, original)

        test_bd = self._map(self.backdoor, data.test_x[plan.test_poison])
        _, test = super().record_splits(model, replace(data, test_bd=test_bd), device, record_dir)
        clean_test = ImageSet.from_numpy(data.test_x, data.test_y)
        cross_test = self.cross_set(clean_test)
        write_pngs(Path(record_dir) / CROSS_TEST_FOLDER, cross_test.numpy_images(), data.test_y,
                   np.arange(len(data.test_y)))
        self.logger.info("bd_train rebuilt in unshuffled blocks of %d: %d backdoored + %d cross/negative samples",
                         self.cfg.batch_size, len(layout.bd), len(layout.cross))
        return train, test

