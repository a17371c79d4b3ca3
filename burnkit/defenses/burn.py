"""BURN: Backdoor Unlearning via adversaRial bouNdary analysis (Su et al., 2025), Algorithm 1.

Paper: Su et al., arXiv:2507.10491 (docs/citing.md); §2.3 boundary attack, §5 method, Algorithm 1.

BURN sees only the record's poisoned training set (no clean auxiliary data). Phase 1 measures every
training sample's minimal-L2 boundary distance ``l(x)`` on the frozen infected model θ0, relabels
the top ``k_p^0`` share by distance with their adversarial label ``argmax f(x + δ; θ0)`` and
fine-tunes on them. Phase 2 (t = 1..T) ranks samples by ``S = (1 - ω^t) BD + ω^t PD`` with
``BD = l / l_max`` and ``PD = 1 - cos(f(x; θ0), f(x; θt))``, relabels the top ``k_p^t`` share the
same way, keeps the bottom ``k_c^t`` share with their labels, and fine-tunes on both. ``k_p``,
``k_c`` and ``ω`` grow linearly from their ``_start`` to their ``_end`` value over the T iterations.
Ground-truth poison flags of the record are used for the detection report only.

Choices where the paper is silent (each one a YAML key / flag, the alternative available):
* ``attack_space: input`` - distances in the normalised input space the network is fed (as in
  BackdoorBench; the magnitudes of the paper's Table 1 match it); ``pixel`` measures in [0, 1].
  ``clip: true`` keeps every iterate a valid image.
* the boundary attack's ``overshoot 0.02``, ``max_iter 50`` and ``candidates 3`` - DeepFool's
  overshoot and step limit, and a search over the 3 classes with the highest logits (evidence in
  docs/burn.md: the same ranking and labels as a search over all classes at a third of the cost).
* ``pd_output: logits`` - PD compares logit vectors (the ``f`` of §2.3); ``probs`` uses softmax.
* fine-tuning: a fresh Adam(β = 0.9, 0.999) per fine-tuning, fixed lr 5e-5, no weight decay, no
  AMSGrad, BackdoorBench's train augmentation (``augment: true``), BatchNorm in train mode like any
  fine-tuning (``bn_eval: true`` freezes its running statistics; Phase 1 trains on 0.5 % of the data).
* Phase 1 fine-tunes on D_poison^0 only (Alg. 1 line 8); Phase 2 runs t = 1..T, so there are T + 1
  fine-tunings; ``burn_df.csv`` has one row per fine-tuning (iteration 0 = Phase 1).

Safeguards beyond the paper (on by default; ``paper_exact: true`` turns all of them off):
* ``unflipped: skip`` - a sample the attack cannot flip within ``max_iter`` steps (clipping can hold
  it at the image bounds) has no adversarial label: Algorithm 1's ``argmax f(x + δ)`` is then its
  own prediction, which for a poisoned sample is the backdoor target. Such samples are left out of
  D_poison (``nearest``: relabel with the class of the nearest linearised boundary instead;
  ``prediction``: the literal reading). Their distance is the norm of the last iterate, a lower
  bound that with clipping is usually small, so they do not rank as suspicious by themselves.
* ``skip_own_label: true`` - a sample whose adversarial label is the label it already carries is
  left out of D_poison ("relabelling" it would fine-tune it on its own, possibly poisoned, label).
* ``avoid_target: true`` - never relabel towards the suspected target: the class whose label piles
  up among the farthest samples by boundary distance (below). Relabelling a clean sample to the
  target teaches the backdoor's label; poison the backdoor works on is never relabelled there anyway
  (its adversarial label differs from θ0's prediction, the target).
* ``premise_check: true`` - BURN works only if far-from-boundary samples are poison. Before Phase 1
  it tests that (burn_checks.premise_test): among the farthest ``premise_share`` (5 %) of samples by
  distance it tries every carried label enriched ``premise_min_enrichment`` (1.5) times over its share
  of the whole training set (all-to-one poison carries the target label) and takes the first, most
  enriched first, of whose farthest samples at most ``premise_max_adv_share`` (half) cross the
  boundary towards one class (poison crosses back to the classes it came from; a naturally easy class
  crosses to one neighbour). When exactly one label is carried by ``premise_min_inflation`` (1.5) times
  as many samples as the median class - all-to-one dirty-label poison relabels its images to the
  target - only that class is tried. After every Phase 2 fine-tuning it reads the training samples no
  fine-tuning has trained on: a model that lost more than ``collapse_retention_drop`` of θ0's correct
  predictions there, or predicts ``max_target_rise`` more samples as the suspected target than θ0,
  stops the run (a collapse), keeping the last model that passed (θ0 when the test before Phase 1 or
  the first Phase 2 check fails: Phase 1's model, fine-tuned on D_poison^0 alone, is the paper's warm
  start and is neither judged nor returned; see ``check_failure``). The stop
  is said in the log, ``burn_df.csv``, ``burn_detection.json`` and ``cost.json``, with what the user
  can do instead. The test assumes an all-to-one attack, the paper's setting: for all-to-all attacks
  pass ``--premise_check false``.
* ``keep: best`` - of the Phase 2 models that kept θ0's correct predictions on those untouched
  samples within ``max_retention_drop`` and moved the target-labelled training samples off the target
  at least ``min_unlearning_ratio`` times as fast as they lost the others (unlearning is specific to
  the target; damage is not), BURN returns the one that moved the most (θ0 when none qualifies); a
  final ``burn_df.csv`` row scores it when it is not the last one. ``last`` returns the last model, as
  the paper.
* ``kc_factor: 2`` - the clean shares ``k_c`` doubled (5 -> 10 %), the setting of the paper's own
  ablation (§6.3) that removed more ASR and kept more ACC; 1 is the paper's schedule.

Every check reads the training set and θ0 only; no test data. The thresholds are fitted on a
calibration corpus of records (docs/burn-corpus.md).

Example:
    python defense/burn.py --result_file badnet_cifar10 --dataset cifar10
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..boundary import SPACES, STEP_RULES, BoundaryResult, attack_space, scan
from ..config import option
from ..data import ImageSet, concat
from ..defense import Defense, DefenseConfig, DefenseData, DefenseRun, register_defense
from ..engine import RESUME_FIX, StepOutput, cross_entropy_step, fingerprint_mismatch, predict, seed_everything
from ..errors import BurnError
from ..metrics import auroc
from ..models import Classifier
from ..records import atomic_torch_save
from ..results import atomic_write_text, write_json
from ..safe_load import safe_torch_load
from .burn_checks import premise_test, touched_mask, training_failure, training_signals

PD_OUTPUTS = ("logits", "probs")
UNFLIPPED_RULES = ("skip", "nearest", "prediction")
KEEP_RULES = ("best", "last")
STATE_VERSION = 3  # 3: fingerprints hold digests of the record's weights and data, not its path

# What BURN tells the user when one of its checks stops it (console, burn_detection.json, cost.json).
STOP_ADVICE = ("Without clean data BURN cannot remove this backdoor safely. Alternatives: a defense that uses a "
               "few clean samples (e.g. defense/sau.py or defense/ft-sam.py with --ratio 0.05), or another "
               "no-clean-data defense (defense/abl.py, defense/d-br.py, defense/clp.py).")

# Why a top-ranked sample is not relabelled (reason codes of ``relabel_plan``).
RELABEL, UNFLIPPED, OWN_LABEL, TARGET, OTHER_LABEL = 0, 1, 2, 3, 4
SKIP_COLUMNS = {UNFLIPPED: "n_skipped_unflipped", OWN_LABEL: "n_skipped_own_label", TARGET: "n_skipped_target",
                OTHER_LABEL: "n_skipped_other_label"}
RULE_NAMES = np.array(["relabel", "skip_unflipped", "skip_own_label", "skip_target", "skip_other_label"])


@dataclass
class BurnConfig(DefenseConfig):
    """BURN's settings; defaults are the paper's (§5.2) except where the help says "choice"."""

    iterations: int = option(20, "T: Phase-2 iterations")
    epochs: int = option(5, "fine-tuning epochs of Phase 1 and of every Phase-2 iteration")
    batch_size: int = option(128, "fine-tuning batch size (choice: the paper gives none)")
    lr: float = option(5e-5, "fixed fine-tuning learning rate")
    client_optimizer: str = option("adam", "optimiser (the paper uses Adam)")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "Adam betas")
    wd: float = option(0.0, "weight decay (the paper names none)")
    amsgrad: bool = option(False, "AMSGrad variant of Adam (BackdoorBench's trainer uses it; the paper does not)")
    lr_scheduler: str | None = option(None, "learning-rate schedule (None: fixed, as in the paper)")
    augment: bool = option(True, "BackdoorBench's train augmentation while fine-tuning")
    bn_eval: bool = option(False, "keep BatchNorm running statistics frozen while fine-tuning (small sets)")
    kp_start: float = option(0.005, "k_p^0: share of samples relabelled as poison at iteration 0")
    kp_end: float = option(0.01, "k_p^T: share relabelled as poison at the last iteration")
    kc_start: float = option(0.025, "k_c^0: share kept as clean at iteration 0")
    kc_end: float = option(0.05, "k_c^T: share kept as clean at the last iteration")
    kc_factor: float = option(2.0, "multiplies k_c^0 and k_c^T (choice: 2 keeps 5 -> 10 % of the training set as "
                                   "clean, the paper's own ablation, §6.3: more ASR removed and more ACC kept; "
                                   "1 = the paper's schedule)")
    omega_start: float = option(0.3, "ω^0: weight of PD in the score at iteration 0")
    omega_end: float = option(0.6, "ω^T: weight of PD in the score at the last iteration")
    pd_output: str = option("logits", "outputs compared by PD: logits or probs", choices=PD_OUTPUTS)
    attack_space: str = option("input", "space of the boundary distance: input (normalised) or pixel", choices=SPACES)
    clip: bool = option(True, "clip attack iterates to valid images")
    overshoot: float = option(0.02, "boundary attack overshoot η (choice: DeepFool's value; the paper gives none)")
    max_iter: int = option(50, "boundary attack steps per sample (choice: DeepFool's value)")
    candidates: int = option(3, "candidate classes of the boundary attack, top by logit; 0 = every class, as the "
                                "paper (choice; evidence in docs/burn.md)")
    step_rule: str = option("total", "where the boundary attack's overshoot acts: total (DeepFool's reference code: "
                                     "x0 + (1 + η) r_tot) or step (the paper's §2.3 update: every step scaled by "
                                     "1 + η)", choices=STEP_RULES)
    scan_batch_size: int = option(256, "samples per boundary-attack batch")
    unflipped: str = option("skip", "samples the boundary attack cannot flip: skip (left out of D_poison), nearest "
                                    "(relabelled with the nearest boundary's class) or prediction (Algorithm 1 read "
                                    "literally: their own prediction)", choices=UNFLIPPED_RULES)
    skip_own_label: bool = option(True, "leave a sample out of D_poison when its adversarial label is the label it "
                                        "already carries (false: the paper)")
    avoid_target: bool = option(True, "never relabel towards the suspected target class (false: the paper)")
    suspect_label_only: bool = option(False, "D_poison takes only samples that carry the suspected target's label "
                                             "(all-to-one poison carries it; others are clean images of their "
                                             "class); false: the paper")
    premise_check: bool = option(True, "stop, keeping the last model that passed, when BURN's premise fails on "
                                       "the training set (false: the paper)")
    premise_share: float = option(0.05, "premise test: the farthest share of samples by boundary distance whose "
                                        "labels must pile into one class (the suspected target)")
    premise_min_enrichment: float = option(1.5, "premise test: that class's share there over its share of the "
                                                "whole training set must reach this")
    premise_max_adv_share: float = option(0.5, "premise test: at most this share of that class's farthest samples "
                                               "may have one adversarial label (poison crosses to many classes)")
    premise_min_inflation: float = option(1.5, "premise test: when exactly one class's label is carried by at least "
                                               "this many times as many samples as the median class (all-to-one "
                                               "dirty-label poison relabels its images to the target), only that "
                                               "class may be the suspected target; 0 switches the rule off")
    collapse_retention_drop: float = option(0.25, "premise check: a fine-tuning that loses more than this share of "
                                                   "θ0's correct predictions on the training samples no fine-tuning "
                                                   "trained on stops the run (a collapse)")
    max_target_rise: float = option(0.02, "premise check: a fine-tuning may raise the share of training samples "
                                          "predicted as the suspected target by at most this much")
    keep: str = option("best", "the model BURN returns: best (of the fine-tuned models that keep θ0's correct "
                               "training predictions within --max_retention_drop, the one that moved most target-"
                               "labelled training samples off the target; θ0 when none does) or last (the paper)",
                       choices=KEEP_RULES)
    max_retention_drop: float = option(0.08, "keep best: the returned model may lose at most this share of θ0's "
                                             "correct predictions on untouched training samples (a stand-in for "
                                             "clean accuracy that needs no clean data)")
    min_unlearning_ratio: float = option(4.0, "keep best: the returned model must have moved a share of the "
                                              "target-labelled training samples off the target at least this many "
                                              "times the share of θ0's other correct predictions it lost (floor "
                                              "1 %): unlearning a backdoor is specific to its target, damage is not")
    paper_exact: bool = option(False, "the paper exactly: its boundary attack (every class, its per-step update, no "
                                      "clipping) and Algorithm 1 with no safeguard (unflipped prediction, no "
                                      "skip_own_label, avoid_target or premise_check); overrides those keys. Settings "
                                      "the paper does not name stay flags: attack_space, overshoot (η), max_iter, "
                                      "batch_size, augment, bn_eval, wd, amsgrad, pd_output, scan_batch_size")
    resume: bool = option(True, "continue from the checkpoint of an interrupted run (false: start over)")
    trace: bool = option(False, "also write burn_trace.pt: the model's training-set logits after every fine-tuning "
                                "(float16, N x K per iteration), to study label-free checks offline")

    def validate(self) -> None:
        super().validate()
        if self.iterations < 0:
            raise BurnError(f"--iterations must be >= 0, got {self.iterations}")
        for key in ("kp_start", "kp_end", "kc_start", "kc_end", "omega_start", "omega_end", "premise_share",
                    "premise_max_adv_share", "max_retention_drop", "max_target_rise", "collapse_retention_drop"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise BurnError(f"--{key} must be in [0, 1], got {getattr(self, key)}")
        if self.min_unlearning_ratio < 0 or not math.isfinite(self.min_unlearning_ratio):
            raise BurnError(f"--min_unlearning_ratio must be a finite number >= 0, got {self.min_unlearning_ratio}")
        if self.kc_factor < 0 or not math.isfinite(self.kc_factor):
            raise BurnError(f"--kc_factor must be a finite number >= 0, got {self.kc_factor}")
        if max(self.kp_start, self.kp_end) + self.clean_factor() * max(self.kc_start, self.kc_end) > 1.0:
            raise BurnError("the poison and clean shares overlap: k_p + k_c must stay <= 1")
        if self.pd_output not in PD_OUTPUTS:
            raise BurnError(f"--pd_output must be one of {', '.join(PD_OUTPUTS)}, got {self.pd_output!r}")
        if self.attack_space not in SPACES:
            raise BurnError(f"--attack_space must be one of {', '.join(SPACES)}, got {self.attack_space!r}")
        if self.keep not in KEEP_RULES:
            raise BurnError(f"--keep must be one of {', '.join(KEEP_RULES)}, got {self.keep!r}")
        if self.unflipped not in UNFLIPPED_RULES:
            raise BurnError(f"--unflipped must be one of {', '.join(UNFLIPPED_RULES)}, got {self.unflipped!r}")
        if self.premise_share <= 0.0:
            raise BurnError(f"--premise_share must be in (0, 1], got {self.premise_share}")
        if self.premise_min_inflation < 0 or not math.isfinite(self.premise_min_inflation):
            raise BurnError(f"--premise_min_inflation must be a finite number >= 0, got {self.premise_min_inflation}")
        if self.premise_min_enrichment < 1.0:
            raise BurnError(f"--premise_min_enrichment must be >= 1, got {self.premise_min_enrichment}")
        if self.max_iter < 1 or self.candidates == 1 or self.candidates < 0 or self.scan_batch_size < 1 \
                or self.overshoot < 0:
            raise BurnError("--max_iter >= 1, --candidates 0 (every class) or >= 2, --scan_batch_size >= 1 and "
                            "--overshoot >= 0 are required")
        if self.step_rule not in STEP_RULES:
            raise BurnError(f"--step_rule must be one of {', '.join(STEP_RULES)}, got {self.step_rule!r}")

    def clean_factor(self) -> float:
        """The factor on the clean shares in force: ``kc_factor``, or 1 (the paper) with ``paper_exact``."""
        return 1.0 if self.paper_exact else self.kc_factor

    def scan_settings(self) -> dict:
        """The boundary attack's settings in force. ``paper_exact``: the paper's §2.3 attack - the argmin
        over every class k != k̂, every step scaled by η, no clipping (the paper names none)."""
        if self.paper_exact:
            return {"candidates": None, "clip": False, "step_rule": "step"}
        return {"candidates": self.candidates or None, "clip": self.clip, "step_rule": self.step_rule}

    def safeguards(self) -> dict:
        """The safeguard settings in force (``paper_exact`` turns them all off)."""
        if self.paper_exact:
            return {"unflipped": "prediction", "skip_own_label": False, "avoid_target": False,
                    "suspect_label_only": False, "premise_check": False, "keep": "last"}
        return {"unflipped": self.unflipped, "skip_own_label": self.skip_own_label, "avoid_target": self.avoid_target,
                "suspect_label_only": self.suspect_label_only, "premise_check": self.premise_check,
                "keep": self.keep if self.premise_check else "last"}


# --------------------------------------------------------------------------- algorithm pieces


def linear_schedule(start: float, end: float, t: int, total: int) -> float:
    """``start + t / T (end - start)`` (paper §5.2); ``start`` when T = 0."""
    return start if total == 0 else start + (t / total) * (end - start)


def schedule(cfg: BurnConfig, t: int) -> tuple[float, float, float]:
    """``(k_p^t, k_c^t, ω^t)`` of iteration ``t``."""
    T = cfg.iterations
    return (linear_schedule(cfg.kp_start, cfg.kp_end, t, T),
            cfg.clean_factor() * linear_schedule(cfg.kc_start, cfg.kc_end, t, T),
            linear_schedule(cfg.omega_start, cfg.omega_end, t, T))


def share_count(share: float, n: int) -> int:
    """Number of samples in a ``share`` of ``n`` (rounded, at least one for a positive share)."""
    return 0 if share <= 0 else min(n, max(1, int(round(share * n))))


def frozen_bn_step(model: nn.Module, batch, optimizer, ctx) -> StepOutput:
    """Cross-entropy step with every BatchNorm in eval mode, so that fine-tuning on a few hundred
    (partly relabelled) samples does not overwrite statistics learnt on the whole training set."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return cross_entropy_step(model, batch, optimizer, ctx)


def boundary_scan(model: Classifier, images: ImageSet, cfg: BurnConfig, device: torch.device) -> BoundaryResult:
    """Minimal-L2 boundary distance and adversarial label of every sample on ``model`` (θ0)."""
    model.to(device)
    settings = cfg.scan_settings()
    forward, transform, lower, upper = attack_space(model, cfg.attack_space, settings["clip"])
    return scan(forward, images.images, cfg.scan_batch_size, transform=transform, device=device,
                progress=cfg.progress, desc="burn: boundary scan", module=model, lower=lower, upper=upper,
                overshoot=cfg.overshoot, max_iter=cfg.max_iter, candidates=settings["candidates"],
                step_rule=settings["step_rule"])


def prediction_divergence(logits0: torch.Tensor, logits_t: torch.Tensor, output: str = "logits") -> torch.Tensor:
    """``PD = 1 - cos(f(x; θ0), f(x; θt))`` per sample, on logits or softmax outputs."""
    if output == "probs":
        logits0, logits_t = logits0.softmax(1), logits_t.softmax(1)
    return 1.0 - F.cosine_similarity(logits0.double(), logits_t.double(), dim=1).float()


def composite_score(l2: torch.Tensor, pd: torch.Tensor, omega: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(BD, S)`` with ``BD = l / l_max`` and ``S = (1 - ω) BD + ω PD``."""
    bd = l2 / l2.max().clamp_min(1e-12)
    return bd, (1.0 - omega) * bd + omega * pd


def select(score: torch.Tensor, kp: float, kc: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the top ``kp`` share (poison set) and bottom ``kc`` share (clean set) by score;
    ties keep the sample order."""
    n = len(score)
    order = torch.argsort(score, descending=True, stable=True)
    n_poison, n_clean = share_count(kp, n), share_count(kc, n)
    n_clean = min(n_clean, n - n_poison)
    return order[:n_poison].clone(), order[n - n_clean:].flip(0).clone() if n_clean else order[:0].clone()


def relabel_plan(result: BoundaryResult, labels: torch.Tensor, safeguards: dict,
                 target: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relabel, reason)`` per sample: the label it gets if it enters D_poison, and RELABEL (0) or
    why it is left out (UNFLIPPED, OWN_LABEL, TARGET, OTHER_LABEL). Algorithm 1 read literally
    (``unflipped: prediction``, the other safeguards off) relabels every selected sample with
    ``argmax f(x + δ; θ0)``."""
    relabel = result.adv_label.clone()
    reason = torch.full_like(relabel, RELABEL)
    stuck = ~result.converged.bool()
    if safeguards["unflipped"] == "nearest":
        relabel[stuck] = result.nearest_label[stuck]
    elif safeguards["unflipped"] == "skip":
        reason[stuck] = UNFLIPPED
    if safeguards["skip_own_label"]:
        reason[(reason == RELABEL) & (relabel == labels)] = OWN_LABEL
    if safeguards["avoid_target"] and target is not None:
        reason[(reason == RELABEL) & (relabel == target)] = TARGET
    if safeguards.get("suspect_label_only") and target is not None:
        reason[(reason == RELABEL) & (labels != target)] = OTHER_LABEL
    return relabel, reason


def finetune_set(train: ImageSet, poison_pos: torch.Tensor, relabel: torch.Tensor,
                 clean_pos: torch.Tensor) -> ImageSet:
    """D_poison (relabelled with ``relabel``, the adversarial labels of θ0) ∪ D_clean (their own labels)."""
    poison = train.subset(poison_pos).with_labels(relabel[poison_pos])
    return concat([poison, train.subset(clean_pos)]) if len(clean_pos) else poison


def selection_quality(train: ImageSet, poison_pos: torch.Tensor, clean_pos: torch.Tensor,
                      adv_label: torch.Tensor) -> dict:
    """Precision/recall of D_poison^t against the record's poison flags, relabel accuracy and the
    poison share of D_clean^t. Reporting only: the algorithm never reads the flags.

    ``relabel_acc`` is taken over the selected true-poison samples the attack relabelled (record
    label != original label): only those can be repaired by relabelling. Poison drawn from the
    target class (BackdoorBench draws from the whole training set, spec §6) and cross/negative
    samples keep their own label, so no adversarial label can equal it; they count for precision
    and recall but not here."""
    flags = train.poison.cpu()
    n_true = int(flags.sum())
    if n_true == 0:
        return {}
    hits = flags[poison_pos]
    true_sel = poison_pos[hits]
    original = train.original_labels.cpu()
    relabelled = true_sel[train.labels.cpu()[true_sel] != original[true_sel]]
    relabel = adv_label[relabelled] == original[relabelled]
    return {"poison_precision": int(hits.sum()) / len(poison_pos) if len(poison_pos) else None,
            "poison_recall": int(hits.sum()) / n_true,
            "relabel_acc": int(relabel.sum()) / len(relabelled) if len(relabelled) else None,
            "clean_set_poison_rate": int(flags[clean_pos].sum()) / len(clean_pos) if len(clean_pos) else None}


def ranking_auroc(train: ImageSet, score: torch.Tensor) -> float | None:
    """AUROC (poison vs clean, record flags) of the score that chose an iteration's sets, taken
    before that iteration's fine-tuning. Reporting only."""
    flags = train.poison.cpu()
    return auroc(score, flags) if 0 < int(flags.sum()) < len(flags) else None


# --------------------------------------------------------------------------- state on disk


# what boundary_scan reads (paper_exact: through scan_settings)
SCAN_KEYS = ("attack_space", "clip", "overshoot", "max_iter", "candidates", "step_rule", "scan_batch_size",
             "paper_exact")


def _scan_fingerprint(full: dict) -> dict:
    """The part of the run's fingerprint (:meth:`Defense.fingerprint`: every result-changing setting,
    digests of the weights and data read) that the boundary scan of θ0 depends on, so that a scan is
    reused when only the fine-tuning settings changed."""
    return {"defense": full["defense"], **{k: full[k] for k in SCAN_KEYS},
            "data": {k: full["data"][k] for k in ("weights", "bd_train")}}


def _cpu_copy(state_dict: dict) -> OrderedDict:
    """A CPU snapshot that keeps the module versions (``_metadata``: MNASNet's loader needs them)."""
    snapshot = OrderedDict((k, v.detach().cpu().clone()) for k, v in state_dict.items())
    snapshot._metadata = OrderedDict(getattr(state_dict, "_metadata", {}))
    return snapshot


def _load(path: Path, expected: dict, what: str):
    """A checkpoint of this run, read weights-only (a record folder can carry any file), or None."""
    if not path.exists():
        return None
    state = safe_torch_load(path, what=f"the {what} checkpoint", fix="pass --resume false to start over")
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise BurnError(f"the {what} checkpoint {path} was made by another burnkit version; pass --resume false "
                        "to start over")
    problem = fingerprint_mismatch(state.get("fingerprint"), expected)
    if problem:
        raise BurnError(f"the {what} checkpoint {path} was made {problem}; {RESUME_FIX}")
    return state


# --------------------------------------------------------------------------- the defense


@contextlib.contextmanager
def _part(timings: dict, name: str):
    """Add the block's seconds to ``timings[name]``; the parts kept in the state and ``cost.json``:
    ``scan`` (boundary attack on θ0), ``select`` (PD, S and the sets), ``finetune``,
    ``train_forward`` (θt on the training set, for PD and the premise checks) and ``test_scoring``
    (ACC/ASR/RA on the test sets, reporting only)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def burn(model: Classifier, data: DefenseData, cfg: BurnConfig, run: DefenseRun) -> Classifier:
    """Algorithm 1 on ``data.poisoned_train``; checkpoints after every fine-tuning and resumes."""
    train = data.poisoned_train
    if train is None or len(train) == 0:
        raise BurnError("BURN needs the record's poisoned training set (bd_train), but the record has none")
    device = run.device
    guards = cfg.safeguards()
    fingerprint = run.fingerprint
    scan_path, state_path = run.checkpoint_dir / "burn_scan.pt", run.checkpoint_dir / "burn_state.pt"
    if not cfg.resume:
        scan_path.unlink(missing_ok=True)
        state_path.unlink(missing_ok=True)

    # Phase 1, lines 2-4: the boundary scan of the frozen infected model θ0 (kept on disk).
    scanned = _load(scan_path, _scan_fingerprint(fingerprint), "scan")
    scanned_before = scanned is not None
    if scanned is None:
        start = time.perf_counter()
        result = boundary_scan(model, train, cfg, device)
        scanned = {"version": STATE_VERSION, "fingerprint": _scan_fingerprint(fingerprint),
                   "result": {k: v for k, v in asdict(result).items() if k != "perturbation"},
                   "wall_s": time.perf_counter() - start}
        atomic_torch_save(scanned, scan_path)
        run.logger.info("boundary scan of %d samples: %.1fs, %.1f%% flipped", len(train), scanned["wall_s"],
                        100 * float(result.converged.float().mean()))
    result = BoundaryResult(**scanned["result"])
    logits0, l2 = result.clean_logits, result.l2
    labels = train.labels.cpu()
    preds0 = logits0.argmax(1)
    crossed_to = torch.where(result.converged.bool().cpu(), result.adv_label.cpu(), -1)
    target = premise_test(l2, labels=labels, crossed=crossed_to, num_classes=logits0.shape[1], share=cfg.premise_share,
                          min_enrichment=cfg.premise_min_enrichment,
                          max_adv_share=cfg.premise_max_adv_share if guards["premise_check"] else 1.0,
                          min_inflation=(cfg.premise_min_inflation or None) if guards["premise_check"] else None)
    relabel, reason = relabel_plan(result, labels, guards, target["class"])
    signals0 = training_signals(preds0, preds0, labels, target["class"])
    run.logger.info("premise test (labels of the farthest samples): %s; %d samples not flipped by the attack",
                    json.dumps(target), int((~result.converged.bool()).sum()))

    # θ0: what keep: best may return, and the fallback when the first model the checks judge fails
    theta0 = _cpu_copy(model.net.state_dict()) if guards["premise_check"] else None
    state = _load(state_path, fingerprint, "BURN")
    if state is None:
        state = {"version": STATE_VERSION, "fingerprint": fingerprint, "completed": -1, "model": None,
                 "rows": [], "poison_sets": [], "clean_sets": [], "pd": torch.zeros(len(train)),
                 "score": l2 / l2.max().clamp_min(1e-12), "logits": logits0, "stopped": None,
                 "timings": {"scan": scanned["wall_s"]}}
    else:
        model.net.load_state_dict(state["model"])
        if not guards["premise_check"]:
            state["model"] = None
        run.logger.info("resuming BURN after iteration %d of %d", state["completed"], cfg.iterations)
    # what earlier, interrupted processes spent (the scan and the finished iterations), for cost.json
    run.previous_sessions_s = sum(state["timings"].values()) if scanned_before else sum(
        v for k, v in state["timings"].items() if k != "scan")
    run.metrics.rows = list(state["rows"])
    timings = state["timings"]

    last = cfg.iterations
    for t in range(state["completed"] + 1, cfg.iterations + 1):
        if state["stopped"] is not None:
            break
        seed_everything(cfg.random_seed + t)  # each iteration reproducible on its own: resume == no kill
        kp, kc, omega = schedule(cfg, t)
        with _part(timings, "select"):
            if t == 0:  # Phase 1, lines 5-8: top k_p^0 by distance, fine-tune on them only
                pd = torch.zeros(len(train))
                score = l2.clone()
                ranked, _ = select(score, kp, 0.0)
                clean_pos = ranked[:0]
            else:  # Phase 2, lines 11-19 (θt's logits come from the previous iteration's check pass)
                pd = prediction_divergence(logits0, state["logits"], cfg.pd_output)
                _, score = composite_score(l2, pd, omega)
                ranked, clean_pos = select(score, kp, kc)
            poison_pos = ranked[reason[ranked] == RELABEL]
        phase = "phase1" if t == 0 else "phase2"
        stop_reason = target["reason"] if guards["premise_check"] and t == 0 else None
        # the model to fall back to: the checkpoint's CPU copy of the previous iteration's weights
        # (one copy of a large model, not two, and none on the accelerator); θ0 before Phase 1
        before = None
        if guards["premise_check"]:  # Phase 1's model is no fallback (see check_failure): θ0 is
            before = theta0 if t <= 1 else state["model"] if state["model"] is not None else _cpu_copy(
                model.net.state_dict())
        finetune_s, logits_next = 0.0, None
        signals = {"retention": None, "target_share": None, "target_left": None}
        if stop_reason is None:
            tune = finetune_set(train, poison_pos, relabel, clean_pos)
            if len(tune) < 2:  # BatchNorm cannot train on a single sample; nothing to learn from none
                run.logger.warning("iteration %d: %d sample(s) left to fine-tune on after the safeguards; skipped",
                                   t, len(tune))
            else:
                # a last batch of one sample cannot pass BatchNorm in train mode: drop it (a different
                # sample every epoch, as the batches are shuffled)
                train_cfg = cfg.train_config(drop_last=len(tune) % cfg.batch_size == 1)
                with _part(timings, "finetune"):
                    finetune_s = run.fit(model, tune, train_cfg, log=False, phase=f"{phase}_finetune", eval_suite=None,
                                         seed=cfg.random_seed + t, desc=f"burn t={t}",
                                         step=frozen_bn_step if cfg.bn_eval else None).wall_time_s
            if guards["premise_check"] or t < last or cfg.trace:
                with _part(timings, "train_forward"):  # θ_{t+1} on the training set: next PD and the checks
                    logits_next = predict(model, train, device, amp=cfg.amp)
                untouched = ~touched_mask(len(train), [*state["poison_sets"], poison_pos], [*state["clean_sets"], clean_pos])
                signals = training_signals(preds0, logits_next.argmax(1), labels, target["class"], untouched)
            if guards["premise_check"]:
                stop_reason = check_failure(t, signals, signals0, cfg)
        if stop_reason is not None:
            model.net.load_state_dict(before)  # keep the last model that passed
            logits_next = None
            # keep: best chooses among the models before the stop (θ0 included) once the loop ends, and
            # _return_best replaces "kept" with its choice; say here only what is certain now
            kept = ("θ0 (the model it was given)" if t <= 1 else f"the model of iteration {t - 1}"
                    if guards["keep"] != "best" else "the model keep: best picks among those before it")
            state["stopped"] = {"iteration": t, "reason": stop_reason, "kept": kept, "advice": STOP_ADVICE}
            run.logger.warning("BURN stopped at iteration %d and keeps %s: %s", t, kept, stop_reason)
        tested = t % cfg.test_every == 0 or t == last or stop_reason is not None
        metrics = None
        if tested:
            with _part(timings, "test_scoring"):
                metrics = run.evaluate(model)
        counts = {column: int((reason[ranked] == code).sum()) for code, column in SKIP_COLUMNS.items()}
        row = {"epoch": t, "iteration": t, "phase": 1 if t == 0 else 2, "k_p": kp, "k_c": kc,
               "omega": omega if t else None, "n_ranked_poison": len(ranked), "n_poison": len(poison_pos),
               "n_clean": len(clean_pos), **counts, "train_retention": signals["retention"],
               "train_target_share": signals["target_share"], "train_target_left": signals["target_left"],
               "stopped": stop_reason,
               **(metrics.row() if metrics is not None else {}),
               **selection_quality(train, poison_pos, clean_pos, relabel),
               "selection_auroc": ranking_auroc(train, score), "finetune_s": finetune_s}
        run.metrics.append(row)
        before = state["model"] = None  # drop the previous copy before taking the next one
        if guards["keep"] == "best" and stop_reason is None and _eligible(t, signals, signals0, cfg) and (
                state.get("best") is None or signals["target_left"] >= state["best"]["target_left"]):
            state["best"] = {"iteration": t, "target_left": signals["target_left"], "retention": signals["retention"]}
            state["best_model"] = _cpu_copy(model.net.state_dict())
        state.update(completed=t, model=_cpu_copy(model.net.state_dict()),
                     rows=list(run.metrics.rows), pd=pd, score=score,
                     logits=logits_next if logits_next is not None else state["logits"])
        state["poison_sets"].append(poison_pos)
        state["clean_sets"].append(clean_pos)
        if cfg.trace:
            state.setdefault("trace", []).append(None if logits_next is None else logits_next.half())
        atomic_torch_save(state, state_path)  # the checkpoint first, then the CSV
        if not guards["premise_check"]:
            state["model"] = None  # on disk now; only the premise check falls back to it
        run.metrics.save()
        run.logger.info("iteration %d/%d: acc %s asr %s ra %s | %d relabelled (%s), %d clean | retention %s, "
                        "target share %s", t, cfg.iterations, _pct(metrics and metrics.acc), _pct(metrics and metrics.asr),
                        _pct(metrics and metrics.ra), len(poison_pos),
                        ", ".join(f"{c[10:]} {v}" for c, v in counts.items() if v) or "none skipped",
                        len(clean_pos), _pct(signals["retention"]), _pct(signals["target_share"]))

    if state["stopped"] is not None:
        stop = state["stopped"]
        run.logger.warning("BURN stopped at iteration %d: %s", stop["iteration"], stop["reason"])
    if guards["keep"] == "best" and state["completed"] >= 0:
        returned = _return_best(model, theta0, state, cfg, run)
        if returned is not None:
            run.metrics.append(returned)
            run.metrics.save()
    report = write_report(run.out_dir, train, result, state, cfg, target, relabel, reason)
    if cfg.trace:
        atomic_torch_save({"logits0": logits0.half(), "logits": state.get("trace", []), "labels": labels,
                           "poison_sets": state["poison_sets"], "clean_sets": state["clean_sets"],
                           "rows": state["rows"], "target": target}, run.out_dir / "burn_trace.pt")
    run.extra_results["burn"] = {"timings_s": state["timings"], "safeguards": guards, **report}
    run.logger.info("detection: %s", json.dumps({k: v for k, v in report.items() if k != "iterations"}))
    return model


def check_failure(t: int, signals: dict, signals0: dict, cfg: BurnConfig) -> str | None:
    """Why the fine-tuning of iteration ``t`` failed the checks (burn_checks.training_failure), or None.

    Phase 1's model (t = 0) is not judged: it is the paper's warm start, fine-tuned on D_poison^0
    alone (a few dozen relabelled samples, BatchNorm in train mode), and on the calibration corpus it
    lost up to 30 % of θ0's training predictions that the first Phase 2 fine-tuning gave back (SIG, seed
    2: a stop there returned θ0 where the run removed the backdoor). It is never returned either: a
    failure at iteration 1 falls back to θ0, and ``keep: best`` skips it (:func:`_eligible`)."""
    if t == 0:
        return None
    return training_failure(signals, signals0, cfg.collapse_retention_drop, cfg.max_target_rise)


def _eligible(t: int, signals: dict, signals0: dict, cfg: BurnConfig) -> bool:
    """A fine-tuned model ``keep: best`` may return: a Phase 2 model (t >= 1; see :func:`check_failure`)
    that kept θ0's correct predictions on the untouched training samples within ``max_retention_drop``
    and whose unlearning is specific to the suspected target - it moved at least
    ``min_unlearning_ratio`` times as large a share of the target-labelled samples off the target as
    the share of θ0's other correct predictions it lost (that loss floored at 1 %). Fine-tunings that
    damage the model move every class, the suspect no faster than the rest: on the calibration corpus
    (docs/burn-corpus.md) runs on an easy class reached 1.0-3.5 on five of six records, the models
    picked with the true target 5.9-21."""
    if t < 1 or signals["target_left"] is None or signals["retention"] is None:
        return False
    drop = signals0["retention"] - signals["retention"]
    return drop <= cfg.max_retention_drop and signals["target_left"] >= cfg.min_unlearning_ratio * max(drop, 0.01)


def _name_the_kept_model(state: dict) -> None:
    """After a stop, the report names the model BURN returned (keep: best's choice), not the one
    loaded at the stop."""
    if state["stopped"] is not None and state.get("returned") is not None:
        it = state["returned"]["iteration"]
        state["stopped"]["kept"] = "θ0 (the model it was given)" if it < 0 else f"the model of iteration {it}"


def _return_best(model: Classifier, theta0: dict, state: dict, cfg: BurnConfig, run: DefenseRun) -> dict | None:
    """Load the model ``keep: best`` returns and, when it is not the model of the last row of
    burn_df.csv, return a last row that scores it (readers of BackdoorBench's summary take the last
    row as the result). θ0 when no fine-tuned model was eligible."""
    best = state.get("best")
    stopped = state["stopped"]
    # the model loaded now: after a stop, the last that passed (θ0, -1, for a stop at iteration 0 or 1)
    current = (-1 if stopped["iteration"] <= 1 else stopped["iteration"] - 1) if stopped is not None \
        else state["completed"]
    if best is not None and best["iteration"] == current:
        chosen = f"the model of iteration {current}"
        run.logger.info("BURN returns %s: of the fine-tuned models that kept %.0f%% of θ0's correct predictions on the "
                        "untouched training samples, it moved the most target-labelled samples off the target (%.1f%%)",
                        chosen, 100 * (1 - cfg.max_retention_drop), 100 * best["target_left"])
        state["returned"] = {"iteration": current, "why": "best"}
        _name_the_kept_model(state)
        return None
    if best is None:
        if current < 0:  # stopped at iteration 0 or 1: θ0 is loaded and the stop's row scores it
            state["returned"] = {"iteration": -1, "why": "stopped before Phase 2 produced a model"}
            _name_the_kept_model(state)
            return None
        run.logger.warning("BURN returns θ0 (the model it was given): no Phase 2 model kept %.0f%% of θ0's correct "
                           "predictions on the training samples no fine-tuning trained on while moving the target-"
                           "labelled samples off the target at least %g times as fast (the sign of unlearning a "
                           "backdoor rather than damaging the model). %s", 100 * (1 - cfg.max_retention_drop),
                           cfg.min_unlearning_ratio, STOP_ADVICE)
        model.net.load_state_dict(theta0)
        state["returned"] = {"iteration": -1, "why": "no fine-tuned model kept θ0's training predictions while "
                                                     "unlearning the suspected target"}
    else:
        model.net.load_state_dict(state["best_model"])
        run.logger.info("BURN returns the model of iteration %d, not the last: of the fine-tuned models that kept "
                        "%.0f%% of θ0's correct predictions on the untouched training samples, it moved the most "
                        "target-labelled samples off the target (%.1f%%)", best["iteration"],
                        100 * (1 - cfg.max_retention_drop), 100 * best["target_left"])
        state["returned"] = {"iteration": best["iteration"], "why": "best"}
    _name_the_kept_model(state)
    metrics = run.evaluate(model)
    return {"epoch": len(run.metrics.rows), "iteration": None, "returned_from": state["returned"]["iteration"],
            **metrics.row()}


# --------------------------------------------------------------------------- reporting


def per_sample_table(train: ImageSet, result: BoundaryResult, state: dict, relabel: torch.Tensor,
                     reason: torch.Tensor) -> pd.DataFrame:
    """One row per training sample: distance, adversarial label, the label it gets in D_poison and
    why it would be left out, BD/PD/S of the last iteration, the iterations that selected it, and -
    when the record knows them - its true flags."""
    n = len(train)
    in_poison = [[] for _ in range(n)]
    in_clean = [[] for _ in range(n)]
    for t, (p, c) in enumerate(zip(state["poison_sets"], state["clean_sets"])):
        for i in p.tolist():
            in_poison[i].append(str(t))
        for i in c.tolist():
            in_clean[i].append(str(t))
    l2 = result.l2
    frame = pd.DataFrame({
        "index": train.index.cpu().numpy(), "label": train.labels.cpu().numpy(),
        "boundary_l2": l2.numpy(), "adv_label": result.adv_label.numpy(), "clean_pred": result.clean_label.numpy(),
        "nearest_label": result.nearest_label.numpy(), "relabel": relabel.numpy(),
        "relabel_rule": RULE_NAMES[reason.numpy()],
        "attack_iterations": result.iterations.numpy(), "attack_converged": result.converged.numpy(),
        "BD": (l2 / l2.max().clamp_min(1e-12)).numpy(), "PD": state["pd"].numpy(), "S": state["score"].numpy(),
        "selected_poison_iters": [";".join(v) for v in in_poison],
        "selected_clean_iters": [";".join(v) for v in in_clean],
    })
    if bool(train.poison.any()):
        frame["is_poison"] = train.poison.cpu().numpy()
        frame["original_label"] = train.original_labels.cpu().numpy()
    return frame


def detection_summary(train: ImageSet, result: BoundaryResult, score: torch.Tensor) -> dict:
    """Detection measures against the record's flags (reporting only).

    ``auroc_l2``: the Phase-1 ranking (boundary distance of θ0), a detection measure. The rankings
    of Phase 2 are reported per iteration (``selection_auroc`` in ``iterations``), each taken before
    the fine-tuning it chose the sets for. ``auroc_final_score_after_finetuning`` is the AUROC of the
    last S, whose PD already reflects fine-tuning on the selected samples: it shows where the
    algorithm ended, not how well it detects. ``*_relabelled`` repeat the AUROCs with only the poison
    the attack relabelled as positives (target-class and cross/negative samples, which keep their own
    label, left out); Table-1-style mean distances."""
    flags = train.poison.cpu()
    l2 = result.l2
    out = {"mean_l2_all": float(l2.mean()), "converged_share": int(result.converged.sum()) / len(result.converged),
           "n_unflipped": int((~result.converged.bool()).sum())}
    if 0 < int(flags.sum()) < len(flags):
        clean_mean, poison_mean = float(l2[~flags].mean()), float(l2[flags].mean())
        out.update({"n_poison": int(flags.sum()), "n_clean": int((~flags).sum()),
                    "auroc_l2": auroc(l2, flags), "auroc_final_score_after_finetuning": auroc(score, flags),
                    "mean_l2_clean": clean_mean, "mean_l2_poison": poison_mean,
                    "l2_ratio_poison_clean": poison_mean / max(clean_mean, 1e-12),
                    "n_unflipped_poison": int((~result.converged.bool() & flags).sum())})
        relabelled = flags & (train.labels.cpu() != train.original_labels.cpu())
        keep = relabelled | ~flags
        if 0 < int(relabelled.sum()) < int(flags.sum()):
            out.update({"n_poison_relabelled": int(relabelled.sum()),
                        "auroc_l2_relabelled": auroc(l2[keep], relabelled[keep]),
                        "auroc_final_score_after_finetuning_relabelled": auroc(score[keep], relabelled[keep])})
    return out


def write_report(out_dir: Path, train: ImageSet, result: BoundaryResult, state: dict, cfg: BurnConfig,
                 target: dict, relabel: torch.Tensor, reason: torch.Tensor) -> dict:
    """``burn_samples.csv``, ``burn_detection.json`` and the plots; returns the summary."""
    table = per_sample_table(train, result, state, relabel, reason)
    atomic_write_text(out_dir / "burn_samples.csv", table.to_csv(index=False))
    summary = detection_summary(train, result, state["score"])
    keys = ("iteration", "n_ranked_poison", "n_poison", "n_clean", *SKIP_COLUMNS.values(), "selection_auroc", "poison_precision", "poison_recall", "relabel_acc",
            "clean_set_poison_rate", "train_retention", "train_target_share", "train_target_left", "stopped",
            "test_acc", "test_asr",
            "test_ra")
    summary["iterations"] = [{k: r.get(k) for k in keys} for r in state["rows"]]
    summary.update({"attack_space": cfg.attack_space, "suspected_target": target, "stopped": state["stopped"],
                    "returned": state.get("returned"),
                    "safeguards": cfg.safeguards(), "scan": cfg.scan_settings(),
                    "kc_factor": cfg.clean_factor()})  # in force: paper_exact runs 1 whatever the key says
    write_json(out_dir / "burn_detection.json", summary)
    plot_report(out_dir, train, result, state)
    return summary


def plot_report(out_dir: Path, train: ImageSet, result: BoundaryResult, state: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flags = train.poison.cpu().numpy()
    l2 = result.l2.numpy()
    if 0 < flags.sum() < len(flags):
        from sklearn.metrics import roc_curve

        fig, ax = plt.subplots(figsize=(5, 4))
        for name, values in (("boundary L2 (Phase 1)", l2), ("final S, after fine-tuning", state["score"].numpy())):
            fpr, tpr, _ = roc_curve(flags.astype(int), values)
            ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(values, flags):.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("false positive rate (clean flagged)")
        ax.set_ylabel("true positive rate (poison found)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "burn_roc.png", dpi=100)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(5, 4))
        bins = np.linspace(0, np.quantile(l2, 0.995), 60)
        ax.hist(l2[~flags], bins=bins, alpha=0.6, density=True, label=f"clean (mean {l2[~flags].mean():.3f})")
        ax.hist(l2[flags], bins=bins, alpha=0.6, density=True, label=f"poison (mean {l2[flags].mean():.3f})")
        ax.set_xlabel("minimal L2 to the decision boundary")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "burn_l2_hist.png", dpi=100)
        plt.close(fig)

    rows = state["rows"]
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("test_acc", "test_asr", "test_ra"):
            pts = [(r["iteration"], r[key]) for r in rows if isinstance(r.get(key), float)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=key)
        ax.set_xlabel("iteration (0 = Phase 1)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "burn_iterations.png", dpi=100)
        plt.close(fig)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


@register_defense
class Burn(Defense):
    """BURN: boundary-distance detection, adversarial relabelling and progressive unlearning."""

    name = "burn"
    config_cls = BurnConfig
    needs_clean_subset = False

    def repair(self, model, data, cfg, run):
        return burn(model, data, cfg, run)

    def check_resume(self, cfg, checkpoint_dir, fingerprint):
        """Refuse a broken checkpoint, or one of other settings or record content, before anything is written."""
        _load(checkpoint_dir / "burn_scan.pt", _scan_fingerprint(fingerprint), "scan")
        _load(checkpoint_dir / "burn_state.pt", fingerprint, "BURN")
