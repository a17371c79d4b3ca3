"""Input-Aware Dynamic attack: train classifier and trigger generator, write a BackdoorBench record under record/<save_folder_name>/.

    python attack/inputaware.py --dataset cifar10 --model preactresnet18 --save_folder_name inputaware_cifar10
"""
from burnkit.attacks.inputaware import InputAware

if __name__ == "__main__":
    InputAware.main()
