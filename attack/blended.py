"""Blended attack: poison, train the victim, write a BackdoorBench record under record/<save_folder_name>/.

    python attack/blended.py --dataset cifar10 --model preactresnet18 --save_folder_name blended_cifar10
"""
from burnkit.attacks.blended import Blended

if __name__ == "__main__":
    Blended.main()
