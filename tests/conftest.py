"""Shared fixtures: tiny attack records on real images (scikit-learn digits) and a CIFAR-10 subset.

Records are made once per test session by our own attack scripts' code path, inside a temporary
working directory (BackdoorBench resolves ``record/`` against the CWD).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import NoReturn

import pytest
import torch

torch.set_num_threads(int(os.environ.get("BURN_TEST_THREADS", "1")))  # tiny tensors: 1 thread is fastest

REPO = Path(__file__).resolve().parents[1]
# BackdoorBench's model manifest: the state-dict keys and shapes of every model its generate_cls_model
# builds (at 10 and 100 classes), dumped from BackdoorBench; tests/test_models.py checks the zoo against it
BB_MODEL_KEYS = REPO / "tests" / "data" / "bb-model-keys.json.gz"
# BURN_REQUIRE_FULL_TESTS=1 (.ci/run sets it) turns every skip for a missing test input into a failure
REQUIRE_FULL_TESTS = os.environ.get("BURN_REQUIRE_FULL_TESTS") == "1"


def missing_input(what: str, fix: str) -> NoReturn:
    """Skip the calling test, in one line that says what is missing and how to get it. Under
    ``BURN_REQUIRE_FULL_TESTS=1`` fail instead: CI has every input, so a skip there would hide a
    check that did not run."""
    message = f"{what}; {fix} (docs/testing.md)"
    if REQUIRE_FULL_TESTS:
        pytest.fail(f"{message}; BURN_REQUIRE_FULL_TESTS=1 allows no skip", pytrace=False)
    pytest.skip(message)


def _cifar_tarball() -> Path:
    """The CIFAR-10 image-folder archive (``train/<class>/*.jpg``, ``test/<class>/*.jpg``):
    ``$BURN_CIFAR10_TARBALL``, else ``shared/data/cifar10-jpeg.tar.gz`` beside the checkout (CI's
    layout) or beside the folder holding it (a git worktree's)."""
    given = os.environ.get("BURN_CIFAR10_TARBALL")
    if given:
        return Path(given).expanduser()
    beside = [base / "shared" / "data" / "cifar10-jpeg.tar.gz" for base in (REPO.parent, REPO.parent.parent)]
    return next((path for path in beside if path.is_file()), beside[0])


CIFAR_TARBALL = _cifar_tarball()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (e.g. ViT-L forward passes)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long checks, run with --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with python -m pytest --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

# BURN_TEST_RECORD_SEED trains the shared fixture records with another seed: a test that passes only on
# the exact floats of one trained model (one CPU, one thread count, one seed) fails under it. Run the
# suite with it (and with BURN_TEST_THREADS=2) before relying on a trained model's behaviour in a test.
FIXTURE_SEED = int(os.environ.get("BURN_TEST_RECORD_SEED") or 0)  # the seed the shared records are made with
RECORD_SEED = ["--random_seed", str(FIXTURE_SEED)]

DIGITS_TRAINING = ["--dataset", "digits", "--model", "smallcnn", "--epochs", "20", "--lr", "0.05",
                   "--cos_t_max", "20", "--progress", "false", *RECORD_SEED]


def make_record(workdir: Path, attack: str, name: str, extra=()) -> Path:
    """Run attack ``attack`` (registered name) in ``workdir`` and return the record folder."""
    from burnkit.attack import get_attack

    cls = get_attack(attack)
    with contextlib.chdir(workdir):
        cfg, _ = cls.parse([*DIGITS_TRAINING, "--save_folder_name", name, *extra])
        cls.run(cfg)
    return workdir / "record" / name


@pytest.fixture(scope="session")
def digits_workdir(tmp_path_factory) -> Path:
    """A working directory holding ``record/badnet_digits`` and ``record/blended_digits``
    (smallcnn on 8x8 digits, pratio 0.1, target 0; ~20 s each)."""
    work = tmp_path_factory.mktemp("digits_work")
    make_record(work, "badnet", "badnet_digits")
    make_record(work, "blended", "blended_digits")
    return work


@pytest.fixture
def digits_copy(digits_workdir, tmp_path, monkeypatch) -> Path:
    """A private copy of the digits work directory, with the CWD set to it."""
    work = tmp_path / "work"
    shutil.copytree(digits_workdir, work)
    monkeypatch.chdir(work)
    return work


def extract_cifar_subset(root: Path, keep: dict[str, int]) -> Path:
    """The first ``keep[split]`` JPEGs of every class of each split, from the CIFAR-10 archive."""
    if not CIFAR_TARBALL.is_file():
        missing_input(f"the CIFAR-10 image-folder archive is not at {CIFAR_TARBALL}",
                      "set BURN_CIFAR10_TARBALL=/path/to/cifar10-jpeg.tar.gz")
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_TARBALL) as tar:
        members = []
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 3:
                continue
            split, cls = parts[-3], parts[-2]
            if split not in keep:
                continue
            n = counts.get((split, cls), 0)
            if n < keep[split]:
                counts[(split, cls)] = n + 1
                m.name = f"{split}/{cls}/{parts[-1]}"
                members.append(m)
        tar.extractall(root, members=members, filter="data")
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A small real CIFAR-10 image folder (the first 30 train / 10 test JPEGs of every class)
    taken from the CIFAR-10 archive; skipped with a reason if the archive is absent."""
    return extract_cifar_subset(tmp_path_factory.mktemp("cifar_subset") / "cifar10", {"train": 30, "test": 10})


@pytest.fixture(scope="session")
def cifar_blended_workdir(tmp_path_factory) -> Path:
    """A working directory with ``data/cifar10`` (200 train / 50 test JPEGs per class) and
    ``record/blended_cifar_smallcnn``: Blended (pratio 0.1, target 0) on the 2,000 training images,
    small CNN, 15 epochs (about 48 % ACC, 100 % ASR; ~40 s on one idle thread). A record on which
    BURN's premise holds (the farthest samples by boundary distance are mostly poison)."""
    work = tmp_path_factory.mktemp("cifar_blended_work")
    extract_cifar_subset(work / "data" / "cifar10", {"train": 200, "test": 50})
    from burnkit.attack import get_attack

    cls = get_attack("blended")
    with contextlib.chdir(work):
        cfg, _ = cls.parse(["--dataset", "cifar10", "--dataset_path", "./data", "--model", "smallcnn", "--epochs", "15",
                            "--lr", "0.05", "--cos_t_max", "15", "--progress", "false", "--test_every", "15",
                            "--save_folder_name", "blended_cifar_smallcnn", *RECORD_SEED])
        cls.run(cfg)
    return work
