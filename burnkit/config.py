"""Typed configs under BackdoorBench's YAML + CLI merge rule (spec §3.4).

A script's settings are one dataclass; its fields are the YAML keys and the ``--flags``. The parser
is generated from the dataclass (never hand-written per script). The merge is BackdoorBench's:
start from the dataclass defaults, overlay the ONE YAML file, then every flag given on the command
line (CLI wins). Unlike BackdoorBench, flags have no argparse defaults that silently beat the
YAML (its FT-SAM/ANP bug, spec §9.4), and values are type-checked: ``5e-5`` (a string to PyYAML)
becomes a float, ``--amp false`` a bool, ``--steplr_milestones 100,200`` a list of ints.

One validation layer for every script: a value must have its field's type, numbers must be finite,
a field's ``choices``/``low``/``above``/``high`` (declared with :func:`option`) are enforced, and a YAML
key the config does not know is an error that suggests the nearest key - unless the config lists it in
``YAML_COMPAT_KEYS`` (keys BackdoorBench's own YAML files carry but never read, spec §7), which are
accepted and reported as unused.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import BurnError, brief

TRUE = {"true", "1", "yes", "y", "on"}
FALSE = {"false", "0", "no", "n", "off", "none", "null"}


def option(default: Any = None, help: str = "", short: str | None = None, choices=None, cli_only: bool = False,
           bare: str = "true", group: str | None = None, low: float | None = None, above: float | None = None,
           high: float | None = None, required: bool = False, default_help: str | None = None, unused: bool = False):
    """A config field with its help text (and an optional short flag such as ``-pm``). A bool flag
    given without a value means ``bare`` (BackdoorBench's store_true flags; "false" for store_false).
    ``group`` lists the flag under that heading of ``--help``, after the ungrouped ones.

    ``choices`` (strings, matched case-insensitively and stored in the spelling given here) and the
    bounds ``low <= value``, ``above < value``, ``value <= high`` are checked for every value from
    the YAML or the command line (for lists: every element).

    ``--help`` states the default once, after the help text; ``default_help`` replaces the value
    there when the value says nothing by itself (a ``None`` that the run fills in, e.g. "the
    record's"), so the help text must not state it again. ``required`` marks a flag the run cannot
    do without (the run, not argparse, refuses its absence: a YAML file may give it too).
    ``unused`` marks a flag kept only so that BackdoorBench's command lines and YAML files work: no
    method reading this config uses it, and ``--help`` lists it apart (:func:`build_parser`)."""
    meta = {"help": help, "short": short, "choices": choices, "cli_only": cli_only, "bare": bare, "group": group,
            "low": low, "above": above, "high": high, "required": required, "default_help": default_help,
            "unused": unused}
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
    except BurnError as err:  # a list written in YAML that cannot be read
        shown = f"--{key}" if source == "command line" else f"'{key}'"
        raise BurnError(f"{source}: {shown}: {err}") from None
    except (TypeError, ValueError):
        if source == "command line":
            raise BurnError(f"command line: --{key} must be {_type_name(base)}, got {brief(value)}") from None
        raise BurnError(f"{source}: '{key}' must be {_type_name(base)}, got {brief(value)}; "
                        f"fix the YAML value or pass --{key}") from None


def _coerce(value, tp):
    origin = typing.get_origin(tp)
    if tp in (bool, int, float) and isinstance(value, (list, tuple, dict)):
        raise ValueError("not a single value")  # never turned into text to be parsed
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
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(value)
        return number
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
        parsed = parse_yaml(text, "the value")
        if not isinstance(parsed, list):
            raise ValueError(value)
        return parsed
    return [v for v in (p.strip() for p in text.split(",")) if v != ""]


PLURALS = {bool: "true/false values", int: "integers", float: "finite numbers", str: "strings"}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        fixed = origin is tuple and args and Ellipsis not in typing.get_args(tp)
        inner = PLURALS.get(args[0], str(args[0])) if args else "values"
        return f"a list of {len(args)} {inner}" if fixed and len(set(args)) == 1 else f"a list of {inner}"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(tp, str(tp))


RULES = ("choices", "low", "above", "high")


def field_rules(config_cls) -> dict[str, dict]:
    """Per field, its ``choices``/bounds: a subclass that redeclares a field to change its default
    keeps the rules a base class declared for it unless it declares its own."""
    rules: dict[str, dict] = {}
    for klass in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for f in dataclasses.fields(klass):
            mine = {k: f.metadata.get(k) for k in RULES if f.metadata.get(k) is not None}
            rules[f.name] = {**rules.get(f.name, {}), **mine}
    return rules


def check_field(name: str, rules: dict, value: Any, source: str) -> Any:
    """Enforce a field's declared ``choices`` and bounds on an already coerced value; return the
    value with choices in their canonical spelling."""
    meta = rules
    shown = f"--{name}" if source == "command line" else f"'{name}'"
    if value is None:
        return value
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    choices = meta.get("choices")
    out = []
    for item in items:
        if choices is not None and isinstance(item, str):
            canonical = {str(c).lower(): c for c in choices}
            if item.lower() not in canonical:
                near = difflib.get_close_matches(item, [str(c) for c in choices], n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise BurnError(f"{source}: {shown} must be one of {', '.join(map(str, choices))}, "
                                f"got {brief(item)}{hint}")
            item = canonical[item.lower()]
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            low, above, high = meta.get("low"), meta.get("above"), meta.get("high")
            if (low is not None and item < low) or (above is not None and item <= above) or \
                    (high is not None and item > high):
                lower = f">= {low}" if low is not None else (f"> {above}" if above is not None else None)
                upper = f"<= {high}" if high is not None else None
                rule = " and ".join(r for r in (lower, upper) if r)
                raise BurnError(f"{source}: {shown} must be {rule}, got {brief(item)}")
        out.append(item)
    if isinstance(value, (list, tuple)):
        return type(value)(out)
    return out[0]


def suggest(name: str, known) -> str:
    """`` (did you mean 'x'?)`` for the nearest of ``known``, or an empty string."""
    near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def compat_keys(config_cls) -> frozenset:
    """BackdoorBench YAML keys ``config_cls`` accepts without using them (``YAML_COMPAT_KEYS``)."""
    return frozenset(getattr(config_cls, "YAML_COMPAT_KEYS", ()))


# --------------------------------------------------------------------------- parser and merge

class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (a flag without its value, ...) are one-line :class:`BurnError`s
    rather than a usage dump; abbreviations are off, so ``--epoch`` is a typo, not ``--epochs``."""

    def error(self, message):
        raise BurnError(f"{message}; see {self.prog} --help")


PRECEDENCE = "A value given on the command line overrides the YAML's (--yaml_path), which overrides the default shown."
UNUSED_GROUP = "compatibility flags (accepted, unused by {method})"
UNUSED_DESCRIPTION = ("BackdoorBench's flags and the flags burnkit's methods share, accepted so that one command "
                      "line or YAML file serves them all; {method} does not read them.")


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _shown(value) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(v) for v in value) if value else "none"
    if isinstance(value, str):
        return value if value.strip() else repr(value)
    return str(value)


def help_line(f: dataclasses.Field, tp, unused: bool = False) -> str:
    """A field's ``--help`` text: what it does, then ``[required; TYPE]`` or ``[TYPE; default: X]``
    (the one place a default is stated; a flag the method does not read has none worth stating)."""
    base, _ = _strip_optional(tp)
    meta = f.metadata
    if unused:
        facts = _type_name(base)
    elif meta.get("required"):
        facts = f"required; {_type_name(base)}"
    else:
        default = meta.get("default_help") or _shown(_field_default(f))
        facts = f"{_type_name(base)}; default: {default}"
    text = meta.get("help", "")
    return f"{text} [{facts}]" if text else f"[{facts}]"


def unused_fields(config_cls, unused=()) -> set[str]:
    """The fields of ``config_cls`` that a method accepts without reading: those declared with
    ``option(unused=True)`` and the method's own ``unused`` list (names must be fields)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(unused) - names)
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no field {', '.join(unknown)} to list as unused")
    return {f.name for f in dataclasses.fields(config_cls) if f.metadata.get("unused")} | set(unused)


def build_parser(config_cls, prog: str, description: str = "", unused=(), method: str | None = None
                 ) -> argparse.ArgumentParser:
    """An argparse parser with one ``--field`` per dataclass field, all defaulting to None (so that
    a flag not given leaves the YAML's value in place).

    ``--help`` is written for a reader: the usage line names the required flags only; each flag
    states its default once (:func:`help_line`); required flags come first; flags grouped with
    ``option(group=...)`` follow under their heading; last, under :data:`UNUSED_GROUP`, the flags
    ``method`` accepts but does not read (:func:`unused_fields`)."""
    fields = dataclasses.fields(config_cls)
    method = method or prog
    ignored = unused_fields(config_cls, unused)
    required = [f for f in fields if f.metadata.get("required") and f.name not in ignored]
    usage = " ".join([prog, *(f"--{f.name} {f.name.upper()}" for f in required), "[options]"])
    has_yaml = any(f.name == "yaml_path" for f in fields)
    parser = OneLineArgumentParser(prog=prog, usage=usage, description=description, allow_abbrev=False,
                                   epilog=PRECEDENCE if has_yaml else None)
    hints = _hints(config_cls)
    groups: dict[str, argparse._ArgumentGroup] = {}

    def group(title: str, description: str | None = None) -> argparse._ArgumentGroup:
        if title not in groups:  # created on first use: argparse prints a described group even when empty
            groups[title] = parser.add_argument_group(title, description)
        return groups[title]

    def place(f) -> int:  # the sort is stable: required, ungrouped, grouped, unused
        if f.name in ignored:
            return 3
        return 0 if f.metadata.get("required") else 2 if f.metadata.get("group") else 1

    for f in sorted(fields, key=place):
        if f.name in ignored:
            target = group(UNUSED_GROUP.format(method=method), UNUSED_DESCRIPTION.format(method=method))
        elif f.metadata.get("group") is not None:
            target = group(f.metadata["group"])
        else:
            target = parser
        names = [f"--{f.name}"]
        if f.metadata.get("short"):
            names.insert(0, f.metadata["short"])
        base, _ = _strip_optional(hints[f.name])
        bare = {"nargs": "?", "const": f.metadata.get("bare", "true")} if base is bool else {}
        target.add_argument(*names, dest=f.name, default=None, type=str, metavar=f.name.upper(),
                            help=help_line(f, hints[f.name], f.name in ignored).replace("%", "%%"), **bare)
    return parser


def parse_cli(parser: argparse.ArgumentParser, config_cls, argv, prog: str) -> dict:
    """``{field: raw string or None}`` from ``argv``; an unknown flag is an error naming the
    nearest known one."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        first = unknown[0]
        names = {f.name for f in dataclasses.fields(config_cls)}
        hint = suggest(first.lstrip("-").split("=")[0], names) if first.startswith("-") else ""
        hint = hint.replace(" (did you mean '", " (did you mean '--") if hint else ""
        what = "unknown option" if first.startswith("-") else "unexpected argument"
        raise BurnError(f"{what} {' '.join(unknown)}{hint}; see {prog} --help")
    return vars(args)


MAX_YAML_BYTES = 1 << 20  # a settings file; anything larger is not one
ALIAS_BUDGET = 10_000  # values that aliases may add to one YAML document, all aliases together


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the limits a file from elsewhere needs (YAML files are shared like
    records). An alias (``*name``) repeats an anchored value, so a few hundred bytes of nested
    aliases stand for billions of values that printing or converting would expand: here aliases may
    add at most :data:`ALIAS_BUDGET` values in all and may not refer to a value that contains them.
    A key given twice in one mapping is refused (PyYAML silently keeps the last); a key merged with
    ``<<`` and then given explicitly is an override, not a repeat. Everything is checked while the
    document is composed, before any value is built."""

    MERGE = "tag:yaml.org,2002:merge"

    def __init__(self, text: str, source: str):
        super().__init__(text)
        self.source = source
        self.sizes: dict[int, int] = {}  # id(node) -> the values it stands for, aliases expanded
        self.aliased = 0

    def compose_node(self, parent, index):
        is_alias = self.check_event(yaml.AliasEvent)
        line = self.peek_event().start_mark.line + 1
        node = super().compose_node(parent, index)
        if is_alias:
            size = self.sizes.get(id(node))
            if size is None:  # the anchored value is still being composed: it contains this alias
                raise BurnError(f"{self.source}: the alias at line {line} refers to a value that contains it; "
                                "write the value out")
            self.aliased += size
            if self.aliased > ALIAS_BUDGET:
                raise BurnError(f"{self.source} holds aliases that expand to more than {ALIAS_BUDGET} values "
                                f"(line {line}); write the values out")
            return node
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        self.sizes[id(node)] = 1 + sum(self.sizes[id(child)] for child in children)
        return node

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple, int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == self.MERGE:
                continue
            line, ident = key.start_mark.line + 1, (key.tag, key.value)
            if ident in seen:
                raise BurnError(f"{self.source}: key {brief(key.value)} is given twice (lines {seen[ident]} and "
                                f"{line}); keep one")
            seen[ident] = line
        return node


def parse_yaml(text: str, source: str):
    """YAML ``text`` as Python values through :class:`_BoundedLoader`; every problem is a one-line
    :class:`BurnError` that starts with ``source``."""
    loader = _BoundedLoader(text, source)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        loc = f" at line {where.line + 1}" if where is not None else ""
        problem = str(getattr(err, "problem", None) or err)[:200]
        raise BurnError(f"{source} is not valid YAML{loc}: {problem}; fix it") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise BurnError(f"{source} holds a value that cannot be read ({str(err)[:120]}); fix it") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    """A YAML file of settings (a mapping), read as UTF-8 through :func:`parse_yaml`."""
    path = Path(path)
    if not path.is_file():
        raise BurnError(f"YAML file {path} not found; check --yaml_path")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise BurnError(f"YAML file {path} is {size} bytes, more than a settings file's {MAX_YAML_BYTES}; "
                        "check the path")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BurnError(f"YAML file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                        f"{err.start}); save it as UTF-8") from None
    data = parse_yaml(text, f"YAML file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BurnError(f"YAML file {path} must hold a mapping of keys to values, not a {type(data).__name__}")
    return data


def check_yaml_keys(config_cls, yaml_values: dict, source: str) -> None:
    """Every key must be a field of ``config_cls`` or one of its ``YAML_COMPAT_KEYS``."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    compat = compat_keys(config_cls)
    for key in yaml_values:
        if not isinstance(key, str):
            raise BurnError(f"{source}: key {brief(key)} is not a name; YAML keys are option names such as 'lr'")
        if key not in fields and key not in compat:
            raise BurnError(f"{source}: unknown key {brief(key)}{suggest(key, fields)}; fix or remove it "
                            "(see --help for the keys)")


def merge(config_cls, yaml_values: dict, cli_values: dict, yaml_source: str = "YAML"):
    """BackdoorBench's rule: defaults < the one YAML < non-None CLI values. Returns
    ``(config, ignored_yaml_keys)``. A YAML key the config does not know is an error (with the
    nearest key as a hint), except the BackdoorBench keys the config declares in
    ``YAML_COMPAT_KEYS``: those are returned as ignored, for the log."""
    hints = _hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    rules = field_rules(config_cls)
    values: dict[str, Any] = {}
    check_yaml_keys(config_cls, yaml_values, yaml_source)
    ignored = sorted(k for k in yaml_values if k not in fields)
    for key, raw in yaml_values.items():
        if key in fields and not fields[key].metadata.get("cli_only"):
            values[key] = check_field(key, rules[key], coerce(raw, hints[key], key, yaml_source), yaml_source)
    for key, raw in cli_values.items():
        if raw is not None and key in fields:
            values[key] = check_field(key, rules[key], coerce(raw, hints[key], key, "command line"), "command line")
    try:
        cfg = config_cls(**values)
    except TypeError as err:
        raise BurnError(f"bad configuration: {err}") from None
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg, ignored


def parse_config(config_cls, argv, prog: str, description: str = "", default_yaml=None, unused=(),
                 method: str | None = None):
    """Parse ``argv``, read the YAML (``--yaml_path`` or ``default_yaml(cli_values)``), merge.
    ``unused``/``method``: see :func:`build_parser`.

    Returns ``(config, yaml_path or None, ignored_yaml_keys)``.
    """
    parser = build_parser(config_cls, prog, description, unused, method)
    cli = parse_cli(parser, config_cls, argv, prog)
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
