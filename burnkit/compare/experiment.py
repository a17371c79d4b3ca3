"""An experiment YAML, validated and expanded into cells (see docs/compare.md for the schema).

A *record cell* runs ``attack/<attack>.py`` once per (dataset, model, attack entry, seed) and writes
``record/<record_name>/``; a *defense cell* runs ``defense/<defense>.py`` on one record and writes
``record/<record_name>/defense/<entry>/`` (spec §3.7). Entries are named, so one script can appear
several times with different overrides (``ft-short: {defense: ft, overrides: {epochs: 1}}``); an entry
whose name differs from its script gets ``--output_name <entry>`` so the variants do not share a folder.
A *detection cell* runs ``detection_pretrain/<detector>.py`` on one record and writes BackdoorBench's
detection folder (``record/<record_name>/detection/<entry>_pretrain/`` or ``detection_pretrain/<entry>/``).

A cell is *done* when its outputs exist (summary CSV + ``attack_result.pt`` / ``defense_result.pt``),
whoever wrote them: that is what makes runs resumable and lets an experiment reuse existing records.
"""
from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_yaml, repo_root
from ..errors import BurnError, brief
from .outputs import defense_done, detection_done, detection_folder, record_done

TOP_KEYS = {"name", "workdir", "output", "scripts_root", "python", "executor", "jobs", "gpus", "env",
            "submitit", "ray", "allow_unavailable", "seeds", "record_name", "datasets", "models",
            "attack_overrides", "defense_overrides", "attacks", "defenses", "detector_overrides", "detectors"}
AXIS_KEYS = {"attack_overrides", "defense_overrides", "detector_overrides"}
ATTACK_KEYS = {"attack", "overrides", "record_name", "seeds", "models"}
DEFENSE_KEYS = {"defense", "overrides"}
DETECTOR_KEYS = {"detector", "overrides"}
# flags compare sets itself: a user override would break the cell's identity
ATTACK_RESERVED = {"save_folder_name", "dataset", "model", "random_seed"}
DEFENSE_RESERVED = {"result_file", "dataset", "random_seed", "output_name", "model"}
DEFAULT_RECORD_NAME = "{attack}_{dataset}_{model}_s{seed}"
EXECUTORS = ("local", "submitit", "ray")
# detectors that read a BURN defense run, with their --burn_output default (burn reads one only when given)
READS_BURN = {"burn_s": "defense/burn", "burn": None}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# environment variables that choose the code a cell's interpreter, loader or shell runs
CODE_ENV = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONEXECUTABLE", "PYTHONPLATLIBDIR",
            "PATH", "BASH_ENV", "ENV"}
CODE_ENV_PREFIXES = ("LD_", "DYLD_")
# submitit parameters that put shell lines or scheduler options into the job scripts
SUBMITIT_CODE = ("setup", "teardown", "srun_args", "additional_parameters")


@dataclass(frozen=True)
class RecordCell:
    """One attack run: ``record/<record>/`` for (dataset, model, attack entry, seed)."""

    dataset: str
    model: str
    attack: str  # entry name (the label in tables)
    script: str  # attack/<script>.py
    seed: int
    record: str
    args: tuple[str, ...]

    kind = "attack"
    stamp_name = "provenance.json"  # the file holding the run's stamp (burnkit.results.run_environment)

    @property
    def cell_id(self) -> str:
        return f"attack/{self.record}"

    def output_dir(self, workdir: Path) -> Path:
        return workdir / "record" / self.record

    def is_done(self, workdir: Path) -> bool:
        return record_done(workdir / "record" / self.record)


@dataclass(frozen=True)
class DefenseCell:
    """One defense run on one record: ``record/<record>/defense/<folder>/``."""

    source: RecordCell
    defense: str  # entry name = output folder
    script: str  # defense/<script>.py
    args: tuple[str, ...]

    kind = "defense"
    stamp_name = "cost.json"

    @property
    def record(self) -> str:
        return self.source.record

    @property
    def folder(self) -> str:
        return self.defense

    @property
    def cell_id(self) -> str:
        return f"defense/{self.record}/{self.folder}"

    def output_dir(self, workdir: Path) -> Path:
        return workdir / "record" / self.record / "defense" / self.folder

    def is_done(self, workdir: Path) -> bool:
        return defense_done(self.output_dir(workdir), self.script)


@dataclass(frozen=True)
class DetectionCell:
    """One detector run on one record (BackdoorBench's ``detection_pretrain/<script>.py``); ``after``
    names cells whose outputs it reads (BURN's final score reads a BURN defense run)."""

    source: RecordCell
    detector: str  # entry name = method folder name
    script: str  # detection_pretrain/<script>.py
    args: tuple[str, ...]
    after: tuple[str, ...] = ()

    kind = "detection"
    script_dir = "detection_pretrain"
    stamp_name = "cost.json"

    @property
    def record(self) -> str:
        return self.source.record

    @property
    def cell_id(self) -> str:
        return f"detection/{self.record}/{self.detector}"

    def output_dir(self, workdir: Path) -> Path:
        return detection_folder(workdir / "record" / self.record, self.script, self.detector)

    def is_done(self, workdir: Path) -> bool:
        return detection_done(workdir / "record" / self.record, self.script, self.detector)


@dataclass
class Experiment:
    """A validated experiment: settings plus the record and defense cells it expands to."""

    name: str
    path: Path
    workdir: Path
    output: Path
    scripts_root: Path
    python: str
    executor: str
    jobs: int
    gpus: list[str] | None
    env: dict[str, str]
    submitit: dict
    ray: dict
    allow_unavailable: bool
    seeds: list[int]
    datasets: list[str]
    models: list[str]
    attacks: dict[str, str]  # entry -> script
    defenses: dict[str, str]
    records: list[RecordCell] = field(default_factory=list)
    defense_cells: list[DefenseCell] = field(default_factory=list)
    detectors: dict[str, str] = field(default_factory=dict)
    detection_cells: list[DetectionCell] = field(default_factory=list)

    @property
    def cells(self) -> list:
        """Record cells first: defense and detection cells depend on their record."""
        return [*self.records, *self.defense_cells, *self.detection_cells]

    def script_path(self, cell) -> Path:
        return self.scripts_root / getattr(cell, "script_dir", cell.kind) / f"{cell.script}.py"

    def command(self, cell) -> list[str]:
        return [self.python, str(self.script_path(cell)), *cell.args]

    def outside_code(self, executor: str | None = None) -> list[str]:
        """What in the experiment would make its cells run code other than this checkout's scripts under
        the interpreter running compare: ``python``, a ``scripts_root`` outside the checkout, ``env``
        variables that choose the code to load, and (with the submitit ``executor``) setup lines for the
        job scripts. An experiment file travels like a record, so running any of this needs the
        command line's ``--allow-custom-python``; an empty list means nothing of the kind."""
        reasons = []
        if not _running_interpreter(self.python, self.workdir):
            reasons.append(f"python {brief(self.python)} is not the interpreter running compare ({sys.executable})")
        if not self.scripts_root.is_relative_to(repo_root()):
            reasons.append(f"scripts_root {self.scripts_root} is outside this checkout ({repo_root()})")
        reasons += [f"env.{name} changes the code the cells load" for name in self.env
                    if name in CODE_ENV or name.startswith(CODE_ENV_PREFIXES)]
        if (executor or self.executor) == "submitit":
            reasons += [f"submitit.{key} puts commands into the job scripts" for key in self.submitit
                        if str(key).endswith(SUBMITIT_CODE)]
        return reasons

    def unavailable(self) -> dict[str, list[str]]:
        """Entries whose script is missing (or, for this checkout's scripts, not registered)."""
        registered = {"attack": None, "defense": None, "detector": None}
        if self.scripts_root == repo_root():
            from ..attack import list_attacks
            from ..defense import list_defenses
            from ..detector import list_detectors

            registered = {"attack": set(list_attacks()), "defense": set(list_defenses()),
                          "detector": set(list_detectors())}
        missing: dict[str, list[str]] = {"attack": [], "defense": [], "detector": []}
        folders = {"attack": "attack", "defense": "defense", "detector": DetectionCell.script_dir}
        for kind, entries in (("attack", self.attacks), ("defense", self.defenses), ("detector", self.detectors)):
            for entry, script in entries.items():
                known = registered[kind]
                has_script = (self.scripts_root / folders[kind] / f"{script}.py").is_file()
                if not has_script or (known is not None and script not in known):
                    missing[kind].append(entry)
        return missing

    def check_available(self) -> list[str]:
        """Drop unavailable entries (``allow_unavailable``) or raise; returns warnings."""
        missing = self.unavailable()
        if not any(missing.values()):
            return []
        described = "; ".join(f"{kind} {', '.join(names)}" for kind, names in missing.items() if names)
        if not self.allow_unavailable:
            raise BurnError(f"{self.path}: no script for {described} under {self.scripts_root}; fix the names "
                            "or set allow_unavailable: true to skip them")
        dropped_attacks = set(missing["attack"])
        dropped_defenses = set(missing["defense"])
        dropped_detectors = set(missing["detector"])
        self.records = [r for r in self.records if r.attack not in dropped_attacks]
        self.defense_cells = [c for c in self.defense_cells
                              if c.defense not in dropped_defenses and c.source.attack not in dropped_attacks]
        self.detection_cells = [c for c in self.detection_cells
                                if c.detector not in dropped_detectors and c.source.attack not in dropped_attacks]
        for name in dropped_attacks:
            self.attacks.pop(name)
        for name in dropped_defenses:
            self.defenses.pop(name)
        for name in dropped_detectors:
            self.detectors.pop(name)
        return [f"skipping {described}: not available under {self.scripts_root}"]


# --------------------------------------------------------------------------- loading


def load_experiment(path: str | Path, workdir: str | None = None) -> Experiment:
    """Read and validate an experiment YAML; ``workdir`` (the CLI's) beats the YAML's."""
    path = Path(path)
    if not path.is_file():
        raise BurnError(f"experiment file {path} not found; give the path to an experiment YAML (see experiments/)")
    raw = load_yaml(path)
    where = str(path)
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise BurnError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TOP_KEYS))}")
    name = str(raw.get("name") or path.stem)
    _check_name(name, "name", where)
    work = Path(workdir or raw.get("workdir") or ".").expanduser().resolve()
    output = Path(_format(str(raw.get("output") or "compare/{name}"), {"name": name}, "output", where))
    output = output if output.is_absolute() else work / output
    scripts_root = Path(raw["scripts_root"]).expanduser().resolve() if raw.get("scripts_root") else repo_root()
    executor = str(raw.get("executor") or "local")
    if executor not in EXECUTORS:
        raise BurnError(f"{where}: executor must be one of {', '.join(EXECUTORS)}, got {brief(executor)}")
    seeds = _seeds(raw.get("seeds", [0]), "seeds", where)
    datasets = _axis(raw.get("datasets"), "datasets", where)
    models = _axis(raw.get("models"), "models", where)
    attacks = _entries(raw.get("attacks"), "attacks", "attack", ATTACK_KEYS, where, required=True)
    for entry, a in attacks.items():
        stray = sorted(set(a["models"] or ()) - set(models))
        if stray:
            raise BurnError(f"{where}: attacks.{entry}.models names {', '.join(stray)}, which is not in 'models' "
                            f"({', '.join(models)}); add it there")
    defenses = _entries(raw.get("defenses"), "defenses", "defense", DEFENSE_KEYS, where, required=False)
    detectors = _entries(raw.get("detectors"), "detectors", "detector", DETECTOR_KEYS, where, required=False)
    gpus = raw.get("gpus")
    exp = Experiment(
        name=name, path=path, workdir=work, output=output, scripts_root=scripts_root,
        python=str(raw.get("python") or sys.executable), executor=executor,
        jobs=_positive(raw.get("jobs", 1), "jobs", where),
        gpus=None if gpus is None else [str(g) for g in (gpus if isinstance(gpus, list) else str(gpus).split(","))],
        env=_env(raw.get("env"), where),
        submitit=_mapping(raw.get("submitit"), "submitit", where), ray=_mapping(raw.get("ray"), "ray", where),
        allow_unavailable=bool(raw.get("allow_unavailable", False)), seeds=seeds, datasets=list(datasets),
        models=list(models), attacks={k: v["script"] for k, v in attacks.items()},
        defenses={k: v["script"] for k, v in defenses.items()}, detectors={k: v["script"] for k, v in detectors.items()})
    layers = {"attack": _overrides(raw.get("attack_overrides"), "attack_overrides", ATTACK_RESERVED, where),
              "defense": _overrides(raw.get("defense_overrides"), "defense_overrides", DEFENSE_RESERVED, where),
              "detector": _overrides(raw.get("detector_overrides"), "detector_overrides", DEFENSE_RESERVED, where)}
    template = str(raw.get("record_name") or DEFAULT_RECORD_NAME)
    seen: dict[str, tuple] = {}
    cells = ((d, m, a, seed) for d, m, a in itertools.product(datasets.items(), models.items(), attacks.items())
             if a[1]["models"] is None or m[0] in a[1]["models"]
             for seed in (a[1]["seeds"] or seeds))
    for (dataset, d_opts), (model, m_opts), (attack, a), seed in cells:
        fields = {"dataset": dataset, "model": model, "attack": attack, "seed": seed, "script": a["script"]}
        record = _format(a["record_name"] or template, fields, "record_name", where)
        _check_name(record, "record_name", where)
        if record in seen:
            raise BurnError(f"{where}: record name {brief(record)} is produced for both {seen[record]} and "
                            f"{(dataset, model, attack, seed)}; put {{seed}}, {{dataset}}, {{model}} or {{attack}} "
                            "in record_name")
        seen[record] = (dataset, model, attack, seed)
        fields["record"] = record
        overrides = {**layers["attack"], **d_opts["attack"], **m_opts["attack"], **a["overrides"]}
        args = ["--dataset", dataset, "--model", model, "--save_folder_name", record, "--random_seed", str(seed),
                *_flags(overrides, fields, where)]
        source = RecordCell(dataset, model, attack, a["script"], seed, record, tuple(args))
        exp.records.append(source)
        for defense, d in defenses.items():
            overrides = {**layers["defense"], **d_opts["defense"], **m_opts["defense"], **d["overrides"]}
            args = ["--result_file", record, "--dataset", dataset, "--random_seed", str(seed)]
            if defense != d["script"]:
                args += ["--output_name", defense]
            args += _flags(overrides, {**fields, "defense": defense, "script": d["script"]}, where)
            exp.defense_cells.append(DefenseCell(source, defense, d["script"], tuple(args)))
        own_defenses = [c for c in exp.defense_cells if c.source is source]
        for detector, d in detectors.items():
            overrides = {**layers["detector"], **d_opts["detector"], **m_opts["detector"], **d["overrides"]}
            args = ["--result_file", record, "--dataset", dataset, "--random_seed", str(seed)]
            if detector != d["script"]:
                args += ["--output_name", detector]
            args += _flags(overrides, {**fields, "detector": detector, "script": d["script"]}, where)
            reads = overrides.get("burn_output", READS_BURN.get(d["script"]))
            after = tuple(c.cell_id for c in own_defenses if reads and f"defense/{c.folder}" == str(reads).rstrip("/"))
            exp.detection_cells.append(DetectionCell(source, detector, d["script"], tuple(args), after))
    return exp


def _axis(value, key: str, where: str) -> dict[str, dict]:
    """``[a, b]`` or ``{a: {attack_overrides: ..., defense_overrides: ...}, b: null}`` ->
    ``{name: {"attack": overrides, "defense": overrides}}``."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        value = {str(v): {} for v in value}
    if not isinstance(value, dict) or not value:
        raise BurnError(f"{where}: '{key}' must be a non-empty list (or mapping) of names")
    out = {}
    for name, opts in value.items():
        opts = opts or {}
        if not isinstance(opts, dict) or set(opts) - AXIS_KEYS:
            raise BurnError(f"{where}: {key}.{name} may only hold {', '.join(sorted(AXIS_KEYS))}")
        out[str(name)] = {
            kind: _overrides(opts.get(f"{kind}_overrides"), f"{key}.{name}.{kind}_overrides", reserved, where)
            for kind, reserved in (("attack", ATTACK_RESERVED), ("defense", DEFENSE_RESERVED),
                                   ("detector", DEFENSE_RESERVED))}
    return out


def _entries(value, key: str, script_key: str, allowed: set, where: str, required: bool) -> dict[str, dict]:
    """Named entries: a list of script names, or ``{entry: {<script_key>: script, overrides: {...}}}``."""
    if value is None and not required:
        return {}
    if isinstance(value, list):
        value = {str(v): {} for v in value}
    if not isinstance(value, dict) or (required and not value):
        raise BurnError(f"{where}: '{key}' must be a non-empty list or mapping of entries, e.g. {{badnet: {{}}}}")
    out = {}
    for entry, opts in value.items():
        entry = str(entry)
        _check_name(entry, f"{key} entry", where)
        opts = opts or {}
        if not isinstance(opts, dict):
            raise BurnError(f"{where}: {key}.{entry} must be a mapping such as {{overrides: {{epochs: 1}}}}")
        extra = sorted(set(opts) - allowed)
        if extra:
            raise BurnError(f"{where}: {key}.{entry} has unknown key(s) {', '.join(extra)}; allowed: "
                            f"{', '.join(sorted(allowed))} (script flags go under overrides)")
        reserved = ATTACK_RESERVED if script_key == "attack" else DEFENSE_RESERVED  # detectors: as defenses
        script = str(opts.get(script_key) or entry)
        _check_name(script, f"{key}.{entry}.{script_key}", where)
        out[entry] = {"script": script, "record_name": opts.get("record_name"),
                      "overrides": _overrides(opts.get("overrides"), f"{key}.{entry}.overrides", reserved, where),
                      "seeds": _seeds(opts["seeds"], f"{key}.{entry}.seeds", where) if "seeds" in opts else None,
                      "models": _entry_models(opts["models"], f"{key}.{entry}.models", where) if "models" in opts else None}
    return out


def _seeds(value, key: str, where: str) -> list[int]:
    """A non-empty list of distinct integer seeds."""
    if not isinstance(value, list) or not value or not all(type(s) is int for s in value):
        raise BurnError(f"{where}: {key} must be a non-empty list of integers, e.g. [0, 1, 2]")
    if len(set(value)) != len(value):
        raise BurnError(f"{where}: {key} {brief(value)} repeats a value; list each seed once")
    return value


def _entry_models(value, key: str, where: str) -> list[str]:
    """The models an attack entry is restricted to (each must be one of the experiment's ``models``)."""
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        raise BurnError(f"{where}: {key} must be a non-empty list of model names from 'models'")
    return value


def _overrides(value, key: str, reserved: set, where: str) -> dict:
    value = _mapping(value, key, where)
    for flag in value:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(flag)):
            raise BurnError(f"{where}: {key} has a bad flag name {brief(flag)}; use the script's flag without dashes")
    clash = sorted(set(map(str, value)) & reserved)
    if clash:
        raise BurnError(f"{where}: {key} sets {', '.join(clash)}, which compare sets per cell; use seeds, datasets, "
                        "models, record_name or the entry name instead")
    return {str(k): v for k, v in value.items()}


def _env(value, where: str) -> dict[str, str]:
    """``env``: variable names to one value each (a string, a number or true/false), as every cell's
    environment will hold them."""
    out = {}
    for name, v in _mapping(value, "env", where).items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise BurnError(f"{where}: env has a bad variable name {brief(name)}; use letters, digits and _")
        if not isinstance(v, (str, int, float)) or (isinstance(v, float) and not math.isfinite(v)) or \
                (isinstance(v, str) and "\0" in v):
            raise BurnError(f"{where}: env.{name} must be a string, a number or true/false, got {brief(v)}; "
                            "every cell gets this one value")
        out[name] = str(v)
    return out


def _running_interpreter(python: str, workdir: Path) -> bool:
    """Whether ``python`` (a path, relative to the work dir, or a name on PATH) is the program running
    compare, under this or another name."""
    found = shutil.which(python) if os.sep not in python else str(workdir / Path(python).expanduser())
    try:
        return found is not None and os.path.samefile(found, sys.executable)
    except OSError:
        return False


def _mapping(value, key: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BurnError(f"{where}: '{key}' must be a mapping of names to values")
    return dict(value)


def _positive(value, key: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BurnError(f"{where}: '{key}' must be a positive integer, got {brief(value)}")
    return value


def _check_name(name: str, what: str, where: str) -> None:
    if not _NAME.match(name):
        raise BurnError(f"{where}: {what} {brief(name)} must be a plain folder name (letters, digits, _ . + -)")


def _format(template: str, fields: dict, key: str, where: str) -> str:
    names = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    unknown = sorted(names - set(fields))
    if unknown:
        raise BurnError(f"{where}: {key} {brief(template)} uses unknown placeholder(s) {', '.join(unknown)}; "
                        f"available: {', '.join(sorted(fields))}")
    return template.format(**fields)


def _flags(overrides: dict, fields: dict, where: str) -> list[str]:
    """``{epochs: 1, amp: false, steplr_milestones: [30, 60]}`` -> ``--epochs 1 --amp false ...``;
    ``null`` drops a flag (the script's YAML then decides); strings may use {dataset}-style fields."""
    args = []
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, str) and "{" in value:
            text = _format(value, fields, f"override {key}", where)
        else:
            text = str(value)
        args += [f"--{key}", text]
    return args


def cell_env(exp: Experiment) -> dict[str, str]:
    """Extra environment for every cell: the experiment's ``env`` and a PYTHONPATH that finds burnkit."""
    env = dict(exp.env)
    paths = [str(repo_root())] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.setdefault("PYTHONPATH", os.pathsep.join(dict.fromkeys(paths)))
    return env
