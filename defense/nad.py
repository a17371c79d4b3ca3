"""NAD (Neural Attention Distillation) on a BackdoorBench attack record.

    python defense/nad.py --result_file badnet_cifar10 --yaml_path config/defense/nad/cifar10.yaml --dataset cifar10
"""
from burnkit.defenses.nad import NeuralAttentionDistillation

if __name__ == "__main__":
    NeuralAttentionDistillation.main()
