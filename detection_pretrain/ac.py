"""Activation Clustering (Chen et al. 2019) on a BackdoorBench attack record's poisoned training set.

    python detection_pretrain/ac.py --result_file badnet_cifar10

Writes record/<result_file>/detection/ac_pretrain/ (detection_info.csv, detection_scores.npy + .json, detection_samples.csv).
"""
from burnkit.detectors.ac import ActivationClustering

if __name__ == "__main__":
    ActivationClustering.main()
