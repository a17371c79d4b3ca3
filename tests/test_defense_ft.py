"""FT on the defense base: BackdoorBench outputs, clean subset semantics, CLI errors (spec §3, §7.1)."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from attack_models import create_model
from burnkit.defense import choose_clean_indices, get_defense, list_defenses
from burnkit.defenses.ft import FineTune

REPO = Path(__file__).resolve().parents[1]
FT_COLUMNS = ["epoch", "batch", "train_epoch_loss_avg_over_batch", "train_acc", "clean_test_loss_avg_over_batch",
              "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra"]


def test_ft_writes_backdoorbench_outputs(digits_copy):
    out = FineTune.main(["--result_file", "badnet_digits", "--epochs", "3", "--lr", "0.01", "--progress", "false"])
    folder = digits_copy / "record" / "badnet_digits" / "defense" / "ft"
    result = torch.load(folder / "defense_result.pt", weights_only=True)
    assert list(result) == ["model_name", "num_classes", "model"]
    create_model("smallcnn", 10, in_channels=1).load_state_dict(result["model"], strict=True)
    df = pd.read_csv(folder / "ft_df.csv", index_col=0)
    assert list(df.columns) == FT_COLUMNS and df["epoch"].tolist() == [0, 1, 2]
    summary = pd.read_csv(folder / "ft_df_summary.csv", index_col=0)
    assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]
    assert float(summary.loc["last", "test_asr"]) == pytest.approx(df["test_asr"].iloc[-1])
    idx = np.loadtxt(folder / "log" / "index.txt", dtype=int)
    assert len(idx) == int(1437 * 0.05) and len(set(idx.tolist())) == len(idx)
    assert list((folder / "log").glob("*.log"))
    assert (folder / "cost.json").is_file() and out["final"]["test_acc"] == df["test_acc"].iloc[-1]


def test_clean_subset_matches_backdoorbench_and_index_file_wins(tmp_path):
    rng = random.Random(0)
    assert choose_clean_indices(1000, 0.05, None, 0).tolist() == rng.sample(range(1000), 50)
    index = tmp_path / "idx.txt"
    np.savetxt(index, [5, 7, 9], fmt="%d")
    assert choose_clean_indices(1000, 0.05, str(index), 0).tolist() == [5, 7, 9]


def test_ft_honours_index_file(digits_copy):
    np.savetxt(digits_copy / "mine.txt", np.arange(10, 60), fmt="%d")
    FineTune.main(["--result_file", "badnet_digits", "--epochs", "1", "--index", "mine.txt", "--progress", "false"])
    used = np.loadtxt(digits_copy / "record/badnet_digits/defense/ft/log/index.txt", dtype=int)
    assert used.tolist() == list(range(10, 60))


def test_registry():
    assert "ft" in list_defenses() and get_defense("ft") is FineTune


def _cli(args, cwd):
    return subprocess.run([sys.executable, str(REPO / "defense" / "ft.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("args, message", [
    (["--result_file", "nope"], "no attack record"),
    (["--result_file", "badnet_digits", "--dataset", "cifar10"], "contradicts the record"),
    (["--result_file", "badnet_digits", "--ratio", "2"], "--ratio must be > 0 and <= 1"),
    (["--result_file", "badnet_digits", "--epochs", "many"], "'epochs' must be an integer"),
    (["--result_file", "badnet_digits", "--yaml_path", "broken.yaml"], "not valid YAML"),
    (["--result_file", "badnet_digits", "--index", "missing.txt"], "--index file missing.txt not found"),
    (["--result_file", "badnet_digits", "--model", "vgg19_bn"], "contradicts the record's model"),
])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(digits_copy, args, message):
    (digits_copy / "broken.yaml").write_text("epochs: [1,\n")
    before = sorted(p.relative_to(digits_copy) for p in digits_copy.rglob("*"))
    proc = _cli(args, digits_copy)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert sorted(p.relative_to(digits_copy) for p in digits_copy.rglob("*")) == before


def test_corrupt_record_cli(digits_copy):
    path = digits_copy / "record" / "badnet_digits" / "attack_result.pt"
    path.write_bytes(path.read_bytes()[:1000])
    proc = _cli(["--result_file", "badnet_digits"], digits_copy)
    assert proc.returncode == 2 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_default_yaml_follows_the_records_dataset(digits_copy, monkeypatch):
    """Without --dataset, the YAML of the record's dataset is used (not config.yaml), and the record
    read to find it is the one the run uses: it is loaded once."""
    from burnkit import defense as defense_mod

    yaml_dir = digits_copy / "config" / "defense" / "ft"
    yaml_dir.mkdir(parents=True)
    (yaml_dir / "digits.yaml").write_text("epochs: 1\nlr: 0.0123\nratio: 0.1\n")
    (yaml_dir / "config.yaml").write_text("epochs: 1\nlr: 0.5\n")
    loaded: dict = {}
    cfg, yaml_path, _ = FineTune.parse(["--result_file", "badnet_digits"], loaded=loaded)
    assert Path(yaml_path).name == "digits.yaml" and cfg.lr == 0.0123 and cfg.ratio == 0.1
    reads = []
    real_read = defense_mod.read_attack_record
    monkeypatch.setattr(defense_mod, "read_attack_record", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    FineTune.main(["--result_file", "badnet_digits", "--progress", "false"])
    assert len(reads) == 1  # parse() read it; run() reused it
    used = np.loadtxt(digits_copy / "record/badnet_digits/defense/ft/log/index.txt", dtype=int)
    assert len(used) == int(1437 * 0.1)
    # --dataset still wins over the record's name for the YAML choice, and a mismatch is refused
    (yaml_dir / "cifar10.yaml").write_text("epochs: 1\n")
    assert Path(FineTune.parse(["--result_file", "badnet_digits", "--dataset", "cifar10"])[1]).name == "cifar10.yaml"
