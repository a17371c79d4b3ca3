"""Does re-estimating BatchNorm's running statistics on the whole (poisoned) training set give back the
accuracy BURN's fine-tunings cost? (Label-free and cheap, so worth ruling in or out.)

For each record, the returned model of a BURN run (``--output_name``) and, as a control, θ0: test
ACC/ASR as they are and after their BatchNorm statistics are re-estimated (cumulative average, train
mode, no gradient) over the record's training set. The test sets only score.

    cd <workdir> && python <checkout>/experiments/burn_corpus/bn_recalibration.py --output_name burn-observe-kc2 \
        --out <checkout>/experiments/results/burn_corpus/bn_recalibration.json cal_badnet_smallcnn_s1 ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from burnkit.engine import EvalSuite, evaluate, resolve_device  # noqa: E402
from burnkit.models import build_classifier, load_bb_state_dict  # noqa: E402
from burnkit.records import read_attack_record, read_defense_result  # noqa: E402
from burnkit.results import code_revision, machine  # noqa: E402


def recalibrate(model, images, batch_size: int = 256) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them over ``images`` (an ImageSet)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over every batch
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images.subset(torch.arange(start, min(start + batch_size, len(images)))).images.float() / 255)
    model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+")
    parser.add_argument("--output_name", default="burn-observe-kc2")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = resolve_device("cpu")
    rows = []
    for name in args.records:
        rec = read_attack_record(Path("record") / name)
        data = rec.load_data(Path("data"))
        suite = EvalSuite(data.clean_test, data.bd_test)
        states = {"theta0": rec.state_dict,
                  "burn": read_defense_result(Path("record") / name / "defense" / args.output_name /
                                              "defense_result.pt")["model"]}
        for which, state in states.items():
            model = build_classifier(rec.model_name, rec.info, rec.num_classes)
            load_bb_state_dict(model, state)
            model.eval()
            before = evaluate(model, suite, device)
            recalibrate(model, data.bd_train)
            after = evaluate(model, suite, device)
            rows.append({"record": name, "model": which, "acc": before.acc, "asr": before.asr,
                         "acc_recalibrated": after.acc, "asr_recalibrated": after.asr})
            print(json.dumps(rows[-1]))
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "revision": code_revision(),
                                          "machine": machine(device), "output_name": args.output_name,
                                          "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
