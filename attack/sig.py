"""SIG attack (clean-label): poison, train the victim, write a BackdoorBench record under record/<save_folder_name>/.

    python attack/sig.py --dataset cifar10 --model preactresnet18 --save_folder_name sig_cifar10
"""
from burnkit.attacks.sig import Sig

if __name__ == "__main__":
    Sig.main()
