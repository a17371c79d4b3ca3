"""`burn-compare publish` writes docs/results.md and the README's summary from committed reports: the
committed ones must match what the generator gives (a hand-edited number fails), its numbers are the
cells' own (every seed, mean ± std, min–max), stale cells are marked, bad input is one line."""
from __future__ import annotations

import re
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from burnkit.compare import main
from burnkit.compare.publish import BEGIN, END, GENERATED, PUBLISHED, README, RESULTS_MD, render
from test_compare import copy_record, experiment
from test_provenance import expected_revision, restamp

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- publish: the committed tables


def test_published_tables_match_the_committed_artifacts(capsys):
    """The tables in docs/results.md (and the README's summary, once it has the markers) are exactly
    what the committed artifacts give: a number typed or edited by hand fails here."""
    outputs, notes = render(REPO)
    assert RESULTS_MD in outputs
    for path, text in outputs.items():
        assert (REPO / path).read_text() == text, f"{path} differs from the artifacts: run `burn-compare publish`"
    assert main(["publish", "--check"]) == 0


def copy_published(root: Path) -> None:
    """This checkout's published.yaml, the artifacts it names, docs/results.md and README.md, under ``root``."""
    spec = yaml.safe_load((REPO / PUBLISHED).read_text())
    for path in (PUBLISHED, RESULTS_MD, README):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / path, root / path)
    for table in spec["tables"].values():
        shutil.copytree(REPO / table["artifact"], root / table["artifact"])


def test_a_hand_edited_number_fails_the_check(tmp_path, capsys):
    copy_published(tmp_path)
    assert main(["publish", "--root", str(tmp_path), "--check"]) == 0
    doc = tmp_path / RESULTS_MD
    text = doc.read_text()
    number = re.search(r"\| (\d\.\d{3}) \|", text.split("**Per row**")[1])
    edited = f"{float(number.group(1)) + 0.001:.3f}"
    doc.write_text(text.replace(number.group(0), f"| {edited} |", 1))
    capsys.readouterr()
    assert main(["publish", "--root", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{RESULTS_MD} line" in err and edited in err and number.group(1) in err
    assert main(["publish", "--root", str(tmp_path)]) == 0  # publishing restores the artifacts' numbers
    assert doc.read_text() == text
    assert main(["publish", "--root", str(tmp_path), "--check"]) == 0


def test_the_readme_summary_is_written_between_its_markers_only(tmp_path, capsys):
    copy_published(tmp_path)
    readme = tmp_path / README
    before, after = "# Title\n\nText above.\n\n", "\n\nText below, untouched.\n"
    readme.write_text(before + f"{BEGIN}\n| typed | 9.999 |\n{END}" + after)  # no AUROC can be 9.999
    assert main(["publish", "--root", str(tmp_path), "--check"]) == 1  # the typed table is not the artifacts'
    assert "README.md line" in capsys.readouterr().err
    assert main(["publish", "--root", str(tmp_path)]) == 0
    text = readme.read_text()
    assert text.startswith(before + BEGIN) and text.endswith(END + after) and "9.999 |" not in text
    assert "docs/results.md#poison-detection-on-every-attack" in text
    assert main(["publish", "--root", str(tmp_path), "--check"]) == 0
    readme.write_text(before + after)  # no markers: said, and the README is left alone
    assert main(["publish", "--root", str(tmp_path)]) == 0
    assert "has no <!-- results:begin -->" in capsys.readouterr().err and readme.read_text() == before + after


def test_the_hand_written_preface_of_results_md_is_kept(tmp_path, capsys):
    """Text above the generated part of docs/results.md (its GENERATED line) is the author's: publish keeps
    it as written; without the file, the generated part gets just the title."""
    copy_published(tmp_path)
    doc = tmp_path / RESULTS_MD
    generated = GENERATED + doc.read_text().split(GENERATED, 1)[1]
    preface = "# Results\n\nWritten by hand: *being re-made* - the comparison table.\n\n"
    doc.write_text(preface + generated)
    assert main(["publish", "--root", str(tmp_path), "--check"]) == 0
    assert main(["publish", "--root", str(tmp_path)]) == 0 and doc.read_text() == preface + generated
    doc.unlink()
    assert main(["publish", "--root", str(tmp_path)]) == 0 and doc.read_text() == "# Results\n\n" + generated


@pytest.mark.parametrize("change, message", [
    (lambda spec: spec["tables"]["detection_every_attack"].update(artifact="experiments/results/nowhere"),
     "holds no detection_cells.csv"),
    (lambda spec: spec["tables"]["detection_every_attack"]["values"].update(no_such_column={}),
     "has no column no_such_column"),
    (lambda spec: spec["tables"]["detection_every_attack"].update(colour="red"), "unknown key(s) colour"),
    (lambda spec: spec["tables"]["detection_every_attack_3seeds"]["summary"].update(rows="seed"), "summary"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, change, message):
    copy_published(tmp_path)
    (tmp_path / RESULTS_MD).unlink()
    spec = yaml.safe_load((tmp_path / PUBLISHED).read_text())
    change(spec)
    (tmp_path / PUBLISHED).write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as exit_info:
        main(["publish", "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / RESULTS_MD).exists()


def test_broken_markers_are_refused(tmp_path, capsys):
    copy_published(tmp_path)
    readme = tmp_path / README
    readme.write_text(f"{END}\n{BEGIN}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["publish", "--root", str(tmp_path)])
    assert exit_info.value.code == 2 and "fix the markers" in capsys.readouterr().err
    assert readme.read_text() == f"{END}\n{BEGIN}\n"


# ----------------------------------------------------------------------------- publish: numbers from a real run


def cell_text(doc: str, key: str, column: str) -> str:
    """The cell of the 'Per row' table in row ``key`` (its first two columns, joined by ' | ') and ``column``."""
    lines = [line for line in doc.split("**Per row**")[1].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if " | ".join(cells[:2]) == key:
            return cells[header.index(column)]
    raise AssertionError(f"no row {key}")


def test_published_numbers_are_the_cells_per_seed_mean_std_and_range(digits_workdir, tmp_path):
    work, root = tmp_path / "work", tmp_path / "repo"
    for seed in (0, 1):  # one record per seed (copies of the digits record; the defense's seed differs)
        copy_record(digits_workdir, work, "badnet_digits")
        (work / "record" / "badnet_digits").rename(work / "record" / f"badnet_digits_s{seed}")
    # lr 0.1: at FT's own 0.01 one epoch left both seeds at the same ACC (98.33 %) on an Intel Xeon
    exp = experiment(work, "two_seeds", {"ft": {"overrides": {"epochs": 1, "lr": 0.1}}},
                     attacks={"badnet": {"record_name": "badnet_digits_s{seed}"}})
    assert main([str(exp), "--workdir", str(work)]) == 0
    artifact = root / "experiments" / "results" / "two_seeds"
    shutil.copytree(work / "compare" / "two_seeds", artifact,
                    ignore=shutil.ignore_patterns("logs", "state.json", ".lock"))
    (root / PUBLISHED).write_text(yaml.safe_dump({"tables": {"two_seeds": {
        "title": "FT on digits", "artifact": "experiments/results/two_seeds", "source": "cells.csv",
        "keys": ["defense", "attack"], "facts": ["budget"], "values": {"acc": {"label": "ACC (%)", "scale": 100, "digits": 2},
                                                 "asr": {"label": "ASR (%)", "scale": 100, "digits": 2}},
        "summary": {"value": "asr", "rows": "defense", "columns": "attack"}}}}))
    assert main(["publish", "--root", str(root)]) == 0
    doc = (root / RESULTS_MD).read_text()

    cells = pd.read_csv(artifact / "cells.csv").set_index(["defense", "seed"])
    acc = [cells.loc[("ft", seed), "acc"] * 100 for seed in (0, 1)]
    assert acc[0] != acc[1]  # two seeds, two numbers: the statistics below are not trivial
    assert cell_text(doc, "ft | badnet", "Seeds") == "2/2"
    assert cell_text(doc, "ft | badnet", "budget") == cells.loc[("ft", 0), "budget"] == "epochs 1 (default 100)"
    assert cell_text(doc, "ft | badnet", "ACC (%)") == f"{statistics.fmean(acc):.2f} ± {statistics.stdev(acc):.2f}"
    assert cell_text(doc, "ft | badnet", "ACC (%) min–max") == f"{min(acc):.2f}–{max(acc):.2f}"
    assert cell_text(doc, "ft | badnet", "ACC (%) per seed") == f"s0: {acc[0]:.2f}, s1: {acc[1]:.2f}"
    assert cell_text(doc, "ft | badnet", "Code") == expected_revision()["revision"][:12]
    assert f"Revision of the report: `{expected_revision()['revision']}`" in doc and "stale" not in doc
    assert "command: `burn-compare two_seeds.yaml --workdir .`" in doc  # paths in the work dir, relative to it

    # a cell made by other code: marked in its row and counted in the table's header
    restamp(work / "record" / "badnet_digits_s1" / "defense" / "ft" / "cost.json", "0" * 40)
    assert main([str(exp), "--workdir", str(work), "--collect-only"]) == 0
    shutil.copyfile(work / "compare" / "two_seeds" / "cells.csv", artifact / "cells.csv")
    assert main(["publish", "--root", str(root), "--check"]) == 1
    assert main(["publish", "--root", str(root)]) == 0
    doc = (root / RESULTS_MD).read_text()
    assert cell_text(doc, "ft | badnet", "Code").endswith("‡") and "0000000000" in cell_text(doc, "ft | badnet", "Code")
    assert "‡ 1 of 4 cells are stale" in doc
