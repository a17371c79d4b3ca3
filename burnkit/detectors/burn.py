"""``detection_pretrain/burn.py`` and ``burn_s.py``: BURN's poison detector, among the others.

* ``burn`` - the boundary distance ``l(x)`` of every training sample on the frozen infected model θ0
  (BURN's Phase 1 ranking), measured with BURN's own scan (:func:`burnkit.defenses.burn.boundary_scan`),
  or read from a finished BURN run (``--burn_output``) instead of scanning again. Its scan settings
  (``--attack_space``, ``--clip``, ``--overshoot``, ``--max_iter``, ``--candidates``,
  ``--scan_batch_size``) are not restated here: a flag left unset takes the value ``defense/burn.py``
  would use on the same record (its ``config/defense/burn/<dataset>.yaml`` over its defaults), so the
  detector scans exactly as BURN's Phase 1 does. Flags: the top ``flag_share`` (k_p^0 = 0.5 %, the
  share BURN's Phase 1 relabels).
* ``burn_s`` - BURN's score ``S = (1 - ω) BD + ω PD`` after its last Phase-2 iteration, read from a
  finished BURN run's ``burn_samples.csv`` (``--burn_output``, default the record's
  ``defense/burn/``); it needs Phase 2's fine-tuning, so it is never computed here. Flags: the
  samples of the last iteration's D_poison. Its compute is that run's wall time.

Both use no clean data. Folders: ``detection/burn_pretrain/`` and ``detection/burn_s_pretrain/``.

A BURN run is read only if it was made from the weights and training set the record holds now (its
``cost.json`` records its fingerprint), and ``burn`` reading one takes that run's scan settings (so
``detection_scores.json`` says what the distances were measured with); a scan flag given that
contradicts them is refused. The run's folder is locked shared while it is read.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..boundary import SPACES, STEP_RULES
from ..config import load_yaml, merge, option
from ..defenses.burn import SCAN_KEYS
from ..detector import DetectionResult, Detector, DetectorConfig, register_detector
from ..errors import BurnError


BURNS_OWN = "defense/burn.py's"  # a scan setting left unset takes BURN's own default


@dataclass
class BurnDistanceConfig(DetectorConfig):
    burn_output: str | None = option(None, "read the distances from this finished BURN output folder (relative to "
                                           "the record folder, e.g. defense/burn) instead of scanning")
    flag_share: float = option(0.005, "share flagged: the largest distances (k_p^0 of BURN's Phase 1)", above=0, high=1)
    attack_space: str | None = option(None, "space of the distance: input (normalised) or pixel", choices=SPACES,
                                      default_help=BURNS_OWN)
    clip: bool | None = option(None, "clip attack iterates to valid images", default_help=BURNS_OWN)
    overshoot: float | None = option(None, "boundary attack overshoot", low=0, default_help=BURNS_OWN)
    max_iter: int | None = option(None, "boundary attack steps per sample", low=1, default_help=BURNS_OWN)
    candidates: int | None = option(None, "candidate classes of the boundary attack, top by logit; 0 = every class",
                                    low=0, default_help=BURNS_OWN)
    step_rule: str | None = option(None, "where the overshoot acts: total (DeepFool's code) or step (the paper's "
                                         "update)", choices=STEP_RULES, default_help=BURNS_OWN)
    paper_exact: bool | None = option(None, "the paper's boundary attack: every class, its per-step update, no "
                                            "clipping", default_help=BURNS_OWN)
    scan_batch_size: int | None = option(None, "samples per boundary-attack batch", low=1, default_help=BURNS_OWN)


@dataclass
class BurnScoreConfig(DetectorConfig):
    burn_output: str = option("defense/burn", "the finished BURN output folder to read (relative to the record "
                                              "folder, or absolute)")


def burn_folder(record_dir: Path, burn_output: str) -> Path:
    path = Path(burn_output)
    return path if path.is_absolute() else Path(record_dir) / path


def read_burn_samples(folder: Path, expected_index: np.ndarray, column: str) -> pd.DataFrame:
    """``burn_samples.csv`` of a finished BURN run, checked to list the record's training samples in
    the record's order and to hold ``column``."""
    path = folder / "burn_samples.csv"
    if not path.is_file() or not (folder / "defense_result.pt").is_file():
        raise BurnError(f"{folder} holds no finished BURN run (burn_samples.csv and defense_result.pt); run "
                        "defense/burn.py on this record first or point --burn_output at its output folder")
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise BurnError(f"{path} cannot be read as a CSV ({str(err).splitlines()[0][:120]}); run BURN again") from None
    if column not in frame.columns or "index" not in frame.columns:
        raise BurnError(f"{path} has no '{column}' or 'index' column; it was not written by defense/burn.py")
    if len(frame) != len(expected_index) or not np.array_equal(frame["index"].to_numpy(), expected_index):
        raise BurnError(f"{path} lists other samples than this record's training set; it belongs to another record")
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise BurnError(f"{path}: column '{column}' holds values that are not finite numbers")
    return frame


def burn_cost(folder: Path) -> dict:
    """The BURN run's wall time (all sessions) and its scan time, from its cost.json (NaN if absent)."""
    try:
        cost = json.loads((folder / "cost.json").read_text())
    except (OSError, ValueError):
        return {"wall_time_s": math.nan, "scan_s": math.nan}
    timings = (cost.get("burn") or {}).get("timings_s") or {}
    scan = timings.get("scan")
    return {"wall_time_s": float(cost.get("wall_time_s_all_sessions", cost.get("wall_time_s", math.nan))),
            "scan_s": float(scan) if isinstance(scan, (int, float)) else math.nan}


def burn_scan_config(cfg: BurnDistanceConfig, dataset: str):
    """The :class:`~burnkit.defenses.burn.BurnConfig` ``defense/burn.py`` would run with on a record of
    ``dataset`` (its YAML for the dataset over its defaults), with this detector's scan flags that were
    given on top."""
    from ..defenses.burn import Burn, BurnConfig

    path = Burn.default_yaml({"dataset": dataset})
    given = {k: getattr(cfg, k) for k in SCAN_KEYS if getattr(cfg, k) is not None}
    burn_cfg, _ = merge(BurnConfig, load_yaml(path) if path else {}, given, yaml_source=str(path))
    burn_cfg.progress = cfg.progress
    return burn_cfg


def burn_fingerprint(folder: Path, fingerprint: dict) -> dict:
    """The fingerprint of the BURN run in ``folder`` (its settings and the digests of what it read,
    from its ``cost.json``), checked to be of the weights and training set this run reads."""
    try:
        made = json.loads((folder / "cost.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        made = None
    if not isinstance(made, dict) or not isinstance(made.get("data"), dict):
        raise BurnError(f"{folder}/cost.json does not record what the BURN run was made from (an older burnkit wrote "
                        "it); run defense/burn.py on this record again with --overwrite true")
    for key, what in (("weights", "model weights"), ("bd_train", "poisoned training set")):
        if made["data"].get(key) != fingerprint["data"][key]:
            raise BurnError(f"the BURN run {folder} was made from other {what} than the record holds now (the record "
                            "was replaced after it ran); run defense/burn.py on this record again with --overwrite "
                            "true, or point --burn_output at a run of this record")
    return made


def top_share(values: np.ndarray, share: float) -> np.ndarray:
    flags = np.zeros(len(values), dtype=bool)
    k = min(len(values), max(1, int(round(share * len(values)))))
    flags[np.argsort(-values, kind="stable")[:k]] = True
    return flags


@register_detector
class BurnDistance(Detector):
    """BURN's detector: the minimal-L2 boundary distance on the infected model (no clean data)."""

    name = "burn"
    config_cls = BurnDistanceConfig
    header = ("AUC", "target")

    def reads(self, cfg, record):
        return [burn_folder(record.record_dir, cfg.burn_output)] if cfg.burn_output else []

    def preflight(self, cfg, record, model):
        if cfg.burn_output:
            read_burn_samples(burn_folder(record.record_dir, cfg.burn_output), record.bd_train.original_index,
                              "boundary_l2")
        else:
            burn_scan_config(cfg, record.clean_data)

    def check_reads(self, cfg, record, fingerprint):
        """A run read must be of this record's weights and data; its scan settings become this run's
        (what detection_scores.json records), and a scan flag given with other values is refused."""
        if not cfg.burn_output:
            return
        folder = burn_folder(record.record_dir, cfg.burn_output)
        made = burn_fingerprint(folder, fingerprint)
        contradicted = [k for k in SCAN_KEYS if getattr(cfg, k) is not None and getattr(cfg, k) != made.get(k)]
        if contradicted:
            asked = ", ".join(f"--{k} {getattr(cfg, k)}" for k in contradicted)
            used = ", ".join(f"--{k} {made[k]}" for k in contradicted)
            raise BurnError(f"the BURN run {folder} measured its distances with {used}, not {asked}; drop those flags "
                            "to read its distances, or drop --burn_output to scan with them")
        for key in SCAN_KEYS:
            if key in made:
                setattr(cfg, key, made[key])

    def detect(self, model, data, cfg, run):
        if cfg.burn_output:
            folder = burn_folder(data.record.record_dir, cfg.burn_output)
            frame = read_burn_samples(folder, data.inspected.index.numpy(), "boundary_l2")
            l2 = frame["boundary_l2"].to_numpy(dtype=np.float64)
            cost = burn_cost(folder)
            run.extra_cost.update({"reused_compute_s": cost["scan_s"] if math.isfinite(cost["scan_s"]) else 0.0,
                                   "reused_from": str(folder)})
            notes = {"source": f"boundary_l2 of {folder / 'burn_samples.csv'}", "scan_s_of_that_run": cost["scan_s"]}
        else:
            from ..defenses.burn import boundary_scan

            scan_cfg = burn_scan_config(cfg, data.record.clean_data)
            with run.timed("boundary_scan"):
                result = boundary_scan(model, data.inspected, scan_cfg, run.device)
            l2 = result.l2.double().numpy()
            notes = {"source": "boundary scan of θ0", "converged_share": int(result.converged.sum()) / len(result.converged),
                     "scan_settings": {**{k: getattr(scan_cfg, k) for k in SCAN_KEYS}, **scan_cfg.scan_settings()}}
        flags = top_share(l2, cfg.flag_share)
        return DetectionResult(l2, flags, threshold=float(l2[flags].min()), target="None", notes={
            **notes, "score": "minimal L2 distance to the decision boundary",
            "rule": f"the {cfg.flag_share} share with the largest distance"})


@register_detector
class BurnScore(Detector):
    """BURN's final score S after Phase 2, read from a finished BURN run (no clean data)."""

    name = "burn_s"
    config_cls = BurnScoreConfig
    header = ("AUC", "target")

    def reads(self, cfg, record):
        return [burn_folder(record.record_dir, cfg.burn_output)]

    def preflight(self, cfg, record, model):
        read_burn_samples(burn_folder(record.record_dir, cfg.burn_output), record.bd_train.original_index, "S")

    def check_reads(self, cfg, record, fingerprint):
        burn_fingerprint(burn_folder(record.record_dir, cfg.burn_output), fingerprint)

    def detect(self, model, data, cfg, run):
        folder = burn_folder(data.record.record_dir, cfg.burn_output)
        frame = read_burn_samples(folder, data.inspected.index.numpy(), "S")
        score = frame["S"].to_numpy(dtype=np.float64)
        iters = frame.get("selected_poison_iters", pd.Series([""] * len(frame)))
        # "0;3;7" per sample; a column holding single numbers only (a run stopped after Phase 1) reads as floats
        selected = [set() if pd.isna(v) else {int(float(t)) for t in str(v).split(";") if t} for v in iters]
        last = max((t for s in selected for t in s), default=None)
        flags = np.array([last in s for s in selected]) if last is not None else np.zeros(len(frame), bool)
        cost = burn_cost(folder)
        run.extra_cost.update({"reused_compute_s": cost["wall_time_s"] if math.isfinite(cost["wall_time_s"]) else 0.0,
                               "reused_from": str(folder)})
        return DetectionResult(score, flags, target="None", notes={
            "source": f"S of {folder / 'burn_samples.csv'}", "last_iteration": last,
            "score": "S = (1 - ω) BD + ω PD after the last iteration",
            "rule": "the samples of the last iteration's D_poison", "burn_wall_time_s": cost["wall_time_s"]})
