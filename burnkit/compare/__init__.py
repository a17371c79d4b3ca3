"""Batch comparison: attacks x defenses x seeds from one experiment YAML, run locally or on a cluster.

    burn-compare experiments/cpu_cifar10_smallcnn.yaml --jobs 2
    python -m burnkit.compare EXPERIMENT.yaml [--executor local|submitit|ray] [--jobs N] [--dry-run] [--collect-only]
    burn-compare publish [--check]      # the published tables, from the committed reports

See docs/compare.md.
"""
from .cli import main

__all__ = ["main"]
