"""The detection table of an experiment: every detector's per-sample scores on every record, measured with
one metric code (:mod:`burnkit.detection_metrics`), and one ROC overlay per record.

The scores come from each detection folder's ``detection_scores.npy`` (ours; BackdoorBench's detectors
write none, so their rows stay empty); the truth comes from the record itself (``bd_train``'s poison
indicator, read without the images), never from the detector's own files. Compute is the detector's own
time (``compute_s`` of its sidecar: the detection without loading the record, plus the run it reads,
for BURN's final score), clean samples the number it says it used.

Every row names the variant its detector ran (a ``Variant`` column, from the sidecar's config): SCAn,
SPECTRE and Beatrix as BackdoorBench runs them or as the paper writes them (``--variant``), STRIP's
blend, Spectral's projection; "–" for a method with one form.

Files: ``detection_cells.csv`` (one row per detection cell), ``detection_summary.csv`` (mean and
sample std over seeds), ``plots/roc_<record>.png``; the Markdown/HTML sections are returned to the
report writer.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..detection_metrics import auroc, ranking_metrics
from ..detector import SCORES_JSON, SCORES_NPY, plot_roc
from ..errors import BurnError
from ..records import read_attack_record
from ..results import atomic_write_text, portable_path
from .collect import cell_stamp, common_value
from .experiment import Experiment
from .outputs import detection_folder
from .report import fmt, markdown_table

VALUES = ("auroc", "tpr_at_1fpr", "tpr_at_5fpr", "precision_at_poison_rate", "auroc_relabelled", "compute_s",
          "clean_samples_used")
COLUMNS = {"auroc": "AUROC", "tpr_at_1fpr": "TPR@1%FPR", "tpr_at_5fpr": "TPR@5%FPR",
           "precision_at_poison_rate": "Precision@poison rate", "auroc_relabelled": "AUROC (relabelled)"}
BURN_ROWS = ("burn", "burn_s")  # scripts whose rows are BURN's
# config keys that choose between a detector's BackdoorBench form and another, the detectors whose key it
# is, and how a row names them. The owner matters: BURN's scan has a `clip` setting too, and that is not a
# form of the method (an old STRIP sidecar's `clip` was its blend).
VARIANT_LABELS = {"variant": (("scan", "spectre", "beatrix"), {"backdoorbench": "BackdoorBench", "paper": "paper"}),
                  "blend": (("strip",), {"backdoorbench": "BackdoorBench (normalised-tensor blend)",
                                         "saturating": "authors' saturating blend"}),
                  "clip": (("strip",), {True: "authors' saturating blend", False: "unclipped pixel sum (neither form)"}),
                  "centered": (("spectral",), {False: "BackdoorBench (uncentred)", True: "paper (centred)"})}
# detectors whose sidecars written before --variant existed ran the paper's form
PAPER_BEFORE_VARIANT = ("scan", "spectre", "beatrix")


def variant_label(config: dict, method: str | None = None) -> str:
    """The variant a detection ran, from its sidecar's config and method ("" for a method with one
    form). Sidecars older than the flag still get a label: STRIP's ``clip`` was its blend, and SCAn,
    SPECTRE and Beatrix then always ran the paper's form."""
    for key, (owners, labels) in VARIANT_LABELS.items():
        if key in config and (method is None or method in owners):
            return labels.get(config[key], f"{key} {config[key]}")
    if method in PAPER_BEFORE_VARIANT:
        return "paper (made before --variant)"
    return ""


@dataclass
class DetectionReport:
    cells: pd.DataFrame
    summary: pd.DataFrame
    plots: list[Path] = field(default_factory=list)
    markdown: str = ""
    html: str = ""


def record_truth(record_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``bd_train``'s poison flags in sample order, from the record (no images read), and which of
    them carry a label other than their original one (the relabelled poison: cross/negative samples of
    the on-the-fly attacks and poison drawn from the target class keep their label)."""
    record = read_attack_record(record_dir)
    state = record.bd_train
    if state is None:
        raise BurnError(f"record {record_dir} has no bd_train")
    truth = state.poison_indicator[state.original_index] == 1
    relabelled = np.array([bool(flag) and state.entries[int(i)].bd_label != state.entries[int(i)].original_label
                           for i, flag in zip(state.original_index, truth)], dtype=bool)
    return truth, relabelled


def collect_detection(exp: Experiment, revision: dict) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """One row per detection cell (NaN where outputs are missing), with its stamp and whether it is stale
    against ``revision`` (as :func:`~burnkit.compare.collect.collect`), and, per record, the score vectors."""
    rows, curves, truths = [], {}, {}
    for cell in exp.detection_cells:
        rec = cell.source
        record_dir = exp.workdir / "record" / rec.record
        folder = detection_folder(record_dir, cell.script, cell.detector)
        row = {"dataset": rec.dataset, "model": rec.model, "attack": rec.attack, "detector": cell.detector,
               "script": cell.script, "seed": rec.seed, "record": rec.record,
               "folder": portable_path(str(folder), exp.workdir),
               "status": "missing", "variant": "", **{k: math.nan for k in VALUES}, "flagged": math.nan,
               "TP": math.nan, "n_samples": math.nan, "n_poison": math.nan}
        if cell.is_done(exp.workdir):
            try:
                if rec.record not in truths:
                    truths[rec.record] = record_truth(record_dir)
                truth, relabelled = truths[rec.record]
                scores = np.load(folder / SCORES_NPY, allow_pickle=False)
                facts = json.loads((folder / SCORES_JSON).read_text())
                if scores.shape != truth.shape:
                    raise BurnError(f"{folder}: {len(scores)} scores for {len(truth)} samples")
            except (BurnError, OSError, ValueError) as err:
                row["status"] = f"unreadable: {str(err).splitlines()[0][:120]}"
            else:
                keep = relabelled | ~truth
                row.update(ranking_metrics(scores, truth), status="done", n_samples=len(truth),
                           auroc_relabelled=auroc(scores[keep], relabelled[keep]),
                           n_poison=int(truth.sum()), compute_s=_number(facts.get("compute_s")),
                           clean_samples_used=_number(facts.get("clean_samples_used")),
                           flagged=_number(facts.get("flagged")), TP=_number(facts.get("TP")),
                           variant=variant_label(facts.get("config") or {}, facts.get("method")))
                curves.setdefault(rec.record, {})[cell.detector] = (scores, truth)
        row.update(cell_stamp(exp, cell, row["status"] == "done", revision))
        rows.append(row)
    return pd.DataFrame(rows), curves


def aggregate_detection(cells: pd.DataFrame, exp: Experiment) -> pd.DataFrame:
    """Mean and sample std (ddof=1) over seeds per (dataset, model, attack, detector)."""
    keys = ["dataset", "model", "attack", "detector"]
    out = []
    for key, group in cells.groupby(keys, sort=False):
        have = group[group["status"] == "done"]
        variants = [v for v in have["variant"].fillna("").astype(str) if v] if "variant" in have else []
        row = dict(zip(keys, key), variant=" / ".join(dict.fromkeys(variants)), n=len(have), seeds=len(group),
                   revision=common_value(have["revision"]), stale=int(have["stale"].astype(bool).sum()))
        for value in (*VALUES, "flagged", "TP"):
            series = have[value].astype(float)
            row[f"{value}_mean"] = series.mean() if len(series) else math.nan
            row[f"{value}_std"] = series.std(ddof=1) if len(series) > 1 else math.nan
        out.append(row)
    frame = pd.DataFrame(out)
    if frame.empty:
        return frame
    order = {name: i for i, name in enumerate(exp.detectors)}
    attacks = {name: i for i, name in enumerate(exp.attacks)}
    frame = frame.assign(_a=frame["attack"].map(attacks), _d=frame["detector"].map(order))
    return frame.sort_values(["dataset", "model", "_a", "_d"], kind="stable").drop(columns=["_a", "_d"]).reset_index(drop=True)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def detection_tables(summary: pd.DataFrame, exp: Experiment) -> list[tuple[str, pd.DataFrame, list[str]]]:
    """Per (dataset, model, attack): rows = detectors; plus notes comparing BURN's rows with the best."""
    out = []
    if summary.empty:
        return out
    scripts = dict(exp.detectors)
    for (dataset, model, attack), block in summary.groupby(["dataset", "model", "attack"], sort=False):
        rows = {}
        for r in block.itertuples():
            rows[r.detector] = {
                "Variant": getattr(r, "variant", "") or "–",
                **{label: fmt(getattr(r, f"{k}_mean"), getattr(r, f"{k}_std"), scale=1.0, digits=3)
                   for k, label in COLUMNS.items()},
                "Flagged (TP)": "–" if math.isnan(r.flagged_mean) else
                f"{r.flagged_mean:.0f} ({r.TP_mean:.0f})",
                "Compute (s)": fmt(r.compute_s_mean, r.compute_s_std, scale=1.0, digits=1),
                "Clean samples": fmt(r.clean_samples_used_mean, None, scale=1.0, digits=0),
                "Seeds": f"{r.n}/{r.seeds}"}
        table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("Detector")
        n = int(block["n"].max())
        title = f"{attack} ({dataset} · {model}, {n} seed{'s' if n != 1 else ''})"
        out.append((title, table, burn_notes(block, scripts)))
    return out


def auroc_matrix(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per (dataset, model) with two or more attacks: AUROC of every detector on every attack, its mean
    rank over the attacks (1 = the best AUROC on that attack; ties share the better rank) and the attacks
    it wins. This answers what a defender needs who does not know the attack: which detector is good
    everywhere, not only on one record. Rows are sorted by mean rank; a detector without a result on
    some attack is ranked over the attacks it has."""
    out = []
    if summary.empty:
        return out
    for (dataset, model), block in summary.groupby(["dataset", "model"], sort=False):
        attacks = list(dict.fromkeys(block["attack"]))
        if len(attacks) < 2:
            continue
        means = block.pivot_table(index="detector", columns="attack", values="auroc_mean", sort=False, dropna=False)
        means = means.reindex(index=list(dict.fromkeys(block["detector"])), columns=attacks)
        stds = block.pivot_table(index="detector", columns="attack", values="auroc_std", sort=False, dropna=False)
        stds = stds.reindex(index=means.index, columns=attacks)
        ranks = means.rank(axis=0, ascending=False, method="min")
        table = pd.DataFrame({attack: [fmt(means.at[d, attack], stds.at[d, attack], scale=1.0, digits=3)
                                       for d in means.index] for attack in attacks}, index=means.index)
        if "variant" in block:
            named = block.dropna(subset=["variant"]).groupby("detector", sort=False)["variant"]
            variants = named.agg(lambda v: " / ".join(dict.fromkeys(x for x in v if x)))
            table.insert(0, "Variant", [variants.get(d, "") or "–" for d in means.index])
        table["Mean AUROC"] = [fmt(v, None, scale=1.0, digits=3) for v in means.mean(axis=1, skipna=True)]
        mean_rank = ranks.mean(axis=1, skipna=True)
        table["Mean rank"] = [fmt(v, None, scale=1.0, digits=1) for v in mean_rank]
        table["Best on"] = [", ".join(a for a in attacks if ranks.at[d, a] == 1) or "–" for d in means.index]
        order = sorted(range(len(means.index)), key=lambda i: (math.isnan(mean_rank.iloc[i]), mean_rank.iloc[i], i))
        table = table.iloc[order].rename_axis("Detector")
        out.append((f"AUROC on every attack ({dataset} · {model})", table))
    return out


def burn_notes(block: pd.DataFrame, scripts: dict[str, str]) -> list[str]:
    """Where BURN's rows stand: the best detector by mean AUROC, and each BURN row against the best
    of the other detectors (AUROC, TPR@5%FPR, precision at the poison rate: the winner and the gap)."""
    done = block.dropna(subset=["auroc_mean"])
    if done.empty:
        return []
    best = done.loc[done["auroc_mean"].idxmax()]
    notes = [f"Best AUROC: {best.detector} {best.auroc_mean:.3f}."]
    others = done[~done["detector"].map(lambda d: scripts.get(d) in BURN_ROWS)]
    for r in done.itertuples():
        if scripts.get(r.detector) not in BURN_ROWS:
            continue
        rank = int((done["auroc_mean"] > r.auroc_mean).sum()) + 1
        parts = [f"{r.detector}: AUROC {r.auroc_mean:.3f}, rank {rank} of {len(done)}"]
        for key, label in (("auroc", "AUROC"), ("tpr_at_5fpr", "TPR@5%FPR"), ("precision_at_poison_rate", "precision")):
            column = others[f"{key}_mean"].dropna()
            if column.empty:
                continue
            top = others.loc[column.idxmax()]
            gap = getattr(r, f"{key}_mean") - top[f"{key}_mean"]
            parts.append(f"{label} {'+' if gap >= 0 else '-'}{abs(gap):.3f} against the best other detector "
                         f"({top.detector} {top[f'{key}_mean']:.3f})")
        notes.append("; ".join(parts) + ".")
    return notes


def write_detection(exp: Experiment, out: Path, revision: dict) -> DetectionReport:
    """Collect, aggregate, write the CSVs and ROC overlays; return the report's sections."""
    cells, curves = collect_detection(exp, revision)
    summary = aggregate_detection(cells, exp) if len(cells) else pd.DataFrame()
    report = DetectionReport(cells, summary)
    if cells.empty:
        return report
    atomic_write_text(out / "detection_cells.csv", cells.to_csv(index=False))
    atomic_write_text(out / "detection_summary.csv", summary.to_csv(index=False))
    for record, by_detector in curves.items():
        truth = next(iter(by_detector.values()))[1]
        path = out / "plots" / f"roc_{record}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if plot_roc(path, {k: v[0] for k, v in by_detector.items()}, truth, f"poison detection: {record}"):
            report.plots.append(path)
    tables = detection_tables(summary, exp)
    intro = ("Every detector scores each sample of the record's poisoned training set (higher = more suspicious); "
             "AUROC, TPR at 1 %/5 % FPR and precision at the poison rate (the top #poisoned scores flagged) are "
             "computed here from those scores and the record's poison flags (BackdoorBench's poison indicator), the "
             "same way for all; AUROC (relabelled): only the poison whose label the attack changed counts as positive "
             "(cross/negative samples and target-class poison left out). Flagged (TP): "
             "the method's own decisions. Compute: the detection's own seconds (BURN's final score: its whole run). "
             "BURN's final score S (burn_s) is the ranking after BURN fine-tuned on its own earlier selections: where "
             "the algorithm ended, not a one-pass detection (BURN's one-pass detector is its θ0 distance, burn). "
             "Clean samples: clean training images the method used. Variant: the form of the method that ran - "
             "BackdoorBench's code, or the paper's formulas where they differ (docs/detection.md, per method).")
    md = ["## Poison detection", "", intro, ""]
    body = [f"<h2>Poison detection</h2><p>{html.escape(intro)}</p>"]
    for title, table in auroc_matrix(summary):
        md += [f"**{title}**", "", markdown_table(table), ""]
        body.append(f"<h3>{html.escape(title)}</h3>")
        body.append(table.reset_index().to_html(escape=True, border=0, classes="grid", index=False))
    for title, table, notes in tables:
        md += [f"**{title}**", "", markdown_table(table), ""] + [f"{n}  " for n in notes] + [""]
        body.append(f"<h3>{html.escape(title)}</h3>")
        body.append(table.reset_index().to_html(escape=True, border=0, classes="grid", index=False))
        body += [f"<p>{html.escape(n)}</p>" for n in notes]
    if report.plots:
        md += [f"![{p.stem}](plots/{p.name})" for p in report.plots] + [""]
        body.append("<div class='plots'>" + "".join(f"<img src='plots/{html.escape(p.name)}' alt='{html.escape(p.stem)}'>"
                                                   for p in report.plots) + "</div>")
    missing = cells[cells["status"] != "done"]
    if len(missing):
        line = "Detections without results: " + ", ".join(f"{r.record}/{r.detector} ({r.status})"
                                                          for r in missing.itertuples()) + "."
        md += [line, ""]
        body.append(f"<p>{html.escape(line)}</p>")
    report.markdown = "\n".join(md) + "\n"
    report.html = "\n".join(body)
    return report

