"""Beatrix (Ma et al. 2023) on a BackdoorBench attack record's poisoned training set; uses --clean_sample_num clean training images.

    python detection_pretrain/beatrix.py --result_file badnet_cifar10

Writes record/<result_file>/detection/beatrix_pretrain/ (detection_info.csv, detection_scores.npy + .json, detection_samples.csv).
"""
from burnkit.detectors.beatrix import Beatrix

if __name__ == "__main__":
    Beatrix.main()
