"""I-BAU (implicit backdoor adversarial unlearning) on a BackdoorBench attack record.

    python defense/i-bau.py --result_file badnet_cifar10 --yaml_path config/defense/i-bau/cifar10.yaml --dataset cifar10
"""
from burnkit.defenses.ibau import IBAU

if __name__ == "__main__":
    IBAU.main()
