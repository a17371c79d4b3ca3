"""Spectral Signatures (Tran et al. 2018) on a BackdoorBench attack record's poisoned training set.

    python detection_pretrain/spectral.py --result_file badnet_cifar10

Writes record/<result_file>/detection/spectral_pretrain/ (detection_info.csv, detection_scores.npy + .json, detection_samples.csv).
"""
from burnkit.detectors.spectral import Spectral

if __name__ == "__main__":
    Spectral.main()
