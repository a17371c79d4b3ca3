"""ABL (Anti-Backdoor Learning: isolate the lowest-loss samples, then unlearn them) on a
BackdoorBench attack record. No clean data; trains a fresh model.

    python defense/abl.py --result_file badnet_cifar10
"""
from burnkit.defenses.abl import AntiBackdoorLearning

if __name__ == "__main__":
    AntiBackdoorLearning.main()
