"""SAU (shared adversarial unlearning) on a BackdoorBench attack record.

    python defense/sau.py --result_file badnet_cifar10 --yaml_path config/defense/sau/cifar10.yaml --dataset cifar10
"""
from burnkit.defenses.sau import SAU

if __name__ == "__main__":
    SAU.main()
