"""Typed configs under BackdoorBench's YAML + CLI merge rule (spec §3.4).

A script's settings are one dataclass; its fields are the YAML keys and the ``--flags``. The parser
is generated from the dataclass (never hand-written per script). The merge is BackdoorBench's:
start from the dataclass defaults, overlay the ONE YAML file, then every flag given on the command
line (CLI wins). Unlike BackdoorBench, flags have no argparse defaults that silently beat the
YAML (its FT-SAM/ANP bug, spec §9.4), and values are type-checked: ``5e-5`` (a string to PyYAML)
becomes a float, ``--amp false`` a bool, ``--steplr_milestones 100,200`` a list of ints.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import BurnError

TRUE = {"true", "1", "yes", "y", "on"}
FALSE = {"false", "0", "no", "n", "off", "none", "null"}


def option(default: Any = None, help: str = "", short: str | None = None, choices=None, cli_only: bool = False,
           bare: str = "true", group: str | None = None):
    """A config field with its help text (and an optional short flag such as ``-pm``). A bool flag
    given without a value means ``bare`` (BackdoorBench's store_true flags; "false" for store_false).
    ``group`` lists the flag under that heading of ``--help``, after the ungrouped ones."""
    meta = {"help": help, "short": short, "choices": choices, "cli_only": cli_only, "bare": bare, "group": group}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --------------------------------------------------------------------------- type handling

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def coerce(value: Any, tp, key: str, source: str):
    """Convert ``value`` (from YAML or the CLI) to the annotated type, or raise a clear error."""
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise BurnError(f"{source}: '{key}' must not be empty; give it a value")
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", "~"):
        return None
    try:
        return _coerce(value, base)
    except (TypeError, ValueError):
        raise BurnError(f"{source}: '{key}' must be {_type_name(base)}, got {value!r}; "
                        f"fix the YAML value or pass --{key}") from None


def _coerce(value, tp):
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        text = str(value).strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return int(str(value).strip())
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(value)
        return str(value)
    if origin in (list, tuple):
        items = _as_list(value)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(value)
            return tuple(_coerce(v, a) for v, a in zip(items, args))
        inner = args[0] if args else str
        out = [_coerce(v, inner) for v in items]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    return tp(value)


def _as_list(value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    text = str(value).strip()
    if text.startswith("["):
        parsed = yaml.safe_load(text)
        if not isinstance(parsed, list):
            raise ValueError(value)
        return parsed
    return [v for v in (p.strip() for p in text.split(",")) if v != ""]


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        inner = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"a list of {inner}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


# --------------------------------------------------------------------------- parser and merge

def build_parser(config_cls, prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one ``--field`` per dataclass field, all defaulting to None."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = _hints(config_cls)
    fields = dataclasses.fields(config_cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in sorted(fields, key=lambda f: f.metadata.get("group") is not None):  # stable: ungrouped first
        group = f.metadata.get("group")
        target = parser if group is None else groups.setdefault(group, parser.add_argument_group(group))
        names = [f"--{f.name}"]
        if f.metadata.get("short"):
            names.insert(0, f.metadata["short"])
        base, _ = _strip_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} [{_type_name(base)}; default {default!r}]" if help_text else \
            f"[{_type_name(base)}; default {default!r}]"
        bare = {"nargs": "?", "const": f.metadata.get("bare", "true")} if base is bool else {}
        target.add_argument(*names, dest=f.name, default=None, type=str, metavar=f.name.upper(),
                            help=help_text.replace("%", "%%"), **bare)
    return parser


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BurnError(f"YAML file {path} not found; check --yaml_path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        loc = f" at line {where.line + 1}" if where is not None else ""
        raise BurnError(f"YAML file {path} is not valid YAML{loc}: {getattr(err, 'problem', err)}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BurnError(f"YAML file {path} must hold a mapping of keys to values, not a {type(data).__name__}")
    return data


def merge(config_cls, yaml_values: dict, cli_values: dict, yaml_source: str = "YAML"):
    """BackdoorBench's rule: defaults < the one YAML < non-None CLI values. Returns
    ``(config, ignored_yaml_keys)``; keys the config does not know are reported, not fatal,
    because BackdoorBench's own YAML files carry unused keys (spec §7)."""
    hints = _hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    ignored = sorted(k for k in yaml_values if k not in fields)
    for key, raw in yaml_values.items():
        if key in fields and not fields[key].metadata.get("cli_only"):
            values[key] = coerce(raw, hints[key], key, yaml_source)
    for key, raw in cli_values.items():
        if raw is not None and key in fields:
            values[key] = coerce(raw, hints[key], key, "command line")
    try:
        cfg = config_cls(**values)
    except TypeError as err:
        raise BurnError(f"bad configuration: {err}") from None
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg, ignored


def parse_config(config_cls, argv, prog: str, description: str = "", default_yaml=None):
    """Parse ``argv``, read the YAML (``--yaml_path`` or ``default_yaml(cli_values)``), merge.

    Returns ``(config, yaml_path or None, ignored_yaml_keys)``.
    """
    parser = build_parser(config_cls, prog, description)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise BurnError(f"unknown option(s) {' '.join(unknown)}; see {prog} --help")
    cli = vars(args)
    yaml_path = cli.get("yaml_path")
    if yaml_path is None and default_yaml is not None:
        yaml_path = default_yaml(cli)
    yaml_values = load_yaml(yaml_path) if yaml_path else {}
    cfg, ignored = merge(config_cls, yaml_values, cli, yaml_source=str(yaml_path or "YAML"))
    if hasattr(cfg, "yaml_path") and yaml_path is not None:
        cfg.yaml_path = str(yaml_path)
    return cfg, yaml_path, ignored


def as_dict(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def repo_root() -> Path:
    """The checkout this package lives in (for default config paths when run elsewhere)."""
    return Path(__file__).resolve().parent.parent


def find_config_file(*relative: str) -> Path | None:
    """First existing file among ``relative`` paths, looked up in the CWD, then in the repo."""
    for rel in relative:
        for base in (Path.cwd(), repo_root()):
            candidate = base / rel
            if candidate.is_file():
                return candidate
    return None
