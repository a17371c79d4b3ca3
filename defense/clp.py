"""CLP (Channel Lipschitzness-based Pruning, data-free) on a BackdoorBench attack record.

    python defense/clp.py --result_file badnet_cifar10
"""
from burnkit.defenses.clp import ChannelLipschitzPruning

if __name__ == "__main__":
    ChannelLipschitzPruning.main()
