"""BURN's final score S after Phase 2, read from a finished defense/burn.py run (--burn_output).

    python detection_pretrain/burn_s.py --result_file badnet_cifar10

Writes record/<result_file>/detection/burn_s_pretrain/ (detection_info.csv, detection_scores.npy + .json, detection_samples.csv).
"""
from burnkit.detectors.burn import BurnScore

if __name__ == "__main__":
    BurnScore.main()
