"""Numbers per cell and per (attack, defense) over seeds, read from BackdoorBench-format outputs.

``cells`` has one row per record ("No defense", the attacked model: the record's
``attack_df_summary.csv``) and one per defense cell, with ACC/ASR/RA as fractions, DER against the
same record (``burnkit.metrics.defense_effectiveness_rate``, BackdoorBench's simplified form, spec §4)
and the wall time; then each run's stamp (:func:`~burnkit.compare.outputs.read_stamp`: revision, machine,
CPU seconds, config) and whether it is *stale* - made by other code than the report states
(:func:`~burnkit.compare.outputs.same_code`). Paths are relative to the work dir, so the report reads the
same on every machine. ``aggregate`` gives mean and sample standard deviation (ddof=1) over seeds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ..metrics import defense_effectiveness_rate
from ..results import portable_path
from .experiment import Experiment
from .outputs import (STAMP_COLUMNS, find_defense_summary, read_cell_facts, read_stamp, read_wall_time, same_code,
                      summary_metrics)

NO_DEFENSE = "No defense"
VALUES = ("acc", "asr", "ra", "der", "wall_time_s")
KEYS = ("dataset", "model", "attack", "defense")
# per-cell facts reported next to the numbers (the same for every seed of a cell, or "mixed")
FACTS = ("clean_samples", "train_set_size", "clean_share", "test_data_for_decisions", "budget", "budget_reduced",
         "device")
COLUMNS = ["dataset", "model", "attack", "defense", "seed", "record", "status", "acc", "asr", "ra", "der",
           "wall_time_s", *FACTS, "reused", "summary_csv", *STAMP_COLUMNS]


def collect(exp: Experiment, revision: dict) -> pd.DataFrame:
    """One row per record and per defense cell of the experiment, missing outputs included (NaN);
    ``revision`` (:func:`~burnkit.results.code_revision`) is the code the report states, against which
    each run is current or stale."""
    state = _state_cells(exp.output / "state.json")
    rows = []
    baseline = {}
    for rec in exp.records:
        folder = exp.workdir / "record" / rec.record
        summary = folder / "attack_df_summary.csv"
        have = summary.is_file() and (folder / "attack_result.pt").is_file()
        metrics, problem = summary_metrics(summary) if have else (_empty(), None)
        metrics = _empty() if problem else metrics
        baseline[rec.record] = metrics
        wall = read_wall_time(folder, "provenance.json")
        row = _row(rec, NO_DEFENSE, rec.record, metrics, math.nan, _wall(wall, state, rec.cell_id),
                   summary if have else None, state, rec.cell_id, exp.workdir, problem)
        row.update(dict.fromkeys(FACTS, None), device=_device(folder / "provenance.json"))
        row.update(cell_stamp(exp, rec, row["status"] == "done", revision))
        rows.append(row)
    for cell in exp.defense_cells:
        folder = exp.workdir / "record" / cell.record / "defense" / cell.folder
        summary = find_defense_summary(folder, cell.script) if (folder / "defense_result.pt").is_file() else None
        metrics, problem = summary_metrics(summary) if summary else (_empty(), None)
        metrics = _empty() if problem else metrics
        base = baseline[cell.record]
        der = math.nan
        if not any(math.isnan(v) for v in (base["acc"], base["asr"], metrics["acc"], metrics["asr"])):
            der = defense_effectiveness_rate(base["acc"], base["asr"], metrics["acc"], metrics["asr"])
        wall = read_wall_time(folder, "cost.json")
        row = _row(cell.source, cell.defense, f"{cell.record}/defense/{cell.folder}", metrics, der,
                   _wall(wall, state, cell.cell_id), summary, state, cell.cell_id, exp.workdir, problem)
        facts = read_cell_facts(folder, cell.script) if summary and not problem else dict.fromkeys(FACTS, None)
        clean, train = facts.get("clean_samples"), facts.get("train_set_size")
        facts["clean_share"] = clean / train if clean is not None and train and not math.isnan(train) else math.nan
        row.update(facts)
        row.update(cell_stamp(exp, cell, row["status"] == "done", revision))
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def aggregate(cells: pd.DataFrame, exp: Experiment) -> pd.DataFrame:
    """Mean and sample std over seeds per (dataset, model, attack, defense); ``n`` = seeds with numbers."""
    rows = []
    for key, group in cells.groupby(list(KEYS), sort=False):
        row = dict(zip(KEYS, key))
        have = group.dropna(subset=["acc"])
        row["n"] = len(have)
        row["seeds"] = len(group)
        for value in VALUES:
            series = have[value].astype(float)
            row[f"{value}_mean"] = series.mean() if len(series) else math.nan
            row[f"{value}_std"] = series.std(ddof=1) if len(series) > 1 else math.nan
        for fact in FACTS:
            row[fact] = common_value(have[fact]) if fact in have else None
        row["revision"] = common_value(have["revision"])
        row["stale"] = int(have["stale"].astype(bool).sum())  # seeds with numbers made by other code
        rows.append(row)
    out = pd.DataFrame(rows)
    order = {name: i for i, name in enumerate([NO_DEFENSE, *exp.defenses])}
    attacks = {name: i for i, name in enumerate(exp.attacks)}
    out = out.assign(_a=out["attack"].map(attacks), _d=out["defense"].map(order))
    out = out.sort_values(["dataset", "model", "_a", "_d"], kind="stable")
    return out.drop(columns=["_a", "_d"]).reset_index(drop=True)


def _row(rec, defense, path, metrics, der, wall, summary, state, cell_id, workdir: Path, problem=None) -> dict:
    """A table row; ``problem`` says why an existing summary cannot be used (the cell is broken)."""
    status = "done" if summary is not None else state.get(cell_id, {}).get("status", "missing")
    if summary is None:
        status, wall = ("missing" if status == "done" else status), math.nan
    if problem:
        status, wall = f"broken: {problem}", math.nan
    # outputs compare did not see finish (made by hand, by another tool, or before a kill): their
    # settings are whatever made them, so the report lists them
    reused = summary is not None and not problem and not state.get(cell_id, {}).get("finished_at")
    return {"dataset": rec.dataset, "model": rec.model, "attack": rec.attack, "defense": defense, "seed": rec.seed,
            "record": path, "status": status, **metrics, "der": der, "wall_time_s": wall, "reused": reused,
            "summary_csv": portable_path(str(summary), workdir) if summary else ""}


def cell_stamp(exp: Experiment, cell, done: bool, table: dict) -> dict:
    """A cell's stamp columns (empty for a cell without results) and whether it is stale."""
    if not done:
        return {**dict.fromkeys(STAMP_COLUMNS, ""), "dirty": None, "stale": False, "cpu_time_s": math.nan}
    path = cell.output_dir(exp.workdir) / cell.stamp_name
    stamp = read_stamp(path)
    stamp.update(stale=not same_code(stamp, table),
                 stamp_file=portable_path(str(path), exp.workdir) if path.is_file() else "")
    return {key: stamp[key] for key in STAMP_COLUMNS}


def common_value(series: pd.Series):
    """The one value every seed shares (None if none has it), else "mixed"."""
    values = {v for v in series.tolist() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    if not values:
        return None
    return values.pop() if len(values) == 1 else "mixed"


def _device(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("device") or "") if path.is_file() else ""
    except (ValueError, AttributeError):
        return ""


def _wall(from_files: float, state: dict, cell_id: str) -> float:
    """The script's own wall time; compare's measurement of the subprocess when the script has none."""
    if not math.isnan(from_files):
        return from_files
    measured = state.get(cell_id, {}).get("wall_time_s")
    return float(measured) if measured is not None else math.nan


def _state_cells(path: Path) -> dict:
    try:
        return json.loads(path.read_text()).get("cells", {}) if path.is_file() else {}
    except ValueError:
        return {}


def _empty() -> dict:
    return {"acc": math.nan, "asr": math.nan, "ra": math.nan}
