"""FT-SAM (fine-tuning with sharpness-aware minimisation) on a BackdoorBench attack record.

    python defense/ft-sam.py --result_file badnet_cifar10 --yaml_path config/defense/ft-sam/cifar10.yaml --dataset cifar10
"""
from burnkit.defenses.ft_sam import FtSam

if __name__ == "__main__":
    FtSam.main()
