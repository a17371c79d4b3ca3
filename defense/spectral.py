"""Spectral Signatures (remove each class's top spectral scores, retrain from scratch; leaderboard:
SS) on a BackdoorBench attack record. No clean data.

    python defense/spectral.py --result_file badnet_cifar10
"""
from burnkit.defenses.spectral import SpectralSignatures

if __name__ == "__main__":
    SpectralSignatures.main()
