"""TrojanNN attack: optimise the trigger on a clean model, poison, train the victim, write a
BackdoorBench record under record/<save_folder_name>/.

    python -m burnkit.resources clean_model --dataset cifar10 --model preactresnet18   # once
    python attack/trojannn.py --dataset cifar10 --model preactresnet18 --save_folder_name trojannn_cifar10
"""
from burnkit.attacks.trojannn import TrojanNN

if __name__ == "__main__":
    TrojanNN.main()
