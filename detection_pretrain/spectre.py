"""SPECTRE (Hayase et al. 2021) on a BackdoorBench attack record's poisoned training set.

    python detection_pretrain/spectre.py --result_file badnet_cifar10

Writes record/<result_file>/detection/spectre_pretrain/ (detection_info.csv, detection_scores.npy + .json, detection_samples.csv).
"""
from burnkit.detectors.spectre import Spectre

if __name__ == "__main__":
    Spectre.main()
