"""WaNet attack: train with warped batches, write a BackdoorBench record under record/<save_folder_name>/.

    python attack/wanet.py --dataset cifar10 --model preactresnet18 --save_folder_name wanet_cifar10
"""
from burnkit.attacks.wanet import WaNet

if __name__ == "__main__":
    WaNet.main()
