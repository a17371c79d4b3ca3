"""Where a run's numbers are on disk, for our outputs and BackdoorBench's own (spec §1.8, §3.7, §9.3).

* attack: ``record/<name>/attack_df_summary.csv`` (row ``last``) + ``attack_result.pt``;
* defense: ``record/<name>/defense/<folder>/`` with ``defense_result.pt`` and a summary CSV whose
  name depends on the defense: ``<defense>_df_summary.csv`` (ours, and BackdoorBench's ft/sau/i-bau/
  nad/anp - ANP's is a single data row), FP's ``finetune_df_summary.csv``, FT-SAM's
  ``log/d-sam_df_summary.csv``. Wall time comes from our ``cost.json`` / ``provenance.json`` when present.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..results import read_summary

# BackdoorBench's defenses whose summary is not <name>_df_summary.csv (spec §3.7)
IRREGULAR_SUMMARIES = {
    "fp": ("finetune_df_summary.csv", "prune_log_summary.csv"),
    "ft-sam": ("log/d-sam_df_summary.csv",),
}
METRICS = {"acc": "test_acc", "asr": "test_asr", "ra": "test_ra"}


def record_done(record_dir: Path) -> bool:
    summary = record_dir / "attack_df_summary.csv"
    return (record_dir / "attack_result.pt").is_file() and summary.is_file() and summary_metrics(summary)[1] is None


def find_defense_summary(folder: Path, defense: str) -> Path | None:
    """The summary CSV holding the defended model's final numbers, or None."""
    names = [f"{defense}_df_summary.csv", f"{folder.name}_df_summary.csv", *IRREGULAR_SUMMARIES.get(defense, ())]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    # an unknown defense: accept a single *_df_summary.csv (teacher phases such as NAD's *_te_* excluded)
    found = [p for p in sorted(folder.glob("*_df_summary.csv")) + sorted(folder.glob("log/*_df_summary.csv"))
             if not p.name.endswith("_te_df_summary.csv")]
    return found[0] if len(found) == 1 else None


def defense_done(folder: Path, defense: str) -> bool:
    summary = find_defense_summary(folder, defense)
    return (folder / "defense_result.pt").is_file() and summary is not None and summary_metrics(summary)[1] is None


def summary_metrics(summary: Path) -> tuple[dict[str, float], str | None]:
    """ACC/ASR/RA (fractions) from a summary CSV (NaN where a column is missing or not a number), and
    why the file cannot stand for a finished run - it cannot be read (cut off, empty, not text) or has
    no ACC and ASR numbers - or None. A cell with such a summary is broken, not done."""
    try:
        row = read_summary(summary)
    except (OSError, ValueError, IndexError, KeyError) as err:  # pandas' parse errors are ValueErrors
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:100]
        return {key: math.nan for key in METRICS}, f"{summary.name} cannot be read ({reason})"
    metrics = {key: _number(row.get(column)) for key, column in METRICS.items()}
    if not (math.isfinite(metrics["acc"]) and math.isfinite(metrics["asr"])):
        return metrics, f"{summary.name} has no ACC/ASR numbers"
    return metrics, None


def read_wall_time(folder: Path, *names: str) -> float:
    """The run's wall time from the first of ``names`` (JSON files in ``folder``) that has it, else
    NaN: ``wall_time_s_all_sessions`` for a run resumed after a kill (ours), else ``wall_time_s``."""
    for name in names:
        path = folder / name
        if path.is_file():
            try:
                facts = json.loads(path.read_text())
                return _number(facts.get("wall_time_s_all_sessions", facts.get("wall_time_s")))
            except (ValueError, AttributeError):
                continue
    return math.nan


# BackdoorBench's own FP and ANP choose their model on the test sets (spec §7.2, §7.4)
BACKDOORBENCH_TEST_DECISIONS = {"fp", "anp"}


def read_cell_facts(folder: Path, script: str) -> dict:
    """What a defense cell used, from our ``cost.json``: clean samples and the training-set size they
    are a share of, whether test data decided anything, the budget, the device. Folders without
    ``cost.json`` (BackdoorBench's) get what is known of the script: FP and ANP decide on test data."""
    facts = {"clean_samples": math.nan, "train_set_size": math.nan, "test_data_for_decisions": None,
             "budget": "", "budget_reduced": None, "device": ""}
    path = folder / "cost.json"
    cost = {}
    if path.is_file():
        try:
            cost = json.loads(path.read_text())
        except ValueError:
            cost = {}
    if not isinstance(cost, dict) or not cost:
        facts["test_data_for_decisions"] = True if script in BACKDOORBENCH_TEST_DECISIONS else None
        return facts
    facts.update(clean_samples=_number(cost.get("clean_subset_size")), train_set_size=_number(cost.get("train_set_size")),
                 test_data_for_decisions=cost.get("test_data_for_decisions"), device=str(cost.get("device") or ""))
    budget = cost.get("budget") or {}
    if isinstance(budget, dict) and budget:
        facts["budget"] = ", ".join(f"{k} {_plain(v[0])}" + ("" if v[0] == v[1] else f" (default {_plain(v[1])})")
                                    for k, v in budget.items())
        facts["budget_reduced"] = any(v[0] != v[1] for v in budget.values())
    return facts


def _plain(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _number(value) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


DETECTION_PATTERNS = ("detection/{}_pretrain", "detection_pretrain/{}")  # BackdoorBench's two (spec §13.4)


def detection_folder(record_dir: Path, script: str, name: str) -> Path:
    """A detector's output folder: its own pattern when it is one of ours, else whichever of
    BackdoorBench's two patterns exists (the first when neither does)."""
    from ..detector import get_detector
    from ..errors import BurnError

    try:
        return get_detector(script).output_dir(record_dir, name)
    except BurnError:  # not one of ours (e.g. BackdoorBench's asset or cd)
        found = [record_dir / p.format(name) for p in DETECTION_PATTERNS if (record_dir / p.format(name)).is_dir()]
        return found[0] if found else record_dir / DETECTION_PATTERNS[0].format(name)


def detection_done(record_dir: Path, script: str, name: str) -> bool:
    """Finished when the per-sample scores and their sidecar exist (written last by our detectors)."""
    folder = detection_folder(record_dir, script, name)
    return (folder / "detection_scores.json").is_file() and (folder / "detection_scores.npy").is_file()


# --------------------------------------------------------------------------- the runs' stamps

STAMP_COLUMNS = ("revision", "dirty", "stale", "record_digest", "machine", "cpu_time_s", "stamp_file", "config")


def read_stamp(path: Path) -> dict:
    """What a finished run's ``cost.json`` / ``provenance.json`` says made it, as table columns: the
    code revision (outputs older than the stamp: the short hash they kept, else ``"unknown"``; the
    runs of other tools: ``"unknown"``), uncommitted changes (None: not known), the record's weight
    digest, the machine, CPU seconds and the resolved config (JSON, keys sorted)."""
    facts = {}
    if path.is_file():
        try:
            facts = json.loads(path.read_text())
        except (OSError, ValueError):
            facts = {}
    facts = facts if isinstance(facts, dict) else {}
    stamp = facts.get("stamp") if isinstance(facts.get("stamp"), dict) else {}
    machine = stamp.get("machine") if isinstance(stamp.get("machine"), dict) else {}
    config = stamp.get("config") or {}
    return {"revision": str(stamp.get("revision") or facts.get("git") or "unknown"), "dirty": stamp.get("dirty"),
            "record_digest": str(stamp.get("record_digest") or ""),
            "machine": machine_text(machine) if machine else str(facts.get("device") or ""),
            "cpu_time_s": _number(facts.get("cpu_time_s")),
            "config": json.dumps(config, sort_keys=True, default=str) if config else ""}


def machine_text(machine: dict) -> str:
    """A stamp's machine in one line: CPU model, cores, torch threads, GPU, torch version."""
    return (f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('torch_threads', '?')} torch "
            f"threads, GPU {machine.get('gpu', '?')}, torch {machine.get('torch', '?')}")


def same_code(stamp: dict, table: dict) -> bool:
    """Whether a run was made by the code a table states: the same commit and the same state of
    uncommitted changes. An unknown revision, or an output older than the stamp (its short hash, no
    record of uncommitted changes), is never the same: nothing says exactly what ran."""
    revision = str(stamp.get("revision") or "unknown")
    return (revision != "unknown" and revision == str(table.get("revision")) and stamp.get("dirty") is not None
            and stamp.get("dirty") == table.get("dirty"))
