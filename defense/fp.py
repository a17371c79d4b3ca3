"""FP (Fine-Pruning) on a BackdoorBench attack record.

    python defense/fp.py --result_file badnet_cifar10 --yaml_path config/defense/fp/cifar10.yaml --dataset cifar10
"""
from burnkit.defenses.fp import FinePruning

if __name__ == "__main__":
    FinePruning.main()
