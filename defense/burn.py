"""BURN (boundary-distance detection + progressive unlearning) on a BackdoorBench attack record.

    python defense/burn.py --result_file badnet_cifar10 --dataset cifar10

Uses only the record's poisoned training set; writes record/<result_file>/defense/burn/.
Re-running the same command after a kill resumes (--resume false starts over).
"""
from burnkit.defenses.burn import Burn

if __name__ == "__main__":
    Burn.main()
