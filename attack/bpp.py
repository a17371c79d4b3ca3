"""BPP attack: train with quantised batches and negatives, write a BackdoorBench record under record/<save_folder_name>/.

    python attack/bpp.py --dataset cifar10 --model preactresnet18 --save_folder_name bpp_cifar10
"""
from burnkit.attacks.bpp import Bpp

if __name__ == "__main__":
    Bpp.main()
