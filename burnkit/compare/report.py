"""Write the comparison: ``cells.csv``, ``summary.csv``, ``leaderboard.md``, ``index.html`` and plots.

CSV files keep fractions at full precision (machine-readable); the Markdown and HTML tables show
percentages with two decimals, ``mean ± std`` when more than one seed has numbers, and ``–`` for a
cell without outputs. Next to the numbers, per attack, a leaderboard (rows ranked by DER) says what
each defense used: clean data (samples and share of the attacked model's training set), whether test
data decided anything (``†``, also marked in the ACC/ASR/RA matrix), its budget (and BackdoorBench's
default where it ran with less), compute seconds and device. ``index.html`` is one static file (plots
are relative ``plots/*.png``), so it opens from disk without a server. Plots: per attack a radar like the BURN paper's Fig. 4 (axes = defenses; ACC and
ASR; solid = defended, dashed = the undefended model) and per (dataset, model) a DER bar chart.

The report states the code revision it was made with (``report.json``: revision, uncommitted
changes, the command, the machines); a cell made by other code is *stale* (``‡`` in the tables, listed
in the footer). ``cells/`` holds a copy of every finished cell's stamp file, summary and per-epoch CSV
under its path in the work dir, so the report folder is a self-contained artifact
(``experiments/results/<name>/``, read by ``burn-compare publish``).
"""
from __future__ import annotations

import html
import math
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..fileio import atomic_write_bytes
from ..results import atomic_write_text, code_revision, portable_path, write_json
from .collect import NO_DEFENSE, aggregate, collect
from .experiment import Experiment

REPORT_JSON = "report.json"
CELL_FILES = "cells"  # the copies of the cells' own files


def write_report(exp: Experiment, command: str = "", wall_time_s: float | None = None) -> dict[str, Path]:
    """Collect the experiment's outputs and write every report file; returns their paths."""
    out = exp.output
    out.mkdir(parents=True, exist_ok=True)
    # paths in the checkout relative to it, in the work dir relative to the work dir: the report is
    # committed as an artifact and must read the same on every machine
    command = shlex.join(portable_path(t, exp.workdir) for t in shlex.split(command)) if command else ""
    revision = code_revision()
    cells = collect(exp, revision)
    summary = aggregate(cells, exp)
    paths = {"cells": out / "cells.csv", "summary": out / "summary.csv", "markdown": out / "leaderboard.md",
             "html": out / "index.html"}
    atomic_write_text(paths["cells"], cells.to_csv(index=False))
    atomic_write_text(paths["summary"], summary.to_csv(index=False))
    plots = write_plots(summary, exp, out / "plots")
    from .detection import write_detection  # imported here: it uses this module's table writer

    detection = write_detection(exp, out, revision)
    footer = _footer(exp, cells, command, wall_time_s, revision, detection.cells)
    atomic_write_text(paths["markdown"], markdown(summary, exp, plots, footer, detection.markdown))
    atomic_write_text(paths["html"], html_page(summary, exp, plots, footer, detection.html))
    paths.update({f"plot:{p.stem}": p for group in plots.values() for p in group})
    paths.update({f"plot:{p.stem}": p for p in detection.plots})
    if not detection.cells.empty:
        paths.update({"detection_cells": out / "detection_cells.csv", "detection_summary": out / "detection_summary.csv"})
    copy_cell_files(exp, cells, detection.cells, out / CELL_FILES)
    paths["report"] = out / REPORT_JSON
    write_json(paths["report"], report_facts(exp, command, revision, cells, detection.cells))
    return paths


def report_facts(exp: Experiment, command: str, revision: dict, cells: pd.DataFrame, detection: pd.DataFrame) -> dict:
    """``report.json``: what made the report - the experiment file and command, the code revision the
    report states, the cells (done, stale) and the machines their runs used."""
    rows = pd.concat([cells, detection], ignore_index=True) if not detection.empty else cells
    done = rows[rows["status"] == "done"]
    return {"name": exp.name, "experiment": portable_path(str(exp.path.resolve()), exp.workdir),
            "command": command,
            "revision": revision["revision"], "dirty": revision["dirty"],
            "cells": {"total": len(rows), "done": len(done), "stale": int(done["stale"].astype(bool).sum())},
            "machines": sorted({m for m in done["machine"] if isinstance(m, str) and m})}


def copy_cell_files(exp: Experiment, cells: pd.DataFrame, detection: pd.DataFrame, folder: Path) -> None:
    """Copy every finished cell's stamp file, summary CSV and per-epoch CSV (detections: ``cost.json``,
    ``detection_scores.json``, ``detection_info.csv``) to ``folder``, under their paths in the work dir;
    the copies of an earlier report are replaced."""
    names = set()
    for r in cells[cells["status"] == "done"].itertuples():
        names.update(n for n in (r.stamp_file, r.summary_csv) if n)
        if r.summary_csv.endswith("_summary.csv"):
            names.add(r.summary_csv[: -len("_summary.csv")] + ".csv")
    if not detection.empty:
        for r in detection[detection["status"] == "done"].itertuples():
            names.update(f"{r.folder}/{n}" for n in ("cost.json", "detection_scores.json", "detection_info.csv"))
    shutil.rmtree(folder, ignore_errors=True)
    for name in sorted(names):
        source = exp.workdir / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder / name, source.read_bytes())


# --------------------------------------------------------------------------- tables


def fmt(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    if std is not None and not math.isnan(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


TEST_MARK = "†"
STALE_MARK = "‡"  # made by other code than the report's revision


def _truthy(value) -> bool:
    return value is True or value == "mixed"


def _text(value) -> str:
    """A fact as text; "" for a missing one (None or NaN after pandas)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def clean_data_text(row) -> str:
    samples, train, share = row.clean_samples, row.train_set_size, row.clean_share
    if samples is None or (isinstance(samples, float) and math.isnan(samples)):
        return "–" if row.defense == NO_DEFENSE else "?"
    if samples == "mixed":
        return "mixed"
    if samples == 0:
        return "none"
    if share is None or share == "mixed" or (isinstance(share, float) and math.isnan(share)):
        return f"{int(samples):,}"
    return f"{int(samples):,} ({100 * share:.1f} % of {int(train):,})"


def leaderboard(block: pd.DataFrame, attack: str, defenses: list[str]) -> pd.DataFrame:
    """Rows = No defense, then the defenses ranked by mean DER; what each used next to its numbers."""
    rows = block[block["attack"] == attack]
    base = rows[rows["defense"] == NO_DEFENSE]
    ranked = rows[rows["defense"].isin(defenses)].sort_values("der_mean", ascending=False, kind="stable",
                                                               na_position="last")
    out = []
    for rank, r in enumerate([*base.itertuples(), *ranked.itertuples()]):
        test = r.test_data_for_decisions
        out.append({
            "#": "" if r.defense == NO_DEFENSE else str(rank if len(base) else rank + 1),
            "Defense": r.defense + (f" {TEST_MARK}" if _truthy(test) else ""),
            "ACC (%)": fmt(r.acc_mean, r.acc_std), "ASR (%)": fmt(r.asr_mean, r.asr_std),
            "RA (%)": fmt(r.ra_mean, r.ra_std),
            "DER (%)": "–" if r.defense == NO_DEFENSE else fmt(r.der_mean, r.der_std),
            "Clean data": clean_data_text(r),
            "Test data for decisions": "–" if r.defense == NO_DEFENSE else
            {True: f"yes {TEST_MARK}", False: "no", "mixed": "mixed"}.get(test, "?"),
            "Budget": _text(r.budget) or ("–" if r.defense == NO_DEFENSE else "?"),
            "Compute (s)": fmt(r.wall_time_s_mean, r.wall_time_s_std, scale=1.0, digits=0),
            "Device": _text(r.device) or "?",
            "Seeds": f"{r.n}/{r.seeds}",
        })
    return pd.DataFrame(out).set_index("#") if out else pd.DataFrame()


def tables(summary: pd.DataFrame, exp: Experiment) -> list[tuple[str, dict[str, pd.DataFrame]]]:
    """Per (dataset, model): ``ACC / ASR / RA (%)``, ``DER (%)`` and ``wall time (s)`` tables,
    rows = attacks, columns = No defense + the defense entries (``†``: test data chose the model);
    then one leaderboard per attack."""
    out = []
    columns = [NO_DEFENSE, *exp.defenses]
    for (dataset, model), block in summary.groupby(["dataset", "model"], sort=False):
        attacks = list(dict.fromkeys(block["attack"]))
        lookup = {(r.attack, r.defense): r for r in block.itertuples()}
        main, der, wall = ({a: {} for a in attacks} for _ in range(3))
        for attack in attacks:
            for defense in columns:
                r = lookup.get((attack, defense))
                if r is None:
                    continue
                main[attack][defense] = " / ".join(fmt(getattr(r, f"{m}_mean"), getattr(r, f"{m}_std"))
                                                   for m in ("acc", "asr", "ra"))
                if _truthy(getattr(r, "test_data_for_decisions", None)):
                    main[attack][defense] += f" {TEST_MARK}"
                if getattr(r, "stale", 0):
                    main[attack][defense] += f" {STALE_MARK}"
                wall[attack][defense] = fmt(r.wall_time_s_mean, r.wall_time_s_std, scale=1.0, digits=1)
                if defense != NO_DEFENSE:
                    der[attack][defense] = fmt(r.der_mean, r.der_std)
        frames = {"ACC / ASR / RA (%)": pd.DataFrame.from_dict(main, orient="index", columns=columns),
                  "DER (%)": pd.DataFrame.from_dict(der, orient="index", columns=columns[1:]),
                  "Wall time per run (s)": pd.DataFrame.from_dict(wall, orient="index", columns=columns)}
        frames = {k: v.fillna("–").rename_axis("Attack") for k, v in frames.items()}
        for attack in attacks:
            frames[f"Leaderboard: {attack}"] = leaderboard(block, attack, list(exp.defenses))
        n = block["n"].max()
        out.append((f"{dataset} · {model} ({n} seed{'s' if n != 1 else ''})", frames))
    return out


def markdown_table(frame: pd.DataFrame) -> str:
    header = [frame.index.name or "", *map(str, frame.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in frame.iterrows():
        lines.append("| " + " | ".join([str(index), *map(str, row.tolist())]) + " |")
    return "\n".join(lines)


def markdown(summary: pd.DataFrame, exp: Experiment, plots: dict, footer: list[str], extra: str = "") -> str:
    parts = [f"# {exp.name}", ""]
    for title, frames in tables(summary, exp):
        parts += [f"## {title}", ""]
        for name, frame in frames.items():
            if frame.shape[1]:
                parts += [f"**{name}**", "", markdown_table(frame), ""]
    if plots:
        parts += ["## Plots", ""]
        for title, paths in plots.items():
            parts += [f"![{p.stem}](plots/{p.name})" for p in paths] + [""]
    if extra:  # e.g. the detection table
        parts += [extra]
    parts += [f"{line}  " for line in footer]
    return "\n".join(parts).rstrip() + "\n"


def html_page(summary: pd.DataFrame, exp: Experiment, plots: dict, footer: list[str], extra: str = "") -> str:
    esc = html.escape
    body = [f"<h1>{esc(exp.name)}</h1>"]
    for title, frames in tables(summary, exp):
        body.append(f"<h2>{esc(title)}</h2>")
        for name, frame in frames.items():
            if frame.shape[1]:
                body.append(f"<h3>{esc(name)}</h3>")
                body.append(frame.reset_index().to_html(escape=True, border=0, classes="grid", index=False))
    for title, paths in plots.items():
        body.append(f"<h2>{esc(title)}</h2><div class='plots'>")
        body += [f"<img src='plots/{esc(p.name)}' alt='{esc(p.stem)}'>" for p in paths]
        body.append("</div>")
    if extra:
        body.append(extra)
    body.append("<footer>" + "<br>".join(esc(line) for line in footer) + "</footer>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:80em}"
             "table.grid{border-collapse:collapse;margin-bottom:1em}"
             "table.grid td,table.grid th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
             "table.grid th{background:#f3f3f3}.plots img{max-width:32em;margin:.5em}footer{color:#555;margin-top:2em}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{esc(exp.name)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _footer(exp: Experiment, cells: pd.DataFrame, command: str, wall_time_s: float | None, revision: dict,
            detection: pd.DataFrame) -> list[str]:
    done = int((cells["status"] == "done").sum())
    lines = [f"Cells with results: {done} of {len(cells)} (records and defense runs)."]
    lines.append(f"Code: revision {revision['revision']}" +
                 (" with uncommitted changes" if revision["dirty"] else "") + ".")
    stale = [r.record for r in cells.itertuples() if r.stale]
    stale += [f"{r.record}/{r.detector}" for r in detection.itertuples() if r.stale] if not detection.empty else []
    if stale:
        lines.append(f"{STALE_MARK} Stale (made by other code than this revision, or by unknown code; re-run them "
                     "with --rerun-stale): " + ", ".join(stale) + ".")
    missing = cells[cells["status"] != "done"]
    if len(missing):
        lines.append("Without results: " + ", ".join(f"{r.record} ({r.status})" for r in missing.itertuples()) + ".")
    reused = cells[cells["reused"]]
    if len(reused):
        lines.append("Reused (not run by compare: made elsewhere, or finished while compare was stopped; "
                     "check their settings): " +
                     ", ".join(reused["record"]) + ".")
    compute = cells.loc[cells["status"] == "done", "wall_time_s"].sum()
    lines.append(f"Compute in these results: {compute:.0f} s (sum of the runs' wall times).")
    lines.append(f"{TEST_MARK}: the final model was chosen on test data (BackdoorBench's rule for FP and ANP, "
                 "--select_on test); every other cell decided without test data. Clean data: samples given to the "
                 "defense and their share of the attacked model's training set. Budget: the flags that set the "
                 "defense's compute, with the default (BackdoorBench's cifar10 value for the baselines) where it "
                 "ran with another. Compute: wall seconds per run (mean ± std over seeds).")
    run = f" in {wall_time_s:.0f} s" if wall_time_s is not None else ""
    lines.append(f"Generated {time.strftime('%Y-%m-%d %H:%M')}{run}" + (f" by `{command}`" if command else "") +
                 ". Std is over seeds (ddof=1); DER is BackdoorBench's simplified form.")
    return lines


# --------------------------------------------------------------------------- plots


def write_plots(summary: pd.DataFrame, exp: Experiment, folder: Path) -> dict[str, list[Path]]:
    """Radar per attack and DER bars per (dataset, model); returns ``{section title: [png, ...]}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {}
    defenses = list(exp.defenses)
    for (dataset, model), block in summary.groupby(["dataset", "model"], sort=False):
        paths = []
        for attack, rows in block.groupby("attack", sort=False):
            path = folder / f"radar_{dataset}_{model}_{attack}.png"
            if radar(plt, rows, defenses, f"{attack} ({dataset}, {model})", path):
                paths.append(path)
        path = folder / f"der_{dataset}_{model}.png"
        if der_bars(plt, block, defenses, f"DER ({dataset}, {model})", path):
            paths.append(path)
        if paths:
            out[f"{dataset} · {model}"] = paths
    return out


def radar(plt, rows: pd.DataFrame, defenses: list[str], title: str, path: Path) -> bool:
    """Axes = defenses; ACC and ASR of each defended model (solid) against the attacked model (dashed)."""
    by = rows.set_index("defense")
    axes = [d for d in defenses if d in by.index and not math.isnan(by.loc[d, "acc_mean"])]
    if not axes or NO_DEFENSE not in by.index:
        return False
    angles = np.linspace(0, 2 * np.pi, len(axes), endpoint=False).tolist()
    closed = angles + angles[:1]
    fig, ax = plt.subplots(figsize=(5, 5), subplot_kw={"projection": "polar"})
    # the undefended model is one value per metric: a regular polygon (a circle below 3 axes)
    ring = closed if len(axes) >= 3 else np.linspace(0, 2 * np.pi, 73).tolist()
    for metric, color in (("acc", "tab:blue"), ("asr", "tab:red")):
        defended = [100 * by.loc[d, f"{metric}_mean"] for d in axes]
        undefended = [100 * by.loc[NO_DEFENSE, f"{metric}_mean"]] * len(ring)
        ax.plot(closed, defended + defended[:1], color=color, linestyle="-", marker="o",
                label=f"{metric.upper()} defended")
        ax.plot(ring, undefended, color=color, linestyle="--", label=f"{metric.upper()} no defense")
    ax.set_xticks(angles)
    ax.set_xticklabels(axes)
    ax.set_ylim(0, 100)
    ax.set_rlabel_position(180 / len(axes))  # radial labels between the first two axes
    ax.set_title(title, pad=18)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def der_bars(plt, block: pd.DataFrame, defenses: list[str], title: str, path: Path) -> bool:
    """Grouped bars: attacks on the x axis, one bar per defense, error bars = std over seeds."""
    data = block[block["defense"].isin(defenses)]
    if data["der_mean"].notna().sum() == 0:
        return False
    attacks = list(dict.fromkeys(block["attack"]))
    width = 0.8 / max(1, len(defenses))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(attacks) + 2), 4))
    for i, defense in enumerate(defenses):
        rows = data[data["defense"] == defense].set_index("attack")
        means = [100 * rows.loc[a, "der_mean"] if a in rows.index else np.nan for a in attacks]
        stds = [100 * rows.loc[a, "der_std"] if a in rows.index else np.nan for a in attacks]
        x = np.arange(len(attacks)) + (i - (len(defenses) - 1) / 2) * width
        ax.bar(x, means, width, yerr=np.nan_to_num(stds), capsize=2, label=defense)
    ax.set_xticks(np.arange(len(attacks)))
    ax.set_xticklabels(attacks)
    ax.set_ylabel("DER (%)")
    ax.set_ylim(0, 100)
    ax.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=min(4, len(defenses)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
