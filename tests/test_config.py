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
