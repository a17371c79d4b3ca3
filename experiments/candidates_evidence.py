"""How many candidate classes BURN's boundary search needs (issue 16, point 3), measured on a record
with its poison: the same scan of θ0 with each candidate count, compared with the widest one.

Per setting: scan time, median distance, distance AUROC (poison vs clean), Spearman rank correlation
of the distances with the widest search, agreement of the adversarial labels, relabel accuracy
(adversarial label = original label, over the poison the attack relabelled), and for the Phase-1 set
(top k_p^0 by distance): its overlap with the widest search's set, its precision and its relabel
accuracy. With ``--burn name=output`` it adds the final ACC/ASR of finished BURN runs
(``record/<record>/defense/<output>/cost.json``).

    cd <workdir> && PYTHONPATH=<repo> python <repo>/experiments/candidates_evidence.py \
        --result_file blended_smallcnn_10k --candidates 3,10 --burn 3=burn_c3 --burn 10=burn_c10
    ... --candidates 10,all --n 2000     # a seeded subsample (expensive models / many classes)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from burnkit.defense import resolve_record_dir
from burnkit.defenses.burn import BurnConfig, boundary_scan, share_count
from burnkit.metrics import auroc
from burnkit.models import build_classifier, load_bb_state_dict
from burnkit.records import read_attack_record


def parse_setting(text: str, num_classes: int, args) -> tuple[int, float, int]:
    """``C[/overshoot[/max_iter]]``; C may be ``all``."""
    parts = text.split("/")
    candidates = num_classes if parts[0] == "all" else int(parts[0])
    overshoot = float(parts[1]) if len(parts) > 1 else args.overshoot
    max_iter = int(parts[2]) if len(parts) > 2 else args.max_iter
    return candidates, overshoot, max_iter


def scan_with(clf, train, setting: tuple[int, float, int], args) -> tuple[object, float, float]:
    candidates, overshoot, max_iter = setting
    cfg = BurnConfig(candidates=candidates, max_iter=max_iter, overshoot=overshoot, progress=False,
                     scan_batch_size=args.batch_size)
    wall, cpu = time.perf_counter(), time.process_time()
    result = boundary_scan(clf, train, cfg, torch.device("cpu"))
    return result, time.perf_counter() - wall, time.process_time() - cpu


def compare(train, results: dict, reference: str, kp: float) -> dict:
    flags = train.poison.numpy()
    relabelled = flags & (train.labels.numpy() != train.original_labels.numpy())
    original = train.original_labels.numpy()
    ref = results[reference]["result"]
    first = next(iter(results.values()))["result"]
    n_top = share_count(kp, len(train))
    ref_top = set(np.argsort(-ref.l2.numpy(), kind="stable")[:n_top].tolist())
    rows = {}
    for name, entry in results.items():
        r = entry["result"]
        l2, adv = r.l2.numpy(), r.adv_label.numpy()
        both = r.converged.numpy() & ref.converged.numpy()
        top = np.argsort(-l2, kind="stable")[:n_top]
        top_relabelled = top[relabelled[top]]
        conv = r.converged.numpy()
        iters = r.iterations.numpy()
        rows[name] = {
            "candidates_overshoot_max_iter": list(entry["setting"]), "n": len(l2),
            "mean_attack_steps": float(iters.mean()), "max_attack_steps": int(iters.max()), "scan_wall_s": entry["wall_s"], "scan_cpu_s": entry["cpu_s"],
            "samples_per_cpu_s": len(l2) / entry["cpu_s"], "flipped": float(conv.mean()),
            "median_l2": float(np.median(l2)),
            "auroc_l2": auroc(torch.from_numpy(l2), torch.from_numpy(flags)) if 0 < flags.sum() < len(flags) else None,
            "spearman_vs_ref": float(spearmanr(l2, ref.l2.numpy()).statistic),
            "adv_label_agreement": float((adv[both] == ref.adv_label.numpy()[both]).mean()),
            "spearman_vs_first": float(spearmanr(l2, first.l2.numpy()).statistic),
            "l2_ratio_vs_first_median": float(np.median(l2 / np.maximum(first.l2.numpy(), 1e-12))),
            "relabel_acc_all_poison": float((adv[relabelled & conv] == original[relabelled & conv]).mean())
            if (relabelled & conv).any() else None,
            "phase1_overlap_with_ref": len(ref_top & set(top.tolist())) / n_top,
            "phase1_precision": float(flags[top].mean()),
            "phase1_relabel_acc": float((adv[top_relabelled] == original[top_relabelled]).mean())
            if len(top_relabelled) else None,
        }
    return rows


def burn_finals(record_dir: Path, specs: list[str]) -> dict:
    out = {}
    for spec in specs:
        name, folder = spec.split("=", 1)
        cost = record_dir / "defense" / folder / "cost.json"
        if cost.exists():
            c = json.loads(cost.read_text())
            out[name] = {"output": folder, **c["final"], "wall_s": c.get("wall_time_s_all_sessions", c["wall_time_s"]),
                         "stopped": (c.get("burn") or {}).get("stopped")}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--result_file", required=True)
    p.add_argument("--dataset_path", default="./data")
    p.add_argument("--candidates", default="3,10", help="comma list of C[/overshoot[/max_iter]]; C 'all' = the "
                   "number of classes; the reference is the first setting with the most candidates")
    p.add_argument("--n", type=int, default=0, help="seeded subsample of the training set (0 = all)")
    p.add_argument("--max_iter", type=int, default=50)
    p.add_argument("--overshoot", type=float, default=0.02)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--kp", type=float, default=0.005, help="Phase-1 share (k_p^0)")
    p.add_argument("--burn", action="append", default=[], help="NAME=OUTPUT: a finished BURN run to report")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (default experiments/results/candidates_<record>.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record_dir = resolve_record_dir(args.result_file)
    record = read_attack_record(record_dir)
    clf = build_classifier(record.model_name, record.info, record.num_classes)
    load_bb_state_dict(clf, record.state_dict)
    clf.eval()
    train = record.load_data(args.dataset_path).bd_train
    if args.n and args.n < len(train):
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.n])
    settings = {text: parse_setting(text, record.num_classes, args) for text in args.candidates.split(",")}
    results = {}
    for text, setting in settings.items():
        name = str(setting[0]) if "/" not in text else "/".join(map(str, setting))
        result, wall, cpu = scan_with(clf, train, setting, args)
        results[name] = {"result": result, "wall_s": wall, "cpu_s": cpu, "setting": setting}
        print(f"{name} (candidates, overshoot, max_iter = {setting}): {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    reference = max(results, key=lambda k: results[k]["setting"][0])
    table = compare(train, results, reference, args.kp)
    payload = {"record": str(record_dir), "model": record.model_name, "num_classes": record.num_classes,
               "n_samples": len(train), "n_poison": int(train.poison.sum()), "reference": reference,
               "settings": table, "burn": burn_finals(record_dir, args.burn),
               "command": "candidates_evidence.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    out = Path(args.out or f"experiments/results/candidates_{record_dir.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
