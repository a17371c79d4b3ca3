"""BURN end to end on a small CIFAR-10 BadNets record (CPU-sized), then a one-screen summary.

Makes ``record/<name>`` with our BadNets attack and the small CNN when it does not exist yet
(CIFAR-10 from torchvision with ``--download true`` when online, or from an image-folder archive such as
``cifar10-jpeg.tar.gz`` given by ``--dataset_path`` when offline; docs/testing.md says how to make one), runs BURN on it with
its defaults (the paper's algorithm with the safeguards of docs/burn.md; ``-- --paper_exact true`` runs the
paper exactly) and prints ACC/ASR/RA before and after, which fine-tuned model BURN returned, detection AUROCs and wall times. The test sets
are scored every ``--test_every`` epochs/iterations and after the last (every one would double BURN's time
on a CPU); the rows in between are left empty in the CSVs.

    python experiments/burn_quickstart.py --dataset_path /path/to/cifar10-jpeg.tar.gz   # offline
    python experiments/burn_quickstart.py --download true                               # online

The script imports burnkit from the checkout it sits in, so it runs from a fresh clone as it is.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's burnkit, installed or not
from burnkit.attacks.badnet import BadNet  # noqa: E402
from burnkit.config import FALSE, TRUE  # noqa: E402
from burnkit.defenses.burn import Burn  # noqa: E402


def true_or_false(text: str) -> bool:
    if text.lower() in TRUE | FALSE:
        return text.lower() in TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset_path", default="./data", help="folder holding cifar10/, or an image-folder archive")
    p.add_argument("--download", nargs="?", const=True, default=False, type=true_or_false,
                   help="let torchvision download CIFAR-10 (true or false; bare: true)")
    p.add_argument("--name", default=None, help="record folder under record/, reused when it exists (default: "
                                                "quickstart_badnet_smallcnn_<train_subset>_e<attack_epochs>, so other "
                                                "settings make another record)")
    p.add_argument("--train_subset", type=int, default=6000, help="class-balanced training subset of the attack")
    p.add_argument("--attack_epochs", type=int, default=30,
                   help="attack training epochs (30: the small CNN fits its subset, as a trained model would)")
    p.add_argument("--test_every", type=int, default=10,
                   help="score the test sets every N attack epochs / BURN iterations and after the last")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("burn_flags", nargs="*", help="extra defense/burn.py flags after --, e.g. -- --iterations 10")
    args = p.parse_args(argv)
    args.name = args.name or f"quickstart_badnet_smallcnn_{args.train_subset}_e{args.attack_epochs}"
    if args.threads:
        torch.set_num_threads(args.threads)
    data_flags = ["--dataset_path", args.dataset_path] + (["--download", "true"] if args.download else [])
    started = time.perf_counter()
    if not (Path("record") / args.name / "attack_result.pt").is_file():
        BadNet.main(["--dataset", "cifar10", "--model", "smallcnn", "--train_subset", str(args.train_subset),
                     "--epochs", str(args.attack_epochs), "--cos_t_max", str(args.attack_epochs),
                     "--lr", "0.05", "--pratio", "0.1", "--save_folder_name", args.name,
                     "--test_every", str(args.test_every), "--progress", "false", *data_flags])
    attack_s = time.perf_counter() - started
    # a re-run replaces an earlier BURN result (kept on disk as defense/burn.replaced-<time>)
    out = Burn.main(["--result_file", args.name, "--test_every", str(args.test_every), "--progress", "false",
                     "--overwrite", "true", *data_flags, *args.burn_flags])
    cost, before, final = out["cost"], out["before"], out["final"]
    det = cost["burn"]
    summary = {
        "attacked": {"acc": before.acc, "asr": before.asr, "ra": before.ra},
        "after_burn": {k: final.get(f"test_{k}") for k in ("acc", "asr", "ra")},
        "detection": {k: det.get(k) for k in ("auroc_l2", "auroc_final_score_after_finetuning", "mean_l2_clean",
                                              "mean_l2_poison", "l2_ratio_poison_clean", "stopped")},
        "returned": det.get("returned"),  # the fine-tuned model BURN returned (keep: best), -1 = θ0
        "wall_s": {"attack_record": round(attack_s, 1), "burn": round(cost["wall_time_s"], 1),
                   **{k: round(v, 1) for k, v in det["timings_s"].items()},
                   "total": round(time.perf_counter() - started, 1)},
        "device": cost["device"], "outputs": str(out["out_dir"]),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
