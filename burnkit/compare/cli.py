"""``burn-compare EXPERIMENT.yaml``: run the missing cells of an attacks x defenses matrix, then tabulate.
``burn-compare publish``: write the published tables from the committed reports (:mod:`.publish`).

Exit status: 0 when every cell has results, 1 when some failed or are blocked (the reports are
written anyway), 2 for a bad experiment file or flag.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
import time

from ..config import OneLineArgumentParser
from ..errors import BurnError, cli_errors
from .experiment import EXECUTORS, load_experiment
from .report import write_report
from .runner import experiment_lock, plan, run_experiment

PROG = "burn-compare"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, allow_abbrev=False, description="Run the missing cells of an attacks x defenses x seeds "
                                     "matrix (resumable), then write CSV/Markdown/HTML tables and plots. "
                                     "`burn-compare publish` writes the published tables from the committed reports "
                                     "(see burn-compare publish --help).")
    parser.add_argument("experiment", help="experiment YAML (see docs/compare.md)")
    parser.add_argument("--executor", choices=EXECUTORS, help="where cells run (default: the YAML's, else local)")
    parser.add_argument("--jobs", type=int, help="cells in flight at once (default: the YAML's, else 1)")
    parser.add_argument("--workdir", help="folder holding record/ and data/ (default: the YAML's, else the CWD)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their commands; run nothing")
    parser.add_argument("--collect-only", action="store_true", help="run nothing; tabulate what is on disk")
    parser.add_argument("--rerun-stale", action="store_true",
                        help="also run again the cells whose outputs other code made (another revision, other uncommitted "
                             "changes, or unknown), replacing them (--overwrite true; the old folders are kept, renamed)")
    parser.add_argument("--allow-custom-python", action="store_true",
                        help="let the experiment file run code from outside this checkout (its python, a scripts_root "
                             "elsewhere, env.PYTHONPATH and the like, submitit setup lines); only for files you trust")
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt  # `kill PID`: stop the running cells and record them as interrupted


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["publish"]:
        from .publish import main as publish

        return publish(argv[1:])
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        return _main(argv)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    started = time.perf_counter()
    with cli_errors(PROG):
        args = build_parser().parse_args(argv)
        exp = load_experiment(args.experiment, args.workdir)
        command = shlex.join([PROG, *argv])
        if args.collect_only:
            return _finish(exp, command, started, ok=True)
        executor = args.executor or exp.executor
        outside = exp.outside_code(executor)
        if outside and args.dry_run and not args.allow_custom_python:
            print(f"{PROG}: warning: running this needs --allow-custom-python: {'; '.join(outside)}", file=sys.stderr)
        elif outside and not args.allow_custom_python:
            raise BurnError(f"{exp.path}: {'; '.join(outside)}. An experiment file may only run this checkout's "
                            "scripts with the interpreter running compare; read the file, and if you trust it, "
                            "pass --allow-custom-python")
        for warning in exp.check_available():
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        jobs = args.jobs if args.jobs is not None else exp.jobs
        if jobs < 1:
            raise BurnError(f"--jobs must be at least 1, got {jobs}")
        if args.dry_run:
            for cell, status in plan(exp, args.rerun_stale):
                print(f"{status:5}  {cell.cell_id}\n       {shlex.join(exp.command(cell))}")
            return 0
        with experiment_lock(exp.output):
            report = run_experiment(exp, executor, jobs, rerun_stale=args.rerun_stale)
            return _finish(exp, command, started, ok=report.ok, failed=report.failed, blocked=report.blocked)


def _finish(exp, command: str, started: float, ok: bool, failed=(), blocked=()) -> int:
    paths = write_report(exp, command, time.perf_counter() - started)
    print(paths["markdown"].read_text())
    print(f"reports: {paths['markdown']}  {paths['html']}  {paths['summary']}  {paths['cells']}")
    if failed or blocked:
        print(f"{len(failed)} failed, {len(blocked)} blocked; fix and re-run the same command to retry them "
              f"(logs and exit codes: {exp.output / 'state.json'})")
    print(f"wall time {time.perf_counter() - started:.1f}s")
    return 0 if ok else 1
