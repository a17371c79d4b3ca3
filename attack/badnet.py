"""BadNet attack: poison, train the victim, write a BackdoorBench record under record/<save_folder_name>/.

    python attack/badnet.py --dataset cifar10 --model preactresnet18 --save_folder_name badnet_cifar10
"""
from burnkit.attacks.badnet import BadNet

if __name__ == "__main__":
    BadNet.main()
