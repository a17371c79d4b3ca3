"""burn-compare: a real attacks x defenses x seeds matrix on digits, killed and resumed; the tables
checked against the per-run CSVs; BackdoorBench's irregular defense folders; submitit's local
executor and a local Ray instance.

Every cell is a real subprocess of attack/<name>.py or defense/<name>.py (small budgets: 2 attack
epochs, 1 defense epoch), so the numbers are real; the checks compare them with the files on disk.
"""
from __future__ import annotations

import html.parser
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from burnkit.compare import main
from burnkit.compare.experiment import load_experiment
from burnkit.errors import BurnError
from conftest import missing_input

REPO = Path(__file__).resolve().parents[1]
ATTACKS = ["badnet", "blended"]
# three real defenses at tiny budgets (I-BAU also checks BackdoorBench's hyphenated folder name)
BURN_FAST = {"iterations": 1, "epochs": 1, "batch_size": 64, "max_iter": 10, "candidates": 3,
             "kp_start": 0.02, "kp_end": 0.04, "kc_start": 0.1, "kc_end": 0.2}
DEFENSES = {"ft": {"overrides": {"epochs": 1}},
            "i-bau": {"overrides": {"n_rounds": 1}},
            "burn": {"overrides": BURN_FAST}}
SEEDS = [0, 1]


def experiment(work: Path, name: str, defenses: dict, attacks=ATTACKS, seeds=SEEDS, **extra) -> Path:
    spec = {"name": name, "seeds": seeds, "datasets": ["digits"], "models": ["smallcnn"],
            "env": {"OMP_NUM_THREADS": 1}, "attack_overrides": {"epochs": 2, "progress": False},
            "defense_overrides": {"progress": False}, "attacks": attacks, "defenses": defenses, **extra}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def last(summary: Path, column: str) -> float:
    """The ``last`` row of a BackdoorBench summary CSV, read here independently of burnkit."""
    frame = pd.read_csv(summary, index_col=0)
    return float(frame.loc["last", column] if "last" in frame.index else frame.iloc[-1][column])


def der(acc_bd, asr_bd, acc_def, asr_def) -> float:
    return (max(0.0, asr_bd - asr_def) - max(0.0, acc_bd - acc_def) + 1) / 2  # spec §4, simplified form


def done_files(work: Path) -> dict[Path, int]:
    """mtimes of the result files of every finished cell."""
    files = {}
    for rec in (work / "record").iterdir():
        if (rec / "attack_result.pt").is_file():
            for name in ("attack_result.pt", "attack_df_summary.csv"):
                files[rec / name] = (rec / name).stat().st_mtime_ns
        for folder in (rec / "defense").glob("*") if (rec / "defense").is_dir() else []:
            summaries = list(folder.glob("*_df_summary.csv"))
            if (folder / "defense_result.pt").is_file() and summaries:
                for path in [folder / "defense_result.pt", *summaries]:
                    files[path] = path.stat().st_mtime_ns
    return files


@pytest.fixture
def matrix(tmp_path_factory):
    """2 attacks x 3 defenses x 2 seeds: a first run is killed (SIGKILL to its process group) once two
    defense cells have finished; the same command then completes the matrix."""
    work = tmp_path_factory.mktemp("compare_matrix")
    exp = experiment(work, "matrix", DEFENSES)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(work / "first_run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "burnkit.compare", str(exp), "--jobs", "2"], cwd=work, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            if len(list(work.glob("record/*/defense/*/defense_result.pt"))) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, (work / "first_run.log").read_text()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = done_files(work)
    state_before = json.loads((work / "compare" / "matrix" / "state.json").read_text())
    started = time.time()
    code = main([str(exp), "--jobs", "2", "--workdir", str(work)])
    return {"work": work, "exp": exp, "before": before, "state_before": state_before, "code": code,
            "resume_s": time.time() - started, "out": work / "compare" / "matrix"}


def test_matrix_resumes_after_a_kill_and_its_tables_equal_the_per_run_csvs(matrix):
    """The one test that uses the matrix (with ``pytest -n``, a second user could build it twice).
    Without Chromium the last check cannot run: the test then skips, saying the others passed."""
    check_resumed(matrix)
    check_tables(matrix)
    check_leaderboard_columns(matrix)
    browser = find_browser()
    if browser is None:
        missing_input("Chromium is not on PATH, so index.html was not rendered (the resume and table checks "
                      "passed)", "apt-get install chromium")
    check_html_in_chromium(matrix["out"], browser)


# where the browser check leaves its screenshot (CI keeps the clone's test-artifacts/ folder)
SCREENSHOT = Path(os.environ.get("BURN_ARTIFACTS", REPO / "test-artifacts")) / "leaderboard_screenshot.png"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    """Headless Chromium (Debian's ``chromium``; .ci/run installs it), or None."""
    return next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)


def run_browser(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=300)


class _Tables(html.parser.HTMLParser):
    """Every table of a page as rows of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def check_html_in_chromium(out: Path, browser: str):
    """index.html opened from disk (file://, no server) in headless Chromium: the screenshot is not
    blank, and the rendered ACC / ASR / RA table holds the means and stds of cells.csv."""
    import matplotlib.image

    page = (out / "index.html").resolve()
    profile = out / "browser-profile"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    shot = run_browser(browser, profile, "--window-size=1400,2400", f"--screenshot={SCREENSHOT}", page.as_uri())
    assert SCREENSHOT.is_file(), shot.stderr[-2000:]
    pixels = matplotlib.image.imread(SCREENSHOT)[..., :3]
    ink = (pixels.min(axis=2) < 0.9).mean()  # share of pixels that are not (near) white
    assert 0.01 < ink < 0.9, f"the screenshot looks blank or broken ({ink:.4f} of the pixels drawn)"
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 20  # text, lines, plots

    dom = run_browser(browser, profile, "--dump-dom", page.as_uri())
    parser = _Tables()
    parser.feed(dom.stdout)
    matrix = next(t for t in parser.tables if t and t[0][:2] == ["Attack", "No defense"])
    header = matrix[0]
    cells = pd.read_csv(out / "cells.csv")
    for (attack, defense), group in cells.groupby(["attack", "defense"]):
        row = next(r for r in matrix[1:] if r[0] == attack)
        expected = " / ".join(f"{100 * group[m].mean():.2f} ± {100 * group[m].std(ddof=1):.2f}"
                              for m in ("acc", "asr", "ra"))
        assert row[header.index(defense)].startswith(expected), (attack, defense, row)
    boards = [t for t in parser.tables if t and "Test data for decisions" in t[0]]
    assert len(boards) == len(ATTACKS)


def check_leaderboard_columns(matrix):
    """The leaderboard rows say what each defense used, read back from the runs' own files."""
    out, work = matrix["out"], matrix["work"]
    cells = pd.read_csv(out / "cells.csv")
    markdown = (out / "leaderboard.md").read_text()
    assert "| # | Defense | ACC (%) | ASR (%) | RA (%) | DER (%) | Clean data | Test data for decisions | Budget | " \
           "Compute (s) | Device | Seeds |" in markdown
    for row in cells[cells.defense != "No defense"].itertuples():
        cost = json.loads((work / "record" / row.record / "cost.json").read_text())
        assert row.clean_samples == cost["clean_subset_size"] and row.train_set_size == 1437
        assert row.test_data_for_decisions is False or row.test_data_for_decisions == False  # noqa: E712
    ft = cells[cells.defense == "ft"].iloc[0]
    assert ft.clean_samples == int(1437 * 0.05) and ft.budget == "epochs 1 (default 100)" and ft.budget_reduced
    assert ft.clean_share == pytest.approx(int(1437 * 0.05) / 1437)
    burn = cells[cells.defense == "burn"].iloc[0]
    assert burn.clean_samples == 0 and burn.budget == "iterations 1 (default 20), epochs 1 (default 5)"
    board = markdown.split("**Leaderboard: badnet**")[1].split("**")[0]
    assert "| burn | " in board and "| none | no | iterations 1 (default 20), epochs 1 (default 5) |" in board
    assert f"| 71 ({100 * 71 / 1437:.1f} % of 1,437) | no | epochs 1 (default 100) |" in board


def check_resumed(matrix):
    before = matrix["before"]
    assert matrix["code"] == 0
    records_before = [p for p in before if p.name == "attack_result.pt"]
    defenses_before = [p for p in before if p.name == "defense_result.pt"]
    assert len(defenses_before) >= 2 and len(defenses_before) < 12  # killed mid-way
    for path, mtime in before.items():  # finished outputs were not rewritten
        assert path.stat().st_mtime_ns == mtime, path
    state = json.loads((matrix["out"] / "state.json").read_text())
    assert state["runs"] == 2
    cells = state["cells"]
    assert len(cells) == 4 + 12 and all(c["status"] == "done" for c in cells.values()), \
        {k: c for k, c in cells.items() if c["status"] != "done"}
    finished_first = {f"attack/{p.parent.name}" for p in records_before} | \
                     {f"defense/{p.parents[2].name}/{p.parent.name}" for p in defenses_before}
    for cell_id, entry in cells.items():
        assert entry["attempts"] == (1 if cell_id in finished_first else entry["attempts"])
        assert 1 <= entry["attempts"] <= 2
    assert sum(c["attempts"] for c in cells.values()) < 2 * len(cells)
    # each cell has its own log with the command it ran
    log = Path(cells["defense/badnet_digits_smallcnn_s1/i-bau"]["log"]).read_text()
    assert "defense/i-bau.py --result_file badnet_digits_smallcnn_s1" in log and "--n_rounds 1" in log
    assert "--random_seed 1" in log and "[i-bau] final:" in log


def check_tables(matrix):
    work, out = matrix["work"], matrix["out"]
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 4 + 12 and set(cells["status"]) == {"done"}
    by_key = {}
    for row in cells.itertuples():
        rec = f"{row.attack}_digits_smallcnn_s{row.seed}"
        if row.defense == "No defense":
            summary = work / "record" / rec / "attack_df_summary.csv"
        else:
            script = DEFENSES[row.defense].get("defense", row.defense)
            summary = work / "record" / rec / "defense" / row.defense / f"{script}_df_summary.csv"
        values = {m: last(summary, f"test_{m}") for m in ("acc", "asr", "ra")}
        for m, v in values.items():
            assert getattr(row, m) == pytest.approx(v, rel=1e-12, abs=0)
        by_key[(row.attack, row.defense, row.seed)] = values
    for (attack, defense, seed), values in by_key.items():
        row = cells[(cells.attack == attack) & (cells.defense == defense) & (cells.seed == seed)].iloc[0]
        if defense == "No defense":
            assert math.isnan(row.der)
        else:
            base = by_key[(attack, "No defense", seed)]
            values["der"] = der(base["acc"], base["asr"], values["acc"], values["asr"])
            assert row.der == pytest.approx(values["der"], rel=1e-12)

    summary = pd.read_csv(out / "summary.csv")
    markdown = (out / "leaderboard.md").read_text()
    page = (out / "index.html").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Attack | No defense"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["Attack", "No defense", *DEFENSES]
    for attack in ATTACKS:
        table_row = next(line for line in markdown.splitlines() if line.startswith(f"| {attack} |"))
        shown = [c.strip() for c in table_row.strip("|").split("|")]
        for defense in ["No defense", *DEFENSES]:
            per_seed = [by_key[(attack, defense, s)] for s in SEEDS]
            expected = []
            for m in ("acc", "asr", "ra"):
                values = [v[m] for v in per_seed]
                mean, std = statistics.mean(values), statistics.stdev(values)
                row = summary[(summary.attack == attack) & (summary.defense == defense)].iloc[0]
                assert row[f"{m}_mean"] == pytest.approx(mean, rel=1e-12)
                assert row[f"{m}_std"] == pytest.approx(std, rel=1e-9)
                expected.append(f"{100 * mean:.2f} ± {100 * std:.2f}")
            assert shown[columns.index(defense)] == " / ".join(expected)
            assert " / ".join(expected) in page
            if defense != "No defense":
                ders = [v["der"] for v in per_seed]
                assert f"{100 * statistics.mean(ders):.2f} ± {100 * statistics.stdev(ders):.2f}" in markdown
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == ["der_digits_smallcnn.png", "radar_digits_smallcnn_badnet.png", "radar_digits_smallcnn_blended.png"]
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert "<img src='plots/radar_digits_smallcnn_badnet.png'" in page


def test_collects_backdoorbench_defense_folders(digits_workdir, tmp_path):
    """BackdoorBench's own output forms (spec §3.7): ANP's single-row summary, FP's finetune_df_summary,
    FT-SAM's log/d-sam_df_summary, I-BAU's hyphenated name; collection only, nothing runs."""
    src = digits_workdir / "record" / "badnet_digits"
    rec = tmp_path / "record" / "bb_badnet"
    shutil.copytree(src, rec, ignore=shutil.ignore_patterns("defense"))
    known = {"anp": (0.81, 0.02, 0.70), "fp": (0.85, 0.40, 0.50), "ft-sam": (0.80, 0.10, 0.75), "i-bau": (0.60, 0.90, 0.05)}
    for name, (acc, asr, ra) in known.items():
        folder = rec / "defense" / name
        folder.mkdir(parents=True)
        (folder / "defense_result.pt").write_bytes(b"")  # presence is what marks a finished run
        metrics = {"clean_test_loss_avg_over_batch": 0.5, "bd_test_loss_avg_over_batch": 1.5,
                   "test_acc": acc, "test_asr": asr, "test_ra": ra}
        if name == "anp":  # a single data row, index 0
            pd.DataFrame([metrics]).to_csv(folder / "anp_df_summary.csv")
        else:
            frame = pd.DataFrame([{"epoch": 9, **metrics}, {"epoch": 9, **metrics}, {"epoch": False}],
                                 index=["last", "valid_max", "exist_nan_value"])
            target = {"fp": "finetune_df_summary.csv", "ft-sam": "log/d-sam_df_summary.csv"}.get(name, f"{name}_df_summary.csv")
            (folder / target).parent.mkdir(exist_ok=True)
            frame.to_csv(folder / target)
        if name == "fp":  # the pruning log must not be mistaken for the final numbers
            pd.DataFrame([{"test_acc": 0.1, "test_asr": 0.1, "test_ra": 0.1}], index=["last"]).to_csv(folder / "prune_log_summary.csv")
    exp = experiment(tmp_path, "bb", list(known), attacks={"badnet": {"record_name": "bb_badnet"}}, seeds=[0])
    assert main([str(exp), "--collect-only", "--workdir", str(tmp_path)]) == 0
    cells = pd.read_csv(tmp_path / "compare" / "bb" / "cells.csv").set_index("defense")
    acc_bd, asr_bd = last(rec / "attack_df_summary.csv", "test_acc"), last(rec / "attack_df_summary.csv", "test_asr")
    for name, (acc, asr, ra) in known.items():
        assert (cells.loc[name, "acc"], cells.loc[name, "asr"], cells.loc[name, "ra"]) == (acc, asr, ra)
        assert cells.loc[name, "der"] == pytest.approx(der(acc_bd, asr_bd, acc, asr), rel=1e-12)
    assert cells["reused"].all()  # nothing here was run by compare: the report says so
    assert "Reused (not run by compare" in (tmp_path / "compare" / "bb" / "leaderboard.md").read_text()


def copy_record(source: Path, work: Path, name: str) -> None:
    src = source / "record" / name
    shutil.copytree(src, work / "record" / name, ignore=shutil.ignore_patterns("defense"))


def test_submitit_local_runs_cells_and_failures_are_retried(digits_workdir, tmp_path):
    """submitit's local executor runs the cells; a failing cell is reported (exit code, log tail), the
    defenses of a failed record are blocked, the others finish, and the next run retries only what failed."""
    copy_record(digits_workdir, tmp_path, "blended_digits")
    defenses = {"ft-sub": {"defense": "ft", "overrides": {"epochs": 1}},
                "ft-bad": {"defense": "ft", "overrides": {"lr": -1}}}
    attacks = {"blended": {"record_name": "blended_digits"},  # the shared fixture record, reused
               "badnet-bad": {"attack": "badnet", "overrides": {"pratio": 2}}}
    exp = experiment(tmp_path, "sub", defenses, attacks=attacks, seeds=[0], submitit={"cluster": "local"})
    assert main([str(exp), "--executor", "submitit", "--jobs", "2", "--workdir", str(tmp_path)]) == 1
    out = tmp_path / "compare" / "sub"
    state = json.loads((out / "state.json").read_text())["cells"]
    good, bad = state["defense/blended_digits/ft-sub"], state["defense/blended_digits/ft-bad"]
    assert good["status"] == "done" and bad["status"] == "failed" and bad["exit_code"] == 2
    assert "--lr must be >= 0" in bad["tail"]
    assert "--output_name ft-sub" in Path(good["log"]).read_text()  # a variant gets its own folder
    record = state["attack/badnet-bad_digits_smallcnn_s0"]
    assert record["status"] == "failed" and record["exit_code"] == 2 and "pratio" in record["tail"]
    for name in defenses:
        assert state[f"defense/badnet-bad_digits_smallcnn_s0/{name}"]["status"] == "blocked"
        assert state[f"defense/badnet-bad_digits_smallcnn_s0/{name}"]["attempts"] == 0
    assert list((out / "submitit").glob("*_result.pkl"))  # the jobs went through submitit
    cells = pd.read_csv(out / "cells.csv").set_index("defense")
    assert set(cells[cells.attack == "badnet-bad"]["status"]) == {"failed", "blocked"}
    cells = cells[cells.attack == "blended"]
    summary = tmp_path / "record" / "blended_digits" / "defense" / "ft-sub" / "ft_df_summary.csv"
    assert cells.loc["ft-sub", "acc"] == pytest.approx(last(summary, "test_acc"), rel=1e-12)
    assert not cells.loc["ft-sub", "reused"] and cells.loc["No defense", "reused"]  # the copied record is reused
    assert cells.loc["ft-bad", "status"] == "failed" and math.isnan(cells.loc["ft-bad", "acc"])
    mtime = summary.stat().st_mtime_ns
    assert main([str(exp), "--workdir", str(tmp_path)]) == 1  # retried (still failing), the rest untouched
    state = json.loads((out / "state.json").read_text())["cells"]
    assert state["defense/blended_digits/ft-bad"]["attempts"] == 2
    assert state["attack/badnet-bad_digits_smallcnn_s0"]["attempts"] == 2
    assert state["defense/blended_digits/ft-sub"]["attempts"] == 1 and summary.stat().st_mtime_ns == mtime


def test_ray_local_runs_cells(digits_workdir, tmp_path):
    copy_record(digits_workdir, tmp_path, "badnet_digits")
    exp = experiment(tmp_path, "ray", {"ft-ray": {"defense": "ft", "overrides": {"epochs": 1}}},
                     attacks={"badnet": {"record_name": "badnet_digits"}}, seeds=[0])
    assert main([str(exp), "--executor", "ray", "--jobs", "1", "--workdir", str(tmp_path)]) == 0
    state = json.loads((tmp_path / "compare" / "ray" / "state.json").read_text())["cells"]
    assert state["defense/badnet_digits/ft-ray"]["status"] == "done"
    summary = tmp_path / "record" / "badnet_digits" / "defense" / "ft-ray" / "ft_df_summary.csv"
    cells = pd.read_csv(tmp_path / "compare" / "ray" / "cells.csv").set_index("defense")
    assert cells.loc["ft-ray", "asr"] == pytest.approx(last(summary, "test_asr"), rel=1e-12)


# --------------------------------------------------------------------------- experiment files (no runs)


def write(tmp_path, spec: dict) -> Path:
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


BASE = {"datasets": ["digits"], "models": ["smallcnn"], "attacks": ["badnet"], "defenses": ["ft"]}


def test_experiment_expands_cells_with_overrides(tmp_path):
    spec = {**BASE, "seeds": [3], "attack_overrides": {"epochs": 2, "amp": False},
            "datasets": {"digits": {"defense_overrides": {"epochs": 4, "yaml_path": "config/defense/ft/{dataset}.yaml"}}},
            "defense_overrides": {"epochs": 9, "steplr_milestones": [30, 60], "index": None},
            "defenses": {"ft": {}, "ft-x": {"defense": "ft", "overrides": {"epochs": 1}}}}
    exp = load_experiment(write(tmp_path, spec), workdir=str(tmp_path))
    (rec,) = exp.records
    assert rec.record == "badnet_digits_smallcnn_s3"
    assert list(rec.args) == ["--dataset", "digits", "--model", "smallcnn", "--save_folder_name", rec.record,
                              "--random_seed", "3", "--epochs", "2", "--amp", "false"]
    ft, ftx = exp.defense_cells
    assert list(ft.args) == ["--result_file", rec.record, "--dataset", "digits", "--random_seed", "3",
                             "--epochs", "4", "--steplr_milestones", "30,60", "--yaml_path", "config/defense/ft/digits.yaml"]
    assert "--output_name" not in ft.args and ft.folder == "ft"
    assert list(ftx.args) == ["--result_file", rec.record, "--dataset", "digits", "--random_seed", "3",
                              "--output_name", "ft-x", "--epochs", "1", "--steplr_milestones", "30,60",
                              "--yaml_path", "config/defense/ft/digits.yaml"]
    assert exp.command(ftx)[1] == str(REPO / "defense" / "ft.py")
    assert exp.output == tmp_path / "compare" / "e"


def test_attack_entries_can_restrict_seeds_and_models(tmp_path):
    """A corpus mixes records that do not form a grid: an entry's own seeds replace the experiment's, and
    its models pick from the experiment's."""
    spec = {**BASE, "seeds": [0, 1], "models": ["smallcnn", "preactresnet18"],
            "attacks": {"badnet": {"models": ["smallcnn"]},
                        "blended-long": {"attack": "blended", "seeds": [5], "models": ["preactresnet18"],
                                         "overrides": {"epochs": 12}}}}
    exp = load_experiment(write(tmp_path, spec), workdir=str(tmp_path))
    assert [(r.attack, r.model, r.seed) for r in exp.records] == [
        ("badnet", "smallcnn", 0), ("badnet", "smallcnn", 1), ("blended-long", "preactresnet18", 5)]
    assert [c.record for c in exp.defense_cells] == [r.record for r in exp.records]
    with pytest.raises(BurnError, match="names vgg19, which is not in 'models'"):
        load_experiment(write(tmp_path, {**spec, "attacks": {"badnet": {"models": ["vgg19"]}}}))
    with pytest.raises(BurnError, match="attacks.badnet.seeds must be a non-empty list"):
        load_experiment(write(tmp_path, {**spec, "attacks": {"badnet": {"seeds": []}}}))


@pytest.mark.parametrize("change, message", [
    ({"seeds": [0, 1], "record_name": "{attack}_{dataset}"}, "record name 'badnet_digits' is produced for both"),
    ({"attack_overrides": {"save_folder_name": "x"}}, "compare sets per cell"),
    ({"defense_overrides": {"random_seed": 1}}, "compare sets per cell"),
    ({"epoch": 3}, "unknown key(s) epoch"),
    ({"record_name": "{attack}_{size}"}, "unknown placeholder(s) size"),
    ({"executor": "slurm"}, "executor must be one of"),
    ({"defenses": {"ft": {"epochs": 1}}}, "unknown key(s) epochs"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"attacks": {"../x": {}}}, "must be a plain folder name"),
])
def test_experiment_rejects_bad_input(tmp_path, change, message):
    with pytest.raises(BurnError) as err:
        load_experiment(write(tmp_path, {**BASE, **change}))
    assert message in str(err.value)


def test_unavailable_entries_error_or_are_skipped(tmp_path, capsys):
    spec = {**BASE, "defenses": ["ft", "no-such-defense"]}
    with pytest.raises(BurnError, match="no script for defense no-such-defense"):
        load_experiment(write(tmp_path, spec)).check_available()
    exp = load_experiment(write(tmp_path, {**spec, "allow_unavailable": True}))
    assert exp.check_available() and [c.defense for c in exp.defense_cells] == ["ft"]
    with pytest.raises(SystemExit) as err:
        main([str(write(tmp_path, spec)), "--dry-run", "--workdir", str(tmp_path)])
    assert err.value.code == 2
    assert "no-such-defense" in capsys.readouterr().err


def test_local_executor_round_robins_gpus(tmp_path):
    """With GPUs, each pool slot has its own device: two cells in flight never share one."""
    from burnkit.compare.executors import CellTask, LocalExecutor

    pool = LocalExecutor(jobs=2, gpus=["3", "5"])
    code = "import os, time; print('gpu', os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(0.3)"
    tasks = [CellTask(f"c{i}", (sys.executable, "-c", code), str(tmp_path), str(tmp_path / f"c{i}.log"), (("X", "1"),))
             for i in range(4)]
    futures = [pool.submit(t) for t in tasks]
    outcomes = [f.result() for f in futures]
    pool.close()
    assert [o.exit_code for o in outcomes] == [0] * 4
    assert {o.gpu for o in outcomes} == {"3", "5"}
    assert outcomes[0].gpu != outcomes[1].gpu  # the first two ran together
    for o in outcomes:
        assert f"gpu {o.gpu}" in (tmp_path / f"{o.cell_id}.log").read_text() and f"gpu {o.gpu}" in o.tail


@pytest.mark.parametrize("bad", ["..", "a/b", " "])
def test_defense_output_name_must_be_a_folder_name(tmp_path, monkeypatch, bad):
    """--output_name (the defense base's flag compare uses for variants) cannot escape defense/."""
    from burnkit.defense import get_defense

    monkeypatch.chdir(tmp_path)
    cls = get_defense("ft")
    cfg, _, _ = cls.parse(["--result_file", "missing_record", "--output_name", bad])
    with pytest.raises(BurnError, match="--output_name must be a plain folder name"):
        cls().run(cfg)
    assert not (tmp_path / "record").exists()


def test_wall_time_of_a_resumed_run_counts_every_session(tmp_path):
    """A run resumed after a kill reports all its sessions; BackdoorBench's files only wall_time_s."""
    import json
    import math

    from burnkit.compare.outputs import read_wall_time

    (tmp_path / "cost.json").write_text(json.dumps({"wall_time_s": 100.0, "wall_time_s_all_sessions": 250.0}))
    (tmp_path / "provenance.json").write_text(json.dumps({"wall_time_s": 40.0}))
    assert read_wall_time(tmp_path, "cost.json") == 250.0
    assert read_wall_time(tmp_path, "provenance.json") == 40.0
    assert math.isnan(read_wall_time(tmp_path, "missing.json"))


def test_a_cell_whose_summary_is_corrupt_is_reported_broken_not_done(digits_workdir, tmp_path):
    """A result file beside a summary CSV that cannot be read (cut off, empty, binary, without numbers)
    is not a finished cell: the plan runs it again and the tables say why it has no numbers."""
    from burnkit.compare.runner import plan

    copy_record(digits_workdir, tmp_path, "badnet_digits")
    good = (digits_workdir / "record" / "badnet_digits" / "attack_df_summary.csv").read_bytes()
    corrupt = {"ft-cut": good[:40], "ft-empty": b"", "ft-binary": b"\x00\xff\x12garbage\n",
               "ft-no-numbers": b",epoch,test_acc,test_asr\nlast,3,x,y\n"}
    for name, data in corrupt.items():
        folder = tmp_path / "record" / "badnet_digits" / "defense" / name
        folder.mkdir(parents=True)
        (folder / "defense_result.pt").write_bytes(b"")
        (folder / "ft_df_summary.csv").write_bytes(data)
    defenses = {name: {"defense": "ft"} for name in corrupt}
    exp = experiment(tmp_path, "broken", defenses, attacks={"badnet": {"record_name": "badnet_digits"}}, seeds=[0])
    assert main([str(exp), "--collect-only", "--workdir", str(tmp_path)]) == 0
    cells = pd.read_csv(tmp_path / "compare" / "broken" / "cells.csv").set_index("defense")
    for name in corrupt:
        assert cells.loc[name, "status"].startswith("broken: ft_df_summary.csv"), cells.loc[name, "status"]
        assert math.isnan(cells.loc[name, "acc"])
    assert cells.loc["No defense", "status"] == "done"
    assert "(broken: ft_df_summary.csv" in (tmp_path / "compare" / "broken" / "leaderboard.md").read_text()
    statuses = {cell.cell_id: status for cell, status in plan(load_experiment(exp, str(tmp_path)))}
    assert statuses == {"attack/badnet_digits": "done", **{f"defense/badnet_digits/{n}": "todo" for n in corrupt}}


def _outside_scripts(root: Path, marker: Path) -> None:
    """An attack script outside the checkout that leaves ``marker`` and fails."""
    script = root / "attack" / "badnet.py"
    script.parent.mkdir(parents=True)
    script.write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")


def test_programs_outside_the_checkout_run_only_with_the_opt_in(tmp_path, capsys):
    """An experiment file is shared like a record: its scripts_root (and python, env.PYTHONPATH, Slurm
    setup lines) cannot make compare run other code unless the command line says so."""
    marker = tmp_path / "RAN"
    _outside_scripts(tmp_path / "elsewhere", marker)
    exp = experiment(tmp_path, "outside", {}, attacks=["badnet"], seeds=[0], scripts_root=str(tmp_path / "elsewhere"))
    with pytest.raises(SystemExit) as err:
        main([str(exp), "--workdir", str(tmp_path)])
    assert err.value.code == 2 and "pass --allow-custom-python" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "compare").exists()
    assert main([str(exp), "--workdir", str(tmp_path), "--dry-run"]) == 0 and not marker.exists()  # nothing runs
    assert main([str(exp), "--workdir", str(tmp_path), "--allow-custom-python"]) == 1  # the cell ran (and failed)
    assert marker.exists()


def test_the_running_interpreter_is_not_outside_code(tmp_path):
    link = tmp_path / "py"
    link.symlink_to(sys.executable)
    for python in (sys.executable, str(link)):
        assert load_experiment(write(tmp_path, {**BASE, "python": python})).outside_code() == []
    reasons = load_experiment(write(tmp_path, {**BASE, "python": "/bin/sh", "env": {"LD_PRELOAD": "x.so"},
                                               "scripts_root": str(REPO / "burnkit" / "..")})).outside_code()
    assert [r.split(" ")[0] for r in reasons] == ["python", "env.LD_PRELOAD"]  # the checkout itself is not outside


def test_cells_run_depth_first_so_each_records_results_arrive_early(tmp_path, monkeypatch):
    """With one slot, the defenses of a finished record run before the next record's attack: a long
    corpus yields complete records (attack and its defenses) from the start, not all attacks first."""
    from concurrent.futures import Future

    from burnkit.compare import experiment as experiment_module
    from burnkit.compare import runner
    from burnkit.compare.executors import CellOutcome

    finished, order = set(), []

    class Instant:
        """Runs nothing: notes the cell, marks it finished and reports exit 0."""

        def describe(self):
            return "instant"

        def submit(self, task):
            order.append(task.cell_id)
            finished.add(task.cell_id)
            future = Future()
            future.set_result(CellOutcome(task.cell_id, 0, 0.0, "", "here"))
            return future

        def close(self, interrupted=False):
            pass

    monkeypatch.setattr(runner, "make_executor", lambda kind, jobs, exp: Instant())
    monkeypatch.setattr(experiment_module, "record_done", lambda folder: f"attack/{folder.name}" in finished)
    monkeypatch.setattr(experiment_module, "defense_done",
                        lambda folder, script: f"defense/{folder.parent.parent.name}/{folder.name}" in finished)
    exp = experiment(tmp_path, "order", {"ft": {}, "burn": {}}, seeds=[0])
    report = runner.run_experiment(load_experiment(exp, workdir=str(tmp_path)), "local", 1, echo=lambda *_: None)
    assert len(report.done) == 6 and not report.failed
    kinds = [cell_id.split("/")[0] for cell_id in order]
    assert kinds == ["attack", "defense", "defense", "attack", "defense", "defense"], order
    first = order[0].split("/")[1]
    assert all(first in cell_id for cell_id in order[:3])
