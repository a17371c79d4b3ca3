"""SCAn (Tang et al. 2021) on a BackdoorBench attack record's poisoned training set; uses --clean_sample_num clean training images.

    python detection_pretrain/scan.py --result_file badnet_cifar10

Writes record/<result_file>/detection/scan_pretrain/ (detection_info.csv, detection_scores.npy + .json, detection_samples.csv).
"""
from burnkit.detectors.scan import Scan

if __name__ == "__main__":
    Scan.main()
