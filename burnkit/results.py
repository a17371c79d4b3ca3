"""Per-run result files in BackdoorBench's format (spec §1.8, §3.7).

``MetricLog`` keeps one dict per epoch/iteration and writes ``<name>_df.csv`` (pandas, unnamed
index column first, NaN written as ``nan_value``) and ``<name>_df_summary.csv`` whose rows are
``last`` (last non-NaN value), ``valid_max`` and ``exist_nan_value`` - what BackdoorBench's
``Metric_Aggregator`` produces. Files are replaced atomically, so a killed run never leaves a
half-written CSV; the summary is written only when the rows are complete, so a killed run never
leaves one whose ``last`` row passes for a final result.

Every key a row names is a column, also when its value is ``None`` in every row (a run that stops
early still writes the columns a full run writes, with empty cells); columns keep the order in which
rows first name them, so one producer always writes one header.

A value that was deliberately not measured (the test sets are scored only every ``--test_every``
epochs) is :data:`NOT_SCORED`: its cell stays empty, the column stays in place, and a ``tested``
column (False on such rows) is added, so skipped rows are told apart from measured ones.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .fileio import atomic_write_bytes, name_max, shorten

NAN = "nan_value"
ACC_LIKE = ("train_acc", "train_acc_clean_only", "train_asr_bd_only", "train_ra_bd_only",
            "test_acc", "test_asr", "test_ra")
LOSS_LIKE = ("train_epoch_loss_avg_over_batch", "clean_test_loss_avg_over_batch", "bd_test_loss_avg_over_batch")


NOT_SCORED = "not scored"  # a plain string, so rows stay plain data in checkpoints
TESTED = "tested"


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return NAN
    return value


class MetricLog:
    """Rows of metrics written as ``<folder>/<name>_df.csv`` and ``<name>_df_summary.csv``."""

    def __init__(self, folder: str | Path, name: str):
        self.folder = Path(folder)
        self.name = name
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        """Add a row; ``None`` values are kept (written as empty cells), so their columns stay."""
        self.rows.append({k: _clean(v) for k, v in row.items()})

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)

    def columns(self) -> list[str]:
        """Every key any row names, in the order rows first name them (rows restored from a
        checkpoint included, which is why this is derived from the rows, not kept on the side)."""
        order: dict[str, None] = {}
        for row in self.rows:
            order.update(dict.fromkeys(k for k in row if k not in order))
        return list(order)

    def frame(self) -> pd.DataFrame:
        rows, columns = self.rows, self.columns()
        if any(_skipped(v) for row in rows for v in row.values()):
            rows = [{**{k: (None if _skipped(v) else v) for k, v in row.items()},
                     TESTED: not any(_skipped(v) for v in row.values())} for row in rows]
            columns.append(TESTED)
        return pd.DataFrame(rows, columns=columns, dtype=object)

    def summary(self) -> pd.DataFrame:
        return summarize(self.frame())

    def save(self) -> Path:
        """Write ``<name>_df.csv`` (after every epoch, so a killed run keeps its rows). The summary is
        left to :meth:`finish`: its ``last`` row reads as the final model's numbers, so it must not
        exist while the run (or phase) can still be killed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        df_path = self.folder / f"{self.name}_df.csv"
        atomic_write_text(df_path, self.frame().to_csv())
        return df_path

    def finish(self) -> tuple[Path, Path]:
        """Write the CSV and ``<name>_df_summary.csv``, once the rows are complete."""
        summary_path = self.folder / f"{self.name}_df_summary.csv"
        df_path = self.save()
        atomic_write_text(summary_path, self.summary().to_csv())
        return df_path, summary_path

    def last(self) -> dict:
        return dict(self.rows[-1]) if self.rows else {}


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """BackdoorBench's ``last_and_valid_max`` per column."""
    out = {}
    for col in frame.columns:
        values = list(frame[col])
        valid = [v for v in values if not (isinstance(v, str) and v in (NAN, NOT_SCORED)) and not _is_missing(v)]
        numeric = [v for v in valid if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[col] = {"last": valid[-1] if valid else None,
                    "valid_max": max(numeric) if numeric else None,
                    "exist_nan_value": any(isinstance(v, str) and v == NAN for v in values)}
    return pd.DataFrame(out, index=["last", "valid_max", "exist_nan_value"])


def _skipped(v) -> bool:
    return isinstance(v, str) and v == NOT_SCORED


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def read_summary(path: str | Path) -> dict:
    """The ``last`` row of a ``*_df_summary.csv`` as floats (ours or BackdoorBench's)."""
    frame = pd.read_csv(path, index_col=0)
    row = frame.loc["last"] if "last" in frame.index else frame.iloc[-1]
    out = {}
    for key, value in row.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def plot_metrics(rows: list[dict], folder: str | Path, prefix: str = "", x_key: str = "epoch") -> list[Path]:
    """``<prefix>acc_like_metric_plots.png`` and ``<prefix>loss_metric_plots.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    written = []
    for kind, keys in (("acc_like", ACC_LIKE), ("loss", LOSS_LIKE)):
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for key in keys:
            pts = [(r.get(x_key), r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=key)
                drawn = True
        if drawn:
            ax.set_xlabel(x_key)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            path = folder / f"{prefix}{kind}_metric_plots.png"
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_writable_folder(folder: str | Path, what: str) -> None:
    """Fail early, with one line, when ``folder`` cannot be created or written: a name in it is
    longer than the file system allows, a path component is a file, or the nearest existing folder
    refuses writes (tried for real, so read-only mounts are caught even for root). Leaves nothing
    behind."""
    from .errors import BurnError

    folder = Path(folder)
    probe = folder
    while not _exists(probe) and probe.parent != probe:
        probe = probe.parent
    limit = name_max(probe if probe.is_dir() else probe.parent)
    for part in folder.parts:
        if len(part.encode()) > limit:
            raise BurnError(f"{what} {shorten(part, 40)}... cannot be created: its name is {len(part.encode())} bytes "
                            f"long and the file system allows {limit}; choose a shorter name")
    if probe.exists() and not probe.is_dir():
        raise BurnError(f"{what} {folder} cannot be created: {probe} is a file, not a folder; move the file "
                        "away or choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".burnkit-write-probe-"))
    except OSError as err:
        raise BurnError(f"{what} {folder} is not writable ({err.strerror or err} in {probe}); fix the "
                        "permissions or choose another folder") from None


def check_output_folders(out_dir: Path, folders: dict[str, Path], moved_aside: bool,
                         what: str = "the output folder") -> None:
    """:func:`check_writable_folder` for ``out_dir`` and every folder a run creates (``folders``:
    ``{description: path}``, e.g. its log and checkpoint folders, default or given), so that a file
    in the way is found before anything is written. Folders inside an ``out_dir`` that is to be
    moved aside (``--overwrite``) are not checked: the new run gets a fresh ``out_dir``."""
    check_writable_folder(out_dir, what)
    for description, folder in folders.items():
        if not (moved_aside and Path(folder).is_relative_to(out_dir)):
            check_writable_folder(folder, description)


def move_aside(folder: str | Path) -> Path:
    """Rename a finished output folder to ``<name>.replaced-<time>`` (``--overwrite true``): the new
    run starts from an empty folder and the old results stay on disk until the user deletes them.
    A name too long to take the suffix is shortened to fit the file system's limit."""
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    limit = name_max(folder.parent)
    n = 1
    while True:
        suffix = f".replaced-{stamp}" + (f"-{n}" if n > 1 else "")
        target = folder.with_name(shorten(folder.name, limit - len(suffix.encode())) + suffix)
        if not target.exists():
            break
        n += 1
    os.replace(folder, target)
    return target


def _exists(path: Path) -> bool:
    """``path.exists()`` that treats a name the file system refuses as absent."""
    try:
        return path.exists()
    except OSError:
        return False


def write_json(path: str | Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- provenance (the stamp)


def code_revision(root: str | None = None) -> dict:
    """``{"revision": full commit hash, "dirty": bool}`` of the checkout at ``root`` (default: the
    one this package runs from). ``dirty`` counts tracked changes and untracked files git does not
    ignore, i.e. anything that would differ from the commit. Outside a git checkout (an exported
    tree, an installed package, no git, a checkout git refuses to read) the revision is
    ``"unknown"`` and ``dirty`` is None: numbers made there cannot be traced to a commit."""
    from .config import repo_root

    root_path = Path(root) if root else repo_root()
    unknown = {"revision": "unknown", "dirty": None}
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True,
                             cwd=root_path, timeout=10)
        lines = top.stdout.split()
        if top.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root_path.resolve():
            return unknown  # not a checkout of its own (e.g. installed inside another repository)
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=root_path,
                                timeout=30)
    except (OSError, subprocess.SubprocessError):
        return unknown
    if status.returncode != 0:
        return unknown
    return {"revision": lines[1], "dirty": bool(status.stdout.strip())}


def portable_config(config: dict) -> dict:
    """``config`` with every path in it (a string, or a string in a list such as ``terminal_info``) made
    portable (:func:`portable_path`, relative to the working directory - the work dir - or this
    checkout): a stamp or sidecar committed as an artifact names no folder of the machine that made it."""
    def portable(value):
        if isinstance(value, str):
            return portable_path(value, Path.cwd())
        if isinstance(value, (list, tuple)):
            return [portable(v) for v in value]
        return value

    return {key: portable(value) for key, value in config.items()}


def portable_path(text: str, *bases: Path) -> str:
    """``text`` relative to the first of ``bases`` (e.g. the work dir) that holds it when it is an
    absolute path, else relative to this checkout when it is inside it; any other text as it is.
    Stamps and reports name files this way, so they read the same on every machine."""
    from .config import repo_root

    path = Path(text).expanduser()
    if not path.is_absolute():
        return text
    with contextlib.suppress(OSError, RuntimeError):
        path = path.resolve()
    for base in (*bases, repo_root()):
        if path.is_relative_to(base.resolve()):
            return path.relative_to(base.resolve()).as_posix() or "."
    return text


def git_revision() -> str | None:
    """The short commit hash of this checkout (None outside one)."""
    revision = code_revision()["revision"]
    return None if revision == "unknown" else revision[:7]


def cpu_seconds() -> float:
    """CPU seconds this process has used (user + system, all its threads, and its finished child
    processes such as data-loader workers): what a run costs on a shared machine, where wall time
    depends on the load."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what :mod:`platform` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def machine(device) -> dict:
    """The machine a run used: CPU model and cores, torch's threads, the GPU (or "none"), versions."""
    import torch

    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}


@dataclass
class RunStart:
    """Noted when a run starts: its CPU clock and the revision of the code it loaded (a commit or an
    edit made while it runs does not change what ran)."""

    cpu: float = field(default_factory=cpu_seconds)
    code: dict = field(default_factory=code_revision)


def run_environment(device, start: RunStart, cfg=None, read: dict | None = None,
                    record_digest: str | None = None) -> dict:
    """What every run writes into its ``cost.json`` / ``provenance.json`` besides its own facts: the
    device, the time it finished, its CPU seconds since ``start`` (:func:`cpu_seconds`), and the
    ``stamp`` that lets a reader make the numbers again - the code revision and whether the tree had
    uncommitted changes, the full resolved config and the seed, ``record_digest`` (the
    :func:`~burnkit.data.tensors_digest` of the record's weights: the same for the attack that wrote
    the record and every run that read it), ``read`` (digests of the data the run read) and the
    machine. Attacks, defenses, detectors and resource builders all write it through here."""
    from .config import as_dict
    from .engine import device_description

    config = as_dict(cfg) if cfg is not None else {}
    return {"device": device_description(device), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "cpu_time_s": round(cpu_seconds() - start.cpu, 3),  # os.times counts in clock ticks
            "stamp": {**start.code, "seed": config.get("random_seed"),
                      "config": portable_config(config),
                      "record_digest": record_digest, "read": read or {}, "machine": machine(device)}}
