"""Every run is stamped: the code revision (and uncommitted changes), the resolved config and seed,
digests of the record and data it read, the machine, wall and CPU seconds - for an attack, a defense
and a detector on the real digits record, checked against git, the record and the config here; and
compare's cells carry the stamps (paths relative to the work dir), mark the cells made by other code
stale, and run them again on request."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import torch

from burnkit.compare import main
from burnkit.compare.experiment import load_experiment
from burnkit.compare.runner import plan
from burnkit.config import as_dict
from burnkit.data import imageset_digest, tensors_digest
from burnkit.defense import get_defense
from burnkit.detector import get_detector
from burnkit.records import read_attack_record
from burnkit.results import code_revision

from conftest import FIXTURE_SEED
from test_compare import copy_record, experiment

REPO = Path(__file__).resolve().parents[1]
MACHINE_KEYS = {"cpu", "cores", "torch_threads", "gpu", "torch", "python", "host"}


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def expected_revision() -> dict:
    """This checkout's revision and dirty flag, asked of git directly."""
    return {"revision": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain").strip())}


def check_stamp(facts: dict, cfg, record_digest: str) -> dict:
    stamp = facts["stamp"]
    assert {k: stamp[k] for k in ("revision", "dirty")} == expected_revision()
    assert stamp["seed"] == cfg.random_seed
    # the full resolved config, with files of the checkout named relative to it (the same on every machine)
    config = {k: Path(v).relative_to(REPO).as_posix() if isinstance(v, str) and v.startswith(f"{REPO}/") else v
              for k, v in as_dict(cfg).items()}
    assert stamp["config"] == json.loads(json.dumps(config, default=str)) and str(REPO) not in json.dumps(stamp)
    assert stamp["record_digest"] == record_digest
    assert set(stamp["machine"]) == MACHINE_KEYS
    assert stamp["machine"]["cores"] == os.cpu_count() and stamp["machine"]["torch"] == torch.__version__
    assert stamp["machine"]["gpu"] == "none" and stamp["machine"]["torch_threads"] == torch.get_num_threads()
    assert stamp["machine"]["cpu"] and stamp["machine"]["cpu"] != "unknown"
    assert 0 < facts["cpu_time_s"] and 0 < facts["wall_time_s"]
    return stamp


def test_attack_defense_and_detector_are_stamped_alike(digits_copy):
    record_dir = digits_copy / "record" / "badnet_digits"
    record = read_attack_record(record_dir)
    weights = tensors_digest(record.state_dict.items())
    data = record.load_data()

    from burnkit.attack import get_attack

    provenance = json.loads((record_dir / "provenance.json").read_text())
    attack_cfg, _ = get_attack("badnet").parse(["--dataset", "digits", "--model", "smallcnn",
                                                "--random_seed", str(FIXTURE_SEED)])
    stamp = provenance["stamp"]
    assert stamp["seed"] == FIXTURE_SEED and stamp["config"]["save_folder_name"] == "badnet_digits"
    assert stamp["record_digest"] == weights  # the weights the attack wrote are the ones every reader reads
    assert set(stamp["read"]) == {"train_set"} and len(stamp["read"]["train_set"]) == 40
    assert {k: stamp[k] for k in ("revision", "dirty")} == expected_revision()
    assert provenance["cpu_time_s"] > 0 and set(stamp["machine"]) == MACHINE_KEYS
    assert set(stamp["config"]) == set(as_dict(attack_cfg))

    ft = get_defense("ft")
    cfg = ft.parse(["--result_file", "badnet_digits", "--epochs", "1", "--random_seed", "3", "--progress", "false"])[0]
    result = ft().run(cfg)
    cost = json.loads((result["out_dir"] / "cost.json").read_text())
    stamp = check_stamp(cost, cfg, weights)
    assert stamp["config"]["epochs"] == 1 and stamp["seed"] == 3 and stamp["config"]["yaml_path"] == "config/defense/ft/config.yaml"
    subset = data.clean_train.subset(torch.as_tensor(
        [int(line) for line in (result["out_dir"] / "log" / "index.txt").read_text().split()], dtype=torch.long))
    assert stamp["read"] == {"weights": weights, "bd_train": imageset_digest(data.bd_train),
                             "clean_subset": imageset_digest(subset), "clean_test": imageset_digest(data.clean_test),
                             "bd_test": imageset_digest(data.bd_test)}

    spectral = get_detector("spectral")
    cfg = spectral.parse(["--result_file", "badnet_digits", "--progress", "false"])[0]
    out = spectral().run(cfg)["out_dir"]
    cost = json.loads((out / "cost.json").read_text())
    stamp = check_stamp(cost, cfg, weights)
    assert stamp["read"]["weights"] == weights and stamp["read"]["bd_train"] == imageset_digest(data.bd_train)

    # the files committed as artifacts name no folder of the machine that made them: the attack's
    # provenance (its whole config, yaml paths and command line included), the detection sidecar
    files = [record_dir / "provenance.json", result["out_dir"] / "cost.json", out / "cost.json",
             out / "detection_scores.json"]
    for path in files:
        text = path.read_text()
        for folder in (str(digits_copy), str(digits_copy.resolve()), str(REPO)):
            assert folder not in text, f"{path.name} names {folder}"
    provenance_config = json.loads(files[0].read_text())["config"]
    assert provenance_config["yaml_path"] == "config/attack/prototype/digits.yaml"


def test_outside_a_checkout_the_revision_is_unknown(tmp_path):
    """An exported tree, or a folder inside another repository, cannot name the commit that ran."""
    assert code_revision(str(tmp_path)) == {"revision": "unknown", "dirty": None}
    git("init", "-q", cwd=tmp_path)
    inner = tmp_path / "exported"
    inner.mkdir()
    assert code_revision(str(inner)) == {"revision": "unknown", "dirty": None}  # not its own checkout


def test_uncommitted_changes_make_a_checkout_dirty(tmp_path):
    for args in (("init", "-q"), ("config", "user.email", "t@t"), ("config", "user.name", "t")):
        git(*args, cwd=tmp_path)
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py", cwd=tmp_path)
    git("commit", "-q", "-m", "one", cwd=tmp_path)
    head = git("rev-parse", "HEAD", cwd=tmp_path).strip()
    assert code_revision(str(tmp_path)) == {"revision": head, "dirty": False}
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_revision(str(tmp_path)) == {"revision": head, "dirty": True}
    git("checkout", "-q", "code.py", cwd=tmp_path)
    (tmp_path / "new.py").write_text("y = 1\n")  # an untracked, not ignored file is part of what ran
    assert code_revision(str(tmp_path)) == {"revision": head, "dirty": True}


def test_a_stamp_without_git_still_names_the_rest(tmp_path, monkeypatch):
    """No git program: the run is still stamped, with the revision unknown."""
    from burnkit import results

    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the PATH
    facts = results.run_environment(torch.device("cpu"), results.RunStart(), None)
    assert facts["stamp"]["revision"] == "unknown" and facts["stamp"]["dirty"] is None
    assert set(facts["stamp"]["machine"]) == MACHINE_KEYS


def restamp(path: Path, revision: str) -> None:
    """Pretend a finished run was made by other code (another commit)."""
    facts = json.loads(path.read_text())
    facts["stamp"]["revision"] = revision
    path.write_text(json.dumps(facts))


def test_cells_carry_their_stamp_and_stale_cells_are_marked_then_rerun(digits_workdir, tmp_path):
    copy_record(digits_workdir, tmp_path, "badnet_digits")
    exp = experiment(tmp_path, "stamped", {"ft": {"overrides": {"epochs": 1}}}, seeds=[0],
                     attacks={"badnet": {"record_name": "badnet_digits"}}, detectors={"spectral": {}},
                     detector_overrides={"progress": False})
    assert main([str(exp), "--workdir", str(tmp_path)]) == 0
    out = tmp_path / "compare" / "stamped"
    cells = pd.read_csv(out / "cells.csv", keep_default_na=False).set_index("defense")
    detection = pd.read_csv(out / "detection_cells.csv", keep_default_na=False)
    weights = tensors_digest(read_attack_record(tmp_path / "record" / "badnet_digits").state_dict.items())
    for row in [*cells.to_dict("records"), *detection.to_dict("records")]:
        for column in ("summary_csv", "stamp_file", "folder"):
            if column in row:  # relative to the work dir: the report names no machine's folders
                assert not row[column].startswith("/") and (tmp_path / row[column]).exists(), row[column]
        assert row["revision"] == expected_revision()["revision"] and str(row["dirty"]) == str(expected_revision()["dirty"])
        assert str(row["stale"]) == "False" and row["record_digest"] == weights  # the same record for all
        assert float(row["cpu_time_s"]) > 0 and "cores" in row["machine"] and "torch" in row["machine"]
        assert str(tmp_path) not in json.dumps(row)
    assert json.loads(cells.loc["ft", "config"])["epochs"] == 1 and json.loads(cells.loc["ft", "config"])["random_seed"] == 0
    report = json.loads((out / "report.json").read_text())
    assert {k: report[k] for k in ("revision", "dirty")} == expected_revision() and report["cells"] == {"total": 3, "done": 3,
                                                                                          "stale": 0}
    assert all(str(tmp_path) not in (out / name).read_text() for name in ("report.json", "leaderboard.md", "index.html"))
    for name in (cells.loc["ft", "stamp_file"], cells.loc["ft", "summary_csv"], "record/badnet_digits/defense/ft/ft_df.csv",
                 detection.loc[0, "stamp_file"]):  # the report folder holds the cells' own files
        assert (out / "cells" / name).read_bytes() == (tmp_path / name).read_bytes()

    ft_cost = tmp_path / "record" / "badnet_digits" / "defense" / "ft" / "cost.json"
    restamp(ft_cost, "0" * 40)
    assert main([str(exp), "--workdir", str(tmp_path), "--collect-only"]) == 0
    cells = pd.read_csv(out / "cells.csv", keep_default_na=False).set_index("defense")
    assert cells["stale"].astype(str).to_dict() == {"No defense": "False", "ft": "True"}
    assert "‡" in (out / "leaderboard.md").read_text() and "Stale" in (out / "leaderboard.md").read_text()
    assert json.loads((out / "report.json").read_text())["cells"]["stale"] == 1
    loaded = load_experiment(exp, str(tmp_path))
    assert {c.cell_id: s for c, s in plan(loaded)}["defense/badnet_digits/ft"] == "stale"
    assert {c.cell_id: s for c, s in plan(loaded, rerun_stale=True)} == {
        "attack/badnet_digits": "done", "defense/badnet_digits/ft": "rerun", "detection/badnet_digits/spectral": "done"}

    assert main([str(exp), "--workdir", str(tmp_path)]) == 0  # without the flag a stale cell is kept
    assert json.loads(ft_cost.read_text())["stamp"]["revision"] == "0" * 40
    assert main([str(exp), "--workdir", str(tmp_path), "--rerun-stale"]) == 0
    assert json.loads(ft_cost.read_text())["stamp"]["revision"] == expected_revision()["revision"]
    assert len(list(ft_cost.parent.parent.glob("ft.replaced-*"))) == 1  # the stale output is kept aside
    cells = pd.read_csv(out / "cells.csv", keep_default_na=False)
    assert set(cells["stale"].astype(str)) == {"False"}

    # a stale record: every cell that reads it is run again after it
    restamp(tmp_path / "record" / "badnet_digits" / "provenance.json", "1" * 40)
    assert set(s for _, s in plan(loaded, rerun_stale=True)) == {"rerun"}
