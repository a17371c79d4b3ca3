"""DBD (decoupling: self-supervised backbone, linear warm-up, semi-supervised fine-tuning on the
low-loss samples) on a BackdoorBench attack record. No clean data; trains a fresh model.

    python defense/dbd.py --result_file badnet_cifar10
"""
from burnkit.defenses.dbd import Decoupling

if __name__ == "__main__":
    Decoupling.main()
