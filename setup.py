"""BURN: Backdoor Unlearning via Adversarial Boundary Analysis, on a BackdoorBench-compatible core."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="burnkit",
    version="0.1.0",
    description="BURN backdoor unlearning and BackdoorBench-compatible attacks, defenses and comparisons",
    license="Apache-2.0",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["burnkit", "burnkit.*", "attack_models", "attack_models.*"]),
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "numpy>=1.26.1",
        "pandas>=2.0",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "pillow>=10.0",
    ],
    extras_require={
        "test": ["pytest>=7.0", "pytest-xdist>=3.0", "submitit>=1.5", "ray>=2.9"],  # test_compare runs both in their local modes
        # benchmark-only peers, never imported by the library
        "bench": ["torchattacks>=3.5", "foolbox>=3.3"],
        "cluster": ["submitit>=1.5", "ray>=2.9"],
    },
    entry_points={"console_scripts": ["burn-compare=burnkit.compare:main"]},
)
