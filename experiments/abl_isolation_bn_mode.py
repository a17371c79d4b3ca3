"""ABL's isolation losses of a finished ABL run, computed with BatchNorm in eval mode (running
statistics: what ABL and BackdoorBench rank) and in train mode (batch statistics, batches of 128 in a
seeded random order): mean CE of poison and clean samples and the poison among the lowest-loss share.

    cd <workdir> && python experiments/abl_isolation_bn_mode.py record/<record> [defense/abl] [0.01]

Reads ``<record>/<defense>/checkpoint/pre_train.pt`` (the tuned model at the end of ABL's tuning phase).
The ground-truth flags are read for this report only.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from burnkit.models import build_classifier  # noqa: E402
from burnkit.records import read_attack_record  # noqa: E402
from burnkit.safe_load import safe_torch_load  # noqa: E402


def isolation_losses(clf, train, train_mode: bool, batch_size: int = 128) -> torch.Tensor:
    out = torch.empty(len(train))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    clf.train(train_mode)
    with torch.no_grad():
        for start in range(0, len(train), batch_size):
            pos = order[start:start + batch_size]
            batch = train.batch(pos, torch.device("cpu"), None, None)
            out[pos] = F.cross_entropy(clf(batch.x), batch.y, reduction="none")
    return out


def main(argv: list[str]) -> None:
    record_dir = Path(argv[0])
    defense = argv[1] if len(argv) > 1 else "defense/abl"
    ratio = float(argv[2]) if len(argv) > 2 else 0.01
    torch.set_num_threads(1)
    record = read_attack_record(record_dir)
    data = record.load_data()
    train = data.bd_train
    clf = build_classifier(record.model_name, data.info, record.num_classes)
    clf.load_state_dict(safe_torch_load(record_dir / defense / "checkpoint" / "pre_train.pt",
                                        what="training checkpoint")["model"])
    poison, count = train.poison, int(len(train) * ratio)
    for mode in ("eval", "train"):
        losses = isolation_losses(clf, train, mode == "train")
        lowest = torch.argsort(losses, stable=True)[:count]
        print(f"BN {mode} mode: mean CE poison {losses[poison].mean():.3f}, clean {losses[~poison].mean():.3f}; "
              f"poison among the lowest {count}: {int(poison[lowest].sum())}")


if __name__ == "__main__":
    main(sys.argv[1:])
