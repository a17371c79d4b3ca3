"""Run an experiment's missing cells: records first, each defense and detector as soon as its record
exists (a detector that reads a defense's output, BURN's final score, after that defense).

Resumability comes from the outputs themselves (a cell whose files exist is skipped, whoever wrote
them); ``state.json`` in the output folder only remembers what compare did: attempts per cell, exit
codes, the tail of failed logs, wall times. A failed cell is reported and retried on the next run; its
defenses are reported as blocked; everything else goes on. One compare at a time per output folder
(:mod:`burnkit.locks`: an advisory lock that dies with the process).
"""
from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BurnError
from ..locks import folder_lock
from ..results import code_revision, write_json
from .executors import CellTask, make_executor, recover_orphans
from .experiment import Experiment, cell_env
from .outputs import read_stamp, same_code


class RunState:
    """``state.json``: per cell ``status``, ``attempts``, ``exit_code``, ``tail``, ``wall_time_s``, ``log``."""

    def __init__(self, path: Path):
        self.path = path
        self.data = {"runs": 0, "cells": {}}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except ValueError:
                raise BurnError(f"{path} is not valid JSON; delete it (outputs on disk are kept and reused)") from None

    def cell(self, cell_id: str) -> dict:
        return self.data["cells"].setdefault(cell_id, {"attempts": 0})

    def save(self) -> None:
        write_json(self.path, self.data)


@dataclass
class RunReport:
    ran: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)  # finished now
    skipped: list[str] = field(default_factory=list)  # outputs already there
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


@contextlib.contextmanager
def experiment_lock(output: Path):
    """One compare at a time per output folder: the folder lock every burnkit writer takes."""
    with folder_lock(output, "the experiment output"):
        output.mkdir(parents=True, exist_ok=True)
        yield


def log_path(exp: Experiment, cell) -> Path:
    return exp.output / "logs" / (cell.cell_id.replace("/", "__") + ".log")


def plan(exp: Experiment, rerun_stale: bool = False) -> list[tuple[object, str]]:
    """``(cell, status)`` for every cell, records first: ``todo`` (no results), ``done``, ``stale``
    (results made by other code than this checkout's revision: kept and marked in the report), or,
    with ``rerun_stale``, ``rerun`` for a stale cell and for every finished cell that reads the output
    of one that is re-run (its record, or a run it reads such as BURN's for burn_s)."""
    revision = code_revision()
    out, again = [], set()
    for cell in exp.cells:
        if not cell.is_done(exp.workdir):
            status = "todo"
        elif not same_code(read_stamp(cell.output_dir(exp.workdir) / cell.stamp_name), revision):
            status = "stale"
        else:
            status = "done"
        inputs = () if cell.kind == "attack" else (cell.source.cell_id, *getattr(cell, "after", ()))
        if rerun_stale and status != "todo" and (status == "stale" or again.intersection(inputs)):
            status = "rerun"
        if status in ("rerun", "todo"):
            again.add(cell.cell_id)
        out.append((cell, status))
    return out


def run_experiment(exp: Experiment, executor: str, jobs: int, echo=print, rerun_stale: bool = False) -> RunReport:
    """Run every missing cell with ``jobs`` in flight at once (and, with ``rerun_stale``, every stale
    one, replacing its outputs: ``--overwrite true``); returns what happened."""
    started = time.perf_counter()
    report = RunReport()
    state = RunState(exp.output / "state.json")
    state.data["runs"] += 1
    env = tuple(sorted(cell_env(exp).items()))
    # first stop what a killed compare left running (it may still be writing outputs), then look
    for cell_id in recover_orphans(exp.output / "logs", echo):
        state.cell(cell_id).update(status="interrupted", tail="stopped: left running by a killed compare")
    for entry in state.data["cells"].values():  # an earlier compare died while these ran
        if entry.get("status") == "running":
            entry["status"] = "interrupted"
    pending, rerun, stale = [], set(), 0
    for cell, status in plan(exp, rerun_stale):
        stale += status == "stale"
        if status in ("done", "stale"):
            report.skipped.append(cell.cell_id)
            entry = state.cell(cell.cell_id)
            entry.setdefault("status", "done")
            if entry.get("status") != "done":  # finished elsewhere (or by hand) since the last run
                entry.update(status="done", exit_code=None, tail=None)
        else:
            pending.append(cell)
            if status == "rerun":
                rerun.add(cell.cell_id)
    state.save()
    echo(f"{exp.name}: {len(exp.cells)} cells, {len(report.skipped)} already done, {len(pending)} to run "
         f"({executor}, {jobs} at a time)" + (f"; {len(rerun)} of them again, replacing outputs made by other code"
                                              if rerun else "") +
         (f"; {stale} stale (made by other code than this revision; --rerun-stale runs them again)" if stale else ""))
    if not pending:
        report.wall_time_s = time.perf_counter() - started
        return report
    engine = make_executor(executor, jobs, exp)
    echo(f"executor: {engine.describe()}")
    running = {}
    interrupted = True
    total = len(pending)
    finished_records: set[str] = set()
    failed_records: set[str] = set()
    try:
        while pending or running:
            # depth first: a free slot goes to a defense or detector whose record is ready before it
            # starts another attack, so each record's results arrive early (same work, same cells)
            for cell in sorted(pending, key=lambda c: c.kind == "attack"):
                if len(running) >= jobs:
                    break
                if cell.kind != "attack":  # defenses and detectors
                    after = getattr(cell, "after", ())
                    lost = next((c for c in after if c in report.failed or c in report.blocked), None)
                    waiting = {c.cell_id for c in pending} | {c.cell_id for c in running.values()}
                    if cell.record in failed_records or lost:
                        pending.remove(cell)
                        why = f"attack cell attack/{cell.record} failed" if not lost else f"{lost} did not finish"
                        _mark(state, cell, status="blocked", tail=why)
                        echo(f"[{_count(report)}/{total}] blocked {cell.cell_id}: {why}")
                        report.blocked.append(cell.cell_id)
                        continue
                    if cell.source.cell_id in waiting or (not cell.source.is_done(exp.workdir)
                                                          and cell.record not in finished_records):
                        continue  # its record is still being made (or made again)
                    if any(c in waiting for c in after):
                        continue  # a cell whose output it reads (BURN's run for burn_s) is not done yet
                pending.remove(cell)
                entry = state.cell(cell.cell_id)
                entry["attempts"] += 1
                command = exp.command(cell) + (["--overwrite", "true"] if cell.cell_id in rerun else [])
                _mark(state, cell, status="running", log=str(log_path(exp, cell)), command=command)
                task = CellTask(cell.cell_id, tuple(command), str(exp.workdir), str(log_path(exp, cell)), env)
                running[engine.submit(task)] = cell
                report.ran.append(cell.cell_id)
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                cell = running.pop(future)
                ok = _settle(exp, state, cell, future, echo, _count(report), total)
                (report.done if ok else report.failed).append(cell.cell_id)
                if cell.kind == "attack":
                    (finished_records if ok else failed_records).add(cell.record)
        for cell in pending:  # defenses and detectors whose record cannot be made in this run
            _mark(state, cell, status="blocked", tail=f"record {cell.record} is missing")
            report.blocked.append(cell.cell_id)
        interrupted = False
    finally:
        for future, cell in running.items():  # interrupted: whatever was running is not done
            future.cancel()
            _mark(state, cell, status="interrupted")
        state.save()
        engine.close(interrupted=interrupted)
    report.wall_time_s = time.perf_counter() - started
    return report


def _settle(exp: Experiment, state: RunState, cell, future, echo, index: int, total: int) -> bool:
    """Record a finished cell's outcome; a cell succeeded only if its outputs exist."""
    try:
        outcome = future.result()
    except Exception as err:  # the executor itself failed (a Slurm job killed, a Ray worker lost)
        _mark(state, cell, status="failed", exit_code=None, tail=f"{type(err).__name__}: {err}")
        echo(f"[{index}/{total}] FAILED {cell.cell_id}: executor error {type(err).__name__}: {err}")
        return False
    done = outcome.exit_code == 0 and cell.is_done(exp.workdir)
    tail = None if done else (outcome.tail if outcome.exit_code != 0 else
                              f"exited 0 but its outputs are missing\n{outcome.tail}")
    _mark(state, cell, status="done" if done else "failed", exit_code=outcome.exit_code, tail=tail,
          wall_time_s=round(outcome.wall_time_s, 3), host=outcome.host, gpu=outcome.gpu,
          finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if done:
        echo(f"[{index}/{total}] done {cell.cell_id} ({outcome.wall_time_s:.1f}s)")
    else:
        last = (tail or "").strip().splitlines()[-1:] or [""]
        echo(f"[{index}/{total}] FAILED {cell.cell_id} (exit {outcome.exit_code}): {last[0]}  "
             f"[log: {log_path(exp, cell)}]")
    return done


def _count(report: RunReport) -> int:
    """The position of the next finished cell in this run's progress lines."""
    return len(report.done) + len(report.failed) + len(report.blocked) + 1


def _mark(state: RunState, cell, **values) -> None:
    state.cell(cell.cell_id).update(values)
    state.save()
