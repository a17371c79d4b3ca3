"""Does BURN's premise (poison lies far from the decision boundary) depend on how long the victim was
trained? Scans the record's poisoned training set with the model of every saved training epoch
(issue 16, point 5).

Input: an attack record (for its poisoned training set and flags) and training checkpoints of that
attack (``checkpoint/train_state.pt`` copies, one per epoch: the engine's ``{"model", "epoch", ...}``
files). Per epoch: distance AUROC (poison vs clean), mean L2 poison / clean, precision of the top
0.5 / 1 / 5 / 10 % by distance (BURN's k_p is 0.5-1 %), the share of the top-0.5 % clean samples whose
adversarial label is the target, the share of poison whose adversarial label is its original label
(the paper's Fig. 2), and BURN's premise test (enrichment of the target label among the farthest 5 %). Results are cached per checkpoint in
the output JSON, so re-running only scans new checkpoints.

    cd <workdir> && PYTHONPATH=<repo> python <repo>/experiments/premise_vs_training.py \
        --result_file blended_preact_10k_e6 --checkpoints snapshots/e6 --n 2000 --candidates 3
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from burnkit.defense import resolve_record_dir
from burnkit.defenses.burn import BurnConfig, boundary_scan, suspected_target
from burnkit.metrics import auroc
from burnkit.models import build_classifier
from burnkit.records import read_attack_record
from burnkit.safe_load import safe_torch_load

SHARES = (0.005, 0.01, 0.05, 0.1)


def premise_measures(train, result, target: int, num_classes: int) -> dict:
    flags = train.poison.numpy()
    l2 = result.l2.numpy()
    adv = result.adv_label.numpy()
    order = np.argsort(-l2, kind="stable")
    out = {"auroc_l2": auroc(result.l2, train.poison), "flipped": float(result.converged.float().mean()),
           "l2_ratio_poison_clean": float(l2[flags].mean() / l2[~flags].mean()),
           "median_l2_clean": float(np.median(l2[~flags])), "median_l2_poison": float(np.median(l2[flags]))}
    for share in SHARES:
        k = max(1, int(round(share * len(l2))))
        out[f"precision_top_{share * 100:g}pct"] = float(flags[order[:k]].mean())
    k = max(1, int(round(SHARES[0] * len(l2))))
    top_clean = [i for i in order[:k] if not flags[i]]
    out["top_clean_adv_to_target"] = float(np.mean(adv[top_clean] == target)) if top_clean else None
    relabelled = flags & (train.labels.numpy() != train.original_labels.numpy())
    conv = result.converged.numpy()
    out["poison_adv_is_original"] = float((adv[relabelled & conv] == train.original_labels.numpy()[relabelled & conv]).mean())
    out["clean_adv_to_target"] = float((adv[~flags & conv & (result.clean_label.numpy() != target)] == target).mean())
    out["poison_predicted_target"] = float((result.clean_label.numpy()[flags] == target).mean())
    cfg = BurnConfig()
    crossed_to = torch.where(result.converged.bool(), result.adv_label, -1)  # as BURN: unflipped samples do not count
    found = suspected_target(result.l2, train.labels, num_classes, cfg.premise_share, cfg.premise_min_enrichment,
                             crossed_to, cfg.premise_max_adv_share)
    out["premise_test"] = found
    out["premise_holds"] = found["class"] is not None  # BURN's test passes (it may name the wrong class)
    out["target_enrichment_top5pct"] = float(
        (train.labels[torch.argsort(result.l2, descending=True)[:found["n_top"]]] == target).float().mean()
        / (train.labels == target).float().mean())
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--result_file", required=True)
    p.add_argument("--dataset_path", default="./data")
    p.add_argument("--checkpoints", required=True, help="folder of training checkpoints (*.pt)")
    p.add_argument("--final", action="store_true", help="also the record's own (final) model")
    p.add_argument("--n", type=int, default=2000, help="seeded subsample of the training set (0 = all)")
    p.add_argument("--candidates", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record_dir = resolve_record_dir(args.result_file)
    record = read_attack_record(record_dir)
    target = int(np.bincount(record.load_data(args.dataset_path).bd_test.labels.numpy()).argmax())
    train = record.load_data(args.dataset_path).bd_train
    if args.n and args.n < len(train):
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.n])
    out = Path(args.out or f"experiments/results/premise_{record_dir.name}.json")
    cache = json.loads(out.read_text()) if out.exists() else {}
    stale = [key for key, row in cache.items() if "adv_share" not in row.get("premise_test", {})]
    for key in stale:  # made before the premise test checked adversarial labels: rescanned, not mixed in
        print(f"rescanning {key}: its cached premise test predates the adversarial-label check", flush=True)
        del cache[key]
    clf = build_classifier(record.model_name, record.info, record.num_classes)
    jobs = [(str(path), lambda path=path: safe_torch_load(path, "training checkpoint"))
            for path in sorted(Path(args.checkpoints).glob("*.pt"))]
    if args.final:
        jobs.append(("record", None))
    cfg = BurnConfig(candidates=args.candidates, progress=False)
    for key, load in jobs:
        if key in cache:
            continue
        if load is None:
            from burnkit.models import load_bb_state_dict

            load_bb_state_dict(clf, record.state_dict)
            epoch = "final"
        else:
            state = load()
            clf.load_state_dict(state["model"])
            epoch = int(state["epoch"]) + 1
        clf.eval()
        start = time.perf_counter()
        result = boundary_scan(clf, train, cfg, torch.device("cpu"))
        cache[key] = {"epochs_trained": epoch, "scan_s": time.perf_counter() - start,
                      **premise_measures(train, result, target, record.num_classes)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(cache, indent=2) + "\n")
        print(json.dumps({key: cache[key]}), flush=True)
    rows = sorted(cache.values(), key=lambda r: (str(r["epochs_trained"]) == "final", str(r["epochs_trained"]).zfill(4)))
    print(f"record {record_dir.name}: {len(train)} samples, target {target}, candidates {args.candidates}")
    cols = ("epochs_trained", "auroc_l2", "l2_ratio_poison_clean", "precision_top_0.5pct", "precision_top_1pct",
            "precision_top_5pct", "precision_top_10pct", "top_clean_adv_to_target", "clean_adv_to_target",
            "poison_adv_is_original", "poison_predicted_target", "target_enrichment_top5pct", "premise_holds",
            "suspected_class", "suspected_is_target", "top_adv_share")
    print(" | ".join(cols))
    for r in rows:
        test = r["premise_test"]
        r = {**r, "suspected_class": test["class"], "suspected_is_target": test["class"] == target,
             "top_adv_share": test.get("adv_share")}
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols))


if __name__ == "__main__":
    main()
