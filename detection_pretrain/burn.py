"""BURN's detector: minimal-L2 boundary distance of every training sample on the infected model (no clean data).

    python detection_pretrain/burn.py --result_file badnet_cifar10

Writes record/<result_file>/detection/burn_pretrain/ (detection_info.csv, detection_scores.npy + .json, detection_samples.csv).
"""
from burnkit.detectors.burn import BurnDistance

if __name__ == "__main__":
    BurnDistance.main()
