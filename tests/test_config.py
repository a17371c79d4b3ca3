"""BackdoorBench's YAML + CLI merge with typed values (spec §3.4, §9.4)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from burnkit.config import load_yaml, merge, option, parse_config
from burnkit.errors import BurnError


@dataclass
class _Cfg:
    yaml_path: str | None = option(None)
    lr: float = option(0.01)
    epochs: int = option(10)
    amp: bool = option(False)
    milestones: list[int] | None = option(None)
    betas: tuple[float, float] = option((0.9, 0.999))
    name: str = option("x")


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_cli_beats_yaml_beats_defaults(tmp_path):
    path = _write(tmp_path, "lr: 5e-5\nepochs: 3\nbetas: [0.5, 0.9]\n")
    cfg, yaml_path, ignored = parse_config(_Cfg, ["--yaml_path", path, "--epochs", "7", "--amp", "true"], "prog")
    assert cfg.lr == 5e-5 and isinstance(cfg.lr, float)  # PyYAML reads 5e-5 as a string
    assert cfg.epochs == 7 and cfg.amp is True and cfg.betas == (0.5, 0.9) and cfg.name == "x"
    assert ignored == []


def test_yaml_value_is_not_overridden_by_flag_defaults(tmp_path):
    """BackdoorBench's FT-SAM bug: argparse defaults silently beat the YAML. Here they cannot."""
    cfg, _, _ = parse_config(_Cfg, ["--yaml_path", _write(tmp_path, "amp: true\n")], "prog")
    assert cfg.amp is True


def test_list_flags_and_null(tmp_path):
    cfg, _, _ = parse_config(_Cfg, ["--milestones", "100,200"], "prog")
    assert cfg.milestones == [100, 200]
    cfg, _ = merge(_Cfg, {"milestones": None}, {})
    assert cfg.milestones is None


@pytest.mark.parametrize("text, message", [
    ("lr: fast\n", "'lr' must be a finite number"),
    ("lr: .nan\n", "'lr' must be a finite number"),
    ("iteratons: 5\nepochs: 1\n", "unknown key 'iteratons'"),
    ("epoch: 5\n", "unknown key 'epoch' \\(did you mean 'epochs'\\?\\)"),
    ("epochs: 2.5\n", "'epochs' must be an integer"),
    ("amp: maybe\n", "'amp' must be true or false"),
    ("- a\n- b\n", "must hold a mapping"),
    ("lr: [1, 2\n", "not valid YAML at line"),
])
def test_bad_yaml_is_reported(tmp_path, text, message):
    with pytest.raises(BurnError, match=message):
        parse_config(_Cfg, ["--yaml_path", _write(tmp_path, text)], "prog")


def test_missing_yaml_and_unknown_flag(tmp_path):
    with pytest.raises(BurnError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    with pytest.raises(BurnError, match="unknown option"):
        parse_config(_Cfg, ["--lrr", "1"], "prog")


# --------------------------------------------------------------------------- hostile YAML


def _bomb(levels: int) -> str:
    from test_bad_inputs import alias_bomb

    return alias_bomb(levels)


@pytest.mark.parametrize("levels", [7, 9])
def test_an_alias_bomb_is_refused_before_it_expands_in_a_short_message(tmp_path, levels):
    """A few hundred bytes of nested aliases (9**levels values) are refused while the file is read,
    in a message of ordinary length - never expanded, printed or converted."""
    with pytest.raises(BurnError) as err:
        parse_config(_Cfg, ["--yaml_path", _write(tmp_path, _bomb(levels))], "prog")
    assert "aliases that expand to more than" in str(err.value) and len(str(err.value)) < 300


def test_an_alias_bomb_given_on_the_command_line_is_refused(tmp_path):
    value = _bomb(7).split(": ", 1)[1].strip()
    with pytest.raises(BurnError) as err:
        parse_config(_Cfg, ["--milestones", value], "prog")
    assert "aliases that expand to more than" in str(err.value) and len(str(err.value)) < 300


def test_aliases_and_merge_keys_within_the_budget_still_work(tmp_path):
    """Shared settings through anchors and ``<<`` (experiments/burn_corpus/calibration.yaml uses them):
    an explicit key after a merge overrides the merged one, which is not a repeated key."""
    data = load_yaml(_write(tmp_path, "base: &b {epochs: 3, lr: 0.1}\nrun: {<<: *b, lr: 0.2}\nagain: *b\n"))
    base = {"epochs": 3, "lr": 0.1}
    assert data == {"base": base, "run": {"epochs": 3, "lr": 0.2}, "again": base}


@pytest.mark.parametrize("text, message", [
    ("lr: 0.1\nepochs: 1\nlr: 0.2\n", "key 'lr' is given twice (lines 1 and 3)"),
    ("run:\n  overrides: {epochs: 1, epochs: 2}\n", "key 'epochs' is given twice (lines 2 and 2)"),
])
def test_a_key_given_twice_is_refused_naming_the_key_and_the_file(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(BurnError) as err:
        load_yaml(path)
    assert message in str(err.value) and path in str(err.value)


def test_a_yaml_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"lr: 0.1\n# caf\xe9\n")
    with pytest.raises(BurnError, match="is not UTF-8 text"):
        load_yaml(path)


@pytest.mark.parametrize("text", [
    "name: [" + ", ".join(["1"] * 5000) + "]\n",
    "lr: " + "x" * 100_000 + "\n",
    "epochs: " + "9" * 100_000 + "\n",
])
def test_an_echoed_value_is_shortened(tmp_path, text):
    """A bad value is quoted in the message, but only its start: messages stay one short line."""
    with pytest.raises(BurnError) as err:
        parse_config(_Cfg, ["--yaml_path", _write(tmp_path, text)], "prog")
    assert len(str(err.value)) < 300
