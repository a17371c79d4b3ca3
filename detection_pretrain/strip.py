"""STRIP (Gao et al. 2019) on a BackdoorBench attack record's poisoned training set; uses --clean_sample_num clean training images.

    python detection_pretrain/strip.py --result_file badnet_cifar10

Writes record/<result_file>/detection/strip_pretrain/ (detection_info.csv, detection_scores.npy + .json, detection_samples.csv).
"""
from burnkit.detectors.strip import Strip

if __name__ == "__main__":
    Strip.main()
