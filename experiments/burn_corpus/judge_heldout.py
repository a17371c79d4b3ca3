"""Judge BURN's frozen settings on the held-out corpus: what the runs a user would make returned.

Unlike ``analyse.py`` (which replays rules on observer runs of the calibration corpus to fit them),
this script replays nothing: it reads, from files only, what BURN's own runs on the held-out records
did - ``burn`` (the frozen defaults) and ``burn-paper-exact`` (``--paper_exact true``) - and scores it
with the ground truth the records carry (the true target, θ0's and the returned model's test
ACC/ASR/RA). Ground truth only scores here; nothing it reads feeds back into BURN.

The goals it counts (docs/burn-corpus.md):

* **made worse**: the returned model's ASR above θ0's by more than 2 points, or its ACC below θ0's by
  more than 5 points (goal: 0 records);
* **ASR at most 5 %** on every record whose θ0 distance AUROC (the defaults' scan) is at least 0.8;
* **the premise test as a classifier**: names the true target / names a wrong class / stops.

Output: ``<out>/records.csv`` (one row per record and variant, with the run's stamp), ``<out>/runs/
<record>/<variant>/`` (the run's burn_df.csv, burn_detection.json, cost.json) and ``<out>/summary.md``.

    python experiments/burn_corpus/judge_heldout.py --workdir /work/runs/corpus \
        --experiments experiments/burn_corpus/heldout.yaml --out experiments/results/burn_corpus/heldout_r1
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from analyse import _pct, premise_outcome, true_target  # noqa: E402
from burnkit.compare.experiment import load_experiment  # noqa: E402
from burnkit.compare.outputs import read_stamp  # noqa: E402
from burnkit.results import code_revision  # noqa: E402

VARIANTS = ("burn", "burn-paper-exact")
MAX_ASR_RISE, MAX_ACC_DROP = 0.02, 0.05  # "made worse"
ASR_GOAL, AUROC_FOR_GOAL = 0.05, 0.8


def attack_metrics(record_dir: Path) -> dict:
    """θ0's test ACC/ASR/RA: the last row of the attack's summary (written by the attack, scored on
    the record's test sets)."""
    last = pd.read_csv(record_dir / "attack_df_summary.csv", index_col=0).loc["last"]
    return {k: float(last[f"test_{k}"]) if f"test_{k}" in last and pd.notna(last[f"test_{k}"]) else None
            for k in ("acc", "asr", "ra")}


def returned_metrics(df: pd.DataFrame, before: dict) -> dict:
    """The returned model's test ACC/ASR/RA: burn_df.csv's last scored row (BURN scores the model it
    returns there, θ0 included, when that is not the last fine-tuned one); θ0's own numbers when no
    row scores anything (a stop before any fine-tuning)."""
    scored = df[df["test_acc"].notna()] if "test_acc" in df else df.iloc[0:0]
    if not len(scored):
        return dict(before)
    last = scored.iloc[-1]
    return {k: float(last[f"test_{k}"]) if pd.notna(last.get(f"test_{k}")) else None for k in ("acc", "asr", "ra")}


def judge_row(before: dict, after: dict, auroc: float | None) -> dict:
    """The goals on one record: made worse (ASR up > 2 points or ACC down > 5 points) and, where θ0's
    distance AUROC is at least 0.8, ASR at most 5 %."""
    asr_rise = after["asr"] - before["asr"]
    acc_drop = before["acc"] - after["acc"]
    worse = asr_rise > MAX_ASR_RISE or acc_drop > MAX_ACC_DROP
    goal = None if auroc is None or auroc < AUROC_FOR_GOAL else after["asr"] <= ASR_GOAL
    return {"asr_rise": asr_rise, "acc_drop": acc_drop, "made_worse": worse, "asr_goal_met": goal}


def returned_iteration(returned: dict, stopped: dict, df: pd.DataFrame) -> int | None:
    """The iteration whose model the run returned (-1: θ0). Without a ``returned`` entry the run kept
    the last model (keep: last, the paper's rule): after a stop the last that passed (θ0 for a stop at
    iteration 0 or 1, as BURN does), else the last iteration's."""
    if returned:
        return returned.get("iteration")
    if stopped:
        return -1 if stopped["iteration"] <= 1 else stopped["iteration"] - 1
    return int(df["iteration"].max()) if "iteration" in df and df["iteration"].notna().any() else None


def read_run(workdir: Path, record: str, variant: str) -> dict | None:
    run = workdir / "record" / record / "defense" / variant
    if not (run / "defense_result.pt").is_file() or not (run / "burn_detection.json").is_file():
        return None
    detection = json.loads((run / "burn_detection.json").read_text())
    samples = pd.read_csv(run / "burn_samples.csv", keep_default_na=False)
    df = pd.read_csv(run / "burn_df.csv")
    before = attack_metrics(workdir / "record" / record)
    after = returned_metrics(df, before)
    suspect = detection.get("suspected_target") or {}
    stopped = detection.get("stopped") or {}
    returned = detection.get("returned") or {}
    target = true_target(samples)
    auroc = detection.get("auroc_l2")
    stamp = read_stamp(run / "cost.json")
    cost = json.loads((run / "cost.json").read_text())
    provenance = workdir / "record" / record / "provenance.json"  # the attack's own cost, when it wrote one
    attack_cost = json.loads(provenance.read_text()) if provenance.is_file() else {}
    return {"record": record, "variant": variant, "true_target": target, "named": suspect.get("class"),
            "verdict": premise_outcome({"premise_named": suspect.get("class"), "true_target": target})["verdict"], "premise_reason": suspect.get("reason"),
            "auroc_l2": auroc, "stopped_at": stopped.get("iteration"), "stop_reason": stopped.get("reason"),
            "returned_iteration": returned_iteration(returned, stopped, df),
            "returned_why": returned.get("why", "last" if not returned else None),
            **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
            **judge_row(before, after, auroc),
            "revision": stamp["revision"], "dirty": stamp["dirty"], "machine": stamp["machine"],
            "cpu_time_s": stamp["cpu_time_s"], "wall_time_s": cost.get("wall_time_s"),
            "attack_wall_time_s": attack_cost.get("wall_time_s"), "attack_cpu_time_s": attack_cost.get("cpu_time_s")}


def _outcome(row) -> str:
    if row is None:
        return "not run"
    text = f"{_pct(row['acc_after'])} / {_pct(row['asr_after'])} / {_pct(row['ra_after'])}"
    if pd.notna(row["stopped_at"]):
        text += f"; stopped at {int(row['stopped_at'])}"
    if pd.notna(row["returned_iteration"]):
        it = int(row["returned_iteration"])
        text += "; returns θ0" if it < 0 else f"; returns iteration {it}"
    if row["made_worse"]:
        text += " **(worse)**"
    return text


def _why(row) -> str:
    if row is None:
        return ""
    reason = row["premise_reason"] if isinstance(row["premise_reason"], str) else \
        row["stop_reason"] if isinstance(row["stop_reason"], str) else \
        row["returned_why"] if isinstance(row["returned_why"], str) and row["returned_why"] != "best" else ""
    return reason.replace("|", "/").replace("\n", " ")


def summary_markdown(table: pd.DataFrame, argv: list[str], workdir: str) -> str:
    lines = ["# BURN's frozen settings on the held-out corpus", "",
             f"Made by `python experiments/burn_corpus/judge_heldout.py "
             f"{' '.join(argv).replace(workdir, '<workdir>')}` at revision {code_revision().get('revision')} on "
             f"{time.strftime('%Y-%m-%d')}, from the runs' own outputs (each run's revision is in records.csv). "
             "Test ACC / ASR / RA in %, scored for this report only. θ0 AUROC: how well the boundary distance "
             "of the defaults' scan ranks the poison. Made worse: ASR up by more than 2 points or ACC down by "
             "more than 5.", "",
             "| record | θ0 AUROC | θ0 ACC / ASR / RA | premise test (defaults) | BURN defaults | paper-exact | "
             "why the defaults stopped or kept θ0 |", "|---|---|---|---|---|---|---|"]
    for record, rows in table.groupby("record", sort=False):
        by = {r["variant"]: r for _, r in rows.iterrows()}
        base = by.get("burn", rows.iloc[0])
        named = base["named"] if "burn" in by else None
        premise = "–"
        if "burn" in by:
            premise = base["verdict"] + (f" ({int(named)})" if base["verdict"] == "names the target" else
                                         f" ({int(named)}; target {int(base['true_target'])})"
                                         if base["verdict"] == "names a wrong class" else "")
        auroc = "–" if "burn" not in by or pd.isna(base["auroc_l2"]) else f"{base['auroc_l2']:.3f}"
        lines.append(f"| {record} | {auroc} | {_pct(base['acc_before'])} / {_pct(base['asr_before'])} / "
                     f"{_pct(base['ra_before'])} | {premise} | {_outcome(by.get('burn'))} | "
                     f"{_outcome(by.get('burn-paper-exact'))} | {_why(by.get('burn'))} |")
    lines += ["", "| variant | records | made worse | ASR <= 5 % where θ0 AUROC >= 0.8 | θ0 returned | "
              "premise test: names the target / a wrong class / stops |", "|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        rows = table[table["variant"] == variant]
        if not len(rows):
            continue
        goal = rows[rows["asr_goal_met"].notna()]
        counts = rows["verdict"].value_counts()
        theta0 = int((rows["returned_iteration"].fillna(0) < 0).sum())
        lines.append(f"| {variant} | {len(rows)} | {int(rows['made_worse'].sum())} | "
                     f"{int(goal['asr_goal_met'].astype(bool).sum())} of {len(goal)} | {theta0} | "
                     f"{counts.get('names the target', 0)} / {counts.get('names a wrong class', 0)} / "
                     f"{counts.get('stops', 0)} |")
    attacks = table.drop_duplicates("record")
    spent = {v: rows for v, rows in table.groupby("variant")}
    lines += ["", "Compute (seconds, wall / CPU): the attacks that made the records "
              f"{attacks['attack_wall_time_s'].sum():,.0f} / {attacks['attack_cpu_time_s'].sum():,.0f}; "
              + "; ".join(f"{v} {rows['wall_time_s'].sum():,.0f} / {rows['cpu_time_s'].sum():,.0f}"
                          for v, rows in spent.items()) + "."]
    lines += ["", "With `--paper_exact true` there is no premise test: the verdict column counts the class the "
              "paper's algorithm treats as the target (the most enriched among the farthest samples).", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--experiments", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    workdir, out = Path(args.workdir), Path(args.out)
    rows = []
    for path in args.experiments:
        exp = load_experiment(path, workdir=str(workdir))
        for cell in exp.records:
            for variant in VARIANTS:
                row = read_run(workdir, cell.record, variant)
                if row is None:
                    print(f"skip {cell.record}/{variant}: no finished run", file=sys.stderr)
                    continue
                rows.append({"attack": cell.attack, "model": cell.model, "seed": cell.seed, **row})
                copies = out / "runs" / cell.record / variant
                copies.mkdir(parents=True, exist_ok=True)
                for name in ("burn_df.csv", "burn_detection.json", "cost.json"):
                    shutil.copyfile(workdir / "record" / cell.record / "defense" / variant / name, copies / name)
    if not rows:
        raise SystemExit("no finished held-out run under the workdir: run the experiment's commands first")
    table = pd.DataFrame(rows)
    # the ASR goal is conditioned on θ0's distance AUROC as the defaults' scan measures it, for both variants
    # (the paper-exact scan searches every class without clipping and ranks the poison differently)
    theta0_auroc = table[table["variant"] == "burn"].set_index("record")["auroc_l2"]
    table["auroc_theta0"] = table["record"].map(theta0_auroc)
    for i, r in table.iterrows():
        auroc = r["auroc_theta0"] if pd.notna(r["auroc_theta0"]) else None
        table.loc[i, "asr_goal_met"] = judge_row({"acc": r["acc_before"], "asr": r["asr_before"]},
                                                 {"acc": r["acc_after"], "asr": r["asr_after"]}, auroc)["asr_goal_met"]
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "records.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(table, argv, str(workdir)))
    print(f"{len(table)} runs -> {out}")


if __name__ == "__main__":
    main()
