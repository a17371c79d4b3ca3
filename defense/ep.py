"""EP (entropy-based pruning from one poisoned batch; BackdoorBench leaderboard: DDE) on a BackdoorBench attack record.

    python defense/ep.py --result_file badnet_cifar10
"""
from burnkit.defenses.ep import EntropyPruning

if __name__ == "__main__":
    EntropyPruning.main()
