"""LF attack: poison, train the victim, write a BackdoorBench record under record/<save_folder_name>/.

    python -m burnkit.resources lf_pattern --dataset cifar10 --model preactresnet18   # once
    python attack/lf.py --dataset cifar10 --model preactresnet18 --save_folder_name lf_cifar10
"""
from burnkit.attacks.lf import LowFrequency

if __name__ == "__main__":
    LowFrequency.main()
