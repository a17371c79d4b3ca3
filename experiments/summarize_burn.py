"""Markdown summary of finished (or still running) BURN runs: ACC/ASR/RA before and after,
detection AUROCs, mean boundary distances, wall times.

    PYTHONPATH=. python experiments/summarize_burn.py badnet_smallcnn_c10 blended_smallcnn_c10
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import torch

from burnkit.defense import resolve_record_dir
from burnkit.metrics import auroc
from burnkit.records import read_attack_record
from burnkit.safe_load import safe_torch_load


def summarize(result_file: str, dataset_path: str = "./data") -> dict:
    record_dir = resolve_record_dir(result_file)
    out = record_dir / "defense" / "burn"
    row: dict = {"record": result_file}
    attack = pd.read_csv(record_dir / "attack_df_summary.csv", index_col=0)
    for k in ("test_acc", "test_asr", "test_ra"):
        row[f"attacked_{k[5:]}"] = float(attack.loc["last", k])
    detection = out / "burn_detection.json"
    if detection.exists():
        det = json.loads(detection.read_text())
        cost = json.loads((out / "cost.json").read_text())
        row.update({k: det.get(k) for k in ("auroc_l2", "auroc_score", "mean_l2_clean", "mean_l2_poison",
                                            "l2_ratio_poison_clean", "auroc_l2_relabelled", "auroc_score_relabelled")})
        if det.get("auroc_l2_relabelled") is None and (out / "burn_samples.csv").exists():
            row.update(relabelled_aurocs(pd.read_csv(out / "burn_samples.csv")))  # reports of older versions
        row.update({f"{k}_s": v for k, v in cost["burn"]["timings_s"].items()})
        row["total_s"] = cost.get("wall_time_s_all_sessions", cost["wall_time_s"])  # resumed runs: every session
        row["device"] = cost["device"]
    else:  # still running: distances from the scan checkpoint, flags from the record
        scan = safe_torch_load(out / "checkpoint" / "burn_scan.pt", what="BURN scan")
        flags = read_attack_record(record_dir).load_data(dataset_path).bd_train.poison
        l2 = scan["result"]["l2"]
        row.update({"auroc_l2": auroc(l2, flags), "mean_l2_clean": float(l2[~flags].mean()),
                    "mean_l2_poison": float(l2[flags].mean()), "scan_s": scan["wall_s"]})
        row["l2_ratio_poison_clean"] = row["mean_l2_poison"] / row["mean_l2_clean"]
    df_path = out / "burn_df.csv"
    if df_path.exists():
        df = pd.read_csv(df_path)
        last = df.iloc[-1]
        row.update({"iterations_done": int(last["iteration"]), "acc": last["test_acc"], "asr": last["test_asr"],
                    "ra": last["test_ra"]})
    return row


def relabelled_aurocs(samples: pd.DataFrame) -> dict:
    """AUROCs with only the poison the attack relabelled as positives (target-class and cross samples,
    which keep their label, left out), from the per-sample table."""
    if "is_poison" not in samples:
        return {}
    poison = samples["is_poison"].astype(bool)
    relabelled = poison & (samples["label"] != samples["original_label"])
    keep = relabelled | ~poison
    if not 0 < relabelled.sum() < keep.sum():
        return {}
    flags = torch.tensor(relabelled[keep].to_numpy())
    return {"auroc_l2_relabelled": auroc(torch.tensor(samples["boundary_l2"][keep].to_numpy()), flags),
            "auroc_score_relabelled": auroc(torch.tensor(samples["S"][keep].to_numpy()), flags)}


def main(argv=None) -> None:
    rows = [summarize(name) for name in (argv if argv is not None else sys.argv[1:])]
    frame = pd.DataFrame(rows).set_index("record").T
    lines = ["| | " + " | ".join(frame.columns) + " |", "|---" * (len(frame.columns) + 1) + "|"]
    for key, values in frame.iterrows():
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in values]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
