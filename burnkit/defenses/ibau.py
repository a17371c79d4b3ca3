"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022, spec §7.5).

Paper: "Adversarial Unlearning of Backdoors via Implicit Hypergradient",
https://arxiv.org/abs/2110.03735.

The defense solves the minimax problem ``min_θ max_δ L(θ, δ)``: for ``n_rounds`` rounds

1. **inner maximisation** - one universal perturbation ``δ`` (shape ``1 x C x H x W``, added in the
   network's *normalised* input space, as BackdoorBench does) is trained by SGD (lr ``pert_lr``) for
   one pass over the clean subset to maximise the cross-entropy against the model's own predictions,
   minus ``pert_reg * ||δ||²``. It is left unbounded, as BackdoorBench (whose projection onto an L2
   ball of radius 10 is commented out); ``--pert_norm_bound C`` projects it onto ``||δ|| <= C``
   after the pass (the paper's constraint and the authors' radius 10);
2. **outer minimisation** - for every cached clean batch, Adam steps the model along the implicit
   hypergradient of the unlearning loss (CE with true labels on the batch where ``δ`` is added to a
   random ``portion`` of its samples). ``δ*(θ)`` is the fixed point of one gradient-descent step
   (``inner_lr``) on the perturbation loss of the first cached batch; the hypergradient
   ``∂_θ L_out + (∂_θ Φ)ᵀ v`` with ``v = (I - ∂_δ Φ)⁻ᵀ ∂_δ L_out`` is approximated by ``K`` fixed-point
   iterations ``v ← (∂_δ Φ)ᵀ v + ∂_δ L_out`` (:func:`fixed_point_hypergradient`).

The model stays in eval mode throughout (BatchNorm uses running statistics), images are not clamped
to the valid range, and no lr scheduler is stepped - all as BackdoorBench. The constants that
BackdoorBench hard-codes are config keys here with the same defaults. The test sets are scored every
``--test_every`` rounds and after the last (BackdoorBench: every round); the CSV is ``i-bau_df.csv``
with BackdoorBench's columns.

Example:
    python defense/i-bau.py --result_file badnet_cifar10 --yaml_path config/defense/i-bau/cifar10.yaml
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..config import option
from ..data import Augment, Batch, ImageSet
from ..defense import Defense, DefenseConfig, DefenseData, DefenseRun, register_defense
from ..engine import eval_mode, iterate, make_optimizer
from ..errors import BurnError
from ..models import Classifier, twice_differentiable
from ..options import SCHEDULE_FLAGS

Tensors = Sequence[torch.Tensor]


@dataclass
class IBAUConfig(DefenseConfig):
    n_rounds: int = option(5, "rounds of (perturbation search, unlearning pass)")
    K: int = option(5, "fixed-point iterations of the implicit hypergradient")
    optim: str = option("Adam", "BackdoorBench's key, unused there too (see --client_optimizer)", unused=True)
    lr: float = option(0.0001, "learning rate of the outer (model) optimiser")
    client_optimizer: str = option("adam", "outer optimiser: adam (amsgrad, as BackdoorBench), sgd or adadelta")
    wd: float = option(0.0, "weight decay of the outer optimiser")
    batch_size: int = option(256, "batch size")
    lr_scheduler: str | None = option("CosineAnnealingLR", "BackdoorBench's key; the scheduler is never stepped there either",
                                      unused=True)
    pert_lr: float = option(10.0, "SGD lr of the universal perturbation (BackdoorBench hard-codes 10)")
    pert_reg: float = option(0.001, "L2 regulariser weight on the perturbation (hard-coded 0.001)")
    pert_norm_bound: float = option(0.0, "L2 radius the perturbation is projected onto after its pass (0: "
                                         "unbounded, as BackdoorBench; the I-BAU authors' code uses 10)")
    inner_lr: float = option(0.1, "step of the inner gradient-descent fixed-point map (hard-coded 0.1)")
    portion: float = option(0.01, "share of each batch that receives the perturbation (hard-coded 0.01)")
    fp_tol: float = option(1e-10, "stop the fixed-point iterations once ||v_k - v_k-1|| is below this")

    def validate(self) -> None:
        super().validate()
        if self.n_rounds < 0 or self.K < 0:
            raise BurnError(f"--n_rounds and --K must be >= 0, got {self.n_rounds} and {self.K}")
        if not 0.0 <= self.portion <= 1.0:
            raise BurnError(f"--portion must be in [0, 1], got {self.portion}")
        if self.pert_norm_bound < 0:
            raise BurnError(f"--pert_norm_bound must be >= 0 (0 disables it), got {self.pert_norm_bound}")


# --------------------------------------------------------------------------- implicit hypergradient


def gradient_descent_map(loss_fn: Callable[[Tensors, Tensors], torch.Tensor], step: float):
    """``Φ(w, h) = w - step * ∇_w loss(w, h)``, differentiable in ``w`` and ``h``."""

    def fp_map(inner: Tensors, hparams: Tensors) -> list[torch.Tensor]:
        loss = loss_fn(inner, hparams)
        grads = torch.autograd.grad(loss, inner, create_graph=True)
        return [w - step * g for w, g in zip(inner, grads)]

    return fp_map


def fixed_point_hypergradient(inner: Tensors, hparams: Tensors,
                              fp_map: Callable[[Tensors, Tensors], list[torch.Tensor]],
                              outer_loss: Callable[[Tensors, Tensors], torch.Tensor],
                              K: int, tol: float = 1e-10) -> list[torch.Tensor]:
    """Gradient of ``outer_loss(w*(h), h)`` w.r.t. ``h`` where ``w* = Φ(w*, h)`` (I-BAU's Alg. 1).

    By the implicit function theorem the gradient is ``∂_h L + (∂_h Φ)ᵀ v`` with
    ``v = (I - ∂_w Φ)⁻ᵀ ∂_w L``; ``v`` is found by ``K`` fixed-point iterations
    ``v ← (∂_w Φ)ᵀ v + ∂_w L`` from ``v = 0`` (a truncated Neumann series), evaluated at the
    given ``inner`` (the approximate fixed point). Only vector-Jacobian products are used.

    Returns:
        One gradient per tensor of ``hparams`` (zeros where ``h`` does not influence the loss).
    """
    inner = [w.detach().requires_grad_(True) for w in inner]
    hparams = list(hparams)
    loss = outer_loss(inner, hparams)
    grads = torch.autograd.grad(loss, [*inner, *hparams], allow_unused=True)
    d_inner = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads[:len(inner)], inner)]
    d_hparams = grads[len(inner):]
    mapped = fp_map(inner, hparams)
    v = [torch.zeros_like(w) for w in inner]
    for _ in range(K):
        jvp = torch.autograd.grad(mapped, inner, grad_outputs=v, retain_graph=True)
        new_v = [a + b for a, b in zip(jvp, d_inner)]
        change = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(new_v, v)))
        v = new_v
        if float(change) < tol:
            break
    through_fp = torch.autograd.grad(mapped, hparams, grad_outputs=v, allow_unused=True)
    out = []
    for h, direct, indirect in zip(hparams, d_hparams, through_fp):
        total = torch.zeros_like(h)
        for part in (direct, indirect):
            if part is not None:
                total = total + part.detach()
        out.append(total)
    return out


# --------------------------------------------------------------------------- the two phases


def universal_perturbation(model: Classifier, clean: ImageSet, cfg: IBAUConfig, device: torch.device,
                           generator: torch.Generator, augment: Augment | None) -> torch.Tensor:
    """One SGD pass that maximises CE against the model's own predictions (inner maximisation).

    Returns ``δ`` (``1 x C x H x W``, normalised-input space), projected onto the L2 ball of radius
    ``pert_norm_bound`` when that is positive.
    """
    delta = torch.zeros(1, *clean.shape, device=device, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=cfg.pert_lr)
    for batch in iterate(clean, cfg.batch_size, device, shuffle=True, generator=generator, augment=augment):
        z = model.normalize(batch.x)
        with torch.no_grad():
            own_labels = model.net(z).argmax(1)
        loss = -F.cross_entropy(model.net(z + delta), own_labels) + cfg.pert_reg * delta.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        delta.grad, = torch.autograd.grad(loss, delta)
        opt.step()
    delta = delta.detach()
    norm = float(delta.norm())
    if cfg.pert_norm_bound > 0 and norm > cfg.pert_norm_bound:
        delta = delta * (cfg.pert_norm_bound / norm)
    return delta


def unlearning_step(model: Classifier, delta: torch.Tensor, batch: Batch, anchor: Batch,
                    optimizer: torch.optim.Optimizer, cfg: IBAUConfig, picker: random.Random) -> float:
    """One outer Adam step along the implicit hypergradient; returns the unlearning loss."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    anchor_z = model.normalize(anchor.x)
    z = model.normalize(batch.x)
    patched_rows = torch.tensor(picker.sample(range(len(batch)), int(len(batch) * cfg.portion)),
                                dtype=torch.long, device=z.device)
    seen = {}

    def perturbation_loss(inner, _hparams):
        ce = F.cross_entropy(model.net(anchor_z + inner[0]), anchor.y)
        return -ce + cfg.pert_reg * inner[0].pow(2).sum()

    def unlearning_loss(inner, _hparams):
        patch = torch.zeros_like(z)
        patch[patched_rows] = inner[0].expand(len(patched_rows), *inner[0].shape[1:])
        loss = F.cross_entropy(model.net(z + patch), batch.y)
        seen["loss"] = float(loss.detach())
        return loss

    grads = fixed_point_hypergradient([delta], params, gradient_descent_map(perturbation_loss, cfg.inner_lr),
                                      unlearning_loss, cfg.K, cfg.fp_tol)
    optimizer.zero_grad(set_to_none=True)
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    return seen["loss"]


def unlearn_ibau(model: Classifier, data: DefenseData, cfg: IBAUConfig, run: DefenseRun) -> Classifier:
    """Run I-BAU's rounds on the defender's clean subset and score every round."""
    device = run.device
    model.to(device)
    generator = torch.Generator().manual_seed(cfg.random_seed)
    picker = random.Random(cfg.random_seed)
    # BackdoorBench caches the subset's batches once (one shuffle, one augmentation draw).
    cached = list(iterate(data.clean_subset, cfg.batch_size, device, shuffle=True, generator=generator,
                          augment=run.augment))
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad],
                               cfg.train_config(lr_scheduler=None))
    with eval_mode(model), twice_differentiable(model.net):  # the hypergradient differentiates gradients
        for round_ in range(cfg.n_rounds):
            with run.timed("perturbation"):
                delta = universal_perturbation(model, data.clean_subset, cfg, device, generator, run.augment)
            with run.timed("unlearning"):
                losses = [unlearning_step(model, delta, batch, cached[0], optimizer, cfg, picker)
                          for batch in cached]
            row = {"epoch": round_, **run.test_row(model, round_, cfg.n_rounds, ra_loss=True)}
            run.metrics.append(row)
            run.metrics.save()
            run.logger.info("round %d/%d: |δ|=%.3f unlearning loss %.4f acc %s asr %s ra %s", round_ + 1,
                            cfg.n_rounds, float(delta.norm()), sum(losses) / len(losses), row["test_acc"],
                            row["test_asr"], row["test_ra"])
    return model


@register_defense
class IBAU(Defense):
    """I-BAU: adversarial unlearning of a universal perturbation via implicit hypergradients."""

    name = "i-bau"
    # flags it accepts but does not read: n_rounds rounds; the outer optimiser is never scheduled
    unused_flags = ("epochs", *SCHEDULE_FLAGS, "progress")
    config_cls = IBAUConfig
    budget_keys = ("n_rounds", "K")

    def repair(self, model, data, cfg, run):
        return unlearn_ibau(model, data, cfg, run)
