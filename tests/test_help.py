"""``--help`` of every command line, read the way a newcomer reads it: each flag states its default
once, required flags say so (and their absence is one line, exit 2), and the flags a method accepts
only so that BackdoorBench's command lines and YAML files keep working are listed apart, under a
heading that says the method does not read them."""
from __future__ import annotations

import re

import pytest

from burnkit.attack import get_attack, list_attacks
from burnkit.compare.cli import build_parser as compare_parser
from burnkit.config import UNUSED_GROUP, build_parser, help_line, option, unused_fields
from burnkit.defense import get_defense, list_defenses
from burnkit.detector import get_detector, list_detectors
from burnkit.resources.__main__ import GENERATORS

METHODS = ([("defense", n, get_defense(n)) for n in list_defenses()]
           + [("attack", n, get_attack(n)) for n in list_attacks()]
           + [("detector", n, get_detector(n)) for n in list_detectors()])
IDS = [f"{kind}:{name}" for kind, name, _ in METHODS]
# a statement of a default; config/attack/<attack>/default.yaml is a file name, not one
DEFAULT = re.compile(r"\bdefault\b(?!\.yaml)", re.IGNORECASE)


def help_of(parse, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        parse(["--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def sections(text: str) -> dict[str, list[str]]:
    """``{section title: [one string per flag: its names and its whole, unwrapped help]}``."""
    out: dict[str, list[str]] = {}
    title = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            out[title] = []
        elif title is not None and line.startswith("  -"):
            out[title].append(line.strip())
        elif title is not None and line.startswith("      ") and out[title]:
            out[title][-1] += " " + line.strip()
    return out


def flag_of(entry: str) -> str:
    return next(word for word in entry.split() if word.startswith("--")).rstrip(",")


def required_fields(cls) -> list[str]:
    import dataclasses
    return [f.name for f in dataclasses.fields(cls.config_cls) if f.metadata.get("required")]


@pytest.mark.parametrize("kind,name,cls", METHODS, ids=IDS)
def test_every_flag_states_its_default_once(kind, name, cls, capsys):
    text = help_of(cls.parse, capsys)
    entries = [e for group in sections(text).values() for e in group]
    assert len(entries) > 20  # every section was read
    for entry in entries:
        assert "(default: " not in entry, entry  # argparse's own, second statement
        assert len(DEFAULT.findall(entry)) <= 1, entry


@pytest.mark.parametrize("kind,name,cls", METHODS, ids=IDS)
def test_required_flags_are_marked_and_enforced(kind, name, cls, capsys, tmp_path, monkeypatch):
    text = help_of(cls.parse, capsys)
    entries = {flag_of(e): e for group in sections(text).values() for e in group}
    usage = text.split("\n\n")[0]
    required = required_fields(cls)
    assert required == ([] if kind == "attack" else ["result_file"])
    for flag in required:
        assert "[required;" in entries[f"--{flag}"]
        assert f"--{flag} " in usage and f"[--{flag}" not in usage
    for flag, entry in entries.items():
        if flag[2:] not in required:
            assert "required" not in entry.split("[")[-1], entry
    if required:  # run without it: one line, exit 2, nothing written
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as stop:
            cls.main([])
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2
        assert len(err.splitlines()) == 1 and "--result_file is required" in err
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind,name,cls", METHODS, ids=IDS)
def test_unused_flags_are_listed_apart(kind, name, cls, capsys):
    text = help_of(cls.parse, capsys)
    groups = sections(text)
    title = UNUSED_GROUP.format(method=name)
    ignored = unused_fields(cls.config_cls, cls.ignored_flags())
    listed = {flag_of(e) for e in groups.get(title, [])}
    assert listed == {f"--{f}" for f in ignored}
    for heading, entries in groups.items():
        if heading != title:
            assert not {flag_of(e) for e in entries} & listed, heading
    for entry in groups.get(title, []):
        assert "default" not in entry.split("[")[-1], entry  # a flag that changes nothing has no default worth stating


def test_burn_lists_the_clean_subset_and_bb_only_flags_as_unused(capsys):
    groups = sections(help_of(get_defense("burn").parse, capsys))
    unused = {flag_of(e) for e in groups[UNUSED_GROUP.format(method="burn")]}
    assert {"--ratio", "--index", "--checkpoint_load", "--pin_memory", "--num_workers"} <= unused
    for heading, entries in groups.items():
        if not heading.startswith("compatibility"):
            assert not {"--ratio", "--index"} & {flag_of(e) for e in entries}, heading
    # BURN fine-tunes through the engine, so an optimiser/schedule flag it is given takes effect
    used = {flag_of(e) for heading, entries in groups.items() if heading != UNUSED_GROUP.format(method="burn")
            for e in entries}
    assert {"--lr", "--client_optimizer", "--lr_scheduler", "--sgd_momentum", "--steplr_gamma"} <= used


def test_defenses_without_clean_data_list_ratio_and_index_as_unused(capsys):
    for name in list_defenses():
        cls = get_defense(name)
        groups = sections(help_of(cls.parse, capsys))
        unused = {flag_of(e) for e in groups.get(UNUSED_GROUP.format(method=name), [])}
        assert ({"--ratio", "--index"} <= unused) == (not cls.needs_clean_subset), name


@pytest.mark.parametrize("what", sorted(GENERATORS))
def test_resource_generators_state_each_default_once(what, capsys):
    parser = build_parser(GENERATORS[what][0], f"python -m burnkit.resources {what}")
    entries = [e for group in sections(help_of(parser.parse_args, capsys)).values() for e in group]
    assert entries
    for entry in entries:
        assert "(default: " not in entry and len(DEFAULT.findall(entry)) <= 1, entry


def test_compare_help_states_each_default_once(capsys):
    entries = [e for group in sections(help_of(compare_parser().parse_args, capsys)).values() for e in group]
    assert entries
    for entry in entries:
        assert len(DEFAULT.findall(entry)) <= 1, entry


def test_help_line_shows_what_a_default_means():
    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        record: str | None = option(None, "the record", required=True)
        betas: tuple[float, float] = option((0.9, 0.999), "betas")
        device: str | None = option(None, "device", default_help="cuda if present")
        amp: bool = option(False, "mixed precision")
        workers: int = option(4, "DataLoader workers", unused=True)

    fields = {f.name: f for f in dataclasses.fields(Cfg)}
    hints = {"record": str | None, "betas": tuple[float, float], "device": str | None, "amp": bool, "workers": int}
    assert help_line(fields["record"], hints["record"]) == "the record [required; a string]"
    assert help_line(fields["betas"], hints["betas"]) == "betas [a list of 2 finite numbers; default: 0.9,0.999]"
    assert help_line(fields["device"], hints["device"]) == "device [a string; default: cuda if present]"
    assert help_line(fields["amp"], hints["amp"]) == "mixed precision [true or false; default: false]"
    assert help_line(fields["workers"], hints["workers"], unused=True) == "DataLoader workers [an integer]"
    assert unused_fields(Cfg) == {"workers"}
    with pytest.raises(ValueError, match="no field lr"):
        unused_fields(Cfg, ("lr",))
