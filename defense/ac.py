"""AC (Activation Clustering: remove each class's small activation cluster, retrain from scratch)
on a BackdoorBench attack record. No clean data.

    python defense/ac.py --result_file badnet_cifar10
"""
from burnkit.defenses.ac import ActivationClustering

if __name__ == "__main__":
    ActivationClustering.main()
