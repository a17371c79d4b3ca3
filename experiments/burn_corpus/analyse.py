"""Fit BURN's label-free checks on the calibration corpus (and, once frozen, judge them on the held-out one).

For every record of a corpus experiment that has its ``burn-observe`` run (BURN with the paper's
schedule and no check that stops it, ``--trace true``), this script gathers, from files only:

* the premise signals of every enriched class (burnkit.defenses.burn_checks.class_signatures) from
  θ0's scan, and - with ``--probe`` - the unlearning probe on the top enriched classes (it loads the
  record and θ0 and fine-tunes a copy: seconds on the small CNN);
* per fine-tuning, the label-free signals computed from the trace (training-set predictions of θt)
  next to the test ACC/ASR the run scored for this analysis;
* the ground truth, for scoring only: the true target (the label the record's relabelled poison
  carries), θ0's distance AUROC, ACC/ASR before and after.

Output: ``<out>/premise.csv`` (one row per record and enriched class), ``<out>/iterations.csv`` (one
row per record and fine-tuning), ``<out>/records.csv`` (one row per record, with the stamp of the run
it read: revision, uncommitted changes, machine, CPU seconds), ``<out>/runs/<record>/`` (the run's own
small outputs: burn_df.csv, burn_detection.json, cost.json) and ``<out>/summary.md`` (the rules BURN
applies today, replayed on every record from these files: the premise test's confusion table and the
model each keep rule returns). The folder is meant to be committed: the records and traces are not,
and machines here do not keep them, so the analysis builds on these files across sessions.

    python experiments/burn_corpus/analyse.py --workdir /work/runs/corpus \
        --experiments experiments/burn_corpus/calibration.yaml experiments/burn_corpus/calibration_preact.yaml \
        --out experiments/results/burn_corpus/calibration --probe
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from burnkit.compare.experiment import load_experiment  # noqa: E402
from burnkit.compare.outputs import read_stamp  # noqa: E402
from burnkit.defenses.burn import BurnConfig  # noqa: E402
from burnkit.results import code_revision  # noqa: E402
from burnkit.defenses.burn_checks import class_signatures, farthest_mask, premise_test, probe_unlearning  # noqa: E402
from burnkit.safe_load import safe_torch_load  # noqa: E402

OBSERVER = "burn-observe"


def true_target(samples: pd.DataFrame) -> int | None:
    """The label the relabelled poison carries (ground truth, for scoring only)."""
    relabelled = samples[(samples["is_poison"] == 1) & (samples["label"] != samples["original_label"])]
    if len(relabelled):
        return int(relabelled["label"].mode().iloc[0])
    poison = samples[samples["is_poison"] == 1]  # clean-label attacks: the poison's own (target) class
    return int(poison["label"].mode().iloc[0]) if len(poison) else None


def scan_tensors(samples: pd.DataFrame):
    l2 = torch.tensor(samples["boundary_l2"].to_numpy(), dtype=torch.float)
    labels = torch.tensor(samples["label"].to_numpy())
    converged = torch.tensor(samples["attack_converged"].astype(bool).to_numpy())
    crossed = torch.where(converged, torch.tensor(samples["adv_label"].to_numpy()), torch.tensor(-1))
    return l2, labels, crossed


def probe_record(workdir: Path, record: str, samples: pd.DataFrame, classes: list[int], share: float,
                 seed: int = 0, bn_eval: bool = False, lr: float | None = None) -> list[dict]:
    """The unlearning probe for each class in ``classes`` on this record's θ0 (Phase 1's fine-tuning)."""
    from burnkit.data import Augment
    from burnkit.defenses.burn import BurnConfig, frozen_bn_step
    from burnkit.engine import resolve_device
    from burnkit.models import build_classifier, load_bb_state_dict
    from burnkit.records import read_attack_record

    rec = read_attack_record(workdir / "record" / record)
    data = rec.load_data(workdir / "data")
    train = data.bd_train
    position = {int(i): p for p, i in enumerate(train.index.tolist())}
    order = torch.tensor([position[int(i)] for i in samples["index"]])
    train = train.subset(order)  # the order of burn_samples.csv
    model = build_classifier(rec.model_name, rec.info, rec.num_classes)
    load_bb_state_dict(model, rec.state_dict)
    l2, labels, crossed = scan_tensors(samples)
    preds0 = torch.tensor(samples["clean_pred"].to_numpy())
    far = farthest_mask(l2, share)
    cfg = BurnConfig(**({} if lr is None else {"lr": lr}))
    device = resolve_device("cpu")
    out = []
    for c in classes:
        own = labels == c
        # far: c's farthest samples the attack flipped to another class (what Phase 1 would relabel)
        far_pos = torch.nonzero(far & own & (crossed >= 0) & (crossed != c)).flatten()
        # near: c's samples θ0 predicts as c, closer to the boundary than c's median
        median = l2[own].median() if bool(own.any()) else 0.0
        near_pos = torch.nonzero(own & (preds0 == c) & (l2 < median)).flatten()
        res = probe_unlearning(model, train, far_pos, near_pos, crossed.clamp_min(0), c, cfg.train_config(), device,
                               augment=Augment(rec.info.crop_padding, rec.info.train_flip), seed=seed,
                               step=frozen_bn_step if bn_eval else None)
        out.append({"class": c, **res})
    return out


def iteration_rows(trace: dict, target_class: int | None) -> list[dict]:
    """Label-free signals of every fine-tuning, from the trace (training-set logits of θt)."""
    labels = trace["labels"]
    logits0 = trace["logits0"].float()
    preds0 = logits0.argmax(1)
    suspect = trace["target"].get("class") if target_class is None else target_class
    rows = []
    seen_poison: set[int] = set()
    seen_clean: set[int] = set()
    previous_poison = None
    # the samples no fine-tuning ever trained on: one pool on which every iteration's model is compared
    final_pool = torch.ones(len(labels), dtype=torch.bool)
    for positions in (*trace["poison_sets"], *trace["clean_sets"]):
        final_pool[positions] = False
    backdoored_pool = final_pool & (labels == suspect) & (preds0 == suspect) if suspect is not None else None
    for t, (row, logits) in enumerate(zip(trace["rows"], trace["logits"])):
        poison_pos, clean_pos = trace["poison_sets"][t], trace["clean_sets"][t]
        seen_poison |= set(poison_pos.tolist())
        seen_clean |= set(clean_pos.tolist())
        out = {"iteration": t, "n_poison": len(poison_pos), "n_clean": len(clean_pos),
               "target_share0": float((preds0 == suspect).double().mean()) if suspect is not None else None,
               "test_acc": row.get("test_acc"), "test_asr": row.get("test_asr"), "test_ra": row.get("test_ra"),
               "poison_precision": row.get("poison_precision"), "relabel_acc": row.get("relabel_acc")}
        if len(poison_pos):
            out["poison_target_label_share"] = float((labels[poison_pos] == suspect).double().mean()) if suspect is not None else None
            if previous_poison is not None and len(previous_poison):
                a, b = set(poison_pos.tolist()), set(previous_poison.tolist())
                out["poison_jaccard_prev"] = len(a & b) / len(a | b)
        previous_poison = poison_pos
        if logits is not None:
            preds = logits.float().argmax(1)
            untouched = torch.ones(len(labels), dtype=torch.bool)
            untouched[list(seen_poison | seen_clean)] = False
            ref = (preds0 == labels) & untouched
            if suspect is not None:
                ref &= preds0 != suspect
                out["target_share"] = float((preds == suspect).double().mean())
                target_labelled = (labels == suspect) & untouched & (preds0 == suspect)
                out["target_labelled_left"] = float((preds[target_labelled] != suspect).double().mean())
            out["retention_untouched"] = float((preds[ref] == labels[ref]).double().mean())
            if backdoored_pool is not None and bool(backdoored_pool.any()):
                out["target_left_final_pool"] = float((preds[backdoored_pool] != suspect).double().mean())
            final_ref = (preds0 == labels) & final_pool & ((preds0 != suspect) if suspect is not None else True)
            out["retention_final_pool"] = float((preds[final_ref] == labels[final_ref]).double().mean())
            out["agreement_theta0"] = float((preds == preds0).double().mean())
        rows.append(out)
    return rows


# --------------------------------------------------------------------------- today's rules, replayed


def premise_outcome(record: dict) -> dict:
    """BURN's premise test (burn_checks.premise_test, the code BURN runs) on one record, from the
    ``premise_named`` column main() fills; ``verdict`` scores it against the true target (ground
    truth, scoring only)."""
    named = record.get("premise_named")
    named = None if named is None or pd.isna(named) else int(named)
    verdict = ("stops" if named is None else "names the target" if named == record["true_target"]
               else "names a wrong class")
    return {"named": named, "verdict": verdict}


def keep_outcome(rows: pd.DataFrame, cfg: BurnConfig) -> dict:
    """The checks after each fine-tuning and ``keep: best`` replayed on one record's iteration rows
    with the functions BURN runs (burn.check_failure, burn._eligible). Returns the iteration the run
    would stop at and the iteration whose model it would return (None: θ0)."""
    from burnkit.defenses.burn import _eligible, check_failure

    stop, best, best_left = None, None, None
    for _, r in rows.sort_values("iteration").iterrows():
        t = int(r["iteration"])
        signals0 = {"retention": 1.0, "target_share": float(r["target_share0"])}  # θ0 keeps all it fits
        signals = {"retention": float(r["retention_untouched"]), "target_share": float(r["target_share"]),
                   "target_left": None if pd.isna(r["target_labelled_left"]) else float(r["target_labelled_left"])}
        if check_failure(t, signals, signals0, cfg) is not None:
            stop = t
            break
        if _eligible(t, signals, signals0, cfg) and (best_left is None or signals["target_left"] >= best_left):
            best, best_left = t, signals["target_left"]
    return {"stop": stop, "returned": best}


def _pct(v) -> str:
    return "–" if v is None or pd.isna(v) else f"{100 * float(v):.2f}"


def _target_text(row) -> str:
    share = "–" if pd.isna(row["max_share"]) else f"{row['max_share']:.2f}"
    return f"{int(row['rank']) + 1}, {row['enrichment']:.2f}x, {share}"


def _signals_text(row) -> str:
    def num(v):
        return "–" if pd.isna(v) else f"{v:.2f}"
    return f"{row['enrichment']:.2f}x, {num(row['max_share'])}, {num(row['entropy'])}"


def summary_markdown(premise: pd.DataFrame, iterations: pd.DataFrame, records: pd.DataFrame, args,
                     cfg: BurnConfig) -> str:
    """Today's rules replayed on every record: the premise test's confusion table and the model each
    keep rule returns, with θ0's and those models' test ACC/ASR (scored for the analysis only)."""
    premise = premise.set_index(["record", "class"])
    lines = [f"# BURN's rules replayed on `{args.output_name}` runs", "",
             f"Made by `python experiments/burn_corpus/analyse.py "
             f"{' '.join(sys.argv[1:]).replace(str(args.workdir), '<workdir>')}` at revision "
             f"{code_revision().get('revision')} on {time.strftime('%Y-%m-%d')}. Test ACC/ASR in %: θ0, the "
             "last model of the observer run (the paper's rule), and the model BURN's defaults return: θ0 "
             "when the premise test fails, else the model `keep: best` picks, with the checks reading the class "
             "the test names, under "
             f"`max_retention_drop {cfg.max_retention_drop:g}`, `min_unlearning_ratio "
             f"{cfg.min_unlearning_ratio:g}` (collapse stop at a "
             f"{cfg.collapse_retention_drop:g} retention drop, a {cfg.max_target_rise:g} target-share rise). "
             f"Premise test: the farthest {cfg.premise_share:g} share, enrichment >= "
             f"{cfg.premise_min_enrichment:g}, max adversarial share <= {cfg.premise_max_adv_share:g}, only the "
             f"one label carried by >= {cfg.premise_min_inflation:g}x the median class's count when there is one.", "",
             "| record | θ0 AUROC | θ0 ACC / ASR | premise test | target: rank, enrichment, max share | "
             "last ACC / ASR | BURN's defaults return: iteration, ACC / ASR | run revision |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for _, rec in records.iterrows():
        target = premise.loc[(rec["record"], rec["true_target"])] if (rec["record"], rec["true_target"]) in \
            premise.index else None
        it = iterations[iterations["record"] == rec["record"]]
        named_rows = it[it["read_as"] == "named class"]
        it = named_rows if len(named_rows) else it[it["read_as"] == "true target"]
        # the observer's fine-tunings are BURN's only when its suspect (the most enriched class) is the
        # class the premise test names; otherwise the replay reads other fine-tunings than BURN's
        exact = pd.isna(rec["premise_named"]) or rec["observer_suspect"] == rec["premise_named"]
        outcome = premise_outcome(rec.to_dict())
        verdicts.append(outcome["verdict"])
        keep = keep_outcome(it, cfg) if len(it) and "retention_untouched" in it else {"stop": None, "returned": None}
        if keep["returned"] is not None:
            r = it[it["iteration"] == keep["returned"]].iloc[0]
            kept = f"{keep['returned']}: {_pct(r['test_acc'])} / {_pct(r['test_asr'])}"
        else:
            kept = f"θ0: {_pct(rec['acc_before'])} / {_pct(rec['asr_before'])}"
        if keep["stop"] is not None:
            kept += f" (stops at {keep['stop']})"
        if pd.isna(rec["premise_named"]):
            kept = f"θ0 (premise fails): {_pct(rec['acc_before'])} / {_pct(rec['asr_before'])}"
        elif not exact:
            kept += " (approximate: the observer fine-tuned for another suspect)"
        named = outcome.get("named")
        lines.append(
            f"| {rec['record']} | {rec['auroc_l2']:.3f} | {_pct(rec['acc_before'])} / {_pct(rec['asr_before'])} | "
            f"{outcome['verdict']}{'' if named is None else f' ({named})'} | "
            f"{'–' if target is None else _target_text(target)} | {_pct(rec['acc_final'])} / {_pct(rec['asr_final'])} | "
            f"{kept} | {str(rec['revision'])[:7]}{' (dirty)' if rec['dirty'] else ''} |")
    lines += ["", "Premise signals (the farthest share of samples by θ0's boundary distance): the true target "
              "against the most enriched other class. enrichment: the class's share there over its share of "
              "the training set; max share: the largest share of its farthest samples crossing to one class; "
              "entropy: the normalised entropy of where they cross.", "",
              "| record | target: enrichment, max share, entropy | most enriched other class: class, enrichment, "
              "max share, entropy |", "|---|---|---|"]
    for _, rec in records.iterrows():
        rows = premise.xs(rec["record"], level="record") if rec["record"] in premise.index.get_level_values(0) else None
        if rows is None:
            continue
        target = rows.loc[rec["true_target"]] if rec["true_target"] in rows.index else None
        others = rows.drop(index=rec["true_target"], errors="ignore").sort_values("enrichment", ascending=False)
        other = others.iloc[0] if len(others) else None
        lines.append(f"| {rec['record']} | {'–' if target is None else _signals_text(target)} | "
                     f"{'–' if other is None else f'{int(other.name)}: ' + _signals_text(other)} |")
    lines += ["", "Unlearning ratio (`min_unlearning_ratio`), read as the class the observer fine-tuned for: "
              "train_target_left over the retention loss (floored at 0.01) of the Phase 2 model with the most "
              "target-labelled samples moved off the suspect among those within `max_retention_drop`.", "",
              "| record | observer suspect | true target | iteration | ratio |", "|---|---|---|---|---|"]
    for _, rec in records.iterrows():
        rows = iterations[(iterations["record"] == rec["record"]) & (iterations["iteration"] >= 1)]
        suspect = rec["observer_suspect"]
        reading = ("true target" if suspect == rec["true_target"] else
                   "named class" if suspect == rec["premise_named"] else "observer suspect")
        rows = rows[(rows["read_as"] == reading) & (1 - rows["retention_untouched"] <= cfg.max_retention_drop)]
        if len(rows):
            best = rows.loc[rows["target_labelled_left"].idxmax()]
            ratio = best["target_labelled_left"] / max(1 - best["retention_untouched"], 0.01)
            lines.append(f"| {rec['record']} | {suspect} | {rec['true_target']} | {int(best['iteration'])} | "
                         f"{ratio:.2f} |")
    counts = pd.Series(verdicts).value_counts()
    lines += ["", "Premise test on these records (ground truth: every record here is backdoored, all-to-one):", "",
              "| names the target | names a wrong class | stops |", "|---|---|---|",
              f"| {counts.get('names the target', 0)} | {counts.get('names a wrong class', 0)} | "
              f"{counts.get('stops', 0)} |", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--experiments", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--output_name", default=OBSERVER, help="the BURN run folder to read")
    parser.add_argument("--share", type=float, default=0.05, help="the farthest share the premise test reads")
    parser.add_argument("--probe", action="store_true", help="run the unlearning probe (loads each record)")
    parser.add_argument("--probe_classes", type=int, default=3, help="probe the top-N enriched classes")
    parser.add_argument("--probe_bn_eval", action="store_true", help="the probe keeps BatchNorm's running statistics")
    parser.add_argument("--probe_lr", type=float, default=None, help="the probe's learning rate (default: BURN's)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    premise, iterations, records = [], [], []
    for path in args.experiments:
        exp = load_experiment(path, workdir=str(workdir))
        for cell in exp.records:
            run = workdir / "record" / cell.record / "defense" / args.output_name
            if not (run / "burn_samples.csv").is_file() or not (run / "defense_result.pt").is_file():
                print(f"skip {cell.record}: no finished {args.output_name} run", file=sys.stderr)
                continue
            samples = pd.read_csv(run / "burn_samples.csv", keep_default_na=False)
            detection = json.loads((run / "burn_detection.json").read_text())
            df = pd.read_csv(run / "burn_df.csv")
            target = true_target(samples)
            num_classes = int(max(samples["label"].max(), samples["adv_label"].max())) + 1
            num_classes = max(num_classes, 10)
            l2, labels, crossed = scan_tensors(samples)
            sig = class_signatures(l2, crossed, labels, num_classes, args.share)
            cfg = BurnConfig()
            named = premise_test(l2, crossed, labels, num_classes, cfg.premise_share, cfg.premise_min_enrichment,
                                 cfg.premise_max_adv_share, cfg.premise_min_inflation or None)["class"]
            probes = {}
            if args.probe:
                top = [r["class"] for r in sig[: args.probe_classes]]
                probes = {p["class"]: p for p in probe_record(workdir, cell.record, samples, top, args.share,
                                                              bn_eval=args.probe_bn_eval, lr=args.probe_lr)}
            for rank, row in enumerate(sig):
                premise.append({"record": cell.record, "attack": cell.attack, "model": cell.model, "seed": cell.seed,
                                "true_target": target, "rank": rank, "is_target": row["class"] == target, **row,
                                **{f"probe_{k}": v for k, v in probes.get(row["class"], {}).items() if k != "class"}})
            trace_path = run / "burn_trace.pt"
            observed_suspect = None
            if trace_path.is_file():
                trace = safe_torch_load(trace_path, "trace")
                observed_suspect = trace["target"].get("class")
                for row in iteration_rows(trace, target):
                    iterations.append({"record": cell.record, "attack": cell.attack, "model": cell.model,
                                       "read_as": "true target", **row})
                if named is not None and named != target:  # what BURN's checks read: the class it names
                    for row in iteration_rows(trace, named):
                        iterations.append({"record": cell.record, "attack": cell.attack, "model": cell.model,
                                           "read_as": "named class", **row})
                if observed_suspect is not None and observed_suspect not in (target, named):
                    # the class the observer fine-tuned for: how an easy-class suspect's signals look
                    for row in iteration_rows(trace, observed_suspect):
                        iterations.append({"record": cell.record, "attack": cell.attack, "model": cell.model,
                                           "read_as": "observer suspect", **row})
            stamp = read_stamp(run / "cost.json")
            copies = out / "runs" / cell.record / args.output_name
            copies.mkdir(parents=True, exist_ok=True)
            for name in ("burn_df.csv", "burn_detection.json", "cost.json"):
                if (run / name).is_file():
                    shutil.copyfile(run / name, copies / name)
            records.append({"record": cell.record, "attack": cell.attack, "model": cell.model, "seed": cell.seed,
                            "revision": stamp["revision"], "dirty": stamp["dirty"], "machine": stamp["machine"],
                            "cpu_time_s": stamp["cpu_time_s"],
                            "true_target": target, "premise_named": named, "observer_suspect": observed_suspect,
                            "auroc_l2": detection.get("auroc_l2"),
                            "acc_before": None, "asr_before": None,
                            "acc_final": df["test_acc"].dropna().iloc[-1] if df["test_acc"].notna().any() else None,
                            "asr_final": df["test_asr"].dropna().iloc[-1] if df["test_asr"].notna().any() else None})
            summary = workdir / "record" / cell.record / "attack_df_summary.csv"
            if summary.is_file():
                last = pd.read_csv(summary, index_col=0).loc["last"]
                records[-1].update(acc_before=float(last["test_acc"]), asr_before=float(last["test_asr"]))
    if not records:
        raise SystemExit(f"no finished {args.output_name} run under {workdir}: run the experiments' commands first")
    premise, iterations, records = pd.DataFrame(premise), pd.DataFrame(iterations), pd.DataFrame(records)
    premise.to_csv(out / "premise.csv", index=False)
    iterations.to_csv(out / "iterations.csv", index=False)
    records.to_csv(out / "records.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(premise, iterations, records, args, BurnConfig()))
    print(f"{len(records)} records -> {out}")


if __name__ == "__main__":
    main()
