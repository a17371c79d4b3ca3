"""`burn-compare publish` writes docs/results.md and the README's summary from committed reports: the
committed ones must match what the generator gives (a hand-edited number fails), its numbers are the
cells' own (every seed, mean ± std, min–max), stale cells are marked, bad input is one line."""
from __future__ import annotations

import json
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
        for artifact in table["artifact"] if isinstance(table["artifact"], list) else [table["artifact"]]:
            shutil.copytree(REPO / artifact, root / artifact)


def test_a_hand_edited_number_fails_the_check(tmp_path, capsys):
    copy_published(tmp_path)
    assert main(["publish", "--root", str(tmp_path), "--check"]) == 0
    doc = tmp_path / RESULTS_MD
    text = doc.read_text()
    offset = text.index("**Per row**")
    number = re.search(r"(?<=\| )\d\.\d{3}(?=[ |])", text[offset:])  # a table cell's first number
    edited = f"{float(number.group(0)) + 0.001:.3f}"
    at = offset + number.start()
    doc.write_text(text[:at] + edited + text[at + len(number.group(0)):])
    capsys.readouterr()
    assert main(["publish", "--root", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{RESULTS_MD} line" in err and edited in err and number.group(0) in err
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


def two_seed_report(digits_workdir, work: Path, root: Path, seeds=(0, 1), name: str = "two_seeds") -> Path:
    """FT on copies of the digits record, one per seed, run by burn-compare in ``work``; its report copied
    to ``root/experiments/results/<name>`` as an artifact is committed. Returns the experiment file."""
    for seed in seeds:  # one record per seed (copies of the digits record; the defense's seed differs)
        copy_record(digits_workdir, work, "badnet_digits")
        (work / "record" / "badnet_digits").rename(work / "record" / f"badnet_digits_s{seed}")
    exp = experiment(work, "two_seeds", {"ft": {"overrides": {"epochs": 1, "lr": 0.1}}},
                     attacks={"badnet": {"record_name": "badnet_digits_s{seed}"}})
    assert main([str(exp), "--workdir", str(work)]) == 0
    shutil.copytree(work / "compare" / "two_seeds", root / "experiments" / "results" / name,
                    ignore=shutil.ignore_patterns("logs", "state.json", ".lock"))
    return exp


# ACC can tie between the two seeds (98.33 % for both on an Intel Xeon at FT's lr 0.01, 98.06 % on an AMD
# EPYC at 0.1: 360 test images), so the statistics are checked on the wall time too, which never ties
TWO_SEEDS_TABLE = {
    "title": "FT on digits", "artifact": "experiments/results/two_seeds", "source": "cells.csv",
    "keys": ["defense", "attack"], "facts": ["budget"],
    "values": {"acc": {"label": "ACC (%)", "scale": 100, "digits": 2}, "asr": {"label": "ASR (%)", "scale": 100, "digits": 2},
               "wall_time_s": {"label": "Wall (s)", "digits": 4}},
    "summary": {"value": "asr", "rows": "defense", "columns": "attack"}}


def test_published_numbers_are_the_cells_per_seed_mean_std_and_range(digits_workdir, tmp_path):
    work, root = tmp_path / "work", tmp_path / "repo"
    exp = two_seed_report(digits_workdir, work, root)
    artifact = root / "experiments" / "results" / "two_seeds"
    (root / PUBLISHED).write_text(yaml.safe_dump({"tables": {"two_seeds": TWO_SEEDS_TABLE}}))
    assert main(["publish", "--root", str(root)]) == 0
    doc = (root / RESULTS_MD).read_text()

    cells = pd.read_csv(artifact / "cells.csv").set_index(["defense", "seed"])
    assert cell_text(doc, "ft | badnet", "Seeds") == "2/2"
    assert cell_text(doc, "ft | badnet", "budget") == cells.loc[("ft", 0), "budget"] == "epochs 1 (default 100)"
    for column, label, scale, digits in (("acc", "ACC (%)", 100, 2), ("wall_time_s", "Wall (s)", 1, 4)):
        values = [cells.loc[("ft", seed), column] * scale for seed in (0, 1)]
        assert cell_text(doc, "ft | badnet", label) == \
            f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
        assert cell_text(doc, "ft | badnet", f"{label} min–max") == f"{min(values):.{digits}f}–{max(values):.{digits}f}"
        assert cell_text(doc, "ft | badnet", f"{label} per seed") == f"s0: {values[0]:.{digits}f}, s1: {values[1]:.{digits}f}"
    walls = [cells.loc[("ft", seed), "wall_time_s"] for seed in (0, 1)]
    assert walls[0] != walls[1] and "± 0.0000" not in cell_text(doc, "ft | badnet", "Wall (s)")
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


def clean_checkout(report: Path) -> None:
    """The part as made from a clean checkout (the suite may run in one with uncommitted changes)."""
    path = report / "report.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "dirty": False}))


def test_a_table_from_parts_is_the_table_of_the_whole_run(digits_workdir, tmp_path, capsys):
    """A run continued on another machine is published from its parts: the merged table is exactly the
    table of the report that holds every cell; a record made again in a later part replaces the earlier
    making whole (said in the header); parts of other revisions or experiments are refused."""
    work, root = tmp_path / "work", tmp_path / "repo"
    exp = two_seed_report(digits_workdir, work, root)
    (root / PUBLISHED).write_text(yaml.safe_dump({"tables": {"two_seeds": TWO_SEEDS_TABLE}}))
    assert main(["publish", "--root", str(root)]) == 0
    whole = (root / RESULTS_MD).read_text()

    # part 1 holds seed 0 only, part 2 seed 1 only: each is the report of the same experiment file
    results = root / "experiments" / "results"
    for part, keep in (("part1", 0), ("part2", 1)):
        shutil.move(work / "record" / f"badnet_digits_s{1 - keep}", tmp_path / "aside")
        assert main([str(exp), "--workdir", str(work), "--collect-only"]) == 0
        shutil.move(tmp_path / "aside", work / "record" / f"badnet_digits_s{1 - keep}")
        shutil.copytree(work / "compare" / "two_seeds", results / part,
                        ignore=shutil.ignore_patterns("logs", "state.json", ".lock"))
        clean_checkout(results / part)
    part1 = pd.read_csv(results / "part1" / "cells.csv")
    assert set(part1.loc[part1["status"] == "done", "seed"]) == {0}  # each part alone is half the run
    parts = {**TWO_SEEDS_TABLE, "artifact": ["experiments/results/part1", "experiments/results/part2"]}
    (root / PUBLISHED).write_text(yaml.safe_dump({"tables": {"two_seeds": parts}}))
    assert main(["publish", "--root", str(root)]) == 0
    merged = (root / RESULTS_MD).read_text()
    numbers = lambda doc: doc.split("**Per row**")[1]  # the header names the artifacts; the rows must not differ
    assert numbers(merged) == numbers(whole) and "4 of 4 cells have results" in merged
    assert "2 parts of one run" in merged and "Replaced" not in merged

    # seed 0 made again in part 2 (here: its outputs copied back): part 2's making is used, and said
    shutil.rmtree(results / "part2")
    assert main([str(exp), "--workdir", str(work), "--collect-only"]) == 0
    shutil.copytree(work / "compare" / "two_seeds", results / "part2",
                    ignore=shutil.ignore_patterns("logs", "state.json", ".lock"))
    clean_checkout(results / "part2")
    cells = pd.read_csv(results / "part2" / "cells.csv")
    cells.loc[cells["seed"] == 0, "wall_time_s"] += 1000.0  # tells the two makings of seed 0 apart
    cells.to_csv(results / "part2" / "cells.csv", index=False)
    assert main(["publish", "--root", str(root)]) == 0
    merged = (root / RESULTS_MD).read_text()
    walls = cells.set_index(["defense", "seed"])["wall_time_s"]
    assert cell_text(merged, "ft | badnet", "Wall (s) per seed") == f"s0: {walls['ft', 0]:.4f}, s1: {walls['ft', 1]:.4f}"
    assert "- Replaced: badnet_digits_s0: made again in experiments/results/part2; its 2 earlier cell(s) in " \
           "experiments/results/part1 are not used" in merged

    # a part from another revision (or another experiment) is refused in one line, nothing written
    report = results / "part2" / "report.json"
    facts = json.loads(report.read_text())
    report.write_text(json.dumps({**facts, "revision": "0" * 40}))
    (root / RESULTS_MD).unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["publish", "--root", str(root)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "one experiment at one revision" in err and len(err.strip().splitlines()) == 1
    assert not (root / RESULTS_MD).exists()
    report.write_text(json.dumps({**facts, "dirty": True}))
    with pytest.raises(SystemExit):
        main(["publish", "--root", str(root)])
    assert "uncommitted changes" in capsys.readouterr().err
