"""BURN Phase 1 alone (top k_p^0 by distance, relabelled, 5 epochs) with BatchNorm trained vs frozen:
clean ACC/ASR afterwards, from a finished BURN run's scan checkpoint.

    cd <workdir> && python <repo>/experiments/phase1_batchnorm_check.py badnet_cifar10_smallcnn_e16
"""
import sys

import torch

from burnkit.data import Augment
from burnkit.engine import EvalSuite, evaluate, fit, seed_everything
from burnkit.models import build_classifier, load_bb_state_dict
from burnkit.records import read_attack_record
from burnkit.safe_load import safe_torch_load
from burnkit.defenses.burn import BurnConfig, select, finetune_set, frozen_bn_step
rec = sys.argv[1]
scan = safe_torch_load(f"record/{rec}/defense/burn/checkpoint/burn_scan.pt", what="BURN scan")
r = scan["result"]
record = read_attack_record(f"record/{rec}")
d = record.load_data("./data")
suite = EvalSuite(d.clean_test, d.bd_test)
cfg = BurnConfig()
poison_pos, _ = select(r["l2"], 0.005, 0.0)
ft = finetune_set(d.bd_train, poison_pos, r["adv_label"], poison_pos[:0])
dev = torch.device("cpu")
for bn_eval in (False, True):
    seed_everything(0)
    clf = build_classifier(record.model_name, d.info, record.num_classes); load_bb_state_dict(clf, record.state_dict)
    fit(clf, ft, cfg.train_config(), device=dev, augment=Augment(d.info.crop_padding, d.info.train_flip), seed=0,
        progress=False, step=frozen_bn_step if bn_eval else None)
    m = evaluate(clf, suite, dev)
    print("bn_eval", bn_eval, "acc", round(m.acc, 4), "asr", round(m.asr, 4))
