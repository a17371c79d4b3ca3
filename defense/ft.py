"""FT (fine-tuning) on a BackdoorBench attack record.

    python defense/ft.py --result_file badnet_cifar10 --dataset cifar10
"""
from burnkit.defenses.ft import FineTune

if __name__ == "__main__":
    FineTune.main()
