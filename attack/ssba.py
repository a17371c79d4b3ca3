"""SSBA attack: poison, train the victim, write a BackdoorBench record under record/<save_folder_name>/.

    python -m burnkit.resources ssba --dataset cifar10   # once
    python attack/ssba.py --dataset cifar10 --model preactresnet18 --save_folder_name ssba_cifar10
"""
from burnkit.attacks.ssba import Ssba

if __name__ == "__main__":
    Ssba.main()
