"""The one train/eval engine used by every attack and defense.

``fit`` owns the epoch loop: seeded batching, augmentation, AMP and channels_last on CUDA, the
optimiser/scheduler built from BackdoorBench's keys, a tqdm bar, one metric row per epoch with
BackdoorBench's column names, wall time, and a resumable checkpoint. Algorithms change what happens
in a step by passing ``step`` (see :func:`cross_entropy_step`), never by writing their own loop.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Augment, Batch, ImageSet, batches, num_batches
from .errors import BurnError
from .metrics import accuracy
from .results import NOT_SCORED
from .safe_load import first_nonfinite

# --------------------------------------------------------------------------- seeding, devices


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA), and make cuDNN deterministic
    (BackdoorBench's ``fix_random``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def resolve_device(spec: str | None = None) -> torch.device:
    """``None``/``auto`` -> CUDA when present, else CPU. A BackdoorBench-style list
    (``cuda:0,1``) uses its first device."""
    if spec is None or str(spec).lower() in ("", "auto", "none"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = str(spec).split(",")[0].strip()
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise BurnError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BurnError(f"--device {spec} asked for CUDA but no GPU is visible; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BurnError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


@contextlib.contextmanager
def eval_mode(model: nn.Module, train: bool = False):
    """Put ``model`` in eval (or train) mode for the block and restore its previous modes after."""
    modes = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Training settings under BackdoorBench's key names (spec §3.4)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    client_optimizer: str = "sgd"  # sgd | adam | adadelta
    sgd_momentum: float = 0.9
    wd: float = 5e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    amsgrad: bool = True  # BackdoorBench builds Adam with amsgrad=True
    lr_scheduler: str | None = "CosineAnnealingLR"
    cos_t_max: int | None = None  # BackdoorBench's default T_max is 100 (epochs)
    steplr_stepsize: int = 1
    steplr_gamma: float = 0.1
    steplr_milestones: list[int] | None = None
    min_lr: float = 1e-5
    step_size_up: int = 2000
    step_size_down: int = 2000
    rho: float = 0.95  # Adadelta
    eps: float = 1e-6  # Adadelta
    scheduler_step: str = "epoch"  # 'epoch' (BackdoorBench) or 'batch'
    augment: bool = True
    drop_last: bool = False
    amp: bool = False
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, cfg, **overrides) -> "TrainConfig":
        """Take every field that ``cfg`` (an attack/defense config) has under the same name."""
        values = {k: getattr(cfg, k) for k in cls.__dataclass_fields__ if hasattr(cfg, k)}
        values.update(overrides)
        return cls(**values)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    name = (cfg.client_optimizer or "sgd").lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.wd)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=cfg.lr, rho=cfg.rho, eps=cfg.eps)
    # BackdoorBench: anything else is Adam (with amsgrad)
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.wd,
                            amsgrad=cfg.amsgrad)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    name = cfg.lr_scheduler
    if name in (None, "", "None", "none"):
        return None
    if name == "CyclicLR":
        return torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=cfg.min_lr, max_lr=cfg.lr,
                                                 step_size_up=cfg.step_size_up, step_size_down=cfg.step_size_down)
    if name == "StepLR":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.steplr_stepsize, cfg.steplr_gamma)
    if name == "CosineAnnealingLR":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.cos_t_max or 100)
    if name == "MultiStepLR":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.steplr_milestones or []), cfg.steplr_gamma)
    if name == "ReduceLROnPlateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    raise BurnError(f"lr_scheduler {name!r} is not supported; use CosineAnnealingLR, StepLR, MultiStepLR, "
                    "CyclicLR, ReduceLROnPlateau or None")


# --------------------------------------------------------------------------- steps


@dataclass
class StepContext:
    """What a step function needs besides the batch: device, AMP and the gradient scaler."""

    device: torch.device
    amp: bool
    scaler: "torch.amp.GradScaler | None"
    epoch: int = 0
    cfg: TrainConfig | None = None

    def autocast(self):
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      *more: torch.optim.Optimizer) -> None:
        """Zero, backpropagate ``loss`` and step ``optimizer`` and any ``more`` (e.g. a trigger
        generator trained jointly with the classifier), through the AMP scaler when there is one."""
        optimizers = (optimizer, *more)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            for opt in optimizers:
                self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            for opt in optimizers:
                opt.step()


@dataclass
class StepOutput:
    loss: torch.Tensor  # detached scalar
    logits: torch.Tensor | None = None  # detached, for the train-accuracy columns


StepFn = Callable[[nn.Module, Batch, torch.optim.Optimizer, StepContext], StepOutput]


def cross_entropy_step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer,
                       ctx: StepContext) -> StepOutput:
    """The default step: cross-entropy on the batch's labels, one optimiser step."""
    smoothing = ctx.cfg.label_smoothing if ctx.cfg is not None else 0.0
    with ctx.autocast():
        logits = model(batch.x)
        loss = F.cross_entropy(logits, batch.y, label_smoothing=smoothing)
    ctx.backward_step(loss, optimizer)
    return StepOutput(loss.detach(), logits.detach())


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalSuite:
    """The sets every epoch is scored on: the clean test split and ``bd_test``."""

    clean_test: ImageSet
    bd_test: ImageSet | None = None


@dataclass
class Metrics:
    acc: float | None
    asr: float | None
    ra: float | None
    clean_loss: float | None
    bd_loss: float | None
    ra_loss: float | None = None  # CE of bd_test against the original labels (SAU/I-BAU's CSV column)

    def row(self, ra_loss: bool = False) -> dict:
        """BackdoorBench's column names for these values; ``ra_loss`` adds SAU/I-BAU's
        ``ra_test_loss_avg_over_batch`` column."""
        losses = {"clean_test_loss_avg_over_batch": self.clean_loss, "bd_test_loss_avg_over_batch": self.bd_loss}
        if ra_loss:
            losses["ra_test_loss_avg_over_batch"] = self.ra_loss
        return {**losses, "test_acc": self.acc, "test_asr": self.asr, "test_ra": self.ra}

    @staticmethod
    def skipped_row(ra_loss: bool = False) -> dict:
        """The same columns, marked as not scored (a ``--test_every`` row between two scorings)."""
        return dict.fromkeys(Metrics(None, None, None, None, None).row(ra_loss), NOT_SCORED)


def test_due(index: int, total: int, every: int) -> bool:
    """Whether epoch/round/step ``index`` (0-based) of ``total`` is scored: every ``every``-th and the last."""
    return (index + 1) % max(1, every) == 0 or index + 1 == total


def iterate(imageset: ImageSet, batch_size: int, device: torch.device, *, shuffle: bool = False,
            generator: torch.Generator | None = None, augment: Augment | None = None,
            drop_last: bool = False) -> Iterator[Batch]:
    for positions in batches(len(imageset), batch_size, shuffle, generator, drop_last):
        yield imageset.batch(positions, device, augment, generator)


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA or CPU allocation failure (torch raises both as RuntimeError subclasses)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err)))


@contextlib.contextmanager
def out_of_memory_as_error(what: str, device: torch.device, cfg) -> Iterator[None]:
    """Turn an allocation failure inside the block into a one-line :class:`BurnError` that names
    the batch-size flags to lower (training batch sizes are part of an algorithm, so they are not
    changed behind the user's back; evaluation adapts by itself, see :func:`predict`)."""
    try:
        yield
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        flags = [f"--{k} {getattr(cfg, k)}" for k in sorted(vars(cfg)) if k.endswith("batch_size")]
        amp = "" if device.type != "cuda" or getattr(cfg, "amp", True) else " or pass --amp true"
        raise BurnError(f"out of memory on {device} while running {what} ({', '.join(flags)}); lower "
                        f"{' / '.join(f.split()[0] for f in flags) or 'the batch size'}{amp}") from None


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The kernel's ``MemAvailable`` (Linux); None where it cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def cpu_memory_warning(model: nn.Module, device: torch.device, what: str, cfg,
                       available: int | None = None) -> str | None:
    """A line to log before training on the CPU when the weights alone cannot fit.

    On the CPU an exhausted memory does not raise: the kernel's out-of-memory killer ends the
    process (SIGKILL) with no error to turn into a message. So warn up front when five copies of
    the parameters (model, gradients, two optimiser moments, one snapshot), before any activation,
    exceed what the system has available."""
    if device.type != "cpu":
        return None
    available = available_memory_bytes() if available is None else available
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if available is None or 5 * weights <= available:
        return None
    flags = " / ".join(f"--{k}" for k in sorted(vars(cfg)) if k.endswith("batch_size")) or "the batch size"
    return (f"{what} needs at least {5 * weights / 2**30:.1f} GB on the CPU (5 copies of its {weights / 2**30:.2f} GB "
            f"of weights, before activations) and {available / 2**30:.1f} GB are available: if the kernel kills the "
            f"process for memory, lower {flags} or free memory")


def eval_batch_size(device: torch.device) -> int:
    """Inference batch when the caller names none: 512 fills an accelerator; on a CPU thread 128 is
    cheaper (small CNN: 1.64 vs 2.35 CPU s for 4,000 images, PreAct-ResNet18 5.30 vs 5.86 s for 512;
    the logits are identical), since a big batch's activations no longer fit the caches."""
    return 128 if device.type == "cpu" else 512


@torch.no_grad()
def predict(model: nn.Module, imageset: ImageSet, device: torch.device, batch_size: int | None = None,
            amp: bool = False) -> torch.Tensor:
    """Logits (float32, CPU) for every sample, in order, with the model in eval mode. If a batch
    does not fit in memory, the batch size is halved until it does (the logits are the same)."""
    batch_size = batch_size or eval_batch_size(device)
    model = model.to(device)
    ctx = StepContext(device, amp, None)
    while True:
        outs = []
        try:
            with eval_mode(model):
                for batch in iterate(imageset, batch_size, device):
                    with ctx.autocast():
                        outs.append(model(_layout(batch.x, device)).float().cpu())
            break
        except RuntimeError as err:
            if not is_out_of_memory(err) or batch_size == 1:
                raise
            del outs
            if device.type == "cuda":
                torch.cuda.empty_cache()
            batch_size //= 2
    if not outs:
        return torch.zeros(0, 0)
    return torch.cat(outs)


def _loss_and_preds(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    # BackdoorBench averages per-batch mean losses; with equal batches that is the sample mean
    # (taken in float64, like the accuracies, so the CSV holds no float32 rounding).
    return F.cross_entropy(logits.double(), labels.cpu()).item(), logits.argmax(1)


def evaluate(model: nn.Module, suite: EvalSuite, device: torch.device, batch_size: int | None = None,
             amp: bool = False) -> Metrics:
    """ACC on the clean test split, ASR and RA on ``bd_test`` (spec §3.6). Outputs that are NaN/Inf
    are an error, not a score: ``argmax`` over NaN is class 0, so a diverged model would otherwise
    report the ASR of target 0 as 100 %."""
    logits = _finite_outputs(predict(model, suite.clean_test, device, batch_size, amp), "clean test", amp, device)
    clean_loss, preds = _loss_and_preds(logits, suite.clean_test.labels)
    acc = accuracy(preds, suite.clean_test.labels)
    asr = ra = bd_loss = ra_loss = None
    if suite.bd_test is not None and len(suite.bd_test):
        bd_logits = _finite_outputs(predict(model, suite.bd_test, device, batch_size, amp), "backdoor test", amp, device)
        bd_loss, bd_preds = _loss_and_preds(bd_logits, suite.bd_test.labels)
        ra_loss = F.cross_entropy(bd_logits.double(), suite.bd_test.original_labels.cpu()).item()
        asr = accuracy(bd_preds, suite.bd_test.labels)
        ra = accuracy(bd_preds, suite.bd_test.original_labels)
    return Metrics(acc, asr, ra, clean_loss, bd_loss, ra_loss)


class NonFiniteOutputs(BurnError):
    """A model's outputs hold NaN/Inf (``symptom`` says where); :func:`fit` reports it as a divergence."""

    def __init__(self, message: str, symptom: str):
        super().__init__(message)
        self.symptom = symptom


def _finite_outputs(logits: torch.Tensor, split: str, amp: bool, device: torch.device) -> torch.Tensor:
    bad = int((~torch.isfinite(logits)).any(1).sum()) if logits.numel() else 0
    if bad:
        symptom = f"the outputs are NaN/Inf on {bad} of {len(logits)} {split} images"
        hint = " (or pass --amp false: half precision may overflow)" if amp and device.type == "cuda" else ""
        raise NonFiniteOutputs(f"the model's {symptom[4:]}, so ACC, ASR and RA cannot be measured: the model has "
                               f"diverged; re-create it with a lower learning rate{hint}", symptom)
    return logits


# --------------------------------------------------------------------------- training


@dataclass
class FitResult:
    rows: list[dict]
    wall_time_s: float
    epochs_run: int
    resumed_from_epoch: int = 0
    extra: dict = field(default_factory=dict)


def _layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def check_trainable(n: int, cfg: TrainConfig) -> None:
    """Refuse a training set of ``n`` samples on which :func:`fit` would train nothing. Callers that
    know their set before writing anything call it then too, so the refusal leaves no files."""
    if n == 0:
        raise BurnError("the training set is empty; check --ratio/--index or the poisoned subset")
    if cfg.drop_last and n < cfg.batch_size:
        raise BurnError(f"the training set has {n} samples, fewer than one batch of {cfg.batch_size}, and "
                        "the last partial batch is dropped (BackdoorBench's attack training), so nothing would be "
                        "trained; lower --batch_size")


def fit(model: nn.Module, train_set: ImageSet, cfg: TrainConfig, *, device: torch.device,
        eval_suite: EvalSuite | None = None, step: StepFn | None = None,
        optimizer: torch.optim.Optimizer | None = None, scheduler=None,
        augment: Augment | None = None, seed: int = 0,
        epoch_end: Callable[[int, nn.Module, dict], None] | None = None,
        epoch_begin: Callable[[int, nn.Module], ImageSet | None] | None = None,
        on_row: Callable[[dict], None] | None = None,
        attack_columns: bool = False, checkpoint: str | Path | None = None, resume: bool = True,
        desc: str = "train", progress: bool = True, eval_before: bool = False,
        eval_every: int = 1, fingerprint: dict | None = None, flags=None) -> FitResult:
    """Train ``model`` on ``train_set`` for ``cfg.epochs`` epochs and score every epoch.

    Args:
        step: the per-batch update (default: cross-entropy); it owns forward, loss and update.
        optimizer, scheduler: default ones are built from ``cfg``.
        augment: batch augmentation (``None`` disables it even if ``cfg.augment``).
        seed: seeds the generator that shuffles and augments, so runs are reproducible.
        epoch_end: called as ``epoch_end(epoch, model, row)`` after scoring; may add columns.
        epoch_begin: called as ``epoch_begin(epoch, model)`` before every epoch (also the first one
            after a resume); a returned ImageSet is the training set from that epoch on (DBD re-splits
            its data by loss every epoch, D-BR alternates between two sets).
        on_row: receives every finished row (e.g. to write the CSV as the run goes); on resume,
            the rows restored from the checkpoint first.
        attack_columns: add ``train_acc_clean_only``, ``train_asr_bd_only``, ``train_ra_bd_only``.
        checkpoint: file to save model/optimiser/scheduler/RNG state to after every epoch; with
            ``resume`` an existing one is continued from, so a killed run ends as an unkilled one.
        eval_before: add a row for the untrained model (epoch -1) first.
        eval_every: score ``eval_suite`` only every N epochs and after the last (the other rows keep
            their training columns, the test columns marked ``NOT_SCORED``); scoring the test sets can
            cost as much as a small model's epoch.
        fingerprint: what the run depends on (settings, data digest); saved in the checkpoint, and a
            checkpoint with another fingerprint is refused instead of silently continued.
        flags: the run's command-line config; when training diverges (a NaN/Inf loss or weights, which
            stops the run before anything of that epoch is scored or saved), the error names its
            learning-rate flag.

    Returns:
        FitResult with one row per epoch (BackdoorBench's columns), wall time and epochs run.
    """
    step = step or cross_entropy_step
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    check_trainable(len(train_set), cfg)
    train_set = train_set.to(device) if device.type == "cuda" else train_set
    optimizer = optimizer or make_optimizer(model.parameters(), cfg)
    scheduler = scheduler if scheduler is not None else make_scheduler(optimizer, cfg)
    use_amp = bool(cfg.amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    ctx = StepContext(device, use_amp, scaler, cfg=cfg)
    generator = torch.Generator().manual_seed(seed)
    augment = augment if cfg.augment else None
    rows: list[dict] = []
    start_epoch = 0
    trained_before_s = 0.0  # training time of the interrupted sessions a resumed run continues
    ckpt_path = Path(checkpoint) if checkpoint else None
    fingerprint = plain_fingerprint(fingerprint)
    if ckpt_path is not None and resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, fingerprint)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler") is not None:
                scaler.load_state_dict(state["scaler"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise BurnError(f"checkpoint {ckpt_path} does not fit this run ({str(err).splitlines()[0][:160]}); "
                            f"{RESUME_FIX}") from None
        rows = state["rows"]
        start_epoch = state["epoch"] + 1
        trained_before_s = float(state.get("train_s", 0.0))
        if on_row:  # the caller's CSV gets the epochs trained before the interruption first
            for row in rows:
                on_row(row)
    elif eval_before and eval_suite is not None:
        row = {"epoch": -1, "batch": 0, **evaluate(model, eval_suite, device, amp=use_amp).row()}
        rows.append(row)
        if on_row:
            on_row(row)

    started = time.perf_counter()
    epoch_times: list[float] = []
    n_batches = num_batches(len(train_set), cfg.batch_size, cfg.drop_last)
    for epoch in range(start_epoch, cfg.epochs):
        ctx.epoch = epoch
        epoch_start = time.perf_counter()
        if epoch_begin is not None:
            replacement = epoch_begin(epoch, model)
            if replacement is not None:
                if len(replacement) == 0:
                    raise BurnError(f"{desc}: the training set of epoch {epoch + 1} is empty")
                train_set = replacement.to(device) if device.type == "cuda" else replacement
                n_batches = num_batches(len(train_set), cfg.batch_size, cfg.drop_last)
        model.train()
        losses, correct = [], _Counts()
        bar = tqdm(total=n_batches, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not progress, dynamic_ncols=True)
        for batch in iterate(train_set, cfg.batch_size, device, shuffle=True, generator=generator,
                             augment=augment, drop_last=cfg.drop_last):
            batch.x = _layout(batch.x, device)
            out = step(model, batch, optimizer, ctx)
            losses.append(float(out.loss))
            if scaler is None and not math.isfinite(losses[-1]):  # AMP's scaler skips such steps itself
                bar.close()
                raise _diverged(desc, epoch, cfg, optimizer, flags, f"the loss became {losses[-1]}", ckpt_path)
            if out.logits is not None:
                correct.add(out.logits.argmax(1), batch)
            if scheduler is not None and cfg.scheduler_step == "batch":
                _scheduler_step(scheduler, float(out.loss))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        weights = first_nonfinite(model.state_dict(), "model")
        if weights is not None or (losses and not any(math.isfinite(v) for v in losses)):
            raise _diverged(desc, epoch, cfg, optimizer, flags,
                            f"the weights hold {weights}" if weights else "the loss of every step was NaN/Inf", ckpt_path)
        train_loss = sum(losses) / max(1, len(losses))
        if scheduler is not None and cfg.scheduler_step == "epoch":
            _scheduler_step(scheduler, train_loss)
        row = {"epoch": epoch, "batch": len(losses), "train_epoch_loss_avg_over_batch": train_loss,
               "train_acc": correct.acc()}
        if attack_columns:
            row.update(correct.attack_columns())
        if eval_suite is not None:
            try:
                row.update(evaluate(model, eval_suite, device, amp=use_amp).row()
                           if test_due(epoch, cfg.epochs, eval_every) else Metrics.skipped_row())
            except NonFiniteOutputs as err:  # finite but overflowing weights: the same divergence
                raise _diverged(desc, epoch, cfg, optimizer, flags, err.symptom, ckpt_path) from None
        epoch_times.append(time.perf_counter() - epoch_start)
        if epoch_end is not None:
            epoch_end(epoch, model, row)
        rows.append(row)
        if on_row:
            on_row(row)
        if progress:
            tqdm.write(f"[{desc}] epoch {epoch + 1}/{cfg.epochs} " + _fmt(row))
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, generator, rows, epoch,
                             trained_before_s + time.perf_counter() - started, fingerprint)
    wall = time.perf_counter() - started
    return FitResult(rows, wall, cfg.epochs - start_epoch, start_epoch,
                     extra={"epoch_times_s": epoch_times, "train_s_all_sessions": trained_before_s + wall})


def _diverged(desc: str, epoch: int, cfg: TrainConfig, optimizer: torch.optim.Optimizer, flags, symptom: str,
              checkpoint: Path | None) -> BurnError:
    """The one-line error for a training that turned NaN/Inf, naming the learning-rate flag to lower:
    the ``flags`` (the command-line config) whose value is this optimiser's learning rate, else
    ``--lr`` when the optimiser was built from ``cfg.lr``."""
    rates = {float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups}
    if flags is not None:
        names = [f"--{k}" for k, v in vars(flags).items() if "lr" in k.lower() and isinstance(v, float) and v in rates]
    else:
        names = ["--lr"] if cfg.lr in rates else []
    rate = " / ".join(f"{r:g}" for r in sorted(rates))
    what = " or ".join(names) if names else "the learning rate"
    resume = " with --resume false (the checkpoint of the last good epoch was made with the old rate)" \
        if checkpoint is not None and checkpoint.exists() else ""
    return BurnError(f"{desc}: training diverged in epoch {epoch + 1} of {cfg.epochs} ({symptom}), so nothing of it is "
                     f"scored or saved; lower {what} (now {rate}) and run again{resume}")


def _scheduler_step(scheduler, loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(loss)  # BackdoorBench steps it on the epoch's train loss
    else:
        scheduler.step()


CHECKPOINT_VERSION = 2
CHECKPOINT_KEYS = ("version", "fingerprint", "model", "optimizer", "scheduler", "scaler", "generator",
                   "torch_rng", "rows", "epoch", "train_s")
RESUME_FIX = "re-run with the record and flags it was made with to resume, or pass --resume false to start over"


def plain_fingerprint(fingerprint: dict | None) -> dict:
    """``fingerprint`` as JSON-like builtins (tuples -> lists), so that it survives weights-only
    loading and compares equal after a round trip."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return str(v)

    return plain(fingerprint or {})


DATA_KEYS = ("data", "train_set")  # fingerprint entries that hold digests of the data and weights read


def describe_difference(saved: dict, now: dict, limit: int = 4) -> str:
    """``"epochs 6 -> 10, lr 0.01 -> 0.05"``: the keys on which two fingerprints differ (a digest of
    the data read is named, not shown: ``data.bd_train differs``)."""
    parts = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "unset"), now.get(k, "unset")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts += [f"{k}.{sub} differs" for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        elif k in DATA_KEYS:
            parts.append(f"{k} differs")
        else:
            parts.append(f"{k} {a!r} -> {b!r}")
    return ", ".join(parts[:limit]) + (f" and {len(parts) - limit} more" if len(parts) > limit else "")


def fingerprint_mismatch(saved, expected: dict, partial: bool = False) -> str | None:
    """None when a checkpoint's fingerprint ``saved`` agrees with ``expected``; else how it differs,
    worded for "was made ...": ``with other settings (lr 0.01 -> 0.05)``, ``from other data
    (data.weights differs)`` or ``with other settings and data (...)``. ``partial``: compare only the
    keys ``expected`` has (a training phase adds its own keys to its run's fingerprint)."""
    saved = saved if isinstance(saved, dict) else {}
    if partial:
        saved = {k: ({sub: saved[k].get(sub, "unset") for sub in v} if isinstance(v, dict) and
                     isinstance(saved.get(k), dict) else saved.get(k, "unset")) for k, v in expected.items()}
    differing = {k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k)}
    if not differing:
        return None
    data, settings = differing & set(DATA_KEYS), differing - set(DATA_KEYS)
    what = "with other settings and data" if data and settings else "from other data" if data else "with other settings"
    return f"{what} ({describe_difference(saved, expected)})"


def load_checkpoint(path: Path, fingerprint: dict) -> dict:
    """Read a training checkpoint weights-only and check that it belongs to this run."""
    state = _read_checkpoint(path)
    problem = fingerprint_mismatch(state["fingerprint"], fingerprint)
    if problem:
        raise BurnError(f"training checkpoint {path} was made {problem}; {RESUME_FIX}")
    if any(k not in state for k in CHECKPOINT_KEYS) or not isinstance(state["rows"], list) \
            or not isinstance(state["epoch"], int):
        raise BurnError(f"training checkpoint {path} is malformed; {RESUME_FIX}")
    return state


def check_checkpoints(folder: Path, fingerprint: dict) -> None:
    """Before a resumable run writes anything: every training checkpoint in ``folder`` must be of
    this burnkit version and agree with the run's ``fingerprint`` (its settings and the digests of
    the data and weights it read). A phase's own keys - its name and training set - are checked
    when the phase starts."""
    for path in sorted(Path(folder).glob("*.pt")):
        problem = fingerprint_mismatch(_read_checkpoint(path)["fingerprint"], fingerprint, partial=True)
        if problem:
            raise BurnError(f"training checkpoint {path} was made {problem}; {RESUME_FIX}")


def _read_checkpoint(path: Path) -> dict:
    from .safe_load import safe_torch_load

    state = safe_torch_load(path, what="training checkpoint", fix=RESUME_FIX)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or \
            not isinstance(state.get("fingerprint"), dict):
        raise BurnError(f"training checkpoint {path} is not a checkpoint of this burnkit version; {RESUME_FIX}")
    return state


def _save_checkpoint(path: Path, model, optimizer, scheduler, scaler, generator, rows, epoch,
                     train_s: float = 0.0, fingerprint: dict | None = None) -> None:
    from .records import atomic_torch_save

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({
        "version": CHECKPOINT_VERSION, "fingerprint": fingerprint or {},
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
        "rows": rows, "epoch": epoch, "train_s": float(train_s),
    }, path)


class _Counts:
    """Running train accuracies, overall and split by the poison flag (attack CSV columns)."""

    def __init__(self):
        self.n = self.ok = self.n_clean = self.ok_clean = self.n_bd = self.asr = self.ra = 0

    def add(self, preds: torch.Tensor, batch: Batch) -> None:
        hit = preds == batch.y
        self.n += len(preds)
        self.ok += int(hit.sum())
        clean = ~batch.poison
        self.n_clean += int(clean.sum())
        self.ok_clean += int(hit[clean].sum())
        bd = batch.poison
        self.n_bd += int(bd.sum())
        self.asr += int(hit[bd].sum())
        self.ra += int((preds[bd] == batch.original_y[bd]).sum())

    def acc(self):
        return self.ok / self.n if self.n else None

    def attack_columns(self) -> dict:
        return {"train_acc_clean_only": self.ok_clean / self.n_clean if self.n_clean else None,
                "train_asr_bd_only": self.asr / self.n_bd if self.n_bd else None,
                "train_ra_bd_only": self.ra / self.n_bd if self.n_bd else None}


def _fmt(row: dict) -> str:
    keys = ("train_epoch_loss_avg_over_batch", "train_acc", "test_acc", "test_asr", "test_ra")
    short = {"train_epoch_loss_avg_over_batch": "loss"}
    parts = []
    for k in keys:
        v = row.get(k)
        if isinstance(v, float) and not math.isnan(v):
            parts.append(f"{short.get(k, k)}={v:.4f}")
    return " ".join(parts)
