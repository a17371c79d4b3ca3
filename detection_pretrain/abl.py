"""ABL's loss isolation (Li et al. 2021): a fresh model trained briefly with a loss guard; the lowest losses are suspicious.

    python detection_pretrain/abl.py --result_file badnet_cifar10

Writes record/<result_file>/detection_pretrain/abl/ (detection_info.csv, detection_scores.npy + .json, detection_samples.csv).
"""
from burnkit.detectors.abl import ABLIsolation

if __name__ == "__main__":
    ABLIsolation.main()
