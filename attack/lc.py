"""Label-consistent attack: poison, train the victim, write a BackdoorBench record under record/<save_folder_name>/.

    python -m burnkit.resources lc_adv --dataset cifar10 --model preactresnet18 --classes 0   # once
    python attack/lc.py --dataset cifar10 --model preactresnet18 --save_folder_name lc_cifar10
"""
from burnkit.attacks.lc import LabelConsistent

if __name__ == "__main__":
    LabelConsistent.main()
