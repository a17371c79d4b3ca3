"""BURN: Backdoor Unlearning via adversaRial bouNdary analysis (Su et al., 2025), Algorithm 1.

Paper: ``shared/paper/burn-paper.md`` (§2.3 boundary attack, §5 method, Algorithm 1).

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
* ``pd_output: logits`` - PD compares logit vectors (the ``f`` of §2.3); ``probs`` uses softmax.
* fine-tuning: a fresh Adam(β = 0.9, 0.999) per fine-tuning, fixed lr 5e-5, no weight decay, no
  AMSGrad, BackdoorBench's train augmentation (``augment: true``), BatchNorm in train mode like any
  fine-tuning (``bn_eval: true`` freezes its running statistics; Phase 1 trains on 0.5 % of the data).
* Phase 1 fine-tunes on D_poison^0 only (Alg. 1 line 8); Phase 2 runs t = 1..T, so there are T + 1
  fine-tunings; ``burn_df.csv`` has one row per fine-tuning (iteration 0 = Phase 1).
* ``l(x)`` of a sample the attack cannot flip within ``max_iter`` steps is the norm of its last
  iterate: a lower bound of its distance, and large, so such samples rank as suspicious.

Example:
    python defense/burn.py --result_file badnet_cifar10 --dataset cifar10
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..boundary import SPACES, BoundaryResult, attack_space, scan
from ..config import option
from ..data import ImageSet, concat
from ..defense import Defense, DefenseConfig, DefenseData, DefenseRun, register_defense
from ..engine import StepOutput, cross_entropy_step, predict, seed_everything
from ..errors import BurnError
from ..metrics import auroc
from ..models import Classifier
from ..records import atomic_torch_save
from ..results import atomic_write_text, write_json
from ..safe_load import safe_torch_load

PD_OUTPUTS = ("logits", "probs")
STATE_VERSION = 1


@dataclass
class BurnConfig(DefenseConfig):
    """BURN's settings; defaults are the paper's (§5.2)."""

    iterations: int = option(20, "T: Phase-2 iterations")
    epochs: int = option(5, "fine-tuning epochs of Phase 1 and of every Phase-2 iteration")
    batch_size: int = option(128, "fine-tuning batch size")
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
    omega_start: float = option(0.3, "ω^0: weight of PD in the score at iteration 0")
    omega_end: float = option(0.6, "ω^T: weight of PD in the score at the last iteration")
    pd_output: str = option("logits", "outputs compared by PD: logits or probs", choices=PD_OUTPUTS)
    attack_space: str = option("input", "space of the boundary distance: input (normalised) or pixel", choices=SPACES)
    clip: bool = option(True, "clip attack iterates to valid images")
    overshoot: float = option(0.02, "boundary attack overshoot η")
    max_iter: int = option(50, "boundary attack steps per sample")
    candidates: int = option(10, "candidate classes of the boundary attack (top by logit)")
    scan_batch_size: int = option(256, "samples per boundary-attack batch")
    resume: bool = option(True, "continue from the checkpoint of an interrupted run (false: start over)")

    def validate(self) -> None:
        super().validate()
        if self.iterations < 0:
            raise BurnError(f"--iterations must be >= 0, got {self.iterations}")
        for key in ("kp_start", "kp_end", "kc_start", "kc_end", "omega_start", "omega_end"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise BurnError(f"--{key} must be in [0, 1], got {getattr(self, key)}")
        if max(self.kp_start, self.kp_end) + max(self.kc_start, self.kc_end) > 1.0:
            raise BurnError("the poison and clean shares overlap: k_p + k_c must stay <= 1")
        if self.pd_output not in PD_OUTPUTS:
            raise BurnError(f"--pd_output must be one of {', '.join(PD_OUTPUTS)}, got {self.pd_output!r}")
        if self.attack_space not in SPACES:
            raise BurnError(f"--attack_space must be one of {', '.join(SPACES)}, got {self.attack_space!r}")
        if self.max_iter < 1 or self.candidates < 2 or self.scan_batch_size < 1 or self.overshoot < 0:
            raise BurnError("--max_iter >= 1, --candidates >= 2, --scan_batch_size >= 1 and --overshoot >= 0 are required")


# --------------------------------------------------------------------------- algorithm pieces


def linear_schedule(start: float, end: float, t: int, total: int) -> float:
    """``start + t / T (end - start)`` (paper §5.2); ``start`` when T = 0."""
    return start if total == 0 else start + (t / total) * (end - start)


def schedule(cfg: BurnConfig, t: int) -> tuple[float, float, float]:
    """``(k_p^t, k_c^t, ω^t)`` of iteration ``t``."""
    T = cfg.iterations
    return (linear_schedule(cfg.kp_start, cfg.kp_end, t, T), linear_schedule(cfg.kc_start, cfg.kc_end, t, T),
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
    forward, transform, lower, upper = attack_space(model, cfg.attack_space, cfg.clip)
    return scan(forward, images.images, cfg.scan_batch_size, transform=transform, device=device,
                progress=cfg.progress, desc="burn: boundary scan", module=model, lower=lower, upper=upper,
                overshoot=cfg.overshoot, max_iter=cfg.max_iter, candidates=cfg.candidates)


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


def finetune_set(train: ImageSet, poison_pos: torch.Tensor, adv_label: torch.Tensor,
                 clean_pos: torch.Tensor) -> ImageSet:
    """D_poison (relabelled with the adversarial labels of θ0) ∪ D_clean (their own labels)."""
    poison = train.subset(poison_pos).with_labels(adv_label[poison_pos])
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
    relabel = (adv_label[relabelled] == original[relabelled]).float()
    return {"poison_precision": float(hits.float().mean()) if len(poison_pos) else None,
            "poison_recall": float(hits.sum()) / n_true,
            "relabel_acc": float(relabel.mean()) if len(relabelled) else None,
            "clean_set_poison_rate": float(flags[clean_pos].float().mean()) if len(clean_pos) else None}


# --------------------------------------------------------------------------- state on disk


def _fingerprint(cfg: BurnConfig, train: ImageSet, record_dir: str) -> dict:
    """What a checkpoint must agree with to be resumed."""
    keys = ("iterations", "epochs", "batch_size", "lr", "client_optimizer", "adam_betas", "wd", "amsgrad",
            "lr_scheduler", "augment", "bn_eval", "kp_start", "kp_end", "kc_start", "kc_end", "omega_start", "omega_end",
            "pd_output", "attack_space", "clip", "overshoot", "max_iter", "candidates", "random_seed")
    return {"record": str(record_dir), "n_train": len(train), **{k: _plain(getattr(cfg, k)) for k in keys}}


def _scan_fingerprint(full: dict) -> dict:
    return {k: full[k] for k in ("record", "n_train", "attack_space", "clip", "overshoot", "max_iter", "candidates")}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _load(path: Path, expected: dict, what: str):
    """A checkpoint of this run, read weights-only (a record folder can carry any file), or None."""
    if not path.exists():
        return None
    state = safe_torch_load(path, what=f"the {what} checkpoint", fix="pass --resume false to start over")
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or state.get("fingerprint") != expected:
        raise BurnError(f"the {what} checkpoint {path} was made with other settings or another record; "
                        "pass --resume false to start over")
    return state


# --------------------------------------------------------------------------- the defense


def burn(model: Classifier, data: DefenseData, cfg: BurnConfig, run: DefenseRun) -> Classifier:
    """Algorithm 1 on ``data.poisoned_train``; checkpoints after every fine-tuning and resumes."""
    train = data.poisoned_train
    if train is None or len(train) == 0:
        raise BurnError("BURN needs the record's poisoned training set (bd_train), but the record has none")
    device = run.device
    fingerprint = _fingerprint(cfg, train, str(run.out_dir.parent.parent))
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
        logits0 = predict(model, train, device, amp=cfg.amp)
        scanned = {"version": STATE_VERSION, "fingerprint": _scan_fingerprint(fingerprint),
                   "result": asdict(result), "logits0": logits0, "wall_s": time.perf_counter() - start}
        atomic_torch_save(scanned, scan_path)
        run.logger.info("boundary scan of %d samples: %.1fs, %.1f%% converged", len(train), scanned["wall_s"],
                        100 * float(result.converged.float().mean()))
    result = BoundaryResult(**scanned["result"])
    logits0, l2, adv_label = scanned["logits0"], result.l2, result.adv_label

    state = _load(state_path, fingerprint, "BURN")
    if state is None:
        state = {"version": STATE_VERSION, "fingerprint": fingerprint, "completed": -1, "model": None,
                 "rows": [], "poison_sets": [], "clean_sets": [], "pd": torch.zeros(len(train)),
                 "score": l2 / l2.max().clamp_min(1e-12), "timings": {"scan": scanned["wall_s"]}}
    else:
        model.net.load_state_dict(state["model"])
        run.logger.info("resuming BURN after iteration %d of %d", state["completed"], cfg.iterations)
    # what earlier, interrupted processes spent (the scan and the finished iterations), for cost.json
    run.previous_sessions_s = sum(state["timings"].values()) if scanned_before else sum(
        v for k, v in state["timings"].items() if k != "scan")
    run.metrics.rows = list(state["rows"])

    for t in range(state["completed"] + 1, cfg.iterations + 1):
        seed_everything(cfg.random_seed + t)  # each iteration reproducible on its own: resume == no kill
        kp, kc, omega = schedule(cfg, t)
        started = time.perf_counter()
        if t == 0:  # Phase 1, lines 5-8: top k_p^0 by distance, fine-tune on them only
            pd = torch.zeros(len(train))
            score = l2.clone()
            poison_pos, _ = select(score, kp, 0.0)
            clean_pos = poison_pos[:0]
        else:  # Phase 2, lines 11-19
            pd = prediction_divergence(logits0, predict(model, train, device, amp=cfg.amp), cfg.pd_output)
            _, score = composite_score(l2, pd, omega)
            poison_pos, clean_pos = select(score, kp, kc)
        scoring_s = time.perf_counter() - started
        phase = "phase1" if t == 0 else "phase2"
        fit = run.fit(model, finetune_set(train, poison_pos, adv_label, clean_pos), cfg.train_config(),
                      log=False, phase=f"{phase}_finetune", eval_suite=None, seed=cfg.random_seed + t,
                      desc=f"burn t={t}", step=frozen_bn_step if cfg.bn_eval else None)
        metrics = run.evaluate(model)
        row = {"epoch": t, "iteration": t, "phase": 1 if t == 0 else 2, "k_p": kp, "k_c": kc,
               "omega": omega if t else None, "n_poison": len(poison_pos), "n_clean": len(clean_pos),
               **metrics.row(), **selection_quality(train, poison_pos, clean_pos, adv_label),
               "finetune_s": fit.wall_time_s, "scoring_s": scoring_s}
        timings = state["timings"]
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - started
        run.metrics.append(row)
        state.update(completed=t, model={k: v.detach().cpu().clone() for k, v in model.net.state_dict().items()},
                     rows=list(run.metrics.rows), pd=pd, score=score)
        state["poison_sets"].append(poison_pos)
        state["clean_sets"].append(clean_pos)
        atomic_torch_save(state, state_path)  # the checkpoint first, then the CSV
        run.metrics.save()
        run.logger.info("iteration %d/%d: acc %.2f%% asr %s ra %s | %d poison, %d clean", t, cfg.iterations,
                        100 * metrics.acc, _pct(metrics.asr), _pct(metrics.ra), len(poison_pos), len(clean_pos))

    report = write_report(run.out_dir, train, result, state, cfg)
    run.extra_results["burn"] = {"timings_s": state["timings"], **report}
    run.logger.info("detection: %s", json.dumps({k: v for k, v in report.items() if k != "iterations"}))
    return model


# --------------------------------------------------------------------------- reporting


def per_sample_table(train: ImageSet, result: BoundaryResult, state: dict) -> pd.DataFrame:
    """One row per training sample: distance, adversarial label, BD/PD/S of the last iteration,
    the iterations that selected it, and - when the record knows them - its true flags."""
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
    """AUROC of the distance and of the final score S (poison vs clean), and Table-1-style mean
    distances. ``*_relabelled`` repeat the AUROCs with only the poison the attack relabelled as
    positives (target-class and cross/negative samples, which keep their own label, left out)."""
    flags = train.poison.cpu()
    l2 = result.l2
    out = {"mean_l2_all": float(l2.mean()), "converged_share": float(result.converged.float().mean())}
    if 0 < int(flags.sum()) < len(flags):
        clean_mean, poison_mean = float(l2[~flags].mean()), float(l2[flags].mean())
        out.update({"n_poison": int(flags.sum()), "n_clean": int((~flags).sum()),
                    "auroc_l2": auroc(l2, flags), "auroc_score": auroc(score, flags),
                    "mean_l2_clean": clean_mean, "mean_l2_poison": poison_mean,
                    "l2_ratio_poison_clean": poison_mean / max(clean_mean, 1e-12)})
        relabelled = flags & (train.labels.cpu() != train.original_labels.cpu())
        keep = relabelled | ~flags
        if 0 < int(relabelled.sum()) < int(flags.sum()):
            out.update({"n_poison_relabelled": int(relabelled.sum()),
                        "auroc_l2_relabelled": auroc(l2[keep], relabelled[keep]),
                        "auroc_score_relabelled": auroc(score[keep], relabelled[keep])})
    return out


def write_report(out_dir: Path, train: ImageSet, result: BoundaryResult, state: dict, cfg: BurnConfig) -> dict:
    """``burn_samples.csv``, ``burn_detection.json`` and the plots; returns the summary."""
    table = per_sample_table(train, result, state)
    atomic_write_text(out_dir / "burn_samples.csv", table.to_csv(index=False))
    summary = detection_summary(train, result, state["score"])
    keys = ("iteration", "n_poison", "n_clean", "poison_precision", "poison_recall", "relabel_acc",
            "clean_set_poison_rate", "test_acc", "test_asr", "test_ra")
    summary["iterations"] = [{k: r.get(k) for k in keys} for r in state["rows"]]
    summary["attack_space"] = cfg.attack_space
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
        for name, values in (("boundary L2", l2), ("final score S", state["score"].numpy())):
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
